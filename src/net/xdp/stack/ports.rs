//! Source ports of a thread's outgoing connections.

/// Source ports of this thread's outgoing connections.
pub(super) struct PortPool {
    pub(super) lo: u16,
    pub(super) used: Vec<bool>,
    pub(super) next: usize,
}

impl PortPool {
    /// The ports `lo..=hi`, first given from a point set by `seed` (so
    /// runs in a row do not start on the same 4-tuples).
    pub(super) fn new((lo, hi): (u16, u16), seed: u64) -> PortPool {
        let n = if hi >= lo {
            usize::from(hi - lo) + 1
        } else {
            0
        };
        PortPool {
            lo,
            used: vec![false; n],
            next: if n == 0 {
                0
            } else {
                (seed % n as u64) as usize
            },
        }
    }

    /// The next free port after the last one given (oldest reuse first).
    pub(super) fn take(&mut self) -> Option<u16> {
        let n = self.used.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if !self.used[i] {
                self.used[i] = true;
                self.next = (i + 1) % n;
                return Some(self.lo + i as u16);
            }
        }
        None
    }

    pub(super) fn give(&mut self, port: u16) {
        if let Some(u) = port
            .checked_sub(self.lo)
            .and_then(|i| self.used.get_mut(usize::from(i)))
        {
            *u = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ports_are_reused_oldest_first_and_run_out_cleanly() {
        let mut p = PortPool::new((10, 12), 3);
        assert_eq!(
            (p.take(), p.take(), p.take(), p.take()),
            (Some(10), Some(11), Some(12), None)
        );
        p.give(11);
        p.give(10);
        // The cursor wrapped after 12: 10 first, then 11.
        assert_eq!(p.take(), Some(10));
        assert_eq!(p.take(), Some(11));
        assert_eq!(p.take(), None);
        // A port outside the block is ignored.
        p.give(9);
        p.give(13);
        assert_eq!(p.take(), None);
    }
}
