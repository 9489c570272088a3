//! Numbers for people: latencies with a unit chosen per value, rates with
//! k/M suffixes, byte rates in binary units. The bottom of `stats`: every
//! renderer (text, SVG, HTML, JUnit) formats through here, so one figure
//! reads the same everywhere.
//!
//! Invariants: three significant figures; plain ASCII apart from `µ`; pure
//! functions that never panic (NaN and infinities print as Rust prints them).

/// Formats a latency in µs with a unit chosen for its size:
/// `850µs`, `1.25ms`, `12.5ms`, `3.20s`.
pub fn format_us(us: f64) -> String {
    let (v, unit) = if us < 1_000.0 {
        (us, "µs")
    } else if us < 1_000_000.0 {
        (us / 1e3, "ms")
    } else {
        (us / 1e6, "s")
    };
    let prec = if v >= 100.0 || unit == "µs" && v.fract() == 0.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.prec$}{unit}")
}

/// Formats a count-per-second with a k/M suffix above 10 000.
pub fn format_rate(v: f64) -> String {
    if v >= 10_000_000.0 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 10_000.0 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}

/// Formats bytes per second in binary units.
pub fn format_bytes_rate(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1}{}/s", UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_chosen_per_value() {
        assert_eq!(format_us(850.0), "850µs");
        assert_eq!(format_us(1250.0), "1.25ms");
        assert_eq!(format_us(12_500.0), "12.5ms");
        assert_eq!(format_us(250_000.0), "250ms");
        assert_eq!(format_us(3_200_000.0), "3.20s");
        assert_eq!(format_us(0.0), "0µs");
    }
}
