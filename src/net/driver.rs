//! Choosing, opening and running a backend: `--io auto|epoll|uring|xdp`.
//!
//! The configuration resolves the backend once at start ([`Io::resolve`])
//! into an [`IoConfig`]: the backend is chosen per run, not per thread, and
//! every report says which one ran (`config.io`). A role then opens the
//! run's [`Transport`] once ([`Transport::open`]: for xdp this takes over
//! the interface, see [`super::xdp`]; for epoll and io_uring there is
//! nothing to open), hands each worker thread its [`ThreadTransport`]
//! ([`Transport::thread`]), and each thread builds its [`Handler`] and a
//! [`Setup`] and calls [`run`]. A role names no backend: what a backend
//! needs per run and per thread stays inside these two opaque types.
//!
//! `auto` takes io_uring where the kernel allows it (see
//! [`super::uring::check`]) and epoll otherwise; asking for `uring` where it
//! is not allowed is an error that names what is missing and suggests
//! `--io epoll`. `xdp` is never chosen by `auto`: it takes over an
//! interface.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::backend::{Handler, Setup};
use super::epoll::Epoll;
use super::runtime::StopSignal;
use super::xdp::{XdpOptions, XdpRun, XdpThread};

/// The backend a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    Epoll,
    Uring,
    Xdp,
}

/// What was asked for on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoChoice {
    /// io_uring where the kernel allows it, else epoll.
    #[default]
    Auto,
    Epoll,
    Uring,
    Xdp,
}

impl Io {
    /// The backend for `choice` on this kernel; `Err` names what is
    /// missing when `uring` was asked for and cannot run.
    pub fn resolve(choice: IoChoice) -> Result<Io, String> {
        Self::resolve_with(choice, super::uring::check)
    }

    /// [`Io::resolve`] with `uring_check` saying whether io_uring can run
    /// (called only when the choice depends on it).
    pub fn resolve_with(
        choice: IoChoice,
        uring_check: impl FnOnce() -> Result<(), String>,
    ) -> Result<Io, String> {
        match choice {
            IoChoice::Epoll => Ok(Io::Epoll),
            IoChoice::Xdp => Ok(Io::Xdp),
            IoChoice::Uring => uring_check()
                .map(|()| Io::Uring)
                .map_err(|missing| format!("--io uring: {missing}; use --io epoll")),
            IoChoice::Auto => Ok(if uring_check().is_ok() {
                Io::Uring
            } else {
                Io::Epoll
            }),
        }
    }

    /// The name reports use (`config.io`).
    pub fn as_str(self) -> &'static str {
        match self {
            Io::Epoll => "epoll",
            Io::Uring => "uring",
            Io::Xdp => "xdp",
        }
    }
}

pub use super::backend::RunStats;

/// The backend of a run and its options, as the configuration resolved
/// them (what a role's config holds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoConfig {
    /// The backend every thread runs.
    pub io: Io,
    /// `--io xdp`: the interface options (`None` for every other backend).
    pub xdp: Option<XdpOptions>,
}

impl IoConfig {
    /// A kernel backend (epoll or io_uring): no options.
    pub fn kernel(io: Io) -> Self {
        IoConfig { io, xdp: None }
    }

    /// Resolves `choice` on this kernel ([`Io::resolve`]); `xdp` is kept
    /// only when the backend is xdp.
    pub fn resolve(choice: IoChoice, xdp: XdpOptions) -> Result<Self, String> {
        let io = Io::resolve(choice)?;
        Ok(IoConfig {
            io,
            xdp: (io == Io::Xdp).then_some(xdp),
        })
    }

    /// The report's echo of the backend: `{"io": .., "xdp": ..}`.
    pub fn echo(&self) -> serde_json::Value {
        serde_json::json!({
            "io": self.io.as_str(),
            "xdp": self.xdp.as_ref().map(XdpOptions::echo),
        })
    }
}

/// A run's hold on its backend, opened once in the main thread and shared
/// by its worker threads (cloning shares it). For epoll and io_uring it
/// holds nothing but the choice; for xdp it holds the interface (the
/// program stays attached until the last clone is dropped).
#[derive(Clone, Debug)]
pub struct Transport {
    io: Io,
    xdp: Option<Arc<XdpRun>>,
}

impl Transport {
    /// Opens the backend of `cfg` for a run of `threads` workers that
    /// listens on `listen` (resolved addresses) and, if `client`, connects
    /// out. Errors are one line (exit 2).
    pub fn open(
        cfg: &IoConfig,
        threads: usize,
        listen: &[SocketAddr],
        client: bool,
    ) -> anyhow::Result<Transport> {
        let xdp = match (&cfg.xdp, cfg.io) {
            (Some(opts), Io::Xdp) => Some(XdpRun::open(opts, threads, listen, client)?),
            _ => None,
        };
        Ok(Transport { io: cfg.io, xdp })
    }

    /// The backend this run uses.
    pub fn io(&self) -> Io {
        self.io
    }

    /// What worker thread `index` runs with.
    pub fn thread(&self, index: usize) -> ThreadTransport {
        ThreadTransport {
            io: self.io,
            xdp: self.xdp.as_ref().map(|run| XdpThread {
                run: Arc::clone(run),
                index,
            }),
        }
    }

    /// What the backend counted over the run, for the report (`xdp`:
    /// frames, and what `--xdp-faults` did); `None` for the kernel
    /// backends. Complete once every worker thread ended.
    pub fn stats(&self) -> Option<serde_json::Value> {
        self.xdp.as_ref().map(|run| run.stats())
    }

    /// Waits (bounded by `within`, or until `stop` is set) until every
    /// thread's backend takes its traffic: with xdp, until each thread's
    /// socket is in the program's map (before that a queue's SYNs reach
    /// the kernel); at once for the kernel backends. True if all do.
    pub fn wait_ready(&self, stop: &StopSignal, within: Duration) -> bool {
        match &self.xdp {
            Some(run) => run.wait_ready(stop, within),
            None => true,
        }
    }
}

/// What one worker thread's backend starts with besides its [`Setup`]
/// (opaque: a role only passes it on to [`run`]).
#[derive(Debug)]
pub struct ThreadTransport {
    io: Io,
    xdp: Option<XdpThread>,
}

impl ThreadTransport {
    /// A kernel backend (epoll or io_uring), which needs no per-run state.
    pub fn kernel(io: Io) -> Self {
        ThreadTransport { io, xdp: None }
    }

    /// The backend this thread runs.
    pub fn io(&self) -> Io {
        self.io
    }
}

/// Runs `h` on this thread with its backend until its `on_tick` says stop.
pub fn run<H: Handler>(t: ThreadTransport, setup: Setup, h: &mut H) -> io::Result<RunStats> {
    match (t.io, t.xdp) {
        (Io::Epoll, _) => {
            let mut b = Epoll::new(setup)?;
            b.run(h)?;
            Ok(RunStats { waited: b.waited() })
        }
        (Io::Uring, _) => super::uring::run(setup, h),
        (Io::Xdp, Some(x)) => super::xdp::run(x, setup, h),
        (Io::Xdp, None) => Err(io::Error::other(
            "--io xdp: this worker has no AF_XDP setup",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uring_that_cannot_run_is_one_line_naming_what_is_missing_and_suggesting_epoll() {
        let missing =
            || Err("io_uring_setup is not permitted (EPERM: a seccomp filter)".to_string());
        let e = Io::resolve_with(IoChoice::Uring, missing).unwrap_err();
        assert_eq!(
            e,
            "--io uring: io_uring_setup is not permitted (EPERM: a seccomp filter); use --io epoll"
        );
        assert!(!e.contains('\n'));
        assert_eq!(Io::resolve_with(IoChoice::Auto, missing), Ok(Io::Epoll));
        assert_eq!(Io::resolve_with(IoChoice::Auto, || Ok(())), Ok(Io::Uring));
        assert_eq!(Io::resolve_with(IoChoice::Uring, || Ok(())), Ok(Io::Uring));
    }

    #[test]
    fn epoll_never_asks_about_io_uring() {
        let r = Io::resolve_with(IoChoice::Epoll, || {
            panic!("io_uring was probed for --io epoll")
        });
        assert_eq!(r, Ok(Io::Epoll));
    }
}
