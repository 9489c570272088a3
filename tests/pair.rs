//! Whole-protocol tests: the client session talks to the server session in
//! memory through the [`harness::Pair`] (virtual clock, random chunking,
//! real rustls for STARTTLS). Each test asserts exact outcomes on both sides:
//! the client's Message events against the server's, recipients, byte counts
//! and the bodies the server delivered, byte for byte.

#[path = "pair/harness.rs"]
mod harness;

use std::sync::Arc;
use std::time::Duration;

use harness::{
    contains, count, expected_bdat_body, expected_data_body, message, Pair, Recorder, Rng,
};
use proptest::prelude::*;
use smtpstorm::smtp::client::{
    AuthMech, ClientAuth, ClientConfig, ClientEvent, Message, PipeliningMode,
};
use smtpstorm::smtp::server::{CloseReason, MessageOutcome, ServerConfig, ServerEvent, Verdict};
use smtpstorm::smtp::{proxy, ClientTimeouts, CommandKind, Outcome, Phase};

fn sample_messages() -> Vec<Message> {
    let long_line = {
        let mut l = vec![b'x'; 998];
        l.extend_from_slice(b"\r\n");
        l
    };
    vec![
        message(
            "a@example.com",
            &["b@example.com"],
            b"Subject: one\r\n\r\n",
            b"hello\r\n",
        ),
        message(
            "",
            &["c@example.com", "d@example.com"],
            b"",
            b"no header, no final newline",
        ),
        message(
            "e@example.com",
            &["f@example.com"],
            b"Subject: dots\r\n\r\n",
            b".\r\n..\r\n.x\r\n\r\n.\r\nend\r\n",
        ),
        message(
            "g@example.com",
            &["h@example.com"],
            b"Subject: long\r\n\r\n",
            &long_line.repeat(40),
        ),
        message("i@example.com", &["j@example.com"], b"", b""),
        message(
            "k@example.com",
            &["l@example.com"],
            b"X-8bit: \xc3\xa9\r\n\r\n",
            b"\x00\x01\xff\tbinary-ish\r\n",
        ),
    ]
}

/// Every message was accepted on both sides and arrived byte-exact.
#[track_caller]
fn assert_all_delivered(p: &Pair, msgs: &[Message], bdat: bool) {
    p.assert_client_invariants(msgs.len());
    let expected: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| {
            if bdat {
                expected_bdat_body(m)
            } else {
                expected_data_body(m)
            }
        })
        .collect();
    let client = p.client_outcomes(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(
            client[i],
            (Outcome::Accepted, 250, m.rcpt_to.len() as u32),
            "client outcome of message {i}"
        );
    }
    let server = p.server_messages();
    assert_eq!(server.len(), msgs.len(), "one server Message per message");
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(
            server[i],
            (
                MessageOutcome::Accepted,
                250,
                expected[i].len() as u64,
                m.rcpt_to.len() as u32
            ),
            "server outcome of message {i}"
        );
    }
    assert_eq!(p.hooks.ends, vec![true; msgs.len()]);
    for (i, body) in p.hooks.bodies.iter().enumerate() {
        assert!(
            body == &expected[i],
            "body {i} differs:\n got {:?}\nwant {:?}",
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(&expected[i])
        );
    }
    let rcpts: Vec<Vec<u8>> = msgs
        .iter()
        .flat_map(|m| m.rcpt_to.iter().map(|r| r.as_bytes().to_vec()))
        .collect();
    assert_eq!(p.hooks.rcpts, rcpts, "recipients as the server saw them");
    assert_eq!(
        p.server_events.last(),
        Some(&ServerEvent::Close(CloseReason::Quit))
    );
    assert!(
        p.client_errors().is_empty(),
        "client errors: {:?}",
        p.client_errors()
    );
}

fn run(
    server: ServerConfig,
    client: ClientConfig,
    msgs: &[Message],
    seed: Option<(u64, usize)>,
) -> Pair {
    let mut p = Pair::new(server, client, msgs.to_vec());
    if let Some((seed, max)) = seed {
        p = p.with_chunking(seed, max);
    }
    p.drive();
    p
}

#[test]
fn plain_session_delivers_every_message_byte_exact() {
    let msgs = sample_messages();
    let p = run(
        ServerConfig::default(),
        ClientConfig::default(),
        &msgs,
        None,
    );
    assert_all_delivered(&p, &msgs, false);
    assert!(p.client.is_pipelining());
    // Nothing at all happened on the virtual clock: no deadline was reached.
    assert_eq!(p.elapsed, Duration::ZERO);
    assert!(p
        .phase_latencies(Phase::Message)
        .iter()
        .all(|l| *l == Duration::ZERO));
    assert_eq!(p.phase_latencies(Phase::Message).len(), msgs.len());
    for seed in 1..40 {
        let p = run(
            ServerConfig::default(),
            ClientConfig::default(),
            &msgs,
            Some((seed, 1 + seed as usize % 17)),
        );
        assert_all_delivered(&p, &msgs, false);
    }
}

#[test]
fn pipelined_session_with_many_recipients() {
    let rcpts: Vec<String> = (0..60).map(|i| format!("user{i}@example.net")).collect();
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let msgs: Vec<Message> = (0..3)
        .map(|i| {
            message(
                "from@example.com",
                &refs,
                b"Subject: many\r\n\r\n",
                format!("body {i}\r\n").as_bytes(),
            )
        })
        .collect();
    let p = run(
        ServerConfig::default(),
        ClientConfig::default(),
        &msgs,
        Some((7, 64)),
    );
    assert_all_delivered(&p, &msgs, false);
    assert!(p.client.is_pipelining());
    // RFC 2920 grouping: MAIL, every RCPT and DATA leave in one write.
    let group = p
        .client_writes
        .iter()
        .find(|w| contains(w, b"MAIL FROM"))
        .expect("a MAIL write");
    assert_eq!(count(group, b"RCPT TO:<"), 60);
    assert!(group.ends_with(b"DATA\r\n"));
    // The body, the dot and the next MAIL group travel together too.
    let joined = p
        .client_writes
        .iter()
        .filter(|w| contains(w, b".\r\nMAIL FROM"))
        .count();
    assert_eq!(joined, 2);
    assert_eq!(p.server_replies(CommandKind::Rcpt), vec![250; 180]);
    assert_eq!(p.client_replies(CommandKind::Rcpt), vec![250; 180]);
}

#[test]
fn unpipelined_session_same_result() {
    let msgs = sample_messages();
    let piped = run(
        ServerConfig::default(),
        ClientConfig::default(),
        &msgs,
        None,
    );
    let client = ClientConfig {
        pipelining: PipeliningMode::Off,
        ..ClientConfig::default()
    };
    let unpiped = run(ServerConfig::default(), client, &msgs, Some((3, 5)));
    assert_all_delivered(&unpiped, &msgs, false);
    assert!(!unpiped.client.is_pipelining());
    assert_eq!(piped.client_messages(), unpiped.client_messages());
    assert_eq!(piped.server_messages(), unpiped.server_messages());
    assert_eq!(piped.hooks.bodies, unpiped.hooks.bodies);
    // Lock-step: every command write holds one command line.
    for w in unpiped
        .client_writes
        .iter()
        .filter(|w| !w.ends_with(b"\r\n.\r\n") && w.as_slice() != b".\r\n")
    {
        assert_eq!(
            count(w, b"\r\n"),
            1,
            "one command per write: {:?}",
            String::from_utf8_lossy(w)
        );
    }
    // A server that does not advertise PIPELINING gets the same lock-step.
    let mut server = ServerConfig::default();
    server.ext.pipelining = false;
    let p = run(server, ClientConfig::default(), &msgs, Some((4, 9)));
    assert_all_delivered(&p, &msgs, false);
    assert!(!p.client.is_pipelining());
    assert_eq!(p.client_messages(), unpiped.client_messages());
}

fn tls_server() -> ServerConfig {
    ServerConfig {
        starttls_available: true,
        require_tls: true,
        auth_enabled: true,
        auth_requires_tls: true,
        ..ServerConfig::default()
    }
}

#[test]
fn starttls_then_auth_plain_over_rustls() {
    let msgs = sample_messages();
    for seed in [None, Some((11, 7)), Some((12, 300))] {
        let client = ClientConfig {
            starttls: true,
            auth: Some(ClientAuth {
                mech: AuthMech::Plain,
                user: "alice".into(),
                pass: "s3cret".into(),
            }),
            ..ClientConfig::default()
        };
        let mut p = Pair::new(tls_server(), client, msgs.clone()).with_hooks(Recorder {
            creds: Some((b"alice".to_vec(), b"s3cret".to_vec())),
            ..Recorder::default()
        });
        if let Some((s, m)) = seed {
            p = p.with_chunking(s, m);
        }
        p.drive();
        assert_all_delivered(&p, &msgs, false);
        assert!(p.server.tls_active());
        assert_eq!(p.hooks.auth_attempts, 1);
        assert!(p.server_events.contains(&ServerEvent::StartTls));
        assert!(p.server_events.contains(&ServerEvent::Authenticated));
        assert!(p.client_events.contains(&ClientEvent::StartTls));
        assert_eq!(p.phase_latencies(Phase::StartTls).len(), 1);
        assert_eq!(p.phase_latencies(Phase::Auth).len(), 1);
        // The eavesdropper's view: STARTTLS and its 220 in clear, then only TLS.
        let c_tls = p.tls_from_c2s.expect("client switched to TLS");
        let s_tls = p.tls_from_s2c.expect("server switched to TLS");
        let (c_clear, c_secret) = p.wire_c2s.split_at(c_tls);
        let (s_clear, s_secret) = p.wire_s2c.split_at(s_tls);
        assert!(c_clear.ends_with(b"STARTTLS\r\n"));
        assert!(s_clear.ends_with(b"\r\n") && contains(s_clear, b"220 2.0.0"));
        assert!(!contains(c_clear, b"MAIL FROM") && !contains(c_clear, b"AUTH"));
        for needle in [
            &b"MAIL FROM"[..],
            b"RCPT TO",
            b"AUTH",
            b"EHLO",
            b"hello",
            b"Subject",
        ] {
            assert!(
                !contains(c_secret, needle),
                "{:?} leaked on the wire",
                String::from_utf8_lossy(needle)
            );
        }
        for needle in [&b"250"[..], b"235", b"354", b"221", b"PIPELINING"] {
            assert!(
                !contains(s_secret, needle),
                "{:?} leaked on the wire",
                String::from_utf8_lossy(needle)
            );
        }
        assert_eq!(c_secret[0], 0x16, "a TLS handshake record follows STARTTLS");
        // ...while the sessions did exchange those commands, through TLS.
        assert!(contains(&p.server_rx_plain, b"AUTH PLAIN "));
        assert_eq!(count(&p.server_rx_plain, b"MAIL FROM"), msgs.len());
        // The EHLO before TLS offered no AUTH (auth requires TLS), the one after did.
        let (pre, post) = p
            .client_rx_plain
            .split_at(memchr::memmem::find(&p.client_rx_plain, b"220 2.0.0").unwrap());
        assert!(!contains(pre, b"AUTH") && contains(pre, b"STARTTLS"));
        assert!(!contains(post, b"STARTTLS"));
    }
}

#[test]
fn plaintext_injected_around_starttls_never_reaches_either_session() {
    // CVE-2011-0411 in both directions: a man in the middle appends
    // plaintext behind STARTTLS and behind its 220. Both must be dropped.
    let msgs = sample_messages();
    let client = ClientConfig {
        starttls: true,
        ..ClientConfig::default()
    };
    let mut p = Pair::new(tls_server(), client, msgs.clone());
    p.inject_c2s = Some((
        b"STARTTLS\r\n".to_vec(),
        b"RSET\r\nMAIL FROM:<evil@x>\r\n".to_vec(),
    ));
    p.inject_s2c = Some((
        b"Ready to start TLS\r\n".to_vec(),
        b"250 evil\r\n554 evil\r\n".to_vec(),
    ));
    p.drive();
    assert!(
        p.inject_c2s.is_none() && p.inject_s2c.is_none(),
        "both injections happened"
    );
    assert!(contains(
        &p.wire_c2s,
        b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@x>"
    ));
    assert!(contains(&p.wire_s2c, b"Ready to start TLS\r\n250 evil"));
    assert_all_delivered(&p, &msgs, false);
    assert!(p.server.tls_active());
    // The server session was handed the injected line with STARTTLS and
    // dropped it: no command with it ever reached the hooks.
    assert_eq!(count(&p.server_rx_plain, b"MAIL FROM:<evil@x>"), 1);
    assert!(
        p.hooks
            .commands
            .iter()
            .all(|(_, arg, _)| !contains(arg, b"evil")),
        "injected command executed"
    );
    // The client likewise saw the fake replies in the 220's read and ignored them.
    assert_eq!(count(&p.client_rx_plain, b"250 evil"), 1);
    assert_eq!(p.client_replies(CommandKind::StartTls), vec![220]);
}

#[test]
fn auth_login_wrong_password_rejects_every_message() {
    let msgs = sample_messages();
    let server = ServerConfig {
        auth_enabled: true,
        ..ServerConfig::default()
    };
    let client = ClientConfig {
        auth: Some(ClientAuth {
            mech: AuthMech::Login,
            user: "alice".into(),
            pass: "wrong".into(),
        }),
        ..ClientConfig::default()
    };
    let mut p = Pair::new(server, client, msgs.clone()).with_hooks(Recorder {
        creds: Some((b"alice".to_vec(), b"s3cret".to_vec())),
        ..Recorder::default()
    });
    p.drive();
    p.assert_client_invariants(msgs.len());
    assert_eq!(
        p.client_outcomes(msgs.len()),
        vec![(Outcome::Rejected, 535, 0); msgs.len()]
    );
    assert_eq!(p.client_replies(CommandKind::Auth), vec![334, 334, 535]);
    assert_eq!(p.server_replies(CommandKind::Auth), vec![334, 334, 535]);
    assert_eq!(p.hooks.auth_attempts, 1);
    assert!(!p.server_events.contains(&ServerEvent::Authenticated));
    assert!(p.server_messages().is_empty());
    assert!(p.hooks.bodies.is_empty());
    assert_eq!(
        p.hooks.count(CommandKind::Mail),
        0,
        "no transaction after a failed AUTH"
    );
    assert_eq!(
        p.server_events.last(),
        Some(&ServerEvent::Close(CloseReason::Quit))
    );
}

#[test]
fn bdat_session_delivers_exact_octets() {
    let mut msgs = sample_messages();
    // With BDAT anything goes: bare LF, bare CR, a lone dot line, no final CRLF.
    msgs.push(message(
        "m@example.com",
        &["n@example.com"],
        b"",
        b"a\nb\rc\r\n.\r\n\r\n.\r\nlast",
    ));
    let client = ClientConfig {
        bdat: true,
        ..ClientConfig::default()
    };
    for seed in [None, Some((21, 3)), Some((22, 100))] {
        let p = run(ServerConfig::default(), client.clone(), &msgs, seed);
        assert_all_delivered(&p, &msgs, true);
        assert_eq!(p.server_replies(CommandKind::Bdat), vec![250; msgs.len()]);
        assert_eq!(p.hooks.count(CommandKind::Data), 0);
        assert!(!contains(&p.wire_c2s, b"DATA\r\n"));
        // No dot-stuffing with BDAT: the dot lines went out as they are.
        assert!(contains(&p.wire_c2s, b"\r\n.\r\n..\r\n.x\r\n"));
    }
}

#[test]
fn bdat_chunked_with_small_chunk_size() {
    let msgs = sample_messages();
    for pipelining in [PipeliningMode::Auto, PipeliningMode::Off] {
        let client = ClientConfig {
            bdat: true,
            bdat_chunk_size: 7,
            pipelining,
            ..ClientConfig::default()
        };
        let p = run(ServerConfig::default(), client, &msgs, Some((31, 11)));
        assert_all_delivered(&p, &msgs, true);
        let chunks: usize = msgs
            .iter()
            .map(|m| (m.header.len() + m.body.len()).div_ceil(7).max(1))
            .sum();
        assert_eq!(p.server_replies(CommandKind::Bdat), vec![250; chunks]);
        assert_eq!(p.client_replies(CommandKind::Bdat), vec![250; chunks]);
        assert_eq!(count(&p.wire_c2s, b" LAST\r\n"), msgs.len());
    }
}

#[test]
fn lmtp_one_reply_per_recipient() {
    let msgs = vec![
        message("a@x", &["r1@y", "r2@y", "r3@y"], b"", b"one\r\n"),
        message("a@x", &["r4@y"], b"", b"two\r\n"),
        message("a@x", &["r5@y", "r6@y"], b".dot header\r\n", b"three\r\n"),
    ];
    let server = ServerConfig {
        lmtp: true,
        ..ServerConfig::default()
    };
    let client = ClientConfig {
        lmtp: true,
        ..ClientConfig::default()
    };
    let p = run(server, client, &msgs, Some((41, 13)));
    assert_all_delivered(&p, &msgs, false);
    assert!(contains(&p.wire_c2s, b"LHLO "));
    assert!(!contains(&p.wire_c2s, b"EHLO "));
    // One final reply per accepted recipient, each naming its recipient.
    assert_eq!(p.server_replies(CommandKind::Dot), vec![250; 6]);
    assert_eq!(p.client_replies(CommandKind::Dot), vec![250; 6]);
    for r in ["r1@y", "r2@y", "r3@y", "r4@y", "r5@y", "r6@y"] {
        assert_eq!(
            count(
                &p.client_rx_plain,
                format!("250 2.0.0 <{r}> Delivered\r\n").as_bytes()
            ),
            1,
            "{r}"
        );
    }
    assert_eq!(p.phase_latencies(Phase::Message).len(), 3);
}

#[test]
fn server_fault_rcpt_451_tempfails_that_message_only() {
    let msgs: Vec<Message> = (0..4)
        .map(|i| {
            message(
                "s@x",
                &[&format!("rcpt{i}@y"), &format!("cc{i}@y")],
                b"",
                format!("body {i}\r\n").as_bytes(),
            )
        })
        .collect();
    for pipelining in [PipeliningMode::Auto, PipeliningMode::Off] {
        let fault = |kind: CommandKind, info: &smtpstorm::smtp::server::CommandInfo<'_>| match (
            kind,
            info.mail_from,
        ) {
            (CommandKind::Rcpt, _) if info.rcpt_to.is_some_and(|r| r.ends_with(b"1@y")) => {
                Verdict::Reply(451)
            }
            _ => Verdict::Proceed,
        };
        let client = ClientConfig {
            pipelining,
            ..ClientConfig::default()
        };
        let mut p = Pair::new(ServerConfig::default(), client, msgs.clone())
            .with_hooks(Recorder {
                fault: Some(Box::new(fault)),
                ..Recorder::default()
            })
            .with_chunking(51, 19);
        p.drive();
        p.assert_client_invariants(4);
        let out = p.client_outcomes(4);
        assert_eq!(out[0], (Outcome::Accepted, 250, 2));
        assert_eq!(out[1], (Outcome::TempFailed, 451, 0), "{pipelining:?}");
        assert_eq!(out[2], (Outcome::Accepted, 250, 2));
        assert_eq!(out[3], (Outcome::Accepted, 250, 2));
        // The server delivered the other three, and nothing of message 1.
        let bodies: Vec<Vec<u8>> = [0, 2, 3]
            .iter()
            .map(|&i| expected_data_body(&msgs[i]))
            .collect();
        assert_eq!(p.hooks.bodies, bodies);
        assert_eq!(p.hooks.ends, vec![true; 3]);
        let server = p.server_messages();
        assert_eq!(server.len(), 3);
        assert!(server
            .iter()
            .all(|m| m.0 == MessageOutcome::Accepted && m.3 == 2));
        assert_eq!(
            p.server_replies(CommandKind::Rcpt)
                .iter()
                .filter(|&&c| c == 451)
                .count(),
            2
        );
        assert_eq!(
            p.server_events.last(),
            Some(&ServerEvent::Close(CloseReason::Quit))
        );
    }
}

#[test]
fn server_delay_fault_shows_in_latency() {
    let msgs = vec![
        message("s@x", &["r@y"], b"", b"one\r\n"),
        message("s@x", &["r@y"], b"", b"two\r\n"),
    ];
    let delay = Duration::from_millis(200);
    let mut dots = 0;
    let fault = move |kind: CommandKind, _: &smtpstorm::smtp::server::CommandInfo<'_>| match kind {
        CommandKind::Rcpt => Verdict::Delay(delay),
        CommandKind::Dot => {
            dots += 1;
            if dots == 2 {
                Verdict::Delay(Duration::from_millis(1500))
            } else {
                Verdict::Proceed
            }
        }
        _ => Verdict::Proceed,
    };
    let client = ClientConfig {
        pipelining: PipeliningMode::Off,
        ..ClientConfig::default()
    };
    let mut p = Pair::new(ServerConfig::default(), client, msgs.clone()).with_hooks(Recorder {
        fault: Some(Box::new(fault)),
        ..Recorder::default()
    });
    p.drive();
    assert_all_delivered(&p, &msgs, false);
    // On the virtual clock the latencies are exactly the injected delays.
    assert_eq!(p.phase_latencies(Phase::Rcpt), vec![delay, delay]);
    assert_eq!(
        p.phase_latencies(Phase::Message),
        vec![Duration::ZERO, Duration::from_millis(1500)]
    );
    assert_eq!(p.phase_latencies(Phase::Mail), vec![Duration::ZERO; 2]);
    assert_eq!(p.elapsed, Duration::from_millis(1900));
}

/// Every phase's start and end, through a 16 KiB send buffer where each
/// server read takes 1 ms, with the server holding the 354 for 5 ms and
/// the end-of-data reply for 7 ms. The 64 KB body needs five buffers.
///
/// ```text
/// t=0   greeting read; EHLO written        t=1   250 (read took 1 ms)
/// t=1   MAIL RCPT DATA written together    t=2   250 250; 354 held to t=7
/// t=7   body starts; buffers go out at 7, 8, 9, 10, 11 (the last one with
///       the end of data and the pipelined QUIT)
/// t=12  end of data read, its reply held to t=19; QUIT answered at t=19
/// ```
#[test]
fn each_phase_runs_from_its_command_written_to_its_reply() {
    let body = [vec![b'b'; 78], b"\r\n".to_vec()].concat().repeat(820);
    let msgs = vec![message("s@x", &["r@y"], b"Subject: big\r\n\r\n", &body)];
    let ms = Duration::from_millis;
    let fault = move |kind: CommandKind, _: &smtpstorm::smtp::server::CommandInfo<'_>| match kind {
        CommandKind::Data => Verdict::Delay(ms(5)),
        CommandKind::Dot => Verdict::Delay(ms(7)),
        _ => Verdict::Proceed,
    };
    let client = ClientConfig { pipelining: PipeliningMode::On, ..ClientConfig::default() };
    let mut p = Pair::new(ServerConfig::default(), client, msgs.clone())
        .with_link(16 * 1024, ms(1))
        .with_hooks(Recorder { fault: Some(Box::new(fault)), ..Recorder::default() });
    p.drive();
    assert_all_delivered(&p, &msgs, false);
    let one = |phase| {
        let v = p.phase_latencies(phase);
        assert_eq!(v.len(), 1, "{phase:?}: {v:?}");
        v[0]
    };
    assert_eq!(one(Phase::Banner), ms(0));
    assert_eq!(one(Phase::Ehlo), ms(1));
    // Written together, answered together: identical rows.
    assert_eq!(one(Phase::Mail), ms(1));
    assert_eq!(one(Phase::Rcpt), ms(1));
    assert_eq!(one(Phase::Data), ms(6));
    // The upload alone: 354 at t=7 to the last byte written at t=11.
    assert_eq!(one(Phase::Body), ms(4));
    // From the last byte of data written (t=11), not from the 354 (t=7):
    // the last read (1 ms) and the server's 7 ms.
    assert_eq!(one(Phase::Message), ms(8));
    assert_eq!(one(Phase::Quit), ms(8));
    assert_eq!(p.elapsed, ms(19));
}

/// With BDAT the body starts when its first byte is written, which is in
/// the same write as MAIL and RCPT.
#[test]
fn bdat_body_runs_from_its_first_byte_written() {
    let body = [vec![b'b'; 78], b"\r\n".to_vec()].concat().repeat(820);
    let msgs = vec![message("s@x", &["r@y"], b"Subject: big\r\n\r\n", &body)];
    let ms = Duration::from_millis;
    let fault = move |kind: CommandKind, _: &smtpstorm::smtp::server::CommandInfo<'_>| match kind {
        CommandKind::Dot => Verdict::Delay(ms(7)),
        _ => Verdict::Proceed,
    };
    let client = ClientConfig { bdat: true, pipelining: PipeliningMode::On, ..ClientConfig::default() };
    let mut p = Pair::new(ServerConfig::default(), client, msgs.clone())
        .with_link(16 * 1024, ms(1))
        .with_hooks(Recorder { fault: Some(Box::new(fault)), ..Recorder::default() });
    p.drive();
    assert_all_delivered(&p, &msgs, true);
    let lat = |phase| p.phase_latencies(phase);
    // MAIL, RCPT and the first BDAT bytes leave at t=1; the rest of the
    // 64 KB follows one buffer per ms: the last byte at t=5.
    assert_eq!(lat(Phase::Body), vec![ms(4)]);
    // Read at t=6, answered after 7 ms.
    assert_eq!(lat(Phase::Message), vec![ms(8)]);
    assert_eq!(lat(Phase::Mail), vec![ms(1)]);
}

#[test]
fn size_limit_rejects_big_message_then_next_one_passes() {
    // 50 lines of 100 bytes: over the size limit, every line legal.
    let big = [vec![b'y'; 98], b"\r\n".to_vec()].concat().repeat(50);
    let mut with_size = message("s@x", &["r@y"], b"", &big);
    with_size.mail_params = format!("SIZE={}", big.len());
    let msgs = vec![
        message("s@x", &["r@y"], b"", &big),
        message("s@x", &["r@y"], b"Subject: small\r\n\r\n", b"small\r\n"),
        with_size,
        message("s@x", &["r@y"], b"", b"small again\r\n"),
    ];
    let server = ServerConfig {
        max_message_size: 1000,
        ..ServerConfig::default()
    };
    for bdat in [false, true] {
        let client = ClientConfig {
            bdat,
            ..ClientConfig::default()
        };
        let p = run(server.clone(), client, &msgs, Some((61, 700)));
        p.assert_client_invariants(4);
        let out = p.client_outcomes(4);
        assert_eq!(out[0], (Outcome::Rejected, 552, 1), "bdat={bdat}");
        assert_eq!(out[1], (Outcome::Accepted, 250, 1));
        assert_eq!(out[2], (Outcome::Rejected, 552, 0), "SIZE= refused at MAIL");
        assert_eq!(out[3], (Outcome::Accepted, 250, 1));
        assert_eq!(
            p.client_replies(CommandKind::Mail),
            vec![250, 250, 552, 250]
        );
        let body = |m: &Message| {
            if bdat {
                expected_bdat_body(m)
            } else {
                expected_data_body(m)
            }
        };
        assert_eq!(
            p.hooks.accepted_bodies(),
            vec![&body(&msgs[1])[..], &body(&msgs[3])[..]]
        );
        assert_eq!(p.hooks.ends, vec![false, true, true]);
        let server_msgs = p.server_messages();
        assert_eq!(server_msgs.len(), 3);
        assert_eq!(
            (server_msgs[0].0, server_msgs[0].1),
            (MessageOutcome::Rejected, 552)
        );
        assert_eq!(
            server_msgs[1],
            (
                MessageOutcome::Accepted,
                250,
                body(&msgs[1]).len() as u64,
                1
            )
        );
        assert_eq!(
            server_msgs[2],
            (
                MessageOutcome::Accepted,
                250,
                body(&msgs[3]).len() as u64,
                1
            )
        );
    }
}

#[test]
fn require_tls_without_starttls_rejects() {
    let msgs = sample_messages();
    let server = ServerConfig {
        starttls_available: true,
        require_tls: true,
        ..ServerConfig::default()
    };
    let p = run(server, ClientConfig::default(), &msgs, None);
    p.assert_client_invariants(msgs.len());
    for (i, o) in p.client_outcomes(msgs.len()).into_iter().enumerate() {
        assert_eq!((o.0, o.1), (Outcome::Rejected, 530), "message {i}");
    }
    assert!(p.server_messages().is_empty());
    assert!(p.hooks.bodies.is_empty());
    assert!(!p.server.tls_active());
    assert!(p
        .server_replies(CommandKind::Mail)
        .iter()
        .all(|&c| c == 530));
    assert!(p.tls_from_c2s.is_none());
}

#[test]
fn client_timeout_when_server_delays_forever() {
    let msgs = vec![
        message("s@x", &["r@y"], b"", b"one\r\n"),
        message("s@x", &["r@y"], b"", b"two\r\n"),
    ];
    let fault = |kind: CommandKind, _: &smtpstorm::smtp::server::CommandInfo<'_>| match kind {
        CommandKind::Dot => Verdict::Delay(Duration::from_secs(86_400)),
        _ => Verdict::Proceed,
    };
    let timeout = Duration::from_secs(30);
    let client = ClientConfig {
        timeouts: ClientTimeouts::uniform(timeout),
        ..ClientConfig::default()
    };
    let mut p = Pair::new(ServerConfig::default(), client, msgs).with_hooks(Recorder {
        fault: Some(Box::new(fault)),
        ..Recorder::default()
    });
    p.drive();
    p.assert_client_invariants(2);
    // Pipelining sent message 1's MAIL/RCPT/DATA behind the first dot; the
    // held dot holds them too, so message 1 never had a recipient accepted.
    assert_eq!(
        p.client_outcomes(2),
        vec![(Outcome::Timeout, 0, 1), (Outcome::Timeout, 0, 0)]
    );
    assert_eq!(p.elapsed, timeout, "the client gave up at its own deadline");
    assert_eq!(p.client_errors().len(), 1);
    // The server got the whole first body, and is still holding its reply.
    assert!(p.server_messages().is_empty());
    assert!(p.hooks.ends.is_empty());
    assert_eq!(p.hooks.open_body.as_deref(), Some(&b"one\r\n"[..]));
    assert!(!p.server.is_closed());
}

#[test]
fn dot_lines_survive_stuffing_and_unstuffing() {
    let bodies: [&[u8]; 7] = [
        b".\r\n",
        b"..\r\n",
        b"...\r\n.\r\n..\r\n",
        b"\r\n.\r\n\r\n",
        b".leading\r\n mid.dle\r\ntrailing.\r\n",
        b"a\r\n.\r\n.\r\nb",
        b".",
    ];
    let msgs: Vec<Message> = bodies
        .iter()
        .map(|b| message("s@x", &["r@y"], b"", b))
        .collect();
    for seed in [None, Some((71, 1)), Some((72, 4))] {
        let p = run(
            ServerConfig::default(),
            ClientConfig::default(),
            &msgs,
            seed,
        );
        assert_all_delivered(&p, &msgs, false);
        // On the wire every line-leading dot was doubled.
        assert!(contains(&p.wire_c2s, b"DATA\r\n..\r\n.\r\n"));
        assert!(contains(&p.wire_c2s, b"DATA\r\n....\r\n..\r\n...\r\n.\r\n"));
        assert!(contains(&p.wire_c2s, b"DATA\r\n..\r\n.\r\n"));
        assert!(
            contains(&p.wire_c2s, b"DATA\r\n..\r\n.\r\n")
                && contains(&p.wire_c2s, b"\r\n..\r\n\r\n.\r\n")
        );
    }
}

#[test]
fn proxy_v2_header_reaches_server() {
    let msgs = sample_messages();
    let src: std::net::SocketAddr = "203.0.113.7:40123".parse().unwrap();
    let dst: std::net::SocketAddr = "198.51.100.1:25".parse().unwrap();
    for (seed, v2) in [(81, true), (82, false), (83, true)] {
        let server = ServerConfig {
            proxy_protocol: true,
            ..ServerConfig::default()
        };
        let mut p = Pair::new(server, ClientConfig::default(), msgs.clone()).with_chunking(seed, 5);
        let mut hdr = Vec::new();
        if v2 {
            proxy::write_v2(src, dst, &mut hdr)
        } else {
            proxy::write_v1(src, dst, &mut hdr)
        }
        p.client_raw_write(&hdr);
        p.drive();
        assert_all_delivered(&p, &msgs, false);
        assert_eq!(
            p.server_events[0],
            ServerEvent::Proxy(proxy::ProxyHeader {
                src: Some(src),
                dst: Some(dst)
            })
        );
        assert!(
            p.hooks
                .commands
                .iter()
                .all(|(_, _, peer)| *peer == Some(src)),
            "every command knows the real peer"
        );
        assert!(p.wire_c2s.starts_with(&hdr));
    }
}

// ---- property: any bodies, any chunking, counts and bytes agree ----------

/// A body line: dots, empty lines, long lines under 1000, any bytes but CR/LF.
fn line() -> impl Strategy<Value = Vec<u8>> {
    let byte = any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n');
    prop_oneof![
        3 => prop::collection::vec(byte.clone(), 0..80),
        1 => Just(Vec::new()),
        1 => Just(b".".to_vec()),
        1 => prop::collection::vec(byte.clone(), 0..20).prop_map(|mut v| { v.insert(0, b'.'); v }),
        1 => (900usize..998).prop_map(|n| vec![b'L'; n]),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(line(), 0..12), any::<bool>()).prop_map(|(lines, final_crlf)| {
        let mut b = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            b.extend_from_slice(l);
            if i + 1 < lines.len() || final_crlf {
                b.extend_from_slice(b"\r\n");
            }
        }
        b
    })
}

fn messages() -> impl Strategy<Value = Vec<Message>> {
    prop::collection::vec((body(), 1usize..6), 1..6).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (b, n))| {
                let rcpts: Vec<String> = (0..n).map(|r| format!("m{i}r{r}@example.org")).collect();
                Message {
                    mail_from: format!("from{i}@example.com"),
                    mail_params: String::new(),
                    rcpt_to: rcpts,
                    header: Vec::new(),
                    body: Arc::from(b),
                    data: None,
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_bodies_arrive_byte_exact_under_any_chunking(
        msgs in messages(),
        seed in any::<u64>(),
        max_chunk in 1usize..200,
        mode in 0u8..4,
    ) {
        let client = ClientConfig {
            pipelining: if mode & 1 == 0 { PipeliningMode::Auto } else { PipeliningMode::Off },
            bdat: mode & 2 != 0,
            bdat_chunk_size: if mode & 2 != 0 { (seed % 50) as usize } else { 0 },
            ..ClientConfig::default()
        };
        let p = run(ServerConfig::default(), client, &msgs, Some((seed, max_chunk)));
        assert_all_delivered(&p, &msgs, mode & 2 != 0);
        let accepted_client = p.client_messages().iter().filter(|m| m.1 == Outcome::Accepted).count();
        let accepted_server = p.server_messages().iter().filter(|m| m.0 == MessageOutcome::Accepted).count();
        prop_assert_eq!(accepted_client, accepted_server);
        let rcpts_client: u32 = p.client_messages().iter().map(|m| m.3).sum();
        let rcpts_server: u32 = p.server_messages().iter().map(|m| m.3).sum();
        prop_assert_eq!(rcpts_client, rcpts_server);
    }
}

#[test]
fn the_chunking_rng_is_deterministic() {
    let mut a = Rng(5);
    let mut b = Rng(5);
    assert!((0..100).all(|_| a.range(1, 9) == b.range(1, 9)));
}

// ---- property: random server faults, both sides still agree ---------------

/// A fault verdict for a command, drawn from a small menu.
fn verdict_of(choice: u8) -> Verdict {
    match choice {
        0 => Verdict::Reply(421),
        1 => Verdict::Reply(451),
        2 => Verdict::Reply(452),
        3 => Verdict::Reply(550),
        4 => Verdict::Reply(554),
        5 => Verdict::Delay(Duration::from_millis(250)),
        6 => Verdict::Disconnect,
        7 => Verdict::Disconnect421,
        _ => Verdict::Proceed,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Whatever the server's faults, every message gets one outcome on the
    /// client, the server accepted exactly the messages the client counts as
    /// accepted, and those arrived byte-exact.
    #[test]
    fn random_faults_keep_both_sides_in_agreement(
        msgs in messages(),
        faults in prop::collection::vec((0usize..CommandKind::ALL.len(), 0u8..9, 1u32..4), 0..4),
        seed in any::<u64>(),
        mode in 0u8..4,
    ) {
        let bdat = mode & 2 != 0;
        let client = ClientConfig {
            pipelining: if mode & 1 == 0 { PipeliningMode::Auto } else { PipeliningMode::Off },
            bdat,
            bdat_chunk_size: if bdat { (seed % 40) as usize } else { 0 },
            timeouts: ClientTimeouts::uniform(Duration::from_secs(60)),
            ..ClientConfig::default()
        };
        // Fault i hits every `every`-th command of its kind.
        let mut seen = [0u32; CommandKind::ALL.len()];
        let plan = faults.clone();
        let fault = move |kind: CommandKind, _: &smtpstorm::smtp::server::CommandInfo<'_>| {
            let k = CommandKind::ALL.iter().position(|c| *c == kind).unwrap();
            seen[k] += 1;
            for &(fk, choice, every) in &plan {
                if fk == k && seen[k] % every == 0 {
                    return verdict_of(choice);
                }
            }
            Verdict::Proceed
        };
        let mut p = Pair::new(ServerConfig::default(), client, msgs.clone())
            .with_hooks(Recorder { fault: Some(Box::new(fault)), ..Recorder::default() })
            .with_chunking(seed, 1 + (seed % 97) as usize);
        p.drive();
        p.assert_client_invariants(msgs.len());
        let client_ok: Vec<usize> = p.client_outcomes(msgs.len()).iter().enumerate()
            .filter(|(_, o)| o.0 == Outcome::Accepted).map(|(i, _)| i).collect();
        let server_ok = p.server_messages().iter().filter(|m| m.0 == MessageOutcome::Accepted).count();
        prop_assert_eq!(client_ok.len(), server_ok, "accepted counts: {:?} vs {:?}", p.client_messages(), p.server_messages());
        let want: Vec<Vec<u8>> = client_ok.iter()
            .map(|&i| if bdat { expected_bdat_body(&msgs[i]) } else { expected_data_body(&msgs[i]) }).collect();
        let got: Vec<Vec<u8>> = p.hooks.accepted_bodies().into_iter().map(<[u8]>::to_vec).collect();
        prop_assert_eq!(got, want);
        // Balanced hooks: every ended message was started.
        prop_assert_eq!(p.hooks.ends.len(), p.hooks.bodies.len());
        for (i, o, _, r) in p.client_messages() {
            if o == Outcome::Accepted {
                prop_assert!(r >= 1 && r as usize <= msgs[i].rcpt_to.len());
            }
        }
    }
}
