//! Fuzzing the DATA scanner (`smtp::data::DataScanner`). The first input
//! byte selects the bare-LF policy, the next four seed the chunking, the
//! rest is a body as it comes after `DATA` CRLF.
//!
//! Invariants: the result (where the body ends, the body bytes, the bare
//! LF / bare CR / long-line flags, the byte counters) is the same whether
//! the bytes come whole, in random chunks or one at a time, also for a body
//! that has not ended yet; `body_bytes()` counts the bytes handed out and
//! `wire_bytes()` the bytes consumed. Against a plain reference model:
//! under `reject` and `normalize` the body ends at the first CRLF.CRLF (the
//! DATA line's CRLF counting as the first CRLF) and nowhere else, the body
//! is the input up to it, dot-unstuffed (a `.` opening a CRLF-delimited
//! line is dropped unless a bare CR or LF follows it), with bare LF and CR
//! made CRLF under `normalize`; the flags say whether the body had a bare
//! LF, a bare CR, or a line (LF-delimited) over 1000 bytes. Under `accept`
//! the body ends at the first CRLF.CRLF, or earlier only at LF.LF or
//! LF.CRLF after a bare LF.

use smtpstorm::smtp::data::DataScanner;
use smtpstorm::smtp::{BareLfPolicy, MAX_TEXT_LINE};

use super::Rng;

/// Everything a scan produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan {
    pub body: Vec<u8>,
    pub consumed: usize,
    pub ended: bool,
    pub bare_lf: bool,
    pub bare_cr: bool,
    pub long_line: bool,
}

/// Scans `input` fed in chunks of the given sizes (the rest whole), up to
/// the end of the body.
pub fn scan(policy: BareLfPolicy, input: &[u8], sizes: &[usize]) -> Scan {
    let mut s = DataScanner::new(policy);
    let mut body = Vec::new();
    let mut consumed = 0;
    let mut ended = false;
    let mut pos = 0;
    let mut sizes = sizes.iter();
    while pos < input.len() && !ended {
        let n = sizes
            .next()
            .copied()
            .unwrap_or(input.len() - pos)
            .min(input.len() - pos);
        let o = s.scan(&input[pos..pos + n], |c| {
            assert!(!c.is_empty(), "an empty slice handed out");
            body.extend_from_slice(c)
        });
        assert!(o.consumed <= n);
        assert!(o.ended || o.consumed == n, "stopped early without an end");
        consumed += o.consumed;
        ended = o.ended;
        pos += n;
    }
    assert_eq!(
        s.body_bytes(),
        body.len() as u64,
        "body_bytes() counts what was handed out"
    );
    assert_eq!(
        s.wire_bytes(),
        consumed as u64,
        "wire_bytes() counts what was consumed"
    );
    Scan {
        body,
        consumed,
        ended,
        bare_lf: s.saw_bare_lf(),
        bare_cr: s.saw_bare_cr(),
        long_line: s.saw_long_line(),
    }
}

/// Where the first CRLF.CRLF ends, the DATA line's CRLF counting as the first.
fn first_crlf_dot_crlf(input: &[u8]) -> Option<usize> {
    let mut v = b"\r\n".to_vec();
    v.extend_from_slice(input);
    v.windows(5).position(|w| w == b"\r\n.\r\n").map(|i| i + 3)
}

/// Reference model of `reject` / `normalize` on a body that ends at `end`.
fn model(policy: BareLfPolicy, input: &[u8], end: usize) -> Scan {
    let wire = &input[..end - 3]; // without the final ".\r\n"
    let mut body = Vec::new();
    let mut line_start = true;
    for (i, &b) in wire.iter().enumerate() {
        let stuffed = line_start && b == b'.' && !matches!(wire.get(i + 1), Some(b'\r' | b'\n'));
        if !stuffed {
            body.push(b);
        }
        line_start = b == b'\n' && i > 0 && wire[i - 1] == b'\r';
    }
    if policy == BareLfPolicy::Normalize {
        let mut n = Vec::with_capacity(body.len());
        for (i, &b) in body.iter().enumerate() {
            match b {
                b'\n' if i == 0 || body[i - 1] != b'\r' => n.extend_from_slice(b"\r\n"),
                b'\r' if body.get(i + 1) != Some(&b'\n') => n.extend_from_slice(b"\r\n"),
                _ => n.push(b),
            }
        }
        body = n;
    }
    let seen = &input[..end];
    let bare_lf = seen
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || seen[i - 1] != b'\r'));
    let bare_cr = seen
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\r' && seen.get(i + 1) != Some(&b'\n'));
    let long_line = seen
        .split_inclusive(|&b| b == b'\n')
        .any(|l| l.ends_with(b"\n") && l.len() > MAX_TEXT_LINE);
    Scan {
        body,
        consumed: end,
        ended: true,
        bare_lf,
        bare_cr,
        long_line,
    }
}

/// True if `input[..end]` may end a body under `accept` earlier than the
/// first CRLF.CRLF: LF.LF or LF.CRLF after a bare LF.
fn accept_may_end_at(input: &[u8], end: usize) -> bool {
    let seen = &input[..end];
    let lf_before =
        |dot: usize| dot >= 1 && seen[dot - 1] == b'\n' && (dot < 2 || seen[dot - 2] != b'\r');
    (seen.ends_with(b".\n") && lf_before(end - 2))
        || (seen.ends_with(b".\r\n") && lf_before(end - 3))
}

pub fn policy_of(sel: u8) -> BareLfPolicy {
    match sel % 3 {
        0 => BareLfPolicy::Reject,
        1 => BareLfPolicy::Normalize,
        _ => BareLfPolicy::Accept,
    }
}

/// One fuzz case (see the module doc).
pub fn check(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let policy = policy_of(data[0]);
    let mut rng = Rng(u64::from(u32::from_le_bytes([
        data[1], data[2], data[3], data[4],
    ])));
    let raw = &data[5..];
    let mut ended = raw.to_vec();
    ended.extend_from_slice(b"\r\n.\r\n");
    for input in [raw, &ended[..]] {
        let whole = scan(policy, input, &[]);
        // Small chunks, and chunks big enough for the block fast path.
        let max = if rng.below(2) == 0 { 16 } else { 700 };
        let sizes = rng.chunks(input.len(), max);
        assert_eq!(
            scan(policy, input, &sizes),
            whole,
            "{policy:?}: chunks {sizes:?} changed the result"
        );
        let ones = vec![1; input.len()];
        assert_eq!(
            scan(policy, input, &ones),
            whole,
            "{policy:?}: one byte at a time changed the result"
        );
    }
    let got = scan(policy, &ended, &[]);
    assert!(
        got.ended,
        "{policy:?}: no end though the input ends in CRLF.CRLF"
    );
    let first = first_crlf_dot_crlf(&ended).unwrap();
    match policy {
        BareLfPolicy::Accept => {
            assert!(
                got.consumed <= first,
                "accept: ended past the first CRLF.CRLF"
            );
            assert!(
                got.consumed == first || accept_may_end_at(&ended, got.consumed),
                "accept: ended after {:?}",
                String::from_utf8_lossy(&ended[got.consumed.saturating_sub(8)..got.consumed])
            );
        }
        _ => assert_eq!(
            got,
            model(policy, &ended, first),
            "{policy:?}: differs from the reference model"
        ),
    }
}

/// Tokens the stable run builds bodies from.
pub const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\r\r\n",
    b"\r\n..\r\n",
    b"\r\n.x",
    b"Subject: s\r\n\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod t\r\n",
];

/// A stable-run input: policy and seed bytes, then a body built from
/// tokens and long runs, or noise.
pub fn generate(rng: &mut Rng) -> Vec<u8> {
    let mut input: Vec<u8> = (0..5).map(|_| rng.byte()).collect();
    match rng.below(6) {
        0 => {
            let n = rng.index(2000);
            input.extend((0..n).map(|_| [b'a', b'.', b'\r', b'\n', rng.byte()][rng.index(5)]));
        }
        _ => {
            for _ in 0..rng.below(40) {
                if rng.below(10) == 0 {
                    let n = rng.index(1200);
                    input.extend(std::iter::repeat_n(b'x', n));
                } else {
                    input.extend_from_slice(TOKENS[rng.index(TOKENS.len())]);
                }
            }
            super::mutate(rng, &mut input, TOKENS, 5);
        }
    }
    input
}
