//! Reading quantities in the forms people type: counts (`10k`), rates
//! (`2.5k/s`), durations (`30s`, `200ms`), sizes (`1KB` is 1000 bytes,
//! `1KiB` 1024) and percentages (`5%`). Each parser, on bad input, returns
//! an error that states the expected form.
//!
//! A leaf module: the command line (`cli`) and the roles' own value
//! grammars (e.g. `--fault` in `sink::faults`) both read quantities with
//! it; it imports nothing of the crate. (Printing them is `stats::units`.)

use std::time::Duration;

fn split_number_suffix(s: &str) -> (&str, &str) {
    let i = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    (&s[..i], s[i..].trim())
}

/// `1000`, `10k`, `2M`, `1_000_000` → count. Errors state the expected form.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let err = || format!("expected a whole number like 1000, 10k or 2M, got `{s}`");
    let (num, suffix) = split_number_suffix(s.trim());
    if num.is_empty() {
        return Err(err());
    }
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "m" | "M" => 1e6,
        "g" | "G" => 1e9,
        _ => return Err(err()),
    };
    let v: f64 = num.replace('_', "").parse().map_err(|_| err())?;
    let total = v * mult;
    if !total.is_finite() || total < 0.0 || total.fract() != 0.0 || total > u64::MAX as f64 {
        return Err(err());
    }
    Ok(total as u64)
}

/// `1000`, `10k`, `2.5k`, `1000/s` → events per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let err = || format!("expected a rate per second like 500, 10k or 2.5k/s, got `{s}`");
    let t = s.trim().trim_end_matches("/s");
    let (num, suffix) = split_number_suffix(t);
    let mult = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "m" | "M" => 1e6,
        _ => return Err(err()),
    };
    let v: f64 = num.parse().map_err(|_| err())?;
    let r = v * mult;
    if !(r.is_finite() && r > 0.0) {
        return Err(err());
    }
    Ok(r)
}

/// `30s`, `200ms`, `1.5s`, `5m`, `1h`, `100us`; a bare number is seconds;
/// several parts add up, largest unit first, as people type them:
/// `1m30s`, `1h30m`, `2m 30s`, `1s500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("expected a duration like 30s, 200ms, 1m30s or 1h, got `{s}`");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    let mut secs = 0.0;
    // Each part's unit must be smaller than the one before (`30s1m` and
    // `1m1m` are typos, not durations).
    let mut last_scale = f64::INFINITY;
    let mut parts = 0;
    while !rest.is_empty() {
        let i = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(i);
        if num.is_empty() {
            return Err(err());
        }
        let j = tail
            .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(j);
        let v: f64 = num.replace('_', "").parse().map_err(|_| err())?;
        let scale = match unit {
            // A bare number is seconds, alone only.
            "" if parts == 0 && tail.trim().is_empty() => 1.0,
            "s" | "sec" | "secs" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        if scale >= last_scale {
            return Err(err());
        }
        last_scale = scale;
        secs += v * scale;
        parts += 1;
        rest = tail.trim_start();
    }
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `1024`, `1k`/`1KB` (1000), `1KiB` (1024), `64MiB`, `1MB`, `2G` → bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("expected a size like 1024, 1KB, 64KiB or 10MiB, got `{s}`");
    let (num, unit) = split_number_suffix(s.trim());
    if num.is_empty() {
        return Err(err());
    }
    let v: f64 = num.parse().map_err(|_| err())?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    let b = v * mult;
    if !b.is_finite() || b < 0.0 || b > (1u64 << 50) as f64 {
        return Err(err());
    }
    Ok(b.round() as u64)
}

/// `5%` or `0.05` → 0.05.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let err = || format!("expected a percentage like 5% or 0.5%, got `{s}`");
    let t = s.trim();
    let v = if let Some(p) = t.strip_suffix('%') {
        p.trim().parse::<f64>().map_err(|_| err())? / 100.0
    } else {
        t.parse::<f64>().map_err(|_| err())?
    };
    if !(0.0..=1.0).contains(&v) {
        return Err(err());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_type_them() {
        let d = |s: &str| parse_duration(s).unwrap();
        assert_eq!(d("30s"), Duration::from_secs(30));
        assert_eq!(d("30"), Duration::from_secs(30));
        assert_eq!(d("200ms"), Duration::from_millis(200));
        assert_eq!(d("1.5s"), Duration::from_millis(1500));
        assert_eq!(d("1h"), Duration::from_secs(3600));
        assert_eq!(d("5m"), Duration::from_secs(300));
        assert_eq!(d("1m30s"), Duration::from_secs(90));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(d("1h2m3s"), Duration::from_secs(3723));
        assert_eq!(d("2m 30s"), Duration::from_secs(150));
        assert_eq!(d("1s500ms"), Duration::from_millis(1500));
        assert_eq!(d(" 1m30s "), Duration::from_secs(90));
    }

    #[test]
    fn durations_that_are_typos_name_the_expected_form() {
        for bad in [
            "", "s", "1m30", "30s1m", "1m1m", "1x", "1h-5m", "m30s", "1 2", "1d",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("1m30s"), "{bad}: {e}");
        }
    }
}
