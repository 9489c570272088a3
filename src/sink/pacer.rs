//! `sink --max-rate R`: a target of known capacity. The sink accepts at
//! most R messages per second, all threads together, the way a queueing
//! server with one server and a service time of `1/R` does: each message's
//! final reply (end of DATA, BDAT LAST) is held until its turn, turns being
//! `1/R` apart and given in the order the ends of data arrived. An idle
//! server answers at once; a busy one makes the message wait for every
//! message ahead of it. So the sink's throughput never passes R, and past
//! R the wait (and the blaster's corrected latency) grows with the queue.
//!
//! Invariants: two turns are at least `1/R` apart; a turn is never before
//! the end of data it answers; one compare-and-swap per message, only with
//! `--max-rate` (the default path never touches it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The turns of every thread (shared through an `Arc`).
#[derive(Debug)]
pub struct Pacer {
    origin: Instant,
    /// Nanoseconds between two turns (`1/R`).
    gap_ns: u64,
    /// The first free turn, in nanoseconds from `origin`.
    next_ns: AtomicU64,
}

impl Pacer {
    /// At most `per_sec` replies per second from `origin` on.
    pub fn new(origin: Instant, per_sec: f64) -> Pacer {
        Pacer {
            origin,
            gap_ns: (1e9 / per_sec.max(1e-9)).round().clamp(1.0, 1e18) as u64,
            next_ns: AtomicU64::new(0),
        }
    }

    /// Takes the next turn for an end of data read at `at`: how long its
    /// reply waits (zero when the server is idle).
    pub fn claim(&self, at: Instant) -> Duration {
        let at_ns = u64::try_from(at.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX / 2);
        let mut cur = self.next_ns.load(Ordering::Relaxed);
        loop {
            let turn = cur.max(at_ns);
            match self.next_ns.compare_exchange_weak(
                cur,
                turn.saturating_add(self.gap_ns),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Duration::from_nanos(turn - at_ns),
                Err(now) => cur = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_server_answers_at_once_and_a_busy_one_in_turn() {
        let t0 = Instant::now();
        let p = Pacer::new(t0, 100.0);
        assert_eq!(p.claim(t0), Duration::ZERO);
        // Three more at the same instant wait 10, 20, 30 ms.
        for k in 1..=3u64 {
            assert_eq!(p.claim(t0), Duration::from_millis(10 * k));
        }
        // After the queue drained, idle again.
        assert_eq!(p.claim(t0 + Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(
            p.claim(t0 + Duration::from_millis(1005)),
            Duration::from_millis(5)
        );
    }

    #[test]
    fn threads_together_never_pass_the_rate() {
        let t0 = Instant::now();
        let p = std::sync::Arc::new(Pacer::new(t0, 1000.0));
        let turns: Vec<Duration> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let p = &p;
                    s.spawn(move || (0..500).map(|_| p.claim(t0)).collect::<Vec<_>>())
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let mut turns = turns;
        turns.sort();
        // 2000 turns asked at once: exactly one per millisecond.
        for (i, t) in turns.iter().enumerate() {
            assert_eq!(*t, Duration::from_millis(i as u64), "turn {i}");
        }
    }
}
