//! Per-thread deadlines for thousands of connections.
//!
//! [`Timers`] keeps at most one live deadline per token (a connection's slab
//! key) in a binary heap. Rescheduling or cancelling is O(log n) / O(1): the old
//! heap entry is not removed but made stale by bumping the token's generation
//! counter, and stale entries are dropped when they reach the top of the heap
//! (lazy cancellation). To keep memory bounded when connections reschedule
//! often, the heap is rebuilt without its stale entries once they outnumber
//! live ones by a wide margin (amortised O(1) per operation).
//!
//! Invariants: a token fires at most once per `schedule`; after it fires (or is
//! cancelled) it has no deadline until scheduled again. Tokens index a `Vec`,
//! so they should be dense (slab keys), not arbitrary large numbers.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    generation: u64,
    deadline: Option<Instant>,
}

/// A min-heap of `(deadline, token)` with lazy cancellation.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    slots: Vec<Slot>,
    live: usize,
}

impl Timers {
    /// An empty timer set.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty timer set with room for `tokens` tokens.
    pub fn with_capacity(tokens: usize) -> Self {
        Self {
            heap: BinaryHeap::with_capacity(tokens),
            slots: Vec::with_capacity(tokens),
            live: 0,
        }
    }

    /// Sets `token`'s deadline to `at`, replacing any earlier one. O(log n).
    pub fn schedule(&mut self, token: usize, at: Instant) {
        if token >= self.slots.len() {
            self.slots.resize(token + 1, Slot::default());
        }
        let slot = &mut self.slots[token];
        slot.generation = slot.generation.wrapping_add(1);
        if slot.deadline.is_none() {
            self.live += 1;
        }
        slot.deadline = Some(at);
        self.heap.push(Reverse((at, token, slot.generation)));
        self.maybe_compact();
    }

    /// Removes `token`'s deadline, if any. O(1).
    pub fn cancel(&mut self, token: usize) {
        if let Some(slot) = self.slots.get_mut(token) {
            if slot.deadline.take().is_some() {
                slot.generation = slot.generation.wrapping_add(1);
                self.live -= 1;
            }
        }
    }

    /// `token`'s live deadline, if any.
    pub fn deadline(&self, token: usize) -> Option<Instant> {
        self.slots.get(token).and_then(|s| s.deadline)
    }

    /// The number of tokens with a live deadline.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True if no token has a live deadline.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The earliest live deadline (drops stale entries on the way).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, token, generation))) = self.heap.peek() {
            if self.is_live(token, generation) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// How long a poll may sleep before the next deadline: `None` if there is
    /// none, zero if it has passed. Convenient for `mio::Poll::poll`.
    pub fn timeout(&mut self, now: Instant) -> Option<Duration> {
        self.next().map(|at| at.saturating_duration_since(now))
    }

    /// Removes and yields every token whose deadline is at or before `now`,
    /// earliest first. Dropping the iterator early leaves the rest in place.
    pub fn expired(&mut self, now: Instant) -> Expired<'_> {
        Expired { timers: self, now }
    }

    fn is_live(&self, token: usize, generation: u64) -> bool {
        self.slots
            .get(token)
            .is_some_and(|s| s.generation == generation && s.deadline.is_some())
    }

    fn maybe_compact(&mut self) {
        if self.heap.len() > 64 && self.heap.len() > 4 * self.live {
            let slots = &self.slots;
            self.heap.retain(|&Reverse((_, token, generation))| {
                slots
                    .get(token)
                    .is_some_and(|s| s.generation == generation && s.deadline.is_some())
            });
        }
    }
}

/// Iterator returned by [`Timers::expired`].
#[derive(Debug)]
pub struct Expired<'a> {
    timers: &'a mut Timers,
    now: Instant,
}

impl Iterator for Expired<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let t = &mut *self.timers;
        while let Some(&Reverse((at, token, generation))) = t.heap.peek() {
            if !t.is_live(token, generation) {
                t.heap.pop();
                continue;
            }
            if at > self.now {
                return None;
            }
            t.heap.pop();
            t.slots[token].deadline = None;
            t.live -= 1;
            return Some(token);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_fire_in_deadline_order_and_only_once() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut timers = Timers::new();
        timers.schedule(3, t0 + ms(30));
        timers.schedule(1, t0 + ms(10));
        timers.schedule(2, t0 + ms(20));
        assert_eq!(timers.next(), Some(t0 + ms(10)));
        assert_eq!(timers.expired(t0 + ms(20)).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(timers.expired(t0 + ms(20)).count(), 0);
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.expired(t0 + ms(100)).collect::<Vec<_>>(), vec![3]);
        assert!(timers.is_empty());
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn rescheduling_replaces_the_old_deadline() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut timers = Timers::new();
        timers.schedule(0, t0 + ms(10));
        timers.schedule(0, t0 + ms(50));
        assert_eq!(timers.next(), Some(t0 + ms(50)));
        assert_eq!(timers.expired(t0 + ms(20)).count(), 0);
        timers.schedule(0, t0 + ms(5));
        assert_eq!(timers.expired(t0 + ms(20)).collect::<Vec<_>>(), vec![0]);
        assert_eq!(timers.expired(t0 + ms(100)).count(), 0);
    }

    #[test]
    fn cancelled_tokens_never_fire() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        timers.schedule(4, t0);
        timers.cancel(4);
        timers.cancel(4);
        timers.cancel(99);
        assert!(timers.is_empty());
        assert_eq!(timers.deadline(4), None);
        assert_eq!(timers.expired(t0 + Duration::from_secs(1)).count(), 0);
    }

    #[test]
    fn frequent_rescheduling_keeps_the_heap_bounded() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        for i in 0..100_000u64 {
            timers.schedule((i % 10) as usize, t0 + Duration::from_micros(i));
        }
        assert_eq!(timers.len(), 10);
        assert!(
            timers.heap.len() <= 4 * 10 + 65,
            "heap has {}",
            timers.heap.len()
        );
        let fired: Vec<usize> = timers.expired(t0 + Duration::from_secs(1)).collect();
        assert_eq!(fired, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn timeout_is_zero_once_the_deadline_has_passed() {
        let t0 = Instant::now();
        let mut timers = Timers::new();
        assert_eq!(timers.timeout(t0), None);
        timers.schedule(0, t0 + Duration::from_millis(7));
        assert_eq!(timers.timeout(t0), Some(Duration::from_millis(7)));
        assert_eq!(
            timers.timeout(t0 + Duration::from_secs(1)),
            Some(Duration::ZERO)
        );
    }
}
