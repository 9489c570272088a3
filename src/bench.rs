//! `smtpstorm bench`: a sink and a blaster in one process on loopback — the
//! embedded default that needs no server installed.
//!
//! The CPUs are split between the roles (sink on the first half, blaster on
//! the rest, or `--sink-cpus`/`--blast-cpus`), the sink listens on an
//! ephemeral loopback port with the defaults of `smtpstorm sink`, the
//! blaster takes every blast option, and the report is the blaster's (with
//! the same exit codes), followed by what the sink counted. Without sink
//! faults the two sides must agree on the number of accepted messages; a
//! disagreement is a bug in one of them and fails the run (exit 2).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;

use crate::blast::{self, BlastConfig};
use crate::cli::{BenchArgs, Cli, Command};
use crate::net::affinity::available_cores;
use crate::net::runtime::Cpus;
use crate::sink::{self, SinkConfig};

/// Splits the usable cores: sink first half (at least one), blaster the
/// rest; on one core both share it.
fn split_cores(cores: &[usize], sink_threads: Option<usize>) -> (Vec<usize>, Vec<usize>) {
    match cores.len() {
        0 => (vec![0], vec![0]),
        1 => (cores.to_vec(), cores.to_vec()),
        n => {
            let k = sink_threads.unwrap_or(n / 2).clamp(1, n - 1);
            (cores[..k].to_vec(), cores[k..].to_vec())
        }
    }
}

/// The sink's configuration: `smtpstorm sink` defaults, adjusted to what the
/// blaster will speak.
fn sink_config(args: &BenchArgs, cpus: Vec<usize>) -> anyhow::Result<SinkConfig> {
    let load = &args.load;
    let mut argv: Vec<String> = ["smtpstorm", "sink", "--listen", "127.0.0.1:0", "--quiet"]
        .map(String::from)
        .to_vec();
    if load.tls {
        argv.extend(["--tls-listen".into(), "127.0.0.1:0".into()]);
    }
    if load.lmtp {
        argv.push("--lmtp".into());
    }
    if load.auth.is_some() {
        argv.extend(["--auth".into(), "any".into()]);
    }
    if load.proxy.is_some() {
        argv.push("--proxy-protocol".into());
    }
    if !load.xclient.is_empty() {
        argv.push("--xclient".into());
    }
    if args.load.verify {
        argv.push("--verify".into());
    }
    let Command::Sink(sink_args) = Cli::try_parse_from(&argv)?.command else {
        unreachable!("argv names the sink subcommand")
    };
    let mut cfg = SinkConfig::from_args(&sink_args)?;
    cfg.cpus = Cpus::List(cpus);
    cfg.faults = args.sink_faults.clone();
    Ok(cfg)
}

/// `smtpstorm bench`: the exit code (as `blast`).
pub fn run(args: &BenchArgs) -> anyhow::Result<u8> {
    let cores = available_cores();
    let (auto_sink, auto_blast) = split_cores(&cores, args.sink_threads);
    let sink_cpus = args.sink_cpus.clone().unwrap_or(auto_sink);
    let blast_cpus = match (
        &args.blast_cpus,
        &args.load.threads.cpus,
        args.load.threads.threads,
    ) {
        (Some(l), _, _) | (None, Some(l), _) => l.clone(),
        (None, None, Some(n)) => auto_blast.iter().copied().cycle().take(n).collect(),
        (None, None, None) => auto_blast,
    };
    let scfg = sink_config(args, sink_cpus.clone())?;
    let sink = sink::start(scfg).context("starting the embedded sink")?;
    let target = if args.load.tls {
        sink.tls_addrs()[0]
    } else {
        sink.plain_addrs()[0]
    };
    if !args.load.quiet {
        eprintln!(
            "smtpstorm bench: sink on {target} (CPUs {sink_cpus:?}), blaster on CPUs {blast_cpus:?}"
        );
    }
    let mut load = args.load.clone();
    load.threads.threads = None;
    load.threads.cpus = Some(blast_cpus);
    let bcfg = BlastConfig::build(target, "localhost".to_string(), &load)?;
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
        if args.load.verify {
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
    let compare = args.sink_faults.is_empty() && !run.interrupted;
    let code = blast::finish(run, &output)?;
    if compare && sink_accepted != blast_accepted {
        bail!(
            "the sink accepted {sink_accepted} messages but the blaster counted {blast_accepted} accepted: one side miscounts"
        );
    }
    if args.load.verify && s.verify_corrupt > 0 {
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
    fn cores_are_split_between_sink_and_blaster() {
        assert_eq!(split_cores(&[0, 1], None), (vec![0], vec![1]));
        assert_eq!(split_cores(&[0, 1, 2, 3], None), (vec![0, 1], vec![2, 3]));
        assert_eq!(
            split_cores(&[0, 1, 2, 3], Some(3)),
            (vec![0, 1, 2], vec![3])
        );
        assert_eq!(
            split_cores(&[0, 1, 2, 3], Some(9)),
            (vec![0, 1, 2], vec![3])
        );
        assert_eq!(split_cores(&[5], None), (vec![5], vec![5]));
    }

    #[test]
    fn sink_report_goes_beside_the_blast_report() {
        assert_eq!(
            sink_json_path(std::path::Path::new("/tmp/run.json")),
            PathBuf::from("/tmp/run.sink.json")
        );
    }
}
