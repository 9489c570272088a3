//! The session's output queue: command bytes and slices of shared bodies,
//! in order, with stream offsets (which byte is whose), handed to the
//! driver in bounded pieces so a large message is never buffered whole.

use std::collections::VecDeque;
use std::sync::Arc;

/// One piece of output: command bytes, or a slice of a shared body.
#[derive(Debug)]
enum Seg {
    Bytes(Vec<u8>),
    Shared { data: Arc<[u8]>, pos: usize, end: usize },
}

/// Shared bodies shorter than this are copied into the command bytes.
const SHARE_MIN_BYTES: usize = 4096;

/// The session's output queue: bytes in order, with stream offsets.
#[derive(Debug, Default)]
pub(super) struct OutQueue {
    segs: VecDeque<Seg>,
    /// Offset just past the last byte ever queued.
    pub(super) queued: u64,
    /// Offset of the next byte to hand out.
    pub(super) handed: u64,
    /// An emptied command buffer kept for reuse (no allocation per command).
    spare: Vec<u8>,
}

impl OutQueue {
    /// An empty queue whose first command buffer holds `capacity` bytes.
    pub(super) fn with_spare(capacity: usize) -> Self {
        Self { spare: Vec::with_capacity(capacity), ..Self::default() }
    }

    pub(super) fn extend_from_slice(&mut self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        self.queued += b.len() as u64;
        if let Some(Seg::Bytes(v)) = self.segs.back_mut() {
            v.extend_from_slice(b);
        } else {
            let mut v = std::mem::take(&mut self.spare);
            v.reserve(b.len().max(256));
            v.extend_from_slice(b);
            self.segs.push_back(Seg::Bytes(v));
        }
    }

    pub(super) fn push(&mut self, b: u8) {
        self.extend_from_slice(&[b]);
    }

    /// Queues `data[range]` without copying it (small pieces are copied).
    pub(super) fn push_shared(&mut self, data: &Arc<[u8]>, pos: usize, end: usize) {
        if end - pos < SHARE_MIN_BYTES {
            self.extend_from_slice(&data[pos..end]);
        } else {
            self.queued += (end - pos) as u64;
            self.segs.push_back(Seg::Shared { data: Arc::clone(data), pos, end });
        }
    }

    /// Queues `data[pos..end]` without copying it, however short.
    pub(super) fn push_shared_exact(&mut self, data: &Arc<[u8]>, pos: usize, end: usize) {
        if end > pos {
            self.queued += (end - pos) as u64;
            self.segs.push_back(Seg::Shared { data: Arc::clone(data), pos, end });
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.handed == self.queued
    }

    pub(super) fn clear(&mut self) {
        self.segs.clear();
        self.handed = self.queued;
    }

    /// Moves up to `limit` bytes to `out`.
    pub(super) fn drain_into(&mut self, out: &mut Vec<u8>, limit: usize) {
        let mut room = limit;
        while room > 0 {
            let Some(front) = self.segs.front_mut() else { break };
            let taken = match front {
                Seg::Bytes(v) => {
                    if v.len() <= room {
                        let n = v.len();
                        if out.is_empty() && n > 0 {
                            // Hand the buffer over; keep the caller's for reuse.
                            std::mem::swap(out, v);
                        } else {
                            out.extend_from_slice(v);
                        }
                        if let Some(Seg::Bytes(mut v)) = self.segs.pop_front() {
                            if v.capacity() > self.spare.capacity() {
                                v.clear();
                                self.spare = v;
                            }
                        }
                        n
                    } else {
                        out.extend_from_slice(&v[..room]);
                        v.drain(..room);
                        room
                    }
                }
                Seg::Shared { data, pos, end } => {
                    let n = (*end - *pos).min(room);
                    out.extend_from_slice(&data[*pos..*pos + n]);
                    *pos += n;
                    if *pos == *end {
                        self.segs.pop_front();
                    }
                    n
                }
            };
            self.handed += taken as u64;
            room -= taken;
        }
    }
}

impl std::io::Write for OutQueue {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
