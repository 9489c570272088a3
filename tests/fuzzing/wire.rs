//! Fuzzing command parsing (`smtp::wire::parse_command`): the input is one
//! command line without its line end.
//!
//! Invariants: no panic; every slice returned lies inside the input; the
//! verb is case-insensitive and surrounding spaces and tabs do not matter;
//! a parsed command written back in its canonical form (`MAIL
//! FROM:<path> params`, `BDAT n LAST`, ...) parses to the same command; the
//! documented limits hold (a MAIL/RCPT path fits in `MAX_PATH` with its
//! brackets, is UTF-8 and has no space or control byte; a RCPT path is not
//! empty; a HELO/EHLO/LHLO argument has no control byte); an error names
//! the command its verb meant (or `Unknown` for no known verb); and the
//! parameter iterator hands out slices of its input.

use smtpstorm::smtp::wire::{params, parse_command, Command, WireError};
use smtpstorm::smtp::{CommandKind, MAX_PATH};

use super::Rng;

/// `inner` lies within `outer` (by address).
fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    inner.is_empty() || (i >= o && i + inner.len() <= o + outer.len())
}

/// The slices a command carries.
fn slices<'a>(c: &Command<'a>) -> Vec<&'a [u8]> {
    match *c {
        Command::Helo(a) | Command::Ehlo(a) | Command::Lhlo(a) => vec![a],
        Command::Vrfy(a) | Command::Expn(a) | Command::Xclient(a) => vec![a],
        Command::Mail { path, params } | Command::Rcpt { path, params } => vec![path, params],
        Command::Auth { mechanism, initial } => vec![mechanism, initial.unwrap_or_default()],
        _ => vec![],
    }
}

/// The canonical line for a command.
pub fn canonical(c: &Command<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    let mut put = |parts: &[&[u8]]| parts.iter().for_each(|p| v.extend_from_slice(p));
    match *c {
        Command::Helo(a) => put(&[b"HELO ", a]),
        Command::Ehlo(a) => put(&[b"EHLO ", a]),
        Command::Lhlo(a) => put(&[b"LHLO ", a]),
        Command::Mail { path, params } => put(&[
            b"MAIL FROM:<",
            path,
            b">",
            if params.is_empty() { b"" } else { b" " },
            params,
        ]),
        Command::Rcpt { path, params } => put(&[
            b"RCPT TO:<",
            path,
            b">",
            if params.is_empty() { b"" } else { b" " },
            params,
        ]),
        Command::Data => put(&[b"DATA"]),
        Command::Bdat { size, last } => put(&[
            b"BDAT ",
            size.to_string().as_bytes(),
            if last { b" LAST" } else { b"" },
        ]),
        Command::Rset => put(&[b"RSET"]),
        Command::Noop => put(&[b"NOOP"]),
        Command::Vrfy(a) => put(&[b"VRFY ", a]),
        Command::Expn(a) => put(&[b"EXPN ", a]),
        Command::Help => put(&[b"HELP"]),
        Command::Quit => put(&[b"QUIT"]),
        Command::StartTls => put(&[b"STARTTLS"]),
        Command::Auth {
            mechanism,
            initial: None,
        } => put(&[b"AUTH ", mechanism]),
        Command::Auth {
            mechanism,
            initial: Some(i),
        } => put(&[b"AUTH ", mechanism, b" ", i]),
        Command::Xclient(a) => put(&[b"XCLIENT ", a]),
    }
    v
}

/// The command kind a verb names, if it is one the parser knows.
fn kind_of_verb(verb: &[u8]) -> Option<CommandKind> {
    let v = verb.to_ascii_uppercase();
    Some(match &v[..] {
        b"HELO" => CommandKind::Helo,
        b"EHLO" => CommandKind::Ehlo,
        b"LHLO" => CommandKind::Lhlo,
        b"MAIL" => CommandKind::Mail,
        b"RCPT" => CommandKind::Rcpt,
        b"DATA" => CommandKind::Data,
        b"BDAT" => CommandKind::Bdat,
        b"RSET" => CommandKind::Rset,
        b"NOOP" => CommandKind::Noop,
        b"VRFY" => CommandKind::Vrfy,
        b"EXPN" => CommandKind::Expn,
        b"HELP" => CommandKind::Help,
        b"QUIT" => CommandKind::Quit,
        b"STARTTLS" => CommandKind::StartTls,
        b"AUTH" => CommandKind::Auth,
        b"XCLIENT" => CommandKind::Xclient,
        _ => return None,
    })
}

/// One fuzz case: `line` is a command line without CRLF.
pub fn check(line: &[u8]) {
    let got = parse_command(line);
    // Surrounding blanks and the verb's case do not matter.
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = line.iter().position(|b| !blank(b)).unwrap_or(line.len());
    let end = line
        .iter()
        .rposition(|b| !blank(b))
        .map_or(start, |i| i + 1);
    let verb_end = start
        + line[start..end]
            .iter()
            .position(|&b| b == b' ')
            .unwrap_or(end - start);
    let mut flipped = line.to_vec();
    for b in &mut flipped[start..verb_end] {
        if b.is_ascii_alphabetic() {
            *b ^= 0x20;
        }
    }
    assert_eq!(parse_command(&flipped), got, "verb case changed the result");
    let mut padded = b" \t".to_vec();
    padded.extend_from_slice(line);
    padded.extend_from_slice(b"\t ");
    assert_eq!(
        parse_command(&padded),
        got,
        "surrounding blanks changed the result"
    );
    match got {
        Ok(cmd) => {
            for s in slices(&cmd) {
                assert!(within(line, s), "a slice outside the input");
            }
            assert_eq!(
                Some(cmd.kind()),
                kind_of_verb(&line[start..verb_end]),
                "kind is not the verb's"
            );
            match cmd {
                Command::Mail { path, params: p } | Command::Rcpt { path, params: p } => {
                    assert!(path.len() + 2 <= MAX_PATH, "path of {} bytes", path.len());
                    assert!(std::str::from_utf8(path).is_ok(), "path not UTF-8");
                    assert!(
                        path.iter()
                            .all(|&b| b > b' ' && b != 0x7f && b != b'<' && b != b'>'),
                        "path byte"
                    );
                    if matches!(cmd, Command::Rcpt { .. }) {
                        assert!(!path.is_empty(), "empty RCPT path");
                    }
                    for (k, v) in params(p) {
                        assert!(within(p, k) && v.is_none_or(|v| within(p, v)));
                        assert!(!k.is_empty() || v.is_some(), "an empty parameter");
                    }
                }
                Command::Helo(a) | Command::Ehlo(a) | Command::Lhlo(a) => {
                    assert!(
                        !a.is_empty() && a.iter().all(|&b| b >= b' ' && b != 0x7f),
                        "HELO argument {a:?}"
                    );
                }
                _ => {}
            }
            let again = canonical(&cmd);
            assert_eq!(
                parse_command(&again),
                Ok(cmd),
                "canonical form {:?}",
                String::from_utf8_lossy(&again)
            );
        }
        Err(WireError::Unknown) => {
            // Unknown only for verbs the parser does not know.
            assert_eq!(
                kind_of_verb(&line[start..verb_end]),
                None,
                "a known verb reported as unknown"
            );
        }
        Err(e) => assert_eq!(
            Some(e.kind()),
            kind_of_verb(&line[start..verb_end]),
            "error {e:?} names another command"
        ),
    }
}

/// Lines the stable run mutates.
pub const SEEDS: &[&[u8]] = &[
    b"MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME",
    b"mail from:<>",
    b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com",
    b"RCPT TO:<\xc3\xa9@example.com>",
    b"EHLO client.example",
    b"HELO x",
    b"LHLO y",
    b"BDAT 1000 LAST",
    b"BDAT 0",
    b"AUTH PLAIN AHUAcA==",
    b"AUTH LOGIN",
    b"XCLIENT ADDR=192.0.2.7 NAME=mx.example",
    b"VRFY postmaster",
    b"STARTTLS",
    b"DATA",
    b"QUIT",
    b"NOOP hello",
    b"HELP",
    b"RSET",
];

/// Tokens the mutator splices in.
pub const TOKENS: &[&[u8]] = &[
    b" ",
    b"\t",
    b"<",
    b">",
    b":",
    b"=",
    b"\0",
    b"\x7f",
    b"\xff",
    b"\xc3",
    b"LAST",
    b"FROM:",
    b"TO:",
    b"99999999999999999999",
];

/// A stable-run input: a mutated command line, a long one, or noise.
pub fn generate(rng: &mut Rng) -> Vec<u8> {
    match rng.below(8) {
        0 => (0..rng.index(80)).map(|_| rng.byte()).collect(),
        1 => {
            let mut v = b"RCPT TO:<".to_vec();
            v.extend(std::iter::repeat_n(b'a', 240 + rng.index(40)));
            v.push(b'>');
            v
        }
        _ => {
            let mut v = SEEDS[rng.index(SEEDS.len())].to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.index(v.len() + 1);
                match rng.below(4) {
                    0 => {
                        let t = TOKENS[rng.index(TOKENS.len())];
                        v.splice(at..at, t.iter().copied());
                    }
                    1 if at < v.len() => {
                        v.remove(at);
                    }
                    2 if at < v.len() => v[at] = rng.byte(),
                    _ => v.insert(at, rng.byte()),
                }
            }
            v
        }
    }
}
