//! `blast --data PATH`: real messages as the load, loaded once before the
//! run.
//!
//! PATH is one `.eml` file, a directory of them (every `*.eml`, in name
//! order, not recursive), or an mbox (a file whose first line starts with
//! `From `: messages split at each `From ` line, mboxrd quoting undone, so
//! `>From ` in a body becomes `From ` again and `>>From ` becomes `>From `).
//! Each message is CRLF-normalized (a lone LF and a lone CR each become
//! CRLF, so an old-Mac CR-only file reads as lines, a missing final CRLF is
//! added: no bare CR or LF is ever sent), then built once into a [`Body`]: as is for BDAT, and
//! dot-stuffed once with its final `.CRLF` for DATA. With `--verify` each
//! message gets an `X-Smtpstorm-Digest` header line on top, the SHA-256 of
//! what the sink's verifier hashes: every byte after the message's header
//! block (after its first empty line).
//!
//! Message `n` of the run (the global `{n}`, unique across threads and
//! instances) is message `n mod len` of the corpus (`--data-order
//! round-robin`), or that position of a permutation of the corpus drawn anew
//! for every pass from `--seed` and the pass number (`shuffle`): every
//! message goes out once per pass either way, and the same seed sends the
//! same sequence.
//!
//! Invariants: nothing is read, normalized, stuffed or hashed per message
//! sent: [`Corpus::pick`] returns a shared body. Bad input (a missing path,
//! an empty directory or file, an empty `.eml` inside a directory, a
//! message without a header/body separator under `--verify`) is one clear
//! error before the run, naming the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use super::body::{normalize_crlf, Body, Rng};

/// Errors of loading `--data`.
#[derive(Debug, Error)]
pub enum CorpusError {
    #[error("cannot read --data {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "--data {0}: no message in it (a directory needs *.eml files; a file must not be empty)"
    )]
    Empty(String),
    #[error("--data {0}: empty file (0 bytes): an .eml must hold a message")]
    EmptyFile(String),
    #[error("--data {path}: message {index} has no empty line between its header and body; --verify needs one to place the digest")]
    NoSeparator { path: String, index: usize },
}

/// How messages are taken from the corpus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DataOrder {
    /// Message `n` is corpus message `n mod len`.
    #[default]
    RoundRobin,
    /// A new permutation of the corpus for every pass (from `--seed`).
    Shuffle,
}

/// The loaded messages, shared by every thread.
#[derive(Debug)]
pub struct Corpus {
    /// One body per message: `raw` as sent by BDAT, `data` stuffed for
    /// DATA, `digest_line` (empty without `--verify`) sent on top.
    pub messages: Vec<Arc<Body>>,
    pub order: DataOrder,
    pub seed: u64,
    /// Where the messages came from (for the report's config).
    pub path: PathBuf,
}

/// Splits an mbox into its messages: a message starts at each line that
/// begins with `From ` (the line itself is the envelope, not sent); lines
/// `>From `, `>>From `, ... lose one `>`.
pub fn split_mbox(text: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut cur: Option<Vec<u8>> = None;
    for line in text.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b"From ") {
            if let Some(m) = cur.take() {
                out.push(m);
            }
            cur = Some(Vec::new());
            continue;
        }
        let Some(m) = cur.as_mut() else {
            continue;
        };
        let quoted = line.iter().take_while(|&&b| b == b'>').count();
        if quoted > 0 && line[quoted..].starts_with(b"From ") {
            m.extend_from_slice(&line[1..]);
        } else {
            m.extend_from_slice(line);
        }
    }
    out.extend(cur);
    // mbox writers end each message with an empty separator line.
    for m in &mut out {
        if m.ends_with(b"\r\n\r\n") {
            m.truncate(m.len() - 2);
        } else if m.ends_with(b"\n\n") {
            m.pop();
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

/// The part of `msg` after its header block (after the first empty line),
/// or `None` without one.
pub fn body_after_header(msg: &[u8]) -> Option<&[u8]> {
    if msg.starts_with(b"\r\n") {
        return Some(&msg[2..]);
    }
    memchr::memmem::find(msg, b"\r\n\r\n").map(|i| &msg[i + 4..])
}

impl Corpus {
    /// Loads `path` (see the module doc).
    pub fn load(
        path: &Path,
        order: DataOrder,
        seed: u64,
        verify: bool,
    ) -> Result<Corpus, CorpusError> {
        let shown = path.display().to_string();
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| CorpusError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let meta = std::fs::metadata(path).map_err(|source| CorpusError::Read {
            path: shown.clone(),
            source,
        })?;
        let raw: Vec<Vec<u8>> = if meta.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| CorpusError::Read {
                    path: shown.clone(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file() && p.extension().is_some_and(|x| x.eq_ignore_ascii_case("eml"))
                })
                .collect();
            files.sort();
            let mut raw = Vec::with_capacity(files.len());
            for p in &files {
                let text = read(p)?;
                if text.is_empty() {
                    // As refused as the same file named directly.
                    return Err(CorpusError::EmptyFile(p.display().to_string()));
                }
                raw.push(text);
            }
            raw
        } else {
            let text = read(path)?;
            if text.starts_with(b"From ") {
                split_mbox(&text)
            } else if text.is_empty() {
                return Err(CorpusError::EmptyFile(shown));
            } else {
                vec![text]
            }
        };
        if raw.is_empty() {
            return Err(CorpusError::Empty(shown));
        }
        let mut messages = Vec::with_capacity(raw.len());
        for (index, m) in raw.into_iter().enumerate() {
            // Each file's bytes are dropped once normalized: loading holds
            // the corpus about once, not twice.
            let msg = normalize_crlf(&m);
            drop(m);
            let digest_line = if verify {
                let body = body_after_header(&msg).ok_or_else(|| CorpusError::NoSeparator {
                    path: shown.clone(),
                    index: index + 1,
                })?;
                crate::digest::header_line(body)
            } else {
                String::new()
            };
            messages.push(Body::with_digest_line(Arc::from(msg), digest_line));
        }
        Ok(Corpus {
            messages,
            order,
            seed,
            path: path.to_path_buf(),
        })
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Never true for a loaded corpus.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The position in the corpus of global message `n`; `cache` holds
    /// one pass's permutation (per thread) so that shuffling costs nothing
    /// per message but once per pass.
    pub fn index(&self, n: u64, cache: &mut Option<(u64, Vec<u32>)>) -> usize {
        let len = self.messages.len() as u64;
        let (pass, pos) = (n / len, (n % len) as usize);
        match self.order {
            DataOrder::RoundRobin => pos,
            DataOrder::Shuffle => {
                if cache.as_ref().is_none_or(|(p, _)| *p != pass) {
                    // Fisher-Yates from a generator seeded by seed and pass.
                    let mut perm: Vec<u32> = (0..len as u32).collect();
                    let mut rng = Rng::new(self.seed ^ pass.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    for i in (1..perm.len()).rev() {
                        let j = rng.range(0, i as u64) as usize;
                        perm.swap(i, j);
                    }
                    *cache = Some((pass, perm));
                }
                cache.as_ref().map_or(pos, |(_, perm)| perm[pos] as usize)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mbox_splits_at_from_lines_and_unquotes_from() {
        let mbox = b"From a@b Thu Jan  1 00:00:00 1970\nSubject: one\n\n>From the start\n>>From x\n\nFrom c@d Thu Jan  1 00:00:00 1970\nSubject: two\n\nbody\n\n";
        let m = split_mbox(mbox);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0], b"Subject: one\n\nFrom the start\n>From x\n");
        assert_eq!(m[1], b"Subject: two\n\nbody\n");
    }

    #[test]
    fn the_body_starts_after_the_first_empty_line() {
        assert_eq!(
            body_after_header(b"A: b\r\n\r\nbody\r\n"),
            Some(&b"body\r\n"[..])
        );
        assert_eq!(
            body_after_header(b"\r\nno headers\r\n"),
            Some(&b"no headers\r\n"[..])
        );
        assert_eq!(body_after_header(b"A: b\r\n"), None);
    }

    #[test]
    fn a_shuffle_sends_every_message_once_per_pass_and_depends_on_the_seed() {
        let body = |s: &str| Body::with_digest_line(Arc::from(s.as_bytes()), String::new());
        let corpus = |order, seed| Corpus {
            messages: (0..7).map(|i| body(&format!("m{i}\r\n"))).collect(),
            order,
            seed,
            path: PathBuf::new(),
        };
        let seq = |c: &Corpus| {
            let mut cache = None;
            (0..21).map(|n| c.index(n, &mut cache)).collect::<Vec<_>>()
        };
        let rr = seq(&corpus(DataOrder::RoundRobin, 1));
        assert_eq!(&rr[..8], &[0, 1, 2, 3, 4, 5, 6, 0]);
        let a = seq(&corpus(DataOrder::Shuffle, 1));
        for pass in a.chunks(7) {
            let mut p = pass.to_vec();
            p.sort();
            assert_eq!(p, (0..7).collect::<Vec<_>>(), "{a:?}");
        }
        assert_ne!(a[..7], a[7..14], "a new permutation per pass");
        assert_eq!(a, seq(&corpus(DataOrder::Shuffle, 1)), "deterministic");
        assert_ne!(
            a,
            seq(&corpus(DataOrder::Shuffle, 2)),
            "depends on the seed"
        );
    }

    #[test]
    fn every_bare_cr_and_bare_lf_becomes_crlf() {
        assert_eq!(normalize_crlf(b"a\nb\r\nc"), b"a\r\nb\r\nc\r\n");
        assert_eq!(normalize_crlf(b"a\rb\rc\r"), b"a\r\nb\r\nc\r\n");
        assert_eq!(normalize_crlf(b"a\r\r\nb\n\r"), b"a\r\n\r\nb\r\n\r\n");
        assert_eq!(normalize_crlf(b"\r"), b"\r\n");
        assert_eq!(normalize_crlf(b""), b"\r\n");
    }

    #[test]
    fn loading_normalizes_line_ends_and_digests_what_the_sink_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.eml");
        std::fs::write(&f, b"Subject: x\n\n.dot\nlast").unwrap();
        let c = Corpus::load(&f, DataOrder::RoundRobin, 1, true).unwrap();
        let b = &c.messages[0];
        assert_eq!(&b.raw[..], b"Subject: x\r\n\r\n.dot\r\nlast\r\n");
        assert_eq!(
            b.data.as_deref().unwrap(),
            b"Subject: x\r\n\r\n..dot\r\nlast\r\n.\r\n"
        );
        assert_eq!(
            b.digest_line,
            crate::digest::header_line(b".dot\r\nlast\r\n")
        );
        let mut v = crate::digest::Verifier::new();
        v.feed(b.digest_line.as_bytes());
        v.feed(&b.raw);
        assert_eq!(v.finish(), crate::digest::Verdict::Ok);
        std::fs::write(&f, b"Subject: no body").unwrap();
        let e = Corpus::load(&f, DataOrder::RoundRobin, 1, true).unwrap_err();
        assert!(e.to_string().contains("message 1 has no empty line"), "{e}");
        assert!(Corpus::load(&f, DataOrder::RoundRobin, 1, false).is_ok());
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let e = Corpus::load(&empty, DataOrder::RoundRobin, 1, false).unwrap_err();
        assert!(e.to_string().contains("no message in it"), "{e}");
        let e =
            Corpus::load(&dir.path().join("nope"), DataOrder::RoundRobin, 1, false).unwrap_err();
        assert!(e.to_string().starts_with("cannot read --data"), "{e}");
    }
}
