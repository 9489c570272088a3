//! Byte-script tests of the sans-IO server session.
//!
//! Every script is replayed whole, one byte at a time, and split in two at
//! every position of every input step; replies, events and hook calls must
//! be identical in all replays. Time is virtual.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use smtpstorm::smtp::server::{
    CloseReason, CommandInfo, Extensions, MessageOutcome, ServerConfig, ServerEvent,
    ServerHooks, ServerSession, Verdict, MAX_PENDING_INPUT,
};
use smtpstorm::smtp::{auth, proxy, wire, BareLfPolicy, CommandKind};

// ---- harness ---------------------------------------------------------------

#[derive(Clone, Default)]
struct Hooks {
    /// Verdicts to hand out: the first entry matching a command is used once.
    verdicts: Vec<(CommandKind, Verdict)>,
    /// Accepted password (None = accept all).
    password: Option<&'static [u8]>,
    body: Vec<u8>,
    log: Vec<String>,
    /// Log the client address (PROXY / XCLIENT) each MAIL is judged with.
    log_peer: bool,
}

impl ServerHooks for Hooks {
    fn on_command(&mut self, cmd: CommandKind, info: &CommandInfo<'_>) -> Verdict {
        if let Some(r) = info.rcpt_to {
            self.log.push(format!("rcpt {}", String::from_utf8_lossy(r)));
        }
        if self.log_peer && cmd == CommandKind::Mail {
            self.log.push(format!("mail from peer {:?}", info.peer));
        }
        match self.verdicts.iter().position(|(k, _)| *k == cmd) {
            Some(i) => self.verdicts.remove(i).1,
            None => Verdict::Proceed,
        }
    }
    fn check_auth(&mut self, authzid: &[u8], user: &[u8], pass: &[u8]) -> bool {
        self.log.push(format!(
            "auth {:?} {:?} {:?}",
            String::from_utf8_lossy(authzid),
            String::from_utf8_lossy(user),
            String::from_utf8_lossy(pass)
        ));
        self.password.is_none_or(|p| p == pass)
    }
    fn on_message_start(&mut self) {
        self.log.push("start".into());
    }
    fn on_body(&mut self, chunk: &[u8]) {
        self.body.extend_from_slice(chunk);
    }
    fn on_message_end(&mut self, accepted: bool) {
        self.log.push(format!("end {accepted}"));
    }
}

#[derive(Clone, Copy)]
enum Step<'a> {
    In(&'a [u8]),
    /// Advance the virtual clock by this many ms and call handle_timeout.
    Wait(u64),
    /// The TLS handshake completed.
    Tls,
}
use Step::{In, Tls, Wait};

#[derive(Debug, PartialEq, Eq)]
struct Transcript {
    out: String,
    events: Vec<ServerEvent>,
    body: Vec<u8>,
    log: Vec<String>,
    closed: bool,
}

impl Transcript {
    fn codes(&self) -> Vec<u16> {
        self.events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Reply { code, .. } => Some(*code),
                _ => None,
            })
            .collect()
    }
    fn messages(&self) -> Vec<(MessageOutcome, u16)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Message { outcome, code, .. } => Some((*outcome, *code)),
                _ => None,
            })
            .collect()
    }
    fn has_line(&self, line: &str) -> bool {
        self.out.split("\r\n").any(|l| l == line)
    }
}

fn drive(cfg: &Arc<ServerConfig>, hooks: &Hooks, steps: &[Step], cut: &dyn Fn(usize, usize) -> Vec<usize>) -> Transcript {
    let mut now = Instant::now();
    let mut s = ServerSession::new(cfg.clone(), now);
    let mut h = hooks.clone();
    let mut out = Vec::new();
    let mut events = Vec::new();
    s.start(now, &mut out, &mut h);
    let drain = |s: &mut ServerSession, ev: &mut Vec<ServerEvent>| {
        while let Some(e) = s.poll_event() {
            ev.push(e);
        }
    };
    drain(&mut s, &mut events);
    for (i, step) in steps.iter().enumerate() {
        match *step {
            In(bytes) => {
                let mut prev = 0;
                let mut cuts = cut(i, bytes.len());
                cuts.push(bytes.len());
                for c in cuts {
                    s.handle_input(now, &bytes[prev..c], &mut out, &mut h);
                    drain(&mut s, &mut events);
                    prev = c;
                }
            }
            Wait(ms) => {
                now += Duration::from_millis(ms);
                s.handle_timeout(now, &mut out, &mut h);
                drain(&mut s, &mut events);
            }
            Tls => s.handle_tls_established(now),
        }
    }
    Transcript {
        out: String::from_utf8_lossy(&out).into_owned(),
        events,
        body: h.body,
        log: h.log,
        closed: s.is_closed(),
    }
}

/// Run a script whole, byte by byte and split at every point of every input
/// step; all must agree. Returns the whole-input transcript.
#[track_caller]
fn run_with(cfg: ServerConfig, hooks: Hooks, steps: &[Step]) -> Transcript {
    let cfg = Arc::new(cfg);
    let whole = drive(&cfg, &hooks, steps, &|_, _| Vec::new());
    let bytewise = drive(&cfg, &hooks, steps, &|_, n| (1..n).collect());
    assert_eq!(whole, bytewise, "byte-at-a-time replay differs");
    for (i, step) in steps.iter().enumerate() {
        if let In(bytes) = step {
            for c in 1..bytes.len() {
                let split = drive(&cfg, &hooks, steps, &|j, _| if j == i { vec![c] } else { Vec::new() });
                assert_eq!(whole, split, "split of step {i} at {c} differs");
            }
        }
    }
    whole
}

#[track_caller]
fn run(steps: &[Step]) -> Transcript {
    run_with(cfg(), Hooks::default(), steps)
}

fn cfg() -> ServerConfig {
    ServerConfig { hostname: "mx.test".into(), ..ServerConfig::default() }
}

const HELLO: &[u8] = b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n";

// ---- greeting, EHLO, basic commands ---------------------------------------------

#[test]
fn greeting_names_the_host() {
    let t = run(&[]);
    assert_eq!(t.out, "220 mx.test ESMTP smtpstorm\r\n");
}

#[test]
fn ehlo_advertises_every_extension_by_default() {
    let c = ServerConfig { starttls_available: true, auth_enabled: true, max_message_size: 1000, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"EHLO x\r\n")]);
    let want = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n\
                250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n250-DSN\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n";
    assert!(t.out.ends_with(want), "{}", t.out);
}

#[test]
fn disabled_extensions_are_not_advertised_and_codes_become_plain() {
    let ext = Extensions { pipelining: false, chunking: false, enhancedstatuscodes: false, ..Extensions::default() };
    let t = run_with(ServerConfig { ext, ..cfg() }, Hooks::default(), &[In(b"EHLO x\r\nNOOP\r\n")]);
    assert!(!t.out.contains("PIPELINING") && !t.out.contains("CHUNKING") && !t.out.contains("ENHANCED"));
    assert!(t.out.contains("250 DSN\r\n"));
    assert!(t.has_line("250 OK"));
}

#[test]
fn auth_is_advertised_only_after_tls_when_required() {
    let c = ServerConfig { starttls_available: true, auth_enabled: true, auth_requires_tls: true, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"EHLO x\r\nSTARTTLS\r\n"), Tls, In(b"EHLO x\r\n")]);
    let (before, after) = t.out.split_once("220 2.0.0").unwrap();
    assert!(before.contains("STARTTLS") && !before.contains("AUTH"));
    assert!(!after.contains("STARTTLS") && after.contains("AUTH PLAIN LOGIN"));
}

#[test]
fn helo_gets_a_one_line_reply() {
    let t = run(&[In(b"HELO x\r\n")]);
    assert!(t.has_line("250 mx.test"));
}

#[test]
fn simple_commands_have_their_codes() {
    let t = run(&[In(b"EHLO x\r\nNOOP\r\nVRFY bob\r\nEXPN list\r\nHELP\r\nRSET\r\nQUIT\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 252, 502, 214, 250, 221]);
    assert!(t.closed);
    assert_eq!(t.events.last(), Some(&ServerEvent::Close(CloseReason::Quit)));
}

#[test]
fn quit_ignores_everything_after_it() {
    let t = run(&[In(b"QUIT\r\nNOOP\r\n"), In(b"NOOP\r\n")]);
    assert_eq!(t.codes(), [220, 221]);
}

#[test]
fn unknown_command_is_500_and_empty_line_too() {
    let t = run(&[In(b"FOO\r\n\r\nNOOP\r\n")]);
    assert_eq!(t.codes(), [220, 500, 500, 250]);
    assert!(t.has_line("500 5.5.2 Command unrecognized"));
}

#[test]
fn too_many_errors_close_with_421() {
    let t = run(&[In(&b"X\r\n".repeat(25))]);
    assert_eq!(t.codes().len(), 1 + 20 + 1);
    assert_eq!(t.events.last(), Some(&ServerEvent::Close(CloseReason::TooManyErrors)));
}

// ---- sequencing -----------------------------------------------------------------

#[test]
fn mail_before_ehlo_is_503() {
    let t = run(&[In(b"MAIL FROM:<a@b>\r\n")]);
    assert!(t.has_line("503 5.5.1 Send HELO/EHLO first"));
}

#[test]
fn rcpt_before_mail_is_503() {
    let t = run(&[In(b"EHLO x\r\nRCPT TO:<a@b>\r\n")]);
    assert_eq!(t.codes(), [220, 250, 503]);
}

#[test]
fn data_before_rcpt_is_503() {
    let t = run(&[In(b"EHLO x\r\nMAIL FROM:<a@b>\r\nDATA\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 503]);
}

#[test]
fn nested_mail_is_503() {
    let t = run(&[In(b"EHLO x\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 503]);
}

#[test]
fn data_with_only_refused_recipients_is_554() {
    let hooks = Hooks { verdicts: vec![(CommandKind::Rcpt, Verdict::Reply(550))], ..Hooks::default() };
    let t = run_with(cfg(), hooks, &[In(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 550, 554]);
    assert!(t.has_line("554 5.5.1 No valid recipients"));
}

#[test]
fn bad_paths_and_params_are_501() {
    let t = run(&[In(b"EHLO x\r\nMAIL FROM:a@b\r\nMAIL FROM:<a@b> FOO=1\r\nMAIL FROM:<a@b> SIZE=x\r\nMAIL FROM:<a@b> BODY=BINARY\r\nMAIL FROM:<a@b> SIZE=10 BODY=8BITMIME RET=HDRS ENVID=x AUTH=<>\r\nRCPT TO:<c@d> NOTIFY=BOGUS\r\nRCPT TO:<c@d> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d\r\n")]);
    assert_eq!(t.codes(), [220, 250, 501, 501, 501, 501, 250, 501, 250]);
}

#[test]
fn null_sender_is_accepted() {
    let t = run(&[In(b"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250]);
}

#[test]
fn over_long_path_is_501_5_1_3() {
    let mut line = b"EHLO x\r\nMAIL FROM:<".to_vec();
    line.extend(std::iter::repeat_n(b'a', 260));
    line.extend_from_slice(b"@b>\r\n");
    let t = run(&[In(&line)]);
    assert!(t.has_line("501 5.1.3 Path too long"));
}

#[test]
fn non_ascii_path_needs_smtputf8() {
    let t = run(&[In("EHLO x\r\nMAIL FROM:<jö@b>\r\nMAIL FROM:<jö@b> SMTPUTF8\r\nRCPT TO:<ü@d>\r\n".as_bytes())]);
    assert_eq!(t.codes(), [220, 250, 553, 250, 250]);
    assert!(t.has_line("553 5.6.7 Non-ASCII address requires SMTPUTF8"));
}

#[test]
fn invalid_utf8_path_is_501() {
    let t = run(&[In(b"EHLO x\r\nMAIL FROM:<\xc3\x28@b> SMTPUTF8\r\n")]);
    assert_eq!(t.codes(), [220, 250, 501]);
}

#[test]
fn size_param_over_the_limit_is_552() {
    let c = ServerConfig { max_message_size: 100, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"EHLO x\r\nMAIL FROM:<a@b> SIZE=101\r\nMAIL FROM:<a@b> SIZE=100\r\n")]);
    assert_eq!(t.codes(), [220, 250, 552, 250]);
}

#[test]
fn too_many_recipients_is_452() {
    let c = ServerConfig { max_recipients: 2, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<1@b>\r\nRCPT TO:<2@b>\r\nRCPT TO:<3@b>\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 250, 452]);
    assert!(t.has_line("452 4.5.3 Too many recipients"));
}

#[test]
fn require_tls_refuses_mail_before_starttls_with_530() {
    let c = ServerConfig { require_tls: true, starttls_available: true, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"EHLO x\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\n"), Tls, In(b"EHLO x\r\nMAIL FROM:<a@b>\r\n")]);
    assert_eq!(t.codes(), [220, 250, 530, 220, 250, 250]);
}

#[test]
fn long_command_line_is_500_and_the_session_continues() {
    let mut line = vec![b'N'; 600];
    line.extend_from_slice(b"\r\nNOOP\r\n");
    let t = run(&[In(&line)]);
    assert_eq!(t.codes(), [220, 500, 250]);
    assert!(t.has_line("500 5.5.2 Line too long"));
    // 512 bytes with CRLF is still fine.
    let mut ok = b"NOOP ".to_vec();
    ok.extend(std::iter::repeat_n(b'x', 512 - 7));
    ok.extend_from_slice(b"\r\n");
    assert_eq!(ok.len(), 512);
    let t = run(&[In(&ok)]);
    assert_eq!(t.codes(), [220, 250]);
}

// ---- DATA --------------------------------------------------------------------------

#[test]
fn a_full_transaction_is_accepted_and_the_body_streamed() {
    let t = run(&[In(HELLO), In(b"DATA\r\nSubject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 354, 250, 221]);
    assert_eq!(t.body, b"Subject: hi\r\n\r\n.dot\r\nbody\r\n");
    assert_eq!(t.messages(), [(MessageOutcome::Accepted, 250)]);
    assert!(t.events.contains(&ServerEvent::Message { outcome: MessageOutcome::Accepted, code: 250, bytes: 27, recipients: 1 }));
    assert_eq!(t.log, ["rcpt c@d.test", "start", "end true"]);
}

#[test]
fn dot_right_after_354_ends_an_empty_message() {
    let t = run(&[In(HELLO), In(b"DATA\r\n.\r\nNOOP\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 354, 250, 250]);
    assert!(t.body.is_empty());
}

#[test]
fn two_messages_in_one_session_reset_the_transaction() {
    let t = run(&[In(HELLO), In(b"DATA\r\nx\r\n.\r\nRCPT TO:<c@d>\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\ny\r\n.\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 354, 250, 503, 250, 250, 354, 250]);
    assert_eq!(t.body, b"x\r\ny\r\n");
}

#[test]
fn body_over_the_limit_is_552_at_the_end() {
    let c = ServerConfig { max_message_size: 10, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(HELLO), In(b"DATA\r\n0123456789abc\r\n.\r\nNOOP\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 354, 552, 250]);
    assert_eq!(t.messages(), [(MessageOutcome::Rejected, 552)]);
}

#[test]
fn long_text_line_in_data_is_500_and_the_session_continues() {
    let mut body = b"DATA\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'x', 1200));
    body.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
    let t = run(&[In(HELLO), In(&body)]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 354, 500, 250]);
    assert!(t.has_line("500 5.5.2 Message line too long"));
    assert_eq!(t.log.last().unwrap(), "end false");
}

#[test]
fn lf_dot_lf_does_not_end_data() {
    let t = run(&[In(HELLO), In(b"DATA\r\na\n.\nNOOP\r\n.\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 354, 550]);
    assert!(t.has_line("550 5.5.2 Message contains bare LF or bare CR, rejected"));
}

#[test]
fn normalize_delivers_bare_lf_as_crlf() {
    let c = ServerConfig { bare_lf: BareLfPolicy::Normalize, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(HELLO), In(b"DATA\r\na\nb\rc\r\n.\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 354, 250]);
    assert_eq!(t.body, b"a\r\nb\r\nc\r\n");
}

/// Every policy against every smuggling sequence: a payload that would smuggle
/// a second message if the sequence ended DATA.
#[test]
fn every_policy_and_smuggling_sequence_behaves_as_documented() {
    let seqs: [(&str, &[u8], bool); 5] = [
        ("LF.LF", b"\n.\n", true),
        ("LF.CRLF", b"\n.\r\n", true),
        ("CR.CR", b"\r.\r", false),
        ("CRLF.LF", b"\r\n.\n", false),
        ("CR CR LF", b"\r\r\n", false),
    ];
    for (name, seq, ends_under_accept) in seqs {
        for policy in [BareLfPolicy::Reject, BareLfPolicy::Normalize, BareLfPolicy::Accept] {
            let mut input = b"DATA\r\nhdr: 1\r\n\r\na".to_vec();
            input.extend_from_slice(seq);
            input.extend_from_slice(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nDATA\r\nevil\r\n.\r\n");
            let c = ServerConfig { bare_lf: policy, ..cfg() };
            let t = run_with(c, Hooks::default(), &[In(HELLO), In(&input)]);
            let msgs = t.messages();
            match policy {
                BareLfPolicy::Reject => assert_eq!(msgs, [(MessageOutcome::Rejected, 550)], "{name}"),
                BareLfPolicy::Normalize => assert_eq!(msgs, [(MessageOutcome::Accepted, 250)], "{name}"),
                BareLfPolicy::Accept if ends_under_accept => {
                    assert_eq!(msgs.len(), 2, "{name}: Accept lets LF.LF end DATA");
                }
                BareLfPolicy::Accept => assert_eq!(msgs, [(MessageOutcome::Accepted, 250)], "{name}"),
            }
        }
    }
}

// ---- BDAT -----------------------------------------------------------------------------

#[test]
fn bdat_chunks_make_one_message() {
    let t = run(&[In(HELLO), In(b"BDAT 5\r\nhelloBDAT 3 LAST\r\nabcNOOP\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 250, 250, 250]);
    assert!(t.has_line("250 2.0.0 5 octets received"));
    assert_eq!(t.body, b"helloabc");
    assert!(t.events.contains(&ServerEvent::Message { outcome: MessageOutcome::Accepted, code: 250, bytes: 8, recipients: 1 }));
}

#[test]
fn bdat_zero_last_ends_the_message() {
    let t = run(&[In(HELLO), In(b"BDAT 2\r\n\r\nBDAT 0 LAST\r\n")]);
    assert_eq!(t.messages(), [(MessageOutcome::Accepted, 250)]);
    assert_eq!(t.body, b"\r\n");
}

#[test]
fn rejected_bdat_chunk_is_still_read_off_the_wire() {
    let t = run(&[In(b"EHLO x\r\nBDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n")]);
    assert_eq!(t.codes(), [220, 250, 503, 250]);
    assert!(!t.closed);
}

#[test]
fn bdat_over_the_size_limit_is_552_after_the_chunk() {
    let c = ServerConfig { max_message_size: 4, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(HELLO), In(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 552, 250]);
    assert_eq!(t.messages(), [(MessageOutcome::Rejected, 552)]);
    assert_eq!(t.log.last().unwrap(), "end false");
}

#[test]
fn data_after_bdat_is_503() {
    let t = run(&[In(HELLO), In(b"BDAT 1\r\nxDATA\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 250, 503]);
}

#[test]
fn bdat_is_refused_when_chunking_is_off_but_the_chunk_is_skipped() {
    let c = ServerConfig { ext: Extensions { chunking: false, ..Extensions::default() }, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(HELLO), In(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 502, 250]);
}

// ---- LMTP ----------------------------------------------------------------------------------

#[test]
fn lmtp_replies_once_per_recipient() {
    let c = ServerConfig { lmtp: true, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"EHLO x\r\nLHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<1@b>\r\nRCPT TO:<2@b>\r\nDATA\r\nhi\r\n.\r\n")]);
    assert_eq!(t.codes(), [220, 500, 250, 250, 250, 250, 354, 250, 250]);
    assert!(t.has_line("250 2.0.0 <1@b> Delivered") && t.has_line("250 2.0.0 <2@b> Delivered"));
    assert_eq!(t.messages().len(), 1);
}

// ---- STARTTLS, AUTH, XCLIENT, PROXY ----------------------------------------------------

#[test]
fn starttls_drops_pipelined_plaintext() {
    let c = ServerConfig { starttls_available: true, ..cfg() };
    let t = run_with(c, Hooks::default(), &[
        In(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<a@b>\r\n"),
        In(b"RCPT TO:<c@d>\r\n"),
        Tls,
        In(b"MAIL FROM:<a@b>\r\nEHLO x\r\n"),
    ]);
    assert_eq!(t.codes(), [220, 250, 220, 503, 250]);
    assert!(t.events.contains(&ServerEvent::StartTls));
    let after = t.out.split_once("220 2.0.0 Ready to start TLS\r\n").unwrap().1;
    assert!(!after.contains("STARTTLS"));
}

#[test]
fn starttls_when_unavailable_or_active_is_refused() {
    let t = run(&[In(b"STARTTLS\r\n")]);
    assert_eq!(t.codes(), [220, 502]);
    let c = ServerConfig { starttls_available: true, ..cfg() };
    let cfg = Arc::new(c);
    let now = Instant::now();
    let mut s = ServerSession::new(cfg, now);
    s.set_tls_active();
    let mut out = Vec::new();
    s.start(now, &mut out, &mut Hooks::default());
    s.handle_input(now, b"STARTTLS\r\n", &mut out, &mut Hooks::default());
    assert!(String::from_utf8_lossy(&out).ends_with("503 5.5.1 TLS already active\r\n"));
    assert!(s.tls_active());
}

fn auth_cfg() -> ServerConfig {
    ServerConfig { auth_enabled: true, ..cfg() }
}

#[test]
fn auth_plain_with_an_initial_response_succeeds() {
    let line = format!("EHLO x\r\nAUTH PLAIN {}\r\n", auth::encode_plain("u", "p"));
    let t = run_with(auth_cfg(), Hooks::default(), &[In(line.as_bytes())]);
    assert!(t.has_line("235 2.7.0 Authentication successful"));
    assert!(t.events.contains(&ServerEvent::Authenticated));
    assert_eq!(t.log, [r#"auth "" "u" "p""#]);
}

#[test]
fn auth_plain_without_initial_response_prompts_334() {
    let line = format!("EHLO x\r\nAUTH PLAIN\r\n{}\r\n", auth::encode_plain("u", "p"));
    let t = run_with(auth_cfg(), Hooks::default(), &[In(line.as_bytes())]);
    assert_eq!(t.codes(), [220, 250, 334, 235]);
}

#[test]
fn auth_login_walks_both_prompts() {
    let line = format!(
        "EHLO x\r\nAUTH LOGIN\r\n{}\r\n{}\r\n",
        auth::encode_login_step("u"),
        auth::encode_login_step("p")
    );
    let t = run_with(auth_cfg(), Hooks::default(), &[In(line.as_bytes())]);
    assert!(t.has_line("334 VXNlcm5hbWU6") && t.has_line("334 UGFzc3dvcmQ6"));
    assert_eq!(t.codes(), [220, 250, 334, 334, 235]);
    let line = format!("EHLO x\r\nAUTH LOGIN {}\r\n{}\r\n", auth::encode_login_step("u"), auth::encode_login_step("p"));
    let t = run_with(auth_cfg(), Hooks::default(), &[In(line.as_bytes())]);
    assert_eq!(t.codes(), [220, 250, 334, 235]);
}

#[test]
fn auth_cancel_and_bad_base64_are_501_and_wrong_password_535() {
    let hooks = Hooks { password: Some(b"right"), ..Hooks::default() };
    let line = format!("EHLO x\r\nAUTH PLAIN\r\n*\r\nAUTH PLAIN !!!\r\nAUTH PLAIN {}\r\nAUTH LOGIN\r\n*\r\n", auth::encode_plain("u", "wrong"));
    let t = run_with(auth_cfg(), hooks, &[In(line.as_bytes())]);
    assert_eq!(t.codes(), [220, 250, 334, 501, 501, 535, 334, 501]);
    assert!(t.has_line("535 5.7.8 Authentication credentials invalid"));
}

#[test]
fn auth_before_tls_when_required_is_538() {
    let c = ServerConfig { auth_requires_tls: true, ..auth_cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"EHLO x\r\nAUTH PLAIN AHUAcA==\r\n")]);
    assert_eq!(t.codes(), [220, 250, 538]);
}

#[test]
fn ehlo_advertises_xclient_with_its_attributes_only_when_enabled() {
    let c = ServerConfig { xclient: true, auth_enabled: true, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"EHLO x\r\n")]);
    assert!(t.out.ends_with("250-AUTH PLAIN LOGIN\r\n250 XCLIENT NAME ADDR PORT PROTO HELO REVERSE_NAME LOGIN DESTADDR DESTPORT\r\n"), "{}", t.out);
    let t = run(&[In(b"EHLO x\r\n")]);
    assert!(!t.out.contains("XCLIENT"), "{}", t.out);
}

#[test]
fn xclient_with_every_advertised_attribute_claims_the_address_for_what_follows() {
    let c = ServerConfig { xclient: true, ..cfg() };
    let hooks = Hooks { log_peer: true, ..Hooks::default() };
    let t = run_with(
        c,
        hooks,
        &[
            In(b"EHLO relay\r\nMAIL FROM:<a@b>\r\nRSET\r\n"),
            In(b"XCLIENT ADDR=192.0.2.7 NAME=mx.example PORT=4000 PROTO=ESMTP HELO=mx.example LOGIN=[UNAVAILABLE] DESTADDR=192.0.2.1 DESTPORT=25\r\n"),
            In(b"EHLO mx.example\r\nMAIL FROM:<a@b>\r\nRSET\r\n"),
            In(b"xclient addr=IPV6:2001:db8::7\r\nEHLO x\r\nMAIL FROM:<a@b>\r\nRSET\r\n"),
            In(b"XCLIENT ADDR=[UNAVAILABLE] NAME=[TEMPUNAVAIL]\r\nEHLO x\r\nMAIL FROM:<a@b>\r\n"),
        ],
    );
    assert_eq!(t.codes(), [220, 250, 250, 250, 220, 250, 250, 250, 220, 250, 250, 250, 220, 250, 250]);
    assert_eq!(
        t.log,
        [
            "mail from peer None",
            "mail from peer Some(192.0.2.7:4000)",
            "mail from peer Some([2001:db8::7]:4000)",
            "mail from peer None",
        ]
    );
}

#[test]
fn xclient_with_an_unknown_or_malformed_attribute_is_501_and_claims_nothing() {
    let c = ServerConfig { xclient: true, ..cfg() };
    let hooks = Hooks { log_peer: true, ..Hooks::default() };
    let t = run_with(
        c,
        hooks,
        &[In(b"EHLO x\r\nXCLIENT ADDR=192.0.2.9 FOO=1\r\nXCLIENT ADDR=not-an-ip\r\nXCLIENT ADDR\r\n\
               XCLIENT ADDR=192.0.2.9 PORT=70000\r\nXCLIENT\r\nMAIL FROM:<a@b>\r\n")],
    );
    assert_eq!(t.codes(), [220, 250, 501, 501, 501, 501, 501, 250]);
    assert!(t.has_line("501 5.5.4 Bad XCLIENT attribute name"), "{}", t.out);
    assert!(t.has_line("501 5.5.4 Bad XCLIENT ADDR syntax"), "{}", t.out);
    assert!(t.has_line("501 5.5.4 Bad XCLIENT attribute syntax, expected NAME=VALUE"), "{}", t.out);
    assert!(t.has_line("501 5.5.4 Bad XCLIENT PORT syntax"), "{}", t.out);
    assert_eq!(t.log, ["mail from peer None"]);
}

#[test]
fn xclient_replies_220_and_resets() {
    let c = ServerConfig { xclient: true, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"EHLO x\r\nXCLIENT ADDR=192.0.2.1 PORT=4000 NAME=x\r\nMAIL FROM:<a@b>\r\n")]);
    assert_eq!(t.codes(), [220, 250, 220, 503]);
    let t = run(&[In(b"XCLIENT ADDR=1.2.3.4\r\n")]);
    assert_eq!(t.codes(), [220, 502]);
}

#[test]
fn proxy_v1_header_comes_before_the_greeting() {
    let c = ServerConfig { proxy_protocol: true, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 25\r\nEHLO x\r\n")]);
    assert_eq!(t.codes(), [220, 250]);
    assert!(t.out.starts_with("220 mx.test ESMTP smtpstorm\r\n"));
    assert_eq!(t.events[0], ServerEvent::Proxy(proxy::ProxyHeader { src: Some("192.0.2.1:1234".parse().unwrap()), dst: Some("192.0.2.2:25".parse().unwrap()) }));
}

#[test]
fn proxy_v2_header_is_parsed_and_the_peer_given_to_hooks() {
    let mut input = Vec::new();
    proxy::write_v2("[2001:db8::1]:5000".parse().unwrap(), "[2001:db8::2]:25".parse().unwrap(), &mut input);
    input.extend_from_slice(b"NOOP\r\n");
    let c = ServerConfig { proxy_protocol: true, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(&input)]);
    assert_eq!(t.codes(), [220, 250]);
}

#[test]
fn bad_proxy_header_closes_without_a_greeting() {
    let c = ServerConfig { proxy_protocol: true, ..cfg() };
    let t = run_with(c, Hooks::default(), &[In(b"EHLO x\r\n")]);
    assert_eq!(t.out, "");
    assert_eq!(t.events, [ServerEvent::Close(CloseReason::ProxyError)]);
}

// ---- timeouts -------------------------------------------------------------------------------

fn short_timeouts() -> ServerConfig {
    let mut c = cfg();
    c.timeouts.command = Duration::from_secs(10);
    c.timeouts.data_block = Duration::from_secs(3);
    c
}

#[test]
fn command_timeout_writes_421_and_closes() {
    let t = run_with(short_timeouts(), Hooks::default(), &[In(b"EHLO x\r\n"), Wait(9_999), In(b"NOOP\r\n"), Wait(9_999), Wait(2)]);
    assert_eq!(t.codes(), [220, 250, 250, 421]);
    assert!(t.has_line("421 4.4.2 mx.test Error: timeout exceeded"));
    assert_eq!(t.events.last(), Some(&ServerEvent::Close(CloseReason::Timeout)));
}

#[test]
fn data_block_timeout_applies_inside_a_body() {
    let t = run_with(short_timeouts(), Hooks::default(), &[In(HELLO), In(b"DATA\r\npartial"), Wait(3_001)]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 354, 421]);
    assert_eq!(t.log.last().unwrap(), "end false");
}

#[test]
fn poll_timeout_reports_the_current_deadline() {
    let c = Arc::new(short_timeouts());
    let t0 = Instant::now();
    let mut s = ServerSession::new(c, t0);
    assert_eq!(s.poll_timeout(), None);
    let mut out = Vec::new();
    let mut h = Hooks::default();
    s.start(t0, &mut out, &mut h);
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    s.handle_input(t0, HELLO, &mut out, &mut h);
    s.handle_input(t0, b"DATA\r\nx", &mut out, &mut h);
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(3)));
}

// ---- fault verdicts ------------------------------------------------------------------------------

fn with(v: Vec<(CommandKind, Verdict)>) -> Hooks {
    Hooks { verdicts: v, ..Hooks::default() }
}

#[test]
fn rcpt_fault_451_does_not_add_the_recipient() {
    let h = with(vec![(CommandKind::Rcpt, Verdict::Reply(451))]);
    let t = run_with(cfg(), h, &[In(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<1@b>\r\nRCPT TO:<2@b>\r\nDATA\r\nx\r\n.\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 451, 250, 354, 250]);
    assert!(t.events.iter().any(|e| matches!(e, ServerEvent::Message { recipients: 1, .. })));
}

#[test]
fn connect_fault_421_closes_after_the_reply() {
    let t = run_with(cfg(), with(vec![(CommandKind::Connect, Verdict::Reply(421))]), &[In(b"EHLO x\r\n")]);
    assert_eq!(t.codes(), [421]);
    assert!(t.closed);
}

#[test]
fn connect_fault_554_refuses_everything_but_quit() {
    let t = run_with(cfg(), with(vec![(CommandKind::Connect, Verdict::Reply(554))]), &[In(b"EHLO x\r\nQUIT\r\n")]);
    assert_eq!(t.codes(), [554, 503, 221]);
}

#[test]
fn disconnect_closes_without_a_reply_and_disconnect421_with_one() {
    let t = run_with(cfg(), with(vec![(CommandKind::Mail, Verdict::Disconnect)]), &[In(b"EHLO x\r\nMAIL FROM:<a@b>\r\nNOOP\r\n")]);
    assert_eq!(t.codes(), [220, 250]);
    assert_eq!(t.events.last(), Some(&ServerEvent::Close(CloseReason::Fault)));
    let t = run_with(cfg(), with(vec![(CommandKind::Ehlo, Verdict::Disconnect421)]), &[In(b"EHLO x\r\nNOOP\r\n")]);
    assert_eq!(t.codes(), [220, 421]);
    assert!(t.has_line("421 4.3.2 mx.test Service not available, closing transmission channel"));
}

#[test]
fn dot_fault_decides_the_message_outcome() {
    let t = run_with(cfg(), with(vec![(CommandKind::Dot, Verdict::Reply(554))]), &[In(HELLO), In(b"DATA\r\nx\r\n.\r\n")]);
    assert_eq!(t.messages(), [(MessageOutcome::Rejected, 554)]);
    assert_eq!(t.log.last().unwrap(), "end false");
    let t = run_with(cfg(), with(vec![(CommandKind::Dot, Verdict::Reply(451))]), &[In(HELLO), In(b"DATA\r\nx\r\n.\r\n")]);
    assert_eq!(t.messages(), [(MessageOutcome::TempFailed, 451)]);
}

#[test]
fn data_fault_refuses_the_message_without_354() {
    let t = run_with(cfg(), with(vec![(CommandKind::Data, Verdict::Reply(451))]), &[In(HELLO), In(b"DATA\r\nMAIL FROM:<a@b>\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 451, 250]);
    assert_eq!(t.messages(), [(MessageOutcome::TempFailed, 451)]);
}

#[test]
fn delay_holds_the_reply_and_buffers_later_input() {
    let h = with(vec![(CommandKind::Ehlo, Verdict::Delay(Duration::from_millis(200)))]);
    let t = run_with(cfg(), h, &[In(b"EHLO x\r\nNOOP\r\n"), In(b"NOOP\r\n"), Wait(199)]);
    assert_eq!(t.codes(), [220]);
    let h = with(vec![(CommandKind::Ehlo, Verdict::Delay(Duration::from_millis(200)))]);
    let t = run_with(cfg(), h, &[In(b"EHLO x\r\nNOOP\r\n"), In(b"NOOP\r\n"), Wait(200), In(b"QUIT\r\n")]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 221]);
}

#[test]
fn delay_at_connect_holds_the_greeting() {
    let h = with(vec![(CommandKind::Connect, Verdict::Delay(Duration::from_millis(50)))]);
    let t = run_with(cfg(), h, &[In(b"NOOP\r\n"), Wait(50)]);
    assert_eq!(t.codes(), [220, 250]);
}

#[test]
fn delay_at_dot_holds_the_final_reply() {
    let h = with(vec![(CommandKind::Dot, Verdict::Delay(Duration::from_millis(100)))]);
    let t = run_with(cfg(), h, &[In(HELLO), In(b"DATA\r\nx\r\n.\r\nNOOP\r\n"), Wait(100)]);
    assert_eq!(t.codes(), [220, 250, 250, 250, 354, 250, 250]);
    assert_eq!(t.messages(), [(MessageOutcome::Accepted, 250)]);
}

#[test]
fn a_full_delay_buffer_stops_reading() {
    let h = &mut with(vec![(CommandKind::Noop, Verdict::Delay(Duration::from_secs(1)))]);
    let now = Instant::now();
    let mut s = ServerSession::new(Arc::new(cfg()), now);
    let mut out = Vec::new();
    s.start(now, &mut out, h);
    s.handle_input(now, b"NOOP\r\n", &mut out, h);
    let filler = vec![b'x'; 1024];
    while s.wants_read() {
        s.handle_input(now, &filler, &mut out, h);
    }
    assert!(s.buffered_bytes() >= MAX_PENDING_INPUT && s.buffered_bytes() < MAX_PENDING_INPUT + 2048);
    s.handle_timeout(now + Duration::from_secs(1), &mut out, h);
    assert!(s.wants_read());
}

// ---- property tests ---------------------------------------------------------------------------------

/// Dot-stuff a body made of CRLF lines (test helper).
fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

fn replay_chunks(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Vec<ServerEvent>, Vec<u8>) {
    let now = Instant::now();
    let c = ServerConfig { auth_enabled: true, starttls_available: true, xclient: true, ..cfg() };
    let mut s = ServerSession::new(Arc::new(c), now);
    let mut h = Hooks::default();
    let mut out = Vec::new();
    let mut ev = Vec::new();
    s.start(now, &mut out, &mut h);
    let mut prev = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c % (input.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.push(input.len());
    for c in cuts {
        s.handle_input(now, &input[prev..c], &mut out, &mut h);
        prev = c;
        let mut tls = false;
        while let Some(e) = s.poll_event() {
            tls |= e == ServerEvent::StartTls;
            ev.push(e);
        }
        if tls {
            // The rest of the stream would be TLS records: stop here.
            break;
        }
    }
    (out, ev, h.body)
}

fn smtp_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"EHLO x\r\n".to_vec()),
        Just(b"HELO x\r\n".to_vec()),
        Just(b"MAIL FROM:<a@b>\r\n".to_vec()),
        Just(b"MAIL FROM:<> SIZE=10\r\n".to_vec()),
        Just(b"RCPT TO:<c@d>\r\n".to_vec()),
        Just(b"DATA\r\n".to_vec()),
        Just(b"hello\r\n..x\r\n.\r\n".to_vec()),
        Just(b"a\n.\n".to_vec()),
        Just(b"BDAT 3\r\nabc".to_vec()),
        Just(b"BDAT 2 LAST\r\nxy".to_vec()),
        Just(b"RSET\r\n".to_vec()),
        Just(b"NOOP\r\n".to_vec()),
        Just(b"STARTTLS\r\n".to_vec()),
        Just(b"AUTH PLAIN AHUAcA==\r\n".to_vec()),
        Just(b"AUTH LOGIN\r\n".to_vec()),
        Just(b"XCLIENT ADDR=1.2.3.4\r\n".to_vec()),
        Just(b"QUIT\r\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..20),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parse_never_panics_on_any_bytes(line in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = wire::parse_command(&line);
        let _ = proxy::parse(&line);
        let mut buf = Vec::new();
        let _ = auth::decode_plain(&line, &mut buf);
    }

    #[test]
    fn chunked_random_bytes_equal_whole_input(
        input in proptest::collection::vec(any::<u8>(), 0..2000),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        prop_assert_eq!(replay_chunks(&input, &[]), replay_chunks(&input, &cuts));
    }

    #[test]
    fn chunked_random_scripts_equal_whole_input(
        pieces in proptest::collection::vec(smtp_piece(), 0..30),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let input = pieces.concat();
        prop_assert_eq!(replay_chunks(&input, &[]), replay_chunks(&input, &cuts));
    }

    #[test]
    fn a_dot_stuffed_random_body_arrives_byte_exact(
        lines in proptest::collection::vec(
            proptest::collection::vec(prop_oneof![Just(b'.'), any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n')], 0..120),
            0..40),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut body = Vec::new();
        for l in &lines {
            body.extend_from_slice(l);
            body.extend_from_slice(b"\r\n");
        }
        let mut input = HELLO.to_vec();
        input.extend_from_slice(b"DATA\r\n");
        input.extend_from_slice(&stuff(&body));
        input.extend_from_slice(b".\r\n");
        let (out, ev, got) = replay_chunks(&input, &cuts);
        prop_assert_eq!(&got, &body);
        prop_assert!(String::from_utf8_lossy(&out).ends_with("250 2.0.0 Message accepted\r\n"));
        let has_accepted = ev.iter().any(|e| matches!(e, ServerEvent::Message { outcome: MessageOutcome::Accepted, bytes, .. } if *bytes == body.len() as u64));
        prop_assert!(has_accepted);
    }
}
