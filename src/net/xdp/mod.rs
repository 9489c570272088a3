//! The AF_XDP backend (`--io xdp`): the NIC queue's frames go straight to
//! user space, TCP runs there (smoltcp), and the same [`Handler`]s as with
//! epoll see the same plaintext.
//!
//! Layout:
//! - [`bpf`]: the XDP program (hand-assembled) and its loader: frames for our
//!   address and ports (and ARP for our address) go to the queue's AF_XDP
//!   socket, everything else to the kernel.
//! - [`port`]: one AF_XDP socket per thread, bound to one queue (thread =
//!   queue), its UMEM and rings.
//! - [`wire`]: Ethernet, ARP, IPv4/TCP classification and checksum checks.
//! - [`stack`]: the thread's loop: flow table, sharded smoltcp, the
//!   [`super::backend::Backend`] contract, TLS through
//!   [`super::tls_stream`].
//!
//! A run opens the interface once ([`XdpRun::open`], in the main thread,
//! through `driver::Transport::open`):
//! checks privileges, the interface and the kernel, creates the XSKMAP,
//! loads and attaches the program (a BPF link: detached when the run ends or
//! the process dies). Each worker thread then binds its own socket on its
//! queue and enters it in the map. Failures are one-line [`XdpError`]s
//! (exit 2).
//!
//! Invariants: only IPv4; the local address and MAC default to the
//! interface's own; the blaster's source ports come from
//! [`SOURCE_PORTS`] (below the kernel's ephemeral range), split into one
//! block per queue so a flow's replies can be steered to its thread (see
//! the README); the sink's kernel listening sockets stay bound but stop
//! listening (the port stays reserved; a SYN that reaches the kernel gets
//! an RST) while the XDP program takes their traffic.

pub mod bpf;
pub mod faults;
pub mod nic;
pub mod port;
pub mod rss;
pub mod stack;
pub mod wire;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;

pub use faults::XdpFaults;
pub use stack::run;
use wire::Mac;

/// Source ports of outgoing connections: below Linux's default ephemeral
/// range (32768-60999), so the kernel's own connections on the same
/// address keep theirs.
pub const SOURCE_PORTS: (u16, u16) = (10000, 32767);

/// Where the XDP program runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpMode {
    /// Generic XDP: works on every interface; the kernel still builds an
    /// skb and copies the frame into the UMEM.
    #[default]
    Skb,
    /// In the driver (`XDP_FLAGS_DRV_MODE`).
    Native,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Skb => "skb",
            XdpMode::Native => "native",
        })
    }
}

/// The `--xdp-*` flags, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XdpOptions {
    pub iface: String,
    pub mode: XdpMode,
    pub zerocopy: bool,
    /// One queue per worker thread, in thread order (`None`: 0..threads).
    pub queues: Option<Vec<u32>>,
    /// `--xdp-faults` (none by default).
    pub faults: XdpFaults,
}

impl XdpOptions {
    /// The options as the reports echo them (`config.xdp`).
    pub fn echo(&self) -> serde_json::Value {
        serde_json::json!({
            "iface": self.iface,
            "mode": self.mode.to_string(),
            "zerocopy": self.zerocopy,
            "queues": self.queues,
            "faults": (!self.faults.is_none()).then(|| self.faults.echo()),
        })
    }
}

/// Why `--io xdp` cannot run (each one line; the run exits 2).
#[derive(Debug, Error)]
pub enum XdpError {
    #[error("--io xdp needs --xdp-iface IFACE")]
    NoIface,
    #[error("--io xdp needs root (CAP_NET_ADMIN, CAP_NET_RAW and CAP_BPF or CAP_SYS_ADMIN)")]
    NotPrivileged,
    #[error("--xdp-iface {0}: no such network interface")]
    NoSuchIface(String),
    #[error("--xdp-iface {0}: it has no IPv4 address (--io xdp speaks IPv4 only)")]
    NoAddress(String),
    #[error("--io xdp: this kernel has no AF_XDP sockets (CONFIG_XDP_SOCKETS): {0}")]
    NoAfXdp(io::Error),
    #[error("--io xdp: this kernel cannot load the XDP program: {0}")]
    Load(io::Error),
    #[error("--xdp-mode {mode}: cannot attach XDP to {iface}: {reason}")]
    Attach {
        mode: XdpMode,
        iface: String,
        reason: String,
    },
    #[error("--xdp-queues: {iface} has {have} RX queue(s), queue {queue} does not exist (use --threads or --xdp-queues)")]
    NoQueue {
        iface: String,
        have: u32,
        queue: u32,
    },
    #[error(
        "--xdp-queues names {queues} queue(s) for {threads} thread(s): give one queue per thread"
    )]
    QueueCount { queues: usize, threads: usize },
    #[error("--io xdp: {addr} is not an address of --xdp-iface {iface} ({ip}); listen on {ip} or 0.0.0.0")]
    ForeignAddr {
        addr: IpAddr,
        iface: String,
        ip: Ipv4Addr,
    },
    #[error("--io xdp: at most {max} listening ports")]
    TooManyPorts { max: usize },
    #[error("--io xdp: {0}")]
    Io(#[from] io::Error),
}

/// What the program must redirect besides ARP.
#[derive(Clone, Debug, Default)]
pub struct Ports {
    /// Listening ports (sink).
    pub listen: Vec<u16>,
    /// Whether outgoing connections use [`SOURCE_PORTS`] (blaster).
    pub outgoing: bool,
}

/// One run's hold on the interface (shared by its threads).
pub struct XdpRun {
    pub iface: String,
    pub ifindex: u32,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// The next hop for addresses off the interface's subnet.
    pub gateway: Option<Ipv4Addr>,
    pub mode: XdpMode,
    pub zerocopy: bool,
    /// Queue of each thread.
    pub queues: Vec<u32>,
    /// Source ports of each thread (inclusive; a block of
    /// [`SOURCE_PORTS`]).
    pub port_blocks: Vec<(u16, u16)>,
    /// Neighbours learnt by any thread (ARP is answered on one queue).
    pub neighbors: Mutex<HashMap<Ipv4Addr, Mac>>,
    /// `--xdp-faults`.
    pub faults: XdpFaults,
    /// What the threads counted, added as each one ends.
    counts: Mutex<RunCounts>,
    /// Threads whose socket is in the map (see [`XdpRun::wait_ready`]).
    ready: AtomicUsize,
    map: OwnedFd,
    // Keeps the program attached; dropped last.
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl fmt::Debug for XdpRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpRun")
            .field("iface", &self.iface)
            .field("ip", &self.ip)
            .field("mode", &self.mode)
            .field("queues", &self.queues)
            .finish()
    }
}

/// A run's frames and, with `--xdp-faults`, what the faults did.
#[derive(Clone, Copy, Debug, Default)]
struct RunCounts {
    frames_rx: u64,
    frames_tx: u64,
    faults: Option<faults::FaultCounts>,
}

/// What one worker thread's `driver::ThreadTransport` carries for xdp.
#[derive(Clone, Debug)]
pub struct XdpThread {
    pub run: Arc<XdpRun>,
    /// The worker's index (its queue is `run.queues[index]`).
    pub index: usize,
}

/// Effective capabilities of this process (`CapEff` of /proc/self/status).
fn effective_caps() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Whether capabilities `caps` allow AF_XDP with an XDP program.
pub fn privileged(caps: u64) -> bool {
    let has = |c: u32| caps & (1u64 << c) != 0;
    has(CAP_NET_ADMIN) && has(CAP_NET_RAW) && (has(CAP_BPF) || has(CAP_SYS_ADMIN))
}

/// The IPv4 address and prefix of `iface` (the first one), from the kernel.
fn iface_ipv4(ifindex: u32) -> io::Result<Option<(Ipv4Addr, u8)>> {
    let (v4, _) = xdp::nic::NicIndex::new(ifindex).addresses()?;
    let Some(ip) = v4 else { return Ok(None) };
    // The prefix: the connected route of that address in the main table.
    Ok(Some((ip, connected_prefix(ifindex, ip).unwrap_or(32))))
}

fn connected_prefix(ifindex: u32, ip: Ipv4Addr) -> Option<u8> {
    let name = xdp::nic::NicIndex::new(ifindex).name().ok()?;
    let ip = u32::from(ip);
    nic::routes(name.as_str()?)
        .into_iter()
        .filter(|&(dst, mask, gw)| gw == 0 && mask != 0 && ip & mask == dst)
        .map(|(_, mask, _)| mask.count_ones() as u8)
        .max()
}

fn default_gateway(iface: &str) -> Option<Ipv4Addr> {
    nic::routes(iface)
        .into_iter()
        .find(|&(dst, mask, gw)| dst == 0 && mask == 0 && gw != 0)
        .map(|(_, _, gw)| Ipv4Addr::from(gw))
}

/// The queue of each of `threads` threads (`--xdp-queues`, or 0..threads),
/// each one that `iface` has.
fn thread_queues(opts: &XdpOptions, threads: usize, iface: &str) -> Result<Vec<u32>, XdpError> {
    let queues: Vec<u32> = match &opts.queues {
        Some(q) if q.len() != threads => {
            return Err(XdpError::QueueCount {
                queues: q.len(),
                threads,
            })
        }
        Some(q) => q.clone(),
        None => (0..threads as u32).collect(),
    };
    // A driver without ethtool channels: what sysfs lists, or one.
    let have = nic::rx_queues(iface)
        .or_else(|| {
            std::fs::read_dir(format!("/sys/class/net/{iface}/queues"))
                .ok()
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                        .count() as u32
                })
        })
        .unwrap_or(1)
        .max(1);
    if let Some(&queue) = queues.iter().find(|&&q| q >= have) {
        return Err(XdpError::NoQueue {
            iface: iface.to_string(),
            have,
            queue,
        });
    }
    Ok(queues)
}

/// The distinct ports of `listen`, each address the interface's own `ip`
/// or unspecified.
fn listen_ports(
    listen: &[std::net::SocketAddr],
    ip: Ipv4Addr,
    iface: &str,
) -> Result<Vec<u16>, XdpError> {
    let mut ports = Vec::new();
    for a in listen {
        match a.ip() {
            IpAddr::V4(v4) if v4 == ip || v4.is_unspecified() => {}
            other => {
                return Err(XdpError::ForeignAddr {
                    addr: other,
                    iface: iface.to_string(),
                    ip,
                })
            }
        }
        if !ports.contains(&a.port()) {
            ports.push(a.port());
        }
    }
    if ports.len() > bpf::MAX_PORTS {
        return Err(XdpError::TooManyPorts {
            max: bpf::MAX_PORTS,
        });
    }
    Ok(ports)
}

/// Whether the kernel has AF_XDP sockets at all (one is made, never bound).
fn check_af_xdp() -> Result<(), XdpError> {
    // SAFETY: plain socket(2); the descriptor is closed at once.
    let probe = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if probe < 0 {
        return Err(XdpError::NoAfXdp(io::Error::last_os_error()));
    }
    // SAFETY: `probe` is a descriptor we own.
    unsafe { libc::close(probe) };
    Ok(())
}

/// Attaches `prog` to `ifindex` in `mode`; the link detaches it when
/// dropped. The error says why it could not, in the user's terms.
fn attach(prog: &OwnedFd, ifindex: u32, mode: XdpMode, iface: &str) -> Result<OwnedFd, XdpError> {
    let flags = match mode {
        XdpMode::Skb => bpf::XDP_FLAGS_SKB_MODE,
        XdpMode::Native => bpf::XDP_FLAGS_DRV_MODE,
    };
    bpf::attach(prog, ifindex, flags).map_err(|e| XdpError::Attach {
        mode,
        iface: iface.to_string(),
        reason: match e.raw_os_error() {
            Some(libc::EBUSY | libc::EEXIST) => "another XDP program is attached to it".to_string(),
            Some(libc::EOPNOTSUPP | libc::EINVAL) if mode == XdpMode::Native => {
                "its driver has no native XDP; use --xdp-mode skb".to_string()
            }
            _ => e.to_string(),
        },
    })
}

impl XdpRun {
    /// Opens `opts.iface` for a run of `threads` workers that listens on
    /// `listen` and/or connects out (see the module doc).
    pub fn open(
        opts: &XdpOptions,
        threads: usize,
        listen: &[std::net::SocketAddr],
        outgoing: bool,
    ) -> Result<Arc<XdpRun>, XdpError> {
        if opts.iface.is_empty() {
            return Err(XdpError::NoIface);
        }
        if !privileged(effective_caps()) {
            return Err(XdpError::NotPrivileged);
        }
        let iface = opts.iface.clone();
        let ifindex = nic::ifindex(&iface).ok_or_else(|| XdpError::NoSuchIface(iface.clone()))?;
        let mac = nic::hw_addr(&iface).ok_or_else(|| XdpError::NoSuchIface(iface.clone()))?;
        let (ip, prefix_len) =
            iface_ipv4(ifindex)?.ok_or_else(|| XdpError::NoAddress(iface.clone()))?;
        let queues = thread_queues(opts, threads, &iface)?;
        let ports = listen_ports(listen, ip, &iface)?;
        check_af_xdp()?;
        let port_blocks = split_ports(SOURCE_PORTS, threads);
        let (lo, hi) = if outgoing { SOURCE_PORTS } else { (1, 0) };
        let max_queue = queues.iter().copied().max().unwrap_or(0);
        let map = bpf::xsk_map(max_queue + 1).map_err(XdpError::Load)?;
        let filter = bpf::Filter {
            ip,
            ports,
            port_lo: lo,
            port_hi: hi,
        };
        let prog = bpf::load(&bpf::program(
            &filter,
            std::os::fd::AsRawFd::as_raw_fd(&map),
        ))
        .map_err(XdpError::Load)?;
        let link = attach(&prog, ifindex, opts.mode, &iface)?;
        Ok(Arc::new(XdpRun {
            gateway: default_gateway(&iface),
            iface,
            ifindex,
            mac,
            ip,
            prefix_len,
            mode: opts.mode,
            zerocopy: opts.zerocopy,
            queues,
            port_blocks,
            neighbors: Mutex::new(HashMap::new()),
            faults: opts.faults,
            counts: Mutex::new(RunCounts::default()),
            ready: AtomicUsize::new(0),
            map,
            _link: link,
            _prog: prog,
        }))
    }

    /// Binds thread `index`'s socket on its queue and enters it in the map.
    pub fn open_port(&self, index: usize) -> io::Result<port::Port> {
        let queue = self.queues.get(index).copied().unwrap_or(0);
        let p = port::Port::open(port::PortOpts {
            ifindex: self.ifindex,
            queue,
            zerocopy: self.zerocopy,
        })
        .map_err(|e| {
            let what = match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) if self.zerocopy => format!(
                    "--xdp-zerocopy: the driver of {} has no AF_XDP zero-copy: {e}",
                    self.iface
                ),
                Some(libc::EPERM) => format!("AF_XDP socket on {}: not permitted: {e}", self.iface),
                _ => format!("AF_XDP socket on {} queue {queue}: {e}", self.iface),
            };
            io::Error::new(e.kind(), what)
        })?;
        bpf::map_set(&self.map, queue, p.fd())?;
        self.ready.fetch_add(1, Ordering::Release);
        Ok(p)
    }

    /// Waits (bounded by `within`, or until `stop` is set) until every
    /// thread's socket is in the map: before that, a queue's SYNs would
    /// reach the kernel. True if all are.
    pub fn wait_ready(&self, stop: &super::runtime::StopSignal, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.ready.load(Ordering::Acquire) < self.queues.len() {
            if stop.is_stopped() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Adds one ended thread's counts.
    pub fn add_counts(&self, rx: u64, tx: u64, faults: Option<&faults::FaultCounts>) {
        let mut c = match self.counts.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        c.frames_rx += rx;
        c.frames_tx += tx;
        if let Some(f) = faults {
            c.faults.get_or_insert_with(Default::default).add(f);
        }
    }

    /// What the run counted, for the report's `xdp` (once the threads
    /// ended): frames each way and, with `--xdp-faults`, the faults and
    /// the retransmissions (see [`faults`]).
    pub fn stats(&self) -> serde_json::Value {
        let c = match self.counts.lock() {
            Ok(c) => *c,
            Err(p) => *p.into_inner(),
        };
        serde_json::json!({
            "frames_rx": c.frames_rx,
            "frames_tx": c.frames_tx,
            "faults": c.faults.map(|f| f.echo()),
        })
    }

    /// Whether `ip` is on the interface's subnet (else: via the gateway).
    pub fn on_link(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len.min(32)))
        };
        u32::from(ip) & mask == u32::from(self.ip) & mask
    }
}

/// Splits `range` into `n` contiguous blocks, one per thread.
pub fn split_ports(range: (u16, u16), n: usize) -> Vec<(u16, u16)> {
    let n = n.max(1) as u32;
    let (lo, hi) = (u32::from(range.0), u32::from(range.1));
    let size = (hi - lo + 1) / n;
    (0..n)
        .map(|i| {
            let a = lo + i * size;
            let b = if i == n - 1 { hi } else { a + size - 1 };
            (a as u16, b as u16)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_blocks_cover_the_range_without_overlap() {
        for n in [1usize, 2, 3, 7, 64] {
            let b = split_ports(SOURCE_PORTS, n);
            assert_eq!(b.len(), n);
            assert_eq!(b[0].0, SOURCE_PORTS.0);
            assert_eq!(b[n - 1].1, SOURCE_PORTS.1);
            for w in b.windows(2) {
                assert_eq!(w[0].1 + 1, w[1].0, "{n} blocks");
            }
        }
    }

    #[test]
    fn privileges_need_net_admin_net_raw_and_bpf_or_sys_admin() {
        let bit = |c: u32| 1u64 << c;
        assert!(privileged(
            bit(CAP_NET_ADMIN) | bit(CAP_NET_RAW) | bit(CAP_BPF)
        ));
        assert!(privileged(
            bit(CAP_NET_ADMIN) | bit(CAP_NET_RAW) | bit(CAP_SYS_ADMIN)
        ));
        assert!(!privileged(bit(CAP_NET_ADMIN) | bit(CAP_BPF)));
        assert!(!privileged(bit(CAP_NET_RAW) | bit(CAP_BPF)));
        assert!(!privileged(0));
    }
}
