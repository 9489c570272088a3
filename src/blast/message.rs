//! Building the messages the blaster sends: address templates, headers,
//! bodies.
//!
//! A [`MessageBuilder`] (one per worker thread) turns a global sequence
//! number into a [`Message`]: envelope from the `--from`/`--to` templates,
//! a realistic header block (From, To, Date, Message-ID unique per message,
//! Subject, MIME-Version, Content-Type, the digest header of the body) and a
//! body of 78-column text lines ending CRLF, some starting with `.` so
//! dot-stuffing is exercised. The header is padded so that header + body is
//! exactly the requested size whenever that size leaves room for a header.
//!
//! Invariants: a body is built, hashed and dot-stuffed once per size and
//! shared ([`Body`]); a fixed `--size` or a `--body` file is built once per
//! run before it starts ([`MessageBuilder::shared_body`]) and shared by every
//! thread, so no body is ever built inside a timed phase; per message only
//! the header is made and spliced in front; other sizes are cached per
//! thread (bounded). Every choice (sizes, body text,
//! `{rand}`) comes from a [`Rng`] seeded by `--seed` and the thread index, so
//! runs are deterministic; `{n}` values never repeat across threads and
//! instances (`n = (k · threads + thread) · instances + instance`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::smtp::client::Message;

pub use super::body::{make_body, normalize_crlf, Body, Rng, BODY_LINE_CHARS};

/// A message size or a uniform range of sizes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRange {
    pub min: u64,
    pub max: u64,
}

/// One piece of a compiled address template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Lit(String),
    N,
    Thread,
    Rand,
    Instance,
    R,
}

/// A compiled `--from`/`--to` template: `{n}`, `{thread}`, `{rand}`,
/// `{instance}`, `{r}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// Values substituted into a template.
#[derive(Clone, Copy, Debug, Default)]
pub struct Vars {
    pub n: u64,
    pub thread: usize,
    pub rand: u64,
    pub instance: u32,
    pub r: u64,
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('{') {
            lit.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let j = after
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in `{s}`"))?;
            let piece = match &after[..j] {
                "n" => Piece::N,
                "thread" => Piece::Thread,
                "rand" => Piece::Rand,
                "instance" => Piece::Instance,
                "r" => Piece::R,
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}` in `{s}` (known: {{n}}, {{thread}}, {{rand}}, {{instance}}, {{r}})"
                    ))
                }
            };
            if !lit.is_empty() {
                pieces.push(Piece::Lit(std::mem::take(&mut lit)));
            }
            pieces.push(piece);
            rest = &after[j + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        if s.chars()
            .any(|c| c == '<' || c == '>' || c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "`{s}` must not contain spaces, control characters or angle brackets"
            ));
        }
        Ok(Template { pieces })
    }

    pub fn uses_rand(&self) -> bool {
        self.pieces.contains(&Piece::Rand)
    }

    /// Appends the expansion to `out`.
    pub fn expand_into(&self, v: &Vars, out: &mut String) {
        use std::fmt::Write as _;
        for p in &self.pieces {
            // Writing into a String cannot fail.
            let _ = match p {
                Piece::Lit(s) => {
                    out.push_str(s);
                    Ok(())
                }
                Piece::N => write!(out, "{}", v.n),
                Piece::Thread => write!(out, "{}", v.thread),
                Piece::Rand => write!(out, "{:016x}", v.rand),
                Piece::Instance => write!(out, "{}", v.instance),
                Piece::R => write!(out, "{}", v.r),
            };
        }
    }

    pub fn expand(&self, v: &Vars) -> String {
        let mut s = String::with_capacity(48);
        self.expand_into(v, &mut s);
        s
    }
}

/// Bodies cached per thread (one per distinct size), at most this many…
const BODY_CACHE_MAX: usize = 4096;
/// …and at most this many bytes (a body is held twice: as is and stuffed).
const BODY_CACHE_MAX_BYTES: usize = 256 << 20;
/// RFC 5322 date (`Sun, 22 Nov 2026 17:36:25 +0000`) of a UNIX time.
pub fn rfc5322_date(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    // Civil-from-days (H. Hinnant).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Per-thread message factory (see the module doc).
pub struct MessageBuilder {
    from: Template,
    to: Template,
    recipients: u64,
    size: SizeRange,
    /// `--size` as a distribution (sizes drawn by weight; see `size.rs`).
    size_dist: Option<Arc<super::size::SizeDist>>,
    body_file: Option<Arc<[u8]>>,
    /// `--data`: whole messages, one picked per message sent.
    corpus: Option<Arc<super::corpus::Corpus>>,
    /// This thread's permutation of the corpus for the current pass.
    corpus_pass: Option<(u64, Vec<u32>)>,
    thread: usize,
    threads: u64,
    instance: u32,
    instances: u64,
    seed: u64,
    rng: Rng,
    /// Messages built so far by this thread (`k`).
    built: u64,
    /// Body length → body (this thread's cache, for size ranges).
    bodies: HashMap<usize, Arc<Body>>,
    /// Bytes held by `bodies`.
    bodies_bytes: usize,
    /// The one body of a fixed size or `--body` file, shared by all threads.
    shared: Option<Arc<Body>>,
    /// Header length aimed at, so that header + body = size.
    header_target: usize,
    date_secs: u64,
    date: String,
    /// `--trace`: the run id every message's trace header carries.
    trace_run: Option<u64>,
}

impl MessageBuilder {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        from: Template,
        to: Template,
        recipients: u64,
        size: SizeRange,
        body_file: Option<Arc<[u8]>>,
        seed: u64,
        thread: usize,
        threads: usize,
        instance: (u32, u32),
    ) -> Self {
        let mut b = MessageBuilder {
            from,
            to,
            recipients: recipients.max(1),
            size,
            size_dist: None,
            body_file,
            corpus: None,
            corpus_pass: None,
            thread,
            threads: threads.max(1) as u64,
            instance: instance.0,
            instances: u64::from(instance.1.max(1)),
            seed,
            rng: Rng::new(
                seed.wrapping_mul(0x100_0000_01B3)
                    .wrapping_add(thread as u64 + 1),
            ),
            built: 0,
            bodies: HashMap::new(),
            bodies_bytes: 0,
            shared: None,
            header_target: 0,
            date_secs: u64::MAX,
            date: String::new(),
            trace_run: None,
        };
        // Aim at the length of a header for a large sequence number plus
        // room, so that nearly every header can be padded up to it.
        b.aim_header();
        b
    }

    /// The smallest message this builder makes: its header (padded to
    /// the length it aims at), the blank line and the shortest body. A
    /// `--size` below it cannot be honoured.
    pub fn smallest_message(&self) -> u64 {
        (self.header_target + 2 + 2) as u64
    }

    /// Aims the header length at that of a large sequence number plus room.
    fn aim_header(&mut self) {
        let (probe, _) = self.header_for(u64::MAX / 4, u64::MAX, &"x".repeat(64));
        self.header_target = probe.len() + 32;
    }

    /// `--trace`: every message carries the trace header of run `run`
    /// (`crate::trace`), first in its header block, its send time stamped
    /// by the session ([`Message::stamp`]). Call before
    /// [`Self::shared_body`]: the header grows, so the body shrinks.
    pub fn with_trace(mut self, run: Option<u64>) -> Self {
        self.trace_run = run;
        self.aim_header();
        self
    }

    /// The trace line of message `n` and its stamp offset, with `--trace`.
    fn trace_line(&self, n: u64) -> Option<(String, usize)> {
        self.trace_run.map(|run| crate::trace::header_line(run, n))
    }

    /// `header` with the trace line of message `n` in front (with `--trace`),
    /// and the offset of its stamp.
    fn traced(&self, n: u64, header: Vec<u8>) -> (Vec<u8>, Option<usize>) {
        match self.trace_line(n) {
            None => (header, None),
            Some((line, at)) => {
                let mut h = Vec::with_capacity(line.len() + header.len());
                h.extend_from_slice(line.as_bytes());
                h.extend_from_slice(&header);
                (h, Some(at))
            }
        }
    }

    /// Send the messages of `corpus` (`--data`) instead of generated ones.
    pub fn with_corpus(mut self, corpus: Option<Arc<super::corpus::Corpus>>) -> Self {
        self.corpus = corpus;
        self
    }

    /// Draw each message's size from `dist` (by weight) instead of
    /// `size`.
    pub fn with_size_dist(mut self, dist: Option<Arc<super::size::SizeDist>>) -> Self {
        self.size_dist = dist;
        self
    }

    /// The `{n}` of the `k`-th message of this thread.
    pub fn global_n(&self, k: u64) -> u64 {
        (k.wrapping_mul(self.threads)
            .wrapping_add(self.thread as u64))
        .wrapping_mul(self.instances)
        .wrapping_add(u64::from(self.instance))
    }

    fn header_for(&mut self, n: u64, rand: u64, digest_line: &str) -> (Vec<u8>, Option<usize>) {
        let vars = Vars {
            n,
            thread: self.thread,
            rand,
            instance: self.instance,
            r: 0,
        };
        let from = self.from.expand(&vars);
        let to = self.to.expand(&vars);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if now != self.date_secs {
            self.date_secs = now;
            self.date = rfc5322_date(now);
        }
        let mut h = String::with_capacity(512);
        let stamp = self.trace_line(n).map(|(line, at)| {
            h.push_str(&line);
            at
        });
        h.push_str("From: <");
        h.push_str(&from);
        h.push_str(">\r\nTo: <");
        h.push_str(&to);
        h.push_str(">\r\nDate: ");
        h.push_str(&self.date);
        h.push_str("\r\nMessage-ID: <");
        use std::fmt::Write as _;
        let _ = write!(
            h,
            "{n}.{rand:016x}.{}.{}@smtpstorm.test",
            self.thread, self.instance
        );
        h.push_str(">\r\nSubject: smtpstorm load test message ");
        let _ = write!(h, "{n}");
        h.push_str("\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n");
        h.push_str(digest_line);
        (h.into_bytes(), stamp)
    }

    /// Body length for a message of `total` bytes.
    fn body_len(&self, total: usize) -> usize {
        total.saturating_sub(self.header_target + 2).max(2)
    }

    /// The body every message shares when there is only one (a fixed
    /// `--size`, or a `--body` file): build it once before the run and give
    /// it to every thread's builder with [`Self::use_shared_body`].
    /// With a size distribution, this builds the bodies of its sizes
    /// instead (kept in the distribution, which every thread shares).
    pub fn shared_body(&self) -> Option<Arc<Body>> {
        if self.corpus.is_some() {
            return None;
        }
        if let Some(f) = &self.body_file {
            return Some(Body::file(Arc::clone(f)));
        }
        if let Some(d) = &self.size_dist {
            d.bodies(|size| Body::generated(self.body_len(size as usize), self.seed));
            return None;
        }
        (self.size.min == self.size.max)
            .then(|| Body::generated(self.body_len(self.size.min as usize), self.seed))
    }

    /// Use `body` (from [`Self::shared_body`]) instead of building it.
    pub fn use_shared_body(&mut self, body: Arc<Body>) {
        self.shared = Some(body);
    }

    fn body(&mut self, len: usize) -> Arc<Body> {
        if let Some(b) = self.shared.as_ref().filter(|b| b.raw.len() == len) {
            return Arc::clone(b);
        }
        if let Some(b) = self.bodies.get(&len) {
            return Arc::clone(b);
        }
        if self.bodies.len() >= BODY_CACHE_MAX || self.bodies_bytes + 2 * len > BODY_CACHE_MAX_BYTES
        {
            self.bodies.clear();
            self.bodies_bytes = 0;
        }
        let body = Body::generated(len, self.seed);
        self.bodies_bytes += body.raw.len() + body.data.as_ref().map_or(0, |d| d.len());
        self.bodies.insert(len, Arc::clone(&body));
        body
    }

    /// The next message of this thread.
    pub fn next_message(&mut self) -> Message {
        let k = self.built;
        self.built += 1;
        let n = self.global_n(k);
        let rand = self.rng.next_u64();
        let mut rcpt_to = Vec::with_capacity(self.recipients as usize);
        for r in 0..self.recipients {
            let vars = Vars {
                n,
                thread: self.thread,
                rand,
                instance: self.instance,
                r,
            };
            rcpt_to.push(self.to.expand(&vars));
        }
        let mail_from = self.from.expand(&Vars {
            n,
            thread: self.thread,
            rand,
            instance: self.instance,
            r: 0,
        });
        if let Some(corpus) = &self.corpus {
            let body = &corpus.messages[corpus.index(n, &mut self.corpus_pass)];
            let (raw, data) = (Arc::clone(&body.raw), body.data.clone());
            let (header, stamp) = self.traced(n, body.digest_line.as_bytes().to_vec());
            return Message {
                mail_from,
                mail_params: String::new(),
                rcpt_to,
                header,
                body: raw,
                data,
                stamp,
                tag: n,
            };
        }
        if let Some(file) = &self.body_file {
            let body = match &self.shared {
                Some(b) => Arc::clone(b),
                None => {
                    let b = Body::file(Arc::clone(file));
                    self.shared = Some(Arc::clone(&b));
                    b
                }
            };
            let (header, stamp) = self.traced(n, Vec::new());
            return Message {
                mail_from,
                mail_params: String::new(),
                rcpt_to,
                header,
                body: Arc::clone(&body.raw),
                data: body.data.clone(),
                stamp,
                tag: n,
            };
        }
        let (total, body) = match &self.size_dist {
            None => {
                let total = self.rng.range(self.size.min, self.size.max) as usize;
                (total, self.body(self.body_len(total)))
            }
            Some(d) => {
                let i = d.pick(&mut self.rng);
                let total = d.size(i) as usize;
                match d.built_bodies() {
                    Some(b) => (total, Arc::clone(&b[i])),
                    None => {
                        let d = Arc::clone(d);
                        (total, self.body(self.body_len(d.size(i) as usize)))
                    }
                }
            }
        };
        let body_len = body.raw.len();
        let (mut header, stamp) = self.header_for(n, rand, &body.digest_line);
        // Pad to the target so header + blank line + body = total.
        let want = total.saturating_sub(body_len + 2);
        const PAD: &[u8] = b"X-Smtpstorm-Pad: ";
        if want >= header.len() + PAD.len() + 3 {
            let fill = want - header.len() - PAD.len() - 2;
            header.extend_from_slice(PAD);
            header.extend(std::iter::repeat_n(b'x', fill));
            header.extend_from_slice(b"\r\n");
        }
        header.extend_from_slice(b"\r\n");
        Message {
            mail_from,
            mail_params: String::new(),
            rcpt_to,
            header,
            body: Arc::clone(&body.raw),
            data: body.data.clone(),
            stamp,
            tag: n,
        }
    }

    /// Number the next message as the `k`-th of this thread (a scenario's
    /// profiles share one count, so `{n}` stays unique).
    pub fn continue_from(&mut self, k: u64) {
        self.built = k;
    }

    /// Messages built so far.
    pub fn built(&self) -> u64 {
        self.built
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder(size: u64, thread: usize, threads: usize, instance: (u32, u32)) -> MessageBuilder {
        MessageBuilder::new(
            Template::parse("s{n}@x.test").unwrap(),
            Template::parse("r{n}.{r}@x.test").unwrap(),
            2,
            SizeRange {
                min: size,
                max: size,
            },
            None,
            7,
            thread,
            threads,
            instance,
        )
    }

    #[test]
    fn templates_expand_every_placeholder() {
        let t = Template::parse("a{n}-{thread}-{instance}-{r}-{rand}@b").unwrap();
        let s = t.expand(&Vars {
            n: 5,
            thread: 1,
            rand: 255,
            instance: 2,
            r: 3,
        });
        assert_eq!(s, "a5-1-2-3-00000000000000ff@b");
        assert!(Template::parse("a{nope}@b")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(Template::parse("a{n@b").is_err());
        assert!(Template::parse("a b@c").is_err());
    }

    #[test]
    fn sequence_numbers_are_unique_across_threads_and_instances() {
        let mut seen = std::collections::HashSet::new();
        for inst in 0..3 {
            for t in 0..4 {
                let b = builder(1024, t, 4, (inst, 3));
                for k in 0..50 {
                    assert!(seen.insert(b.global_n(k)));
                }
            }
        }
    }

    #[test]
    fn messages_have_the_requested_size_and_a_valid_digest() {
        for size in [1024u64, 4000, 100_000, 700] {
            let mut b = builder(size, 0, 1, (0, 1));
            let m = b.next_message();
            assert_eq!((m.header.len() + m.body.len()) as u64, size, "size {size}");
            let mut v = crate::digest::Verifier::new();
            v.feed(&m.header);
            v.feed(&m.body);
            assert_eq!(v.finish(), crate::digest::Verdict::Ok);
            assert!(m.body.ends_with(b"\r\n"));
            assert!(m.body.split(|&c| c == b'\n').any(|l| l.starts_with(b".")) || size < 1000);
            assert!(m
                .body
                .split(|&c| c == b'\n')
                .all(|l| l.len() <= BODY_LINE_CHARS + 1));
            assert_eq!(m.rcpt_to.len(), 2);
        }
    }

    #[test]
    fn a_shared_body_is_used_as_is_and_its_data_form_is_the_stuffed_body() {
        let mut a = builder(5000, 0, 2, (0, 1));
        let shared = a.shared_body().expect("a fixed size has one body");
        a.use_shared_body(Arc::clone(&shared));
        let mut b = builder(5000, 1, 2, (0, 1));
        b.use_shared_body(Arc::clone(&shared));
        let (ma, mb) = (a.next_message(), b.next_message());
        assert!(Arc::ptr_eq(&ma.body, &shared.raw) && Arc::ptr_eq(&mb.body, &shared.raw));
        assert!(Arc::ptr_eq(
            ma.data.as_ref().unwrap(),
            shared.data.as_ref().unwrap()
        ));
        let mut want = Vec::new();
        crate::smtp::client::dot_stuff(&mut want, &[&ma.header, &ma.body]);
        let mut got = ma.header.clone();
        got.extend_from_slice(shared.data.as_ref().unwrap());
        assert_eq!(got, want, "header ++ data is the DATA form of the message");
        assert_eq!(ma.len(), 5000);
        assert!(builder(1000, 0, 1, (0, 1)).shared_body().is_some());
        let mut ranged = builder(1000, 0, 1, (0, 1));
        ranged.size = SizeRange {
            min: 500,
            max: 2000,
        };
        assert!(
            ranged.shared_body().is_none(),
            "a size range has many bodies"
        );
    }

    #[test]
    fn no_header_line_starts_with_a_dot_so_data_sends_it_as_is() {
        // The session sends a builder's header unstuffed (see
        // `Message::data`): even with addresses that start with dots.
        for size in [300u64, 1024, 5000] {
            let mut b = MessageBuilder::new(
                Template::parse(".{n}@x.test").unwrap(),
                Template::parse(".r{n}.{r}@x.test").unwrap(),
                3,
                SizeRange {
                    min: size,
                    max: size,
                },
                None,
                7,
                0,
                1,
                (0, 1),
            );
            for _ in 0..20 {
                let m = b.next_message();
                assert!(m.header.is_empty() || m.header.ends_with(b"\r\n"));
                assert!(
                    !m.header.split(|&c| c == b'\n').any(|l| l.starts_with(b".")),
                    "{}",
                    String::from_utf8_lossy(&m.header)
                );
            }
        }
    }

    #[test]
    fn bodies_are_cached_and_deterministic() {
        let mut a = builder(2048, 0, 1, (0, 1));
        let mut b = builder(2048, 0, 1, (0, 1));
        let (m1, m2, m3) = (a.next_message(), a.next_message(), b.next_message());
        assert!(Arc::ptr_eq(&m1.body, &m2.body));
        assert_eq!(m1.body, m3.body);
        assert_ne!(m1.header, m2.header, "Message-ID differs");
    }

    #[test]
    fn bodies_of_any_length_end_with_crlf() {
        for len in 0..400 {
            let b = make_body(len, 1);
            assert_eq!(b.len(), len.max(2));
            assert!(b.ends_with(b"\r\n"));
            assert!(
                !b[..b.len() - 2].contains(&b'\n'.to_owned())
                    || b.windows(2).filter(|w| w == b"\r\n").count()
                        == b.iter().filter(|&&c| c == b'\n').count()
            );
        }
    }

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_368_985),
            "Sun, 22 Nov 2026 17:36:25 +0000"
        );
    }

    #[test]
    fn lf_is_normalized_to_crlf_once() {
        assert_eq!(normalize_crlf(b"a\nb\r\nc"), b"a\r\nb\r\nc\r\n");
        assert_eq!(normalize_crlf(b""), b"\r\n");
    }
}
