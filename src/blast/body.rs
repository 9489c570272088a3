//! Message bodies as the blaster sends them: generated text of an exact
//! size, a `--body` file or a `--data` message, each built once into a
//! [`Body`] (as is for BDAT, dot-stuffed for DATA, with its digest line),
//! and the [`Rng`] every generated choice comes from.
//!
//! Invariants: a generated body is exactly the size asked (at least CRLF),
//! 78-column lines ending CRLF, every 7th starting with `.` so dot-stuffing
//! is exercised, and deterministic in its seed; text read from a file gets
//! CRLF line ends ([`normalize_crlf`]) before it becomes a body.

use std::sync::Arc;

/// The crate's PRNG, seeded the way message generation always was.
#[derive(Clone, Debug)]
pub struct Rng(crate::rng::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(crate::rng::SplitMix64::new(seed ^ 0x9E37_79B9_7F4A_7C15))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0.range(lo, hi)
    }
}

/// Characters of one body line, CRLF excluded.
pub const BODY_LINE_CHARS: usize = 78;
/// Every this many lines of a body, a line starts with `.`.
const DOT_LINE_EVERY: usize = 7;

/// A body of exactly `len` bytes (at least 2: `CRLF`) of 78-column lines
/// ending CRLF; every 7th line starts with `.`. Deterministic in `seed`.
pub fn make_body(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0; len.max(2)];
    fill_body(&mut out, seed);
    out
}

/// The body of [`make_body`] (`out.len()` bytes) written into `out`, so a
/// large body can be built where it stays (no copy of it is ever made).
pub fn fill_body(out: &mut [u8], seed: u64) {
    const WORDS: [&str; 16] = [
        "storm",
        "mail",
        "relay",
        "queue",
        "latency",
        "honest",
        "sink",
        "blast",
        "envelope",
        "header",
        "body",
        "thread",
        "core",
        "socket",
        "message",
        "percentile",
    ];
    let len = out.len();
    let mut rng = Rng::new(seed ^ len as u64);
    let mut at = 0usize;
    let mut put = |at: &mut usize, b: &[u8]| {
        out[*at..*at + b.len()].copy_from_slice(b);
        *at += b.len();
    };
    let mut line_no = 0usize;
    while at < len {
        let left = len - at;
        // A line of up to 78 characters plus CRLF; the last one takes what is
        // left (never leaving a lone byte that cannot hold CRLF).
        let take = if left <= BODY_LINE_CHARS + 2 {
            left
        } else if left - (BODY_LINE_CHARS + 2) < 2 {
            left - 2
        } else {
            BODY_LINE_CHARS + 2
        };
        let chars = take.saturating_sub(2);
        let start = at;
        if line_no % DOT_LINE_EVERY == DOT_LINE_EVERY - 1 && chars > 0 {
            put(&mut at, b".");
        }
        while at - start < chars {
            let w = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize].as_bytes();
            let room = chars - (at - start);
            put(&mut at, &w[..w.len().min(room)]);
            if at - start < chars {
                put(&mut at, b" ");
            }
        }
        let end = (len - at).min(2);
        put(&mut at, &b"\r\n"[..end]);
        line_no += 1;
    }
}

/// Bodies up to this size also keep their DATA form, stuffed once; larger
/// ones are held once and stuffed in place as they go out (see
/// `smtp::client::STUFF_IN_PLACE_BYTES`), so sending a 50 MB message takes
/// about 50 MB.
pub const PRE_STUFF_MAX_BYTES: usize = crate::smtp::client::STUFF_IN_PLACE_BYTES - 1;

/// A body built once and shared by every message of its size.
#[derive(Debug)]
pub struct Body {
    /// The body as the recipient gets it (and BDAT sends it).
    pub raw: Arc<[u8]>,
    /// The DATA form: `raw` dot-stuffed, with the final `.CRLF`; `None`
    /// above [`PRE_STUFF_MAX_BYTES`] (the session stuffs it in place).
    pub data: Option<Arc<[u8]>>,
    /// `X-Smtpstorm-Digest: sha256=…CRLF`: of `raw` for a generated body;
    /// for a `--data` message (with `--verify`) of the part after its
    /// header block, sent on top of it; empty for `--body`.
    pub digest_line: String,
}

impl Body {
    /// A generated body of `len` bytes, its digest and its DATA form.
    pub fn generated(len: usize, seed: u64) -> Arc<Body> {
        // Allocated once where it stays (a Vec turned into an Arc would
        // be copied: two bodies at the peak).
        let mut raw: Arc<[u8]> = std::iter::repeat_n(0u8, len.max(2)).collect();
        if let Some(buf) = Arc::get_mut(&mut raw) {
            fill_body(buf, seed);
        }
        let digest_line = crate::digest::header_line(&raw);
        Arc::new(Body {
            data: stuffed(&raw),
            raw,
            digest_line,
        })
    }

    /// A `--body` file (already CRLF-normalized), sent as it is.
    pub fn file(raw: Arc<[u8]>) -> Arc<Body> {
        Self::with_digest_line(raw, String::new())
    }

    /// A whole message (already CRLF-normalized) and the digest line sent
    /// on top of it (empty: none), e.g. one of `--data`.
    pub fn with_digest_line(raw: Arc<[u8]>, digest_line: String) -> Arc<Body> {
        Arc::new(Body {
            data: stuffed(&raw),
            raw,
            digest_line,
        })
    }
}

fn stuffed(raw: &[u8]) -> Option<Arc<[u8]>> {
    if raw.len() > PRE_STUFF_MAX_BYTES {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 64 + 8);
    crate::smtp::client::dot_stuff(&mut out, &[raw]);
    Some(Arc::from(out))
}

/// `input` with every line end made CRLF: a lone LF and a lone CR each
/// become CRLF (CRLF stays as is), and a missing final CRLF is added.
pub fn normalize_crlf(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + input.len() / 40 + 2);
    let mut rest = input;
    while let Some(i) = memchr::memchr2(b'\r', b'\n', rest) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(b"\r\n");
        let crlf = rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n');
        rest = &rest[i + 1 + usize::from(crlf)..];
    }
    out.extend_from_slice(rest);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}
