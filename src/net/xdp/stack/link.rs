//! Below IP: the AF_XDP port, Ethernet, ARP and next hops, and smoltcp's
//! view of the link ([`Dev`]); `--xdp-faults` at work ([`LinkFaults`]).

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant as SInstant;
use xdp::Packet;

use super::super::faults::{self, FaultCounts, Resends, XdpFaults, DELAY_LIMIT};
use super::super::port::Port;
use super::super::wire::{self, Mac};
use super::super::XdpRun;
use super::{ARP_RETRY, ARP_WAITING, MTU};

/// Everything of the thread below IP: the AF_XDP port, neighbours, ARP.
pub(super) struct Link {
    pub(super) port: Port,
    pub(super) run: Arc<XdpRun>,
    pub(super) mac: Mac,
    pub(super) ip: Ipv4Addr,
    pub(super) neighbors: HashMap<Ipv4Addr, Mac>,
    /// Frames waiting for their next hop's MAC.
    pub(super) waiting: Vec<(Ipv4Addr, Packet)>,
    /// When each unresolved next hop was last asked for.
    pub(super) asked: Vec<(Ipv4Addr, Instant)>,
    /// Where smoltcp writes when no UMEM frame is free (the frame is lost;
    /// TCP retransmits it).
    pub(super) scratch: Vec<u8>,
    /// Frames dropped for want of a frame or of a neighbour.
    pub dropped: u64,
    /// `--xdp-faults` (see [`LinkFaults`]).
    pub(super) faults: Option<LinkFaults>,
}

/// What [`LinkFaults`] does to a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    Deliver,
    Drop,
    /// Deliver it after the next frame.
    Hold,
}

/// `--xdp-faults` at work on one thread's link (see [`super::super::faults`]):
/// a fixed-seed xorshift draws each frame's fate; received frames that
/// must wait (`delay=`) queue here; what happened is counted, and so are
/// the TCP segments sent again on either side.
pub struct LinkFaults {
    pub(super) state: u64,
    pub(super) loss_ppm: u64,
    pub(super) reorder_ppm: u64,
    pub(super) delay: Duration,
    /// Received frames waiting for their time (oldest first).
    pub(super) delayed: VecDeque<(Instant, Packet)>,
    pub(super) counts: FaultCounts,
    sent: Resends,
    received: Resends,
}

impl LinkFaults {
    /// The faults of `spec` (`None` when it injects nothing).
    pub fn new(spec: &XdpFaults, seed: u64) -> Option<LinkFaults> {
        if spec.is_none() {
            return None;
        }
        Some(LinkFaults {
            state: seed | 1,
            loss_ppm: u64::from(spec.loss_ppm),
            reorder_ppm: u64::from(spec.reorder_ppm),
            delay: spec.delay,
            delayed: VecDeque::new(),
            counts: FaultCounts::default(),
            sent: Resends::default(),
            received: Resends::default(),
        })
    }

    pub(super) fn draw(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % 1_000_000
    }

    /// The fate of a received frame (`frame`: from its Ethernet header);
    /// a segment the peer sent again is counted first.
    pub(super) fn on_rx(&mut self, frame: &[u8]) -> Fault {
        if let Some(s) = frame.get(wire::ETH_LEN..).and_then(faults::seg) {
            if self.received.again(&s) {
                self.counts.received_again += 1;
            }
        }
        let d = self.draw();
        if d < self.loss_ppm {
            self.counts.lost_rx += 1;
            Fault::Drop
        } else if d < self.loss_ppm + self.reorder_ppm {
            Fault::Hold
        } else {
            Fault::Deliver
        }
    }

    /// Whether a frame we send (`ip`: its IP packet) is lost; a segment we
    /// send again is counted first.
    pub(super) fn on_tx(&mut self, ip: &[u8]) -> bool {
        if let Some(s) = faults::seg(ip) {
            if self.sent.again(&s) {
                self.counts.resent += 1;
            }
        }
        let lost = self.draw() < self.loss_ppm;
        self.counts.lost_tx += u64::from(lost);
        lost
    }

    /// Queues a received frame for `delay` (`Err`: the queue is full).
    pub(super) fn delay(&mut self, p: Packet, now: Instant) -> Result<(), Packet> {
        if self.delayed.len() >= DELAY_LIMIT {
            self.counts.delay_overflow += 1;
            return Err(p);
        }
        self.counts.delayed += 1;
        self.delayed.push_back((now + self.delay, p));
        Ok(())
    }

    /// The oldest waiting frame, if its time has come.
    pub(super) fn due(&mut self, now: Instant) -> Option<Packet> {
        match self.delayed.front() {
            Some((at, _)) if *at <= now => self.delayed.pop_front().map(|(_, p)| p),
            _ => None,
        }
    }

    /// When the oldest waiting frame is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.delayed.front().map(|(at, _)| *at)
    }
}

impl Link {
    pub(super) fn next_hop(&self, dst: Ipv4Addr) -> Ipv4Addr {
        match self.run.gateway {
            Some(gw) if !self.run.on_link(dst) => gw,
            _ => dst,
        }
    }

    pub(super) fn learn(&mut self, ip: Ipv4Addr, mac: Mac) {
        if self.neighbors.get(&ip) != Some(&mac) {
            self.neighbors.insert(ip, mac);
        }
    }

    /// Sends a frame whose IP packet starts at byte 14.
    pub(super) fn send_ip(&mut self, mut p: Packet, now: Instant) {
        let lost = match self.faults.as_mut() {
            Some(f) => f.on_tx(&p[wire::ETH_LEN..]),
            None => false,
        };
        let Some(dst) = wire::ipv4_dst(&p[wire::ETH_LEN..]).filter(|_| !lost) else {
            self.port.release(p);
            return;
        };
        let hop = self.next_hop(dst);
        if let Some(mac) = self
            .neighbors
            .get(&hop)
            .copied()
            .or_else(|| self.shared_neighbor(hop))
        {
            wire::put_eth(&mut p, mac, self.mac, wire::ETHERTYPE_IPV4);
            self.port.queue_tx(p);
            return;
        }
        if self.waiting.len() >= ARP_WAITING {
            self.dropped += 1;
            self.port.release(p);
        } else {
            self.waiting.push((hop, p));
        }
        self.ask(hop, now);
    }

    /// Looks `ip` up in the run's table (filled by whichever thread got the
    /// ARP reply) and keeps it.
    pub(super) fn shared_neighbor(&mut self, ip: Ipv4Addr) -> Option<Mac> {
        let mac = self.run.neighbors.lock().ok()?.get(&ip).copied()?;
        self.neighbors.insert(ip, mac);
        Some(mac)
    }

    /// Sends an ARP request for `ip` unless one went out recently.
    pub(super) fn ask(&mut self, ip: Ipv4Addr, now: Instant) {
        if let Some((_, at)) = self.asked.iter().find(|(a, _)| *a == ip) {
            if now.saturating_duration_since(*at) < ARP_RETRY {
                return;
            }
        }
        self.asked.retain(|(a, _)| *a != ip);
        self.asked.push((ip, now));
        self.arp(1, [0; 6], ip);
    }

    pub(super) fn arp(&mut self, op: u16, their_mac: Mac, their_ip: Ipv4Addr) {
        let Some(mut p) = self.port.alloc(wire::ARP_FRAME_LEN) else {
            self.dropped += 1;
            return;
        };
        wire::put_arp(&mut p, op, self.mac, self.ip, their_mac, their_ip);
        self.port.queue_tx(p);
    }

    /// An ARP frame for our address: answer a request, learn the sender,
    /// release what waited for it.
    pub(super) fn on_arp(&mut self, op: u16, mac: Mac, ip: Ipv4Addr) {
        self.learn(ip, mac);
        if let Ok(mut t) = self.run.neighbors.lock() {
            t.insert(ip, mac);
        }
        if op == 1 {
            self.arp(2, mac, ip);
        }
        self.release_waiting();
    }

    /// Sends the waiting frames whose next hop is now known; asks again
    /// for the others when due.
    pub(super) fn release_waiting(&mut self) {
        if self.waiting.is_empty() {
            self.asked.clear();
            return;
        }
        let mut i = 0;
        while i < self.waiting.len() {
            let hop = self.waiting[i].0;
            if let Some(mac) = self
                .neighbors
                .get(&hop)
                .copied()
                .or_else(|| self.shared_neighbor(hop))
            {
                let (_, mut p) = self.waiting.swap_remove(i);
                wire::put_eth(&mut p, mac, self.mac, wire::ETHERTYPE_IPV4);
                self.port.queue_tx(p);
            } else {
                i += 1;
            }
        }
    }

    /// Asks again for next hops whose frames still wait.
    pub(super) fn retry_arp(&mut self, now: Instant) {
        self.release_waiting();
        let hops: Vec<Ipv4Addr> = self.waiting.iter().map(|(h, _)| *h).collect();
        for h in hops {
            self.ask(h, now);
        }
    }
}

/// smoltcp's view of the link: one received IP packet at a time, and TX
/// frames built straight into the UMEM.
pub(super) struct Dev<'a> {
    pub(super) link: &'a mut Link,
    pub(super) rx: Option<&'a [u8]>,
    pub(super) now: Instant,
}

pub(super) struct Rx<'a>(&'a [u8]);
pub(super) struct Tx<'a, 'b> {
    pub(super) link: &'b mut Link,
    pub(super) now: Instant,
    pub(super) _p: std::marker::PhantomData<&'a ()>,
}

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl TxToken for Tx<'_, '_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        match self.link.port.alloc(wire::ETH_LEN + len) {
            Some(mut p) => {
                let r = f(&mut p[wire::ETH_LEN..]);
                wire::fill_checksums(&mut p[wire::ETH_LEN..]);
                self.link.send_ip(p, self.now);
                r
            }
            None => {
                self.link.dropped += 1;
                self.link.scratch.resize(len, 0);
                f(&mut self.link.scratch[..len])
            }
        }
    }
}

pub(super) fn caps() -> DeviceCapabilities {
    let mut c = DeviceCapabilities::default();
    c.medium = Medium::Ip;
    c.max_transmission_unit = MTU;
    // Received checksums are checked in `wire::classify` (which accepts a
    // peer's unfinished TX offload); ours are filled in by
    // `wire::fill_checksums` as a frame leaves (64-bit words, where
    // smoltcp sums 16-bit ones).
    c.checksum.ipv4 = Checksum::None;
    c.checksum.tcp = Checksum::None;
    c
}

impl Device for Dev<'_> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b, 'b>
    where
        Self: 'b;

    fn receive(&mut self, _t: SInstant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let rx = self.rx.take()?;
        Some((
            Rx(rx),
            Tx {
                link: &mut *self.link,
                now: self.now,
                _p: std::marker::PhantomData,
            },
        ))
    }

    fn transmit(&mut self, _t: SInstant) -> Option<Self::TxToken<'_>> {
        Some(Tx {
            link: &mut *self.link,
            now: self.now,
            _p: std::marker::PhantomData,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        caps()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_loss_and_reordering_hit_the_shares_asked_for() {
        let spec = XdpFaults::parse("loss=1%,reorder=2%").unwrap();
        let mut f = LinkFaults::new(&spec, 0x5eed).unwrap();
        let n = 1_000_000;
        let (mut drop, mut hold, mut lost_tx) = (0, 0, 0);
        for _ in 0..n {
            match f.on_rx(&[]) {
                Fault::Drop => drop += 1,
                Fault::Hold => hold += 1,
                Fault::Deliver => {}
            }
            lost_tx += u32::from(f.on_tx(&[]));
        }
        for (got, want) in [(drop, 10_000), (hold, 20_000), (lost_tx, 10_000)] {
            assert!(
                (want * 9 / 10..want * 11 / 10).contains(&got),
                "{got} not near {want}"
            );
        }
        assert_eq!(f.counts.lost_rx, drop as u64);
        assert_eq!(f.counts.lost_tx, lost_tx as u64);
    }
}
