//! Per-thread recorders: latency histograms per phase, outcome counters and
//! reply-code tallies, plus the once-a-second interval snapshot.
//!
//! Invariants:
//! - Every histogram in this crate is built by [`new_histogram`] with the
//!   same fixed bounds (1 µs .. 1 hour, 3 significant figures), so any two
//!   histograms from any thread, instance or machine can be added.
//! - Recording never panics and never fails: values above the highest
//!   trackable value are clamped (`saturating_record`), zero is recorded as
//!   is (HdrHistogram tracks 0 in its first bucket).
//! - A [`Recorder`] is owned by one thread: no locks, no atomics. Recording
//!   allocates only on the first record of a phase (and the first reply
//!   code) in each interval: [`Recorder::take_interval`] hands the
//!   interval's histograms away, so the next interval allocates its own.
//! - Counts add up: [`Recorder::count_outcome`] bumps `messages_attempted`
//!   and exactly one outcome counter, so `messages_attempted` equals the sum
//!   of the outcome counters of message-scoped outcomes.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::units::format_us;
use crate::smtp::{CommandKind, Outcome, Phase};

/// Lowest trackable latency, in microseconds.
pub const HIST_LOW_US: u64 = 1;
/// Highest trackable latency, in microseconds (one hour). Larger values are
/// clamped to it.
pub const HIST_HIGH_US: u64 = 3_600_000_000;
/// Significant decimal digits kept by every histogram.
pub const HIST_SIGFIG: u8 = 3;

/// Reporting points per exponentially decreasing half-distance when a
/// histogram is walked as a percentile spectrum (HdrHistogram Java's
/// default; `.hgrm`, the SVG and HTML spectra).
pub const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// A latency histogram in microseconds with the crate-wide fixed bounds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(HIST_LOW_US, HIST_HIGH_US, HIST_SIGFIG)
        .expect("the fixed histogram bounds are valid")
}

/// Adds `src` into `dst`. Both come from [`new_histogram`] or from a
/// decoded report; if `src` has other bounds (a foreign file), its values
/// are re-recorded one bucket at a time, clamped to our range.
pub fn add_histogram(dst: &mut Histogram<u64>, src: &Histogram<u64>) {
    if dst.add(src).is_err() {
        for v in src.iter_recorded() {
            let value = v.value_iterated_to().min(HIST_HIGH_US);
            dst.saturating_record_n(value, v.count_at_value());
        }
    }
}

/// Outcome and traffic counters. Field names are the JSON keys of `counts`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub sessions: u64,
    /// Sessions whose TLS handshake completed (STARTTLS or implicit TLS);
    /// a failed or abandoned handshake does not count.
    pub tls_sessions: u64,
    /// Of `tls_sessions`, those whose handshake resumed an earlier session
    /// (rustls `HandshakeKind::Resumed`). Absent from reports written
    /// before it existed, hence the default.
    #[serde(default)]
    pub tls_resumed: u64,
    pub messages_attempted: u64,
    pub messages_accepted: u64,
    pub messages_tempfailed: u64,
    pub messages_rejected: u64,
    pub connection_errors: u64,
    pub timeouts: u64,
    pub protocol_errors: u64,
    pub recipients: u64,
    pub bytes: u64,
    pub verify_ok: u64,
    pub verify_corrupt: u64,
    /// Connections that ended without an SMTP session. Blaster: the
    /// connect failed or timed out, or the connection closed before its
    /// session started (implicit TLS handshake); each is also one
    /// `connection_errors` or `timeouts`, and its messages are not
    /// attempted. Sink: the client sent nothing (a readiness check that
    /// connects and closes); neither a session nor an error. Absent from
    /// reports written before it existed, hence the default.
    #[serde(default)]
    pub connections_without_session: u64,
    /// Completed TLS handshakes by the cipher suite and key-exchange group
    /// they negotiated (`"TLS13_AES_128_GCM_SHA256 X25519": n`). Absent
    /// when there was no TLS, and from reports written before it existed.
    #[serde(default, skip_serializing_if = "TlsNegotiated::is_empty")]
    pub tls_negotiated: TlsNegotiated,
}

/// Completed TLS handshakes counted by `(suite, group)` (IANA code points),
/// in a few fixed slots so that [`Counts`] stays `Copy` and counting never
/// allocates. A run negotiates one or two pairs (one sink configuration,
/// one blaster configuration); past [`TlsNegotiated::SLOTS`] distinct pairs,
/// the rest are added to the last slot's pair, which is then `other`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsNegotiated {
    slots: [(u16, u16, u64); TlsNegotiated::SLOTS],
}

impl TlsNegotiated {
    /// Distinct pairs kept.
    pub const SLOTS: usize = 4;
    /// The code point pair of the overflow slot (not a real suite/group).
    const OTHER: (u16, u16) = (0, 0);

    /// True if nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(|s| s.2 == 0)
    }

    /// Adds `n` handshakes that negotiated `suite` and `group`.
    pub fn add(&mut self, suite: u16, group: u16, n: u64) {
        if n == 0 {
            return;
        }
        let i = self
            .slots
            .iter()
            .position(|s| s.2 > 0 && (s.0, s.1) == (suite, group))
            .or_else(|| self.slots.iter().position(|s| s.2 == 0));
        match i {
            Some(i) => {
                let s = &mut self.slots[i];
                *s = (suite, group, s.2.saturating_add(n));
            }
            None => {
                let last = &mut self.slots[Self::SLOTS - 1];
                *last = (Self::OTHER.0, Self::OTHER.1, last.2.saturating_add(n));
            }
        }
    }

    /// The pairs counted, most frequent first: `(suite name, group name, n)`.
    pub fn entries(&self) -> Vec<(String, String, u64)> {
        let mut v: Vec<(String, String, u64)> = self
            .slots
            .iter()
            .filter(|s| s.2 > 0)
            .map(|&(suite, group, n)| {
                if (suite, group) == Self::OTHER {
                    ("other".into(), "other".into(), n)
                } else {
                    (suite_name(suite), group_name(group), n)
                }
            })
            .collect();
        v.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        v
    }

    fn zip_with(&mut self, o: &TlsNegotiated, f: fn(u64, u64) -> u64) {
        let mut out = TlsNegotiated::default();
        for s in self.slots.iter().filter(|s| s.2 > 0) {
            let theirs = o
                .slots
                .iter()
                .find(|t| t.2 > 0 && (t.0, t.1) == (s.0, s.1))
                .map_or(0, |t| t.2);
            out.add(s.0, s.1, f(s.2, theirs));
        }
        for t in o.slots.iter().filter(|t| t.2 > 0) {
            if !self
                .slots
                .iter()
                .any(|s| s.2 > 0 && (s.0, s.1) == (t.0, t.1))
            {
                out.add(t.0, t.1, f(0, t.2));
            }
        }
        *self = out;
    }
}

fn suite_str(code: u16) -> Option<&'static str> {
    rustls::CipherSuite::from(code).as_str()
}

fn group_str(code: u16) -> Option<&'static str> {
    rustls::NamedGroup::from(code).as_str()
}

fn suite_name(code: u16) -> String {
    suite_str(code).map_or_else(|| format!("0x{code:04x}"), str::to_string)
}

fn group_name(code: u16) -> String {
    group_str(code).map_or_else(|| format!("0x{code:04x}"), str::to_string)
}

/// A name back to its code point: rustls' name, or `0x....` as written for
/// an unnamed one.
fn code_of(name: &str, of: fn(u16) -> Option<&'static str>) -> Option<u16> {
    if let Some(hex) = name.strip_prefix("0x") {
        return u16::from_str_radix(hex, 16).ok();
    }
    (1..=u16::MAX).find(|&c| of(c) == Some(name))
}

impl Serialize for TlsNegotiated {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let entries = self.entries();
        let mut m = ser.serialize_map(Some(entries.len()))?;
        for (suite, group, n) in entries {
            m.serialize_entry(&format!("{suite} {group}"), &n)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for TlsNegotiated {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, u64>::deserialize(de)?;
        let mut t = TlsNegotiated::default();
        for (key, n) in map {
            let (suite, group) = key.split_once(' ').unwrap_or((key.as_str(), ""));
            match (code_of(suite, suite_str), code_of(group, group_str)) {
                (Some(s), Some(g)) => t.add(s, g, n),
                _ => t.add(TlsNegotiated::OTHER.0, TlsNegotiated::OTHER.1, n),
            }
        }
        Ok(t)
    }
}

impl Counts {
    /// `connection_errors + timeouts + protocol_errors` (the `errors` of
    /// assertions).
    pub fn errors(&self) -> u64 {
        self.connection_errors
            .saturating_add(self.timeouts)
            .saturating_add(self.protocol_errors)
    }

    /// Field-wise saturating addition.
    pub fn add(&mut self, o: &Counts) {
        self.zip_with(o, u64::saturating_add);
    }

    /// Field-wise `self - earlier`, saturating at zero.
    pub fn delta_since(&self, earlier: &Counts) -> Counts {
        let mut d = *self;
        d.zip_with(earlier, u64::saturating_sub);
        d
    }

    fn zip_with(&mut self, o: &Counts, f: fn(u64, u64) -> u64) {
        self.sessions = f(self.sessions, o.sessions);
        self.tls_sessions = f(self.tls_sessions, o.tls_sessions);
        self.tls_resumed = f(self.tls_resumed, o.tls_resumed);
        self.messages_attempted = f(self.messages_attempted, o.messages_attempted);
        self.messages_accepted = f(self.messages_accepted, o.messages_accepted);
        self.messages_tempfailed = f(self.messages_tempfailed, o.messages_tempfailed);
        self.messages_rejected = f(self.messages_rejected, o.messages_rejected);
        self.connection_errors = f(self.connection_errors, o.connection_errors);
        self.timeouts = f(self.timeouts, o.timeouts);
        self.protocol_errors = f(self.protocol_errors, o.protocol_errors);
        self.recipients = f(self.recipients, o.recipients);
        self.bytes = f(self.bytes, o.bytes);
        self.verify_ok = f(self.verify_ok, o.verify_ok);
        self.verify_corrupt = f(self.verify_corrupt, o.verify_corrupt);
        self.connections_without_session = f(
            self.connections_without_session,
            o.connections_without_session,
        );
        self.tls_negotiated.zip_with(&o.tls_negotiated, f);
    }

    /// Bumps the counter of `outcome` only (not `messages_attempted`).
    fn bump_outcome(&mut self, outcome: Outcome) {
        let c = match outcome {
            Outcome::Accepted => &mut self.messages_accepted,
            Outcome::TempFailed => &mut self.messages_tempfailed,
            Outcome::Rejected => &mut self.messages_rejected,
            Outcome::ConnectionError => &mut self.connection_errors,
            Outcome::Timeout => &mut self.timeouts,
            Outcome::ProtocolError => &mut self.protocol_errors,
        };
        *c = c.saturating_add(1);
    }
}

/// One lazily allocated histogram per [`Phase`], indexed by `Phase::index`.
#[derive(Clone, Debug, Default)]
pub struct PhaseHistograms {
    slots: [Option<Histogram<u64>>; Phase::ALL.len()],
}

impl PhaseHistograms {
    /// Records `latency_us` (clamped) for `phase`; allocates the phase's
    /// histogram on its first record only.
    #[inline]
    pub fn record(&mut self, phase: Phase, latency_us: u64) {
        self.slots[phase.index()]
            .get_or_insert_with(new_histogram)
            .saturating_record(latency_us.min(HIST_HIGH_US));
    }

    /// The histogram of `phase`, if anything was recorded (or added) there.
    pub fn get(&self, phase: Phase) -> Option<&Histogram<u64>> {
        self.slots[phase.index()].as_ref().filter(|h| !h.is_empty())
    }

    /// Adds `h` into the histogram of `phase`.
    pub fn add(&mut self, phase: Phase, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        add_histogram(
            self.slots[phase.index()].get_or_insert_with(new_histogram),
            h,
        );
    }

    /// Adds every phase of `other` into `self`.
    pub fn merge(&mut self, other: &PhaseHistograms) {
        for phase in Phase::ALL {
            if let Some(h) = other.get(phase) {
                self.add(phase, h);
            }
        }
    }

    /// `(phase, histogram)` for every phase with a non-empty histogram, in
    /// `Phase::ALL` order.
    pub fn iter(&self) -> impl Iterator<Item = (Phase, &Histogram<u64>)> {
        Phase::ALL
            .into_iter()
            .filter_map(|p| self.get(p).map(|h| (p, h)))
    }

    /// Number of values recorded for `phase` (0 if none).
    pub fn count(&self, phase: Phase) -> u64 {
        self.get(phase).map_or(0, |h| h.len())
    }
}

/// Lowest reply code tallied individually.
const REPLY_CODE_MIN: u16 = 100;
/// Number of individually tallied codes (100..=599).
const REPLY_CODE_SPAN: usize = 500;
/// Slots per command: the 500 codes plus one for anything out of range.
const REPLY_SLOTS: usize = REPLY_CODE_SPAN + 1;

/// Reply-code tallies per [`CommandKind`]: a flat fixed array (allocated on
/// the first tally, never again), codes 100..=599 individually, any other
/// code under the key `"other"`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplyCodes {
    tally: Vec<u64>,
}

impl ReplyCodes {
    /// Counts one reply `code` to `cmd`.
    #[inline]
    pub fn count(&mut self, cmd: CommandKind, code: u16) {
        self.count_n(cmd, code, 1);
    }

    /// Counts `n` replies `code` to `cmd`.
    pub fn count_n(&mut self, cmd: CommandKind, code: u16, n: u64) {
        if self.tally.is_empty() {
            self.tally = vec![0; CommandKind::ALL.len() * REPLY_SLOTS];
        }
        let slot = match code.checked_sub(REPLY_CODE_MIN) {
            Some(off) if (off as usize) < REPLY_CODE_SPAN => off as usize,
            _ => REPLY_CODE_SPAN,
        };
        let i = cmd_index(cmd) * REPLY_SLOTS + slot;
        self.tally[i] = self.tally[i].saturating_add(n);
    }

    /// How many replies `code` answered `cmd`.
    pub fn get(&self, cmd: CommandKind, code: u16) -> u64 {
        if self.tally.is_empty() {
            return 0;
        }
        match code.checked_sub(REPLY_CODE_MIN) {
            Some(off) if (off as usize) < REPLY_CODE_SPAN => {
                self.tally[cmd_index(cmd) * REPLY_SLOTS + off as usize]
            }
            _ => self.tally[cmd_index(cmd) * REPLY_SLOTS + REPLY_CODE_SPAN],
        }
    }

    /// Adds every tally of `other`.
    pub fn merge(&mut self, other: &ReplyCodes) {
        if other.tally.is_empty() {
            return;
        }
        if self.tally.is_empty() {
            self.tally = other.tally.clone();
            return;
        }
        for (a, b) in self.tally.iter_mut().zip(&other.tally) {
            *a = a.saturating_add(*b);
        }
    }

    /// `(command, code as string, count)` for every non-zero tally; the
    /// out-of-range slot is named `"other"`.
    pub fn iter(&self) -> impl Iterator<Item = (CommandKind, String, u64)> + '_ {
        self.tally
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| {
                let cmd = CommandKind::ALL[i / REPLY_SLOTS];
                let slot = i % REPLY_SLOTS;
                let code = if slot == REPLY_CODE_SPAN {
                    "other".to_string()
                } else {
                    (slot as u16 + REPLY_CODE_MIN).to_string()
                };
                (cmd, code, *n)
            })
    }
}

/// Most distinct reasons a [`FailureTally`] keeps; past that, new reasons
/// are counted under [`FAILURE_OTHER`].
pub const FAILURE_REASONS_MAX: usize = 32;
/// The key of reasons beyond [`FAILURE_REASONS_MAX`].
pub const FAILURE_OTHER: &str = "(other reasons)";
/// Longest reason kept, in bytes: a longer one is cut at a character
/// boundary and ends with `…`.
pub const FAILURE_REASON_MAX_BYTES: usize = 256;

/// Why messages and connections failed, with counts: the first line of the
/// reply that refused a message (`dot: 550 5.5.2 …`), or the error that
/// ended a session or connection (`connect: Connection refused …`).
/// Bounded ([`FAILURE_REASONS_MAX`] reasons of at most
/// [`FAILURE_REASON_MAX_BYTES`]); nothing is allocated for a reason
/// already counted, and nothing at all unless something failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailureTally {
    entries: Vec<(String, u64)>,
}

impl FailureTally {
    /// Counts one failure for `reason`.
    pub fn count(&mut self, reason: &str) {
        self.count_n(reason, 1);
    }

    /// Counts `n` failures for `reason`.
    pub fn count_n(&mut self, reason: &str, n: u64) {
        let reason = reason.trim();
        let cut = if reason.len() > FAILURE_REASON_MAX_BYTES {
            let mut end = FAILURE_REASON_MAX_BYTES;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            Some(end)
        } else {
            None
        };
        let same = |e: &(String, u64)| match cut {
            None => e.0 == reason,
            Some(end) => e.0.strip_suffix('…') == Some(&reason[..end]),
        };
        if let Some(e) = self.entries.iter_mut().find(|e| same(e)) {
            e.1 = e.1.saturating_add(n);
            return;
        }
        if self.entries.len() + 1 >= FAILURE_REASONS_MAX && reason != FAILURE_OTHER {
            return self.count_n(FAILURE_OTHER, n);
        }
        let key = match cut {
            None => reason.to_string(),
            Some(end) => format!("{}…", &reason[..end]),
        };
        self.entries.push((key, n));
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &FailureTally) {
        for (reason, n) in &other.entries {
            self.count_n(reason, *n);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The `k` most frequent reasons, most frequent first (ties by name).
    pub fn top(&self, k: usize) -> Vec<(String, u64)> {
        let mut v = self.entries.clone();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(k);
        v
    }
}

fn cmd_index(cmd: CommandKind) -> usize {
    // `CommandKind::ALL` lists the variants in declaration order.
    cmd as usize
}

/// Everything one recorder (or a merge of several) measured over some span
/// of time: counters, latency histograms (corrected and uncorrected), the
/// schedule lag and the reply-code tallies.
#[derive(Clone, Debug, Default)]
pub struct Measurements {
    pub counts: Counts,
    /// Latency per phase. For `message` and `session` in open-loop mode this
    /// is measured from the intended start (coordinated-omission corrected).
    pub latency: PhaseHistograms,
    /// Latency of `message` and `session` from the actual start (open loop
    /// only; empty in closed loop).
    pub latency_uncorrected: PhaseHistograms,
    /// How late each scheduled start was, in microseconds (open loop only).
    pub schedule_lag: Option<Histogram<u64>>,
    pub reply_codes: ReplyCodes,
    /// Why messages and connections failed.
    pub failures: FailureTally,
}

impl Measurements {
    /// Adds `other` into `self`: counters, histograms and tallies are summed
    /// (percentiles are never averaged).
    pub fn merge(&mut self, other: &Measurements) {
        self.counts.add(&other.counts);
        self.latency.merge(&other.latency);
        self.latency_uncorrected.merge(&other.latency_uncorrected);
        if let Some(h) = other.schedule_lag.as_ref().filter(|h| !h.is_empty()) {
            add_histogram(self.schedule_lag.get_or_insert_with(new_histogram), h);
        }
        self.reply_codes.merge(&other.reply_codes);
        self.failures.merge(&other.failures);
    }
}

impl Measurements {
    /// Why an open-loop run must be marked invalid, if the schedule
    /// slipped: the p99 of the schedule lag is above `max_p99_lag_us`.
    /// `None` when the schedule held or no lag was recorded (closed loop).
    pub fn schedule_slip_reason(&self, max_p99_lag_us: u64) -> Option<String> {
        let h = self.schedule_lag.as_ref().filter(|h| !h.is_empty())?;
        let p99 = h.value_at_quantile(0.99);
        (p99 > max_p99_lag_us).then(|| {
            format!(
                "the blaster could not keep its schedule: p99 lag of messages sent on a free connection {p99}µs > {max_p99_lag_us}µs (max {}µs)",
                h.max()
            )
        })
    }
}

/// What one thread measured during one interval (normally one second):
/// send it to the main thread, which merges the snapshots of all threads
/// for the live line, the throughput timeline and the `.hlog`.
#[derive(Clone, Debug)]
pub struct IntervalSnapshot {
    /// Start of the interval, as an offset from the run start.
    pub start_offset: Duration,
    /// Length of the interval.
    pub duration: Duration,
    /// Counters, histograms and reply-code tallies of the interval only.
    pub measurements: Measurements,
}

impl IntervalSnapshot {
    /// One line for the live display, e.g.
    /// `[  12s] 20113 msg/s  310 sess/s  0 err/s  p50 1.20ms  p99 4.10ms (message)`:
    /// rates over this interval's duration; percentiles of `message` (or of
    /// `session` when no message completed).
    pub fn live_line(&self) -> String {
        let secs = self.duration.as_secs_f64().max(1e-9);
        let c = &self.measurements.counts;
        let mut line = format!(
            "[{:>5}s] {:.0} msg/s  {:.0} sess/s  {:.0} err/s",
            self.start_offset.as_secs() + 1,
            c.messages_accepted as f64 / secs,
            c.sessions as f64 / secs,
            c.errors() as f64 / secs,
        );
        let lat = &self.measurements.latency;
        let shown = [Phase::Message, Phase::Session]
            .into_iter()
            .find_map(|p| lat.get(p).map(|h| (p, h)));
        if let Some((phase, h)) = shown {
            line.push_str(&format!(
                "  p50 {}  p99 {} ({})",
                format_us(h.value_at_quantile(0.5) as f64),
                format_us(h.value_at_quantile(0.99) as f64),
                phase.as_str()
            ));
        }
        line
    }

    /// Adds another thread's snapshot of the same interval (for one
    /// `.hlog` line per phase per interval); keeps the earliest start and
    /// the longest duration.
    pub fn merge(&mut self, other: &IntervalSnapshot) {
        self.start_offset = self.start_offset.min(other.start_offset);
        self.duration = self.duration.max(other.duration);
        self.measurements.merge(&other.measurements);
    }
}

/// The per-thread recorder. One per thread; no locks or atomics.
///
/// Records go into the current interval; [`Recorder::take_interval`] folds
/// the interval into the running totals and hands it out as a snapshot.
/// [`Recorder::finish`] folds whatever is pending and returns the totals.
#[derive(Debug, Default)]
pub struct Recorder {
    total: Measurements,
    pending: Measurements,
}

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a latency of `phase`. In open-loop mode pass the corrected
    /// latency (from the intended start) for `message` and `session`.
    #[inline]
    pub fn record(&mut self, phase: Phase, latency_us: u64) {
        self.pending.latency.record(phase, latency_us);
    }

    /// Records the uncorrected latency (from the actual start) of `phase`;
    /// meaningful for `message` and `session` in open-loop mode.
    #[inline]
    pub fn record_uncorrected(&mut self, phase: Phase, latency_us: u64) {
        self.pending.latency_uncorrected.record(phase, latency_us);
    }

    /// Records how late a scheduled start was (open loop).
    #[inline]
    pub fn record_schedule_lag(&mut self, lag_us: u64) {
        self.pending
            .schedule_lag
            .get_or_insert_with(new_histogram)
            .saturating_record(lag_us.min(HIST_HIGH_US));
    }

    /// Counts one attempted message ending in `outcome`: bumps
    /// `messages_attempted` and the outcome's counter.
    #[inline]
    pub fn count_outcome(&mut self, outcome: Outcome) {
        let c = &mut self.pending.counts;
        c.messages_attempted = c.messages_attempted.saturating_add(1);
        c.bump_outcome(outcome);
    }

    /// Counts an error that belongs to no message (e.g. a sink connection
    /// reset between messages, a failed connect with no message planned):
    /// bumps the error counter of `outcome` but not `messages_attempted`.
    /// Accepted/TempFailed/Rejected are message outcomes: use
    /// [`Recorder::count_outcome`] for them.
    #[inline]
    pub fn count_session_error(&mut self, outcome: Outcome) {
        self.pending.counts.bump_outcome(outcome);
    }

    /// Counts one session (connection that reached the SMTP dialogue).
    /// `tls`: a TLS handshake *completed* in it (not merely started: pass
    /// `Conn::tls_established()`, not `Conn::is_tls()`).
    #[inline]
    pub fn count_session(&mut self, tls: bool) {
        let c = &mut self.pending.counts;
        c.sessions = c.sessions.saturating_add(1);
        if tls {
            c.tls_sessions = c.tls_sessions.saturating_add(1);
        }
    }

    /// Counts one connection that ended without an SMTP session (see
    /// [`Counts::connections_without_session`]).
    #[inline]
    pub fn count_connection_without_session(&mut self) {
        let c = &mut self.pending.counts;
        c.connections_without_session = c.connections_without_session.saturating_add(1);
    }

    /// Counts one session whose completed TLS handshake was a resumption
    /// (`Conn::tls_resumed()`); call it beside `count_session(true)`.
    #[inline]
    pub fn count_tls_resumed(&mut self) {
        let c = &mut self.pending.counts;
        c.tls_resumed = c.tls_resumed.saturating_add(1);
    }

    /// Counts what one completed TLS handshake negotiated (IANA code
    /// points of the suite and the group); call it beside
    /// `count_session(true)`.
    #[inline]
    pub fn count_tls_negotiated(&mut self, suite: u16, group: u16) {
        self.pending.counts.tls_negotiated.add(suite, group, 1);
    }

    /// Counts recipients sent (blaster) or accepted (sink).
    #[inline]
    pub fn count_recipients(&mut self, n: u64) {
        let c = &mut self.pending.counts;
        c.recipients = c.recipients.saturating_add(n);
    }

    /// Counts message bytes (DATA/BDAT payload).
    #[inline]
    pub fn count_bytes(&mut self, n: u64) {
        let c = &mut self.pending.counts;
        c.bytes = c.bytes.saturating_add(n);
    }

    /// Counts one verified message (`ok`) or a corrupt one.
    #[inline]
    pub fn count_verify(&mut self, ok: bool) {
        let c = &mut self.pending.counts;
        if ok {
            c.verify_ok = c.verify_ok.saturating_add(1);
        } else {
            c.verify_corrupt = c.verify_corrupt.saturating_add(1);
        }
    }

    /// Counts one reply `code` to `cmd`. The tally goes out with the
    /// interval like the counters (live metrics show reply codes); its
    /// table is allocated on the interval's first reply, never per reply.
    #[inline]
    pub fn count_reply(&mut self, cmd: CommandKind, code: u16) {
        self.pending.reply_codes.count(cmd, code);
    }

    /// Counts one failure for `reason` (see [`FailureTally`]); call it on
    /// failures only.
    pub fn count_failure(&mut self, reason: &str) {
        self.pending.failures.count(reason);
    }

    /// Direct access to the counters of the current interval, for anything
    /// the helpers above do not cover.
    pub fn counts_mut(&mut self) -> &mut Counts {
        &mut self.pending.counts
    }

    /// Ends the current interval: folds it into the totals and returns it
    /// (counts delta and histograms of the interval). The next records
    /// start a new interval; each phase's histogram is allocated again on
    /// its first record (once per interval, never per record).
    pub fn take_interval(
        &mut self,
        start_offset: Duration,
        duration: Duration,
    ) -> IntervalSnapshot {
        let measurements = std::mem::take(&mut self.pending);
        self.total.merge(&measurements);
        IntervalSnapshot {
            start_offset,
            duration,
            measurements,
        }
    }

    /// Totals so far, including the pending interval.
    pub fn totals(&self) -> Measurements {
        let mut t = self.total.clone();
        t.merge(&self.pending);
        t
    }

    /// Folds the pending interval and returns the totals of the run.
    pub fn finish(mut self) -> Measurements {
        let pending = std::mem::take(&mut self.pending);
        self.total.merge(&pending);
        self.total
    }
}

/// The latency of one phase in one second of the timeline (JSON
/// `timeline[].latency.<phase>`), from the histogram of that second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntervalLatency {
    /// Values recorded in this second.
    pub count: u64,
    /// Percentiles of this second. Absent in a merged report where several
    /// instances share the second (percentiles are never averaged; the
    /// per-second histograms are not kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p90_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<u64>,
    /// The largest value of this second (exact after a merge too).
    pub max_us: u64,
}

impl IntervalLatency {
    /// The summary of one second's histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50_us: Some(h.value_at_quantile(0.50)),
            p90_us: Some(h.value_at_quantile(0.90)),
            p99_us: Some(h.value_at_quantile(0.99)),
            max_us: h.max(),
        }
    }

    /// Combines the same second of two instances: counts add, the maximum
    /// is the larger one, and the percentiles are unknown (not averaged).
    pub fn combine(&mut self, o: &IntervalLatency) {
        self.count = self.count.saturating_add(o.count);
        self.max_us = self.max_us.max(o.max_us);
        self.p50_us = None;
        self.p90_us = None;
        self.p99_us = None;
    }
}

/// One point of the throughput-over-time series (JSON `timeline`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the run start (start of the one-second bin).
    pub t: u64,
    /// Messages accepted in this second.
    pub messages: u64,
    /// Sessions started in this second.
    pub sessions: u64,
    /// Connection errors + timeouts + protocol errors in this second.
    pub errors: u64,
    /// Everything that failed in this second: messages tempfailed or
    /// rejected, and every error (`errors`). Absent from reports written
    /// before it existed.
    #[serde(default)]
    pub failed: u64,
    /// Latency per phase (`Phase::as_str`) in this second, phases with
    /// data only (the corrected figures). Absent from sink reports and
    /// from reports written before it existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency: BTreeMap<String, IntervalLatency>,
    /// Open loop: messages the schedule asked for in this second (the
    /// integral of `--rate` or `--stages` over it). Absent in closed loop,
    /// sink reports and reports written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<f64>,
    /// Open loop: messages given to a connection in this second (the
    /// achieved rate, as `open_loop.achieved_per_sec` counts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub achieved: Option<u64>,
    /// End to end (`bench --through`, `merge` of a blaster and a sink):
    /// messages accepted so far minus messages delivered so far, at the
    /// end of this second. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
}

/// Seconds a timeline bin stays open for late snapshots of other threads
/// before its per-second percentiles are computed and its histograms freed.
const BIN_OPEN_SECS: u64 = 2;

/// Main-thread accumulator of interval snapshots from every thread: the
/// run totals, the timeline (one point per second) and the latency
/// histograms of the last few seconds, which become the timeline's
/// per-second percentiles once no more snapshots of them can arrive (so
/// memory stays bounded however long the run).
#[derive(Debug, Default)]
pub struct IntervalMerger {
    total: Measurements,
    timeline: Vec<TimelinePoint>,
    /// Second → latency histograms of that second, not yet summarised.
    open: BTreeMap<u64, PhaseHistograms>,
}

impl IntervalMerger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one thread's snapshot to the totals and to the timeline bin of
    /// its start second.
    pub fn absorb(&mut self, snap: &IntervalSnapshot) {
        self.total.merge(&snap.measurements);
        let t = snap.start_offset.as_secs();
        let idx = match self.timeline.binary_search_by_key(&t, |p| p.t) {
            Ok(i) => i,
            Err(i) => {
                self.timeline.insert(
                    i,
                    TimelinePoint {
                        t,
                        ..Default::default()
                    },
                );
                i
            }
        };
        let c = &snap.measurements.counts;
        let p = &mut self.timeline[idx];
        p.messages = p.messages.saturating_add(c.messages_accepted);
        p.sessions = p.sessions.saturating_add(c.sessions);
        p.errors = p.errors.saturating_add(c.errors());
        p.failed = p.failed.saturating_add(
            c.errors()
                .saturating_add(c.messages_tempfailed)
                .saturating_add(c.messages_rejected),
        );
        if snap.measurements.latency.iter().next().is_some() {
            self.open
                .entry(t)
                .or_default()
                .merge(&snap.measurements.latency);
        }
        self.close_bins(t.saturating_sub(BIN_OPEN_SECS));
    }

    /// Summarises the latency of every open second before `before`.
    fn close_bins(&mut self, before: u64) {
        while let Some(entry) = self.open.first_entry() {
            if *entry.key() >= before {
                break;
            }
            let (t, hists) = entry.remove_entry();
            if let Ok(i) = self.timeline.binary_search_by_key(&t, |p| p.t) {
                self.timeline[i].latency = hists
                    .iter()
                    .map(|(phase, h)| (phase.as_str().to_string(), IntervalLatency::of(h)))
                    .collect();
            }
        }
    }

    /// Totals of everything absorbed.
    pub fn totals(&self) -> &Measurements {
        &self.total
    }

    /// The timeline so far, sorted by `t` (the latency of the last few
    /// seconds is filled in by [`Self::into_parts`]).
    pub fn timeline(&self) -> &[TimelinePoint] {
        &self.timeline
    }

    /// Consumes the merger: `(totals, timeline)`.
    pub fn into_parts(mut self) -> (Measurements, Vec<TimelinePoint>) {
        self.close_bins(u64::MAX);
        (self.total, self.timeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_one_to_ten_thousand_are_within_precision() {
        let mut r = Recorder::new();
        for v in 1..=10_000u64 {
            r.record(Phase::Message, v);
        }
        let m = r.finish();
        let h = m.latency.get(Phase::Message).unwrap();
        assert_eq!(h.len(), 10_000);
        assert_eq!(h.min(), 1);
        let p50 = h.value_at_quantile(0.5) as f64;
        let p99 = h.value_at_quantile(0.99) as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.001, "p50 {p50}");
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.001, "p99 {p99}");
        assert!((h.max() as f64 - 10_000.0).abs() < 10.0);
    }

    #[test]
    fn values_above_one_hour_are_clamped_not_panicking() {
        let mut r = Recorder::new();
        r.record(Phase::Session, u64::MAX);
        r.record_schedule_lag(u64::MAX);
        r.record(Phase::Session, 0);
        let m = r.finish();
        let h = m.latency.get(Phase::Session).unwrap();
        assert_eq!(h.len(), 2);
        assert!(h.equivalent(h.max(), HIST_HIGH_US));
        assert_eq!(m.schedule_lag.unwrap().len(), 1);
    }

    #[test]
    fn schedule_slip_is_reported_only_above_the_threshold() {
        let mut r = Recorder::new();
        assert_eq!(r.totals().schedule_slip_reason(1000), None);
        for lag_us in 0..100 {
            r.record_schedule_lag(lag_us * 100);
        }
        let m = r.finish();
        assert_eq!(m.schedule_slip_reason(20_000), None);
        let why = m.schedule_slip_reason(5_000).unwrap();
        assert!(
            why.starts_with("the blaster could not keep its schedule: p99 lag of messages sent on a free connection 98"),
            "{why}"
        );
    }

    #[test]
    fn outcomes_add_up_to_attempted() {
        let mut r = Recorder::new();
        for o in [
            Outcome::Accepted,
            Outcome::Accepted,
            Outcome::TempFailed,
            Outcome::Rejected,
            Outcome::ConnectionError,
            Outcome::Timeout,
            Outcome::ProtocolError,
        ] {
            r.count_outcome(o);
        }
        r.count_session_error(Outcome::ConnectionError);
        let c = r.finish().counts;
        assert_eq!(c.messages_attempted, 7);
        assert_eq!(c.messages_accepted, 2);
        assert_eq!(c.connection_errors, 2);
        assert_eq!(c.errors(), 4);
        assert_eq!(
            c.messages_attempted,
            c.messages_accepted + c.messages_tempfailed + c.messages_rejected + c.errors() - 1
        );
    }

    #[test]
    fn resumed_tls_sessions_add_up_and_old_reports_load_without_the_key() {
        let mut a = Recorder::new();
        a.count_session(true);
        a.count_tls_resumed();
        a.count_session(true);
        let mut b = Recorder::new();
        b.count_session(false);
        let mut c = a.finish().counts;
        c.add(&b.finish().counts);
        assert_eq!((c.sessions, c.tls_sessions, c.tls_resumed), (3, 2, 1));
        let mut v = serde_json::to_value(c).unwrap();
        assert_eq!(v["tls_resumed"], 1);
        v.as_object_mut().unwrap().remove("tls_resumed");
        let old: Counts = serde_json::from_value(v).unwrap();
        assert_eq!((old.tls_sessions, old.tls_resumed), (2, 0));
    }

    #[test]
    fn interval_snapshots_carry_deltas_and_totals_keep_everything() {
        let mut r = Recorder::new();
        r.count_outcome(Outcome::Accepted);
        r.record(Phase::Message, 100);
        let s1 = r.take_interval(Duration::ZERO, Duration::from_secs(1));
        r.count_outcome(Outcome::Accepted);
        r.count_outcome(Outcome::Accepted);
        r.record(Phase::Message, 200);
        r.count_reply(CommandKind::Mail, 250);
        let s2 = r.take_interval(Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(s1.measurements.counts.messages_accepted, 1);
        assert_eq!(s2.measurements.counts.messages_accepted, 2);
        assert_eq!(s2.measurements.latency.count(Phase::Message), 1);
        let t = r.finish();
        assert_eq!(t.counts.messages_accepted, 3);
        assert_eq!(t.latency.count(Phase::Message), 2);
        assert_eq!(t.reply_codes.get(CommandKind::Mail, 250), 1);
        assert_eq!(s2.measurements.reply_codes.get(CommandKind::Mail, 250), 1);
        assert_eq!(s1.measurements.reply_codes.get(CommandKind::Mail, 250), 0);
    }

    #[test]
    fn live_line_shows_interval_rates_and_message_percentiles() {
        let mut r = Recorder::new();
        for _ in 0..200 {
            r.count_outcome(Outcome::Accepted);
            r.record(Phase::Message, 1500);
        }
        r.count_session(false);
        let line = r
            .take_interval(Duration::from_secs(11), Duration::from_millis(500))
            .live_line();
        assert_eq!(
            line,
            "[   12s] 400 msg/s  2 sess/s  0 err/s  p50 1.50ms  p99 1.50ms (message)"
        );
        let idle = r
            .take_interval(Duration::from_secs(12), Duration::from_secs(1))
            .live_line();
        assert_eq!(idle, "[   13s] 0 msg/s  0 sess/s  0 err/s");
    }

    #[test]
    fn merger_bins_snapshots_by_second_and_sums_threads() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        a.count_outcome(Outcome::Accepted);
        b.count_outcome(Outcome::Accepted);
        b.count_session(false);
        let mut m = IntervalMerger::new();
        m.absorb(&a.take_interval(Duration::from_secs(1), Duration::from_secs(1)));
        m.absorb(&b.take_interval(Duration::from_millis(1001), Duration::from_secs(1)));
        b.count_outcome(Outcome::Timeout);
        m.absorb(&b.take_interval(Duration::ZERO, Duration::from_secs(1)));
        let tl = m.timeline();
        assert_eq!(tl.len(), 2);
        assert_eq!(
            tl[0],
            TimelinePoint {
                t: 0,
                messages: 0,
                sessions: 0,
                errors: 1,
                failed: 1,
                ..Default::default()
            }
        );
        assert_eq!(
            tl[1],
            TimelinePoint {
                t: 1,
                messages: 2,
                sessions: 1,
                errors: 0,
                ..Default::default()
            }
        );
        assert_eq!(m.totals().counts.messages_attempted, 3);
    }

    #[test]
    fn each_timeline_second_gets_the_percentiles_of_that_second_only() {
        let mut m = IntervalMerger::new();
        for sec in 0..10u64 {
            for thread in 0..2u64 {
                let mut r = Recorder::new();
                for v in 1..=100u64 {
                    r.record(Phase::Message, v * 1000 * (sec + 1) + thread);
                }
                r.record(Phase::Ehlo, 50);
                m.absorb(&r.take_interval(Duration::from_secs(sec), Duration::from_secs(1)));
            }
            assert!(m.open.len() <= BIN_OPEN_SECS as usize + 1, "bounded");
        }
        let (_, tl) = m.into_parts();
        assert_eq!(tl.len(), 10);
        for p in &tl {
            let l = p.latency["message"];
            let scale = 1000 * (p.t + 1);
            assert_eq!(l.count, 200, "both threads of second {}", p.t);
            let p50 = l.p50_us.unwrap() as f64;
            assert!((p50 - 50.0 * scale as f64).abs() / p50 < 0.01, "{p:?}");
            assert!(
                l.p99_us.unwrap() >= 98 * scale && l.max_us >= 100 * scale,
                "{p:?}"
            );
            assert!(l.max_us < 101 * scale, "nothing of another second: {p:?}");
            assert_eq!(p.latency["ehlo"].count, 2);
        }
    }

    #[test]
    fn a_second_shared_by_two_instances_keeps_count_and_max_but_no_percentiles() {
        let mut a = IntervalLatency {
            count: 10,
            p50_us: Some(5),
            p90_us: Some(9),
            p99_us: Some(10),
            max_us: 10,
        };
        a.combine(&IntervalLatency {
            count: 5,
            p50_us: Some(50),
            p90_us: Some(90),
            p99_us: Some(99),
            max_us: 100,
        });
        assert_eq!(
            a,
            IntervalLatency {
                count: 15,
                p50_us: None,
                p90_us: None,
                p99_us: None,
                max_us: 100
            }
        );
    }

    #[test]
    fn reply_codes_tally_per_command_and_out_of_range_codes_are_other() {
        let mut r = ReplyCodes::default();
        r.count(CommandKind::Rcpt, 250);
        r.count(CommandKind::Rcpt, 250);
        r.count(CommandKind::Rcpt, 451);
        r.count(CommandKind::Quit, 999);
        r.count(CommandKind::Quit, 0);
        let mut other = ReplyCodes::default();
        other.count(CommandKind::Rcpt, 250);
        r.merge(&other);
        assert_eq!(r.get(CommandKind::Rcpt, 250), 3);
        let all: Vec<_> = r.iter().collect();
        assert!(all.contains(&(CommandKind::Rcpt, "451".to_string(), 1)));
        assert!(all.contains(&(CommandKind::Quit, "other".to_string(), 2)));
    }

    #[test]
    fn histograms_with_other_bounds_are_still_added() {
        let mut foreign = Histogram::<u64>::new_with_bounds(1, 10_000, 2).unwrap();
        foreign.record(500).unwrap();
        foreign.record(700).unwrap();
        let mut h = new_histogram();
        add_histogram(&mut h, &foreign);
        assert_eq!(h.len(), 2);
    }
}
