//! One AF_XDP socket on one queue with its UMEM and four rings (through the
//! `xdp` crate: pure Rust, no libxdp).
//!
//! The UMEM's frames are one pool for both directions: [`FILL_FRAMES`] are
//! kept on the fill ring for the kernel to receive into, the rest are for
//! transmitting. A received frame goes back to the pool as soon as its bytes
//! were handed to the TCP layer (and so to the fill ring on the next
//! [`Port::refill`]); a transmitted one when the completion ring returns it.
//!
//! Wakeups: the socket is bound with `XDP_USE_NEED_WAKEUP`. In copy mode the
//! kernel transmits only inside `sendto`, so every TX batch is kicked; the
//! fill ring is kicked (a `recvfrom`) whenever it was refilled. Both are
//! one syscall per batch, never per packet.
//!
//! Invariants: a frame is in exactly one place at a time (pool, fill ring,
//! RX in our hands, TX batch, TX ring / completion); the UMEM outlives the
//! socket (field order: the socket drops first).

use std::io;
use std::os::fd::RawFd;

use xdp::slab::{HeapSlab, Slab};
use xdp::socket::{BindFlags, XdpSocket, XdpSocketBuilder};
use xdp::umem::{FrameSize, UmemCfgBuilder};
use xdp::{
    CompletionRing, Packet, RingConfigBuilder, RxRing, Umem, WakableFillRing, WakableTxRing,
};

/// Frames in one UMEM (2 KiB each).
pub const FRAMES: u32 = 8192;
/// Frames kept on the fill ring.
pub const FILL_FRAMES: usize = 4096;
/// Ring sizes.
const RING: u32 = 4096;
/// Packets taken from the RX ring per batch.
pub const BATCH: usize = 64;

/// How the socket binds.
#[derive(Clone, Copy, Debug)]
pub struct PortOpts {
    pub ifindex: u32,
    pub queue: u32,
    pub zerocopy: bool,
}

/// A bound AF_XDP socket and its memory (see the module doc).
pub struct Port {
    socket: XdpSocket,
    fill: WakableFillRing,
    rx: RxRing,
    tx: WakableTxRing,
    completion: CompletionRing,
    /// Last: dropped after the socket and rings.
    umem: Umem,
    /// Frames on the fill ring (given and not yet received).
    filled: usize,
    /// Received, not yet handled.
    pub rx_batch: HeapSlab,
    /// Built, not yet on the TX ring.
    tx_batch: HeapSlab,
    /// Frames on the TX ring not yet completed.
    in_flight: usize,
    /// Frames sent over the life of the port.
    pub tx_frames: u64,
    pub rx_frames: u64,
}

fn setup_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("AF_XDP {what}: {e}"))
}

impl Port {
    /// Creates and binds the socket (copy mode unless `zerocopy`).
    pub fn open(o: PortOpts) -> io::Result<Port> {
        let cfg = UmemCfgBuilder {
            frame_size: FrameSize::TwoK,
            head_room: 0,
            frame_count: FRAMES,
            ..Default::default()
        }
        .build()
        .map_err(|e| setup_err("UMEM", e))?;
        let umem = Umem::map(cfg)?;
        let mut b = XdpSocketBuilder::new().map_err(|e| sock_err("socket", e))?;
        let rings = RingConfigBuilder {
            rx_count: RING,
            tx_count: RING,
            fill_count: RING,
            completion_count: RING,
        }
        .build()
        .map_err(|e| setup_err("rings", e))?;
        let (rings, mut flags): (xdp::WakableRings, BindFlags) = b
            .build_wakable_rings(&umem, rings)
            .map_err(|e| sock_err("rings", e))?;
        if o.zerocopy {
            flags.force_zerocopy();
        } else {
            flags.force_copy();
        }
        let socket = b
            .bind(xdp::nic::NicIndex::new(o.ifindex), o.queue, flags)
            .map_err(|e| sock_err("bind", e))?;
        let (Some(rx), Some(tx)) = (rings.rx_ring, rings.tx_ring) else {
            return Err(setup_err("rings", "missing RX or TX ring"));
        };
        let mut p = Port {
            socket,
            fill: rings.fill_ring,
            rx,
            tx,
            completion: rings.completion_ring,
            umem,
            filled: 0,
            rx_batch: HeapSlab::with_capacity(BATCH),
            tx_batch: HeapSlab::with_capacity(BATCH * 4),
            in_flight: 0,
            tx_frames: 0,
            rx_frames: 0,
        };
        p.refill()?;
        Ok(p)
    }

    /// The socket's descriptor (for the XSKMAP and for polling).
    pub fn fd(&self) -> RawFd {
        self.socket.raw_fd()
    }

    /// Tops the fill ring up to [`FILL_FRAMES`].
    pub fn refill(&mut self) -> io::Result<()> {
        let want = FILL_FRAMES.saturating_sub(self.filled);
        if want == 0 {
            return Ok(());
        }
        // SAFETY: the UMEM outlives the socket (field order of Port).
        let n = unsafe { self.fill.enqueue(&mut self.umem, want, true)? };
        self.filled += n;
        Ok(())
    }

    /// Takes up to [`BATCH`] received frames into `rx_batch` (empty it
    /// first with [`Port::release_rx`]); returns how many.
    pub fn receive(&mut self) -> usize {
        // SAFETY: the packets live in `rx_batch` and go back to the UMEM in
        // release_rx, before the UMEM is dropped.
        let n = unsafe { self.rx.recv(&self.umem, &mut self.rx_batch) };
        self.filled -= n.min(self.filled);
        self.rx_frames += n as u64;
        n
    }

    /// The oldest received frame not yet released.
    pub fn next_rx(&mut self) -> Option<Packet> {
        self.rx_batch.pop_back()
    }

    /// Gives a handled received frame back to the pool.
    pub fn release(&mut self, p: Packet) {
        self.umem.free_packet(p);
    }

    /// A free frame of `len` bytes to build a packet in, if any.
    pub fn alloc(&mut self, len: usize) -> Option<Packet> {
        if self.tx_batch.available() == 0 {
            self.flush_tx().ok()?;
        }
        // Keep the fill ring's share: transmitting must not starve receive.
        if self.umem.allocatable() == 0 {
            self.reclaim();
        }
        // SAFETY: the frame is returned to the UMEM by the completion ring
        // (after send) or by `release` (if dropped unsent).
        let mut p = unsafe { self.umem.alloc()? };
        if p.adjust_tail(len as i32).is_err() {
            self.umem.free_packet(p);
            return None;
        }
        Some(p)
    }

    /// Queues a built frame for the next [`Port::flush_tx`].
    pub fn queue_tx(&mut self, p: Packet) {
        if let Some(p) = self.tx_batch.push_front(p) {
            self.umem.free_packet(p);
        }
    }

    /// Moves queued frames to the TX ring and kicks the kernel.
    pub fn flush_tx(&mut self) -> io::Result<()> {
        self.reclaim();
        let queued = self.tx_batch.len();
        if queued == 0 && self.in_flight == 0 {
            return Ok(());
        }
        // SAFETY: the UMEM outlives the socket.
        let n = match unsafe { self.tx.send(&mut self.tx_batch, queued > 0) } {
            Ok(n) => n,
            // The kernel is busy with the ring: the frames are on it and
            // the next kick sends them.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS)
                ) =>
            {
                queued - self.tx_batch.len()
            }
            Err(e) => return Err(e),
        };
        self.in_flight += n;
        self.tx_frames += n as u64;
        // In copy mode one kick sends at most 32 frames (the kernel's TX
        // batch); what stays on the ring waits for the next kick, so kick
        // again while kicks make progress.
        while self.in_flight > 0 {
            let before = self.in_flight;
            self.kick()?;
            self.reclaim();
            if self.in_flight == before {
                break;
            }
        }
        Ok(())
    }

    /// `sendto` with no data: the kernel transmits what is on the TX ring.
    fn kick(&self) -> io::Result<()> {
        // SAFETY: a zero-length sendto with null buffers on our own socket.
        let r = unsafe {
            libc::sendto(
                self.socket.raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR) => Ok(()),
                _ => Err(e),
            };
        }
        Ok(())
    }

    /// Returns completed TX frames to the pool.
    pub fn reclaim(&mut self) {
        if self.in_flight > 0 {
            let n = self.completion.dequeue(&mut self.umem, self.in_flight);
            self.in_flight -= n;
        }
    }

    /// True if built frames wait for room on the TX ring.
    pub fn tx_queued(&self) -> bool {
        !self.tx_batch.is_empty()
    }
}

fn sock_err(what: &str, e: xdp::socket::SocketError) -> io::Error {
    use xdp::socket::SocketError as E;
    let inner = match &e {
        E::SocketCreation(i) | E::Bind(i) => i,
        E::SetSockOpt { inner, .. } | E::GetSockOpt { inner, .. } | E::RingMap { inner, .. } => {
            inner
        }
    };
    // Keep the errno: the caller names what it means (EPERM, EAFNOSUPPORT…).
    match inner.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(inner.kind(), format!("AF_XDP {what}: {inner}")),
    }
}
