//! Dot-stuffing (RFC 5321 4.5.2) of a DATA body given in pieces.

/// Append the DATA form of the message `parts` (concatenated) to `out`:
/// every line (CRLF-delimited) starting with `.` gets one more `.`, a
/// missing final CRLF is added, then the terminating `.CRLF`.
pub fn dot_stuff(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let mut st = Stuffer::default();
    for part in parts {
        st.feed(out, part);
    }
    st.finish(out);
}

/// Dot-stuffing state across pieces of one message.
#[derive(Clone, Copy, Debug)]
struct Stuffer {
    at_line_start: bool,
    prev: u8,
}

impl Default for Stuffer {
    fn default() -> Self {
        Self { at_line_start: true, prev: 0 }
    }
}

impl Stuffer {
    /// Appends `part` with every line that starts with `.` stuffed.
    fn feed(&mut self, out: &mut Vec<u8>, part: &[u8]) {
        let mut rest: &[u8] = part;
        while let Some(&first) = rest.first() {
            if self.at_line_start && first == b'.' {
                out.push(b'.');
            }
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    let crlf = if i > 0 { rest[i - 1] == b'\r' } else { self.prev == b'\r' };
                    out.extend_from_slice(&rest[..=i]);
                    self.at_line_start = crlf;
                    self.prev = b'\n';
                    rest = &rest[i + 1..];
                }
                None => {
                    out.extend_from_slice(rest);
                    self.at_line_start = false;
                    self.prev = rest[rest.len() - 1];
                    rest = &[];
                }
            }
        }
    }

    /// Ends the data: the missing final CRLF, then `.CRLF`.
    fn finish(self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuffed(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        dot_stuff(&mut out, parts);
        out
    }

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_adds_final_crlf() {
        assert_eq!(stuffed(&[b".a\r\n", b"..b\r\nc"]), b"..a\r\n...b\r\nc\r\n.\r\n");
        assert_eq!(stuffed(&[]), b".\r\n");
        assert_eq!(stuffed(&[b"x\r", b"\n.y\n.z\r\n"]), b"x\r\n..y\n.z\r\n.\r\n");
        assert_eq!(stuffed(&[b"a\r\n", b"", b".\r\n"]), b"a\r\n..\r\n.\r\n");
    }
}
