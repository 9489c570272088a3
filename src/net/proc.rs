//! CPU time and memory of a process, for benchmark reports.
//!
//! [`ProcUsage::of_pid`] reads `/proc/PID/stat` (utime + stime) and
//! `/proc/PID/status` (VmRSS) of any process, e.g. a Postfix `smtp-sink` run
//! side by side; [`self_rusage`] uses `getrusage(RUSAGE_SELF)`. Times are in
//! microseconds, memory in bytes. The parsers are pure functions over text and
//! never panic on malformed input.

use std::time::Duration;

use thiserror::Error;

/// Errors reading process usage.
#[derive(Debug, Error)]
pub enum ProcError {
    /// The `/proc` file could not be read (no such process, not Linux, ...).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file did not have the expected layout.
    #[error("cannot parse {path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// What was missing.
        reason: &'static str,
    },
}

/// CPU time and resident memory of one process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcUsage {
    /// User-mode CPU time, µs.
    pub cpu_user_us: u64,
    /// Kernel-mode CPU time, µs.
    pub cpu_sys_us: u64,
    /// Resident set size, bytes (VmRSS; for [`self_rusage`] the peak, ru_maxrss).
    pub rss_bytes: u64,
}

impl ProcUsage {
    /// User + system CPU time, µs.
    pub fn cpu_total_us(&self) -> u64 {
        self.cpu_user_us + self.cpu_sys_us
    }

    /// Reads the usage of process `pid` from `/proc`.
    pub fn of_pid(pid: u32) -> Result<Self, ProcError> {
        let stat_path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&stat_path).map_err(|source| ProcError::Read {
            path: stat_path.clone(),
            source,
        })?;
        let (utime_ticks, stime_ticks) = parse_stat_times(&stat).ok_or(ProcError::Parse {
            path: stat_path,
            reason: "no utime/stime fields",
        })?;
        let status_path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&status_path).map_err(|source| ProcError::Read {
            path: status_path.clone(),
            source,
        })?;
        // A zombie has no VmRSS line: report 0 rather than fail.
        let rss_bytes = parse_status_rss_bytes(&status).unwrap_or(0);
        let tick_us = 1_000_000 / clock_ticks_per_sec();
        Ok(Self {
            cpu_user_us: utime_ticks.saturating_mul(tick_us),
            cpu_sys_us: stime_ticks.saturating_mul(tick_us),
            rss_bytes,
        })
    }

    /// Reads the usage of this process from `/proc/self`.
    pub fn of_self() -> Result<Self, ProcError> {
        Self::of_pid(std::process::id())
    }
}

/// `sysconf(_SC_CLK_TCK)`, the unit of `/proc/PID/stat` times (100 on Linux).
fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 && ticks <= 1_000_000 {
        ticks as u64
    } else {
        100
    }
}

/// `(utime, stime)` in clock ticks from the text of `/proc/PID/stat`.
///
/// The command name (field 2) is in parentheses and may itself contain spaces
/// and parentheses, so fields are counted after the *last* `)`.
pub fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After ')' comes field 3 (state); utime is field 14, stime field 15.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// VmRSS in bytes from the text of `/proc/PID/status`.
pub fn parse_status_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_ascii_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let unit = match parts.next() {
        Some("kB") | None => 1024,
        Some("mB") | Some("MB") => 1024 * 1024,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

fn timeval_us(tv: libc::timeval) -> u64 {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let usecs = u64::try_from(tv.tv_usec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(usecs)
}

/// `getrusage(RUSAGE_SELF)`: CPU time of every thread of this process and its
/// peak RSS (`ru_maxrss`, which Linux reports in KiB).
pub fn self_rusage() -> std::io::Result<ProcUsage> {
    // SAFETY: rusage is plain old data, so all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage that outlives the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ProcUsage {
        cpu_user_us: timeval_us(usage.ru_utime),
        cpu_sys_us: timeval_us(usage.ru_stime),
        rss_bytes: u64::try_from(usage.ru_maxrss)
            .unwrap_or(0)
            .saturating_mul(1024),
    })
}

/// CPU time as a `Duration`, for display.
pub fn cpu_duration(usage: &ProcUsage) -> Duration {
    Duration::from_micros(usage.cpu_total_us())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_are_counted_after_the_last_parenthesis() {
        let stat = "1234 (smtp (sink) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 57 13 0 0 20 0 1 0 100 1000 50";
        assert_eq!(parse_stat_times(stat), Some((57, 13)));
    }

    #[test]
    fn truncated_or_garbled_stat_is_none() {
        assert_eq!(parse_stat_times(""), None);
        assert_eq!(parse_stat_times("1 (x) S 1 2"), None);
        assert_eq!(parse_stat_times("1 (x) S 1 1 1 0 -1 0 0 0 0 0 a b"), None);
    }

    #[test]
    fn status_rss_is_in_bytes() {
        let status = "Name:\tsink\nVmPeak:\t  9000 kB\nVmRSS:\t    2048 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss_bytes(status), Some(2048 * 1024));
        assert_eq!(parse_status_rss_bytes("Name:\tx\n"), None);
        assert_eq!(parse_status_rss_bytes("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn own_usage_is_readable_from_proc_and_getrusage() {
        let from_proc = ProcUsage::of_self().unwrap();
        assert!(from_proc.rss_bytes > 0);
        let from_rusage = self_rusage().unwrap();
        assert!(from_rusage.rss_bytes > 0);
    }
}
