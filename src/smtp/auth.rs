//! AUTH PLAIN (RFC 4616) and LOGIN decoding for the server, encoding for the
//! client.
//!
//! Invariants: decoders never panic on any bytes and decode into a
//! caller-owned, reused buffer (no allocation once it has grown); a response
//! of `*` is [`AuthError::Cancelled`], `=` is an empty response (RFC 4954).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use thiserror::Error;

/// The LOGIN prompts, base64 of `Username:` and `Password:`.
pub const LOGIN_USER_PROMPT: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASS_PROMPT: &str = "UGFzc3dvcmQ6";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("authentication cancelled by the client")]
    Cancelled,
    #[error("invalid base64")]
    Base64,
    #[error("malformed PLAIN response (expected authzid NUL user NUL pass)")]
    Malformed,
}

/// Decoded PLAIN credentials, borrowed from the decode buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plain<'a> {
    pub authzid: &'a [u8],
    pub user: &'a [u8],
    pub pass: &'a [u8],
}

/// Decode one base64 response line (LOGIN step or PLAIN blob) into `buf`.
pub fn decode_b64<'b>(input: &[u8], buf: &'b mut Vec<u8>) -> Result<&'b [u8], AuthError> {
    buf.clear();
    match input {
        b"*" => Err(AuthError::Cancelled),
        b"=" | b"" => Ok(&buf[..]),
        _ => {
            STANDARD.decode_vec(input, buf).map_err(|_| AuthError::Base64)?;
            Ok(&buf[..])
        }
    }
}

/// Decode a PLAIN response: base64 of `authzid NUL user NUL pass`.
pub fn decode_plain<'b>(input: &[u8], buf: &'b mut Vec<u8>) -> Result<Plain<'b>, AuthError> {
    let raw = decode_b64(input, buf)?;
    let mut parts = raw.splitn(3, |&b| b == 0);
    let authzid = parts.next().ok_or(AuthError::Malformed)?;
    let user = parts.next().ok_or(AuthError::Malformed)?;
    let pass = parts.next().ok_or(AuthError::Malformed)?;
    if user.is_empty() || pass.contains(&0) {
        return Err(AuthError::Malformed);
    }
    Ok(Plain { authzid, user, pass })
}

/// The PLAIN initial response for `user`/`pass` (empty authzid).
pub fn encode_plain(user: &str, pass: &str) -> String {
    let mut raw = Vec::with_capacity(user.len() + pass.len() + 2);
    raw.push(0);
    raw.extend_from_slice(user.as_bytes());
    raw.push(0);
    raw.extend_from_slice(pass.as_bytes());
    STANDARD.encode(raw)
}

/// One LOGIN step (user name or password) as base64.
pub fn encode_login_step(s: &str) -> String {
    STANDARD.encode(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_round_trips() {
        let enc = encode_plain("user", "pa ss");
        let mut buf = Vec::new();
        let p = decode_plain(enc.as_bytes(), &mut buf).unwrap();
        assert_eq!(p, Plain { authzid: b"", user: b"user", pass: b"pa ss" });
    }

    #[test]
    fn cancel_and_garbage_are_errors() {
        let mut buf = Vec::new();
        assert_eq!(decode_plain(b"*", &mut buf), Err(AuthError::Cancelled));
        assert_eq!(decode_plain(b"!!!", &mut buf), Err(AuthError::Base64));
        let no_nul = STANDARD.encode("usepass");
        assert_eq!(decode_plain(no_nul.as_bytes(), &mut buf), Err(AuthError::Malformed));
        assert_eq!(decode_b64(b"=", &mut buf), Ok(&b""[..]));
    }
}
