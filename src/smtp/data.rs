//! Streaming scanner for a DATA body: finds its end, unstuffs dots, counts
//! bytes and flags bare LF / bare CR / over-long lines, in place.
//!
//! Invariants:
//! - The body ends only at `CRLF.CRLF` (the DATA command's own CRLF counts as
//!   the first CRLF, so a scanner starts "at the start of a line"). Under
//!   [`BareLfPolicy::Accept`] a line that began after a bare LF may also end
//!   the body with `.LF` or `.CRLF` (`LF.LF`, `LF.CRLF`); under every other
//!   policy no smuggling sequence ends the body.
//! - The end is found across ANY chunk boundary: the only state carried
//!   between chunks is a small enum (`state`) and a few counters; the body is
//!   never copied. Body bytes are handed to the caller as sub-slices of the
//!   input chunk, or as short `'static` slices for a replaced byte (a bare
//!   LF/CR delivered as CRLF under `Normalize`, or a held `.`/CR that turned
//!   out to be content).
//! - Dot-unstuffing: a `.` at the start of a line (after CRLF; after a bare
//!   LF too under `Accept`) is removed unless it ends the body. A line
//!   holding only `.` followed by a bare LF or bare CR is content and keeps
//!   its dot.
//! - `scan` never panics on any input.
//!
//! Speed: inside a line the scanner jumps with `memchr2(b'\r', b'\n')`, and a
//! CRLF found by it is consumed in the same step, so an ordinary line costs
//! one `memchr2` call plus a handful of comparisons; nothing is emitted per
//! line (the body is emitted as one slice per chunk unless a dot or a bare
//! byte forces a cut).

use memchr::{memchr, memchr2, memrchr};

use super::{BareLfPolicy, MAX_TEXT_LINE};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Inside a line (or right after a bare LF/CR that does not start one).
    Mid,
    /// The previous byte was a CR (already emitted); is it a CRLF?
    Cr,
    /// At the start of a line; `bare` = the line began after a bare LF.
    Start { bare: bool },
    /// `.` at line start, held (not emitted).
    Dot { bare: bool },
    /// `.` CR at line start, both held.
    DotCr { bare: bool },
}

/// What one [`DataScanner::scan`] call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ScanOutcome {
    /// Bytes of the chunk consumed (all of it unless the end was found).
    pub consumed: usize,
    /// The terminating sequence was found and consumed.
    pub ended: bool,
}

/// Reusable streaming scanner for one DATA body at a time.
#[derive(Clone, Debug)]
pub struct DataScanner {
    policy: BareLfPolicy,
    state: State,
    /// Absolute wire offset (from the body start) where the current line began.
    line_start: u64,
    /// Wire bytes consumed so far (stuffing and terminator included).
    wire_bytes: u64,
    /// Body bytes emitted so far (unstuffed, normalised).
    body_bytes: u64,
    bare_lf: bool,
    bare_cr: bool,
    long_line: bool,
    /// Absolute offset before which the block fast path is not retried
    /// (it failed on a region that reaches there).
    fast_retry_at: u64,
}

/// Below this many bytes left in a chunk, the per-line path is used.
const FAST_MIN: usize = 256;

const CRLF: &[u8] = b"\r\n";
const LF: &[u8] = b"\n";
const CR: &[u8] = b"\r";
const DOT: &[u8] = b".";

#[inline(always)]
fn put<F: FnMut(&[u8])>(emit: &mut F, body: &mut u64, s: &[u8]) {
    if !s.is_empty() {
        *body += s.len() as u64;
        emit(s);
    }
}

impl DataScanner {
    /// A scanner positioned at the start of a body (right after `DATA` CRLF).
    pub fn new(policy: BareLfPolicy) -> Self {
        Self {
            policy,
            state: State::Start { bare: false },
            line_start: 0,
            wire_bytes: 0,
            body_bytes: 0,
            bare_lf: false,
            bare_cr: false,
            long_line: false,
            fast_retry_at: 0,
        }
    }

    /// Rearm for a new body, keeping nothing from the previous one.
    pub fn reset(&mut self, policy: BareLfPolicy) {
        *self = Self::new(policy);
    }

    /// Body bytes delivered so far (after unstuffing / normalising).
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }
    /// Wire bytes consumed so far, dot-stuffing and terminator included.
    pub fn wire_bytes(&self) -> u64 {
        self.wire_bytes
    }
    pub fn saw_bare_lf(&self) -> bool {
        self.bare_lf
    }
    pub fn saw_bare_cr(&self) -> bool {
        self.bare_cr
    }
    /// A line longer than [`MAX_TEXT_LINE`] (CRLF included) was seen.
    pub fn saw_long_line(&self) -> bool {
        self.long_line
    }

    #[inline(always)]
    fn end_line(&mut self, abs_after: u64) {
        if abs_after - self.line_start > MAX_TEXT_LINE as u64 {
            self.long_line = true;
        }
        self.line_start = abs_after;
    }

    /// Block fast path: from a position inside a line (previous byte not
    /// CR), skip whole 64-byte blocks of clean CRLF text, then back up to
    /// the last LF. Returns the bytes skipped (the caller is then at a line
    /// start), or None to let the per-line path run. One pass checks, for
    /// every adjacent pair, that "is CR" equals "next is LF" (no bare CR or
    /// LF) and that no LF is followed by `.` (no dot line to handle); line
    /// lengths are then checked with one `memrchr` per 1000 bytes.
    fn fast_skip(&mut self, rest: &[u8], abs0: u64) -> Option<usize> {
        if rest.first() == Some(&b'\n') {
            // A bare LF right here: the per-line path must take this byte.
            self.fast_retry_at = abs0 + 1;
            return None;
        }
        let n = rest.len();
        let mut k = 0usize;
        while k + 65 <= n {
            let (Ok(a), Ok(b)) =
                (<&[u8; 64]>::try_from(&rest[k..k + 64]), <&[u8; 64]>::try_from(&rest[k + 1..k + 65]))
            else {
                break;
            };
            let mut flags = 0u8;
            for j in 0..64 {
                flags |= u8::from((a[j] == b'\r') ^ (b[j] == b'\n'))
                    | u8::from((a[j] == b'\n') & (b[j] == b'.'));
            }
            if flags != 0 {
                break;
            }
            k += 64;
        }
        // Do not retry before the block that stopped us has been passed.
        self.fast_retry_at = abs0 + (k + 64).min(n) as u64;
        let end = memrchr(b'\n', &rest[..k])? + 1;
        let r = &rest[..end];
        let abs_end = abs0 + end as u64;
        let mut ls = self.line_start;
        while abs_end - ls > MAX_TEXT_LINE as u64 {
            // The line starting at `ls` must end (LF) before `limit`.
            let lo = (ls.max(abs0) - abs0) as usize;
            let limit = ls + MAX_TEXT_LINE as u64;
            let hi = if limit > abs0 { (limit - abs0) as usize } else { lo };
            ls = match memrchr(b'\n', &r[lo..hi]) {
                Some(k) => abs0 + (lo + k + 1) as u64,
                None => {
                    self.long_line = true;
                    abs0 + (hi + memchr(b'\n', &r[hi..]).unwrap_or(end - 1 - hi) + 1) as u64
                }
            };
        }
        self.line_start = abs_end;
        Some(end)
    }

    /// Scan `chunk`, handing body bytes to `emit` in order. Stops right after
    /// the terminator if it is found (the rest of the chunk is not consumed).
    #[inline]
    pub fn scan<F: FnMut(&[u8])>(&mut self, chunk: &[u8], mut emit: F) -> ScanOutcome {
        let base = self.wire_bytes;
        let normalize = self.policy == BareLfPolicy::Normalize;
        let accept = self.policy == BareLfPolicy::Accept;
        let mut body = 0u64;
        let mut i = 0usize;
        let mut from = 0usize;
        let len = chunk.len();
        let mut ended = false;
        while i < len {
            match self.state {
                State::Mid if len - i >= FAST_MIN && base + i as u64 >= self.fast_retry_at => {
                    // If declined, the per-line arm below takes over.
                    if let Some(n) = self.fast_skip(&chunk[i..], base + i as u64) {
                        i += n;
                        self.state = State::Start { bare: false };
                    }
                }
                State::Mid => match memchr2(b'\r', b'\n', &chunk[i..]) {
                    None => i = len,
                    Some(k) => {
                        let p = i + k;
                        if chunk[p] == b'\r' {
                            if p + 1 < len && chunk[p + 1] == b'\n' {
                                self.end_line(base + p as u64 + 2);
                                i = p + 2;
                                self.state = State::Start { bare: false };
                            } else {
                                i = p + 1;
                                self.state = State::Cr;
                            }
                        } else {
                            self.bare_lf = true;
                            self.end_line(base + p as u64 + 1);
                            if normalize {
                                put(&mut emit, &mut body, &chunk[from..p]);
                                put(&mut emit, &mut body, CRLF);
                                from = p + 1;
                            }
                            i = p + 1;
                            self.state = if accept { State::Start { bare: true } } else { State::Mid };
                        }
                    }
                },
                State::Cr => {
                    if chunk[i] == b'\n' {
                        self.end_line(base + i as u64 + 1);
                        i += 1;
                        self.state = State::Start { bare: false };
                    } else {
                        // Bare CR (the CR itself is already emitted).
                        self.bare_cr = true;
                        if normalize {
                            put(&mut emit, &mut body, &chunk[from..i]);
                            put(&mut emit, &mut body, LF);
                            from = i;
                        }
                        self.state = State::Mid;
                    }
                }
                State::Start { bare } => {
                    if chunk[i] == b'.' {
                        put(&mut emit, &mut body, &chunk[from..i]);
                        i += 1;
                        from = i;
                        self.state = State::Dot { bare };
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot { bare } => match chunk[i] {
                    b'\r' => {
                        i += 1;
                        from = i;
                        self.state = State::DotCr { bare };
                    }
                    b'\n' => {
                        i += 1;
                        if accept && bare {
                            // LF.LF ends the body under Accept.
                            ended = true;
                            from = i;
                            break;
                        }
                        // "." then a bare LF: content, the dot is kept.
                        self.bare_lf = true;
                        self.end_line(base + i as u64);
                        put(&mut emit, &mut body, DOT);
                        put(&mut emit, &mut body, if normalize { CRLF } else { LF });
                        from = i;
                        self.state = if accept { State::Start { bare: true } } else { State::Mid };
                    }
                    // A stuffed dot: dropped (already skipped by `from`).
                    _ => self.state = State::Mid,
                },
                State::DotCr { .. } => {
                    if chunk[i] == b'\n' {
                        // CRLF.CRLF (or LF.CRLF under Accept, where `bare`
                        // lines exist at all).
                        i += 1;
                        from = i;
                        ended = true;
                        break;
                    }
                    // "." then a bare CR: content.
                    self.bare_cr = true;
                    put(&mut emit, &mut body, DOT);
                    put(&mut emit, &mut body, if normalize { CRLF } else { CR });
                    from = i;
                    self.state = State::Mid;
                }
            }
        }
        if !ended {
            put(&mut emit, &mut body, &chunk[from..i]);
        }
        self.wire_bytes += i as u64;
        self.body_bytes += body;
        ScanOutcome { consumed: i, ended }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: BareLfPolicy, input: &[u8]) -> (Vec<u8>, ScanOutcome, DataScanner) {
        let mut s = DataScanner::new(policy);
        let mut body = Vec::new();
        let o = s.scan(input, |c| body.extend_from_slice(c));
        (body, o, s)
    }

    #[test]
    fn dot_crlf_right_away_ends_an_empty_body() {
        let (b, o, _) = run(BareLfPolicy::Reject, b".\r\nQUIT\r\n");
        assert!(o.ended);
        assert_eq!(o.consumed, 3);
        assert!(b.is_empty());
    }

    #[test]
    fn stuffed_dots_are_removed() {
        let (b, o, s) = run(BareLfPolicy::Reject, b"..a\r\n.b\r\nc.\r\n.\r\n");
        assert!(o.ended);
        assert_eq!(b, b".a\r\nb\r\nc.\r\n");
        assert_eq!(s.body_bytes(), b.len() as u64);
    }

    #[test]
    fn every_split_gives_the_same_body() {
        let input: &[u8] = b"a\r\n..b\r\n\r\n.\rx\n.\nq\r\n.\r\nrest";
        for policy in [BareLfPolicy::Reject, BareLfPolicy::Normalize, BareLfPolicy::Accept] {
            let (whole, wo, ws) = run(policy, input);
            for cut in 0..=input.len() {
                let mut s = DataScanner::new(policy);
                let mut body = Vec::new();
                let o1 = s.scan(&input[..cut], |c| body.extend_from_slice(c));
                let total = if o1.ended {
                    o1.consumed
                } else {
                    let o2 = s.scan(&input[cut..], |c| body.extend_from_slice(c));
                    assert_eq!(o2.ended, wo.ended);
                    cut + o2.consumed
                };
                assert_eq!(total, wo.consumed, "{policy:?} cut {cut}");
                assert_eq!(body, whole, "{policy:?} cut {cut}");
                assert_eq!(s.saw_bare_lf(), ws.saw_bare_lf());
                assert_eq!(s.saw_bare_cr(), ws.saw_bare_cr());
            }
        }
    }

    #[test]
    fn long_lines_are_flagged() {
        let mut input = vec![b'x'; 1000];
        input.extend_from_slice(b"\r\n.\r\n");
        let (_, o, s) = run(BareLfPolicy::Reject, &input);
        assert!(o.ended);
        assert!(s.saw_long_line());
        let mut input = vec![b'x'; 998];
        input.extend_from_slice(b"\r\n.\r\n");
        let (_, _, s) = run(BareLfPolicy::Reject, &input);
        assert!(!s.saw_long_line());
    }

    /// Bodies long enough for the block fast path, with defects at various
    /// places, scanned whole and split: same body, same flags as a
    /// byte-at-a-time scan (which never takes the fast path).
    #[test]
    fn fast_path_agrees_with_the_per_line_path() {
        let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod t\r\n";
        let mut base = Vec::new();
        for k in 0..40 {
            if k % 9 == 4 {
                base.extend_from_slice(b"..stuffed\r\n");
            }
            base.extend_from_slice(line);
        }
        let mut cases: Vec<Vec<u8>> = vec![base.clone()];
        for (at, ins) in [(300usize, &b"\n"[..]), (76, b"\n\n"), (150, b"x\n"), (1500, b"\r"), (2000, b"\n.\n"), (777, &[b'x'; 1100][..]), (5, b"\r\r\n")] {
            let mut v = base.clone();
            v.splice(at..at, ins.iter().copied());
            cases.push(v);
        }
        let mut long_first = vec![b'y'; 1500];
        long_first.extend_from_slice(&base);
        cases.push(long_first);
        for mut c in cases {
            c.extend_from_slice(b"\r\n.\r\n");
            for policy in [BareLfPolicy::Reject, BareLfPolicy::Normalize, BareLfPolicy::Accept] {
                let reference = {
                    let mut s = DataScanner::new(policy);
                    let mut body = Vec::new();
                    let mut used = 0;
                    for b in c.chunks(1) {
                        let o = s.scan(b, |x| body.extend_from_slice(x));
                        used += o.consumed;
                        if o.ended {
                            break;
                        }
                    }
                    (body, used, s.saw_bare_lf(), s.saw_bare_cr(), s.saw_long_line())
                };
                for cut in (0..c.len()).step_by(97).chain([c.len()]) {
                    let mut s = DataScanner::new(policy);
                    let mut body = Vec::new();
                    let o1 = s.scan(&c[..cut], |x| body.extend_from_slice(x));
                    let used = if o1.ended { o1.consumed } else { cut + s.scan(&c[cut..], |x| body.extend_from_slice(x)).consumed };
                    let got = (body, used, s.saw_bare_lf(), s.saw_bare_cr(), s.saw_long_line());
                    assert_eq!(got, reference, "{policy:?} cut {cut}");
                }
            }
        }
    }

    #[test]
    fn normalize_turns_bare_lf_and_cr_into_crlf() {
        let (b, o, s) = run(BareLfPolicy::Normalize, b"a\nb\rc\r\n.\r\n");
        assert!(o.ended);
        assert_eq!(b, b"a\r\nb\r\nc\r\n");
        assert!(s.saw_bare_lf() && s.saw_bare_cr());
    }
}
