//! Live metrics (`--metrics-listen ADDR` on `sink`, `blast` and `bench`):
//! Prometheus text exposition at `/metrics` and the same figures as JSON at
//! `/stats`, served by a small HTTP server thread of our own ([`http`]:
//! one mio poll, `httparse`, built for hostile clients) from the per-second
//! snapshots the main thread already merges.
//!
//! Nothing of it is on the hot path: the workers send their interval
//! snapshots as always; the main thread hands each one to
//! [`LiveMetrics::absorb`] (a lock and a histogram merge once per snapshot,
//! about once a second), and a scrape copies the totals under the lock and
//! formats them outside it. The figures therefore lag the workers by up to
//! one interval.
//!
//! Exposed, all cumulative since the start (`counts.*` of the JSON report,
//! one metric or label each, so a final scrape equals the report):
//! `smtpstorm_sessions_total`, `smtpstorm_tls_sessions_total`,
//! `smtpstorm_tls_resumed_total`, `smtpstorm_connections_without_session_total`,
//! `smtpstorm_messages_attempted_total`,
//! `smtpstorm_messages_total{outcome=accepted|tempfailed|rejected}`,
//! `smtpstorm_errors_total{kind=connection_error|timeout|protocol_error}`,
//! `smtpstorm_recipients_total`, `smtpstorm_message_bytes_total`,
//! `smtpstorm_verified_total{result=ok|corrupt}`,
//! `smtpstorm_replies_total{command,code}`; the gauge
//! `smtpstorm_open_connections`; and per phase the histogram
//! `smtpstorm_latency_seconds{phase}` (blaster only, corrected figures),
//! whose buckets are read from the HdrHistogram at fixed bounds.
//!
//! Invariants: the text follows the Prometheus text format 0.0.4 as the
//! `prometheus-client` crate writes it; `/stats` carries the same counts
//! under the report's key names. The server answers only GET and HEAD of
//! `/metrics`, `/stats` and `/` (others 404, other methods 405; the limits
//! are in [`http`]) and stops when its handle is dropped.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::recorder::{Counts, IntervalSnapshot, Measurements};
use super::report::Role;
use crate::smtp::Phase;

mod http;

/// Upper bounds of the latency histogram buckets, seconds (`+Inf` follows).
pub const BUCKETS_SECS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Errors of the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
    #[error("cannot start the metrics server thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Debug)]
struct State {
    role: Role,
    started: Instant,
    totals: Measurements,
    open_connections: u64,
    snapshots: u64,
    finished: bool,
}

/// The live figures of one run, shared by the main thread (writer) and the
/// metrics server (reader).
#[derive(Debug)]
pub struct LiveMetrics {
    state: Mutex<State>,
}

/// A copy of the live figures, taken under the lock.
#[derive(Clone, Debug)]
pub struct LiveView {
    pub role: Role,
    pub elapsed: Duration,
    pub totals: Measurements,
    pub open_connections: u64,
    pub snapshots: u64,
    pub finished: bool,
}

impl LiveMetrics {
    pub fn new(role: Role) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                role,
                started: Instant::now(),
                totals: Measurements::default(),
                open_connections: 0,
                snapshots: 0,
                finished: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind:
        // still worth serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one snapshot (one thread's interval, or a merge of several).
    pub fn absorb(&self, snap: &IntervalSnapshot) {
        let mut s = self.lock();
        s.totals.merge(&snap.measurements);
        s.snapshots += 1;
    }

    /// Sets the open-connections gauge.
    pub fn set_open_connections(&self, n: u64) {
        self.lock().open_connections = n;
    }

    /// Marks the run as ended (`/stats` says `"finished": true`): every
    /// snapshot has been absorbed.
    pub fn finish(&self) {
        let mut s = self.lock();
        s.finished = true;
        s.open_connections = 0;
    }

    /// A copy of the current figures.
    pub fn view(&self) -> LiveView {
        let s = self.lock();
        LiveView {
            role: s.role,
            elapsed: s.started.elapsed(),
            totals: s.totals.clone(),
            open_connections: s.open_connections,
            snapshots: s.snapshots,
            finished: s.finished,
        }
    }
}

/// Encodes a [`LiveView`] for `prometheus-client`.
#[derive(Debug)]
struct ViewCollector(LiveView);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn labelled_counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let fm = m.encode_family(&labels)?;
        ConstCounter::new(*v).encode(fm)?;
    }
    Ok(())
}

impl Collector for ViewCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let v = &self.0;
        encode_counts(&mut enc, &v.totals.counts)?;
        encode_replies(&mut enc, &v.totals)?;
        let g = ConstGauge::new(v.open_connections as i64);
        let m = enc.encode_descriptor(
            "smtpstorm_open_connections",
            "Connections open at the last snapshot.",
            None,
            g.metric_type(),
        )?;
        g.encode(m)?;
        if v.role == Role::Blast && v.totals.latency.iter().next().is_some() {
            encode_latency(&mut enc, &v.totals)?;
        }
        Ok(())
    }
}

/// The counters of `counts.*` (the report's keys), labelled where several
/// keys are one metric.
fn encode_counts(enc: &mut DescriptorEncoder, c: &Counts) -> Result<(), std::fmt::Error> {
    counter(enc, "smtpstorm_sessions", "Sessions ended.", c.sessions)?;
    counter(
        enc,
        "smtpstorm_tls_sessions",
        "Sessions whose TLS handshake completed.",
        c.tls_sessions,
    )?;
    counter(
        enc,
        "smtpstorm_tls_resumed",
        "TLS handshakes that resumed an earlier session.",
        c.tls_resumed,
    )?;
    counter(
        enc,
        "smtpstorm_connections_without_session",
        "Connections that ended without an SMTP session.",
        c.connections_without_session,
    )?;
    counter(
        enc,
        "smtpstorm_messages_attempted",
        "Messages attempted.",
        c.messages_attempted,
    )?;
    let outcome = |o: &str, n| (vec![("outcome", o.to_string())], n);
    labelled_counter(
        enc,
        "smtpstorm_messages",
        "Messages by outcome.",
        &[
            outcome("accepted", c.messages_accepted),
            outcome("tempfailed", c.messages_tempfailed),
            outcome("rejected", c.messages_rejected),
        ],
    )?;
    let kind = |k: &str, n| (vec![("kind", k.to_string())], n);
    labelled_counter(
        enc,
        "smtpstorm_errors",
        "Connection errors, timeouts and protocol errors.",
        &[
            kind("connection_error", c.connection_errors),
            kind("timeout", c.timeouts),
            kind("protocol_error", c.protocol_errors),
        ],
    )?;
    counter(
        enc,
        "smtpstorm_recipients",
        "Recipients sent (blast) or accepted (sink).",
        c.recipients,
    )?;
    counter(
        enc,
        "smtpstorm_message_bytes",
        "Message bytes (DATA/BDAT payload).",
        c.bytes,
    )?;
    let result = |r: &str, n| (vec![("result", r.to_string())], n);
    labelled_counter(
        enc,
        "smtpstorm_verified",
        "Messages whose digest header was checked (--verify).",
        &[
            result("ok", c.verify_ok),
            result("corrupt", c.verify_corrupt),
        ],
    )?;
    Ok(())
}

/// `smtpstorm_replies_total{command,code}`.
fn encode_replies(
    enc: &mut DescriptorEncoder,
    totals: &Measurements,
) -> Result<(), std::fmt::Error> {
    let replies: Vec<_> = totals
        .reply_codes
        .iter()
        .map(|(cmd, code, n)| {
            (
                vec![("command", cmd.as_str().to_string()), ("code", code)],
                n,
            )
        })
        .collect();
    labelled_counter(
        enc,
        "smtpstorm_replies",
        "Replies by command and code.",
        &replies,
    )
}

/// `smtpstorm_latency_seconds{phase}`: buckets read from each phase's
/// HdrHistogram at [`BUCKETS_SECS`].
fn encode_latency(
    enc: &mut DescriptorEncoder,
    totals: &Measurements,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(
        "smtpstorm_latency_seconds",
        "Latency per phase (coordinated-omission corrected in open loop).",
        None,
        MetricType::Histogram,
    )?;
    for (phase, h) in totals.latency.iter() {
        let labels = vec![("phase".to_string(), phase.as_str().to_string())];
        // The encoder wants each bucket's own count (it writes the
        // cumulative `le` series itself): differences of the
        // histogram's counts at or below each bound.
        let mut below = 0u64;
        let mut buckets: Vec<(f64, u64)> = BUCKETS_SECS
            .iter()
            .map(|&b| {
                let upto = h.count_between(0, (b * 1e6) as u64).max(below);
                let own = upto - below;
                below = upto;
                (b, own)
            })
            .collect();
        buckets.push((f64::INFINITY, h.len().saturating_sub(below)));
        let sum = h.mean() * h.len() as f64 / 1e6;
        let fm = m.encode_family(&labels)?;
        encode_histogram(fm, sum, h.len(), &buckets)?;
    }
    Ok(())
}

fn encode_histogram(
    mut m: prometheus_client::encoding::MetricEncoder,
    sum: f64,
    count: u64,
    buckets: &[(f64, u64)],
) -> Result<(), std::fmt::Error> {
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, buckets, None)
}

impl LiveView {
    /// The Prometheus text exposition (format 0.0.4).
    pub fn prometheus_text(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ViewCollector(self.clone())));
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }

    /// The `/stats` document: the report's `counts` keys, the gauge, and
    /// per-phase count/p50/p99/max so far.
    pub fn stats_json(&self) -> serde_json::Value {
        let latency: serde_json::Map<String, serde_json::Value> = Phase::ALL
            .into_iter()
            .filter_map(|p| {
                let h = self.totals.latency.get(p)?;
                Some((
                    p.as_str().to_string(),
                    serde_json::json!({
                        "count": h.len(),
                        "p50_us": h.value_at_quantile(0.5),
                        "p99_us": h.value_at_quantile(0.99),
                        "max_us": h.max(),
                    }),
                ))
            })
            .collect();
        serde_json::json!({
            "role": match self.role { Role::Blast => "blast", Role::Sink => "sink" },
            "elapsed_secs": self.elapsed.as_secs_f64(),
            "snapshots": self.snapshots,
            "finished": self.finished,
            "open_connections": self.open_connections,
            "counts": self.totals.counts,
            "latency": latency,
        })
    }
}

/// The HTTP server thread ([`http`]); stops (and is joined) on drop.
pub struct MetricsServer {
    server: http::Server,
}

impl MetricsServer {
    /// Listens on `addr` (port 0: any free port, see [`Self::addr`]) and
    /// serves `metrics`.
    pub fn start(addr: SocketAddr, metrics: Arc<LiveMetrics>) -> Result<Self, MetricsError> {
        let bound = http::bind(addr).map_err(|e| MetricsError::Listen {
            addr,
            reason: e.to_string(),
        })?;
        let server = bound
            .serve("metrics", Box::new(move |req| route(&metrics, &req.path)))
            .map_err(MetricsError::Thread)?;
        Ok(Self { server })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }
}

/// The answer to a GET (or HEAD) of `path`.
fn route(metrics: &LiveMetrics, path: &str) -> http::Response {
    use http::{Response, Status};
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => Response::new(
            Status::Ok,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            metrics.view().prometheus_text(),
        ),
        "/stats" => Response::new(
            Status::Ok,
            "application/json",
            metrics.view().stats_json().to_string() + "\n",
        ),
        "/" => Response::new(
            Status::Ok,
            TEXT,
            "smtpstorm metrics: /metrics (Prometheus text), /stats (JSON)\n".to_string(),
        ),
        _ => Response::error(Status::NotFound),
    }
}

/// Delivery latency buckets (seconds): relays take longer than phases.
pub const DELIVERY_BUCKETS_SECS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

/// A report's end-to-end figures (`e2e`, `latency.delivery`, the last
/// and the largest `backlog`) as Prometheus text exposition, for a
/// node_exporter textfile collector (`smtpstorm report --prometheus`);
/// empty when the report has no `e2e`.
pub fn e2e_prometheus_text(report: &super::report::Report) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let Some(e) = &report.e2e else {
        return o;
    };
    let run = &e.run_id;
    for (name, help, v) in [
        (
            "accepted",
            "Traced messages the server under test accepted.",
            e.accepted,
        ),
        (
            "delivered",
            "Distinct traced messages delivered to the sink.",
            e.delivered,
        ),
        ("lost", "Accepted and never delivered.", e.lost),
        ("late", "Delivered after the drain ended.", e.late),
        (
            "duplicates",
            "Deliveries of a message already delivered.",
            e.duplicates,
        ),
        (
            "unexpected",
            "Delivered but not seen as accepted.",
            e.unexpected,
        ),
        (
            "untraced",
            "Messages the sink accepted without this run's trace.",
            e.untraced,
        ),
    ] {
        let _ = writeln!(o, "# HELP smtpstorm_e2e_{name} {help}");
        let _ = writeln!(o, "# TYPE smtpstorm_e2e_{name} gauge");
        let _ = writeln!(o, "smtpstorm_e2e_{name}{{run_id=\"{run}\"}} {v}");
    }
    let backlogs: Vec<i64> = report.timeline.iter().filter_map(|p| p.backlog).collect();
    if let (Some(last), Some(max)) = (backlogs.last(), backlogs.iter().max()) {
        let _ = writeln!(o, "# HELP smtpstorm_e2e_backlog Accepted so far minus delivered so far, at the end of the run.");
        let _ = writeln!(o, "# TYPE smtpstorm_e2e_backlog gauge");
        let _ = writeln!(o, "smtpstorm_e2e_backlog{{run_id=\"{run}\"}} {last}");
        let _ = writeln!(
            o,
            "# HELP smtpstorm_e2e_backlog_max The largest backlog of any second."
        );
        let _ = writeln!(o, "# TYPE smtpstorm_e2e_backlog_max gauge");
        let _ = writeln!(o, "smtpstorm_e2e_backlog_max{{run_id=\"{run}\"}} {max}");
    }
    if let Some(h) = report
        .latency
        .get("delivery")
        .and_then(|d| d.histogram.as_ref())
    {
        let name = "smtpstorm_delivery_latency_seconds";
        let _ = writeln!(
            o,
            "# HELP {name} Send time to the last byte of the relayed message read by the sink."
        );
        let _ = writeln!(o, "# TYPE {name} histogram");
        for b in DELIVERY_BUCKETS_SECS {
            let n = h.count_between(0, (b * 1e6) as u64);
            let _ = writeln!(o, "{name}_bucket{{run_id=\"{run}\",le=\"{b}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "{name}_bucket{{run_id=\"{run}\",le=\"+Inf\"}} {}",
            h.len()
        );
        let _ = writeln!(
            o,
            "{name}_sum{{run_id=\"{run}\"}} {}",
            h.mean() * h.len() as f64 / 1e6
        );
        let _ = writeln!(o, "{name}_count{{run_id=\"{run}\"}} {}", h.len());
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::{CommandKind, Outcome};
    use crate::stats::recorder::Recorder;

    fn live() -> Arc<LiveMetrics> {
        let m = LiveMetrics::new(Role::Blast);
        for thread in 0..2 {
            let mut r = Recorder::new();
            for i in 0..10u64 {
                r.count_session(i == 0);
                r.count_outcome(if i == 9 {
                    Outcome::Timeout
                } else {
                    Outcome::Accepted
                });
                r.count_reply(CommandKind::Mail, 250);
                r.record(Phase::Message, 200 + i * 1000 + thread);
            }
            m.absorb(&r.take_interval(Duration::ZERO, Duration::from_secs(1)));
        }
        m.set_open_connections(3);
        m
    }

    #[test]
    fn the_exposition_carries_counters_gauge_and_cumulative_buckets() {
        let text = live().view().prometheus_text();
        assert!(
            text.contains("# TYPE smtpstorm_sessions_total counter\nsmtpstorm_sessions_total 20\n"),
            "{text}"
        );
        assert!(
            text.contains("smtpstorm_messages_total{outcome=\"accepted\"} 18\n"),
            "{text}"
        );
        assert!(
            text.contains("smtpstorm_errors_total{kind=\"timeout\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("smtpstorm_replies_total{command=\"mail\",code=\"250\"} 20\n"),
            "{text}"
        );
        assert!(text.contains("smtpstorm_open_connections 3\n"), "{text}");
        // 0.2ms, 1.2ms, 2.2ms ...: two values (one per thread) at most 1ms.
        assert!(
            text.contains("smtpstorm_latency_seconds_bucket{le=\"0.001\",phase=\"message\"} 2\n")
                || text.contains(
                    "smtpstorm_latency_seconds_bucket{phase=\"message\",le=\"0.001\"} 2\n"
                ),
            "{text}"
        );
        assert!(
            text.contains("smtpstorm_latency_seconds_count{phase=\"message\"} 20\n"),
            "{text}"
        );
    }

    #[test]
    fn stats_json_uses_the_report_keys() {
        let m = live();
        let v = m.view().stats_json();
        assert_eq!(v["counts"]["messages_accepted"], 18);
        assert_eq!(v["counts"]["timeouts"], 2);
        assert_eq!(v["latency"]["message"]["count"], 20);
        assert_eq!(v["finished"], false);
        m.finish();
        assert_eq!(m.view().stats_json()["finished"], true);
    }
}
