//! Progress while a blast runs, fed once a second by the main thread with
//! the merged interval snapshot.
//!
//! On a terminal it is an `indicatif` bar on stderr (elapsed/total, rates,
//! errors); when stderr is not a terminal it is one plain line per interval
//! on stderr, starting with `progress ` (no carriage returns, no escape
//! codes), so logs of CI jobs stay readable; with `--quiet` nothing.
//! Invariants: progress never writes to stdout (where the summary or
//! `--json -` goes), and it only reads the snapshots it is given. Rates are
//! per second of the interval's real length ([`IntervalSnapshot::duration`]):
//! the last interval of a run is usually a fraction of a second, and its line
//! says so (`[2.3s/2.3s] ... in the last 0.30s`); an interval too short for a
//! rate to mean anything (the few milliseconds in which the last sessions
//! finish) shows counts instead of rates.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::config::BlastConfig;
use crate::smtp::Phase;
use crate::stats::units::format_us;
use crate::stats::IntervalSnapshot;

/// Below this length an interval's line shows counts, not rates.
const MIN_RATE_INTERVAL: Duration = Duration::from_millis(100);

/// The bar when the run has a known end, and the spinner when it has none
/// (`wide_msg` is cut to the terminal width, so the line never wraps).
const BAR_TEMPLATE: &str = "{prefix} [{bar:24}] {wide_msg}";
const SPINNER_TEMPLATE: &str = "{spinner} {prefix} {wide_msg}";

/// What ends the run, for `elapsed/total`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Total {
    /// Warmup plus the measured duration.
    Time(Duration),
    Messages(u64),
    Sessions(u64),
    Unbounded,
}

#[derive(Debug)]
enum Mode {
    Off,
    Bar(ProgressBar),
    Plain,
}

/// The progress display of one run.
#[derive(Debug)]
pub struct Progress {
    mode: Mode,
    total: Total,
    messages_done: u64,
    sessions_done: u64,
    errors: u64,
    elapsed: Duration,
}

impl Progress {
    /// The display `cfg` asks for: nothing with `--quiet`, a bar on a
    /// terminal, plain lines otherwise.
    pub fn new(cfg: &BlastConfig) -> Progress {
        let total = match (cfg.duration, cfg.max_messages, cfg.max_sessions) {
            (Some(d), _, _) => Total::Time(cfg.warmup + d),
            (None, Some(n), _) => Total::Messages(n),
            (None, None, Some(n)) => Total::Sessions(n),
            (None, None, None) => Total::Unbounded,
        };
        let mode = if cfg.output.quiet {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            let len = match total {
                Total::Time(d) => d.as_secs().max(1),
                Total::Messages(n) | Total::Sessions(n) => n.max(1),
                Total::Unbounded => 0,
            };
            let bar = if len == 0 {
                ProgressBar::no_length()
            } else {
                ProgressBar::new(len)
            };
            let template = if len == 0 {
                SPINNER_TEMPLATE
            } else {
                BAR_TEMPLATE
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            Mode::Bar(bar)
        } else {
            Mode::Plain
        };
        Progress {
            mode,
            total,
            messages_done: 0,
            sessions_done: 0,
            errors: 0,
            elapsed: Duration::ZERO,
        }
    }

    /// Shows one merged interval.
    pub fn interval(&mut self, snap: &IntervalSnapshot) {
        let (done, msg) = self.absorb(snap);
        match &self.mode {
            Mode::Off => {}
            Mode::Plain => eprintln!("progress [{done}] {msg}"),
            Mode::Bar(bar) => {
                bar.set_prefix(done);
                bar.set_position(match self.total {
                    Total::Time(_) => self.elapsed.as_secs(),
                    Total::Messages(_) => self.messages_done,
                    Total::Sessions(_) => self.sessions_done,
                    Total::Unbounded => 0,
                });
                bar.set_message(msg);
            }
        }
    }

    /// Adds one merged interval to the totals; returns the clock part and
    /// the rest of its line. A full interval shows whole seconds and rates;
    /// a shorter one (the end of the run) its real length, and rates only if
    /// it lasted at least [`MIN_RATE_INTERVAL`].
    fn absorb(&mut self, snap: &IntervalSnapshot) -> (String, String) {
        let c = &snap.measurements.counts;
        self.messages_done += c.messages_attempted;
        self.sessions_done += c.sessions;
        self.errors += c.errors();
        self.elapsed = self.elapsed.max(snap.start_offset + snap.duration);
        let partial = snap.duration < Duration::from_secs(1);
        let mut msg = if snap.duration >= MIN_RATE_INTERVAL {
            let secs = snap.duration.as_secs_f64();
            format!(
                "{:.0} msg/s  {:.0} sess/s  {:.0} err/s",
                c.messages_accepted as f64 / secs,
                c.sessions as f64 / secs,
                c.errors() as f64 / secs
            )
        } else {
            format!(
                "{} msg  {} sess  {} err",
                c.messages_accepted,
                c.sessions,
                c.errors()
            )
        };
        if partial {
            let len = snap.duration;
            msg.push_str(&if len < MIN_RATE_INTERVAL {
                format!(" in the last {}ms", len.as_millis())
            } else {
                format!(" in the last {:.2}s", len.as_secs_f64())
            });
        }
        let lat = &snap.measurements.latency;
        if let Some((phase, h)) = [Phase::Message, Phase::Session]
            .into_iter()
            .find_map(|p| lat.get(p).map(|h| (p, h)))
        {
            msg.push_str(&format!(
                "  p50 {}  p99 {} ({})",
                format_us(h.value_at_quantile(0.5) as f64),
                format_us(h.value_at_quantile(0.99) as f64),
                phase.as_str()
            ));
        }
        msg.push_str(&format!(
            "  total {} msg, {} errors",
            self.messages_done, self.errors
        ));
        (self.done(partial), msg)
    }

    /// `3s/10s`, `3s, 1200/2000 msg`, `3s, 40/100 sessions` or `3s`; with
    /// `partial` the elapsed time has tenths (`2.3s/10s`).
    fn done(&self, partial: bool) -> String {
        let secs = if partial {
            format!("{:.1}", self.elapsed.as_secs_f64())
        } else {
            format!("{}", self.elapsed.as_secs_f64().round() as u64)
        };
        match self.total {
            Total::Time(d) => format!("{secs}s/{}", seconds(d)),
            Total::Messages(n) => format!("{secs}s, {}/{n} msg", self.messages_done),
            Total::Sessions(n) => format!("{secs}s, {}/{n} sessions", self.sessions_done),
            Total::Unbounded => format!("{secs}s"),
        }
    }

    /// Ends the display (clears the bar; the summary follows).
    pub fn finish(self) {
        if let Mode::Bar(bar) = self.mode {
            bar.finish_and_clear();
        }
    }
}

/// `10s`, or `2.3s` when not a whole number of seconds.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::Outcome;
    use crate::stats::Recorder;

    fn plain(total: Total) -> Progress {
        Progress {
            mode: Mode::Off,
            total,
            messages_done: 0,
            sessions_done: 0,
            errors: 0,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn bar_templates_are_valid() {
        assert!(ProgressStyle::with_template(BAR_TEMPLATE).is_ok());
        assert!(ProgressStyle::with_template(SPINNER_TEMPLATE).is_ok());
    }

    #[test]
    fn elapsed_over_total_follows_what_ends_the_run() {
        let mut p = plain(Total::Time(Duration::from_secs(10)));
        p.elapsed = Duration::from_secs(3);
        assert_eq!(p.done(false), "3s/10s");
        let mut p = plain(Total::Messages(2000));
        p.elapsed = Duration::from_millis(1990);
        p.messages_done = 1200;
        assert_eq!(p.done(false), "2s, 1200/2000 msg");
        assert_eq!(p.done(true), "2.0s, 1200/2000 msg");
        assert_eq!(plain(Total::Unbounded).done(false), "0s");
        assert_eq!(
            plain(Total::Time(Duration::from_millis(2300))).done(false),
            "0s/2.3s"
        );
    }

    /// One interval of length `len` starting at `start` in which `n`
    /// messages were accepted (one session each, 2 ms per message).
    fn interval(start: Duration, len: Duration, n: u64) -> IntervalSnapshot {
        let mut r = Recorder::new();
        for _ in 0..n {
            r.count_outcome(Outcome::Accepted);
            r.count_session(false);
            r.record(Phase::Message, 2000);
        }
        r.take_interval(start, len)
    }

    #[test]
    fn the_last_partial_interval_is_rated_over_its_real_length() {
        let mut p = plain(Total::Time(Duration::from_millis(2300)));
        let (clock, line) = p.absorb(&interval(Duration::ZERO, Duration::from_secs(1), 1000));
        assert_eq!(clock, "1s/2.3s");
        assert!(
            line.starts_with("1000 msg/s  1000 sess/s  0 err/s  p50 2.00ms"),
            "{line}"
        );
        let (_, line) = p.absorb(&interval(
            Duration::from_secs(1),
            Duration::from_secs(1),
            1000,
        ));
        assert!(line.contains("total 2000 msg, 0 errors"), "{line}");
        // The same pace for the last 0.3 s: 300 messages are 1000/s, not 300/s.
        let (clock, line) = p.absorb(&interval(
            Duration::from_secs(2),
            Duration::from_millis(300),
            300,
        ));
        assert_eq!(clock, "2.3s/2.3s");
        assert!(
            line.starts_with("1000 msg/s  1000 sess/s  0 err/s in the last 0.30s"),
            "{line}"
        );
        assert!(line.ends_with("total 2300 msg, 0 errors"), "{line}");
    }

    #[test]
    fn a_tail_of_a_few_milliseconds_shows_counts_not_rates() {
        let mut p = plain(Total::Time(Duration::from_secs(2)));
        p.absorb(&interval(Duration::ZERO, Duration::from_secs(1), 10));
        p.absorb(&interval(
            Duration::from_secs(1),
            Duration::from_secs(1),
            10,
        ));
        // Three sessions that ended 3 ms after the end: not "1000 msg/s".
        let (clock, line) = p.absorb(&interval(
            Duration::from_secs(2),
            Duration::from_millis(3),
            3,
        ));
        assert_eq!(clock, "2.0s/2s");
        assert!(
            line.starts_with("3 msg  3 sess  0 err in the last 3ms"),
            "{line}"
        );
        assert!(!line.contains("msg/s"), "{line}");
    }
}
