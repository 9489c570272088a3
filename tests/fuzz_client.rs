//! Stable-toolchain fuzzing of the client session and the PROXY parser,
//! bounded in time (`SMTPSTORM_FUZZ_SECS`, default 20 s per test) and run
//! for at least `MIN_CASES` inputs whatever the time (`tests/fuzzing`).
//!
//! Both tests are `#[ignore]`d: the test script runs them explicitly
//! (`cargo test --test fuzz_client -- --ignored`). They use a deterministic
//! PRNG (seed from `SMTPSTORM_FUZZ_SEED`, default fixed) and print the seed
//! and iteration of a failure so it can be replayed.
//!
//! Client invariants checked on every input: no panic; exactly one
//! `Message` event per message; `Done` exactly once and last, and nothing
//! after it; the bytes the client writes stay under a bound computed from its
//! messages. Inputs are real server transcripts (recorded from `Pair` runs of
//! many configurations) mutated in many ways, and plain random bytes.
//!
//! PROXY invariants: `parse` never panics, never reports consuming more than
//! it was given, a v2 header is `Ok(Some)` only with all of its declared
//! length present (and then consumes exactly `16 + len`), and a v1 header
//! only up to its CRLF within 107 bytes.

mod fuzzing;
#[path = "pair/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuzzing::{budget, run_cases, seed, MIN_CASES};
use harness::{message, Pair, Recorder, Rng};
use smtpstorm::smtp::client::{
    AuthMech, ClientAuth, ClientConfig, ClientEvent, ClientSession, Message, PipeliningMode,
};
use smtpstorm::smtp::server::{ServerConfig, Verdict};
use smtpstorm::smtp::{proxy, ClientTimeouts, CommandKind};

/// Beyond the time budget, how long the minimum number of cases may take.
const HARD_LIMIT_EXTRA: Duration = Duration::from_secs(600);

/// A client configuration, its messages, and a server's reply stream to it.
struct Transcript {
    config: Arc<ClientConfig>,
    messages: Vec<Message>,
    replies: Vec<u8>,
}

fn msgs(rng: &mut Rng, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            let rcpts: Vec<String> = (0..rng.range(1, 4)).map(|r| format!("r{r}@y")).collect();
            let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
            let body = format!("line {i}\r\n.dot\r\n{}\r\n", "z".repeat(rng.range(0, 300)));
            message("s@x", &refs, b"Subject: t\r\n\r\n", body.as_bytes())
        })
        .collect()
}

/// Record the server's replies in many whole-protocol sessions.
fn transcripts(rng: &mut Rng) -> Vec<Transcript> {
    let mut out = Vec::new();
    let auth = |mech| {
        Some(ClientAuth {
            mech,
            user: "u".into(),
            pass: "p".into(),
        })
    };
    let clients = [
        ClientConfig::default(),
        ClientConfig {
            pipelining: PipeliningMode::Off,
            ..ClientConfig::default()
        },
        ClientConfig {
            bdat: true,
            ..ClientConfig::default()
        },
        ClientConfig {
            bdat: true,
            bdat_chunk_size: 50,
            ..ClientConfig::default()
        },
        ClientConfig {
            lmtp: true,
            ..ClientConfig::default()
        },
        ClientConfig {
            auth: auth(AuthMech::Login),
            ..ClientConfig::default()
        },
        ClientConfig {
            auth: auth(AuthMech::Plain),
            pipelining: PipeliningMode::Off,
            ..ClientConfig::default()
        },
        ClientConfig {
            starttls: true,
            ..ClientConfig::default()
        },
        ClientConfig {
            capture_text: true,
            ..ClientConfig::default()
        },
    ];
    for (ci, client) in clients.iter().enumerate() {
        for fault in 0..5 {
            let server = ServerConfig {
                lmtp: client.lmtp,
                auth_enabled: client.auth.is_some(),
                starttls_available: client.starttls,
                max_message_size: if fault == 4 { 200 } else { 0 },
                ..ServerConfig::default()
            };
            let client = ClientConfig {
                timeouts: ClientTimeouts::uniform(Duration::from_secs(10)),
                ..client.clone()
            };
            let messages = msgs(rng, 1 + (ci + fault) % 4);
            let mut n = 0u32;
            let f = move |kind: CommandKind, _: &smtpstorm::smtp::server::CommandInfo<'_>| {
                n += 1;
                match (fault, kind) {
                    (1, CommandKind::Rcpt) if n.is_multiple_of(2) => Verdict::Reply(451),
                    (2, CommandKind::Dot | CommandKind::Bdat) => Verdict::Reply(554),
                    (3, CommandKind::Mail) if n.is_multiple_of(3) => Verdict::Reply(550),
                    (3, CommandKind::Ehlo | CommandKind::Lhlo) => {
                        Verdict::Delay(Duration::from_millis(5))
                    }
                    _ => Verdict::Proceed,
                }
            };
            let mut p = Pair::new(server, client.clone(), messages.clone()).with_hooks(Recorder {
                fault: Some(Box::new(f)),
                ..Recorder::default()
            });
            p.drive();
            p.assert_client_invariants(messages.len());
            out.push(Transcript {
                config: Arc::new(client),
                messages,
                replies: p.client_rx_plain,
            });
        }
    }
    out
}

const REPLY_LINES: [&[u8]; 12] = [
    b"220 ok\r\n",
    b"250 ok\r\n",
    b"250-PIPELINING\r\n",
    b"250 CHUNKING\r\n",
    b"354 go\r\n",
    b"421 bye\r\n",
    b"451 later\r\n",
    b"550 no\r\n",
    b"334 VXNlcm5hbWU6\r\n",
    b"235 ok\r\n",
    b"221 bye\r\n",
    b"999 what\r\n",
];

fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.range(1, 4) {
        let len = v.len();
        let at = if len == 0 { 0 } else { rng.range(0, len - 1) };
        match rng.range(0, 11) {
            0 if len > 0 => v[at] ^= 1 << rng.range(0, 7),
            1 if len > 0 => v[at] = rng.next_u64() as u8,
            2 => v.insert(at.min(len), rng.next_u64() as u8),
            3 if len > 0 => {
                let end = rng.range(at, len);
                v.drain(at..end);
            }
            4 => v.truncate(at),
            5 => {
                let line = REPLY_LINES[rng.range(0, REPLY_LINES.len() - 1)];
                v.splice(at..at, line.iter().copied());
            }
            6 if !other.is_empty() => {
                // Splice a slice of another transcript in.
                let s = rng.range(0, other.len() - 1);
                let e = rng.range(s, other.len().min(s + 200));
                v.splice(at..at, other[s..e].iter().copied());
            }
            7 if len > 0 => {
                // Duplicate a segment (a repeated reply).
                let end = rng.range(at, len.min(at + 64));
                let seg = v[at..end].to_vec();
                v.splice(end..end, seg);
            }
            8 => {
                // Change the class of one reply code.
                if let Some(i) = v[at..]
                    .windows(2)
                    .position(|w| w[0] == b'\n' && w[1].is_ascii_digit())
                {
                    v[at + i + 1] = b"12345"[rng.range(0, 4)];
                }
            }
            9 => {
                // Turn a last line into a continuation line or back.
                if let Some(i) = v[at..].windows(4).position(|w| {
                    w[..3].iter().all(u8::is_ascii_digit) && (w[3] == b' ' || w[3] == b'-')
                }) {
                    let j = at + i + 3;
                    v[j] = if v[j] == b' ' { b'-' } else { b' ' };
                }
            }
            10 => {
                // A huge line, beyond the reply parser's limits.
                let n = rng.range(1, 70_000);
                v.splice(at..at, std::iter::repeat_n(b'2', n));
            }
            _ => v.extend((0..rng.range(1, 40)).map(|_| rng.next_u64() as u8)),
        }
    }
    v
}

/// Most bytes a correct client may write for these messages.
fn output_bound(cfg: &ClientConfig, messages: &[Message]) -> usize {
    let per_msg: usize = messages
        .iter()
        .map(|m| {
            let data = m.header.len() + m.body.len();
            let chunks = match cfg.bdat_chunk_size {
                0 => 1,
                c => data / c + 1,
            };
            2 * data
                + 3
                + 64 * chunks
                + 64
                + m.mail_from.len()
                + m.mail_params.len()
                + m.rcpt_to.iter().map(|r| r.len() + 16).sum::<usize>()
                + 16 // RSET
        })
        .sum();
    4096 + per_msg
}

/// Feed `input` to a fresh client in random chunks with random timeouts and
/// closes; check every invariant. Returns a description of a violation.
fn run_one(
    rng: &mut Rng,
    cfg: &Arc<ClientConfig>,
    messages: &[Message],
    input: &[u8],
) -> Result<(), String> {
    let t0 = Instant::now();
    let mut now = t0;
    let mut s = ClientSession::new(Arc::clone(cfg), messages.to_vec(), t0);
    let mut events: Vec<ClientEvent> = Vec::new();
    let mut written = 0usize;
    let mut out = Vec::new();
    let mut tls_pending = false;
    let mut pos = 0;
    let bound = output_bound(cfg, messages);
    let mut step = |s: &mut ClientSession,
                    events: &mut Vec<ClientEvent>,
                    now: Instant,
                    tls_pending: &mut bool| {
        out.clear();
        s.poll_transmit(now, &mut out);
        written += out.len();
        while let Some(e) = s.poll_event() {
            if e == ClientEvent::StartTls {
                *tls_pending = true;
            }
            events.push(e);
        }
        written
    };
    while pos < input.len() && !s.is_done() {
        now += Duration::from_millis(rng.range(0, 3) as u64);
        match rng.range(0, 99) {
            0..=2 => {
                if let Some(d) = s.poll_timeout() {
                    now = now.max(d);
                }
                s.handle_timeout(now);
            }
            3 => s.handle_close(now),
            4..=30 if tls_pending => {
                tls_pending = false;
                s.handle_tls_established(now);
            }
            _ => {
                let max = if rng.chance(50) { 8 } else { 600 };
                let n = rng.range(1, (input.len() - pos).min(max));
                s.handle_input(now, &input[pos..pos + n]);
                pos += n;
            }
        }
        if step(&mut s, &mut events, now, &mut tls_pending) > bound {
            return Err(format!("client wrote more than {bound} bytes"));
        }
    }
    // The input ran out: the peer goes quiet, then the deadline passes or
    // the connection closes.
    if !s.is_done() {
        if rng.chance(50) {
            if let Some(d) = s.poll_timeout() {
                s.handle_timeout(d.max(now));
            }
        }
        if !s.is_done() {
            s.handle_close(now);
        }
    }
    if step(&mut s, &mut events, now, &mut tls_pending) > bound {
        return Err(format!("client wrote more than {bound} bytes"));
    }
    if !s.is_done() {
        return Err("not done after close".into());
    }
    // After Done every call is a no-op.
    s.handle_input(now, b"250 more\r\n");
    s.handle_timeout(now + Duration::from_secs(3600));
    s.handle_close(now);
    s.handle_tls_established(now);
    if s.poll_event().is_some() {
        return Err("event after Done".into());
    }
    let mut o = Vec::new();
    s.poll_transmit(now, &mut o);
    if !o.is_empty() {
        return Err("output after Done".into());
    }
    let dones: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == ClientEvent::Done)
        .map(|(i, _)| i)
        .collect();
    if dones != vec![events.len() - 1] {
        return Err(format!("Done at {dones:?} of {} events", events.len()));
    }
    let mut seen = HashSet::new();
    for e in &events {
        if let ClientEvent::Message { index, .. } = e {
            if *index >= messages.len() || !seen.insert(*index) {
                return Err(format!("bad or repeated Message index {index}"));
            }
        }
    }
    if seen.len() != messages.len() {
        return Err(format!(
            "{} Message events for {} messages",
            seen.len(),
            messages.len()
        ));
    }
    Ok(())
}

#[test]
#[ignore = "bounded fuzzing; run with --ignored (SMTPSTORM_FUZZ_SECS)"]
fn fuzz_client_session_keeps_its_invariants_on_mutated_replies() {
    let seed = seed();
    let mut rng = Rng(seed);
    let corpus = transcripts(&mut rng);
    // The unmutated transcripts replay cleanly in any chunking.
    for t in &corpus {
        run_one(&mut rng, &t.config, &t.messages, &t.replies).unwrap();
    }
    let b = budget();
    let cases = run_cases("client", MIN_CASES, b, b + HARD_LIMIT_EXTRA, |iters| {
        let t = &corpus[rng.range(0, corpus.len() - 1)];
        let input = match rng.range(0, 9) {
            0 => (0..rng.range(0, 2000))
                .map(|_| rng.next_u64() as u8)
                .collect(),
            1 => {
                // Random reply-shaped lines.
                let mut v = Vec::new();
                for _ in 0..rng.range(1, 40) {
                    v.extend_from_slice(REPLY_LINES[rng.range(0, REPLY_LINES.len() - 1)]);
                }
                v
            }
            _ => {
                let other = &corpus[rng.range(0, corpus.len() - 1)].replies;
                mutate(&mut rng, &t.replies, other)
            }
        };
        if let Err(e) = run_one(&mut rng, &t.config, &t.messages, &input) {
            panic!(
                "seed {seed} iteration {iters}: {e}\ninput: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    });
    eprintln!("fuzz_client: {cases} inputs, {} transcripts", corpus.len());
}

fn valid_headers(rng: &mut Rng) -> Vec<u8> {
    let addrs: [(&str, &str); 3] = [
        ("10.1.2.3:4000", "10.9.9.9:25"),
        ("[2001:db8::7]:65535", "[::1]:587"),
        ("192.0.2.1:1", "[fe80::1]:2"),
    ];
    let (s, d) = addrs[rng.range(0, 2)];
    let mut v = Vec::new();
    match rng.range(0, 3) {
        0 => proxy::write_v1(s.parse().unwrap(), d.parse().unwrap(), &mut v),
        1 => proxy::write_v2(s.parse().unwrap(), d.parse().unwrap(), &mut v),
        2 => v.extend_from_slice(b"PROXY UNKNOWN\r\n"),
        _ => {
            // v2 LOCAL with a TLV payload.
            v.extend_from_slice(&proxy::V2_SIG);
            v.extend_from_slice(&[0x20, 0x00]);
            let n = rng.range(0, 40);
            v.extend_from_slice(&(n as u16).to_be_bytes());
            v.extend((0..n).map(|_| rng.next_u64() as u8));
        }
    }
    v
}

/// The parser's contract on one buffer.
#[track_caller]
fn check_proxy(buf: &[u8]) {
    match proxy::parse(buf) {
        Ok(Some((_, n))) => {
            assert!(n <= buf.len(), "consumed {n} of {}", buf.len());
            if buf.starts_with(&proxy::V2_SIG) {
                let declared = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
                assert_eq!(n, 16 + declared, "v2 consumes exactly its declared length");
            } else {
                assert!(
                    n <= proxy::V1_MAX && buf[..n].ends_with(b"\r\n"),
                    "v1 ends at its CRLF"
                );
            }
        }
        Ok(None) => assert!(
            buf.len() < 16 + proxy::MAX_V2_PAYLOAD,
            "needs more after {} bytes",
            buf.len()
        ),
        Err(_) => {}
    }
}

#[test]
#[ignore = "bounded fuzzing; run with --ignored (SMTPSTORM_FUZZ_SECS)"]
fn fuzz_proxy_parser_keeps_its_contract() {
    let seed = seed();
    let mut rng = Rng(seed ^ 0x9E37);
    let b = budget();
    run_cases("proxy", MIN_CASES, b, b + HARD_LIMIT_EXTRA, |_| {
        let mut buf = valid_headers(&mut rng);
        let is_v2 = buf.starts_with(&proxy::V2_SIG);
        match rng.range(0, 5) {
            0 => {
                buf = (0..rng.range(0, 300))
                    .map(|_| rng.next_u64() as u8)
                    .collect()
            }
            1 => {
                // Truncated anywhere: never a whole header.
                let cut = rng.range(0, buf.len() - 1);
                let r = proxy::parse(&buf[..cut]);
                assert!(
                    !matches!(r, Ok(Some(_))),
                    "truncated header at {cut} parsed: {r:?}"
                );
            }
            2 if is_v2 => {
                // A v2 length that lies (longer than what follows).
                let real = buf.len() - 16;
                let lie = real + rng.range(1, 4000);
                buf[14..16].copy_from_slice(&(lie.min(65535) as u16).to_be_bytes());
                let extra = rng.range(0, lie.min(65535) - real - 1);
                buf.extend((0..extra).map(|_| rng.next_u64() as u8));
                let r = proxy::parse(&buf);
                assert!(
                    !matches!(r, Ok(Some(_))),
                    "lying v2 length {lie} with {} bytes parsed: {r:?}",
                    buf.len()
                );
            }
            3 => {
                for _ in 0..rng.range(1, 4) {
                    let at = rng.range(0, buf.len() - 1);
                    buf[at] = rng.next_u64() as u8;
                }
            }
            _ => buf.extend((0..rng.range(0, 200)).map(|_| rng.next_u64() as u8)),
        }
        check_proxy(&buf);
        // Every prefix obeys the contract too.
        for cut in 0..buf.len().min(64) {
            check_proxy(&buf[..cut]);
        }
    });
}
