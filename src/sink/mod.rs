//! The sink role: accept SMTP as fast as the machine allows and count (and
//! optionally keep or verify) what arrives.
//!
//! [`start`] binds every listener (port 0 resolved on the first thread's
//! socket, the other threads' `SO_REUSEPORT` sockets bound to the same
//! port), spawns one pinned [`worker`] per CPU and returns a
//! [`RunningSink`]; [`RunningSink::wait`] joins the workers and builds the
//! JSON [`Report`]. [`run`] is what `smtpstorm sink` runs with the
//! [`SinkConfig`] the command line built: start, live line, summary,
//! `--json`.
//!
//! Stopping: SIGINT/SIGTERM, [`RunningSink::stop`], `--duration`, or an
//! `--exit-after-*` limit set the shared stop flag; each worker then closes
//! its listeners, gives open sessions `--grace` to finish, and ends. The
//! `--exit-after-*` counts are published by each worker once per loop
//! iteration (not per message), so a few more messages or sessions than
//! the limit may complete before everyone stops: the limit is a lower
//! bound of what the report shows, never an upper one.

pub mod capture;
pub mod config;
pub mod conn;
pub mod faults;
pub mod pacer;
pub mod worker;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use thiserror::Error;

use crate::net::driver::Transport;
use crate::net::runtime::{spawn_workers, StopSignal, Workers};
use crate::net::{socket, tls};
use crate::stats::{
    CpuUsage, IntervalMerger, LiveMetrics, Measurements, MetricsServer, Report, ReportInput, Role,
    TraceRecorder, TraceReport,
};

pub use config::SinkConfig;
use worker::{Listeners, Shared, ThreadSnapshot, WorkerResult};

/// Errors starting or ending the sink.
#[derive(Debug, Error)]
pub enum SinkError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on unix:{path}: {source}")]
    ListenUnix {
        path: String,
        source: std::io::Error,
    },
    #[error("worker {index} failed: {source}")]
    Worker {
        index: usize,
        source: std::io::Error,
    },
}

/// What a finished sink run produced.
#[derive(Debug)]
pub struct SinkSummary {
    /// The report (`schemas/sink.schema.json`).
    pub report: Report,
    /// Accepted messages that carried no digest header (with `--verify`);
    /// counted neither as verified nor as corrupt.
    pub verify_missing: u64,
    /// Messages that could not be written to the `--capture` directory.
    pub capture_errors: u64,
}

/// The live figures of one second, summed over threads.
#[derive(Clone, Debug, Default)]
pub struct LiveFigures {
    pub elapsed: Duration,
    pub messages_per_sec: f64,
    pub sessions_per_sec: f64,
    pub open_connections: usize,
    pub mb_per_sec: f64,
}

impl LiveFigures {
    pub fn line(&self) -> String {
        format!(
            "[{:>5}s] {:.0} msg/s  {:.0} sess/s  {} conns  {:.1} MB/s",
            self.elapsed.as_secs(),
            self.messages_per_sec,
            self.sessions_per_sec,
            self.open_connections,
            self.mb_per_sec
        )
    }
}

/// A sink running in this process.
pub struct RunningSink {
    plain: Vec<SocketAddr>,
    /// `--listen unix:/path` sockets; their files go when the sink does.
    unix: Vec<socket::UnixSocketFile>,
    tls: Vec<SocketAddr>,
    stop: StopSignal,
    workers: Option<Workers<std::io::Result<WorkerResult>>>,
    snapshots: Receiver<ThreadSnapshot>,
    merger: IntervalMerger,
    open_by_thread: Vec<usize>,
    echo: serde_json::Value,
    started: Instant,
    started_at_unix: f64,
    cpu_start: CpuUsage,
    disconnected: bool,
    /// `--trace`.
    trace: bool,
    /// Live metrics, fed from the snapshots in [`RunningSink::live`].
    metrics: Arc<LiveMetrics>,
    /// Serves `metrics` (`--metrics-listen`); stops when the sink is dropped.
    metrics_server: Option<MetricsServer>,
    /// The backend, for what it counted (the report's `xdp`).
    transport: Transport,
}

/// CPU time of this process so far (`getrusage`); zero if it cannot be
/// read. The report is given the difference of two readings.
fn process_cpu() -> CpuUsage {
    crate::net::proc::self_rusage()
        .map(|u| CpuUsage::from_us(u.cpu_user_us, u.cpu_sys_us))
        .unwrap_or_default()
}

/// Starts a sink with its own stop flag (no signal handlers).
pub fn start(cfg: SinkConfig) -> anyhow::Result<RunningSink> {
    start_with_stop(cfg, StopSignal::new())
}

/// Binds `addr` for every thread: the first socket resolves port 0, the
/// others bind the resolved address with `SO_REUSEPORT`.
fn bind_all(
    addr: SocketAddr,
    threads: usize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), SinkError> {
    let err = |source| SinkError::Listen { addr, source };
    let first = socket::listen(addr, true, None).map_err(err)?;
    let resolved = first.local_addr().map_err(err)?;
    let mut all = vec![first];
    for _ in 1..threads {
        all.push(
            socket::listen(resolved, true, None).map_err(|source| SinkError::Listen {
                addr: resolved,
                source,
            })?,
        );
    }
    Ok((resolved, all))
}

/// Starts a sink that stops when `stop` is set (e.g. the process-wide
/// signal flag).
pub fn start_with_stop(cfg: SinkConfig, stop: StopSignal) -> anyhow::Result<RunningSink> {
    let threads = cfg.cpus.plan()?.len();
    let tls_config = if cfg.needs_tls() {
        let ck = cfg
            .tls_cert_key
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let st = tls::server_config(ck, &cfg.tls_choice).context("TLS configuration")?;
        if st.self_signed && !cfg.quiet {
            eprintln!("smtpstorm sink: no --tls-cert given; using a self-signed certificate made in memory");
        }
        Some(st.config)
    } else {
        None
    };
    if let Some(dir) = &cfg.capture {
        capture::prepare_dir(dir)?;
    }
    let mut per_thread: Vec<Listeners> = (0..threads).map(|_| Vec::new()).collect();
    let mut plain = Vec::new();
    let mut tls_addrs = Vec::new();
    for (addrs, implicit, resolved_out) in [
        (&cfg.listen, false, &mut plain),
        (&cfg.tls_listen, true, &mut tls_addrs),
    ] {
        for &addr in addrs {
            let (resolved, ls) = bind_all(addr, threads)?;
            resolved_out.push(resolved);
            for (t, l) in ls.into_iter().enumerate() {
                per_thread[t].push((l.into(), implicit));
            }
        }
    }
    let mut unix = Vec::new();
    for path in &cfg.unix_listen {
        let err = |source| SinkError::ListenUnix {
            path: path.display().to_string(),
            source,
        };
        let (l, file) = socket::listen_unix(path, None).map_err(err)?;
        // One socket, shared: every thread accepts from its own duplicate.
        for t in per_thread.iter_mut() {
            t.push((l.try_clone().map_err(err)?.into(), false));
        }
        unix.push(file);
    }
    let all: Vec<SocketAddr> = plain.iter().chain(tls_addrs.iter()).copied().collect();
    let transport = Transport::open(&cfg.io, threads, &all, false)?;
    let started = Instant::now();
    let shared = Arc::new(Shared {
        stop: stop.clone(),
        server: Arc::new(cfg.server.clone()),
        tls: tls_config,
        auth: cfg.auth.clone(),
        faults: cfg.faults.clone(),
        greylist: Arc::default(),
        seed: cfg.seed,
        capture: cfg.capture.clone(),
        verify: cfg.verify,
        trace: cfg.trace,
        max_conns_per_thread: usize::try_from(cfg.max_connections.div_ceil(threads as u64))
            .unwrap_or(usize::MAX),
        exit_after_messages: cfg.exit_after_messages,
        pacer: cfg
            .max_rate
            .map(|r| Arc::new(pacer::Pacer::new(Instant::now(), r))),
        exit_after_sessions: cfg.exit_after_sessions,
        messages_done: Arc::new(AtomicU64::new(0)),
        sessions_done: AtomicU64::new(0),
        started,
        duration: cfg.duration,
        grace: cfg.grace,
        transport: transport.clone(),
    });
    let metrics = LiveMetrics::new(Role::Sink);
    let metrics_server = match cfg.metrics_listen {
        None => None,
        Some(addr) => Some(MetricsServer::start(addr, Arc::clone(&metrics))?),
    };
    let (tx, rx) = mpsc::channel::<ThreadSnapshot>();
    let slots: Arc<Mutex<Vec<Option<Listeners>>>> =
        Arc::new(Mutex::new(per_thread.into_iter().map(Some).collect()));
    let tx = Mutex::new(tx);
    let workers = spawn_workers(&cfg.cpus, "sink", &stop, move |ctx| {
        let listeners = slots
            .lock()
            .map(|mut s| s.get_mut(ctx.index).and_then(Option::take))
            .ok()
            .flatten()
            .unwrap_or_default();
        let sender = match tx.lock() {
            Ok(t) => t.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let stop = ctx.stop.clone();
        let r = worker::run(ctx, Arc::clone(&shared), listeners, sender);
        if r.is_err() {
            // One worker failing ends the run for all.
            stop.stop();
        }
        r
    })?;
    // Listening starts when every thread's backend takes its traffic.
    transport.wait_ready(&stop, Duration::from_secs(10));
    Ok(RunningSink {
        plain,
        unix,
        tls: tls_addrs,
        stop,
        workers: Some(workers),
        snapshots: rx,
        merger: IntervalMerger::new(),
        open_by_thread: vec![0; threads],
        echo: cfg.echo.clone(),
        started,
        started_at_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        cpu_start: process_cpu(),
        disconnected: false,
        trace: cfg.trace,
        metrics,
        metrics_server,
        transport,
    })
}

impl RunningSink {
    /// The resolved plaintext listen addresses (port 0 replaced).
    pub fn plain_addrs(&self) -> &[SocketAddr] {
        &self.plain
    }

    /// The `--listen unix:/path` socket paths.
    pub fn unix_paths(&self) -> Vec<&std::path::Path> {
        self.unix.iter().map(socket::UnixSocketFile::path).collect()
    }

    /// Where `--metrics-listen` serves, if it was given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_server.as_ref().map(MetricsServer::addr)
    }

    /// The resolved implicit-TLS listen addresses.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls
    }

    /// Asks every worker to stop accepting and wind down (grace applies).
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// The stop flag the workers watch.
    pub fn stop_signal(&self) -> &StopSignal {
        &self.stop
    }

    /// Waits up to `within` for the workers' snapshots and returns the
    /// figures of what arrived (`None` if nothing did). Returns `None` at
    /// once after every worker ended; see [`RunningSink::finished`].
    pub fn live(&mut self, within: Duration) -> Option<LiveFigures> {
        if self.disconnected {
            return None;
        }
        let deadline = Instant::now() + within;
        let mut sum = Measurements::default();
        let mut got = false;
        let mut span = Duration::ZERO;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.snapshots.recv_timeout(left) {
                Ok(t) => {
                    got = true;
                    span = span.max(t.snapshot.duration);
                    if let Some(o) = self.open_by_thread.get_mut(t.thread) {
                        *o = t.open_connections;
                    }
                    self.merger.absorb(&t.snapshot);
                    self.metrics.absorb(&t.snapshot);
                    self.metrics
                        .set_open_connections(self.open_by_thread.iter().sum::<usize>() as u64);
                    sum.merge(&t.snapshot.measurements);
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    self.disconnected = true;
                    self.metrics.finish();
                    break;
                }
            }
        }
        if !got {
            return None;
        }
        let secs = span.as_secs_f64().max(1e-3);
        let c = &sum.counts;
        Some(LiveFigures {
            elapsed: self.started.elapsed(),
            messages_per_sec: c.messages_accepted as f64 / secs,
            sessions_per_sec: c.sessions as f64 / secs,
            open_connections: self.open_by_thread.iter().sum(),
            mb_per_sec: c.bytes as f64 / secs / 1e6,
        })
    }

    /// Messages accepted so far, as of the snapshots [`Self::live`] took in.
    pub fn accepted_so_far(&self) -> u64 {
        self.merger.totals().counts.messages_accepted
    }

    /// True once every worker has ended (as seen by [`RunningSink::live`]).
    pub fn finished(&self) -> bool {
        self.disconnected
    }

    /// Waits for every worker to end (after a stop: the grace period), then
    /// builds the report. Blocks until something stops the sink.
    pub fn wait(mut self) -> anyhow::Result<SinkSummary> {
        while !self.disconnected {
            let _ = self.live(Duration::from_secs(1));
        }
        let results = self
            .workers
            .take()
            .map(|w| w.join())
            .transpose()?
            .unwrap_or_default();
        let mut m = Measurements::default();
        let mut verify_missing = 0;
        let mut capture_errors = 0;
        let mut trace = self.trace.then(TraceRecorder::default);
        let mut stopped_at: Option<Instant> = None;
        for (index, r) in results.into_iter().enumerate() {
            let r = r.map_err(|source| SinkError::Worker { index, source })?;
            m.merge(&r.totals);
            verify_missing += r.verify_missing;
            capture_errors += r.capture_errors;
            if let (Some(t), Some(rt)) = (trace.as_mut(), r.trace.as_ref()) {
                t.merge(rt);
            }
            stopped_at = match (stopped_at, r.stopped_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let end = stopped_at.unwrap_or_else(Instant::now);
        let (_, timeline) = std::mem::take(&mut self.merger).into_parts();
        let mut report = Report::build(ReportInput {
            role: Role::Sink,
            config: self.echo.clone(),
            started_at_unix: self.started_at_unix,
            duration_secs: end.saturating_duration_since(self.started).as_secs_f64(),
            measurements: m,
            timeline,
            invalid_reasons: Vec::new(),
            cpu: process_cpu().since(&self.cpu_start),
            host: None,
        })?;
        if let Some(t) = &trace {
            report.trace = Some(TraceReport::of_sink(t)?);
        }
        report.xdp = self.transport.stats();
        Ok(SinkSummary {
            report,
            verify_missing,
            capture_errors,
        })
    }
}

impl Drop for RunningSink {
    fn drop(&mut self) {
        if self.workers.is_some() {
            self.stop.stop();
        }
    }
}

/// `smtpstorm sink`: run until stopped, then print the summary and write
/// the JSON report. Returns the exit code.
pub fn run(cfg: SinkConfig) -> anyhow::Result<u8> {
    let quiet = cfg.quiet;
    let json = cfg.json.clone();
    let stop = StopSignal::process()?;
    let mut sink = start_with_stop(cfg, stop)?;
    if !quiet {
        let addrs: Vec<String> = sink
            .plain_addrs()
            .iter()
            .map(|a| a.to_string())
            .chain(sink.tls_addrs().iter().map(|a| format!("{a} (TLS)")))
            .chain(
                sink.unix_paths()
                    .iter()
                    .map(|p| format!("unix:{}", p.display())),
            )
            .collect();
        eprintln!("smtpstorm sink: listening on {}", addrs.join(", "));
        if let Some(m) = sink.metrics_addr() {
            eprintln!("smtpstorm sink: metrics on http://{m}/metrics and /stats");
        }
    }
    let live = !quiet && std::io::stderr().is_terminal();
    while !sink.finished() {
        if let Some(f) = sink.live(worker::TICK) {
            if live {
                eprintln!("{}", f.line());
            }
        }
    }
    let summary = sink.wait()?;
    if !quiet {
        let mut out = std::io::stdout().lock();
        crate::stats::write_summary(&summary.report, &mut out)?;
        if summary.verify_missing > 0 {
            println!(
                "verify: {} accepted messages had no digest header",
                summary.verify_missing
            );
        }
        if summary.capture_errors > 0 {
            println!(
                "capture: {} messages could not be written",
                summary.capture_errors
            );
        }
    }
    if let Some(p) = json {
        summary.report.write_json(&p)?;
    }
    Ok(0)
}
