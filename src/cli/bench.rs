//! `smtpstorm bench`: its flags and the two configurations they make, the
//! embedded sink's and the blaster's ([`BenchConfig`]).
//!
//! The CPUs are split between the roles (sink on the first half, blaster on
//! the rest, or `--sink-cpus`/`--blast-cpus`); the sink gets the defaults
//! of `smtpstorm sink` adjusted to what the blaster will speak; the blaster
//! takes every blast option and is pointed at the sink once it listens
//! ([`crate::blast::BlastConfig::retarget`]).
//!
//! `--io xdp` (as root): the sink and the blaster each run on AF_XDP in a
//! network namespace of their own, joined by a veth pair the run makes and
//! removes ([`crate::net::netns`]); one thread each (the veth has one
//! queue each way). Without the privileges, one line names what is missing.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser};

use super::parse::{parse_cpu_list, parse_duration, parse_fault, parse_socket_addr, parse_threads};
use super::{Cli, Command, IoArg, LoadArgs, XdpModeArg};
use crate::bench::BenchConfig;
use crate::net::affinity::available_cores;
use crate::net::netns;
use crate::net::runtime::Cpus;
use crate::sink::faults::FaultSpec;
use crate::sink::SinkConfig;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Threads given to the sink [default: half the CPUs, at least 1].
    #[arg(long, value_name = "N", value_parser = parse_threads, conflicts_with = "sink_cpus")]
    pub sink_threads: Option<usize>,
    /// CPUs for the sink.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub sink_cpus: Option<std::vec::Vec<usize>>,
    /// CPUs for the blaster.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub blast_cpus: Option<std::vec::Vec<usize>>,
    /// Faults for the embedded sink (same forms as `sink --fault`).
    #[arg(long = "sink-fault", value_name = "SPEC", value_parser = parse_fault)]
    pub sink_faults: Vec<FaultSpec>,
    /// Measure a mail server end to end: blast HOST:PORT, which relays to this
    /// process's sink (--sink-listen); every message is traced (`--trace`) and the
    /// report accounts for each one (delivered, lost, late, duplicates, unexpected).
    #[arg(long, value_name = "HOST:PORT")]
    pub through: Option<String>,
    /// With --through: where the sink listens for the relayed mail [default: an
    /// ephemeral loopback port, printed at start].
    #[arg(long, value_name = "ADDR", requires = "through", value_parser = parse_socket_addr)]
    pub sink_listen: Option<SocketAddr>,
    /// With --through: how long to wait for deliveries after the load (less if the
    /// sink has by then accepted as many messages as the server did).
    #[arg(long, value_name = "D", value_parser = parse_duration, requires = "through")]
    pub drain: Option<Duration>,
}

/// `--drain` when none is given.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(60);

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
    let xdp = load.threads.io == IoArg::Xdp;
    let (plain, tls) = if xdp {
        (
            format!("{}:25", netns::A_IP),
            format!("{}:465", netns::A_IP),
        )
    } else {
        let listen = match (&args.through, args.sink_listen) {
            (Some(_), Some(a)) => a.to_string(),
            _ => "127.0.0.1:0".to_string(),
        };
        (listen, "127.0.0.1:0".to_string())
    };
    let mut argv: Vec<String> = ["smtpstorm", "sink", "--listen", &plain, "--quiet"]
        .map(String::from)
        .to_vec();
    if args.through.is_some() {
        // The sink receives what the server under test relays: plain SMTP,
        // traced; the blaster's TLS, AUTH, LMTP and PROXY are the target's.
        argv.push("--trace".into());
        if args.load.verify {
            argv.push("--verify".into());
        }
        let Command::Sink(sink_args) = Cli::try_parse_from(&argv)?.command else {
            unreachable!("argv names the sink subcommand")
        };
        let mut cfg = super::sink::config(&sink_args)?;
        cfg.cpus = Cpus::List(cpus);
        cfg.faults = args.sink_faults.clone();
        return Ok(cfg);
    }
    if xdp {
        let x = &load.threads.xdp;
        argv.extend(["--io", "xdp", "--xdp-iface", netns::A_IFACE].map(String::from));
        if x.xdp_mode == XdpModeArg::Native {
            argv.extend(["--xdp-mode".into(), "native".into()]);
        }
        if let Some(f) = &x.xdp_faults {
            argv.extend(["--xdp-faults".into(), f.to_string()]);
        }
    }
    if load.tls {
        argv.extend(["--tls-listen".into(), tls]);
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
    let mut cfg = super::sink::config(&sink_args)?;
    cfg.cpus = Cpus::List(cpus);
    cfg.faults = args.sink_faults.clone();
    Ok(cfg)
}

/// Validates `args` into the sink's and the blaster's configurations (the
/// blaster's target is the sink's loopback address, its port set when the
/// sink listens).
pub fn config(args: &BenchArgs) -> anyhow::Result<BenchConfig> {
    let xdp = args.load.threads.io == IoArg::Xdp;
    if xdp {
        check_xdp(args)?;
    }
    let cores = available_cores();
    let (mut auto_sink, mut auto_blast) = split_cores(&cores, args.sink_threads);
    if xdp {
        // One thread a side: the veth pair has one queue each way.
        auto_sink.truncate(1);
        auto_blast.truncate(1);
    }
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
    let sink = sink_config(args, sink_cpus.clone())?;
    if xdp && (sink_cpus.len() != 1 || blast_cpus.len() != 1) {
        anyhow::bail!(
            "bench --io xdp runs one thread per side (its veth pair has one queue each way): \
             got {} sink and {} blaster CPUs",
            sink_cpus.len(),
            blast_cpus.len()
        );
    }
    let mut load = args.load.clone();
    load.threads.threads = None;
    load.threads.cpus = Some(blast_cpus.clone());
    let blast = match &args.through {
        Some(target) => {
            load.trace = true;
            super::blast::config(target, &load)?
        }
        None if xdp => {
            load.threads.xdp.xdp_iface = Some(netns::B_IFACE.to_string());
            let target = SocketAddr::from((netns::A_IP, 25));
            super::blast::config_for(target, target.ip().to_string(), &load)?
        }
        None => {
            let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
            super::blast::config_for(loopback, "localhost".to_string(), &load)?
        }
    };
    Ok(BenchConfig {
        sink,
        blast,
        sink_cpus,
        blast_cpus,
        implicit_tls: args.load.tls,
        verify: args.load.verify,
        sink_faults: !args.sink_faults.is_empty(),
        quiet: args.load.quiet,
        through: args
            .through
            .as_ref()
            .map(|_| args.drain.unwrap_or(DEFAULT_DRAIN)),
        netns: xdp,
        lossy: xdp && args.load.threads.xdp.xdp_faults.is_some(),
    })
}

/// What `bench --io xdp` needs before it starts: the privileges to make
/// namespaces and run AF_XDP, and no interface of the user's.
fn check_xdp(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(missing) = netns::missing_privileges() {
        anyhow::bail!(
            "bench --io xdp needs root: it makes two network namespaces and a veth pair \
             and runs AF_XDP on them; missing {missing}"
        );
    }
    if args.load.threads.xdp.xdp_iface.is_some() || args.load.threads.xdp.xdp_queues.is_some() {
        anyhow::bail!(
            "bench --io xdp makes its own veth pair: --xdp-iface and --xdp-queues are for sink and blast"
        );
    }
    Ok(())
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
}
