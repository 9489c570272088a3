//! Two private network namespaces joined by a veth pair, for a run that
//! shows kernel bypass without a NIC (`bench --io xdp`): the sink's threads
//! start in one, the blaster's in the other.
//!
//! The namespaces are anonymous (made with `unshare(CLONE_NEWNET)`, never
//! named under /var/run/netns): each lives while a thread is in it or a
//! descriptor of it is open, so everything — both namespaces, the veth pair,
//! the XDP programs on it — goes away when the run ends, however it ends
//! (exit, Ctrl-C, a crash). The veth is made and addressed by the `ip`
//! command (iproute2), run from a thread inside each namespace.
//!
//! Network namespaces belong to threads: [`VethPair::enter`] moves the
//! calling thread into one side (the threads it spawns meanwhile start
//! there) and the returned guard moves it back.
//!
//! The link: one RX and one TX queue each way, `gso_max_segs 1` (a veth
//! passes a TSO packet whole, and AF_XDP takes 2 KiB frames), addresses
//! [`A_IP`] / [`B_IP`] in 198.18.0.0/24 (the benchmarking range).

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;

/// The veth end in namespace `a` (the sink's).
pub const A_IFACE: &str = "storm-a";
/// The veth end in namespace `b` (the blaster's).
pub const B_IFACE: &str = "storm-b";
/// The address of [`A_IFACE`].
pub const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The address of [`B_IFACE`].
pub const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Which end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// The two namespaces (held open by their descriptors).
#[derive(Debug)]
pub struct VethPair {
    a: OwnedFd,
    b: OwnedFd,
}

/// The calling thread's way back to its namespace (restored on drop).
#[derive(Debug)]
pub struct Entered {
    back: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let _ = setns(self.back.as_raw_fd());
    }
}

fn setns(fd: i32) -> io::Result<()> {
    // SAFETY: setns(2) on a namespace descriptor we hold; it changes only
    // the calling thread.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn this_thread_ns() -> io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

/// Moves the calling thread into a new, empty network namespace and
/// returns it (the thread stays there).
fn new_ns() -> io::Result<OwnedFd> {
    // SAFETY: unshare(2) with CLONE_NEWNET changes only the calling thread.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(this_thread_ns()?))
}

/// Runs `ip ARGS` (in the calling thread's namespace).
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("the `ip` command (iproute2) is needed to make the veth pair: {e}"),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl VethPair {
    /// Makes both namespaces and the veth pair between them, `queues` RX
    /// and TX queues at each end (run from any thread; it returns in the
    /// namespace it started in).
    pub fn create(queues: u32) -> io::Result<VethPair> {
        let here = this_thread_ns()?;
        let _back = Entered { back: here };
        let a = new_ns()?;
        setns(_back.back.as_raw_fd())?;
        let b = new_ns()?;
        ip(&["link", "set", "lo", "up"])?;
        setns(a.as_raw_fd())?;
        let q = queues.max(1).to_string();
        // The peer goes straight into `b`, named by our descriptor of it.
        let b_path = format!("/proc/{}/fd/{}", std::process::id(), b.as_raw_fd());
        ip(&[
            "link",
            "add",
            A_IFACE,
            "numrxqueues",
            &q,
            "numtxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            B_IFACE,
            "numrxqueues",
            &q,
            "numtxqueues",
            &q,
            "netns",
            &b_path,
        ])?;
        let pair = VethPair { a, b };
        for (side, dev, addr) in [(Side::A, A_IFACE, A_IP), (Side::B, B_IFACE, B_IP)] {
            setns(pair.fd(side))?;
            ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["link", "set", dev, "gso_max_segs", "1"])?;
            ip(&["link", "set", dev, "up"])?;
            ip(&["link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    fn fd(&self, side: Side) -> i32 {
        match side {
            Side::A => self.a.as_raw_fd(),
            Side::B => self.b.as_raw_fd(),
        }
    }

    /// Moves the calling thread into `side`'s namespace until the guard
    /// drops (threads it spawns meanwhile stay there).
    pub fn enter(&self, side: Side) -> io::Result<Entered> {
        let back = this_thread_ns()?;
        setns(self.fd(side))?;
        Ok(Entered { back })
    }
}

/// Whether this process may make namespaces and run AF_XDP in them: the
/// missing capabilities, named (`None`: it may).
pub fn missing_privileges() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    missing_caps(caps)
}

/// [`missing_privileges`] for the effective capability set `caps`.
pub fn missing_caps(caps: u64) -> Option<String> {
    const NEEDED: [(u32, &str); 4] = [
        (21, "CAP_SYS_ADMIN (namespaces)"),
        (12, "CAP_NET_ADMIN (the veth, XDP)"),
        (13, "CAP_NET_RAW (AF_XDP)"),
        (39, "CAP_BPF (the XDP program)"),
    ];
    let has = |c: u32| caps & (1u64 << c) != 0;
    let missing: Vec<&str> = NEEDED
        .iter()
        // CAP_SYS_ADMIN also allows what CAP_BPF does.
        .filter(|&&(c, _)| !(has(c) || c == 39 && has(21)))
        .map(|&(_, n)| n)
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_missing_capabilities_are_named() {
        let bit = |c: u32| 1u64 << c;
        assert_eq!(missing_caps(bit(21) | bit(12) | bit(13)), None);
        assert_eq!(missing_caps(bit(21) | bit(12) | bit(13) | bit(39)), None);
        let m = missing_caps(bit(12) | bit(13) | bit(39)).unwrap();
        assert_eq!(m, "CAP_SYS_ADMIN (namespaces)");
        let m = missing_caps(0).unwrap();
        for c in ["CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF"] {
            assert!(m.contains(c), "{m}");
        }
    }
}
