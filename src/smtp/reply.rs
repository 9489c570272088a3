//! Client-side SMTP reply parsing and EHLO capability parsing.
//!
//! [`ReplyParser`] is a streaming parser: feed it bytes in any chunking and
//! it yields one [`Reply`] per complete (possibly multi-line) reply, exactly
//! as if the bytes had come in one piece. Invariants: it never panics on any
//! input; its memory is bounded (one line of at most [`MAX_REPLY_LINE`] bytes
//! plus the text of one reply of at most [`MAX_REPLY_TEXT`] bytes); buffers
//! are reused between replies, so steady state parsing allocates nothing.
//! A line that is too long, a code that is not three digits in `100..=599`,
//! a bad separator (not space, hyphen or line end), or a code
//! that changes between the lines of one reply is a [`ReplyError`]; after an
//! error the parser stays failed (the byte stream can no longer be trusted).
//! Lines end with CRLF; a bare LF is tolerated as a line end.

use thiserror::Error;

/// The longest reply line accepted, line end included.
pub const MAX_REPLY_LINE: usize = 4096;
/// The most text one (multi-line) reply may carry, all lines together.
pub const MAX_REPLY_TEXT: usize = 64 * 1024;

/// Why a byte stream is no SMTP reply stream.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplyError {
    #[error("reply line longer than {MAX_REPLY_LINE} bytes")]
    LineTooLong,
    #[error("reply text longer than {MAX_REPLY_TEXT} bytes")]
    ReplyTooLong,
    #[error("reply line does not start with a three-digit code 100..599")]
    BadCode,
    #[error("reply code is not followed by a space, a hyphen or the line end")]
    BadSeparator,
    #[error("reply code changed between lines of one reply ({first} then {next})")]
    CodeMismatch { first: u16, next: u16 },
    #[error("reply stream already failed")]
    Failed,
}

/// An RFC 3463 enhanced status code (`class.subject.detail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

/// One complete reply: its code and, if the first line carries one, its
/// enhanced status code. The text lines stay in the parser
/// ([`ReplyParser::lines`]) until the next reply starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
}

impl Reply {
    /// The first digit of the code (2, 3, 4 or 5 for SMTP).
    pub fn class(&self) -> u16 {
        self.code / 100
    }
}

/// Streaming SMTP reply parser (see the module doc for its contract).
#[derive(Debug)]
pub struct ReplyParser {
    /// Bytes of the current, incomplete line.
    line: Vec<u8>,
    /// Text (after `ddd-`/`ddd `) of the lines of the current reply, each
    /// terminated by `\n` so [`Self::lines`] can split them.
    text: Vec<u8>,
    /// Code of the current multi-line reply, once its first line is seen.
    code: Option<u16>,
    enhanced: Option<EnhancedCode>,
    /// Set when the previous call returned a reply: `text` is cleared lazily
    /// when the next line arrives, so the caller can read it meanwhile.
    reply_done: bool,
    failed: bool,
}

impl Default for ReplyParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplyParser {
    pub fn new() -> Self {
        Self {
            line: Vec::with_capacity(256),
            text: Vec::with_capacity(256),
            code: None,
            enhanced: None,
            reply_done: false,
            failed: false,
        }
    }

    /// Forget any partial line and reply (e.g. after STARTTLS succeeds, when
    /// plaintext received before the handshake must be dropped).
    pub fn reset(&mut self) {
        self.line.clear();
        self.text.clear();
        self.code = None;
        self.enhanced = None;
        self.reply_done = false;
        self.failed = false;
    }

    /// Whether a previous error poisoned the parser.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Whether bytes of an incomplete reply are buffered.
    pub fn has_partial(&self) -> bool {
        !self.line.is_empty() || self.code.is_some()
    }

    /// Consume bytes from `input[*pos..]` until one reply is complete (then
    /// return it, with `*pos` just past its last line) or the input is used
    /// up (`Ok(None)`, everything buffered). Never panics.
    pub fn parse(&mut self, input: &[u8], pos: &mut usize) -> Result<Option<Reply>, ReplyError> {
        if self.failed {
            return Err(ReplyError::Failed);
        }
        while *pos < input.len() {
            let rest = &input[*pos..];
            let (chunk, complete) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..=i], true),
                None => (rest, false),
            };
            if self.line.len() + chunk.len() > MAX_REPLY_LINE {
                self.failed = true;
                return Err(ReplyError::LineTooLong);
            }
            self.line.extend_from_slice(chunk);
            *pos += chunk.len();
            if !complete {
                return Ok(None);
            }
            match self.finish_line() {
                Ok(Some(reply)) => return Ok(Some(reply)),
                Ok(None) => {}
                Err(e) => {
                    self.failed = true;
                    return Err(e);
                }
            }
        }
        Ok(None)
    }

    /// The text lines of the last complete reply (or of the reply being
    /// parsed), without code, separator and line end.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        let text = if self.text.is_empty() { &self.text[..0] } else { &self.text[..self.text.len() - 1] };
        text.split(|&b| b == b'\n').filter(move |_| !self.text.is_empty())
    }

    /// Parse the complete line in `self.line`.
    fn finish_line(&mut self) -> Result<Option<Reply>, ReplyError> {
        if self.reply_done {
            self.text.clear();
            self.reply_done = false;
        }
        let mut end = self.line.len() - 1; // the '\n'
        if end > 0 && self.line[end - 1] == b'\r' {
            end -= 1;
        }
        let line = &self.line[..end];
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(ReplyError::BadCode);
        }
        let code = u16::from(line[0] - b'0') * 100 + u16::from(line[1] - b'0') * 10 + u16::from(line[2] - b'0');
        if !(100..=599).contains(&code) {
            return Err(ReplyError::BadCode);
        }
        let last = match line.get(3) {
            None | Some(b' ') => true,
            Some(b'-') => false,
            Some(_) => return Err(ReplyError::BadSeparator),
        };
        let text = line.get(4..).unwrap_or(&[]);
        match self.code {
            Some(first) if first != code => return Err(ReplyError::CodeMismatch { first, next: code }),
            Some(_) => {}
            None => {
                self.code = Some(code);
                self.enhanced = parse_enhanced(text, code);
            }
        }
        if self.text.len() + text.len() + 1 > MAX_REPLY_TEXT {
            return Err(ReplyError::ReplyTooLong);
        }
        self.text.extend_from_slice(text);
        self.text.push(b'\n');
        self.line.clear();
        if !last {
            return Ok(None);
        }
        self.code = None;
        self.reply_done = true;
        Ok(Some(Reply { code, enhanced: self.enhanced.take() }))
    }
}

/// Parse a leading `c.sss.ddd` enhanced status code whose class matches the
/// reply code's first digit (RFC 2034: 2, 4 or 5).
fn parse_enhanced(text: &[u8], code: u16) -> Option<EnhancedCode> {
    let token_end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
    let token = &text[..token_end];
    let mut parts = token.split(|&b| b == b'.');
    let class = parse_num(parts.next()?, 1)?;
    let subject = parse_num(parts.next()?, 3)?;
    let detail = parse_num(parts.next()?, 3)?;
    if parts.next().is_some() || !matches!(class, 2 | 4 | 5) || u16::from(class as u8) != code / 100 {
        return None;
    }
    Some(EnhancedCode { class: class as u8, subject, detail })
}

fn parse_num(digits: &[u8], max_len: usize) -> Option<u16> {
    if digits.is_empty() || digits.len() > max_len || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0')))
}

/// The ESMTP extensions a server advertised in its EHLO (or LHLO) reply.
/// A HELO session has the default: nothing advertised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Whether the reply was to EHLO/LHLO (false: HELO fallback or none yet).
    pub esmtp: bool,
    pub pipelining: bool,
    /// `SIZE` advertised; `Some(0)` means no fixed limit given.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    pub starttls: bool,
    pub enhanced_status_codes: bool,
    pub dsn: bool,
    pub auth_plain: bool,
    pub auth_login: bool,
    /// Any AUTH line was seen (possibly with only unsupported mechanisms).
    pub auth: bool,
    /// `XCLIENT` advertised (Postfix's extension; its attribute list is not
    /// kept: a server refuses an attribute it does not take with 501).
    pub xclient: bool,
}

impl Capabilities {
    /// Parse EHLO reply text lines (the first line is the server's greeting
    /// domain and is skipped). Unknown keywords are ignored; keywords and
    /// mechanisms are case-insensitive.
    pub fn from_ehlo_lines<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut caps = Capabilities { esmtp: true, ..Default::default() };
        for line in lines.into_iter().skip(1) {
            let mut words = line.split(|&b| b == b' ' || b == b'=').filter(|w| !w.is_empty());
            let Some(keyword) = words.next() else { continue };
            let is = |k: &str| keyword.eq_ignore_ascii_case(k.as_bytes());
            if is("PIPELINING") {
                caps.pipelining = true;
            } else if is("SIZE") {
                let limit = words.next().and_then(|w| std::str::from_utf8(w).ok()?.parse().ok());
                caps.size = Some(limit.unwrap_or(0));
            } else if is("8BITMIME") {
                caps.eight_bit_mime = true;
            } else if is("SMTPUTF8") {
                caps.smtputf8 = true;
            } else if is("CHUNKING") {
                caps.chunking = true;
            } else if is("STARTTLS") {
                caps.starttls = true;
            } else if is("ENHANCEDSTATUSCODES") {
                caps.enhanced_status_codes = true;
            } else if is("DSN") {
                caps.dsn = true;
            } else if is("XCLIENT") {
                caps.xclient = true;
            } else if is("AUTH") {
                caps.auth = true;
                for mech in words {
                    if mech.eq_ignore_ascii_case(b"PLAIN") {
                        caps.auth_plain = true;
                    } else if mech.eq_ignore_ascii_case(b"LOGIN") {
                        caps.auth_login = true;
                    }
                }
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Replies (code and text lines) and the first error.
    type Parsed = (Vec<(u16, Vec<Vec<u8>>)>, Option<ReplyError>);

    /// Parse a whole byte stream, returning codes and the first error.
    fn parse_all(chunks: &[&[u8]]) -> Parsed {
        let mut p = ReplyParser::new();
        let mut out = Vec::new();
        for chunk in chunks {
            let mut pos = 0;
            loop {
                match p.parse(chunk, &mut pos) {
                    Ok(Some(r)) => out.push((r.code, p.lines().map(<[u8]>::to_vec).collect())),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        (out, None)
    }

    #[test]
    fn multiline_reply_split_anywhere_parses_the_same() {
        let s = b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n354 go\r\n";
        let whole = parse_all(&[s]);
        assert_eq!(whole.0.len(), 2);
        assert_eq!(whole.0[0].1, vec![b"mx.example".to_vec(), b"PIPELINING".to_vec(), b"SIZE 1000".to_vec()]);
        for k in 0..=s.len() {
            assert_eq!(parse_all(&[&s[..k], &s[k..]]), whole, "split at {k}");
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(parse_all(&bytes), whole);
    }

    #[test]
    fn enhanced_code_is_parsed_when_class_matches() {
        let mut p = ReplyParser::new();
        let mut pos = 0;
        let r = p.parse(b"550 5.1.1 no such user\r\n", &mut pos).unwrap().unwrap();
        assert_eq!(r.enhanced, Some(EnhancedCode { class: 5, subject: 1, detail: 1 }));
        let mut pos = 0;
        let r = p.parse(b"250 5.1.1 odd\r\n", &mut pos).unwrap().unwrap();
        assert_eq!(r.enhanced, None);
    }

    #[test]
    fn mismatched_codes_across_lines_are_an_error() {
        assert_eq!(parse_all(&[b"250-a\r\n251 b\r\n"]).1, Some(ReplyError::CodeMismatch { first: 250, next: 251 }));
    }

    #[test]
    fn non_digit_code_is_an_error() {
        assert_eq!(parse_all(&[b"25x ok\r\n"]).1, Some(ReplyError::BadCode));
        assert_eq!(parse_all(&[b"ok\r\n"]).1, Some(ReplyError::BadCode));
        assert_eq!(parse_all(&[b"250_ok\r\n"]).1, Some(ReplyError::BadSeparator));
    }

    #[test]
    fn overlong_line_is_an_error_without_a_newline() {
        let long = vec![b'2'; MAX_REPLY_LINE + 1];
        assert_eq!(parse_all(&[&long]).1, Some(ReplyError::LineTooLong));
    }

    #[test]
    fn bare_code_line_and_bare_lf_are_accepted() {
        let (r, e) = parse_all(&[b"250\n221 bye\r\n"]);
        assert_eq!(e, None);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![250, 221]);
    }

    #[test]
    fn ehlo_capabilities_are_parsed() {
        let lines: [&[u8]; 9] = [
            b"mx.example hello",
            b"PIPELINING",
            b"SIZE 10240000",
            b"8BITMIME",
            b"smtputf8",
            b"CHUNKING",
            b"STARTTLS",
            b"AUTH=LOGIN PLAIN CRAM-MD5",
            b"ENHANCEDSTATUSCODES",
        ];
        let caps = Capabilities::from_ehlo_lines(lines.iter().copied().chain([&b"DSN"[..]]));
        assert!(caps.pipelining && caps.eight_bit_mime && caps.smtputf8 && caps.chunking);
        assert!(caps.starttls && caps.enhanced_status_codes && caps.dsn);
        assert!(caps.auth && caps.auth_plain && caps.auth_login);
        assert_eq!(caps.size, Some(10_240_000));
        let none = Capabilities::from_ehlo_lines([&b"mx.example"[..], b"SIZE"]);
        assert_eq!(none.size, Some(0));
        assert!(!none.pipelining);
    }

    proptest! {
        #[test]
        fn parser_never_panics_and_chunked_equals_whole(
            data in proptest::collection::vec(
                prop_oneof![
                    Just(b"250-x\r\n".to_vec()), Just(b"250 ok\r\n".to_vec()), Just(b"354 go\r\n".to_vec()),
                    Just(b"\r\n".to_vec()), Just(b"5".to_vec()), Just(b"-".to_vec()),
                    proptest::collection::vec(any::<u8>(), 0..16),
                ], 0..24).prop_map(|v| v.concat()),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let whole = parse_all(&[&data]);
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for p in points { chunks.push(&data[prev..p]); prev = p; }
            chunks.push(&data[prev..]);
            prop_assert_eq!(parse_all(&chunks), whole);
        }
    }
}
