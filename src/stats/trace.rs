//! What `--trace` records: sets of message numbers ([`NumberSet`], a
//! compressed bitmap written into the JSON as base64) and, per sink
//! thread, the deliveries of each run ([`TraceRecorder`]).
//!
//! Invariants: a thread records without locks; threads' recorders are
//! added once at the end ([`TraceRecorder::merge`]), and a number two
//! threads both saw counts as a duplicate then (an MTA retrying on another
//! connection may reach another thread). Nothing here runs unless
//! `--trace` is on.

use std::collections::BTreeMap;

use base64::Engine as _;
use hdrhistogram::Histogram;
use roaring::RoaringTreemap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Delivery latency bounds (µs): 1 µs to 1 h, the same as the phases'.
pub const DELIVERY_LOW_US: u64 = 1;
pub const DELIVERY_HIGH_US: u64 = 3_600_000_000;

/// A new delivery latency histogram.
pub fn delivery_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(DELIVERY_LOW_US, DELIVERY_HIGH_US, 3)
        .expect("constant histogram bounds are valid")
}

/// A set of message numbers; in JSON, base64 of the portable Roaring
/// serialization (64-bit, the format of CRoaring's `Roaring64Map`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NumberSet(pub RoaringTreemap);

impl NumberSet {
    pub fn len(&self) -> u64 {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn encode(&self) -> String {
        let mut buf = Vec::with_capacity(self.0.serialized_size());
        self.0
            .serialize_into(&mut buf)
            .expect("writing into a Vec cannot fail");
        base64::engine::general_purpose::STANDARD.encode(buf)
    }
    pub fn decode(s: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| format!("bad base64: {e}"))?;
        RoaringTreemap::deserialize_from(bytes.as_slice())
            .map(NumberSet)
            .map_err(|e| format!("not a Roaring bitmap: {e}"))
    }
}

impl Serialize for NumberSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> Deserialize<'de> for NumberSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NumberSet::decode(&s).map_err(serde::de::Error::custom)
    }
}

/// One run's deliveries as one thread (or, merged, the whole sink) saw them.
#[derive(Clone, Debug)]
pub struct RunDeliveries {
    pub run: u64,
    /// Deliveries (every traced message, duplicates included).
    pub messages: u64,
    /// Recipients of those deliveries.
    pub recipients: u64,
    /// Deliveries of a number already delivered.
    pub duplicates: u64,
    /// The numbers delivered.
    pub delivered: NumberSet,
    /// Send time to the last byte read, µs (0 when the clocks disagree
    /// and the message seems to arrive before it left).
    pub delivery: Histogram<u64>,
    /// Deliveries that seemed to arrive before they were sent (the
    /// clocks of two hosts disagree); recorded as 0 µs.
    pub negative: u64,
    /// First deliveries per wall-clock second (Unix seconds); the current
    /// second is counted in `current` until the next one begins.
    pub per_second: BTreeMap<u64, u64>,
    /// (second, first deliveries in it) not yet in `per_second`.
    current: (u64, u64),
}

impl RunDeliveries {
    fn new(run: u64) -> Self {
        RunDeliveries {
            run,
            messages: 0,
            recipients: 0,
            duplicates: 0,
            delivered: NumberSet::default(),
            delivery: delivery_histogram(),
            negative: 0,
            per_second: BTreeMap::new(),
            current: (0, 0),
        }
    }

    /// Moves the current second's count into `per_second`.
    fn settle(&mut self) {
        let (s, n) = std::mem::take(&mut self.current);
        if n > 0 {
            *self.per_second.entry(s).or_default() += n;
        }
    }

    fn add(&mut self, o: &RunDeliveries) {
        self.settle();
        let mut o = o.clone();
        o.settle();
        let overlap = self.delivered.0.intersection_len(&o.delivered.0);
        self.messages += o.messages;
        self.recipients += o.recipients;
        self.duplicates += o.duplicates + overlap;
        self.delivered.0 |= &o.delivered.0;
        let _ = self.delivery.add(&o.delivery);
        self.negative += o.negative;
        for (s, n) in &o.per_second {
            *self.per_second.entry(*s).or_default() += n;
        }
    }
}

/// A sink thread's trace records (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct TraceRecorder {
    /// Runs seen, the most recent first found first (usually one).
    pub runs: Vec<RunDeliveries>,
    /// Accepted messages without a well-formed trace.
    pub untraced: u64,
}

impl TraceRecorder {
    /// An accepted message with no (well-formed) trace.
    pub fn untraced(&mut self) {
        self.untraced += 1;
    }

    /// An accepted message of run `run`, number `n`, sent at `sent_ns`,
    /// its last byte read at `now_ns` (both Unix nanoseconds).
    pub fn delivered(&mut self, run: u64, n: u64, recipients: u32, sent_ns: u64, now_ns: u64) {
        let i = match self.runs.iter().position(|r| r.run == run) {
            Some(i) => i,
            None => {
                self.runs.push(RunDeliveries::new(run));
                self.runs.len() - 1
            }
        };
        let r = &mut self.runs[i];
        r.messages += 1;
        r.recipients += u64::from(recipients);
        if r.delivered.0.insert(n) {
            let sec = now_ns / 1_000_000_000;
            if r.current.0 != sec {
                r.settle();
                r.current.0 = sec;
            }
            r.current.1 += 1;
        } else {
            r.duplicates += 1;
        }
        let us = if now_ns >= sent_ns {
            (now_ns - sent_ns) / 1000
        } else {
            r.negative += 1;
            0
        };
        r.delivery
            .saturating_record(us.clamp(DELIVERY_LOW_US, DELIVERY_HIGH_US));
    }

    /// Counts still held per run moved to where readers look (`merge`
    /// does it too).
    pub fn settle(&mut self) {
        self.runs.iter_mut().for_each(RunDeliveries::settle);
    }

    /// Adds another thread's records.
    pub fn merge(&mut self, o: &TraceRecorder) {
        self.untraced += o.untraced;
        for r in &o.runs {
            match self.runs.iter_mut().find(|m| m.run == r.run) {
                Some(m) => m.add(r),
                None => {
                    let mut r = r.clone();
                    r.settle();
                    self.runs.push(r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_within_and_across_threads_are_counted_once_each() {
        let mut a = TraceRecorder::default();
        let mut b = TraceRecorder::default();
        let t = 1_000_000_000_000_000_000;
        for n in 0..10 {
            a.delivered(7, n, 1, t, t + 5_000_000);
        }
        a.delivered(7, 3, 1, t, t + 6_000_000); // again, same thread
        b.delivered(7, 4, 2, t, t + 7_000_000); // again, other thread
        b.delivered(7, 10, 1, t, t + 7_000_000);
        b.delivered(9, 1, 1, t, t - 1); // another run; clocks disagree
        b.untraced();
        a.merge(&b);
        let r = &a.runs[0];
        assert_eq!((r.run, r.messages, r.recipients), (7, 13, 14));
        assert_eq!((r.duplicates, r.delivered.len()), (2, 11));
        assert_eq!(r.delivery.len(), 13);
        assert_eq!(r.per_second.values().sum::<u64>(), 12, "first per thread");
        assert_eq!((a.runs[1].run, a.runs[1].negative, a.untraced), (9, 1, 1));
    }

    #[test]
    fn a_number_set_round_trips_through_its_json_string() {
        let mut s = NumberSet::default();
        for n in (0..100_000u64).step_by(3).chain([u64::MAX - 1, 1 << 40]) {
            s.0.insert(n);
        }
        let json = serde_json::to_string(&s).unwrap();
        let back: NumberSet = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        // A run's accepted set is dense: a million numbers with a few
        // gaps take bitmaps of 8 KiB per 65,536 numbers.
        let mut dense = NumberSet::default();
        dense.0.insert_range(0..1_000_000);
        for n in (0..1_000_000).step_by(997) {
            dense.0.remove(n);
        }
        let json = serde_json::to_string(&dense).unwrap();
        assert!(json.len() < 200_000, "compressed: {} bytes", json.len());
        let back: NumberSet = serde_json::from_str(&json).unwrap();
        assert_eq!(back.len(), 1_000_000 - 1004);
        assert!(serde_json::from_str::<NumberSet>("\"bm90IGEgc2V0\"").is_err());
    }
}
