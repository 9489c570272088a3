//! One thread's receive buffers, lent to the kernel through a provided
//! buffer ring (`IORING_REGISTER_PBUF_RING`): the kernel picks a buffer
//! only when data arrives and a completion hands it back.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// The buffer group of the receive buffers.
pub const BGID: u16 = 0;

/// One thread's receive buffers, lent to the kernel through a buffer ring.
pub struct BufRing {
    /// The ring of entries (page-aligned, `count` entries).
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    /// `count` buffers of `size` bytes.
    bufs: *mut u8,
    bufs_bytes: usize,
    size: usize,
    count: u16,
    /// Our tail (entries added), published to the kernel by `publish`.
    tail: u16,
}

fn mmap_anon(bytes: usize) -> io::Result<*mut libc::c_void> {
    // SAFETY: an anonymous private mapping at an address the kernel picks
    // touches no existing memory; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p)
    }
}

impl BufRing {
    pub fn new(count: u16, size: usize) -> io::Result<Self> {
        assert!(count.is_power_of_two());
        let ring_bytes = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        let bufs_bytes = usize::from(count) * size;
        let ring = mmap_anon(ring_bytes)?.cast::<BufRingEntry>();
        let bufs = match mmap_anon(bufs_bytes) {
            Ok(p) => p.cast::<u8>(),
            Err(e) => {
                // SAFETY: `ring` was mapped above with this length and is
                // not registered anywhere yet.
                unsafe { libc::munmap(ring.cast(), ring_bytes) };
                return Err(e);
            }
        };
        Ok(BufRing {
            ring,
            ring_bytes,
            bufs,
            bufs_bytes,
            size,
            count,
            tail: 0,
        })
    }

    /// A ring with no memory (what replaces a leaked one).
    pub fn empty() -> Self {
        BufRing {
            ring: std::ptr::null_mut(),
            ring_bytes: 0,
            bufs: std::ptr::null_mut(),
            bufs_bytes: 0,
            size: 0,
            count: 0,
            tail: 0,
        }
    }

    /// Registers the ring as buffer group [`BGID`] and lends every buffer.
    pub fn register(&mut self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the entries live (mapped, page-aligned, `count` of them)
        // until this `BufRing` is dropped, which happens only after the ring
        // has no operation in flight (see the module doc).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(self.ring as u64, self.count, BGID, 0)?;
        }
        for bid in 0..self.count {
            self.give(bid);
        }
        self.publish();
        Ok(())
    }

    /// Puts buffer `bid` back in the ring (seen by the kernel after
    /// [`Self::publish`]).
    pub fn give(&mut self, bid: u16) {
        if bid >= self.count {
            return;
        }
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: `slot < count`, so the entry is inside the mapping; the
        // kernel reads entries only between its head and our published
        // tail, and this one is past the published tail.
        let entry = unsafe { &mut *self.ring.add(slot) };
        // SAFETY: `bid < count`, so the buffer is inside the mapping.
        let addr = unsafe { self.bufs.add(usize::from(bid) * self.size) };
        entry.set_addr(addr as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the buffers given so far visible to the kernel.
    pub fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of the mapping,
        // which outlives `self`; the kernel reads it atomically, so it is
        // written through an atomic with release ordering (the entries
        // written before become visible first).
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *mut u16;
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`, which a completion just
    /// handed back.
    pub fn data(&self, bid: u16, len: usize) -> &[u8] {
        if bid >= self.count {
            return &[];
        }
        let len = len.min(self.size);
        // SAFETY: the buffer is inside the mapping; the kernel wrote it
        // before posting the completion that handed it to us and will not
        // touch it again until we give it back (after this borrow ends).
        unsafe { std::slice::from_raw_parts(self.bufs.add(usize::from(bid) * self.size), len) }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.ring.is_null() {
            return;
        }
        // SAFETY: both mappings were made in `new` with these lengths; by
        // the time a `BufRing` is dropped no operation can use them (the
        // loop drains the ring first, or leaks this struct).
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_bytes);
            libc::munmap(self.bufs.cast(), self.bufs_bytes);
        }
    }
}
