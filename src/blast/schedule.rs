//! The open-loop schedule: the intended time of every message.
//!
//! `--rate R` is R messages per second over the whole run, all threads and
//! instances together (`--stages`: a [`RateProfile`] of such rates). The
//! global sequence numbers messages `0, 1, 2, …`, message `i` intended at
//! `origin + i/R` (with stages: at the instant the profile's integral
//! reaches `i`, [`RateProfile::time_of`]). Instance `I` of `N` owns the
//! numbers `g·N + I` (`g` counts that instance's messages), so merged
//! instances arrive evenly, never in bursts of N. Inside an instance with C
//! connections over T threads, connection slot `j` (`0 ≤ j < C`) belongs to
//! thread `j mod T`, and the instance's message `g` goes to the thread that
//! owns slot `g mod C`: each thread's share of the messages is exactly its
//! share of the connections, and the shares of all threads interleave.
//! The intended time of every message is computed from its index (never by
//! adding intervals), so rounding never accumulates.
//!
//! Invariants: `intended(k)` is strictly increasing in `k` (far in the
//! future past the profile's end); over all threads and instances the
//! intended times are exactly `origin + time_of(i)`, each once;
//! [`Schedule::due_between`] counts exactly the `k` with `intended(k)` in the
//! window.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::profile::RateProfile;

/// One thread's share of an open-loop schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    origin: Instant,
    /// The rate of the whole run (all threads and instances) over time.
    profile: Arc<RateProfile>,
    /// Connection slots of this instance (`C`): one round of its sequence.
    round: u64,
    /// The slots (`0 ≤ j < C`) this thread owns, ascending.
    mine: Vec<u64>,
    instance: u64,
    instances: u64,
    next_k: u64,
}

impl Schedule {
    /// `profile`: messages per second of **all** instances together;
    /// `connections` and `threads`: this instance's; `thread` in
    /// `0..threads`, `instance` in `0..instances`.
    pub fn new(
        origin: Instant,
        profile: Arc<RateProfile>,
        connections: u64,
        thread: usize,
        threads: usize,
        instance: (u32, u32),
    ) -> Self {
        let threads = threads.max(1) as u64;
        let round = connections.max(1);
        let mine: Vec<u64> = (0..round)
            .filter(|j| j % threads == thread as u64)
            .collect();
        Schedule {
            origin,
            profile,
            round,
            mine,
            instance: u64::from(instance.0),
            instances: u64::from(instance.1.max(1)),
            next_k: 0,
        }
    }

    /// How many connection slots this thread owns (its connection cap).
    pub fn slots(&self) -> u64 {
        self.mine.len() as u64
    }

    /// The global sequence number of this thread's `k`-th message.
    fn global(&self, k: u64) -> u64 {
        let m = self.mine.len() as u64;
        let g = (k / m) * self.round + self.mine[(k % m) as usize];
        g * self.instances + self.instance
    }

    /// The intended time of this thread's `k`-th message.
    pub fn intended(&self, k: u64) -> Instant {
        let never = self.origin + Duration::from_secs(1_000_000_000);
        if self.mine.is_empty() {
            return never;
        }
        match self.profile.time_of(self.global(k) as f64) {
            Some(secs) => self.origin + Duration::from_secs_f64(secs.min(1e9)),
            None => never,
        }
    }

    /// The next message not yet taken.
    pub fn peek(&self) -> Instant {
        self.intended(self.next_k)
    }

    /// Takes the next message.
    pub fn take(&mut self) -> Instant {
        let t = self.peek();
        self.next_k += 1;
        t
    }

    /// Messages taken so far.
    pub fn taken(&self) -> u64 {
        self.next_k
    }

    /// How many of this thread's messages are intended before `at`.
    pub fn due_before(&self, at: Instant) -> u64 {
        if self.mine.is_empty() || at <= self.origin {
            return 0;
        }
        let secs = at.saturating_duration_since(self.origin).as_secs_f64();
        // Global numbers i = g·N + I with i·gap < secs.
        let i_bound = self.profile.cumulative(secs);
        let g_bound = (i_bound - self.instance as f64) / self.instances as f64;
        if g_bound <= 0.0 {
            return 0;
        }
        // Instance-local numbers g < g_bound, i.e. g in 0..=ceil(g_bound)-1.
        let g_count = g_bound.ceil() as u64;
        // Numerical safety: trust the exact test on the edge.
        let mut count = self.count_local_below(g_count);
        while count > 0 && self.intended(count - 1) >= at {
            count -= 1;
        }
        while self.intended(count) < at {
            count += 1;
        }
        count
    }

    /// Messages of this thread with instance-local number `g < g_count`.
    fn count_local_below(&self, g_count: u64) -> u64 {
        let full = g_count / self.round;
        let rest = g_count % self.round;
        full * self.mine.len() as u64 + self.mine.iter().take_while(|&&j| j < rest).count() as u64
    }

    /// How many of this thread's messages are intended in `[from, to)`.
    pub fn due_between(&self, from: Instant, to: Instant) -> u64 {
        self.due_before(to).saturating_sub(self.due_before(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn constant(rate: f64) -> Arc<RateProfile> {
        Arc::new(RateProfile::constant(rate))
    }

    #[test]
    fn stages_split_over_threads_and_instances_give_each_message_its_integral_time() {
        let profile = Arc::new(RateProfile::parse("1s:0..600,1s:600,1s:600..0").unwrap());
        let total = profile.total() as u64;
        assert_eq!(total, 1200);
        let origin = Instant::now();
        for (conns, threads, instances) in [(1u64, 1usize, 1u32), (4, 2, 3), (7, 3, 2)] {
            let mut all = Vec::new();
            for i in 0..instances {
                for t in 0..threads {
                    let mut s = Schedule::new(
                        origin,
                        Arc::clone(&profile),
                        conns,
                        t,
                        threads,
                        (i, instances),
                    );
                    let end = origin + Duration::from_secs(3);
                    assert_eq!(
                        s.due_before(end + Duration::from_secs(5)),
                        s.due_before(end),
                        "nothing is due past the last stage"
                    );
                    let n = s.due_before(end);
                    for _ in 0..n {
                        all.push((s.take() - origin).as_secs_f64());
                    }
                    assert!(s.peek() > origin + Duration::from_secs(1000));
                }
            }
            all.sort_by(f64::total_cmp);
            assert_eq!(all.len() as u64, total, "{conns}/{threads}/{instances}");
            for (i, d) in all.iter().enumerate() {
                let want = profile.time_of(i as f64).unwrap();
                assert!((d - want).abs() < 1e-6, "{i}: {d} vs {want}");
            }
            // The middle second holds exactly its 600.
            let mid = all.iter().filter(|&&t| (1.0..2.0).contains(&t)).count();
            assert_eq!(mid, 600);
        }
    }

    /// Every intended time of `threads` threads and `instances` instances
    /// over `n` messages each, sorted, as seconds from the origin.
    fn merged(rate: f64, connections: u64, threads: usize, instances: u32, n: u64) -> Vec<f64> {
        let origin = Instant::now();
        let mut all = Vec::new();
        for i in 0..instances {
            for t in 0..threads {
                let mut s = Schedule::new(
                    origin,
                    constant(rate),
                    connections,
                    t,
                    threads,
                    (i, instances),
                );
                for _ in 0..n {
                    all.push((s.take() - origin).as_secs_f64());
                }
            }
        }
        all.sort_by(f64::total_cmp);
        all
    }

    #[test]
    fn threads_and_instances_interleave_to_the_total_rate() {
        for (conns, threads, instances) in
            [(3, 3, 1), (4, 2, 3), (3, 2, 1), (1000, 2, 2), (5, 5, 4)]
        {
            let all = merged(300.0, conns, threads, instances, 60);
            // The first messages of the merged sequence are exactly i/R; the
            // tail may be ragged where one thread's n ran out before another's.
            let check = all.len() / 2;
            for (i, d) in all.iter().take(check).enumerate() {
                let want = i as f64 / 300.0;
                assert!(
                    (d - want).abs() < 1e-6,
                    "{conns}/{threads}/{instances} {i}: {d} vs {want}"
                );
            }
        }
    }

    #[test]
    fn instances_are_offset_not_in_lockstep() {
        // Three instances at 300/s in total: one message every 3.33 ms, never
        // three at the same instant.
        let all = merged(300.0, 4, 2, 3, 50);
        for w in all.windows(2).take(100) {
            let gap = w[1] - w[0];
            assert!((gap - 1.0 / 300.0).abs() < 1e-6, "gap {gap}");
        }
    }

    #[test]
    fn a_thread_shares_messages_as_it_shares_connections() {
        // 3 connections over 2 threads: thread 0 owns slots 0 and 2, so two
        // thirds of the messages.
        let origin = Instant::now();
        let second = origin + Duration::from_secs(3);
        let s0 = Schedule::new(origin, constant(300.0), 3, 0, 2, (0, 1));
        let s1 = Schedule::new(origin, constant(300.0), 3, 1, 2, (0, 1));
        assert_eq!((s0.slots(), s1.slots()), (2, 1));
        assert_eq!(s0.due_before(second), 600);
        assert_eq!(s1.due_before(second), 300);
    }

    #[test]
    fn due_counts_exactly_the_messages_in_a_window() {
        let origin = Instant::now();
        for (conns, threads, inst) in [(2u64, 2usize, (1u32, 2u32)), (3, 2, (0, 1)), (7, 3, (2, 3))]
        {
            for t in 0..threads {
                let s = Schedule::new(origin, constant(100.0), conns, t, threads, inst);
                for ms in [0u64, 1, 9, 10, 11, 333, 1000, 2999] {
                    let at = origin + Duration::from_millis(ms);
                    let brute = (0..1000).filter(|&k| s.intended(k) < at).count() as u64;
                    assert_eq!(
                        s.due_before(at),
                        brute,
                        "{conns}/{threads}/{inst:?} t{t} {ms}ms"
                    );
                }
            }
        }
        let s = Schedule::new(origin, constant(100.0), 2, 1, 2, (0, 1));
        // Thread 1 of 2 at 100/s: messages at 10 ms, 30 ms, 50 ms, ...
        assert_eq!(s.due_between(origin, origin + Duration::from_secs(1)), 50);
        assert_eq!(s.due_between(origin, origin + Duration::from_millis(10)), 0);
        assert_eq!(s.due_between(origin, origin + Duration::from_millis(11)), 1);
    }
}
