//! Byte-script tests of the sans-IO SMTP client session.
//!
//! Each script alternates server input and the exact bytes the client must
//! send in answer. Every script is replayed with its input fed whole, one
//! byte at a time, and split in two at every position of every step: the
//! client's output and its events must be identical in all replays.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use smtpstorm::smtp::client::{
    dot_stuff, AuthMech, ClientAuth, ClientConfig, ClientEvent, ClientSession, Message, PipeliningMode,
};
use smtpstorm::smtp::{ClientTimeouts, CommandKind, Outcome, Phase};

/// What the fake server does at one step.
#[derive(Clone, Debug)]
enum In {
    /// Send these reply bytes.
    Bytes(&'static [u8]),
    /// The TLS handshake completes.
    Tls,
    /// The peer closes.
    Close,
    /// Time jumps to the session's deadline.
    Timeout,
}

/// One step: server action, then the bytes the client must have sent.
type Step = (In, &'static [u8]);

const STEP: Duration = Duration::from_millis(10);

#[derive(Debug, PartialEq)]
struct Run {
    events: Vec<ClientEvent>,
    done: bool,
}

/// Replay `script`; `split(step, len)` gives the cut points of each Bytes step.
#[track_caller]
fn run(
    cfg: &Arc<ClientConfig>,
    xclient: Option<&[u8]>,
    msgs: &[Message],
    script: &[Step],
    split: &dyn Fn(usize, usize) -> Vec<usize>,
) -> Run {
    let t0 = Instant::now();
    let mut s = ClientSession::new(Arc::clone(cfg), msgs.to_vec(), t0);
    s.set_xclient(xclient.map(Box::from));
    let mut events = Vec::new();
    let mut out = Vec::new();
    s.poll_transmit(t0, &mut out);
    assert!(out.is_empty(), "client spoke before the greeting");
    for (i, (input, expected)) in script.iter().enumerate() {
        let now = t0 + STEP * (i as u32 + 1);
        match input {
            In::Bytes(b) => {
                let mut prev = 0;
                let mut cuts = split(i, b.len());
                cuts.push(b.len());
                for cut in cuts {
                    s.handle_input(now, &b[prev..cut]);
                    s.poll_transmit(now, &mut out);
                    prev = cut;
                }
            }
            In::Tls => s.handle_tls_established(now),
            In::Close => s.handle_close(now),
            In::Timeout => {
                let deadline = s.poll_timeout().expect("a deadline is armed");
                s.handle_timeout(deadline - Duration::from_nanos(1));
                assert!(!s.is_done(), "timeout fired early");
                s.handle_timeout(deadline);
            }
        }
        s.poll_transmit(now, &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(expected),
            "client bytes after step {i} ({input:?})"
        );
        out.clear();
        while let Some(e) = s.poll_event() {
            events.push(e);
        }
    }
    Run { events, done: s.is_done() }
}

/// Run the script whole, byte by byte and split in two everywhere; all runs
/// must agree. Returns the events.
#[track_caller]
fn check(cfg: ClientConfig, msgs: &[Message], script: &[Step]) -> Vec<ClientEvent> {
    check_xclient(cfg, None, msgs, script)
}

/// [`check`] for a session that claims an identity with XCLIENT.
#[track_caller]
fn check_xclient(cfg: ClientConfig, xclient: Option<&[u8]>, msgs: &[Message], script: &[Step]) -> Vec<ClientEvent> {
    let cfg = Arc::new(cfg);
    let whole = run(&cfg, xclient, msgs, script, &|_, _| vec![]);
    let bytewise = run(&cfg, xclient, msgs, script, &|_, n| (1..n).collect());
    assert_eq!(bytewise, whole, "byte-at-a-time replay differs");
    for (step, (input, _)) in script.iter().enumerate() {
        if let In::Bytes(b) = input {
            for k in 0..=b.len() {
                let r = run(&cfg, xclient, msgs, script, &|i, _| if i == step { vec![k] } else { vec![] });
                assert_eq!(r, whole, "split of step {step} at {k} differs");
            }
        }
    }
    check_invariant(&whole.events, msgs.len(), whole.done);
    whole.events
}

/// Exactly one Message event per message, and Done once and last if done.
#[track_caller]
fn check_invariant(events: &[ClientEvent], n: usize, done: bool) {
    let mut seen = vec![0; n];
    for e in events {
        if let ClientEvent::Message { index, .. } = e {
            seen[*index] += 1;
        }
    }
    let dones = events.iter().filter(|e| **e == ClientEvent::Done).count();
    if done {
        assert_eq!(seen, vec![1; n], "one outcome per message: {events:?}");
        assert_eq!(dones, 1);
        assert_eq!(events.last(), Some(&ClientEvent::Done));
    } else {
        assert!(seen.iter().all(|&c| c <= 1));
        assert_eq!(dones, 0);
    }
}

fn outcomes(events: &[ClientEvent]) -> Vec<(usize, Outcome, u16, u32)> {
    let mut v: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Message { index, outcome, code, recipients_accepted, .. } => {
                Some((*index, *outcome, *code, *recipients_accepted))
            }
            _ => None,
        })
        .collect();
    v.sort_by_key(|x| x.0);
    v
}

fn errors(events: &[ClientEvent]) -> Vec<String> {
    events.iter().filter_map(|e| if let ClientEvent::Error(s) = e { Some(s.clone()) } else { None }).collect()
}

fn phases(events: &[ClientEvent]) -> Vec<(Phase, Duration)> {
    events.iter().filter_map(|e| if let ClientEvent::Phase { phase, latency, .. } = e { Some((*phase, *latency)) } else { None }).collect()
}

fn msg(rcpts: &[&str], body: &[u8]) -> Message {
    Message {
        mail_from: "a@x".into(),
        mail_params: String::new(),
        rcpt_to: rcpts.iter().map(|r| r.to_string()).collect(),
        header: b"Subject: t\r\n\r\n".to_vec(),
        body: Arc::from(body),
        data: None,
    }
}

fn cfg() -> ClientConfig {
    ClientConfig { helo_name: "c.test".into(), ..Default::default() }
}

const EHLO_PIPE: &[u8] = b"250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n";
const EHLO_PLAIN: &[u8] = b"250-mx.test\r\n250 SIZE 1000\r\n";

#[test]
fn plain_session_without_pipelining_sends_one_command_at_a_time() {
    let msgs = [msg(&["b@y"], b"hi\r\n")];
    let ev = check(
        cfg(),
        &msgs,
        &[
            (In::Bytes(b"220 mx.test ESMTP\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PLAIN), b"MAIL FROM:<a@x>\r\n"),
            (In::Bytes(b"250 2.1.0 ok\r\n"), b"RCPT TO:<b@y>\r\n"),
            (In::Bytes(b"250 2.1.5 ok\r\n"), b"DATA\r\n"),
            (In::Bytes(b"354 go\r\n"), b"Subject: t\r\n\r\nhi\r\n.\r\n"),
            (In::Bytes(b"250 2.0.0 queued\r\n"), b"QUIT\r\n"),
            (In::Bytes(b"221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
    let p = phases(&ev);
    let names: Vec<Phase> = p.iter().map(|x| x.0).collect();
    assert_eq!(
        names,
        vec![Phase::Banner, Phase::Ehlo, Phase::Mail, Phase::Rcpt, Phase::Data, Phase::Body, Phase::Message, Phase::Quit]
    );
    // Banner counts from creation (one step), every reply one step after its
    // command; the body went out at once with the 354 that asked for it.
    assert!(p.iter().all(|x| x.1 == if x.0 == Phase::Body { Duration::ZERO } else { STEP }), "{p:?}");
    assert!(ev.contains(&ClientEvent::Reply { command: CommandKind::Dot, code: 250 }));
}

#[test]
fn a_refused_rset_ends_the_session_before_another_transaction_can_join_what_the_server_kept_open() {
    let msgs = [msg(&["b@y"], b"1"), msg(&["c@y"], b"2"), msg(&["d@y"], b"3")];
    let ev = check(
        cfg(),
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
            // Message 1: its only recipient refused, DATA refused: RSET.
            (In::Bytes(b"250 ok\r\n451 later\r\n554 no valid recipients\r\n"), b"RSET\r\n"),
            // The server keeps its transaction: nothing more is sent but QUIT.
            (In::Bytes(b"451 4.3.0 cannot reset\r\n"), b"QUIT\r\n"),
            (In::Bytes(b"221 bye\r\n"), b""),
        ],
    );
    assert_eq!(
        outcomes(&ev),
        vec![(0, Outcome::TempFailed, 451, 0), (1, Outcome::TempFailed, 451, 0), (2, Outcome::TempFailed, 451, 0)]
    );
    assert!(errors(&ev).iter().any(|e| e.contains("RSET refused with 451")), "{ev:?}");
}

#[test]
fn pipelined_session_groups_commands_and_pipelines_the_next_transaction_after_the_body() {
    let msgs = [msg(&["b@y", "c@y"], b".dot\r\n"), msg(&["d@y"], b"x")];
    let ev = check(
        cfg(),
        &msgs,
        &[
            (In::Bytes(b"220 mx.test\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n"),
            (
                In::Bytes(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
                b"Subject: t\r\n\r\n..dot\r\n.\r\nMAIL FROM:<a@x>\r\nRCPT TO:<d@y>\r\nDATA\r\n",
            ),
            (In::Bytes(b"250 queued 1\r\n250 ok\r\n250 ok\r\n354 go\r\n"), b"Subject: t\r\n\r\nx\r\n.\r\nQUIT\r\n"),
            (In::Bytes(b"250 queued 2\r\n221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 2), (1, Outcome::Accepted, 250, 1)]);
    // The first message's final reply came one step after its body was sent.
    let msg_phases: Vec<_> = phases(&ev).into_iter().filter(|p| p.0 == Phase::Message).collect();
    assert_eq!(msg_phases, vec![(Phase::Message, STEP), (Phase::Message, STEP)]);
}

#[test]
fn pipelined_rcpt_failures_are_attributed() {
    let msgs = [msg(&["b@y", "c@y"], b"1"), msg(&["d@y", "e@y"], b"2"), msg(&["f@y"], b"3")];
    let ev = check(
        cfg(),
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n"),
            (
                In::Bytes(b"250 ok\r\n550 5.1.1 no\r\n250 ok\r\n354 go\r\n"),
                b"Subject: t\r\n\r\n1\r\n.\r\nMAIL FROM:<a@x>\r\nRCPT TO:<d@y>\r\nRCPT TO:<e@y>\r\nDATA\r\n",
            ),
            // Message 1: accepted for one recipient. Message 2: every RCPT
            // fails (one 4xx) so DATA gets 554 and a RSET precedes message 3;
            // message 3's group waits for the RSET's reply.
            (
                In::Bytes(b"250 ok\r\n250 ok\r\n550 no\r\n451 later\r\n554 no valid recipients\r\n"),
                b"RSET\r\n",
            ),
            (In::Bytes(b"250 reset\r\n"), b"MAIL FROM:<a@x>\r\nRCPT TO:<f@y>\r\nDATA\r\n"),
            (In::Bytes(b"250 ok\r\n250 ok\r\n354 go\r\n"), b"Subject: t\r\n\r\n3\r\n.\r\nQUIT\r\n"),
            (In::Bytes(b"550 5.7.1 spam\r\n221 bye\r\n"), b""),
        ],
    );
    assert_eq!(
        outcomes(&ev),
        vec![(0, Outcome::Accepted, 250, 1), (1, Outcome::TempFailed, 451, 0), (2, Outcome::Rejected, 550, 1)]
    );
    let rcpt_replies = ev.iter().filter(|e| matches!(e, ClientEvent::Reply { command: CommandKind::Rcpt, .. })).count();
    assert_eq!(rcpt_replies, 5);
}

#[test]
fn pipelined_mail_failure_consumes_the_503s_and_continues_without_rset() {
    let msgs = [msg(&["b@y"], b"1"), msg(&["c@y"], b"2")];
    let ev = check(
        cfg(),
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
            (
                In::Bytes(b"451 4.3.0 try later\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no valid recipients\r\n"),
                b"MAIL FROM:<a@x>\r\nRCPT TO:<c@y>\r\nDATA\r\n",
            ),
            (In::Bytes(b"250 ok\r\n250 ok\r\n354 go\r\n"), b"Subject: t\r\n\r\n2\r\n.\r\nQUIT\r\n"),
            (In::Bytes(b"250 ok\r\n221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::TempFailed, 451, 0), (1, Outcome::Accepted, 250, 1)]);
}

#[test]
fn a_354_without_any_valid_recipient_gets_a_lone_dot() {
    let msgs = [msg(&["b@y"], b"secret"), msg(&["c@y"], b"2")];
    let ev = check(
        ClientConfig { pipelining: PipeliningMode::On, ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PLAIN), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
            (In::Bytes(b"250 ok\r\n550 no\r\n354 go anyway\r\n"), b".\r\nMAIL FROM:<a@x>\r\nRCPT TO:<c@y>\r\nDATA\r\n"),
            (In::Bytes(b"250 empty\r\n250 ok\r\n250 ok\r\n354 go\r\n"), b"Subject: t\r\n\r\n2\r\n.\r\nQUIT\r\n"),
            (In::Bytes(b"250 ok\r\n221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Rejected, 550, 0), (1, Outcome::Accepted, 250, 1)]);
}

#[test]
fn unpipelined_all_rcpts_failing_sends_rset_not_data() {
    let msgs = [msg(&["b@y"], b"1"), msg(&["c@y"], b"2")];
    let ev = check(
        cfg(),
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PLAIN), b"MAIL FROM:<a@x>\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"RCPT TO:<b@y>\r\n"),
            (In::Bytes(b"550 no\r\n"), b"RSET\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"MAIL FROM:<a@x>\r\n"),
            (In::Bytes(b"550 sender\r\n"), b"QUIT\r\n"),
            (In::Bytes(b"221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Rejected, 550, 0), (1, Outcome::Rejected, 550, 0)]);
}

#[test]
fn ehlo_5xx_falls_back_to_helo() {
    let msgs = [msg(&["b@y"], b"1")];
    let ev = check(
        ClientConfig { pipelining: PipeliningMode::Auto, ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 old\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(b"502 what\r\n"), b"HELO c.test\r\n"),
            (In::Bytes(b"250 old\r\n"), b"MAIL FROM:<a@x>\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"RCPT TO:<b@y>\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"DATA\r\n"),
            (In::Bytes(b"354 go\r\n"), b"Subject: t\r\n\r\n1\r\n.\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"QUIT\r\n"),
            (In::Bytes(b"221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
    assert!(ev.contains(&ClientEvent::Reply { command: CommandKind::Helo, code: 250 }));
}

#[test]
fn garbage_reply_is_protocol_error() {
    let msgs = [msg(&["b@y"], b"1"), msg(&["c@y"], b"2")];
    let ev = check(
        cfg(),
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PLAIN), b"MAIL FROM:<a@x>\r\n"),
            (In::Bytes(b"HTTP/1.1 400 Bad Request\r\n"), b""),
            (In::Bytes(b"250 ignored after the end\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::ProtocolError, 0, 0), (1, Outcome::ProtocolError, 0, 0)]);
    assert_eq!(errors(&ev).len(), 1);
}

#[test]
fn unexpected_reply_class_is_protocol_error() {
    let msgs = [msg(&["b@y"], b"1")];
    let ev = check(
        cfg(),
        &msgs,
        &[(In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"), (In::Bytes(EHLO_PLAIN), b"MAIL FROM:<a@x>\r\n"), (In::Bytes(b"354 eh?\r\n"), b"")],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::ProtocolError, 0, 0)]);
}

#[test]
fn multiline_reply_split_anywhere() {
    let msgs = [msg(&["b@y"], b"1")];
    let cfg = ClientConfig { capture_text: true, send_quit: false, ..cfg() };
    let ev = check(
        cfg,
        &msgs,
        &[
            (In::Bytes(b"220-mx.test ESMTP\r\n220-second line\r\n220 last\r\n"), b"EHLO c.test\r\n"),
            (
                In::Bytes(b"250-mx.test hi\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-AUTH PLAIN LOGIN\r\n250 ENHANCEDSTATUSCODES\r\n"),
                b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n",
            ),
            (In::Bytes(b"250-2.1.0 ok\r\n250 2.1.0 more\r\n250 2.1.5 ok\r\n354-go\r\n354 on\r\n"), b"Subject: t\r\n\r\n1\r\n.\r\n"),
            (In::Bytes(b"250-2.0.0 queued\r\n250 2.0.0 as X\r\n"), b""),
        ],
    );
    assert!(ev.contains(&ClientEvent::Banner("mx.test ESMTP\nsecond line\nlast".into())));
    assert!(ev.iter().any(|e| matches!(e, ClientEvent::Capabilities(l) if l.len() == 5 && l[2] == "SIZE 52428800")));
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
    assert_eq!(ev.last(), Some(&ClientEvent::Done));
}

#[test]
fn capabilities_are_parsed_from_ehlo() {
    let cfg = Arc::new(cfg());
    let t0 = Instant::now();
    let mut s = ClientSession::new(cfg, vec![], t0);
    s.handle_input(t0, b"220 mx\r\n250-mx\r\n250-PIPELINING\r\n250-SIZE 100\r\n250-CHUNKING\r\n250 AUTH LOGIN\r\n");
    let caps = s.capabilities();
    assert!(caps.pipelining && caps.chunking && caps.auth_login && !caps.auth_plain);
    assert_eq!(caps.size, Some(100));
}

#[test]
fn greeting_554_rejects_every_message_and_quits() {
    let msgs = [msg(&["b@y"], b"1"), msg(&["c@y"], b"2")];
    let ev = check(cfg(), &msgs, &[(In::Bytes(b"554 go away\r\n"), b"QUIT\r\n"), (In::Bytes(b"221 bye\r\n"), b"")]);
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Rejected, 554, 0), (1, Outcome::Rejected, 554, 0)]);
}

#[test]
fn greeting_421_tempfails_every_message_and_ends() {
    let msgs = [msg(&["b@y"], b"1")];
    let ev = check(cfg(), &msgs, &[(In::Bytes(b"421 busy\r\n"), b"")]);
    assert_eq!(outcomes(&ev), vec![(0, Outcome::TempFailed, 421, 0)]);
    assert_eq!(ev.last(), Some(&ClientEvent::Done));
}

#[test]
fn a_421_mid_pipeline_tempfails_the_open_messages() {
    let msgs = [msg(&["b@y"], b"1"), msg(&["c@y"], b"2")];
    let ev = check(
        cfg(),
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
            (In::Bytes(b"250 ok\r\n421 shutting down\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::TempFailed, 421, 0), (1, Outcome::TempFailed, 421, 0)]);
}

const EHLO_XCLIENT: &[u8] = b"250-mx.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n";
const XCLIENT_ATTRS: &[u8] = b"ADDR=198.51.100.7 NAME=client7.example";

#[test]
fn xclient_is_sent_after_the_first_ehlo_and_the_session_says_ehlo_again() {
    let msgs = [msg(&["b@y"], b"1")];
    let ev = check_xclient(
        cfg(),
        Some(XCLIENT_ATTRS),
        &msgs,
        &[
            (In::Bytes(b"220 mx ESMTP\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_XCLIENT), b"XCLIENT ADDR=198.51.100.7 NAME=client7.example\r\n"),
            (In::Bytes(b"220 mx ESMTP\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(b"250-mx.test\r\n250 PIPELINING\r\n"), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
            (In::Bytes(b"250 ok\r\n250 ok\r\n354 go\r\n"), b"Subject: t\r\n\r\n1\r\n.\r\nQUIT\r\n"),
            (In::Bytes(b"250 queued\r\n221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
    assert!(ev.contains(&ClientEvent::Reply { command: CommandKind::Xclient, code: 220 }));
    let ehlos = phases(&ev).iter().filter(|p| p.0 == Phase::Ehlo).count();
    assert_eq!(ehlos, 2, "EHLO before and after XCLIENT");
}

#[test]
fn xclient_comes_before_starttls_and_is_not_repeated_after_it() {
    let msgs = [msg(&["b@y"], b"1")];
    let ev = check_xclient(
        ClientConfig { starttls: true, send_quit: false, pipelining: PipeliningMode::Off, ..cfg() },
        Some(XCLIENT_ATTRS),
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_XCLIENT), b"XCLIENT ADDR=198.51.100.7 NAME=client7.example\r\n"),
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_XCLIENT), b"STARTTLS\r\n"),
            (In::Bytes(b"220 go ahead\r\n"), b""),
            (In::Tls, b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_XCLIENT), b"MAIL FROM:<a@x>\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"RCPT TO:<b@y>\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"DATA\r\n"),
            (In::Bytes(b"354 go\r\n"), b"Subject: t\r\n\r\n1\r\n.\r\n"),
            (In::Bytes(b"250 ok\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
}

#[test]
fn xclient_required_but_not_offered_rejects_every_message() {
    let msgs = [msg(&["b@y"], b"1"), msg(&["c@y"], b"2")];
    let ev = check_xclient(
        cfg(),
        Some(XCLIENT_ATTRS),
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"QUIT\r\n"),
            (In::Bytes(b"221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Rejected, 0, 0), (1, Outcome::Rejected, 0, 0)]);
    assert_eq!(errors(&ev), vec!["XCLIENT required but not offered".to_string()]);
}

#[test]
fn xclient_refused_fails_every_message_by_the_reply_class() {
    let msgs = [msg(&["b@y"], b"1")];
    for (reply, outcome, code) in [
        (&b"550 5.7.0 Error: insufficient authorization\r\n"[..], Outcome::Rejected, 550),
        (&b"451 4.3.0 try later\r\n"[..], Outcome::TempFailed, 451),
    ] {
        let script: Vec<Step> = vec![
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_XCLIENT), b"XCLIENT ADDR=198.51.100.7 NAME=client7.example\r\n"),
            (In::Bytes(reply), b"QUIT\r\n"),
            (In::Bytes(b"221 bye\r\n"), b""),
        ];
        let ev = check_xclient(cfg(), Some(XCLIENT_ATTRS), &msgs, &script);
        assert_eq!(outcomes(&ev), vec![(0, outcome, code, 0)]);
        assert_eq!(errors(&ev), vec![format!("XCLIENT refused with {code}")]);
    }
}

#[test]
fn starttls_required_but_not_offered_rejects_every_message() {
    let msgs = [msg(&["b@y"], b"1")];
    let ev = check(
        ClientConfig { starttls: true, ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"QUIT\r\n"),
            (In::Bytes(b"221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Rejected, 0, 0)]);
    assert_eq!(errors(&ev), vec!["STARTTLS required but not offered".to_string()]);
}

#[test]
fn starttls_drops_pipelined_plaintext_and_ehlos_again() {
    let msgs = [msg(&["b@y"], b"1")];
    let ev = check(
        ClientConfig { starttls: true, send_quit: false, ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"), b"STARTTLS\r\n"),
            // The injected 250s after the 220 must not be taken as replies.
            (In::Bytes(b"220 go ahead\r\n250-injected\r\n250 PIPELINING\r\n"), b""),
            (In::Tls, b"EHLO c.test\r\n"),
            (In::Bytes(b"250-mx\r\n250 PIPELINING\r\n"), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
            (In::Bytes(b"250 ok\r\n250 ok\r\n354 go\r\n"), b"Subject: t\r\n\r\n1\r\n.\r\n"),
            (In::Bytes(b"250 ok\r\n"), b""),
        ],
    );
    assert!(ev.contains(&ClientEvent::StartTls));
    assert!(phases(&ev).contains(&(Phase::StartTls, STEP * 2)));
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
}

#[test]
fn auth_plain_succeeds_with_235() {
    let msgs = [msg(&["b@y"], b"1")];
    let auth = ClientAuth { mech: AuthMech::Plain, user: "u".into(), pass: "p".into() };
    let ev = check(
        ClientConfig { auth: Some(auth), send_quit: false, pipelining: PipeliningMode::Off, ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(b"250-mx\r\n250 AUTH PLAIN\r\n"), b"AUTH PLAIN AHUAcA==\r\n"),
            (In::Bytes(b"235 2.7.0 ok\r\n"), b"MAIL FROM:<a@x>\r\n"),
            (In::Close, b""),
        ],
    );
    assert!(phases(&ev).contains(&(Phase::Auth, STEP)));
    assert_eq!(outcomes(&ev), vec![(0, Outcome::ConnectionError, 0, 0)]);
}

#[test]
fn auth_login_535_rejects_every_message() {
    let msgs = [msg(&["b@y"], b"1")];
    let auth = ClientAuth { mech: AuthMech::Login, user: "u".into(), pass: "p".into() };
    let ev = check(
        ClientConfig { auth: Some(auth), ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(b"250-mx\r\n250 AUTH LOGIN\r\n"), b"AUTH LOGIN\r\n"),
            (In::Bytes(b"334 VXNlcm5hbWU6\r\n"), b"dQ==\r\n"),
            (In::Bytes(b"334 UGFzc3dvcmQ6\r\n"), b"cA==\r\n"),
            (In::Bytes(b"535 5.7.8 bad credentials\r\n"), b"QUIT\r\n"),
            (In::Close, b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Rejected, 535, 0)]);
    assert!(phases(&ev).contains(&(Phase::Auth, STEP * 3)));
    assert_eq!(ev.last(), Some(&ClientEvent::Done));
}

#[test]
fn bdat_with_pipelining_sends_exact_octets_in_one_write() {
    let msgs = [msg(&["b@y"], b".x\r\nno final crlf"), msg(&["c@y"], b"")];
    let ev = check(
        ClientConfig { bdat: true, ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 31 LAST\r\nSubject: t\r\n\r\n.x\r\nno final crlf"),
            (In::Bytes(b"250 ok\r\n250 ok\r\n250 queued\r\n"), b"MAIL FROM:<a@x>\r\nRCPT TO:<c@y>\r\nBDAT 14 LAST\r\nSubject: t\r\n\r\n"),
            (In::Bytes(b"250 ok\r\n250 ok\r\n452 full\r\n"), b"QUIT\r\n"),
            (In::Bytes(b"221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1), (1, Outcome::TempFailed, 452, 1)]);
}

#[test]
fn bdat_chunk_size_splits_the_message_and_waits_without_pipelining() {
    let msgs = [msg(&["b@y"], b"0123456789X")];
    let ev = check(
        ClientConfig { bdat: true, bdat_chunk_size: 12, pipelining: PipeliningMode::Off, ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"MAIL FROM:<a@x>\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"RCPT TO:<b@y>\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"BDAT 12\r\nSubject: t\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"BDAT 12\r\n\r\n0123456789"),
            (In::Bytes(b"250 ok\r\n"), b"BDAT 1 LAST\r\nX"),
            (In::Bytes(b"250 ok\r\n"), b"QUIT\r\n"),
            (In::Bytes(b"221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
}

#[test]
fn bdat_required_but_chunking_not_offered_rejects_every_message() {
    let msgs = [msg(&["b@y"], b"1")];
    let ev = check(
        ClientConfig { bdat: true, ..cfg() },
        &msgs,
        &[(In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"), (In::Bytes(EHLO_PLAIN), b"QUIT\r\n"), (In::Close, b"")],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Rejected, 0, 0)]);
}

#[test]
fn lmtp_gets_one_final_reply_per_accepted_recipient_and_the_worst_wins() {
    let msgs = [msg(&["a@y", "b@y", "c@y"], b"1"), msg(&["d@y", "e@y"], b"2")];
    let ev = check(
        ClientConfig { lmtp: true, ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 lmtp\r\n"), b"LHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"MAIL FROM:<a@x>\r\nRCPT TO:<a@y>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n"),
            (
                In::Bytes(b"250 ok\r\n250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n"),
                b"Subject: t\r\n\r\n1\r\n.\r\nMAIL FROM:<a@x>\r\nRCPT TO:<d@y>\r\nRCPT TO:<e@y>\r\nDATA\r\n",
            ),
            // Two final replies for message 0 (two accepted recipients).
            (
                In::Bytes(b"250 a delivered\r\n452 c over quota\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
                b"Subject: t\r\n\r\n2\r\n.\r\nQUIT\r\n",
            ),
            (In::Bytes(b"250 d ok\r\n250 e ok\r\n221 bye\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::TempFailed, 452, 2), (1, Outcome::Accepted, 250, 2)]);
    let dots = ev.iter().filter(|e| matches!(e, ClientEvent::Reply { command: CommandKind::Dot, .. })).count();
    assert_eq!(dots, 4);
}

#[test]
fn close_before_the_final_reply_is_a_connection_error() {
    let msgs = [msg(&["b@y"], b"1"), msg(&["c@y"], b"2")];
    let ev = check(
        cfg(),
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PIPE), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
            (In::Bytes(b"250 ok\r\n250 ok\r\n354 go\r\n"), b"Subject: t\r\n\r\n1\r\n.\r\nMAIL FROM:<a@x>\r\nRCPT TO:<c@y>\r\nDATA\r\n"),
            (In::Bytes(b"250 ok\r\n"), b""),
            (In::Close, b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1), (1, Outcome::ConnectionError, 0, 0)]);
    assert_eq!(errors(&ev).len(), 1);
}

#[test]
fn close_after_quit_is_a_normal_end() {
    let msgs = [msg(&["b@y"], b"1")];
    let ev = check(
        ClientConfig { pipelining: PipeliningMode::On, ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PLAIN), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
            (In::Bytes(b"250 ok\r\n250 ok\r\n354 go\r\n"), b"Subject: t\r\n\r\n1\r\n.\r\nQUIT\r\n"),
            (In::Bytes(b"250 ok\r\n"), b""),
            (In::Close, b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
    assert!(errors(&ev).is_empty());
    assert_eq!(ev.last(), Some(&ClientEvent::Done));
}

#[test]
fn data_init_timeout_times_out_the_open_messages() {
    let msgs = [msg(&["b@y"], b"1")];
    let timeouts = ClientTimeouts { data_init: Duration::from_secs(7), ..ClientTimeouts::uniform(Duration::from_secs(60)) };
    let cfg = ClientConfig { timeouts, ..cfg() };
    let ev = check(
        cfg.clone(),
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PLAIN), b"MAIL FROM:<a@x>\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"RCPT TO:<b@y>\r\n"),
            (In::Bytes(b"250 ok\r\n"), b"DATA\r\n"),
            (In::Timeout, b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Timeout, 0, 1)]);
    assert_eq!(errors(&ev), vec!["timeout waiting for the data reply".to_string()]);
    // The deadline is the data_init bound after DATA was sent.
    let t0 = Instant::now();
    let mut s = ClientSession::new(Arc::new(cfg), msgs.to_vec(), t0);
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    s.handle_input(t0, b"220 mx\r\n");
    s.handle_input(t0, EHLO_PLAIN);
    s.handle_input(t0, b"250 ok\r\n");
    s.handle_input(t0 + STEP, b"250 ok\r\n");
    assert_eq!(s.poll_timeout(), Some(t0 + STEP + Duration::from_secs(7)));
}

#[test]
fn no_quit_mode_ends_after_the_last_final_reply() {
    let msgs = [msg(&["b@y"], b"1")];
    let ev = check(
        ClientConfig { send_quit: false, pipelining: PipeliningMode::On, ..cfg() },
        &msgs,
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PLAIN), b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
            (In::Bytes(b"250 ok\r\n250 ok\r\n354 go\r\n"), b"Subject: t\r\n\r\n1\r\n.\r\n"),
            (In::Bytes(b"250 ok\r\n"), b""),
        ],
    );
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
    assert_eq!(ev.last(), Some(&ClientEvent::Done));
}

#[test]
fn a_session_without_messages_just_quits() {
    let ev = check(
        cfg(),
        &[],
        &[(In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"), (In::Bytes(EHLO_PIPE), b"QUIT\r\n"), (In::Bytes(b"221 bye\r\n"), b"")],
    );
    assert_eq!(ev.last(), Some(&ClientEvent::Done));
}

#[test]
fn mail_params_are_sent_after_the_path() {
    let mut m = msg(&["b@y"], b"1");
    m.mail_params = "SIZE=20 BODY=8BITMIME".into();
    m.mail_from = String::new();
    check(
        cfg(),
        &[m],
        &[
            (In::Bytes(b"220 mx\r\n"), b"EHLO c.test\r\n"),
            (In::Bytes(EHLO_PLAIN), b"MAIL FROM:<> SIZE=20 BODY=8BITMIME\r\n"),
            (In::Close, b""),
        ],
    );
}

// ---- property tests --------------------------------------------------------

/// Undo dot-stuffing: the message bytes before the `CRLF.CRLF` terminator.
fn unstuff(wire: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = wire;
    loop {
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        let line = &rest[..end];
        rest = &rest[end + 2..];
        if line == b"." {
            return if rest.is_empty() { Some(out) } else { None };
        }
        let line = if line.first() == Some(&b'.') { &line[1..] } else { line };
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
}

/// A reply line a random server might send.
fn reply_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => Just(b"250 ok\r\n".to_vec()),
        2 => Just(b"220 ready\r\n".to_vec()),
        2 => Just(b"354 go\r\n".to_vec()),
        1 => Just(b"250-mx\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-CHUNKING\r\n250 AUTH PLAIN LOGIN\r\n".to_vec()),
        1 => Just(b"334 x\r\n".to_vec()),
        1 => Just(b"235 ok\r\n".to_vec()),
        1 => Just(b"221 bye\r\n".to_vec()),
        1 => Just(b"421 closing\r\n".to_vec()),
        1 => Just(b"451 later\r\n".to_vec()),
        1 => Just(b"452 full\r\n".to_vec()),
        1 => Just(b"503 order\r\n".to_vec()),
        1 => Just(b"550 no\r\n".to_vec()),
        1 => Just(b"554 no\r\n".to_vec()),
        1 => Just(b"500 huh\r\n".to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..12),
    ]
}

#[derive(Clone, Debug)]
enum Act {
    Reply(Vec<u8>, usize),
    Tls,
    Close,
    Timeout,
}

fn act_strategy() -> impl Strategy<Value = Act> {
    prop_oneof![
        20 => (reply_strategy(), 0usize..8).prop_map(|(r, cut)| Act::Reply(r, cut)),
        2 => Just(Act::Tls),
        1 => Just(Act::Close),
        1 => Just(Act::Timeout),
    ]
}

fn config_strategy() -> impl Strategy<Value = ClientConfig> {
    (any::<bool>(), 0u8..3, any::<bool>(), 0u8..3, any::<bool>(), 0usize..3, any::<bool>()).prop_map(
        |(lmtp, pipe, starttls, auth, bdat, chunk, send_quit)| ClientConfig {
            lmtp,
            pipelining: [PipeliningMode::Auto, PipeliningMode::On, PipeliningMode::Off][pipe as usize],
            starttls,
            auth: match auth {
                0 => None,
                1 => Some(ClientAuth { mech: AuthMech::Plain, user: "u".into(), pass: "p".into() }),
                _ => Some(ClientAuth { mech: AuthMech::Login, user: "u".into(), pass: "p".into() }),
            },
            bdat,
            bdat_chunk_size: chunk * 7,
            send_quit,
            ..ClientConfig::default()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_gets_exactly_one_outcome_under_random_replies(
        cfg in config_strategy(),
        rcpts in proptest::collection::vec(0usize..4, 0..5),
        acts in proptest::collection::vec(act_strategy(), 0..60),
    ) {
        let msgs: Vec<Message> = rcpts.iter().map(|&n| {
            let names: Vec<String> = (0..n).map(|i| format!("r{i}@y")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            msg(&refs, b"body\r\n.line\r\n")
        }).collect();
        let t0 = Instant::now();
        let mut s = ClientSession::new(Arc::new(cfg), msgs.clone(), t0);
        let mut events = Vec::new();
        let mut out = Vec::new();
        let mut now = t0;
        for act in acts {
            now += Duration::from_millis(1);
            match act {
                Act::Reply(bytes, cut) => {
                    let cut = cut.min(bytes.len());
                    s.handle_input(now, &bytes[..cut]);
                    s.handle_input(now, &bytes[cut..]);
                }
                Act::Tls => s.handle_tls_established(now),
                Act::Close => s.handle_close(now),
                Act::Timeout => {
                    if let Some(d) = s.poll_timeout() {
                        prop_assert!(d >= now - Duration::from_millis(1));
                        now = now.max(d);
                        s.handle_timeout(now);
                    }
                }
            }
            s.poll_transmit(now, &mut out);
            while let Some(e) = s.poll_event() { events.push(e); }
        }
        if !s.is_done() {
            s.handle_close(now);
            while let Some(e) = s.poll_event() { events.push(e); }
        }
        prop_assert!(s.is_done());
        prop_assert_eq!(s.poll_timeout(), None);
        check_invariant(&events, msgs.len(), true);
        // Nothing happens after Done.
        s.handle_input(now, b"250 ok\r\n");
        s.handle_close(now);
        prop_assert!(s.poll_event().is_none());
    }

    #[test]
    fn dot_stuffing_round_trips_byte_exact(
        header in proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a')], 0..40),
        body in proptest::collection::vec(prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a'), any::<u8>()], 0..200),
    ) {
        let mut wire = Vec::new();
        dot_stuff(&mut wire, &[&header, &body]);
        let mut expected = [header.as_slice(), body.as_slice()].concat();
        if !expected.is_empty() && !expected.ends_with(b"\r\n") {
            expected.extend_from_slice(b"\r\n");
        }
        prop_assert_eq!(unstuff(&wire), Some(expected));
        // The terminator appears exactly once, at the very end.
        let term = wire.windows(5).position(|w| w == b"\r\n.\r\n");
        prop_assert!(term.is_none() || term == Some(wire.len() - 5));
    }
}

#[test]
fn a_one_megabyte_body_is_sent_whole_and_stuffed() {
    let mut body = Vec::with_capacity(1 << 20);
    while body.len() < (1 << 20) {
        body.extend_from_slice(b".leading dot line\r\nplain line\r\n");
    }
    let msgs = vec![msg(&["b@y"], &body)];
    let t0 = Instant::now();
    let mut s = ClientSession::new(Arc::new(ClientConfig { pipelining: PipeliningMode::On, ..cfg() }), msgs.clone(), t0);
    let mut out = Vec::new();
    s.handle_input(t0, b"220 mx\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    s.poll_transmit(t0, &mut out);
    let start = out.windows(12).position(|w| w == b"Subject: t\r\n").unwrap();
    let end = out.len() - b"QUIT\r\n".len();
    let mut expected = msgs[0].header.clone();
    expected.extend_from_slice(&body);
    assert_eq!(unstuff(&out[start..end]).unwrap(), expected);
}

// ---- a coherent random server ---------------------------------------------

/// A small SMTP/LMTP server model that answers whatever the client sends
/// with replies drawn from `choices`, behaves like a real server (503 after
/// a failed MAIL, 554 to DATA without recipients, one final reply per
/// accepted recipient in LMTP), and computes each message's outcome from
/// its own side, to be compared with the client's.
struct FakeServer {
    inbuf: Vec<u8>,
    mode: Mode,
    choices: Vec<u8>,
    next_choice: usize,
    lmtp: bool,
    advertise_pipelining: bool,
    txn: Option<SrvTxn>,
    mails_seen: usize,
    expected: Vec<Option<(Outcome, u16, u32)>>,
    out: Vec<u8>,
}

enum Mode {
    Cmd,
    Body,
    Bdat { left: usize, last: bool },
}

#[derive(Default)]
struct SrvTxn {
    idx: usize,
    mail_ok: bool,
    rcpt_ok: u32,
    temp: u16,
    perm: u16,
    chunk_failed: bool,
}

impl FakeServer {
    fn pick(&mut self, codes: &[u16]) -> u16 {
        let c = self.choices.get(self.next_choice).copied().unwrap_or(0);
        self.next_choice += 1;
        codes[c as usize % codes.len()]
    }

    fn reply(&mut self, code: u16) {
        self.out.extend_from_slice(format!("{code} x\r\n").as_bytes());
    }

    fn decide(&mut self, outcome: Outcome, code: u16) {
        if let Some(t) = &self.txn {
            if self.expected[t.idx].is_none() {
                self.expected[t.idx] = Some((outcome, code, t.rcpt_ok));
            }
        }
    }

    fn class_outcome(code: u16) -> Outcome {
        match code / 100 {
            2 => Outcome::Accepted,
            4 => Outcome::TempFailed,
            _ => Outcome::Rejected,
        }
    }

    /// The transaction ends without data: decide from the RCPT codes.
    fn end_txn(&mut self) {
        if let Some(t) = &self.txn {
            let (mail_ok, rcpt_ok, temp, perm) = (t.mail_ok, t.rcpt_ok, t.temp, t.perm);
            if mail_ok && rcpt_ok == 0 && (temp | perm) != 0 {
                self.decide(if temp != 0 { Outcome::TempFailed } else { Outcome::Rejected }, if temp != 0 { temp } else { perm });
            }
        }
        self.txn = None;
    }

    /// Final replies after a complete body: one, or one per accepted RCPT.
    fn final_replies(&mut self) {
        let n = if self.lmtp { self.txn.as_ref().map_or(1, |t| t.rcpt_ok) } else { 1 };
        let (mut ok, mut temp, mut perm) = (0, 0, 0);
        for _ in 0..n {
            let code = self.pick(&[250, 250, 451, 554]);
            self.reply(code);
            let slot = match code / 100 { 2 => &mut ok, 4 => &mut temp, _ => &mut perm };
            if *slot == 0 { *slot = code; }
        }
        let (o, c) = if perm != 0 { (Outcome::Rejected, perm) } else if temp != 0 { (Outcome::TempFailed, temp) } else { (Outcome::Accepted, ok) };
        self.decide(o, c);
        self.txn = None;
    }

    /// DATA or BDAT arrives: Some(reply) if the transaction cannot take data.
    fn refuse_data(&mut self) -> Option<u16> {
        let (mail_ok, rcpt_ok, failed) = match &self.txn {
            None => return Some(503),
            Some(t) => (t.mail_ok, t.rcpt_ok, t.chunk_failed),
        };
        if !mail_ok || failed {
            return Some(503);
        }
        if rcpt_ok == 0 {
            let t = self.txn.as_ref().unwrap();
            let (temp, perm) = (t.temp, t.perm);
            if temp | perm == 0 {
                self.decide(Outcome::Rejected, 554);
            } else {
                self.decide(if temp != 0 { Outcome::TempFailed } else { Outcome::Rejected }, if temp != 0 { temp } else { perm });
            }
            return Some(554);
        }
        None
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.inbuf.extend_from_slice(bytes);
        loop {
            match self.mode {
                Mode::Bdat { left, last } => {
                    let n = left.min(self.inbuf.len());
                    self.inbuf.drain(..n);
                    if n < left {
                        self.mode = Mode::Bdat { left: left - n, last };
                        return;
                    }
                    self.mode = Mode::Cmd;
                    if let Some(code) = self.refuse_data() {
                        self.reply(code);
                        if last { self.txn = None; }
                    } else if last {
                        self.final_replies();
                    } else {
                        let code = self.pick(&[250, 250, 250, 452, 552]);
                        self.reply(code);
                        if code >= 400 {
                            self.decide(Self::class_outcome(code), code);
                            if let Some(t) = &mut self.txn { t.chunk_failed = true; }
                        }
                    }
                }
                Mode::Cmd | Mode::Body => {
                    let Some(end) = self.inbuf.windows(2).position(|w| w == b"\r\n") else { return };
                    let line: Vec<u8> = self.inbuf.drain(..end + 2).take(end).collect();
                    if matches!(self.mode, Mode::Body) {
                        if line == b"." {
                            self.mode = Mode::Cmd;
                            self.final_replies();
                        }
                        continue;
                    }
                    self.command(&String::from_utf8(line).unwrap());
                }
            }
        }
    }

    fn command(&mut self, line: &str) {
        let verb = line.split(' ').next().unwrap_or("");
        match verb {
            "EHLO" | "LHLO" => {
                let pipe = if self.advertise_pipelining { "250-PIPELINING\r\n" } else { "" };
                self.out.extend_from_slice(format!("250-mx\r\n{pipe}250-CHUNKING\r\n250 8BITMIME\r\n").as_bytes());
            }
            "MAIL" => {
                self.end_txn();
                let idx = self.mails_seen;
                self.mails_seen += 1;
                let code = self.pick(&[250, 250, 250, 451, 550]);
                self.txn = Some(SrvTxn { idx, mail_ok: code < 400, ..Default::default() });
                if code >= 400 {
                    self.decide(Self::class_outcome(code), code);
                }
                self.reply(code);
            }
            "RCPT" => {
                let Some(t) = &self.txn else { return self.reply(503) };
                if !t.mail_ok {
                    return self.reply(503);
                }
                let code = self.pick(&[250, 250, 450, 550]);
                let t = self.txn.as_mut().unwrap();
                match code / 100 {
                    2 => t.rcpt_ok += 1,
                    4 if t.temp == 0 => t.temp = code,
                    5 if t.perm == 0 => t.perm = code,
                    _ => {}
                }
                self.reply(code);
            }
            "DATA" => {
                if let Some(code) = self.refuse_data() {
                    return self.reply(code);
                }
                let code = self.pick(&[354, 354, 354, 451, 554]);
                if code == 354 {
                    self.mode = Mode::Body;
                } else {
                    self.decide(Self::class_outcome(code), code);
                }
                self.reply(code);
            }
            "BDAT" => {
                let mut words = line.split(' ').skip(1);
                let left = words.next().unwrap().parse().unwrap();
                let last = words.next() == Some("LAST");
                self.mode = Mode::Bdat { left, last };
            }
            "RSET" => {
                self.end_txn();
                self.reply(250);
            }
            "QUIT" => {
                self.end_txn();
                self.reply(221);
            }
            _ => self.reply(500),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn outcomes_match_a_coherent_random_server(
        lmtp in any::<bool>(),
        bdat in any::<bool>(),
        chunk in 0usize..3,
        pipe in 0u8..3,
        advertise_pipelining in any::<bool>(),
        send_quit in any::<bool>(),
        rcpts in proptest::collection::vec(0usize..4, 0..6),
        choices in proptest::collection::vec(any::<u8>(), 0..64),
        cuts in proptest::collection::vec(0usize..40, 64),
    ) {
        let cfg = ClientConfig {
            lmtp,
            bdat,
            bdat_chunk_size: chunk * 9,
            pipelining: [PipeliningMode::Auto, PipeliningMode::On, PipeliningMode::Off][pipe as usize],
            send_quit,
            ..ClientConfig::default()
        };
        let msgs: Vec<Message> = rcpts.iter().map(|&n| {
            let names: Vec<String> = (0..n).map(|i| format!("r{i}@y")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            msg(&refs, b"body\r\n.line\r\n")
        }).collect();
        let mut server = FakeServer {
            inbuf: Vec::new(), mode: Mode::Cmd, choices, next_choice: 0, lmtp, advertise_pipelining,
            txn: None, mails_seen: 0, expected: vec![None; msgs.len()], out: b"220 mx\r\n".to_vec(),
        };
        let t0 = Instant::now();
        let mut s = ClientSession::new(Arc::new(cfg), msgs.clone(), t0);
        let mut events = Vec::new();
        let mut out = Vec::new();
        for round in 0..10_000 {
            let replies = std::mem::take(&mut server.out);
            let cut = cuts[round % cuts.len()].min(replies.len());
            s.handle_input(t0, &replies[..cut]);
            s.handle_input(t0, &replies[cut..]);
            s.poll_transmit(t0, &mut out);
            while let Some(e) = s.poll_event() { events.push(e); }
            if s.is_done() || (out.is_empty() && replies.is_empty()) { break; }
            server.feed(&out);
            out.clear();
        }
        prop_assert!(s.is_done(), "session stalled: {:?}", events);
        server.end_txn(); // the connection closes: an open transaction ends

        prop_assert!(errors(&events).is_empty(), "{:?}", events);
        let got: Vec<(Outcome, u16, u32)> = outcomes(&events).into_iter().map(|(_, o, c, r)| (o, c, r)).collect();
        let want: Vec<(Outcome, u16, u32)> = server.expected.iter().map(|e| e.expect("server decided every message")).collect();
        prop_assert_eq!(got, want);
    }
}

// ---- open sessions (the open loop): messages pushed one at a time ----------

/// A step of an open session's script.
#[derive(Debug)]
enum Open {
    /// Server bytes, then the bytes the client must have sent.
    Bytes(&'static [u8], &'static [u8]),
    /// Push a message; the bytes the client sends at once.
    Push(&'static [u8]),
    /// No more messages; the bytes the client sends at once.
    NoMore(&'static [u8]),
    /// The server closes.
    Close,
}

/// Replays an open session whole, byte by byte and split in two at every
/// point of every Bytes step; every replay must agree. Returns the events
/// and whether the session was idle (with no deadline) before each step.
#[track_caller]
fn check_open(script: &[Open]) -> (Vec<ClientEvent>, Vec<bool>) {
    let play = |split: &dyn Fn(usize, usize) -> Vec<usize>| {
        let t0 = Instant::now();
        let mut s = ClientSession::open(Arc::new(cfg()), t0, Some(t0));
        let (mut events, mut idle, mut out) = (Vec::new(), Vec::new(), Vec::new());
        for (i, step) in script.iter().enumerate() {
            let now = t0 + STEP * (i as u32 + 1);
            idle.push(s.is_idle() && s.poll_timeout().is_none());
            let expected: &[u8] = match step {
                Open::Bytes(b, exp) => {
                    let mut prev = 0;
                    let mut cuts = split(i, b.len());
                    cuts.push(b.len());
                    for cut in cuts {
                        s.handle_input(now, &b[prev..cut]);
                        prev = cut;
                    }
                    exp
                }
                Open::Push(exp) => {
                    s.push_message(now, msg(&["b@y"], b"hi\r\n"), Some(now));
                    exp
                }
                Open::NoMore(exp) => {
                    s.handle_no_more_messages(now);
                    exp
                }
                Open::Close => {
                    s.handle_close(now);
                    b""
                }
            };
            s.poll_transmit(now, &mut out);
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(expected), "after step {i} ({step:?})");
            out.clear();
            while let Some(e) = s.poll_event() {
                events.push(e);
            }
        }
        (events, idle, s.is_done())
    };
    let whole = play(&|_, _| vec![]);
    assert_eq!(play(&|_, n| (1..n).collect()), whole, "byte-at-a-time replay differs");
    for (step, s) in script.iter().enumerate() {
        if let Open::Bytes(b, _) = s {
            for k in 0..=b.len() {
                assert_eq!(play(&|i, _| if i == step { vec![k] } else { vec![] }), whole, "split of step {step} at {k}");
            }
        }
    }
    (whole.0, whole.1)
}

#[test]
fn an_open_session_idles_between_messages_without_a_deadline_then_quits() {
    let (ev, idle) = check_open(&[
        Open::Bytes(b"220 mx.test ESMTP\r\n", b"EHLO c.test\r\n"),
        // No message yet: nothing is sent after EHLO.
        Open::Bytes(EHLO_PIPE, b""),
        Open::Push(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
        Open::Bytes(b"250 ok\r\n250 ok\r\n354 go\r\n", b"Subject: t\r\n\r\nhi\r\n.\r\n"),
        Open::Bytes(b"250 queued\r\n", b""),
        Open::Push(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
        Open::Bytes(b"250 ok\r\n250 ok\r\n354 go\r\n", b"Subject: t\r\n\r\nhi\r\n.\r\n"),
        Open::Bytes(b"250 queued\r\n", b""),
        Open::NoMore(b"QUIT\r\n"),
        Open::Bytes(b"221 bye\r\n", b""),
    ]);
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1), (1, Outcome::Accepted, 250, 1)]);
    assert_eq!(ev.last(), Some(&ClientEvent::Done));
    assert!(errors(&ev).is_empty(), "{ev:?}");
    // Idle (and no deadline) exactly between the messages: before each push
    // and before NoMore.
    assert_eq!(idle, vec![false, false, true, false, false, true, false, false, true, false]);
    // Corrected latencies count from the intended time given with the
    // message (here the push itself), session phases from the session's;
    // QUIT from its own start (it is not on the schedule: it leaves when
    // the last message ends), so its corrected figure is its latency.
    let mut quits = 0;
    for e in &ev {
        if let ClientEvent::Phase { phase, latency, corrected } = e {
            if *phase == Phase::Quit {
                quits += 1;
                assert_eq!(*corrected, Some(*latency), "{e:?}");
                assert!(*latency > Duration::ZERO, "{e:?}");
            } else {
                assert!(corrected.is_some_and(|c| c >= *latency), "{e:?}");
            }
        }
    }
    assert_eq!(quits, 1, "{ev:?}");
    // The session phases before the first message are corrected from the
    // session's intended start: the banner's includes the whole wait.
    let banner = ev.iter().find_map(|e| match e {
        ClientEvent::Phase { phase: Phase::Banner, corrected, .. } => *corrected,
        _ => None,
    });
    assert!(banner.is_some(), "{ev:?}");
}

#[test]
fn a_server_closing_an_idle_open_session_ends_it_normally() {
    let (ev, _) = check_open(&[
        Open::Bytes(b"220 mx.test ESMTP\r\n", b"EHLO c.test\r\n"),
        Open::Bytes(EHLO_PIPE, b""),
        Open::Push(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
        Open::Bytes(b"250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n", b"Subject: t\r\n\r\nhi\r\n.\r\n"),
        Open::Close,
    ]);
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
    assert!(errors(&ev).is_empty(), "an idle close is not an error: {ev:?}");
    assert_eq!(ev.last(), Some(&ClientEvent::Done));
}

#[test]
fn a_server_closing_an_open_session_mid_message_fails_that_message() {
    let (ev, _) = check_open(&[
        Open::Bytes(b"220 mx.test ESMTP\r\n", b"EHLO c.test\r\n"),
        Open::Bytes(EHLO_PIPE, b""),
        Open::Push(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"),
        Open::Bytes(b"250 ok\r\n", b""),
        Open::Close,
    ]);
    assert_eq!(outcomes(&ev), vec![(0, Outcome::ConnectionError, 0, 0)]);
    assert_eq!(ev.last(), Some(&ClientEvent::Done));
}

#[test]
fn a_message_pushed_before_the_greeting_waits_for_ehlo() {
    let (ev, _) = check_open(&[
        Open::Push(b""),
        Open::Bytes(b"220 mx.test ESMTP\r\n", b"EHLO c.test\r\n"),
        Open::Bytes(EHLO_PLAIN, b"MAIL FROM:<a@x>\r\n"),
        Open::Bytes(b"250 ok\r\n", b"RCPT TO:<b@y>\r\n"),
        Open::Bytes(b"250 ok\r\n", b"DATA\r\n"),
        Open::Bytes(b"354 go\r\n", b"Subject: t\r\n\r\nhi\r\n.\r\n"),
        Open::NoMore(b""),
        Open::Bytes(b"250 queued\r\n", b"QUIT\r\n"),
        Open::Bytes(b"221 bye\r\n", b""),
    ]);
    assert_eq!(outcomes(&ev), vec![(0, Outcome::Accepted, 250, 1)]);
    assert_eq!(ev.last(), Some(&ClientEvent::Done));
}

#[test]
fn written_offsets_stamp_each_command_when_its_last_byte_leaves() {
    // Without pipelining: EHLO queued at t0+10ms but written only at
    // t0+15ms; its reply at t0+20ms is 5 ms after it left.
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut s = ClientSession::new(Arc::new(cfg()), vec![msg(&["b@y"], b"hi\r\n")], t0);
    let mut out = Vec::new();
    s.handle_input(t0 + ms(10), b"220 mx.test ESMTP\r\n");
    s.poll_transmit_max(t0 + ms(10), &mut out, 4);
    assert_eq!(out, b"EHLO");
    s.handle_written(t0 + ms(12), 4);
    s.poll_transmit(t0 + ms(15), &mut out);
    s.handle_written(t0 + ms(15), out.len() as u64);
    s.handle_input(t0 + ms(20), EHLO_PLAIN);
    let ehlo: Vec<_> = std::iter::from_fn(|| s.poll_event())
        .filter_map(|e| match e {
            ClientEvent::Phase { phase: Phase::Ehlo, latency, .. } => Some(latency),
            _ => None,
        })
        .collect();
    assert_eq!(ehlo, vec![ms(5)], "from the last byte written, not the first or the queueing");
}
