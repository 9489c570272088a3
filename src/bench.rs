//! `smtpstorm bench`: a sink and a blaster in one process on loopback — the
//! embedded default that needs no server installed.
//!
//! [`run`] takes the [`BenchConfig`] the command line built
//! (`cli::bench`: the CPUs split between the roles, the sink's defaults
//! adjusted to what the blaster will speak), starts the sink, points the
//! blaster at it, and reports the blaster's figures (with the same exit
//! codes), followed by what the sink counted. Without sink faults the two
//! sides must agree on the number of accepted messages; a disagreement is
//! a bug in one of them and fails the run (exit 2).

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::blast::{self, BlastConfig};
use crate::sink::{self, SinkConfig};

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
    /// The sink injects faults (then the two sides' counts may differ).
    pub sink_faults: bool,
    pub quiet: bool,
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
        sink_faults,
        quiet,
    } = cfg;
    let sink = sink::start(scfg).context("starting the embedded sink")?;
    let target = if implicit_tls {
        sink.tls_addrs()[0]
    } else {
        sink.plain_addrs()[0]
    };
    if !quiet {
        eprintln!(
            "smtpstorm bench: sink on {target} (CPUs {sink_cpus:?}), blaster on CPUs {blast_cpus:?}"
        );
    }
    bcfg.retarget(target);
    let output = bcfg.output.clone();
    let run = blast::execute(bcfg);
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
    let (sink_accepted, blast_accepted) = (s.messages_accepted, b.messages_accepted);
    let compare = !sink_faults && !run.interrupted;
    let code = blast::finish(run, &output)?;
    if compare && sink_accepted != blast_accepted {
        bail!(
            "the sink accepted {sink_accepted} messages but the blaster counted {blast_accepted} accepted: one side miscounts"
        );
    }
    if verify && s.verify_corrupt > 0 {
        bail!("the sink found {} corrupt messages", s.verify_corrupt);
    }
    Ok(code)
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
