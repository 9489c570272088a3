//! Progress while a blast runs, fed once a second by the main thread with
//! the merged interval snapshot.
//!
//! On a terminal it is an `indicatif` bar on stderr (elapsed/total, rates,
//! errors); when stderr is not a terminal it is one plain line per interval
//! on stderr, starting with `progress ` (no carriage returns, no escape
//! codes), so logs of CI jobs stay readable; with `--quiet` nothing.
//! Invariants: progress never writes to stdout (where the summary or
//! `--json -` goes), and it only reads the snapshots it is given.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::config::BlastConfig;
use crate::stats::IntervalSnapshot;

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
        let c = &snap.measurements.counts;
        self.messages_done += c.messages_attempted;
        self.sessions_done += c.sessions;
        self.errors += c.errors();
        self.elapsed = self.elapsed.max(snap.start_offset + snap.duration);
        let live = snap.live_line();
        // `[   12s] 400 msg/s ...`: the rates and percentiles, without the clock.
        let rates = live.split_once("] ").map_or(live.as_str(), |(_, r)| r);
        let done = self.done();
        let msg = format!(
            "{rates}  total {} msg, {} errors",
            self.messages_done, self.errors
        );
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

    /// `3s/10s`, `1200/2000 msg`, `40/100 sessions` or `3s`.
    fn done(&self) -> String {
        let secs = self.elapsed.as_secs_f64().round() as u64;
        match self.total {
            Total::Time(d) => format!("{secs}s/{}s", d.as_secs_f64().round() as u64),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(p.done(), "3s/10s");
        let mut p = plain(Total::Messages(2000));
        p.elapsed = Duration::from_millis(1990);
        p.messages_done = 1200;
        assert_eq!(p.done(), "2s, 1200/2000 msg");
        assert_eq!(plain(Total::Unbounded).done(), "0s");
    }
}
