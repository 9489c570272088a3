//! `--capture DIR`: accepted messages written as files in Maildir layout.
//!
//! Each message is written to `DIR/tmp/<name>` and then renamed to
//! `DIR/new/<name>.eml`, so a reader never sees a partial file. Names are
//! unique per run and thread: `<unix secs>.<pid>_<thread>_<n>.smtpstorm`.
//! The content is exactly the un-stuffed body as received (headers and
//! all, final CRLF of the body included, the `.` line not). Capture is off
//! the default path: without `--capture` no body byte is copied anywhere.
//!
//! While a message arrives its body is kept in a [`BodyBuffer`], which never
//! holds more than `--max-message-size` bytes: a body that grows past the
//! limit is refused (`552 5.3.4`) when it ends, so the buffer lets go of it
//! at once instead of holding a client's unbounded upload.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("cannot create capture directory {path}: {source}")]
    CreateDir { path: String, source: io::Error },
    #[error("cannot write captured message {path}: {source}")]
    Write { path: String, source: io::Error },
}

/// Creates `dir/{tmp,new,cur}`.
pub fn prepare_dir(dir: &Path) -> Result<(), CaptureError> {
    for sub in ["tmp", "new", "cur"] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(|source| CaptureError::CreateDir {
            path: p.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// The body of the message being received, for `--capture`, bounded by the
/// size limit. Invariant: `len() <= limit` whenever the limit is not 0.
#[derive(Debug, Default)]
pub struct BodyBuffer {
    buf: Vec<u8>,
    /// Largest body kept, in bytes; 0 = no limit.
    limit: u64,
    /// The body went past the limit: nothing is kept until the next start.
    over: bool,
}

/// Capacity above which a buffer is released after a message instead of
/// being kept for the next one.
const KEEP_CAPACITY_BYTES: usize = 1 << 20;

impl BodyBuffer {
    /// An empty buffer for bodies of at most `limit` bytes (0 = no limit).
    pub fn new(limit: u64) -> Self {
        Self {
            buf: Vec::new(),
            limit,
            over: false,
        }
    }

    /// A new message begins.
    pub fn start(&mut self) {
        self.release();
        self.over = false;
    }

    /// Appends body bytes, unless the body would exceed the limit: then the
    /// body is dropped (memory released) and nothing more is kept.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.over {
            return;
        }
        let len = self.buf.len() as u64 + chunk.len() as u64;
        if self.limit > 0 && len > self.limit {
            self.over = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The whole body, or `None` if it went past the limit.
    pub fn body(&self) -> Option<&[u8]> {
        (!self.over).then_some(&self.buf[..])
    }

    /// Bytes held now.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True if no byte is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes allocated now.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The message ended: forget its body (a huge allocation is freed, not
    /// kept for the rest of the session).
    pub fn release(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > KEEP_CAPACITY_BYTES {
            self.buf = Vec::new();
        }
    }
}

/// One worker thread's writer.
#[derive(Debug)]
pub struct Capture {
    dir: PathBuf,
    prefix: String,
    next: u64,
}

impl Capture {
    /// A writer for worker `thread` into an already prepared `dir`.
    pub fn new(dir: PathBuf, thread: usize) -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let prefix = format!("{secs}.{}_{thread}", std::process::id());
        Self {
            dir,
            prefix,
            next: 0,
        }
    }

    /// Writes one message; returns its final path.
    pub fn store(&mut self, body: &[u8]) -> Result<PathBuf, CaptureError> {
        self.next += 1;
        let name = format!("{}_{}.smtpstorm", self.prefix, self.next);
        let tmp = self.dir.join("tmp").join(&name);
        let new = self.dir.join("new").join(format!("{name}.eml"));
        let werr = |p: &Path, source| CaptureError::Write {
            path: p.display().to_string(),
            source,
        };
        std::fs::write(&tmp, body).map_err(|e| werr(&tmp, e))?;
        std::fs::rename(&tmp, &new).map_err(|e| werr(&new, e))?;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_past_the_limit_is_never_buffered_beyond_it() {
        let limit = 10_000u64;
        let mut b = BodyBuffer::new(limit);
        b.start();
        let chunk = [b'x'; 999];
        let mut fed = 0u64;
        for _ in 0..1000 {
            b.push(&chunk);
            fed += chunk.len() as u64;
            assert!(b.len() as u64 <= limit, "{} bytes held", b.len());
            assert!(
                b.capacity() as u64 <= 2 * limit,
                "{} bytes allocated",
                b.capacity()
            );
        }
        assert!(fed > 50 * limit);
        assert_eq!(b.body(), None, "an over-limit body is never stored");
        // The next message starts afresh.
        b.start();
        b.push(b"Subject: ok\r\n\r\nfits\r\n");
        assert_eq!(b.body(), Some(&b"Subject: ok\r\n\r\nfits\r\n"[..]));
    }

    #[test]
    fn a_body_of_exactly_the_limit_is_kept_and_no_limit_keeps_everything() {
        let mut b = BodyBuffer::new(6);
        b.start();
        b.push(b"abc");
        b.push(b"def");
        assert_eq!(b.body(), Some(&b"abcdef"[..]));
        b.push(b"g");
        assert_eq!(b.body(), None);
        let mut u = BodyBuffer::new(0);
        u.start();
        for _ in 0..100 {
            u.push(&[b'y'; 1000]);
        }
        assert_eq!(u.body().map(<[u8]>::len), Some(100_000));
    }

    #[test]
    fn stored_messages_land_in_new_with_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        prepare_dir(dir.path()).unwrap();
        let mut c = Capture::new(dir.path().to_path_buf(), 3);
        let a = c.store(b"Subject: a\r\n\r\n.dot\r\n").unwrap();
        let b = c.store(b"x\r\n").unwrap();
        assert_ne!(a, b);
        assert_eq!(std::fs::read(&a).unwrap(), b"Subject: a\r\n\r\n.dot\r\n");
        assert!(a.starts_with(dir.path().join("new")));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
