//! The io_uring backend (not written yet: `check` says so, and `--io auto`
//! falls back to epoll).

use std::io;

use super::backend::{Handler, Setup};
use super::driver::RunStats;

/// Whether this kernel and build can run the io_uring backend; `Err`
/// names what is missing.
pub fn check() -> Result<(), String> {
    Err("this build has no io_uring backend yet".into())
}

/// Runs `h` on io_uring (see [`check`]).
pub fn run<H: Handler>(_setup: Setup, _h: &mut H) -> io::Result<RunStats> {
    Err(io::Error::other(check().unwrap_err()))
}
