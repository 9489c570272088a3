//! End-to-end accounting: a blaster's report (`trace`: the numbers the
//! server under test accepted) against a sink's (`trace.runs`: the numbers
//! the server delivered), for one run id. `bench --through` calls it with
//! both ends in one process (one clock); `merge BLAST.json SINK.json` with
//! two reports that may come from two hosts (the delivery latency then
//! includes the offset between their clocks, minus `--clock-offset`).
//!
//! What it adds to the blaster's report: `e2e` (accepted, delivered, lost,
//! late, duplicates, unexpected, untraced), `latency.delivery` (the sink's
//! histogram of send time → last byte read), and `timeline[].backlog`
//! (accepted so far minus delivered so far, per second, the timeline
//! extended over the drain).
//!
//! Definitions (README, "Measuring a relay end to end"): `delivered` counts
//! distinct numbers of the run the sink received (late ones included);
//! `lost` = accepted and never delivered; `late` = first delivered in a
//! second that began after the drain ended (in the sink's grace, for
//! `bench`); `unexpected` =
//! delivered but not in the accepted set; `untraced` = messages the sink
//! accepted without this run's trace (none, malformed, or another run's).
//! The per-second figures come from the sink's seconds of first delivery,
//! so `late` and `backlog` have a one-second resolution (a delivery is
//! counted in the backlog once its second has ended).

use hdrhistogram::Histogram;

use super::report::{E2e, ReportError};
use super::report::{LatencySummary, Report, Role, TraceRun, E2E_LISTED};
use super::trace::{delivery_histogram, NumberSet, DELIVERY_HIGH_US, DELIVERY_LOW_US};

/// How the two reports relate.
#[derive(Clone, Copy, Debug, Default)]
pub struct E2eOptions {
    /// Seconds waited for deliveries after the load.
    pub drain_secs: f64,
    /// The Unix time the drain ended: deliveries first seen in a second
    /// starting at or after it are late. `None`: nothing is late.
    pub drain_end_unix: Option<f64>,
    /// Both reports read one clock (one process).
    pub one_clock: bool,
    /// Sink clock minus blaster clock, seconds (subtracted from every
    /// delivery latency and from the sink's seconds).
    pub clock_offset_secs: f64,
}

/// Errors of pairing two reports.
#[derive(Debug, thiserror::Error)]
pub enum E2eError {
    #[error("{0}")]
    Pairing(String),
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Which of `reports` is the blaster's and which the sink's, by role.
pub fn pair(reports: [Report; 2]) -> Result<(Report, Report), E2eError> {
    let [a, b] = reports;
    match (a.role, b.role) {
        (Role::Blast, Role::Sink) => Ok((a, b)),
        (Role::Sink, Role::Blast) => Ok((b, a)),
        _ => Err(E2eError::Pairing(
            "end-to-end merge needs one blast report and one sink report".into(),
        )),
    }
}

/// Adds the end-to-end accounting of `sink` to the blaster's report `blast`
/// (see the module doc).
pub fn account(blast: &mut Report, sink: &Report, o: &E2eOptions) -> Result<(), E2eError> {
    let bt = blast.trace.as_ref().ok_or_else(|| {
        E2eError::Pairing("the blast report has no `trace` (run it with --trace)".into())
    })?;
    let run_id = bt.run_id.clone().unwrap_or_default();
    let accepted = bt.accepted_set.clone().unwrap_or_default();
    let st = sink.trace.as_ref().ok_or_else(|| {
        E2eError::Pairing("the sink report has no `trace` (run the sink with --trace)".into())
    })?;
    let run = st.runs.iter().find(|r| r.run_id == run_id);
    let others: u64 = st
        .runs
        .iter()
        .filter(|r| r.run_id != run_id)
        .map(|r| r.messages)
        .sum();
    let empty = NumberSet::default();
    let delivered = run.map_or(&empty, |r| &r.delivered_set);
    let lost_set = &accepted.0 - &delivered.0;
    let unexpected_set = &delivered.0 - &accepted.0;
    let offset_ns = (o.clock_offset_secs * 1e9) as i64;
    // Sink seconds on the blaster's clock.
    let shifted: Vec<(f64, u64)> = run
        .map(|r| {
            r.per_second
                .iter()
                .map(|[s, n]| (*s as f64 - o.clock_offset_secs, *n))
                .collect()
        })
        .unwrap_or_default();
    let late = match o.drain_end_unix {
        Some(end) => {
            let n: u64 = shifted
                .iter()
                .filter(|(s, _)| *s >= end.ceil())
                .map(|(_, n)| n)
                .sum();
            n.min(delivered.len())
        }
        None => 0,
    };
    let note = if o.one_clock {
        "one process, one clock: delivery latency runs from the send time to the last byte the sink read".to_string()
    } else if o.clock_offset_secs != 0.0 {
        format!(
            "two hosts: delivery latency includes the offset between their clocks, corrected by --clock-offset {}s (sink minus blaster)",
            o.clock_offset_secs
        )
    } else {
        "two hosts: delivery latency includes the offset between their clocks (uncorrected; measure it and pass --clock-offset)".to_string()
    };
    blast.e2e = Some(E2e {
        run_id,
        accepted: accepted.len(),
        delivered: delivered.len(),
        lost: lost_set.len(),
        late,
        duplicates: run.map_or(0, |r| r.duplicates),
        unexpected: unexpected_set.len(),
        untraced: st.untraced.unwrap_or(0) + others,
        lost_numbers: lost_set.iter().take(E2E_LISTED).collect(),
        unexpected_numbers: unexpected_set.iter().take(E2E_LISTED).collect(),
        drain_secs: o.drain_secs,
        one_clock: o.one_clock,
        clock_offset_secs: o.clock_offset_secs,
        clock_note: note,
    });
    if let Some(h) = run.and_then(|r| r.delivery.histogram.as_ref()) {
        let h = shift(h, offset_ns / 1000);
        blast
            .latency
            .insert("delivery".into(), LatencySummary::from_histogram(&h)?);
    }
    backlog(blast, accepted.len(), &shifted, o.drain_end_unix);
    Ok(())
}

/// `h` with `off_us` taken from every value (at least 1 µs).
fn shift(h: &Histogram<u64>, off_us: i64) -> Histogram<u64> {
    if off_us == 0 {
        return h.clone();
    }
    let mut out = delivery_histogram();
    for v in h.iter_recorded() {
        let x = (v.value_iterated_to() as i64 - off_us)
            .clamp(DELIVERY_LOW_US as i64, DELIVERY_HIGH_US as i64) as u64;
        let _ = out.record_n(x, v.count_at_value());
    }
    out
}

/// Fills `timeline[].backlog`, extending the timeline with empty seconds
/// until the later of the last delivery and the drain's end.
fn backlog(blast: &mut Report, accepted: u64, deliveries: &[(f64, u64)], drain_end: Option<f64>) {
    let start = blast.started_at_unix;
    let in_timeline: u64 = blast.timeline.iter().map(|p| p.messages).sum();
    // Accepted before the timeline's first second (warmup).
    let mut acc = accepted.saturating_sub(in_timeline) as i64;
    let last_delivery = deliveries.iter().map(|(s, _)| *s).fold(f64::MIN, f64::max);
    let end = drain_end.unwrap_or(f64::MIN).max(last_delivery + 1.0);
    // The last one-second bin that starts before `end`.
    let last_t =
        ((end - start).ceil().max(1.0) as u64 - 1).max(blast.timeline.last().map_or(0, |p| p.t));
    let mut points = std::mem::take(&mut blast.timeline).into_iter().peekable();
    let mut out = Vec::new();
    let mut i = 0;
    let mut del: i64 = 0;
    for t in 0..=last_t {
        let mut p = match points.peek() {
            Some(p) if p.t == t => points.next().unwrap_or_default(),
            _ => super::recorder::TimelinePoint {
                t,
                ..Default::default()
            },
        };
        acc += p.messages as i64;
        let until = start + t as f64 + 1.0;
        // A delivery counts once its whole second has passed, so it is never
        // counted before the acceptance of its message (the backlog of a
        // run without unexpected deliveries is never negative).
        while i < deliveries.len() && deliveries[i].0 + 1.0 <= until {
            del += deliveries[i].1 as i64;
            i += 1;
        }
        p.backlog = Some(acc - del);
        out.push(p);
    }
    out.extend(points);
    blast.timeline = out;
}

/// The run of `sink` with `run_id`, if the sink saw it.
pub fn sink_run<'a>(sink: &'a Report, run_id: &str) -> Option<&'a TraceRun> {
    sink.trace
        .as_ref()?
        .runs
        .iter()
        .find(|r| r.run_id == run_id)
}
