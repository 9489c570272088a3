//! Threads, pinning, sockets and TLS glue shared by every role.
