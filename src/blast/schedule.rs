//! The open-loop schedule and the per-thread shares of the load.
//!
//! An open-loop run starts sessions at fixed intended times: with a session
//! rate λ (this instance's share) over T threads, thread `t` owns the starts
//! `k·T + t` of the global sequence, intended at `origin + (k·T + t)/λ`.
//! Starts of all threads interleave evenly, so the aggregate is exactly λ.
//! The intended time of every start is computed from its index (never by
//! adding intervals), so rounding never accumulates.
//!
//! Invariants: `intended(k)` is strictly increasing in `k`; the shares of
//! connections, messages and sessions over all threads add up to the totals.

use std::time::{Duration, Instant};

/// One thread's share of an open-loop schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    origin: Instant,
    /// Seconds between this thread's starts (`T/λ`).
    period_secs: f64,
    /// This thread's phase (`t/λ`).
    offset_secs: f64,
    next_k: u64,
}

impl Schedule {
    /// `sessions_per_sec` is the total rate of all `threads`.
    pub fn new(origin: Instant, sessions_per_sec: f64, thread: usize, threads: usize) -> Self {
        let rate = sessions_per_sec.max(1e-9);
        Schedule {
            origin,
            period_secs: threads.max(1) as f64 / rate,
            offset_secs: thread as f64 / rate,
            next_k: 0,
        }
    }

    /// The intended time of this thread's `k`-th start.
    pub fn intended(&self, k: u64) -> Instant {
        let secs = self.offset_secs + k as f64 * self.period_secs;
        self.origin + Duration::from_secs_f64(secs.min(1e9))
    }

    /// The next start not yet taken.
    pub fn peek(&self) -> Instant {
        self.intended(self.next_k)
    }

    /// Takes the next start.
    pub fn take(&mut self) -> Instant {
        let t = self.peek();
        self.next_k += 1;
        t
    }

    /// Starts taken so far.
    pub fn taken(&self) -> u64 {
        self.next_k
    }

    /// How many of this thread's starts are intended in `[from, to)`.
    pub fn due_between(&self, from: Instant, to: Instant) -> u64 {
        let count_before = |at: Instant| -> u64 {
            let secs = at.saturating_duration_since(self.origin).as_secs_f64() - self.offset_secs;
            if secs <= 0.0 {
                return 0;
            }
            // Starts k with offset + k·period < secs.
            let k = (secs / self.period_secs).ceil();
            k.max(0.0) as u64
        };
        count_before(to).saturating_sub(count_before(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_interleave_to_the_total_rate() {
        let origin = Instant::now();
        let mut all: Vec<Duration> = Vec::new();
        for t in 0..3 {
            let mut s = Schedule::new(origin, 300.0, t, 3);
            for _ in 0..100 {
                all.push(s.take() - origin);
            }
        }
        all.sort();
        for (i, d) in all.iter().enumerate() {
            let want = i as f64 / 300.0;
            assert!((d.as_secs_f64() - want).abs() < 1e-6, "{i}: {d:?}");
        }
    }

    #[test]
    fn due_counts_starts_in_a_window() {
        let origin = Instant::now();
        let s = Schedule::new(origin, 100.0, 1, 2);
        // Thread 1 of 2 at 100/s: starts at 10ms, 30ms, 50ms, ...
        assert_eq!(s.due_between(origin, origin + Duration::from_secs(1)), 50);
        assert_eq!(s.due_between(origin, origin + Duration::from_millis(10)), 0);
        assert_eq!(s.due_between(origin, origin + Duration::from_millis(11)), 1);
        let mut total = 0;
        for t in 0..2 {
            total += Schedule::new(origin, 100.0, t, 2).due_between(
                origin + Duration::from_secs(1),
                origin + Duration::from_secs(3),
            );
        }
        assert_eq!(total, 200);
    }
}
