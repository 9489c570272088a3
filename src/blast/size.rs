//! What `--size` (and a scenario profile's `size`) accepts: one size, a
//! uniform range (`512..64KiB`), or an empirical distribution
//! (`1KiB:50%,16KiB:35%,256KiB:12%,4MiB:3%`) whose weights sum to 100%.
//!
//! Invariants: a [`SizeDist`] has at least one size, its weights sum to 1
//! and its cumulative table ends at exactly 1, so a draw always lands on a
//! size; a draw takes one `u64` from the caller's seeded generator (runs are
//! reproducible from `--seed`); the bodies of a distribution's sizes are
//! built once before the run ([`SizeDist::bodies`], filled by
//! `MessageBuilder::shared_body`) and shared by every thread, so no body is
//! built inside a timed phase.

use std::fmt;
use std::sync::{Arc, OnceLock};

use super::body::{Body, Rng};
use super::message::SizeRange;
use crate::units::{parse_percent, parse_size};

/// An empirical distribution of message sizes.
#[derive(Debug)]
pub struct SizeDist {
    /// The sizes, in bytes, in the order given.
    sizes: Box<[u64]>,
    /// The weights as given (shares of 1), for display.
    weights: Box<[f64]>,
    /// Cumulative weights; the last is 1.
    cum: Box<[f64]>,
    /// One body per size, built before the run.
    bodies: OnceLock<Box<[Arc<Body>]>>,
}

impl PartialEq for SizeDist {
    fn eq(&self, o: &Self) -> bool {
        self.sizes == o.sizes && self.weights == o.weights
    }
}

const DIST_FORM: &str = "a distribution is written SIZE:WEIGHT%,... with weights summing to 100%, \
     like 1KiB:50%,16KiB:35%,256KiB:12%,4MiB:3%";

impl SizeDist {
    /// `1KiB:50%,16KiB:35%,...`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut sizes = Vec::new();
        let mut weights = Vec::new();
        for part in s.split(',') {
            let (size, weight) = part
                .split_once(':')
                .ok_or_else(|| format!("expected SIZE:WEIGHT%, got `{part}`; {DIST_FORM}"))?;
            let size = parse_size(size).map_err(|e| format!("{e}; {DIST_FORM}"))?;
            if !weight.trim().ends_with('%') {
                return Err(format!(
                    "expected a weight in percent like 35%, got `{weight}`; {DIST_FORM}"
                ));
            }
            let weight = parse_percent(weight).map_err(|e| format!("{e}; {DIST_FORM}"))?;
            if weight <= 0.0 {
                return Err(format!("the weight of {size} bytes is 0; {DIST_FORM}"));
            }
            sizes.push(size);
            weights.push(weight);
        }
        let total: f64 = weights.iter().sum();
        if (total - 1.0).abs() > 1e-6 {
            return Err(format!(
                "the weights of `{s}` sum to {}%, not 100%; {DIST_FORM}",
                (total * 1e4).round() / 1e2
            ));
        }
        let mut acc = 0.0;
        let mut cum: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        // The last bound is exactly 1 so every draw in [0, 1) lands.
        if let Some(last) = cum.last_mut() {
            *last = 1.0;
        }
        Ok(SizeDist {
            sizes: sizes.into(),
            weights: weights.into(),
            cum: cum.into(),
            bodies: OnceLock::new(),
        })
    }

    /// The sizes, in the order given.
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// The smallest and largest size.
    pub fn bounds(&self) -> SizeRange {
        SizeRange {
            min: self.sizes.iter().copied().min().unwrap_or(0),
            max: self.sizes.iter().copied().max().unwrap_or(0),
        }
    }

    /// The index of a size drawn by weight (one draw from `rng`).
    pub fn pick(&self, rng: &mut Rng) -> usize {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        // A handful of sizes: a linear scan beats a binary search.
        self.cum
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.cum.len() - 1)
    }

    /// The size at `index`.
    pub fn size(&self, index: usize) -> u64 {
        self.sizes[index]
    }

    /// The bodies of the sizes, built once (by the first caller) with
    /// `build(size)`, in the order of [`Self::sizes`].
    pub fn bodies(&self, build: impl Fn(u64) -> Arc<Body>) -> &[Arc<Body>] {
        self.bodies
            .get_or_init(|| self.sizes.iter().map(|&s| build(s)).collect())
    }

    /// The bodies, if [`Self::bodies`] built them already.
    pub fn built_bodies(&self) -> Option<&[Arc<Body>]> {
        self.bodies.get().map(|b| &b[..])
    }
}

impl fmt::Display for SizeDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (s, w)) in self.sizes.iter().zip(self.weights.iter()).enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{s}:{}%", (w * 1e6).round() / 1e4)?;
        }
        Ok(())
    }
}

/// A `--size` value: one size or a uniform range, or a distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeSpec {
    /// The size or range (for a distribution: its smallest and largest).
    pub range: SizeRange,
    /// The distribution, when one was given.
    pub dist: Option<Arc<SizeDist>>,
}

impl SizeSpec {
    /// The value as the JSON report echoes it.
    pub fn echo(&self) -> String {
        match &self.dist {
            Some(d) => d.to_string(),
            None if self.range.min == self.range.max => self.range.min.to_string(),
            None => format!("{}..{}", self.range.min, self.range.max),
        }
    }
}

/// `1KiB`, `512..64KiB`, or `1KiB:50%,16KiB:35%,256KiB:12%,4MiB:3%`.
pub fn parse_size_spec(s: &str) -> Result<SizeSpec, String> {
    if s.contains(':') || s.contains(',') {
        let d = SizeDist::parse(s)?;
        return Ok(SizeSpec {
            range: d.bounds(),
            dist: Some(Arc::new(d)),
        });
    }
    let range = match s.split_once("..") {
        None => {
            let v = parse_size(s)?;
            SizeRange { min: v, max: v }
        }
        Some((a, b)) => {
            let err = |e: String| format!("{e}; a range is written MIN..MAX like 512..64KiB");
            let min = parse_size(a).map_err(err)?;
            let max = parse_size(b).map_err(err)?;
            if min > max {
                return Err(format!("expected MIN..MAX with MIN <= MAX, got `{s}`"));
            }
            SizeRange { min, max }
        }
    };
    Ok(SizeSpec { range, dist: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIX: &str = "1KiB:50%,16KiB:35%,256KiB:12%,4MiB:3%";

    #[test]
    fn a_distribution_parses_to_its_exact_sizes_and_weights() {
        let d = SizeDist::parse(MIX).unwrap();
        assert_eq!(d.sizes(), &[1024, 16 << 10, 256 << 10, 4 << 20]);
        assert_eq!(&d.weights[..], &[0.5, 0.35, 0.12, 0.03]);
        assert_eq!(*d.cum.last().unwrap(), 1.0);
        assert_eq!(
            d.bounds(),
            SizeRange {
                min: 1024,
                max: 4 << 20
            }
        );
        assert_eq!(d.to_string(), "1024:50%,16384:35%,262144:12%,4194304:3%");
        let spec = parse_size_spec(MIX).unwrap();
        assert_eq!(spec.range, d.bounds());
        assert_eq!(spec.echo(), d.to_string());
        // One size and ranges read as before.
        assert_eq!(parse_size_spec("1KiB").unwrap().dist, None);
        assert_eq!(
            parse_size_spec("512..64KiB").unwrap().range,
            SizeRange {
                min: 512,
                max: 65536
            }
        );
        assert_eq!(
            parse_size_spec("2KiB:100%").unwrap().dist.unwrap().sizes(),
            &[2048]
        );
    }

    #[test]
    fn a_bad_distribution_names_the_expected_form() {
        for bad in [
            "1KiB:50%,16KiB:35%",
            "1KiB:50%,16KiB:60%",
            "1KiB:50,16KiB:50%",
            "1KiB:50%,banana:50%",
            "1KiB:0%,2KiB:100%",
            "1KiB,2KiB",
            "1KiB:50%,",
        ] {
            let e = parse_size_spec(bad).expect_err(bad);
            assert!(e.contains("SIZE:WEIGHT%"), "{bad}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        assert!(parse_size_spec("1KiB:50%,16KiB:35%")
            .unwrap_err()
            .contains("sum to 85%"));
    }

    #[test]
    fn draws_follow_the_weights_and_the_seed() {
        let d = SizeDist::parse(MIX).unwrap();
        let draws = |seed| {
            let mut rng = Rng::new(seed);
            let mut n = [0u64; 4];
            for _ in 0..200_000 {
                n[d.pick(&mut rng)] += 1;
            }
            n
        };
        let n = draws(42);
        for (i, w) in [0.5, 0.35, 0.12, 0.03].into_iter().enumerate() {
            let share = n[i] as f64 / 200_000.0;
            // 200,000 draws: a share's standard deviation is below 0.12%.
            assert!((share - w).abs() < 0.005, "size {i}: {share} vs {w}");
        }
        assert_eq!(draws(42), n, "the same seed draws the same sizes");
        assert_ne!(draws(43), n, "another seed draws others");
    }
}
