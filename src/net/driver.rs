//! Choosing and running a backend: `--io auto|epoll|uring|xdp`.
//!
//! A role builds its [`Handler`] and a [`Setup`] and calls [`run`] with the
//! [`Io`] the configuration resolved once at start ([`Io::resolve`]): the
//! backend is chosen per run, not per thread, and every report says which
//! one ran (`config.io`).
//!
//! `auto` takes io_uring where the kernel allows it (see
//! [`super::uring::check`]) and epoll otherwise; asking for `uring` where it
//! is not allowed is an error that names what is missing and suggests
//! `--io epoll`. `xdp` is never chosen by `auto`: it takes over an
//! interface (see [`super::xdp`]) and is opened by the role at start.

use std::io;

use super::backend::{Handler, Setup};
use super::epoll::Epoll;

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

/// Runs `h` on this thread with backend `io` until its `on_tick` says stop.
pub fn run<H: Handler>(io: Io, setup: Setup, h: &mut H) -> io::Result<RunStats> {
    match io {
        Io::Epoll => {
            let mut b = Epoll::new(setup)?;
            b.run(h)?;
            Ok(RunStats { waited: b.waited() })
        }
        Io::Uring => super::uring::run(setup, h),
        Io::Xdp => super::xdp::run(setup, h),
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
