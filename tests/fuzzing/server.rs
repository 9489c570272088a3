//! Fuzzing the server session. The first input byte selects the
//! configuration (LMTP, bare-LF policy, PROXY, AUTH, STARTTLS, size limit),
//! the next four seed the chunking and fault-verdict PRNG, the rest is the
//! client's byte stream.
//!
//! Invariants: no panic; every reply line starts with three digits and a
//! space or dash and ends in CRLF; output bounded by 64x input + 8 KiB;
//! buffered input bounded; message hooks balanced; without faults the
//! result is the same whether the input comes whole, in random chunks or
//! one byte at a time. And the DATA rules: the final reply to a DATA body
//! (`Reply { command: Dot }`) comes exactly when its terminator's last byte
//! arrives, and that terminator is CRLF.CRLF (the DATA line's own line end
//! counting as the first CRLF) — under `--bare-lf accept` also LF.LF or
//! LF.CRLF after a bare LF; so outside `accept` one DATA never becomes two
//! messages. A DATA body accepted under `reject` or `normalize` holds no
//! bare LF and no bare CR.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smtpstorm::smtp::server::{
    CommandInfo, ServerConfig, ServerEvent, ServerHooks, ServerSession, Verdict, MAX_PENDING_INPUT,
};
use smtpstorm::smtp::{BareLfPolicy, CommandKind};

use super::Rng;

struct FuzzHooks {
    rng: Rng,
    faults: bool,
    open: i32,
    /// The command of the last verdict asked for (DATA or BDAT before a
    /// message starts).
    last_command: Option<CommandKind>,
    /// The open message came from DATA (not BDAT), and its body so far.
    data_message: bool,
    body: Vec<u8>,
    /// Bodies of DATA messages accepted.
    accepted_data_bodies: Vec<Vec<u8>>,
}

impl ServerHooks for FuzzHooks {
    fn on_command(&mut self, cmd: CommandKind, _info: &CommandInfo<'_>) -> Verdict {
        self.last_command = Some(cmd);
        if !self.faults {
            return Verdict::Proceed;
        }
        match self.rng.below(16) {
            0 => Verdict::Reply(451),
            1 => Verdict::Reply(550),
            2 => Verdict::Delay(Duration::from_millis(self.rng.below(500))),
            3 => Verdict::Disconnect,
            4 => Verdict::Disconnect421,
            5 => Verdict::Reply(421),
            _ => Verdict::Proceed,
        }
    }
    fn check_auth(&mut self, _a: &[u8], user: &[u8], _p: &[u8]) -> bool {
        user.first() != Some(&b'x')
    }
    fn on_message_start(&mut self) {
        self.open += 1;
        assert_eq!(self.open, 1, "on_message_start twice");
        self.data_message = self.last_command == Some(CommandKind::Data);
        self.body.clear();
    }
    fn on_body(&mut self, chunk: &[u8]) {
        assert_eq!(self.open, 1, "body outside a message");
        self.body.extend_from_slice(chunk);
    }
    fn on_message_end(&mut self, accepted: bool) {
        self.open -= 1;
        assert_eq!(self.open, 0, "on_message_end without start");
        if accepted && self.data_message {
            self.accepted_data_bodies
                .push(std::mem::take(&mut self.body));
        }
    }
}

/// Maximum chunk size the driver feeds at once.
pub const MAX_CHUNK: usize = 4096;

fn config_from(sel: u8) -> ServerConfig {
    ServerConfig {
        hostname: "fuzz.example".into(),
        lmtp: sel & 1 != 0,
        bare_lf: policy_of(sel),
        proxy_protocol: sel & 8 != 0,
        auth_enabled: sel & 16 != 0,
        starttls_available: sel & 32 != 0,
        require_tls: sel & 64 != 0,
        xclient: true,
        max_message_size: if sel & 128 != 0 { 200 } else { 0 },
        max_recipients: 3,
        ..ServerConfig::default()
    }
}

fn policy_of(sel: u8) -> BareLfPolicy {
    match (sel >> 1) & 3 {
        0 => BareLfPolicy::Reject,
        1 => BareLfPolicy::Normalize,
        _ => BareLfPolicy::Accept,
    }
}

/// How the driver cuts the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    Whole,
    Random,
    Bytewise,
}

/// What one driven session produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Run {
    pub out: Vec<u8>,
    pub events: Vec<ServerEvent>,
    /// For each event, how many input bytes had been fed when it came
    /// (`usize::MAX` if a timeout brought it).
    pub fed_at: Vec<usize>,
    pub accepted_data_bodies: Vec<Vec<u8>>,
}

/// Drives one session over `input`.
pub fn drive(input: &[u8], sel: u8, seed: u64, faults: bool, feed: Feed) -> Run {
    let cfg = Arc::new(config_from(sel));
    let mut now = Instant::now();
    let mut s = ServerSession::new(cfg, now);
    let mut hooks = FuzzHooks {
        rng: Rng(seed ^ 0x9e37_79b9),
        faults,
        open: 0,
        last_command: None,
        data_message: false,
        body: Vec::new(),
        accepted_data_bodies: Vec::new(),
    };
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let mut events = Vec::new();
    let mut fed_at = Vec::new();
    s.start(now, &mut out, &mut hooks);
    let mut pos = 0;
    let check = |s: &ServerSession, out: &[u8], fed: usize| {
        assert!(s.buffered_bytes() <= MAX_PENDING_INPUT + input.len().clamp(2048, MAX_CHUNK) + 16);
        assert!(
            out.len() <= 64 * fed + 8192,
            "output {} for input {}",
            out.len(),
            fed
        );
    };
    while pos < input.len() && !s.is_closed() {
        let timed = !s.wants_read()
            || (s.poll_timeout().is_some_and(|t| t > now && faults) && rng.below(8) == 0);
        if timed {
            now += Duration::from_millis(600);
            s.handle_timeout(now, &mut out, &mut hooks);
        } else {
            let n = match feed {
                Feed::Whole => input.len() - pos,
                Feed::Random => 1 + rng.below(64) as usize,
                Feed::Bytewise => 1,
            };
            let n = n.min(input.len() - pos).min(MAX_CHUNK);
            s.handle_input(now, &input[pos..pos + n], &mut out, &mut hooks);
            pos += n;
        }
        while let Some(e) = s.poll_event() {
            if e == ServerEvent::StartTls {
                s.handle_tls_established(now);
            }
            events.push(e);
            fed_at.push(if timed { usize::MAX } else { pos });
        }
        check(&s, &out, pos);
    }
    // Run out the clock: the session must close.
    for _ in 0..4 {
        if s.is_closed() {
            break;
        }
        match s.poll_timeout() {
            Some(t) => now = t.max(now),
            None => break,
        }
        s.handle_timeout(now, &mut out, &mut hooks);
        while let Some(e) = s.poll_event() {
            events.push(e);
            fed_at.push(usize::MAX);
        }
    }
    check(&s, &out, pos);
    assert!(
        hooks.open == 0 || !s.is_closed(),
        "message left open at close"
    );
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(
            line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit),
            "bad reply line {line:?}"
        );
        assert!(line[3] == b' ' || line[3] == b'-');
        assert_eq!(line.last(), Some(&b'\r'));
    }
    Run {
        out,
        events,
        fed_at,
        accepted_data_bodies: hooks.accepted_data_bodies,
    }
}

/// True if `body` holds an LF not preceded by CR or a CR not followed by LF.
pub fn has_bare_lf_or_cr(body: &[u8]) -> bool {
    body.iter().enumerate().any(|(i, &b)| {
        (b == b'\n' && (i == 0 || body[i - 1] != b'\r'))
            || (b == b'\r' && body.get(i + 1) != Some(&b'\n'))
    })
}

/// Checks, on a run fed one byte at a time without faults, where each DATA
/// body ended (see the module doc).
pub fn check_data_ends(input: &[u8], run: &Run, policy: BareLfPolicy) {
    // Input offset just after the last DATA line answered with 354.
    let mut body_start = None;
    for (e, &at) in run.events.iter().zip(&run.fed_at) {
        match *e {
            ServerEvent::Reply {
                command: CommandKind::Data,
                code: 354,
            } => body_start = Some(at),
            ServerEvent::Reply {
                command: CommandKind::Dot,
                code,
            } if at != usize::MAX => {
                let start =
                    body_start.unwrap_or_else(|| panic!("{code} to a dot without a 354 before it"));
                let seen = &input[..at];
                let crlf_dot_crlf = seen.ends_with(b"\r\n.\r\n") && at >= start + 3
                    || at == start + 3 && seen.ends_with(b".\r\n");
                let bare_start = |n: usize| {
                    at > start + n
                        && seen[..at - n].ends_with(b"\n")
                        && (at - n < 2 || seen[at - n - 2] != b'\r')
                };
                let lf_dot = (seen.ends_with(b"\n.\n") && bare_start(2))
                    || (seen.ends_with(b"\n.\r\n") && bare_start(3));
                let ok = match policy {
                    BareLfPolicy::Accept => crlf_dot_crlf || lf_dot,
                    _ => crlf_dot_crlf,
                };
                assert!(
                    ok,
                    "{policy:?}: final reply {code} to a DATA body after {:?} (body began at {start})",
                    String::from_utf8_lossy(&seen[at.saturating_sub(12)..])
                );
            }
            _ => {}
        }
    }
    if policy != BareLfPolicy::Accept {
        for body in &run.accepted_data_bodies {
            assert!(
                !has_bare_lf_or_cr(body),
                "{policy:?} accepted a body with a bare LF or CR: {body:?}"
            );
        }
    }
}

/// One fuzz case: the first byte selects the config, the next four seed
/// the chunking and fault PRNG; the rest is the client's byte stream.
pub fn check(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let sel = data[0];
    let seed = u64::from(u32::from_le_bytes([data[1], data[2], data[3], data[4]]));
    let input = &data[5..];
    let faults = seed & 1 == 1;
    let chunked = drive(input, sel, seed, faults, Feed::Random);
    // With faults, time moves differently per chunking; after STARTTLS
    // the rest of the stream means something else per chunking.
    if faults || chunked.events.contains(&ServerEvent::StartTls) {
        return;
    }
    let whole = drive(input, sel, seed, faults, Feed::Whole);
    assert_eq!(
        (&chunked.out, &chunked.events),
        (&whole.out, &whole.events),
        "chunking changed the result"
    );
    let bytewise = drive(input, sel, seed, faults, Feed::Bytewise);
    assert_eq!(
        (&chunked.out, &chunked.events),
        (&bytewise.out, &bytewise.events),
        "feeding one byte at a time changed the result"
    );
    assert_eq!(chunked.accepted_data_bodies, bytewise.accepted_data_bodies);
    check_data_ends(input, &bytewise, policy_of(sel));
}

/// Seeds for the stable run: whole sessions the mutations start from.
pub const SEEDS: &[&[u8]] = &[
    b"EHLO x\r\nMAIL FROM:<a@b> SIZE=5\r\nRCPT TO:<c@d>\r\nDATA\r\nhi\r\n..\r\n.\r\nQUIT\r\n",
    b"LHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@d>\r\nBDAT 4\r\nabcdBDAT 0 LAST\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nEHLO x\r\nSTARTTLS\r\nEHLO y\r\nAUTH PLAIN AHUAcA==\r\n",
    b"EHLO x\r\nAUTH LOGIN\r\ndQ==\r\ncA==\r\nXCLIENT ADDR=::1\r\nMAIL FROM:<\xc3\xa9@x> SMTPUTF8\r\n",
    b"\r\n\r\n.\r\n\n.\n\r.\rBDAT 99999999\r\n",
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x01\x02\x03\x04\x05\x06\x07\x08\x00\x01\x00\x02NOOP\r\n",
    // Smuggling: a DATA whose body hides a second transaction.
    b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhi\n.\nMAIL FROM:<e@f>\r\nRCPT TO:<g@h>\r\nDATA\r\nx\r\n.\r\n",
    b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhi\r.\r\r\n.\n\r\n.\r\n",
];

/// Tokens the mutator splices in.
pub const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\r\r\n",
    b"DATA\r\n",
    b"BDAT 3 LAST\r\n",
    b"RCPT TO:<x@y>\r\n",
    b"MAIL FROM:<>\r\n",
    b"EHLO a\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"*\r\n",
    b"RSET\r\n",
];

/// Body pieces for generated DATA transactions: smuggling sequences,
/// dots, bare line ends, long runs.
const BODY_TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\r\r\n",
    b"\r\n..\r\n",
    b"text",
    b"MAIL FROM:<e@f>\r\nRCPT TO:<g@h>\r\nDATA\r\n",
    b"QUIT\r\n",
];

/// A stable-run input: config and seed bytes, then DATA transactions
/// with hostile bodies, a mutated seed session, or noise.
pub fn generate(rng: &mut Rng) -> Vec<u8> {
    let mut input: Vec<u8> = (0..5).map(|_| rng.byte()).collect();
    match rng.below(8) {
        0 => {
            let n = rng.index(3000);
            input.extend((0..n).map(|_| rng.byte()));
        }
        1..=4 => {
            // Mostly plain SMTP or LMTP sessions, no PROXY, no require_tls.
            input[0] &= !(8 | 64);
            input.extend_from_slice(if input[0] & 1 != 0 {
                b"LHLO x\r\n"
            } else {
                b"EHLO x\r\n"
            });
            for _ in 0..1 + rng.below(3) {
                input.extend_from_slice(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
                for _ in 0..rng.below(12) {
                    if rng.below(12) == 0 {
                        input.extend(std::iter::repeat_n(b'y', rng.index(1100)));
                    } else {
                        input.extend_from_slice(BODY_TOKENS[rng.index(BODY_TOKENS.len())]);
                    }
                }
                input.extend_from_slice(b"\r\n.\r\n");
            }
            for _ in 0..rng.below(3) {
                let at = 5 + rng.index(input.len() - 4);
                let t = TOKENS[rng.index(TOKENS.len())];
                input.splice(at..at, t.iter().copied());
            }
            if rng.below(4) != 0 {
                input[1] &= !1;
            }
        }
        _ => {
            let seed = SEEDS[rng.index(SEEDS.len())];
            input.extend_from_slice(seed);
            mutate_after(rng, &mut input);
            // Mostly configurations in which the session gets somewhere: PROXY
            // only for a stream that starts with a header, rarely `require_tls`,
            // faults in a quarter of the cases.
            let proxy = seed.starts_with(b"PROXY") || seed.starts_with(b"\r\n\r\n\0");
            if !proxy || rng.below(8) == 0 {
                input[0] &= !8;
            }
            if rng.below(8) != 0 {
                input[0] &= !64;
            }
            if rng.below(4) != 0 {
                input[1] &= !1;
            }
        }
    }
    input
}

fn mutate_after(rng: &mut Rng, input: &mut Vec<u8>) {
    super::mutate(rng, input, TOKENS, 5);
}
