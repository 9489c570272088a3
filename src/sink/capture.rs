//! `--capture DIR`: accepted messages written as files in Maildir layout.
//!
//! Each message is written to `DIR/tmp/<name>` and then renamed to
//! `DIR/new/<name>.eml`, so a reader never sees a partial file. Names are
//! unique per run and thread: `<unix secs>.<pid>_<thread>_<n>.smtpstorm`.
//! The content is exactly the un-stuffed body as received (headers and
//! all, final CRLF of the body included, the `.` line not). Capture is off
//! the default path: without `--capture` no body byte is copied anywhere.

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
