//! Threads, pinning, sockets and TLS glue shared by every role.
//!
//! The pieces an event loop (the sink's or the blaster's) is built from:
//!
//! - [`affinity`]: CPU lists (`0,2-3`) and pinning the current thread.
//! - [`runtime`]: one pinned thread per CPU ([`runtime::spawn_workers`]) and the
//!   process-wide [`runtime::StopSignal`] (SIGINT/SIGTERM or `stop()`), checked once
//!   per event-loop iteration.
//! - [`socket`]: listeners and non-blocking connects built with socket2
//!   (`SO_REUSEPORT`, `IP_BIND_ADDRESS_NO_PORT`, `SO_LINGER 0`), source-IP ranges.
//! - [`tls`]: rustls server/client configs (PEM files or an in-memory self-signed
//!   certificate; verification off for test targets) and [`tls::TlsInfo`].
//! - [`conn`]: [`conn::Conn`], a mio `TcpStream` plus optional rustls session with an
//!   owned read buffer and write queue, STARTTLS-safe (CVE-2011-0411).
//! - [`timer`]: per-thread deadlines for thousands of connections, O(log n).
//! - [`proc`]: CPU time and RSS of a process, for benchmarks.
//!
//! Invariants: nothing here parses SMTP; nothing on the hot path takes a lock or
//! touches an atomic other than the relaxed stop-flag load once per loop
//! iteration; no function panics on I/O or TLS errors (they become `io::Error`).

pub mod affinity;
pub mod backend;
pub mod conn;
pub mod driver;
pub mod epoll;
pub mod proc;
pub mod runtime;
pub mod socket;
pub mod timer;
pub mod tls;
pub mod tls_stream;
pub mod uring;
pub mod xdp;
