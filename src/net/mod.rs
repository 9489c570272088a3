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
//! - [`tls_stream`]: TLS as a sans-IO byte transform (ciphertext in and out,
//!   plaintext in and out), STARTTLS-safe (CVE-2011-0411), for every backend.
//! - [`backend`]: the seam — what a role's connection handler is told
//!   ([`backend::Handler`]) and what it may ask of a backend's connections
//!   ([`backend::Backend`]).
//! - [`conn_table`]: what every backend's connection has in common (output
//!   bookkeeping, TLS, reading and closing, the dirty and dead lists), the
//!   shared half of [`backend::Backend`], one TLS receive dispatch and one
//!   settle/reap loop.
//! - [`epoll`], [`uring`], [`xdp`]: the backends' transports (mio/epoll,
//!   io_uring, AF_XDP with smoltcp); no backend imports another;
//!   [`driver`] picks one per run (`--io`).
//! - [`timer`]: per-thread deadlines for thousands of connections, O(log n).
//! - [`proc`]: CPU time and RSS of a process, for benchmarks.
//!
//! Invariants: nothing here parses SMTP; nothing on the hot path takes a lock or
//! touches an atomic other than the relaxed stop-flag load once per loop
//! iteration; no function panics on I/O or TLS errors (they become `io::Error`).

pub mod affinity;
pub mod backend;
pub mod conn_table;
pub mod driver;
pub mod epoll;
pub mod netns;
pub mod proc;
pub mod runtime;
pub mod socket;
pub mod timer;
pub mod tls;
pub mod tls_stream;
pub mod uring;
pub mod xdp;
