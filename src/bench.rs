//! `smtpstorm bench`: a sink and a blaster in one process on loopback — the
//! embedded default that needs no server installed.
//!
//! [`run`] takes the [`BenchConfig`] the command line built
//! (`cli::bench`: the CPUs split between the roles, the sink's defaults
//! adjusted to what the blaster will speak), starts the sink, points the
//! blaster at it, and reports the blaster's figures (with the same exit
//! codes), followed by what the sink counted. With `netns` (`--io xdp`) the
//! sink starts in one namespace of a fresh veth pair and the blaster in the
//! other ([`crate::net::netns`]), each on AF_XDP.
//!
//! Both sides count by the README's definitions ("What the numbers mean"),
//! so they must agree, and a disagreement is a bug in one of them that
//! fails the run (exit 2): on `messages_accepted` always (unless a delay
//! fault may outlast `--timeout`); and when every message's fate is seen
//! alike by both — one message per session (`-k 1`), faults only at
//! `mail`, `rcpt`, `data` or `dot` and none of them a delay — on
//! `messages_attempted`, `messages_tempfailed`, `messages_rejected`,
//! `recipients` and `bytes` too. (With `-k` above 1 a fault that closes
//! the connection fails the session's later messages on the blaster's side
//! only; a refused greeting or EHLO fails messages the sink never saw.)

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use crate::blast::{self, BlastConfig};
use crate::net::netns::{self, Side, VethPair};
use crate::sink::faults::{FaultAction, FaultPoint, FaultSpec};
use crate::sink::{self, SinkConfig};
use crate::stats::Counts;

/// What one bench run needs: both roles' configurations.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub sink: SinkConfig,
    /// The blaster's; its target is set once the sink listens.
    pub blast: BlastConfig,
    /// The CPUs of each side (for the line that says where they run).
    pub sink_cpus: Vec<usize>,
    pub blast_cpus: Vec<usize>,
    /// The blaster speaks implicit TLS (to the sink's TLS listener).
    pub implicit_tls: bool,
    /// The sink verifies the digest header of every message.
    pub verify: bool,
    /// The sink injects faults (see the module doc for what must agree).
    pub sink_faults: bool,
    pub quiet: bool,
    /// `--through HOST:PORT` (the blaster's target): the drain after the
    /// load. The sink receives what the server relays (see [`through`]).
    pub through: Option<Duration>,
    /// The sink and the blaster each in a network namespace of its own,
    /// joined by a veth pair made for the run (`--io xdp`: see
    /// [`crate::net::netns`]); removed when the run ends.
    pub netns: bool,
    /// Frames are lost on purpose (`--xdp-faults`): a reply lost with its
    /// session makes the two sides' counts differ, so they are not
    /// compared.
    pub lossy: bool,
}

/// `smtpstorm bench`: the exit code (as `blast`).
pub fn run(cfg: BenchConfig) -> anyhow::Result<u8> {
    let BenchConfig {
        sink: scfg,
        blast: mut bcfg,
        sink_cpus,
        blast_cpus,
        implicit_tls,
        verify,
        sink_faults: _,
        quiet,
        through: drain,
        netns: in_namespaces,
        lossy,
    } = cfg;
    if let Some(drain) = drain {
        return through(scfg, bcfg, drain, &sink_cpus, &blast_cpus, quiet);
    }
    let faults = scfg.faults.clone();
    let (per_session, timeout) = (bcfg.messages_per_session, bcfg.timeout);
    // Both namespaces (and the veth, and the XDP programs on it) end with
    // the last of their threads and of these descriptors.
    let pair = if in_namespaces {
        Some(VethPair::create(1).context("bench --io xdp: making the veth pair")?)
    } else {
        None
    };
    let sink = {
        // The sink's sockets and threads start in namespace a.
        let _in = pair.as_ref().map(|p| p.enter(Side::A)).transpose()?;
        sink::start(scfg).context("starting the embedded sink")?
    };
    let target = if implicit_tls {
        sink.tls_addrs()[0]
    } else {
        sink.plain_addrs()[0]
    };
    if !quiet {
        eprintln!(
            "smtpstorm bench: sink on {target} (CPUs {sink_cpus:?}), blaster on CPUs {blast_cpus:?}, io {}{}",
            bcfg.io.io.as_str(),
            if in_namespaces {
                format!(
                    "; each on AF_XDP in its own network namespace, joined by the veth pair {}/{}",
                    netns::A_IFACE,
                    netns::B_IFACE
                )
            } else {
                String::new()
            }
        );
    }
    bcfg.retarget(target);
    let output = bcfg.output.clone();
    let run = {
        let _in = pair.as_ref().map(|p| p.enter(Side::B)).transpose()?;
        blast::execute(bcfg)
    };
    sink.stop();
    let summary = sink
        .wait()
        .context("collecting the embedded sink's figures")?;
    let run = run?;

    let s = &summary.report.counts;
    let b = &run.report.counts;
    let sink_line = format!(
        "sink: {} sessions, {} messages accepted, {} tempfailed, {} rejected, {} bytes{}",
        s.sessions,
        s.messages_accepted,
        s.messages_tempfailed,
        s.messages_rejected,
        s.bytes,
        if verify {
            format!(
                ", verified {} ok / {} corrupt",
                s.verify_ok, s.verify_corrupt
            )
        } else {
            String::new()
        }
    );
    let note = "(sink and blaster share this process: the cpu line below covers both)";
    // With `--json -` stdout carries only the JSON; the text goes to stderr
    // like the blaster's summary.
    if json_on_stdout(&output) {
        eprintln!("{sink_line}\n{note}");
    } else {
        println!("{sink_line}\n{note}");
    }
    if let Some(p) = &output.json {
        if p.as_os_str() != "-" {
            let sink_json = sink_json_path(p);
            summary.report.write_json(&sink_json)?;
        }
    }
    let disagreement = if run.interrupted || lossy {
        None
    } else {
        disagreement(s, b, &faults, per_session, timeout)
    };
    let code = blast::finish(run, &output)?;
    if let Some(d) = disagreement {
        bail!("{d}: one side miscounts");
    }
    if verify && s.verify_corrupt > 0 {
        bail!("the sink found {} corrupt messages", s.verify_corrupt);
    }
    Ok(code)
}

/// `bench --through`: the blaster loads the server under test (its
/// configured target), which relays to the sink started here (on
/// `--sink-listen`, printed); after the load the drain waits up to `drain`
/// for deliveries (less once the sink has accepted as many messages as the
/// server did), then the sink stops (its grace lets relay sessions in
/// flight finish: what they deliver is late) and the blaster's report gets
/// the end-to-end accounting ([`crate::stats::account_e2e`]). Both ends
/// read one clock. The two sides' counts are not compared (the sink sees
/// relayed mail, not the blaster's sessions).
fn through(
    scfg: SinkConfig,
    bcfg: BlastConfig,
    drain: Duration,
    sink_cpus: &[usize],
    blast_cpus: &[usize],
    quiet: bool,
) -> anyhow::Result<u8> {
    let mut sink = sink::start(scfg).context("starting the embedded sink")?;
    let relay_to = sink.plain_addrs()[0];
    // Printed even with --quiet: the server under test must be pointed here.
    eprintln!(
        "smtpstorm bench: through {}: relay to the sink on {relay_to} (CPUs {sink_cpus:?}); blaster on CPUs {blast_cpus:?}",
        bcfg.target
    );
    let output = bcfg.output.clone();
    let mut run = blast::execute(bcfg)?;
    let accepted = run
        .report
        .trace
        .as_ref()
        .and_then(|t| t.accepted)
        .unwrap_or(0);
    let drain_start = Instant::now();
    if !quiet {
        eprintln!(
            "smtpstorm bench: draining: waiting up to {:.0}s for {accepted} deliveries",
            drain.as_secs_f64()
        );
    }
    while !run.interrupted && !sink.finished() {
        let left = drain.saturating_sub(drain_start.elapsed());
        if left.is_zero() || sink.accepted_so_far() >= accepted {
            break;
        }
        let _ = sink.live(left.min(Duration::from_millis(250)));
    }
    let drained = drain_start.elapsed();
    let drain_end_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    sink.stop();
    let summary = sink
        .wait()
        .context("collecting the embedded sink's figures")?;
    crate::stats::account_e2e(
        &mut run.report,
        &summary.report,
        &crate::stats::E2eOptions {
            drain_secs: drained.as_secs_f64(),
            drain_end_unix: Some(drain_end_unix),
            one_clock: true,
            clock_offset_secs: 0.0,
        },
    )?;
    if let Some(p) = &output.json {
        if p.as_os_str() != "-" {
            summary.report.write_json(&sink_json_path(p))?;
        }
    }
    blast::finish(run, &output)
}

/// The first count the sink (`s`) and the blaster (`b`) should agree on
/// but do not (see the module doc), as a sentence.
fn disagreement(
    s: &Counts,
    b: &Counts,
    faults: &[FaultSpec],
    messages_per_session: u64,
    timeout: std::time::Duration,
) -> Option<String> {
    let delays = |outlast: bool| {
        faults.iter().any(|f| match f.action {
            FaultAction::Delay { max, .. } => !outlast || max >= timeout,
            _ => false,
        })
    };
    let mut compared: Vec<(&str, u64, u64)> = Vec::new();
    if !delays(true) {
        compared.push((
            "messages_accepted",
            s.messages_accepted,
            b.messages_accepted,
        ));
    }
    let message_points = faults.iter().all(|f| {
        matches!(
            f.point,
            FaultPoint::Mail | FaultPoint::Rcpt | FaultPoint::Data | FaultPoint::Dot
        )
    });
    if messages_per_session == 1 && message_points && !delays(false) {
        compared.extend([
            (
                "messages_attempted",
                s.messages_attempted,
                b.messages_attempted,
            ),
            (
                "messages_tempfailed",
                s.messages_tempfailed,
                b.messages_tempfailed,
            ),
            (
                "messages_rejected",
                s.messages_rejected,
                b.messages_rejected,
            ),
            ("recipients", s.recipients, b.recipients),
            ("bytes", s.bytes, b.bytes),
        ]);
    }
    compared
        .into_iter()
        .find(|(_, x, y)| x != y)
        .map(|(name, x, y)| format!("the sink counted {name} {x} but the blaster {y}"))
}

/// `--json -`: the report goes to stdout.
fn json_on_stdout(output: &blast::OutputConfig) -> bool {
    output.json.as_deref() == Some(std::path::Path::new("-"))
}

/// `bench.json` → `bench.sink.json`.
fn sink_json_path(p: &std::path::Path) -> PathBuf {
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    p.with_file_name(format!("{stem}.sink.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_report_goes_beside_the_blast_report() {
        assert_eq!(
            sink_json_path(std::path::Path::new("/tmp/run.json")),
            PathBuf::from("/tmp/run.sink.json")
        );
    }
}
