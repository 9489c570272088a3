//! Rate profiles: how many messages per second the open loop asks for at
//! each instant. `--rate R` is the constant profile; `--stages
//! 30s:0..2000,2m:2000,30s:2000..0` is a list of stages, each a
//! `DURATION:RATE` (held) or `DURATION:FROM..TO` (a linear ramp), in
//! messages per second of the whole run (all threads and instances).
//!
//! The schedule needs two exact answers: how many messages are due by time
//! `t` (the integral of the rate, [`RateProfile::cumulative`]) and when
//! message `i` is due (its inverse, [`RateProfile::time_of`]: the `t` with
//! `cumulative(t) = i`). Within a stage of rate `a + b·τ` the integral is
//! `a·τ + b·τ²/2`, inverted in closed form (`τ = 2m / (a + √(a² + 2bm))`,
//! stable for ramps up, down and flat); so intended times, and therefore
//! corrected latencies, stay exact while the rate moves.
//!
//! Invariants: `time_of` is strictly increasing on `0..total()` and `None`
//! past it; `cumulative(time_of(i)) = i` up to rounding; a constant profile
//! gives `time_of(i) = i / R` exactly, as the schedule always had.

use std::fmt;

use crate::units::{parse_duration, parse_rate};

/// One stage: `secs` long, the rate going linearly from `from` to `to`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stage {
    pub secs: f64,
    pub from: f64,
    pub to: f64,
}

impl Stage {
    /// The rate's slope (messages/s per second).
    fn slope(&self) -> f64 {
        if self.secs.is_finite() && self.secs > 0.0 {
            (self.to - self.from) / self.secs
        } else {
            0.0
        }
    }

    /// Messages due in the first `tau` seconds of the stage.
    fn integral(&self, tau: f64) -> f64 {
        if self.slope() == 0.0 {
            return self.from * tau;
        }
        self.from * tau + self.slope() * tau * tau / 2.0
    }

    /// The `tau` at which the stage's integral reaches `m` (`m` at most the
    /// stage's total).
    fn inverse(&self, m: f64) -> f64 {
        if m <= 0.0 {
            return 0.0;
        }
        let (a, b) = (self.from, self.slope());
        let tau = if b == 0.0 {
            m / a
        } else {
            // The root of b/2·τ² + a·τ − m = 0 written without cancellation.
            2.0 * m / (a + (a * a + 2.0 * b * m).max(0.0).sqrt())
        };
        tau.clamp(0.0, self.secs)
    }
}

/// A rate over time (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct RateProfile {
    stages: Vec<Stage>,
    /// Seconds from the origin at which each stage starts, and the end.
    starts: Vec<f64>,
    /// Messages due before each stage starts, and in total.
    cum: Vec<f64>,
}

impl RateProfile {
    /// `rate` messages per second for ever.
    pub fn constant(rate: f64) -> Self {
        Self::new(vec![Stage {
            secs: f64::INFINITY,
            from: rate,
            to: rate,
        }])
    }

    /// The profile of `stages`, one after the other from the origin.
    pub fn new(stages: Vec<Stage>) -> Self {
        let mut starts = vec![0.0];
        let mut cum = vec![0.0];
        for s in &stages {
            starts.push(starts.last().copied().unwrap_or(0.0) + s.secs);
            cum.push(cum.last().copied().unwrap_or(0.0) + s.integral(s.secs));
        }
        RateProfile {
            stages,
            starts,
            cum,
        }
    }

    /// `30s:0..2000,2m:2000,30s:2000..0`. Errors name the expected form.
    pub fn parse(s: &str) -> Result<Self, String> {
        let form = "expected stages like 30s:0..2000,2m:2000,30s:2000..0 (DURATION:RATE or DURATION:FROM..TO, messages per second)";
        let rate = |r: &str| -> Result<f64, String> {
            let r = r.trim();
            if r.trim_end_matches("/s").parse::<f64>() == Ok(0.0) {
                return Ok(0.0);
            }
            parse_rate(r).map_err(|e| format!("{e}; {form}"))
        };
        let mut stages = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let Some((d, r)) = part.split_once(':') else {
                return Err(format!("stage `{part}`: {form}"));
            };
            let secs = parse_duration(d)
                .map_err(|e| format!("stage `{part}`: {e}; {form}"))?
                .as_secs_f64();
            if secs <= 0.0 {
                return Err(format!(
                    "stage `{part}`: a stage lasts more than 0s; {form}"
                ));
            }
            let (from, to) = match r.split_once("..") {
                Some((a, b)) => (rate(a)?, rate(b)?),
                None => {
                    let v = rate(r)?;
                    (v, v)
                }
            };
            stages.push(Stage { secs, from, to });
        }
        let p = RateProfile::new(stages);
        if p.total() < 1.0 {
            return Err(format!("`{s}` asks for no message at all; {form}"));
        }
        Ok(p)
    }

    /// The stages.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The profile's length in seconds (infinite for a constant rate).
    pub fn duration_secs(&self) -> f64 {
        self.starts.last().copied().unwrap_or(0.0)
    }

    /// Messages due over the whole profile (infinite for a constant rate).
    pub fn total(&self) -> f64 {
        self.cum.last().copied().unwrap_or(0.0)
    }

    /// Every rate multiplied by `k` (`--rate-unit sessions`: `× -k`).
    pub fn scaled(&self, k: f64) -> Self {
        RateProfile::new(
            self.stages
                .iter()
                .map(|s| Stage {
                    secs: s.secs,
                    from: s.from * k,
                    to: s.to * k,
                })
                .collect(),
        )
    }

    /// The stage holding second `t` (the last one past the end).
    fn stage_at(&self, t: f64) -> usize {
        let n = self.stages.len();
        // starts[1..] are the stage ends: the first end above t.
        self.starts[1..].partition_point(|&end| end <= t).min(n - 1)
    }

    /// The rate asked for at second `t` (0 outside the profile).
    pub fn rate_at(&self, t: f64) -> f64 {
        if t < 0.0 || t >= self.duration_secs() || self.stages.is_empty() {
            return 0.0;
        }
        let k = self.stage_at(t);
        let s = &self.stages[k];
        s.from + s.slope() * (t - self.starts[k])
    }

    /// Messages due in `[0, t)`: the integral of the rate.
    pub fn cumulative(&self, t: f64) -> f64 {
        if t <= 0.0 || self.stages.is_empty() {
            return 0.0;
        }
        if t >= self.duration_secs() {
            return self.total();
        }
        let k = self.stage_at(t);
        self.cum[k] + self.stages[k].integral(t - self.starts[k])
    }

    /// Messages due in `[from, to)`.
    pub fn between(&self, from: f64, to: f64) -> f64 {
        (self.cumulative(to) - self.cumulative(from)).max(0.0)
    }

    /// When message `i` (0-based, all instances) is due, in seconds from
    /// the origin: the `t` with `cumulative(t) = i`; `None` past the end.
    pub fn time_of(&self, i: f64) -> Option<f64> {
        if i >= self.total() || self.stages.is_empty() {
            return None;
        }
        // The first stage whose end is above i.
        let k = self.cum[1..]
            .partition_point(|&c| c <= i)
            .min(self.stages.len() - 1);
        Some(self.starts[k] + self.stages[k].inverse(i - self.cum[k]))
    }

    /// The mean rate over `[from, to)` seconds (0 for an empty window).
    pub fn mean_rate(&self, from: f64, to: f64) -> f64 {
        if to > from {
            self.between(from, to) / (to - from)
        } else {
            0.0
        }
    }
}

impl fmt::Display for RateProfile {
    /// The `--stages` form (a constant profile prints its rate).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.stages.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if s.secs.is_finite() {
                write!(f, "{}s:", s.secs)?;
            }
            if s.from == s.to {
                write!(f, "{}", s.from)?;
            } else {
                write!(f, "{}..{}", s.from, s.to)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_parses_into_three_stages() {
        let p = RateProfile::parse("30s:0..2000,2m:2000,30s:2000..0").unwrap();
        assert_eq!(
            p.stages(),
            &[
                Stage {
                    secs: 30.0,
                    from: 0.0,
                    to: 2000.0
                },
                Stage {
                    secs: 120.0,
                    from: 2000.0,
                    to: 2000.0
                },
                Stage {
                    secs: 30.0,
                    from: 2000.0,
                    to: 0.0
                },
            ]
        );
        assert_eq!(p.duration_secs(), 180.0);
        // Two triangles of 30 000 and a rectangle of 240 000.
        assert_eq!(p.total(), 300_000.0);
        assert_eq!(p.to_string(), "30s:0..2000,120s:2000,30s:2000..0");
        for bad in [
            "", "30s", "x:100", "30s:abc", "30s:1..", "0s:100", "10s:0", "10s:-5",
        ] {
            let e = RateProfile::parse(bad).unwrap_err();
            assert!(e.contains("expected stages like"), "{bad}: {e}");
        }
        assert_eq!(RateProfile::parse("1s:2k/s").unwrap().total(), 2000.0);
    }

    #[test]
    fn a_constant_profile_is_exactly_i_over_r() {
        let p = RateProfile::constant(300.0);
        for i in [0u64, 1, 2, 299, 300, 12_345, 10_000_000] {
            assert_eq!(p.time_of(i as f64), Some(i as f64 / 300.0));
        }
        assert_eq!(p.cumulative(2.0), 600.0);
        assert_eq!(p.rate_at(1e6), 300.0);
    }

    #[test]
    fn the_integral_inverts_exactly_on_ramps_up_down_and_flat() {
        let p = RateProfile::parse("3s:0..1000,2s:1000,1s:0,4s:1000..10,2s:10..10000").unwrap();
        let total = p.total();
        // Closed forms: 1500 + 2000 + 0 + 2020 + 10010.
        assert!((total - 15_530.0).abs() < 1e-9, "{total}");
        let mut last = -1.0;
        for i in 0..total as u64 {
            let t = p.time_of(i as f64).unwrap();
            assert!(t > last, "message {i} at {t} is not after {last}");
            assert!(
                (p.cumulative(t) - i as f64).abs() < 1e-6,
                "message {i}: cumulative({t}) = {}",
                p.cumulative(t)
            );
            last = t;
        }
        assert_eq!(p.time_of(total), None);
        // Nothing falls in the stage of rate 0 (5 s to 6 s).
        assert_eq!(p.between(5.0, 6.0), 0.0);
        assert!((0..total as u64).all(|i| {
            let t = p.time_of(i as f64).unwrap();
            !(5.0 + 1e-9..6.0 - 1e-9).contains(&t)
        }));
        // Message 0 of a ramp from 0 is at the origin; the first second of
        // 0..1000 over 3 s holds 1000/3/2 messages.
        assert_eq!(p.time_of(0.0), Some(0.0));
        assert!((p.between(0.0, 1.0) - 1000.0 / 6.0).abs() < 1e-9);
        assert!((p.rate_at(1.5) - 500.0).abs() < 1e-9);
        assert_eq!(p.rate_at(12.0), 0.0);
    }

    #[test]
    fn each_second_holds_the_integral_of_its_rate_within_one_message() {
        let p = RateProfile::parse("5s:0..2000,5s:2000,5s:2000..0").unwrap();
        let times: Vec<f64> = (0..p.total() as u64)
            .map(|i| p.time_of(i as f64).unwrap())
            .collect();
        for s in 0..15 {
            let n = times
                .iter()
                .filter(|&&t| t >= s as f64 && t < (s + 1) as f64)
                .count() as f64;
            let want = p.between(s as f64, (s + 1) as f64);
            assert!((n - want).abs() <= 1.0, "second {s}: {n} vs {want}");
        }
        assert!((p.mean_rate(5.0, 10.0) - 2000.0).abs() < 1e-9);
    }

    #[test]
    fn scaling_multiplies_every_rate() {
        let p = RateProfile::parse("2s:10..20").unwrap().scaled(5.0);
        assert_eq!(
            p.stages()[0],
            Stage {
                secs: 2.0,
                from: 50.0,
                to: 100.0
            }
        );
        assert_eq!(p.total(), 150.0);
    }
}
