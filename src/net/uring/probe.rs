//! Whether this kernel can run the io_uring backend ([`check`]), and a
//! one-line reason when it cannot ([`Missing`]).

use std::io;
use std::sync::OnceLock;

use io_uring::{opcode, IoUring, Probe};
use thiserror::Error;

use super::buf_ring::{BufRing, BGID};

/// Why io_uring cannot run here ([`check`]).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Missing {
    /// `kernel.io_uring_disabled` is 2.
    #[error("io_uring is disabled on this system (kernel.io_uring_disabled=2)")]
    Disabled,
    /// `io_uring_setup` said EPERM.
    #[error("io_uring_setup is not permitted (EPERM: {0})")]
    NotPermitted(&'static str),
    /// `io_uring_setup` said ENOSYS.
    #[error("this kernel has no io_uring (io_uring_setup: ENOSYS)")]
    NoSyscall,
    /// `io_uring_setup` failed otherwise.
    #[error("io_uring_setup failed: {0}")]
    Setup(String),
    /// A feature this backend needs.
    #[error("the kernel's io_uring lacks {0}")]
    Feature(&'static str),
    /// An operation this backend needs.
    #[error("the kernel's io_uring lacks the {0} operation")]
    Opcode(&'static str),
    /// Multishot receive needs Linux 6.0.
    #[error("kernel {0} has no multishot receive (needs Linux 6.0)")]
    Kernel(String),
}

/// What an `io_uring_setup` error means, given `kernel.io_uring_disabled`.
pub fn explain_setup_error(e: &io::Error, disabled: Option<u32>) -> Missing {
    match e.raw_os_error() {
        Some(libc::EPERM) => Missing::NotPermitted(match disabled {
            Some(2) => "kernel.io_uring_disabled=2",
            Some(1) => "kernel.io_uring_disabled=1 and this user is not in kernel.io_uring_group",
            _ => "a seccomp filter or container policy forbids it",
        }),
        Some(libc::ENOSYS) => Missing::NoSyscall,
        _ => Missing::Setup(e.to_string()),
    }
}

fn io_uring_disabled() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `(major, minor)` of a kernel release string (`6.18.4-foo`).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn probe_kernel() -> Result<(), Missing> {
    let disabled = io_uring_disabled();
    if disabled == Some(2) {
        return Err(Missing::Disabled);
    }
    let ring: IoUring = IoUring::new(8).map_err(|e| explain_setup_error(&e, disabled))?;
    let p = ring.params();
    if !p.is_feature_ext_arg() {
        return Err(Missing::Feature("EXT_ARG, a timeout per wait (Linux 5.11)"));
    }
    if !p.is_feature_nodrop() {
        return Err(Missing::Feature("NODROP, no lost completions (Linux 5.5)"));
    }
    if !p.is_feature_fast_poll() {
        return Err(Missing::Feature("FAST_POLL (Linux 5.7)"));
    }
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|_| Missing::Feature("the opcode probe (Linux 5.6)"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Connect::CODE, "connect"),
        (opcode::Close::CODE, "close"),
        (opcode::AsyncCancel::CODE, "async cancel"),
        (opcode::Read::CODE, "read"),
    ] {
        if !probe.is_supported(code) {
            return Err(Missing::Opcode(name));
        }
    }
    ring.submitter()
        .register_files_sparse(1)
        .map_err(|_| Missing::Feature("sparse registered files (Linux 5.19)"))?;
    let mut bufs =
        BufRing::new(2, 4096).map_err(|_| Missing::Feature("memory for a provided-buffer ring"))?;
    bufs.register(&ring)
        .map_err(|_| Missing::Feature("provided-buffer rings (Linux 5.19)"))?;
    let _ = ring.submitter().unregister_buf_ring(BGID);
    drop(bufs);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_version(&release) {
        Some(v) if v >= (6, 0) => Ok(()),
        _ => Err(Missing::Kernel(release.trim().to_string())),
    }
}

/// Whether this kernel can run the io_uring backend; `Err` names what is
/// missing. The kernel is probed once per process.
pub fn check() -> Result<(), String> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| probe_kernel().map_err(|m| m.to_string()))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse_from_release_strings() {
        assert_eq!(kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn setup_errors_name_what_is_missing() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert!(explain_setup_error(&eperm, Some(0))
            .to_string()
            .contains("seccomp"));
        assert!(explain_setup_error(&eperm, Some(2))
            .to_string()
            .contains("kernel.io_uring_disabled=2"));
        assert!(explain_setup_error(&eperm, Some(1))
            .to_string()
            .contains("io_uring_group"));
        let enosys = io::Error::from_raw_os_error(libc::ENOSYS);
        assert_eq!(explain_setup_error(&enosys, None), Missing::NoSyscall);
        assert!(Missing::Disabled
            .to_string()
            .contains("io_uring_disabled=2"));
    }
}
