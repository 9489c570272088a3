//! `--xdp-faults`: loss, reordering and delay injected on the AF_XDP path,
//! and what a run with them counted (the retransmissions they caused).
//!
//! `tc netem` cannot act on AF_XDP frames (copy-mode TX goes around the
//! qdisc, RX never reaches one), so the backend injects them itself, per
//! thread, with a seeded xorshift (a run is repeatable in what it draws):
//! - `loss=P%`: that share of frames is dropped, each way;
//! - `reorder=P%`: that share of received frames is held back and
//!   delivered after the frame that follows it;
//! - `delay=DUR`: every received frame waits that long before TCP sees it
//!   (a one-way latency; at most [`DELAY_LIMIT`] frames wait, more are
//!   dropped as a full queue would).
//!
//! The spec is echoed in the report's `config.xdp.faults`. With faults on,
//! the backend also counts what they caused ([`FaultCounts`], the report's
//! `xdp.faults`): TCP segments it sent again (our retransmissions) and
//! segments the peer sent again (its retransmissions), each recognised by
//! a sequence number below the highest one already seen on its flow. The
//! counting costs a lookup per frame, so it runs only with faults on.

use std::collections::HashMap;
use std::time::Duration;

use crate::units::{parse_duration, parse_percent};

/// Received frames that may wait for `delay=` at once.
pub const DELAY_LIMIT: usize = 1024;

/// The parsed `--xdp-faults` spec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpFaults {
    /// Frames lost each way, per million.
    pub loss_ppm: u32,
    /// Received frames delivered after the next one, per million.
    pub reorder_ppm: u32,
    /// Every received frame's delay.
    pub delay: Duration,
}

impl XdpFaults {
    /// `loss=1%,reorder=2%,delay=5ms` (any of the three, in any order).
    pub fn parse(s: &str) -> Result<XdpFaults, String> {
        let mut f = XdpFaults::default();
        let ppm = |v: &str| parse_percent(v).map(|p| (p * 1e6).round() as u32);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                format!("expected KEY=VALUE (loss=1%, reorder=2%, delay=5ms), got `{part}`")
            })?;
            match k.trim() {
                "loss" => f.loss_ppm = ppm(v)?,
                "reorder" => f.reorder_ppm = ppm(v)?,
                "delay" => f.delay = parse_duration(v)?,
                other => {
                    return Err(format!(
                        "unknown fault `{other}`: expected loss, reorder or delay"
                    ))
                }
            }
        }
        if u64::from(f.loss_ppm) + u64::from(f.reorder_ppm) > 1_000_000 {
            return Err("loss and reorder add up to more than 100%".to_string());
        }
        if f.delay > Duration::from_secs(10) {
            return Err(format!("delay={:?} is more than 10s", f.delay));
        }
        Ok(f)
    }

    /// Whether the spec injects nothing.
    pub fn is_none(&self) -> bool {
        *self == XdpFaults::default()
    }

    /// As the reports echo it (`config.xdp.faults`).
    pub fn echo(&self) -> serde_json::Value {
        serde_json::json!({
            "loss": f64::from(self.loss_ppm) / 1e6,
            "reorder": f64::from(self.reorder_ppm) / 1e6,
            "delay_ms": self.delay.as_secs_f64() * 1e3,
        })
    }
}

/// The spec again, as [`XdpFaults::parse`] reads it.
impl std::fmt::Display for XdpFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.loss_ppm > 0 {
            parts.push(format!("loss={}%", f64::from(self.loss_ppm) / 1e4));
        }
        if self.reorder_ppm > 0 {
            parts.push(format!("reorder={}%", f64::from(self.reorder_ppm) / 1e4));
        }
        if !self.delay.is_zero() {
            parts.push(format!("delay={}us", self.delay.as_micros()));
        }
        f.write_str(&parts.join(","))
    }
}

/// What faults did and caused, one thread's or a run's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub lost_rx: u64,
    pub lost_tx: u64,
    pub reordered: u64,
    pub delayed: u64,
    /// Dropped because [`DELAY_LIMIT`] frames were already waiting.
    pub delay_overflow: u64,
    /// TCP segments we sent again.
    pub resent: u64,
    /// TCP segments the peer sent again.
    pub received_again: u64,
}

impl FaultCounts {
    pub fn add(&mut self, o: &FaultCounts) {
        self.lost_rx += o.lost_rx;
        self.lost_tx += o.lost_tx;
        self.reordered += o.reordered;
        self.delayed += o.delayed;
        self.delay_overflow += o.delay_overflow;
        self.resent += o.resent;
        self.received_again += o.received_again;
    }

    pub fn echo(&self) -> serde_json::Value {
        serde_json::json!({
            "lost_rx": self.lost_rx,
            "lost_tx": self.lost_tx,
            "reordered": self.reordered,
            "delayed": self.delayed,
            "delay_overflow": self.delay_overflow,
            "segments_resent": self.resent,
            "segments_received_again": self.received_again,
        })
    }
}

/// A TCP segment's flow and sequence span, from its IPv4 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// (source, destination, source port, destination port).
    pub flow: (u32, u32, u16, u16),
    pub seq: u32,
    /// Sequence space taken: payload, plus one each for SYN and FIN.
    pub len: u32,
    pub syn: bool,
}

/// The [`Seg`] of an IPv4 TCP packet (`None` for anything else).
pub fn seg(ip: &[u8]) -> Option<Seg> {
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let tcp = ip.get(ihl..total)?;
    if tcp.len() < 20 {
        return None;
    }
    let off = usize::from(tcp[12] >> 4) * 4;
    let flags = tcp[13];
    let (syn, fin) = (flags & 0x02 != 0, flags & 0x01 != 0);
    let payload = tcp.len().saturating_sub(off) as u32;
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some(Seg {
        flow: (
            be32(&ip[12..16]),
            be32(&ip[16..20]),
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        ),
        seq: be32(&tcp[4..8]),
        len: payload + u32::from(syn) + u32::from(fin),
        syn,
    })
}

/// Per flow and direction: the first sequence number and the end of the
/// highest segment seen, to recognise segments sent again.
#[derive(Default)]
pub struct Resends {
    flows: HashMap<(u32, u32, u16, u16), (u32, u32)>,
}

impl Resends {
    /// True if `s` repeats sequence space already seen on its flow (a
    /// retransmission). Pure ACKs take none and are never counted; a SYN
    /// with a new sequence number starts the flow anew (a reused 4-tuple).
    pub fn again(&mut self, s: &Seg) -> bool {
        if s.len == 0 {
            return false;
        }
        let end = s.seq.wrapping_add(s.len);
        if let Some((isn, hi)) = self.flows.get_mut(&s.flow) {
            if !s.syn {
                // Below the highest end seen (serial-number comparison).
                let again = (s.seq.wrapping_sub(*hi) as i32) < 0;
                if (end.wrapping_sub(*hi) as i32) > 0 {
                    *hi = end;
                }
                return again;
            }
            if *isn == s.seq {
                return true;
            }
        }
        self.flows.insert(s.flow, (s.seq, end));
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_spec_parses_in_any_order_and_refuses_what_it_does_not_know() {
        let f = XdpFaults::parse("reorder=2%, loss=1%,delay=5ms").unwrap();
        assert_eq!(
            f,
            XdpFaults {
                loss_ppm: 10_000,
                reorder_ppm: 20_000,
                delay: Duration::from_millis(5),
            }
        );
        assert_eq!(f.echo()["loss"], 0.01);
        assert_eq!(f.echo()["delay_ms"], 5.0);
        assert_eq!(XdpFaults::parse(&f.to_string()), Ok(f));
        assert_eq!(f.to_string(), "loss=1%,reorder=2%,delay=5000us");
        assert!(XdpFaults::parse("").unwrap().is_none());
        assert!(XdpFaults::parse("jitter=1ms")
            .unwrap_err()
            .contains("unknown fault `jitter`"));
        assert!(XdpFaults::parse("loss").unwrap_err().contains("KEY=VALUE"));
        assert!(XdpFaults::parse("loss=150%").is_err());
        assert!(XdpFaults::parse("loss=60%,reorder=60%").is_err());
        assert!(XdpFaults::parse("delay=1h").is_err());
    }

    fn s(seq: u32, len: u32, syn: bool) -> Seg {
        Seg {
            flow: (1, 2, 3, 4),
            seq,
            len,
            syn,
        }
    }

    #[test]
    fn a_segment_is_counted_again_only_when_it_repeats_sequence_space() {
        let mut r = Resends::default();
        assert!(!r.again(&s(100, 1, true)));
        assert!(r.again(&s(100, 1, true)), "the SYN again");
        assert!(!r.again(&s(101, 10, false)));
        assert!(!r.again(&s(111, 0, false)), "a pure ACK");
        assert!(!r.again(&s(111, 10, false)));
        assert!(r.again(&s(101, 10, false)), "the first data again");
        assert!(!r.again(&s(121, 5, false)));
        // Across the wrap of the sequence space.
        assert!(!r.again(&s(u32::MAX - 4, 10, true)));
        assert!(!r.again(&s(5, 10, false)));
        assert!(r.again(&s(u32::MAX - 3, 9, false)));
        // A new SYN on the same 4-tuple starts over.
        assert!(!r.again(&s(7000, 1, true)));
        assert!(!r.again(&s(7001, 3, false)));
    }

    #[test]
    fn a_segment_is_read_from_its_ipv4_packet() {
        let mut p = [0u8; 20 + 20 + 7];
        p[0] = 0x45;
        let n = p.len() as u16;
        p[2..4].copy_from_slice(&n.to_be_bytes());
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 18, 0, 2]);
        p[16..20].copy_from_slice(&[198, 18, 0, 1]);
        p[20..22].copy_from_slice(&10000u16.to_be_bytes());
        p[22..24].copy_from_slice(&2525u16.to_be_bytes());
        p[24..28].copy_from_slice(&77u32.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = 0x01 | 0x10; // FIN, ACK
        let g = seg(&p).unwrap();
        assert_eq!(g.seq, 77);
        assert_eq!(g.len, 8, "7 bytes and the FIN");
        assert_eq!(g.flow.2, 10000);
        assert!(!g.syn);
        p[9] = 17;
        assert_eq!(seg(&p), None);
    }
}
