//! Dot-stuffing (RFC 5321 4.5.2) of a DATA body given in pieces: into a
//! copy ([`dot_stuff`]), or, for a large shared body, in place as it is
//! queued ([`Stuffer::feed_shared`]: no copy of the body is made).

use std::sync::Arc;

use super::outq::OutQueue;

/// A body without a pre-stuffed DATA form (`Message::data` `None`) this
/// large is stuffed in place, from shared pieces of it, instead of copied.
pub const STUFF_IN_PLACE_BYTES: usize = 1 << 20;

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
pub(super) struct Stuffer {
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
    pub(super) fn feed(&mut self, out: &mut Vec<u8>, part: &[u8]) {
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

    /// Queues `data` stuffed, without copying it: the pieces between the
    /// dots that start a line go out from `data` itself, and each such dot
    /// once more in front of its line. Same output as [`Self::feed`].
    pub(super) fn feed_shared(&mut self, tx: &mut OutQueue, data: &Arc<[u8]>) {
        let b = &data[..];
        let Some(&last) = b.last() else { return };
        let mut pos = 0;
        let mut dot_at = |tx: &mut OutQueue, i: usize| {
            // Up to and including the dot, then the dot again.
            tx.push_shared_exact(data, pos, i + 1);
            pos = i;
        };
        if self.at_line_start && b[0] == b'.' {
            dot_at(tx, 0);
        } else if self.prev == b'\r' && b.len() > 1 && b[0] == b'\n' && b[1] == b'.' {
            dot_at(tx, 1);
        }
        for j in memchr::memmem::find_iter(b, b"\r\n.") {
            dot_at(tx, j + 2);
        }
        tx.push_shared_exact(data, pos, b.len());
        self.at_line_start = if b.len() >= 2 {
            b.ends_with(b"\r\n")
        } else {
            last == b'\n' && self.prev == b'\r'
        };
        self.prev = last;
    }

    /// Ends the data: the missing final CRLF, then `.CRLF`.
    pub(super) fn finish(self, out: &mut Vec<u8>) {
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

    /// Stuffing in place from shared pieces gives the same bytes as
    /// stuffing into a copy, whatever the header before it ends with.
    #[test]
    fn stuffing_in_place_matches_stuffing_a_copy() {
        let bodies: [&[u8]; 7] = [
            b".a\r\n..b\r\nc\r\n.\r\n",
            b"\n.x\r\n",
            b"x\n.y\r\n.z",
            b".",
            b"\n",
            b"plain\r\nlines\r\n",
            b"\r\n.\r\n.\r\n",
        ];
        for header in [&b""[..], b"H: 1\r\n", b"H: 1\r", b"H"] {
            for body in bodies {
                let mut want = Vec::new();
                dot_stuff(&mut want, &[header, body]);
                let mut st = Stuffer::default();
                let mut tx = OutQueue::default();
                let mut head = Vec::new();
                st.feed(&mut head, header);
                tx.extend_from_slice(&head);
                st.feed_shared(&mut tx, &Arc::from(body));
                head.clear();
                st.finish(&mut head);
                tx.extend_from_slice(&head);
                let mut got = Vec::new();
                tx.drain_into(&mut got, usize::MAX);
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want),
                    "{header:?} {body:?}"
                );
            }
        }
    }

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_adds_final_crlf() {
        assert_eq!(stuffed(&[b".a\r\n", b"..b\r\nc"]), b"..a\r\n...b\r\nc\r\n.\r\n");
        assert_eq!(stuffed(&[]), b".\r\n");
        assert_eq!(stuffed(&[b"x\r", b"\n.y\n.z\r\n"]), b"x\r\n..y\n.z\r\n.\r\n");
        assert_eq!(stuffed(&[b"a\r\n", b"", b".\r\n"]), b"a\r\n..\r\n.\r\n");
    }
}
