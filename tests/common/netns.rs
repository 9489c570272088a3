//! Network-namespace pairs for in-process tests (as root): two namespaces
//! `a` and `b` joined by a veth pair `ia` / `ib` (one RX and one TX queue
//! each, `gso_max_segs 1`, as `tests/xdp.rs` sets them up), addressed
//! [`A_IP`] / [`B_IP`] in 198.18.0.0/24 (the benchmarking range, and only
//! that). The names are unique per process and pair; the pair is deleted
//! by its Drop guard, even when the test fails.
//!
//! Network namespaces are per thread on Linux: [`enter`] moves the calling
//! thread (and the threads it spawns afterwards) into a namespace, and
//! [`Entered`] moves it back on drop. A thread that opens an AF_XDP backend
//! also needs the namespace's own `/sys` (the backend reads
//! `/sys/class/net/IFACE`): [`enter_with_sysfs`] gives the thread a private
//! mount namespace with a sysfs of the network namespace mounted on `/sys`,
//! as `ip netns exec` does for a process. Nothing of it is visible to other
//! threads, and it ends with the thread.

use std::ffi::CString;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The address of the veth end in namespace `a`.
pub const A_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The address of the veth end in namespace `b`.
pub const B_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Two namespaces joined by a veth pair; deleted on drop.
pub struct NsPair {
    pub a: String,
    pub b: String,
    /// The veth end in `a`.
    pub ia: String,
    /// The veth end in `b`.
    pub ib: String,
}

static PAIRS: AtomicUsize = AtomicUsize::new(0);

#[track_caller]
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NsPair {
    /// Creates the pair (run from a thread in the host's namespace).
    pub fn new() -> NsPair {
        let n = PAIRS.fetch_add(1, Ordering::Relaxed);
        // `tests/xdp.rs` uses smx…/sx…: these never collide with its names.
        let tag = format!("{}-{n}", std::process::id() % 100_000);
        let p = NsPair {
            a: format!("smc{tag}a"),
            b: format!("smc{tag}b"),
            ia: format!("sc{tag}a"),
            ib: format!("sc{tag}b"),
        };
        // The guard exists before the first namespace does.
        ip(&["netns", "add", &p.a]);
        ip(&["netns", "add", &p.b]);
        ip(&[
            "link",
            "add",
            &p.ia,
            "numrxqueues",
            "1",
            "numtxqueues",
            "1",
            "type",
            "veth",
            "peer",
            "name",
            &p.ib,
            "numrxqueues",
            "1",
            "numtxqueues",
            "1",
        ]);
        ip(&["link", "set", &p.ia, "netns", &p.a]);
        ip(&["link", "set", &p.ib, "netns", &p.b]);
        for (ns, dev, addr) in [(&p.a, &p.ia, A_IP), (&p.b, &p.ib, B_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "gso_max_segs", "1"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        p
    }
}

impl Drop for NsPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth end, and so the pair (once
        // no thread is in it any more).
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn setns_net(f: &File) {
    // SAFETY: setns(2) on a namespace descriptor we hold; it affects only
    // the calling thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// The calling thread's way back to the namespace it was in before
/// [`enter`] (restored on drop).
pub struct Entered {
    back: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        setns_net(&self.back);
    }
}

/// Moves the calling thread into network namespace `ns` (sockets it makes
/// from now on, and threads it spawns, are there).
pub fn enter(ns: &str) -> Entered {
    let back = File::open("/proc/thread-self/ns/net").expect("open this thread's namespace");
    let f = File::open(format!("/var/run/netns/{ns}")).expect("open the namespace");
    setns_net(&f);
    Entered { back }
}

/// [`enter`] for good, with a private mount namespace whose `/sys` is the
/// network namespace's sysfs (for the rest of this thread's life).
pub fn enter_with_sysfs(ns: &str) {
    let c = |s: &str| CString::new(s).unwrap();
    let (root, sys, sysfs) = (c("/"), c("/sys"), c("sysfs"));
    // SAFETY: unshare(2) and mount(2) with valid NUL-terminated strings;
    // CLONE_NEWNS (which implies CLONE_FS) affects only the calling thread.
    unsafe {
        let rc = libc::unshare(libc::CLONE_NEWNS);
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        // Nothing mounted here propagates back to the host.
        let rc = libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        );
        assert_eq!(
            rc,
            0,
            "mount --make-rslave /: {}",
            std::io::Error::last_os_error()
        );
    }
    std::mem::forget(enter(ns));
    // SAFETY: as above.
    unsafe {
        // The host's sysfs stays mounted for everyone else.
        libc::umount2(sys.as_ptr(), libc::MNT_DETACH);
        let rc = libc::mount(
            sysfs.as_ptr(),
            sys.as_ptr(),
            sysfs.as_ptr(),
            0,
            std::ptr::null(),
        );
        assert_eq!(rc, 0, "mount sysfs: {}", std::io::Error::last_os_error());
    }
}
