//! Numbers for people: latencies with a unit chosen per value, rates with
//! k/M suffixes, byte rates in binary units, UNIX times as dates. The
//! bottom of `stats` (it imports nothing): every renderer for people (text,
//! SVG, HTML, JUnit) formats through here, so one figure reads the same
//! everywhere; the machine formats (`.hgrm`, `.hlog`, Prometheus) do not.
//!
//! Invariants: latencies print two decimals below 10 in their unit, one
//! below 100, none from 100 up and none for whole microseconds (`5µs`,
//! `1.25ms`, `12.5ms`, `125ms`, `3.20s`); rates print one decimal (two with
//! `M`), byte rates one. Plain ASCII apart from `µ`; pure functions that
//! never panic (NaN and infinities print as Rust prints them).

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

/// `(year, month, day, hour, minute, second)` of a UNIX time in UTC, or
/// `None` before 1970 or after the year 9999.
fn civil_utc(secs: f64) -> Option<(i64, i64, i64, u64, u64, u64)> {
    if !(0.0..253_402_300_800.0).contains(&secs) {
        return None;
    }
    let secs = secs as u64;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (proleptic Gregorian), eras of 400 years.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Some((year, month, day, rem / 3600, rem / 60 % 60, rem % 60))
}

/// A UNIX time as `2026-11-29 20:11:57 UTC` (whole seconds; times before
/// 1970 or beyond the year 9999 print as seconds).
pub fn format_unix_utc(secs: f64) -> String {
    match civil_utc(secs) {
        Some((y, mo, d, h, mi, s)) => format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC"),
        None => format!("{secs:.0} s since 1970"),
    }
}

/// A UNIX time as ISO 8601 without a zone, `2026-11-29T20:11:57` (UTC), as
/// JUnit's `timestamp` wants it; out-of-range times give the epoch.
pub fn format_unix_iso(secs: f64) -> String {
    let (y, mo, d, h, mi, s) = civil_utc(secs).unwrap_or((1970, 1, 1, 0, 0, 0));
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}")
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

    #[test]
    fn unix_times_print_as_utc_dates() {
        assert_eq!(format_unix_utc(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_utc(951_782_400.0), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_unix_utc(1_795_368_985.9), "2026-11-22 17:36:25 UTC");
        assert_eq!(format_unix_utc(-5.0), "-5 s since 1970");
        assert_eq!(format_unix_utc(f64::NAN), "NaN s since 1970");
        assert_eq!(format_unix_iso(1_795_368_985.0), "2026-11-22T17:36:25");
        assert_eq!(format_unix_iso(-1.0), "1970-01-01T00:00:00");
    }
}
