//! SMTP command-line parsing and reply formatting, on byte slices.
//!
//! Invariants: [`parse_command`] takes one command line without its line
//! terminator, never panics on any bytes, never allocates, and returns
//! sub-slices of its input. Verbs are case-insensitive. Paths are returned
//! without their angle brackets; a path longer than [`MAX_PATH`] (brackets
//! included) is [`WireError::PathTooLong`], a path that is not valid UTF-8 is
//! [`WireError::InvalidUtf8`]. Semantic checks (sequence, limits, which
//! parameters are allowed) belong to the session, not to this module.
//! Reply writers append to a caller-owned buffer and never allocate beyond
//! growing it; every reply the server writes goes through them (one
//! formatter, `put_line`).

use thiserror::Error;

use super::{CommandKind, MAX_PATH};

/// One parsed command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Helo(&'a [u8]),
    Ehlo(&'a [u8]),
    Lhlo(&'a [u8]),
    /// `MAIL FROM:<path> params`; `path` is empty for the null sender.
    Mail { path: &'a [u8], params: &'a [u8] },
    /// `RCPT TO:<path> params`; `path` is never empty.
    Rcpt { path: &'a [u8], params: &'a [u8] },
    Data,
    Bdat { size: u64, last: bool },
    Rset,
    Noop,
    Vrfy(&'a [u8]),
    Expn(&'a [u8]),
    Help,
    Quit,
    StartTls,
    Auth { mechanism: &'a [u8], initial: Option<&'a [u8]> },
    Xclient(&'a [u8]),
}

impl Command<'_> {
    pub fn kind(&self) -> CommandKind {
        match self {
            Self::Helo(_) => CommandKind::Helo,
            Self::Ehlo(_) => CommandKind::Ehlo,
            Self::Lhlo(_) => CommandKind::Lhlo,
            Self::Mail { .. } => CommandKind::Mail,
            Self::Rcpt { .. } => CommandKind::Rcpt,
            Self::Data => CommandKind::Data,
            Self::Bdat { .. } => CommandKind::Bdat,
            Self::Rset => CommandKind::Rset,
            Self::Noop => CommandKind::Noop,
            Self::Vrfy(_) => CommandKind::Vrfy,
            Self::Expn(_) => CommandKind::Expn,
            Self::Help => CommandKind::Help,
            Self::Quit => CommandKind::Quit,
            Self::StartTls => CommandKind::StartTls,
            Self::Auth { .. } => CommandKind::Auth,
            Self::Xclient(_) => CommandKind::Xclient,
        }
    }
}

/// Why a command line did not parse. Each variant names the command it was
/// meant to be, for reply tallies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("command unrecognized")]
    Unknown,
    #[error("syntax error in {0:?} arguments")]
    Syntax(CommandKind),
    #[error("path too long")]
    PathTooLong(CommandKind),
    #[error("path is not valid UTF-8")]
    InvalidUtf8(CommandKind),
}

impl WireError {
    pub fn kind(&self) -> CommandKind {
        match *self {
            Self::Unknown => CommandKind::Unknown,
            Self::Syntax(k) | Self::PathTooLong(k) | Self::InvalidUtf8(k) => k,
        }
    }
}

fn trim_sp(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// Parse `<path> [params]` after `FROM:` / `TO:`.
fn parse_path(arg: &[u8], kind: CommandKind) -> Result<(&[u8], &[u8]), WireError> {
    let arg = trim_sp(arg);
    if arg.first() != Some(&b'<') {
        return Err(WireError::Syntax(kind));
    }
    let close = match memchr::memchr(b'>', arg) {
        Some(c) => c,
        None if arg.len() > MAX_PATH => return Err(WireError::PathTooLong(kind)),
        None => return Err(WireError::Syntax(kind)),
    };
    if close + 1 > MAX_PATH {
        return Err(WireError::PathTooLong(kind));
    }
    let path = &arg[1..close];
    let rest = &arg[close + 1..];
    if !rest.is_empty() && rest[0] != b' ' {
        return Err(WireError::Syntax(kind));
    }
    let mut ascii = true;
    for &b in path {
        if b <= b' ' || b == 0x7f || b == b'<' {
            return Err(WireError::Syntax(kind));
        }
        ascii &= b < 0x80;
    }
    if !ascii && std::str::from_utf8(path).is_err() {
        return Err(WireError::InvalidUtf8(kind));
    }
    Ok((path, trim_sp(rest)))
}

fn no_args(arg: &[u8], cmd: Command<'static>) -> Result<Command<'static>, WireError> {
    if arg.is_empty() {
        Ok(cmd)
    } else {
        Err(WireError::Syntax(cmd.kind()))
    }
}

/// Parse one command line (without CRLF). Never panics.
pub fn parse_command(line: &[u8]) -> Result<Command<'_>, WireError> {
    let line = trim_sp(line);
    let (verb, arg) = match memchr::memchr(b' ', line) {
        Some(sp) => (&line[..sp], trim_sp(&line[sp + 1..])),
        None => (line, &line[line.len()..]),
    };
    if verb.len() < 4 || verb.len() > 8 {
        return Err(WireError::Unknown);
    }
    let mut v = [0u8; 8];
    for (d, s) in v.iter_mut().zip(verb) {
        *d = s.to_ascii_uppercase();
    }
    match &v[..verb.len()] {
        b"HELO" | b"EHLO" | b"LHLO" => {
            let kind = match v[0] {
                b'H' => CommandKind::Helo,
                b'E' => CommandKind::Ehlo,
                _ => CommandKind::Lhlo,
            };
            if arg.is_empty() || arg.iter().any(|&b| b < b' ' || b == 0x7f) {
                return Err(WireError::Syntax(kind));
            }
            Ok(match kind {
                CommandKind::Helo => Command::Helo(arg),
                CommandKind::Ehlo => Command::Ehlo(arg),
                _ => Command::Lhlo(arg),
            })
        }
        b"MAIL" => {
            let rest =
                strip_prefix_ci(arg, b"FROM:").ok_or(WireError::Syntax(CommandKind::Mail))?;
            let (path, params) = parse_path(rest, CommandKind::Mail)?;
            Ok(Command::Mail { path, params })
        }
        b"RCPT" => {
            let rest = strip_prefix_ci(arg, b"TO:").ok_or(WireError::Syntax(CommandKind::Rcpt))?;
            let (path, params) = parse_path(rest, CommandKind::Rcpt)?;
            if path.is_empty() {
                return Err(WireError::Syntax(CommandKind::Rcpt));
            }
            Ok(Command::Rcpt { path, params })
        }
        b"DATA" => no_args(arg, Command::Data),
        b"BDAT" => {
            let bad = WireError::Syntax(CommandKind::Bdat);
            let (num, last) = match memchr::memchr(b' ', arg) {
                Some(sp) => {
                    if !trim_sp(&arg[sp + 1..]).eq_ignore_ascii_case(b"LAST") {
                        return Err(bad);
                    }
                    (&arg[..sp], true)
                }
                None => (arg, false),
            };
            let size = parse_u64(num).ok_or(bad)?;
            Ok(Command::Bdat { size, last })
        }
        b"RSET" => no_args(arg, Command::Rset),
        b"NOOP" => Ok(Command::Noop),
        b"VRFY" | b"EXPN" => {
            let kind = if v[0] == b'V' { CommandKind::Vrfy } else { CommandKind::Expn };
            if arg.is_empty() {
                return Err(WireError::Syntax(kind));
            }
            Ok(if kind == CommandKind::Vrfy { Command::Vrfy(arg) } else { Command::Expn(arg) })
        }
        b"HELP" => Ok(Command::Help),
        b"QUIT" => no_args(arg, Command::Quit),
        b"STARTTLS" => no_args(arg, Command::StartTls),
        b"AUTH" => {
            if arg.is_empty() {
                return Err(WireError::Syntax(CommandKind::Auth));
            }
            Ok(match memchr::memchr(b' ', arg) {
                Some(sp) => {
                    let initial = trim_sp(&arg[sp + 1..]);
                    if initial.contains(&b' ') {
                        return Err(WireError::Syntax(CommandKind::Auth));
                    }
                    Command::Auth { mechanism: &arg[..sp], initial: Some(initial) }
                }
                None => Command::Auth { mechanism: arg, initial: None },
            })
        }
        b"XCLIENT" => {
            if arg.is_empty() {
                return Err(WireError::Syntax(CommandKind::Xclient));
            }
            Ok(Command::Xclient(arg))
        }
        _ => Err(WireError::Unknown),
    }
}

/// Iterator over `KEY[=VALUE]` parameters of MAIL/RCPT (space separated).
pub struct Params<'a> {
    rest: &'a [u8],
}

/// Split a parameter string into `(key, value)` pairs.
pub fn params(raw: &[u8]) -> Params<'_> {
    Params { rest: raw }
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);
    fn next(&mut self) -> Option<Self::Item> {
        let s = trim_sp(self.rest);
        if s.is_empty() {
            return None;
        }
        let end = memchr::memchr(b' ', s).unwrap_or(s.len());
        let tok = &s[..end];
        self.rest = &s[end..];
        Some(match memchr::memchr(b'=', tok) {
            Some(eq) => (&tok[..eq], Some(&tok[eq + 1..])),
            None => (tok, None),
        })
    }
}

/// The decimal digits of `n`, written at the end of `buf`.
pub(super) fn fmt_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// A plain decimal number of at most 19 digits (no sign, no spaces).
pub(super) fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |a, &d| a * 10 + u64::from(d - b'0')))
}

/// The one reply-line formatter: `code`, `sep` (`b' '` on a reply's last
/// line, `b'-'` when more follow), `enh ` if given, the `parts` in order,
/// CRLF. Codes outside 100..=999 are clamped into it.
#[inline]
fn put_line(out: &mut Vec<u8>, code: u16, sep: u8, enh: Option<&str>, parts: &[&[u8]]) {
    let code = code.clamp(100, 999);
    out.extend_from_slice(&[
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        sep,
    ]);
    if let Some(e) = enh {
        out.extend_from_slice(e.as_bytes());
        out.push(b' ');
    }
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"\r\n");
}

/// Append `code [enh ]text CRLF`.
pub fn write_reply(out: &mut Vec<u8>, code: u16, enh: Option<&str>, text: &[u8]) {
    put_line(out, code, b' ', enh, &[text]);
}

/// Append `code [enh ]` then the `parts` concatenated, then CRLF (a reply
/// whose text is pieced together, without building it first).
pub fn write_reply_parts(out: &mut Vec<u8>, code: u16, enh: Option<&str>, parts: &[&[u8]]) {
    put_line(out, code, b' ', enh, parts);
}

/// Append one line of a multi-line reply: `code-text` (more follow) or
/// `code text` (last line).
pub fn write_reply_line(out: &mut Vec<u8>, code: u16, more: bool, text: &[u8]) {
    put_line(out, code, if more { b'-' } else { b' ' }, None, &[text]);
}

/// A multi-line reply written one line at a time when it is not known in
/// advance which line is the last: every line goes out as `code-text`, and
/// [`MultiLine::finish`] turns the last one into `code text`.
#[derive(Debug)]
pub struct MultiLine {
    code: u16,
    /// Offset in `out` of the last line written.
    last: Option<usize>,
}

impl MultiLine {
    pub fn new(code: u16) -> Self {
        Self { code, last: None }
    }

    /// Append `code-` and the `parts` concatenated, then CRLF.
    pub fn line(&mut self, out: &mut Vec<u8>, parts: &[&[u8]]) {
        self.last = Some(out.len());
        put_line(out, self.code, b'-', None, parts);
    }

    /// Mark the last line written as the reply's last (`out` must be the
    /// buffer the lines went to, not truncated since).
    pub fn finish(self, out: &mut [u8]) {
        if let Some(at) = self.last {
            out[at + 3] = b' ';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_from_parses_path_and_params() {
        let c = parse_command(b"mail from:<a@b.c> SIZE=10 BODY=8BITMIME").unwrap();
        assert_eq!(c, Command::Mail { path: b"a@b.c", params: b"SIZE=10 BODY=8BITMIME" });
        let p: Vec<_> = params(b"SIZE=10 SMTPUTF8").collect();
        assert_eq!(p, vec![(&b"SIZE"[..], Some(&b"10"[..])), (&b"SMTPUTF8"[..], None)]);
    }

    #[test]
    fn null_sender_is_allowed_but_not_as_recipient() {
        assert_eq!(parse_command(b"MAIL FROM:<>").unwrap(), Command::Mail { path: b"", params: b"" });
        assert_eq!(parse_command(b"RCPT TO:<>"), Err(WireError::Syntax(CommandKind::Rcpt)));
    }

    #[test]
    fn long_paths_and_bad_utf8_are_errors() {
        let mut line = b"RCPT TO:<".to_vec();
        line.extend(std::iter::repeat_n(b'a', 300));
        line.push(b'>');
        assert_eq!(parse_command(&line), Err(WireError::PathTooLong(CommandKind::Rcpt)));
        assert_eq!(
            parse_command(b"MAIL FROM:<\xff@x>"),
            Err(WireError::InvalidUtf8(CommandKind::Mail))
        );
    }

    #[test]
    fn bdat_parses_size_and_last() {
        assert_eq!(parse_command(b"BDAT 10 last").unwrap(), Command::Bdat { size: 10, last: true });
        assert_eq!(parse_command(b"BDAT 0").unwrap(), Command::Bdat { size: 0, last: false });
        assert!(parse_command(b"BDAT x").is_err());
        assert!(parse_command(b"BDAT 99999999999999999999").is_err());
    }

    #[test]
    fn unknown_verbs_are_unknown() {
        assert_eq!(parse_command(b""), Err(WireError::Unknown));
        assert_eq!(parse_command(b"FOO bar"), Err(WireError::Unknown));
    }

    #[test]
    fn replies_are_formatted() {
        let mut out = Vec::new();
        write_reply(&mut out, 250, Some("2.0.0"), b"OK");
        write_reply_line(&mut out, 250, true, b"x");
        assert_eq!(out, b"250 2.0.0 OK\r\n250-x\r\n");
    }

    #[test]
    fn multi_line_replies_end_with_a_space_after_the_code() {
        let mut out = b"x".to_vec();
        let mut m = MultiLine::new(250);
        m.line(&mut out, &[b"host"]);
        m.line(&mut out, &[b"SIZE ", b"10"]);
        m.finish(&mut out);
        assert_eq!(out, b"x250-host\r\n250 SIZE 10\r\n");
        write_reply_parts(&mut out, 221, None, &[b"host", b" bye"]);
        assert!(out.ends_with(b"221 host bye\r\n"));
    }

    #[test]
    fn numbers_format_and_parse_back() {
        let mut buf = [0u8; 20];
        for n in [0, 7, 10, 1234, u64::MAX] {
            assert_eq!(
                parse_u64(fmt_u64(n, &mut buf)),
                (n < 10_000_000_000_000_000_000).then_some(n)
            );
        }
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"1 "), None);
    }
}
