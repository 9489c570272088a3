//! A shard: one smoltcp `Interface` and `SocketSet` of at most
//! [`SHARD_SOCKETS`] sockets, made once and recycled, and the clocks
//! between smoltcp and us.
//!
//! Only sockets in use (listening, connected, closing, or sending their
//! RST) are in the `SocketSet`: smoltcp visits every socket of the set for
//! each segment it receives, each egress and each `poll_at`, so a spare
//! socket waits outside it ([`Shard::spare`]) and costs nothing there.

use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::link::{Dev, Link};
use super::{FlowKey, SHARD_SOCKETS, SOCKET_BUFFER};

pub(super) struct Shard {
    pub(super) iface: Interface,
    pub(super) sockets: SocketSet<'static>,
    /// Closed sockets ready for a connection or a listener, outside the
    /// set.
    spare: Vec<tcp::Socket<'static>>,
    /// Aborted sockets whose RST goes out at the next egress.
    pub(super) resetting: Vec<SocketHandle>,
    /// The listening socket of each listening port.
    pub(super) listeners: Vec<(u16, Option<SocketHandle>)>,
    /// Sockets the handler let go, until TIME-WAIT: (handle, flow, since).
    pub(super) closing: Vec<(SocketHandle, FlowKey, Instant)>,
    /// Something changed: run egress.
    pub(super) dirty: bool,
    /// smoltcp's next timer (retransmission), as our instant.
    pub(super) poll_at: Option<Instant>,
}

pub(super) fn new_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
    );
    s.set_nagle_enabled(false);
    s.set_ack_delay(None);
    // Timestamps from the wall clock (milliseconds), so they grow across
    // runs: a peer holding one of our 4-tuples in TIME-WAIT takes a new
    // SYN on it only if it is newer (PAWS) or its sequence number is
    // (smoltcp's is random). Without them, a blaster reusing its source
    // ports within a minute of the last run stalls on RSTs and 1 s SYN
    // retransmissions.
    s.set_tsval_generator(Some(tsval));
    // Bounds retransmission (a vanished peer); idle connections never
    // time out here (the handlers' deadlines do that).
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(60)));
    s
}

impl Shard {
    pub(super) fn new(link: &mut Link, seed: u64, now: Instant, epoch: Instant) -> Shard {
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = seed;
        let mut dev = Dev {
            link,
            rx: None,
            now,
        };
        let mut iface = Interface::new(cfg, &mut dev, smol_now(epoch, now));
        let ip = dev.link.ip;
        iface.update_ip_addrs(|a| {
            // Every destination is "on link" for smoltcp: next hops are ours.
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(ip), 0));
        });
        let sockets = SocketSet::new(Vec::with_capacity(SHARD_SOCKETS));
        let spare = (0..SHARD_SOCKETS).map(|_| new_socket()).collect();
        Shard {
            iface,
            sockets,
            spare,
            resetting: Vec::new(),
            listeners: Vec::new(),
            closing: Vec::new(),
            dirty: false,
            poll_at: None,
        }
    }

    pub(super) fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Aborts `h` (an RST if it was connected); free after the next egress.
    pub(super) fn reset(&mut self, h: SocketHandle) {
        self.sock(h).abort();
        self.resetting.push(h);
        self.dirty = true;
    }

    /// Whether the shard has a socket to spare.
    pub(super) fn has_free(&self) -> bool {
        !self.spare.is_empty()
    }

    /// A spare socket, put in the set (closed, ready to connect or listen).
    pub(super) fn take(&mut self) -> Option<SocketHandle> {
        let s = self.spare.pop()?;
        Some(self.sockets.add(s))
    }

    /// Takes `h` out of the set again (it must be closed).
    pub(super) fn give_back(&mut self, h: SocketHandle) {
        match self.sockets.remove(h) {
            smoltcp::socket::Socket::Tcp(s) => self.spare.push(s),
            #[allow(unreachable_patterns)]
            _ => self.spare.push(new_socket()),
        }
    }

    /// The sockets whose RST went out (an egress ran) are spare again.
    pub(super) fn recycle_reset(&mut self) {
        while let Some(h) = self.resetting.pop() {
            self.give_back(h);
        }
    }

    /// A free socket listening on `port`, if the shard has one to spare.
    pub(super) fn listen(&mut self, port: u16) -> Option<SocketHandle> {
        let h = self.take()?;
        if self.sock(h).listen(port).is_err() {
            self.give_back(h);
            return None;
        }
        Some(h)
    }
}

thread_local! {
    /// This thread's TCP timestamp clock: wall-clock milliseconds (wrapping)
    /// as of the loop's turn ([`set_tsval`]), so an emitted segment costs
    /// no clock read.
    static TSVAL: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Wall-clock milliseconds now (wrapping).
pub(super) fn wall_ms() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u32)
        .unwrap_or(0)
}

/// Sets the timestamp clock for this turn: `wall_at_epoch` plus the time
/// since `epoch`.
pub(super) fn set_tsval(wall_at_epoch: u32, epoch: Instant, now: Instant) {
    let ms = now.saturating_duration_since(epoch).as_millis() as u32;
    TSVAL.with(|c| c.set(wall_at_epoch.wrapping_add(ms)));
}

/// TCP timestamp value: wall-clock milliseconds as of this turn.
pub(super) fn tsval() -> u32 {
    TSVAL.with(|c| c.get())
}

pub(super) fn smol_now(epoch: Instant, now: Instant) -> SInstant {
    SInstant::from_micros(now.saturating_duration_since(epoch).as_micros() as i64)
}

pub(super) fn from_smol(epoch: Instant, t: SInstant) -> Instant {
    epoch + Duration::from_micros(t.total_micros().max(0) as u64)
}
