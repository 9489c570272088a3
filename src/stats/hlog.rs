//! `.hlog` writer: an HdrHistogram interval log (format 1.3), one tagged
//! line per phase per interval, readable by Java's `HistogramLogProcessor`,
//! HistogramLogAnalyzer and hdrhistogram's `IntervalLogIterator`.
//!
//! Invariants: the header is a comment naming the unit (microseconds), the
//! `#[Histogram log format version 1.3]` comment, `#[StartTime: ...]` and `#[BaseTime: ...]` (both the run start,
//! so interval timestamps are unambiguous offsets from it), and the CSV
//! legend; every interval line is written by hdrhistogram's
//! `IntervalLogWriter` (V2-deflate, base64). Values are microseconds; the
//! `Interval_Max` column is in microseconds too. Tags are phase names
//! (`message`), `<phase>_uncorrected` and `schedule_lag`. Phases with no
//! value in an interval get no line.

use std::io::{self, Write};
use std::time::{Duration, SystemTime};

use hdrhistogram::serialization::interval_log::{
    IntervalLogWriterBuilder, IntervalLogWriterError, Tag,
};
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;

use super::recorder::{IntervalSnapshot, Measurements};

/// Errors of writing an interval log.
#[derive(Debug, thiserror::Error)]
pub enum HlogError {
    #[error("cannot write the interval log: {0}")]
    Io(#[from] io::Error),
    #[error("cannot serialize an interval histogram: {0}")]
    Serialize(String),
    #[error("invalid interval log tag `{0}`")]
    Tag(String),
}

/// Streams interval histograms to `W` (use a `BufWriter<File>`).
pub struct HlogWriter<W: Write> {
    out: W,
    serializer: V2DeflateSerializer,
}

impl<W: Write> HlogWriter<W> {
    /// Writes the header. `start` is the run start: interval timestamps
    /// are offsets from it.
    pub fn new(mut out: W, start: SystemTime) -> Result<Self, HlogError> {
        let mut serializer = V2DeflateSerializer::new();
        IntervalLogWriterBuilder::new()
            .add_comment("[Logged with smtpstorm, values in microseconds]")
            .add_comment("[Histogram log format version 1.3]")
            .with_start_time(start)
            .with_base_time(start)
            .begin_log_with(&mut out, &mut serializer)?;
        writeln!(out, "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"")?;
        Ok(Self { out, serializer })
    }

    /// Writes one tagged histogram for `[start_offset, start_offset + duration)`.
    /// Empty histograms are skipped.
    pub fn write_histogram(
        &mut self,
        tag: &str,
        start_offset: Duration,
        duration: Duration,
        h: &Histogram<u64>,
    ) -> Result<(), HlogError> {
        if h.is_empty() {
            return Ok(());
        }
        let tag = Tag::new(tag).ok_or_else(|| HlogError::Tag(tag.to_string()))?;
        // The builder writes nothing without comments or times: it is only
        // the way to reach a writer over our own stream and serializer.
        let mut w =
            IntervalLogWriterBuilder::new().begin_log_with(&mut self.out, &mut self.serializer)?;
        w.write_histogram(h, start_offset, duration, Some(tag))
            .map_err(|e| match e {
                IntervalLogWriterError::IoError(e) => HlogError::Io(e),
                IntervalLogWriterError::SerializeError(e) => HlogError::Serialize(format!("{e:?}")),
            })
    }

    /// Writes every non-empty histogram of one interval (the merge of all
    /// threads' snapshots of that interval, or one snapshot).
    pub fn write_interval(
        &mut self,
        start_offset: Duration,
        duration: Duration,
        m: &Measurements,
    ) -> Result<(), HlogError> {
        for (phase, h) in m.latency.iter() {
            self.write_histogram(phase.as_str(), start_offset, duration, h)?;
        }
        for (phase, h) in m.latency_uncorrected.iter() {
            self.write_histogram(
                &format!("{}_uncorrected", phase.as_str()),
                start_offset,
                duration,
                h,
            )?;
        }
        if let Some(h) = &m.schedule_lag {
            self.write_histogram("schedule_lag", start_offset, duration, h)?;
        }
        Ok(())
    }

    /// Writes one snapshot.
    pub fn write_snapshot(&mut self, s: &IntervalSnapshot) -> Result<(), HlogError> {
        self.write_interval(s.start_offset, s.duration, &s.measurements)
    }

    /// Flushes and returns the inner writer.
    pub fn finish(mut self) -> Result<W, HlogError> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::{Outcome, Phase};
    use crate::stats::recorder::Recorder;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;

    #[test]
    fn interval_log_parses_back_with_tags_offsets_and_histograms() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut w = HlogWriter::new(Vec::new(), start).unwrap();
        let mut rec = Recorder::new();
        for sec in 0..3u64 {
            for v in 1..=100u64 {
                rec.record(Phase::Message, v * 10 * (sec + 1));
                rec.record_uncorrected(Phase::Message, v);
                rec.count_outcome(Outcome::Accepted);
            }
            rec.record(Phase::Ehlo, 42);
            let snap = rec.take_interval(Duration::from_secs(sec), Duration::from_secs(1));
            w.write_snapshot(&snap).unwrap();
        }
        let bytes = w.finish().unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.contains("#[Histogram log format version 1.3]\n"),
            "{text}"
        );
        assert!(text.contains("#[StartTime: 1700000000.000 (seconds since epoch)]\n"));
        assert!(text.contains("\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n"));
        assert!(text.contains("\nTag=message,0.000,1.000,"), "{text}");

        let mut intervals = Vec::new();
        let mut saw_start = false;
        for e in IntervalLogIterator::new(&bytes) {
            match e.unwrap() {
                LogEntry::StartTime(t) => {
                    saw_start = true;
                    assert_eq!(t, Duration::from_secs(1_700_000_000));
                }
                LogEntry::BaseTime(_) => {}
                LogEntry::Interval(i) => intervals.push((
                    i.tag().unwrap().as_str().to_string(),
                    i.start_timestamp(),
                    i.duration(),
                    i.encoded_histogram().to_string(),
                )),
            }
        }
        assert!(saw_start);
        assert_eq!(
            intervals.len(),
            9,
            "3 intervals x (message, message_uncorrected, ehlo)"
        );
        let (_, _, dur, b64) = intervals
            .iter()
            .find(|i| i.0 == "message" && i.1 == Duration::from_secs(1))
            .expect("the message histogram of the second interval");
        assert_eq!(*dur, Duration::from_secs(1));
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut raw.as_slice())
            .unwrap();
        assert_eq!(h.len(), 100);
        assert!(h.equivalent(h.max(), 2000));
        assert!(intervals.iter().any(|i| i.0 == "message_uncorrected"));
        assert!(intervals.iter().any(|i| i.0 == "ehlo"));
    }

    #[test]
    fn tags_with_spaces_are_refused() {
        let mut w = HlogWriter::new(Vec::new(), SystemTime::UNIX_EPOCH).unwrap();
        let mut h = crate::stats::recorder::new_histogram();
        h.record(1).unwrap();
        assert!(matches!(
            w.write_histogram("a b", Duration::ZERO, Duration::from_secs(1), &h),
            Err(HlogError::Tag(_))
        ));
    }
}
