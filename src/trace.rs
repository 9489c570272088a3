//! End-to-end tracing: the `X-Smtpstorm-Trace` header the blaster writes
//! into every message with `--trace`, the streaming scan the sink runs over
//! a received message's header section to find it, and the one wall clock
//! both sides read it with.
//!
//! The header is `X-Smtpstorm-Trace: <run id> <message number> <send
//! time>`: the run id is 16 lowercase hex digits (random per run, shared by
//! its instances), the message number is the message's `{n}` in decimal,
//! and the send time is 19 decimal digits, nanoseconds since the Unix epoch
//! (the builder writes zeros; the client session overwrites them when it
//! hands the message's data to the connection's output, see
//! `smtp::client::Message::stamp`).
//!
//! [`Scanner`] reads a message in pieces split anywhere, looks only at the
//! header section (it stops at the blank line and never reads the body),
//! unfolds a folded trace field, bounds what it keeps (a trace value longer
//! than [`MAX_VALUE`] bytes is malformed) and stops at the first
//! well-formed trace. A malformed, truncated or absent trace gives `None`:
//! the message is untraced, never a delivery.
//!
//! [`unix_ns`] turns a monotonic `Instant` into wall-clock nanoseconds
//! through one process-wide anchor taken the first time it is called, so a
//! blaster and a sink in one process (`bench --through`) read one clock.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The header field name (compared case-insensitively when read).
pub const HEADER_NAME: &str = "X-Smtpstorm-Trace";
/// Digits of the send time field.
pub const TIME_DIGITS: usize = 19;
/// Longest trace value (after unfolding) the scanner keeps.
pub const MAX_VALUE: usize = 96;

/// What a well-formed trace header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trace {
    pub run: u64,
    pub n: u64,
    /// Send time, nanoseconds since the Unix epoch.
    pub sent_ns: u64,
}

/// The run id as it is written: 16 lowercase hex digits.
pub fn run_id_hex(run: u64) -> String {
    format!("{run:016x}")
}

/// Parses a run id written by [`run_id_hex`] (exactly 16 hex digits).
pub fn parse_run_id(s: &str) -> Option<u64> {
    (s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(s, 16).ok())
        .flatten()
}

/// `X-Smtpstorm-Trace: <run> <n> 0000000000000000000\r\n` and the offset
/// of the time's first digit in it.
pub fn header_line(run: u64, n: u64) -> (String, usize) {
    let mut s = format!("{HEADER_NAME}: {run:016x} {n} ");
    let at = s.len();
    s.push_str(&"0".repeat(TIME_DIGITS));
    s.push_str("\r\n");
    (s, at)
}

/// Wall-clock nanoseconds since the Unix epoch of `at`, through the
/// process's one anchor (see the module doc).
pub fn unix_ns(at: Instant) -> u64 {
    let (t0, ns0) = anchor();
    if at >= t0 {
        ns0.saturating_add((at - t0).as_nanos().min(u128::from(u64::MAX)) as u64)
    } else {
        ns0.saturating_sub((t0 - at).as_nanos().min(u128::from(u64::MAX)) as u64)
    }
}

/// The process's anchor: an `Instant` and the wall clock read together.
pub fn anchor() -> (Instant, u64) {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    *ANCHOR.get_or_init(|| {
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
            .unwrap_or(0);
        (now, wall)
    })
}

/// Parses a trace value (what follows the colon, unfolded): exactly three
/// fields separated by white space; a 16-hex-digit run id, a decimal
/// message number, a decimal nonzero send time of [`TIME_DIGITS`] digits.
pub fn parse_value(v: &[u8]) -> Option<Trace> {
    // The sink runs this per message: the layout the blaster writes
    // (` <16 hex> <n> <19 digits>`, CR kept) is read straight off its
    // positions; anything else takes the general path below.
    if let Some(t) = parse_canonical(v) {
        return Some(t);
    }
    let mut i = 0;
    let run = field(v, &mut i);
    let n = field(v, &mut i);
    let t = field(v, &mut i);
    if !field(v, &mut i).is_empty() || run.len() != 16 || t.len() != TIME_DIGITS {
        return None;
    }
    let r = hex16(run)?;
    let n = decimal(n)?;
    let sent_ns = decimal(t)?;
    (sent_ns != 0).then_some(Trace { run: r, n, sent_ns })
}

/// The blaster's own layout: ` <16 hex> <n> <19 digits>` with an optional
/// CR; `None` if `v` is laid out otherwise (not necessarily malformed).
fn parse_canonical(v: &[u8]) -> Option<Trace> {
    let v = v.strip_prefix(b" ")?;
    let v = v.strip_suffix(b"\r").unwrap_or(v);
    let len = v.len();
    if len < 16 + 1 + 1 + 1 + TIME_DIGITS || v[16] != b' ' || v[len - TIME_DIGITS - 1] != b' ' {
        return None;
    }
    let run = hex16(&v[..16])?;
    let n = decimal(&v[17..len - TIME_DIGITS - 1])?;
    let t = &v[len - TIME_DIGITS..];
    // 19 digits: 8 + 8 + 3, each run of 8 in a few operations (SWAR).
    let hi = digits8(t[..8].try_into().ok()?)?;
    let mid = digits8(t[8..16].try_into().ok()?)?;
    let lo = decimal(&t[16..])?;
    let sent_ns = hi
        .checked_mul(100_000_000_000)?
        .checked_add(mid * 1000 + lo)?;
    (sent_ns != 0).then_some(Trace { run, n, sent_ns })
}

/// Eight ASCII decimal digits as a number (`None` if one is not a digit).
fn digits8(b: [u8; 8]) -> Option<u64> {
    let x = u64::from_le_bytes(b).wrapping_sub(0x3030_3030_3030_3030);
    // Every byte a digit: no byte borrowed below '0' or above '9'.
    if (x | x.wrapping_add(0x7676_7676_7676_7676)) & 0x8080_8080_8080_8080 != 0 {
        return None;
    }
    let x = (x.wrapping_mul(10) + (x >> 8)) & 0x00ff_00ff_00ff_00ff;
    let x = (x.wrapping_mul(100) + (x >> 16)) & 0x0000_ffff_0000_ffff;
    Some((x.wrapping_mul(10_000) + (x >> 32)) & 0xffff_ffff)
}

/// Hex digit values by byte (either case), 0xff for the rest.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Sixteen hex digits (either case).
fn hex16(s: &[u8]) -> Option<u64> {
    let s: &[u8; 16] = s.try_into().ok()?;
    let mut r = 0u64;
    let mut bad = 0u8;
    for &b in s {
        let d = HEX_VALUE[usize::from(b)];
        bad |= d;
        r = (r << 4) | u64::from(d & 0x0f);
    }
    // A non-digit's 0xff sets the high bit; digits never do.
    (bad & 0x80 == 0).then_some(r)
}

/// The next field of `v` from `*i` (white space skipped), empty at the end.
fn field<'a>(v: &'a [u8], i: &mut usize) -> &'a [u8] {
    let ws = |b: u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    while *i < v.len() && ws(v[*i]) {
        *i += 1;
    }
    let start = *i;
    while *i < v.len() && !ws(v[*i]) {
        *i += 1;
    }
    &v[start..*i]
}

fn decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s.len() == 20 {
        // Only the largest numbers can overflow.
        let head = decimal(&s[..19])?;
        let d = s[19].wrapping_sub(b'0');
        return (d < 10)
            .then(|| head.checked_mul(10)?.checked_add(u64::from(d)))
            .flatten();
    }
    let mut v = 0u64;
    for &b in s {
        let d = b.wrapping_sub(b'0');
        if d >= 10 {
            return None;
        }
        v = v * 10 + u64::from(d);
    }
    Some(v)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    /// At the start of a header line.
    LineStart,
    /// A line that started with CR: the blank line if LF follows.
    BlankCr,
    /// Matching the field name; this many bytes of `name:` matched.
    Name(u8),
    /// Skipping the rest of a line (another field, or a continuation).
    Skip,
    /// Reading the trace value.
    Value,
    /// At the start of the line after the trace value: a folded
    /// continuation, or the end of the field.
    ValueLineStart,
    /// The header section ended, or a trace was found: nothing more to read.
    Done,
}

/// `x-smtpstorm-trace:` (the name lowercased, with its colon).
const NAME: &[u8] = b"x-smtpstorm-trace:";

/// Whether `s` starts with the field name and its colon (any case).
fn name_at(s: &[u8]) -> bool {
    // Two words compared with every byte ORed with 0x20: a letter matches
    // itself in either case and nothing else; `-` would also match CR, so
    // the two dashes and the colon are compared exactly.
    let word = |i: usize| s[i..i + 8].try_into().map(u64::from_le_bytes).unwrap_or(0);
    let a = word(0) | 0x2020_2020_2020_2020;
    let b = word(8) | 0x2020_2020_2020_2020;
    a == u64::from_le_bytes(*b"x-smtpst")
        && b == u64::from_le_bytes(*b"orm-trac")
        && s[16] | 0x20 == b'e'
        && s[1] == b'-'
        && s[11] == b'-'
        && s[17] == b':'
}

/// Streaming search for the trace header of one message at a time
/// (see the module doc); [`Scanner::finish`] resets it for the next.
#[derive(Clone, Debug)]
pub struct Scanner {
    st: St,
    value: [u8; MAX_VALUE],
    len: usize,
    overflow: bool,
    found: Option<Trace>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    pub fn new() -> Self {
        Scanner {
            st: St::LineStart,
            value: [0; MAX_VALUE],
            len: 0,
            overflow: false,
            found: None,
        }
    }

    /// Forget the previous message.
    pub fn reset(&mut self) {
        self.st = St::LineStart;
        self.len = 0;
        self.overflow = false;
        self.found = None;
    }

    /// True once the scanner reads no more of this message (the header
    /// section ended, or a trace was found).
    pub fn done(&self) -> bool {
        self.st == St::Done
    }

    /// Feed the next piece of the (un-stuffed) message.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            match self.st {
                St::Done => return,
                St::LineStart => {
                    // Fast path: the whole name is in this chunk.
                    if chunk.len() - i >= NAME.len() && b | 0x20 == b'x' {
                        if name_at(&chunk[i..]) {
                            i += NAME.len();
                            self.st = St::Value;
                            self.len = 0;
                            self.overflow = false;
                        } else {
                            self.st = St::Skip;
                        }
                        continue;
                    }
                    self.st = match b {
                        b'\r' => St::BlankCr,
                        b'\n' => St::Done,
                        b' ' | b'\t' => St::Skip,
                        _ if b.to_ascii_lowercase() == NAME[0] => St::Name(1),
                        _ => St::Skip,
                    };
                    i += 1;
                }
                St::BlankCr => {
                    // CR LF ends the section; CR then anything is a line
                    // to skip (the byte is looked at again there).
                    if b == b'\n' {
                        self.st = St::Done;
                        i += 1;
                    } else {
                        self.st = St::Skip;
                    }
                }
                St::Name(k) => {
                    let k = usize::from(k);
                    if b.to_ascii_lowercase() == NAME[k] {
                        i += 1;
                        if k + 1 == NAME.len() {
                            self.st = St::Value;
                            self.len = 0;
                            self.overflow = false;
                        } else {
                            self.st = St::Name(k as u8 + 1);
                        }
                    } else {
                        self.st = St::Skip;
                    }
                }
                St::Skip => match memchr::memchr(b'\n', &chunk[i..]) {
                    Some(j) => {
                        i += j + 1;
                        self.st = St::LineStart;
                    }
                    None => return,
                },
                St::Value => {
                    let rest = &chunk[i..];
                    let (piece, eol) = match memchr::memchr(b'\n', rest) {
                        Some(j) => (&rest[..j], true),
                        None => (rest, false),
                    };
                    // Fast path: the whole value and the byte after its line
                    // (not a fold) are in this chunk: parse it in place.
                    if eol
                        && self.len == 0
                        && piece.len() <= MAX_VALUE
                        && rest
                            .get(piece.len() + 1)
                            .is_some_and(|&c| c != b' ' && c != b'\t')
                    {
                        if let Some(t) = parse_value(piece) {
                            self.found = Some(t);
                            self.st = St::Done;
                            return;
                        }
                    }
                    self.push_value(piece);
                    i += piece.len();
                    if eol {
                        i += 1;
                        self.st = St::ValueLineStart;
                    }
                }
                St::ValueLineStart => {
                    if b == b' ' || b == b'\t' {
                        // Folded: the line break is white space.
                        self.push_value(b" ");
                        self.st = St::Value;
                        i += 1;
                    } else {
                        self.end_value();
                        if self.st != St::Done {
                            // Look at this byte again as a line start.
                            self.st = St::LineStart;
                        }
                    }
                }
            }
        }
    }

    fn push_value(&mut self, piece: &[u8]) {
        if self.overflow || self.len + piece.len() > MAX_VALUE {
            self.overflow = true;
            return;
        }
        self.value[self.len..self.len + piece.len()].copy_from_slice(piece);
        self.len += piece.len();
    }

    /// The trace field ended: a well-formed value ends the search.
    fn end_value(&mut self) {
        if !self.overflow {
            if let Some(t) = parse_value(&self.value[..self.len]) {
                self.found = Some(t);
                self.st = St::Done;
            }
        }
        self.len = 0;
        self.overflow = false;
    }

    /// The trace of the message fed since the last reset (`None`: untraced);
    /// resets.
    pub fn finish(&mut self) -> Option<Trace> {
        if matches!(self.st, St::Value | St::ValueLineStart) {
            // The message ended inside the header section, right after or
            // inside the trace field: a value cut short does not parse.
            self.end_value();
        }
        let found = self.found;
        self.reset();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: u64 = 0x0123_4567_89ab_cdef;

    fn stamped(n: u64, ns: u64) -> String {
        let (mut line, at) = header_line(RUN, n);
        line.replace_range(at..at + TIME_DIGITS, &format!("{ns:019}"));
        line
    }

    /// The scanner's result for `msg` fed in pieces of `step` bytes.
    fn scan(msg: &[u8], step: usize) -> Option<Trace> {
        let mut s = Scanner::new();
        for c in msg.chunks(step.max(1)) {
            s.feed(c);
        }
        s.finish()
    }

    fn every_split(msg: &[u8]) -> Option<Trace> {
        let whole = scan(msg, msg.len().max(1));
        for step in 1..12 {
            assert_eq!(scan(msg, step), whole, "step {step}");
        }
        whole
    }

    const WANT: Trace = Trace {
        run: RUN,
        n: 42,
        sent_ns: 1_795_368_985_123_456_789,
    };

    #[test]
    fn a_trace_is_found_after_prepended_received_lines_whatever_the_split() {
        let msg = format!(
            "Received: from x (localhost [127.0.0.1])\r\n\tby y with ESMTP id 1\r\nReceived: by z\r\n{}From: <a@b>\r\n\r\nbody\r\n",
            stamped(42, WANT.sent_ns)
        );
        assert_eq!(every_split(msg.as_bytes()), Some(WANT));
    }

    #[test]
    fn a_folded_trace_and_a_lowercase_name_are_found() {
        let msg = format!(
            "Subject: x\r\nx-smtpstorm-trace: {RUN:016x}\r\n 42\r\n\t{:019}\r\n\r\nbody\r\n",
            WANT.sent_ns
        );
        assert_eq!(every_split(msg.as_bytes()), Some(WANT));
        let lf_only = msg.replace("\r\n", "\n");
        assert_eq!(every_split(lf_only.as_bytes()), Some(WANT));
    }

    #[test]
    fn a_thousand_line_header_section_still_finds_the_trace() {
        let mut msg = String::new();
        for i in 0..1000 {
            msg.push_str(&format!("X-Filler-{i}: {}\r\n", "v".repeat(i % 70)));
        }
        msg.push_str(&stamped(42, WANT.sent_ns));
        msg.push_str("\r\nbody\r\n");
        assert_eq!(every_split(msg.as_bytes()), Some(WANT));
    }

    #[test]
    fn the_body_is_never_searched() {
        let msg = format!("Subject: x\r\n\r\n{}", stamped(42, WANT.sent_ns));
        assert_eq!(every_split(msg.as_bytes()), None);
        // Nor is a continuation line of another field.
        let msg = format!("Subject: x\r\n {}\r\n", stamped(42, WANT.sent_ns));
        assert_eq!(every_split(msg.as_bytes()), None);
    }

    #[test]
    fn malformed_truncated_and_foreign_traces_are_untraced() {
        let good = stamped(42, WANT.sent_ns);
        let bad = [
            // Unstamped (time zero), truncated, extra field, bad hex, short
            // run id, non-decimal number, long time, overlong value.
            stamped(42, 0),
            format!("{HEADER_NAME}: {RUN:016x} 42\r\n"),
            format!("{} extra\r\n", good.trim_end()),
            format!("{HEADER_NAME}: 0123456789abcdeg 42 {:019}\r\n", 5),
            format!("{HEADER_NAME}: 0123 42 {:019}\r\n", 5),
            format!("{HEADER_NAME}: {RUN:016x} 4x2 {:019}\r\n", 5),
            format!("{HEADER_NAME}: {RUN:016x} 42 {:020}\r\n", 5),
            format!(
                "{HEADER_NAME}: {RUN:016x} 42 {:019}{}\r\n",
                5,
                " ".repeat(200)
            ),
            format!("X-Smtpstorm-Tracer: {RUN:016x} 42 {:019}\r\n", 5),
            "X-Smtpstorm-Trace: garbage from another tool\r\n".to_string(),
        ];
        for b in &bad {
            let msg = format!("Subject: x\r\n{b}\r\nbody\r\n");
            assert_eq!(every_split(msg.as_bytes()), None, "{b:?}");
        }
        // A message cut inside the trace line.
        let cut = &good.as_bytes()[..good.len() - 6];
        assert_eq!(every_split(cut), None);
        // A malformed trace before a good one: the good one counts.
        let msg = format!("{}{good}\r\n", bad[1]);
        assert_eq!(every_split(msg.as_bytes()), Some(WANT));
    }

    #[test]
    fn a_message_without_a_blank_line_ending_on_the_trace_still_parses() {
        assert_eq!(
            every_split(stamped(42, WANT.sent_ns).as_bytes()),
            Some(WANT)
        );
    }

    #[test]
    fn the_fast_paths_agree_with_the_general_ones() {
        for v in [
            1u64,
            9,
            10,
            99_999_999,
            100_000_000,
            1_795_368_985_123_456_789,
            9_999_999_999_999_999_999,
        ] {
            let line = format!(" {RUN:016x} 77 {v:019}\r");
            let want = (v != 0).then_some(Trace {
                run: RUN,
                n: 77,
                sent_ns: v,
            });
            assert_eq!(parse_value(line.as_bytes()), want, "{line}");
            assert_eq!(parse_canonical(line.as_bytes()), want, "{line}");
        }
        for bad in ["/", ":", "a", " ", "\u{7f}"] {
            let t = format!("17953689{bad}5123456789");
            let t = &t[..19.min(t.len())];
            let line = format!(" {RUN:016x} 77 {t:0>19}");
            assert_eq!(parse_value(line.as_bytes()), None, "{line:?}");
        }
        for name in ["X-SMTPSTORM-TRACE:", "x-SmTpStOrM-tRaCe:"] {
            assert!(name_at(format!("{name} rest").as_bytes()), "{name}");
        }
        for name in [
            "x\rsmtpstorm-trace:",
            "x-smtpstorm\rtrace:",
            "x-smtpstorm-trace;",
            "x-smtpstorm-tracex",
            "y-smtpstorm-trace:",
        ] {
            assert!(!name_at(format!("{name} rest").as_bytes()), "{name:?}");
        }
    }

    #[test]
    fn the_run_id_round_trips_and_the_clock_is_monotonic_with_instants() {
        assert_eq!(parse_run_id(&run_id_hex(RUN)), Some(RUN));
        assert_eq!(parse_run_id("123"), None);
        let a = Instant::now();
        let b = a + std::time::Duration::from_millis(5);
        assert_eq!(unix_ns(b) - unix_ns(a), 5_000_000);
        assert!(unix_ns(a) > 1_700_000_000_000_000_000);
    }
}
