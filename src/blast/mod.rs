//! The blaster role: `smtpstorm blast TARGET` (and `probe`).
//!
//! [`run`] takes the [`BlastConfig`] the command line built, [`execute`]s
//! the run and hands the result to [`finish`], which writes the outputs and
//! turns assertions, baseline regressions and validity into the exit code.
//! `bench` calls [`execute`] and [`finish`] directly with its own config.
//!
//! [`execute`] spawns one pinned worker per CPU ([`worker`]), each owning its
//! connections, timers and [`crate::stats::Recorder`]. Once a second every
//! worker sends its interval snapshot; the main thread merges the snapshots
//! of each second ([`progress`] display, `.hlog`, timeline). At the end
//! the per-thread totals are merged once into the report.
//!
//! Invariants: the main thread never touches a worker's state; the body
//! shared by every message is built before the run's clock starts. An
//! open-loop run in which the blaster itself fell behind (p99 of the lag of
//! messages that found a free connection above `max(10 ms, 10/rate)`, or
//! messages due but never taken from the schedule) is marked invalid and
//! says so on stderr (exit 3); one in which the target could not absorb the
//! rate (messages waited for a free connection) is valid, and the report
//! says so beside the achieved rate. Sending more than 2% over the asked
//! rate would be a bug, and is checked. A run in which no message was
//! accepted, more than `--max-failed` of the tries failed, or the target
//! failed everything for `--max-outage`, is a failed run (exit 4, one line
//! per reason on stderr). Ctrl-C ends the run early and
//! everything measured so far is still reported.

pub mod body;
pub mod config;
pub mod conn;
pub mod corpus;
pub mod identity;
pub mod message;
pub mod probe;
pub mod profile;
pub mod progress;
pub mod scenario;
pub mod schedule;
pub mod sweep;
pub mod size;
pub mod worker;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use crate::net::driver::Transport;
use crate::net::runtime::{spawn_workers, StopSignal};
use crate::stats::{
    baseline_checks, load_report, write_hgrm_file, write_junit, write_summary, Assertion,
    Bottleneck, CpuUsage, HlogWriter, IntervalMerger, IntervalSnapshot, LiveMetrics, Measurements,
    MetricsServer, OpenLoopReport, Report, ReportInput, Role, TimelinePoint,
};

pub use config::{BlastConfig, LoadModel, OutputConfig};
use worker::{run_worker, OpenLoopCounts, RunClock, ThreadSnapshot};

/// Exit code: a failed `--assert` or `--baseline` regression.
pub const EXIT_ASSERT: u8 = 99;
/// Exit code: the run could not keep its schedule (without `--allow-invalid`).
pub const EXIT_INVALID: u8 = 3;
/// An open-loop thread busy more than this share of the measured window
/// (not waiting for events in its backend) is saturated: the run is invalid.
pub const SATURATED_BUSY: f64 = 0.9;

/// Exit code: a failed run (see [`crate::stats::Report::judge_failures`]):
/// the target accepted nothing, more than `--max-failed` of the tries
/// failed, or it failed everything for `--max-outage`.
pub const EXIT_FAILED: u8 = 4;

/// What [`execute`] measured.
#[derive(Debug)]
pub struct BlastRun {
    pub report: Report,
    /// The first few distinct session errors (for the summary).
    pub errors: Vec<String>,
    /// The run was cut short by Ctrl-C / SIGTERM.
    pub interrupted: bool,
}

/// `smtpstorm blast`: the exit code (0, 3 invalid, 99 failed assertion).
pub fn run(cfg: BlastConfig) -> anyhow::Result<u8> {
    let output = cfg.output.clone();
    let run = execute(cfg)?;
    finish(run, &output)
}

/// CPU time of this process so far (`getrusage`); zero if it cannot be
/// read. The report is given the difference of two readings.
fn process_cpu() -> CpuUsage {
    crate::net::proc::self_rusage()
        .map(|u| CpuUsage::from_us(u.cpu_user_us, u.cpu_sys_us))
        .unwrap_or_default()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Sleeps until `at` (UNIX seconds), or until a stop is requested.
fn sleep_until_unix(at: f64, stop: &StopSignal) {
    loop {
        let left = at - unix_now();
        if left <= 0.0 || stop.is_stopped() {
            return;
        }
        std::thread::sleep(Duration::from_secs_f64(left.min(0.05)));
    }
}

/// Waits for `--start-at` `at` (UNIX seconds) and returns how late the run
/// starts: 0 when it was still ahead; when it had already passed, says so
/// in one line on stderr (the report records it as
/// `config.start_late_secs`) instead of starting late silently.
fn start_at_lateness(at: f64, stop: &StopSignal) -> f64 {
    let late = unix_now() - at;
    if late > 0.0 {
        eprintln!(
            "smtpstorm: --start-at {at} passed {late:.3} s ago; starting now, late (recorded as config.start_late_secs)"
        );
        return late;
    }
    sleep_until_unix(at, stop);
    0.0
}

/// Runs the load described by `cfg` and returns the report (assertions not
/// yet evaluated; see [`finish`]). Errors: workers that cannot start, a
/// fatal condition such as running out of ephemeral ports, an unwritable
/// `--hlog`.
pub fn execute(cfg: BlastConfig) -> anyhow::Result<BlastRun> {
    let stop = StopSignal::process().context("installing the Ctrl-C handler")?;
    let start_late_secs = cfg.start_at_unix.map(|at| start_at_lateness(at, &stop));
    let threads = cfg.cpus.plan().context("planning worker threads")?.len();
    // Before the clock starts, so nothing of it lands inside a phase or
    // makes the schedule late: the body every message shares, and the TLS
    // library's first random draw (40-90 ms once per process, see net::tls).
    let body = cfg.message_builder(0, threads).shared_body();
    if let Some(s) = &cfg.scenario {
        s.prepare(&cfg, threads);
    }
    if cfg.uses_tls() {
        crate::net::tls::install_crypto_provider();
    }
    let mut hlog = open_hlog(&cfg)?;
    let start = Instant::now();
    let measure_start = start + cfg.warmup;
    let clock = RunClock {
        start,
        measure_start,
        end: cfg.duration.map(|d| measure_start + d),
    };
    let started_at_unix = unix_now() + cfg.warmup.as_secs_f64();
    let cpu_start = process_cpu();
    let mut progress = progress::Progress::new(&cfg);
    // Live metrics: fed below from the merged snapshots, once a second.
    let live = LiveMetrics::new(Role::Blast);
    let _metrics_server = serve_metrics(&cfg.output, &live)?;
    let transport = Transport::open(&cfg.io, threads, &[], true)?;
    let backend = transport.clone();
    let cfg = Arc::new(cfg);
    let (tx, rx) = mpsc::channel::<ThreadSnapshot>();
    let workers = {
        let cfg = Arc::clone(&cfg);
        let clock = clock.clone();
        spawn_workers(&cfg.cpus.clone(), "blast", &stop, move |ctx| {
            let t = transport.thread(ctx.index);
            run_worker(
                ctx,
                Arc::clone(&cfg),
                clock.clone(),
                body.clone(),
                tx.clone(),
                t,
            )
        })?
    };
    let Snapshots {
        merger,
        sent,
        aborted,
    } = merge_snapshots(
        &rx,
        threads,
        &live,
        &mut hlog,
        &mut progress,
        (&cfg.output.abort_on, &stop),
    )?;
    progress.finish();
    live.finish();
    let results = workers.join()?;
    let ended = Instant::now();
    if let Some(h) = hlog {
        h.finish()?;
    }
    let cpu = process_cpu().since(&cpu_start);
    let Merged {
        m,
        errors,
        interrupted,
        open,
        accepted,
    } = Merged::of(&results)?;
    // A stop by --abort-on is no interruption.
    let interrupted = interrupted && aborted.is_none();
    debug_assert_eq!(
        m.counts.messages_attempted + m.counts.connections_without_session,
        m.counts.messages_accepted
            + m.counts.messages_tempfailed
            + m.counts.messages_rejected
            + m.counts.connection_errors
            + m.counts.timeouts
            + m.counts.protocol_errors,
        "every attempted message and every connection without a session has exactly one outcome"
    );
    // The measured time: the configured duration when the run ran to it,
    // else the time until it stopped.
    let elapsed = ended.saturating_duration_since(measure_start);
    let duration_secs = match (cfg.duration, clock.end) {
        (Some(d), Some(end)) if !interrupted && ended >= end => d.as_secs_f64(),
        _ => elapsed.as_secs_f64(),
    };
    if cfg.target.port() == 25 && m.counts.timeouts > 0 && m.counts.messages_accepted == 0 {
        if let Some(hint) = probe::port25_hint(25) {
            eprintln!("smtpstorm: every session timed out on port 25: {hint}");
        }
    }
    let (invalid_reasons, open_loop) = verdict(&cfg, &open, duration_secs, &m, interrupted);
    let (_, mut timeline) = merger.into_parts();
    rates_per_second(&cfg, &mut timeline, &sent);
    let mut report = Report::build(ReportInput {
        role: Role::Blast,
        config: cfg.echo.clone(),
        started_at_unix,
        duration_secs,
        measurements: m,
        timeline,
        invalid_reasons,
        cpu,
        host: None,
    })?;
    report.open_loop = open_loop;
    if let Some(run) = cfg.trace {
        report.trace = Some(crate::stats::TraceReport::of_blast(run, accepted));
    }
    report.xdp = backend.stats();
    report.aborted = aborted;
    if let Some(s) = &cfg.scenario {
        let per_worker: Vec<&[Measurements]> = results.iter().map(|r| &r.profiles[..]).collect();
        report.profiles = s.reports(&per_worker)?;
    }
    if let (Some(late), Some(c)) = (start_late_secs, report.config.as_object_mut()) {
        c.insert(
            "start_late_secs".into(),
            ((late * 1e3).round() / 1e3).into(),
        );
    }
    Ok(BlastRun {
        report,
        errors,
        interrupted,
    })
}

/// `--hlog`: the interval log, stamped from the end of the warmup.
fn open_hlog(
    cfg: &BlastConfig,
) -> anyhow::Result<Option<HlogWriter<std::io::BufWriter<std::fs::File>>>> {
    let Some(p) = &cfg.output.hlog else {
        return Ok(None);
    };
    let f = std::fs::File::create(p)
        .with_context(|| format!("cannot create --hlog {}", p.display()))?;
    Ok(Some(HlogWriter::new(
        std::io::BufWriter::new(f),
        SystemTime::now() + cfg.warmup,
    )?))
}

/// `--metrics-listen`: serves `live` until the server is dropped.
fn serve_metrics(
    output: &OutputConfig,
    live: &Arc<LiveMetrics>,
) -> anyhow::Result<Option<MetricsServer>> {
    let Some(addr) = output.metrics_listen else {
        return Ok(None);
    };
    let s = MetricsServer::start(addr, Arc::clone(live))?;
    if !output.quiet {
        eprintln!(
            "smtpstorm: metrics on http://{}/metrics and /stats",
            s.addr()
        );
    }
    Ok(Some(s))
}

/// Receives the workers' snapshots until every worker ended, merging each
/// second's once every thread has sent its own (what is left, at the end),
/// and feeds each merged second to the live metrics, `--hlog` and the
/// progress line. Returns the merged timeline, and the messages sent in
/// each second (open loop).
fn merge_snapshots<W: Write>(
    rx: &mpsc::Receiver<ThreadSnapshot>,
    threads: usize,
    live: &LiveMetrics,
    hlog: &mut Option<HlogWriter<W>>,
    progress: &mut progress::Progress,
    (abort_on, stop): (&[Assertion], &StopSignal),
) -> anyhow::Result<Snapshots> {
    let mut sent: BTreeMap<u64, u64> = BTreeMap::new();
    let mut aborted: Option<String> = None;
    let mut seconds = 0u64;
    let mut pending: BTreeMap<u64, (usize, IntervalSnapshot)> = BTreeMap::new();
    let mut merger = IntervalMerger::new();
    let mut open_by_thread = vec![0usize; threads];
    let mut absorb =
        |snap: &IntervalSnapshot, hlog: &mut Option<HlogWriter<W>>| -> anyhow::Result<()> {
            merger.absorb(snap);
            seconds += 1;
            if aborted.is_none() && !abort_on.is_empty() {
                aborted = abort_reason(abort_on, merger.totals(), seconds);
                if aborted.is_some() {
                    stop.stop();
                }
            }
            live.absorb(snap);
            if let Some(h) = hlog {
                h.write_snapshot(snap)?;
            }
            progress.interval(snap);
            Ok(())
        };
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(msg) => {
                *sent.entry(msg.index).or_default() += msg.sent;
                if let Some(o) = open_by_thread.get_mut(msg.thread) {
                    *o = msg.open_connections;
                }
                live.set_open_connections(open_by_thread.iter().sum::<usize>() as u64);
                let entry = pending
                    .entry(msg.index)
                    .or_insert_with(|| (0, msg.snapshot.clone()));
                if entry.0 > 0 {
                    entry.1.merge(&msg.snapshot);
                }
                entry.0 += 1;
                if entry.0 == threads {
                    let (_, snap) = pending.remove(&msg.index).unwrap_or((0, msg.snapshot));
                    absorb(&snap, hlog)?;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for (_, (_, snap)) in std::mem::take(&mut pending) {
        absorb(&snap, hlog)?;
    }
    Ok(Snapshots {
        merger,
        sent,
        aborted,
    })
}

/// What [`merge_snapshots`] gathered.
struct Snapshots {
    merger: IntervalMerger,
    /// Open loop: messages sent in each second.
    sent: BTreeMap<u64, u64>,
    /// `--abort-on`: why the run was stopped early.
    aborted: Option<String>,
}

/// `--abort-on`: the first condition that holds on the totals of the
/// first `seconds` seconds, said as the report and stderr say it.
fn abort_reason(abort_on: &[Assertion], totals: &Measurements, seconds: u64) -> Option<String> {
    let mut report = Report::build(ReportInput {
        role: Role::Blast,
        config: serde_json::Value::Null,
        started_at_unix: 0.0,
        duration_secs: seconds as f64,
        measurements: totals.clone(),
        timeline: Vec::new(),
        invalid_reasons: Vec::new(),
        cpu: CpuUsage::default(),
        host: Some(crate::stats::HostInfo::default()),
    })
    .ok()?;
    report.evaluate_assertions(abort_on);
    report
        .assertions
        .iter()
        .zip(abort_on)
        .find(|(r, _)| r.ok)
        .map(|(r, a)| {
            let v = r
                .value
                .map(|v| a.format_value(v))
                .unwrap_or_else(|| "no data".into());
            format!(
                "--abort-on `{}` held after {seconds}s (measured {v})",
                r.expr
            )
        })
}

/// Open loop: each second's requested messages (the profile's integral
/// over it, this instance's share) and achieved ones (given to a
/// connection) in the timeline.
fn rates_per_second(cfg: &BlastConfig, timeline: &mut [TimelinePoint], sent: &BTreeMap<u64, u64>) {
    if cfg.profile().is_none() {
        return;
    }
    for p in timeline {
        let t = p.t as f64;
        p.requested = cfg
            .requested_between(t, t + 1.0)
            .map(|r| (r * 1e3).round() / 1e3);
        p.achieved = Some(sent.get(&p.t).copied().unwrap_or(0));
    }
}

/// The workers' results added up.
struct Merged {
    m: Measurements,
    /// The first few distinct session errors.
    errors: Vec<String>,
    interrupted: bool,
    open: OpenLoopCounts,
    /// `--trace`: every thread's accepted numbers.
    accepted: crate::stats::NumberSet,
}

impl Merged {
    /// Adds up `results`; a worker's fatal error ends the run.
    fn of(results: &[worker::WorkerResult]) -> anyhow::Result<Merged> {
        let mut m = Measurements::default();
        let mut errors = Vec::new();
        let mut interrupted = false;
        let mut open = OpenLoopCounts::default();
        let mut fatal = None;
        let mut accepted = crate::stats::NumberSet::default();
        for r in results {
            m.merge(&r.measurements);
            accepted.0 |= &r.accepted.0;
            for e in &r.errors {
                if errors.len() < 5 && !errors.contains(e) {
                    errors.push(e.clone());
                }
            }
            interrupted |= r.interrupted;
            open.add(&r.open_loop);
            if fatal.is_none() {
                fatal = r.fatal.clone();
            }
        }
        if let Some(f) = fatal {
            anyhow::bail!(f);
        }
        Ok(Merged {
            m,
            errors,
            interrupted,
            open,
            accepted,
        })
    }
}

/// Whether the run is valid, and the open loop's report section; says on
/// stderr why not, and when the target was the bottleneck.
fn verdict(
    cfg: &BlastConfig,
    open: &OpenLoopCounts,
    duration_secs: f64,
    m: &Measurements,
    interrupted: bool,
) -> (Vec<String>, Option<OpenLoopReport>) {
    let mut invalid_reasons = Vec::new();
    let say = !cfg.output.silent;
    if interrupted && say {
        eprintln!("smtpstorm: interrupted; reporting what was measured so far");
    }
    let open_loop = match cfg.model {
        LoadModel::Closed => None,
        LoadModel::Open { messages_per_sec } => {
            let (report, reasons) = judge_open_loop(open, messages_per_sec, duration_secs, m, cfg);
            invalid_reasons.extend(reasons);
            Some(report)
        }
    };
    for r in invalid_reasons.iter().filter(|_| say) {
        eprintln!("smtpstorm: invalid run: {r}");
    }
    if let Some(o) = open_loop
        .as_ref()
        .filter(|o| say && o.bottleneck == Bottleneck::Target)
    {
        eprintln!("smtpstorm: {}", target_bottleneck_line(o));
    }
    (invalid_reasons, open_loop)
}

/// What stderr says when messages waited for a free connection: the
/// target could not absorb the rate (it fell short, or messages were never
/// sent), or the rate held though every connection was busy at times.
fn target_bottleneck_line(o: &OpenLoopReport) -> String {
    let held = o.messages_unsent == 0 && o.achieved_per_sec >= 0.98 * o.requested_per_sec;
    if held {
        format!(
            "every connection was busy at times: {} of {} messages waited for a free connection (at most {} at once); the rate held at {:.1} messages/s; corrected latencies include the wait",
            o.messages_waited, o.messages_due, o.max_backlog, o.achieved_per_sec
        )
    } else {
        format!(
            "the target could not absorb {:.1} messages/s: {} of {} messages waited for a free connection (at most {} at once), {} were never sent; achieved {:.1} messages/s; corrected latencies include the wait",
            o.requested_per_sec, o.messages_waited, o.messages_due, o.max_backlog, o.messages_unsent, o.achieved_per_sec
        )
    }
}

/// The open loop's verdict: the report section and the reasons the run is
/// invalid (the blaster fell behind, or sent faster than asked).
fn judge_open_loop(
    o: &OpenLoopCounts,
    rate_per_sec: f64,
    duration_secs: f64,
    m: &Measurements,
    cfg: &BlastConfig,
) -> (OpenLoopReport, Vec<String>) {
    let mut reasons = Vec::new();
    let unsent = o.due.saturating_sub(o.sent);
    // Messages still waiting for a connection at the end are the target's;
    // any other shortfall means the blaster never got to them.
    let waiting_at_end = unsent.min(o.waited);
    let untaken = unsent - waiting_at_end;
    if untaken > o.due / 100 {
        reasons.push(format!(
            "the blaster could not keep its schedule: {untaken} of {} messages due were never taken from it ({:.1}%)",
            o.due,
            untaken as f64 * 100.0 / o.due.max(1) as f64
        ));
    }
    if let Some(bound) = cfg.max_lag_p99() {
        if let Some(r) = m.schedule_slip_reason(bound.as_micros() as u64) {
            reasons.push(r);
        }
    }
    let busy = o.busy_fraction();
    if busy > SATURATED_BUSY && o.window >= Duration::from_millis(500) {
        reasons.push(format!(
            "the blaster was saturated: its busiest thread was busy {:.0}% of the time (above {:.0}%), so its own delays are in the figures",
            busy * 100.0,
            SATURATED_BUSY * 100.0
        ));
    }
    if o.sent as f64 > 1.02 * o.due as f64 + 1.0 {
        reasons.push(format!(
            "the blaster sent faster than asked: {} messages sent, {} due (a bug)",
            o.sent, o.due
        ));
    }
    let bottleneck = if !reasons.is_empty() {
        Bottleneck::Blaster
    } else if o.waited > 0 {
        Bottleneck::Target
    } else {
        Bottleneck::None
    };
    let achieved = if duration_secs > 0.0 {
        o.sent as f64 / duration_secs
    } else {
        0.0
    };
    let report = OpenLoopReport {
        requested_per_sec: rate_per_sec,
        achieved_per_sec: achieved,
        messages_due: o.due,
        messages_sent: o.sent,
        messages_unsent: unsent,
        messages_waited: o.waited,
        max_backlog: o.max_backlog,
        blaster_busy_pct: busy * 100.0,
        bottleneck,
    };
    (report, reasons)
}

/// Evaluates assertions and the baseline, judges whether the run failed,
/// writes `--json`, `--hgrm` and the human summary (stdout, or stderr when
/// the JSON goes to stdout), and returns the exit code: 99 failed assertion
/// or regression, 4 failed run, 3 invalid run (unless allowed), else 0.
pub fn finish(run: BlastRun, out: &OutputConfig) -> anyhow::Result<u8> {
    let mut report = run.report;
    report.evaluate_assertions(&out.asserts);
    report.judge_failures(
        out.max_failed.unwrap_or(crate::stats::DEFAULT_MAX_FAILED),
        out.max_outage_secs
            .unwrap_or(crate::stats::DEFAULT_MAX_OUTAGE_SECS),
    );
    let mut failures: Vec<String> = report
        .assertions
        .iter()
        .zip(&out.asserts)
        .filter(|(r, _)| !r.ok)
        .map(|(r, a)| {
            let v = r
                .value
                .map(|v| a.format_value(v))
                .unwrap_or_else(|| "no data".into());
            format!("  FAIL  {:<32} measured {v}", r.expr)
        })
        .collect();
    let baseline = match &out.baseline {
        Some(b) => baseline_checks(&report, &load_report(b)?, out.max_regression_pct),
        None => Vec::new(),
    };
    for c in baseline.iter().filter(|c| !c.ok) {
        failures.push(format!("  FAIL  {}", c.regression()));
    }
    if let Some(p) = &out.json {
        report.write_json(p)?;
    }
    if let Some(p) = &out.csv {
        crate::stats::write_csv_file(&report, p)
            .with_context(|| format!("cannot write --csv {}", p.display()))?;
    }
    if let Some(p) = &out.junit {
        write_junit(&report, &baseline, p)?;
    }
    if let (Some(p), Some(phase)) = (&out.hgrm, out.hgrm_phase) {
        write_hgrm_file(&report, phase, p)
            .with_context(|| format!("cannot write --hgrm {}", p.display()))?;
    }
    let json_on_stdout = out.json.as_deref() == Some(std::path::Path::new("-"));
    let summary = {
        let mut v = Vec::new();
        write_summary(&report, &mut v)?;
        v
    };
    if json_on_stdout {
        let _ = std::io::stderr().write_all(&summary);
    } else {
        let _ = std::io::stdout().write_all(&summary);
    }
    if !failures.is_empty() {
        eprintln!("smtpstorm: {} check(s) failed:", failures.len());
        for f in &failures {
            eprintln!("{f}");
        }
    }
    // Said even when a failed check decides the exit code.
    for why in &report.failed_reasons {
        eprintln!("smtpstorm: failed run: {why}");
    }
    if let Some(why) = &report.aborted {
        eprintln!("smtpstorm: aborted: {why}");
        return Ok(EXIT_ASSERT);
    }
    if !failures.is_empty() {
        return Ok(EXIT_ASSERT);
    }
    if !report.failed_reasons.is_empty() {
        return Ok(EXIT_FAILED);
    }
    if !report.valid && !out.allow_invalid {
        return Ok(EXIT_INVALID);
    }
    Ok(0)
}
