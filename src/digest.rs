//! End-to-end integrity: the digest header the blaster writes into every
//! message and the streaming check the sink runs with `--verify`.
//!
//! The blaster's message is `header ++ body`, where `header` is a block of
//! header lines ending with the empty line (`CRLF CRLF`), and `body` ends
//! with CRLF. One header line, `X-Smtpstorm-Digest: sha256=<64 hex>`, carries
//! the SHA-256 of `body`. The sink receives the message un-stuffed, in pieces
//! split anywhere; [`Verifier`] reads the header block line by line (bounded:
//! a header line longer than [`MAX_HEADER_LINE`] is skipped, not buffered),
//! then hashes every byte after the empty line. The line buffer is reused;
//! the one allocation per message is the hash state aws-lc keeps on the heap
//! (about 100 bytes), made where the body starts and only when the header
//! block had a digest to check.
//!
//! SHA-256 is aws-lc's (through `aws-lc-rs`, the library rustls already
//! links), not a second implementation.

use aws_lc_rs::digest::{self as sha, Context, SHA256};

/// The header field name (compared case-insensitively).
pub const HEADER_NAME: &str = "X-Smtpstorm-Digest";
/// Longest header line the verifier looks at; longer ones are skipped.
pub const MAX_HEADER_LINE: usize = 998;

/// SHA-256 of `body`.
pub fn body_digest(body: &[u8]) -> [u8; 32] {
    sha_bytes(sha::digest(&SHA256, body))
}

/// The 32 bytes of a SHA-256 result.
fn sha_bytes(d: sha::Digest) -> [u8; 32] {
    d.as_ref().try_into().expect("SHA-256 digests are 32 bytes")
}

/// `X-Smtpstorm-Digest: sha256=<hex>\r\n` for `body`.
pub fn header_line(body: &[u8]) -> String {
    let d = body_digest(body);
    let mut s = String::with_capacity(HEADER_NAME.len() + 2 + 7 + 64 + 2);
    s.push_str(HEADER_NAME);
    s.push_str(": sha256=");
    for b in d {
        s.push(char::from(HEX[(b >> 4) as usize]));
        s.push(char::from(HEX[(b & 15) as usize]));
    }
    s.push_str("\r\n");
    s
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// What [`Verifier::finish`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The body hashes to the digest in the header.
    Ok,
    /// A digest header was present and the body does not match it.
    Corrupt,
    /// No (well-formed) digest header: the message was not sent by smtpstorm.
    Missing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// Inside the header block, at the start of or within a line.
    Headers,
    /// Inside an over-long header line being skipped to its LF.
    SkipLine,
    /// After the empty line: hashing.
    Body,
}

/// Streaming verifier for one message at a time; `reset` reuses it.
pub struct Verifier {
    part: Part,
    line: Vec<u8>,
    expected: Option<[u8; 32]>,
    /// The body's hash, from the empty line on, if there is a digest to check.
    hasher: Option<Context>,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    pub fn new() -> Self {
        Verifier {
            part: Part::Headers,
            line: Vec::with_capacity(128),
            expected: None,
            hasher: None,
        }
    }

    /// Forget the previous message.
    pub fn reset(&mut self) {
        self.part = Part::Headers;
        self.line.clear();
        self.expected = None;
        self.hasher = None;
    }

    /// Feed the next piece of the (un-stuffed) message.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            match self.part {
                Part::Body => {
                    if let Some(h) = &mut self.hasher {
                        h.update(chunk);
                    }
                    return;
                }
                Part::SkipLine => match memchr::memchr(b'\n', chunk) {
                    Some(i) => {
                        chunk = &chunk[i + 1..];
                        self.part = Part::Headers;
                    }
                    None => return,
                },
                Part::Headers => {
                    let (piece, rest, complete) = match memchr::memchr(b'\n', chunk) {
                        Some(i) => (&chunk[..=i], &chunk[i + 1..], true),
                        None => (chunk, &chunk[chunk.len()..], false),
                    };
                    chunk = rest;
                    if self.line.len() + piece.len() > MAX_HEADER_LINE + 2 {
                        self.line.clear();
                        self.part = if complete {
                            Part::Headers
                        } else {
                            Part::SkipLine
                        };
                        continue;
                    }
                    self.line.extend_from_slice(piece);
                    if complete {
                        self.end_of_header_line();
                    }
                }
            }
        }
    }

    fn end_of_header_line(&mut self) {
        let line = trim_eol(&self.line);
        if line.is_empty() {
            self.part = Part::Body;
            if self.expected.is_some() {
                self.hasher = Some(Context::new(&SHA256));
            }
        } else if let Some(d) = parse_digest_line(line) {
            self.expected = Some(d);
        }
        self.line.clear();
    }

    /// The verdict for the message fed since the last reset; resets.
    pub fn finish(&mut self) -> Verdict {
        let verdict = match (self.part, self.expected) {
            (Part::Body, Some(exp)) => {
                let got = self.hasher.take().map(|h| sha_bytes(h.finish()));
                if got == Some(exp) {
                    Verdict::Ok
                } else {
                    Verdict::Corrupt
                }
            }
            // A digest header but no body separator: the message was cut.
            (_, Some(_)) => Verdict::Corrupt,
            (_, None) => Verdict::Missing,
        };
        self.reset();
        verdict
    }
}

fn trim_eol(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

fn parse_digest_line(line: &[u8]) -> Option<[u8; 32]> {
    let colon = memchr::memchr(b':', line)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if !name.eq_ignore_ascii_case(HEADER_NAME.as_bytes()) {
        return None;
    }
    let value = value.trim_ascii();
    let hex = value.strip_prefix(b"sha256=")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = (unhex(pair[0])? << 4) | unhex(pair[1])?;
    }
    Some(out)
}

fn unhex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &[u8]) -> Vec<u8> {
        let mut m = b"From: a@b.test\r\nSubject: t\r\n".to_vec();
        m.extend_from_slice(header_line(body).as_bytes());
        m.extend_from_slice(b"\r\n");
        m.extend_from_slice(body);
        m
    }

    fn verify_split(m: &[u8], split: usize) -> Verdict {
        let mut v = Verifier::new();
        v.feed(&m[..split]);
        v.feed(&m[split..]);
        v.finish()
    }

    #[test]
    fn digests_are_sha256_in_lower_case_hex() {
        // FIPS 180-2 test vectors: the header is a contract with older sinks
        // and blasters, so its value must never change.
        assert_eq!(
            header_line(b"abc"),
            "X-Smtpstorm-Digest: sha256=\
             ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\r\n"
        );
        assert_eq!(
            header_line(b""),
            "X-Smtpstorm-Digest: sha256=\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\r\n"
        );
        let million_a = vec![b'a'; 1_000_000];
        let mut v = Verifier::new();
        v.feed(
            b"X-Smtpstorm-Digest: sha256=\
                 cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0\r\n\r\n",
        );
        for piece in million_a.chunks(4093) {
            v.feed(piece);
        }
        assert_eq!(v.finish(), Verdict::Ok);
        assert_eq!(body_digest(&million_a)[..4], [0xcd, 0xc7, 0x6e, 0x5c]);
    }

    #[test]
    fn an_empty_body_verifies() {
        assert_eq!(verify_split(&message(b""), 0), Verdict::Ok);
    }

    #[test]
    fn intact_message_verifies_at_every_split() {
        let m = message(b"hello\r\nworld\r\n");
        for i in 0..=m.len() {
            assert_eq!(verify_split(&m, i), Verdict::Ok, "split at {i}");
        }
        let mut v = Verifier::new();
        for b in &m {
            v.feed(std::slice::from_ref(b));
        }
        assert_eq!(v.finish(), Verdict::Ok);
    }

    #[test]
    fn one_flipped_body_byte_is_corrupt() {
        let mut m = message(b"hello\r\nworld\r\n");
        let n = m.len();
        m[n - 3] ^= 1;
        assert_eq!(verify_split(&m, 5), Verdict::Corrupt);
    }

    #[test]
    fn message_without_digest_is_missing() {
        assert_eq!(
            verify_split(b"Subject: x\r\n\r\nbody\r\n", 3),
            Verdict::Missing
        );
    }

    #[test]
    fn cut_message_is_corrupt() {
        let m = message(b"body\r\n");
        let hdr_end = m.len() - b"\r\nbody\r\n".len();
        assert_eq!(verify_split(&m[..hdr_end], 1), Verdict::Corrupt);
    }

    #[test]
    fn overlong_header_line_is_skipped_not_buffered() {
        let mut m = b"X-Long: ".to_vec();
        m.extend(std::iter::repeat_n(b'a', 5000));
        m.extend_from_slice(b"\r\n");
        m.extend_from_slice(&message(b"x\r\n"));
        let mut v = Verifier::new();
        for c in m.chunks(7) {
            v.feed(c);
            assert!(v.line.len() <= MAX_HEADER_LINE + 2);
        }
        assert_eq!(v.finish(), Verdict::Ok);
    }

    #[test]
    fn verifier_is_reusable() {
        let mut v = Verifier::new();
        v.feed(&message(b"a\r\n"));
        assert_eq!(v.finish(), Verdict::Ok);
        v.feed(&message(b"b\r\n"));
        assert_eq!(v.finish(), Verdict::Ok);
    }
}
