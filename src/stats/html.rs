//! The HTML report (`smtpstorm report RUN.json --html OUT`): one
//! self-contained page for a `blast`, `bench`, `merge` (or `sink`) report —
//! validity and its reasons, the key figures, the open loop's verdict,
//! throughput over time, latency percentiles per phase (table, spectrum,
//! and over time), outcomes and reply codes, assertions with their measured
//! values and thresholds, and the configuration and host.
//!
//! Invariants: the page fetches nothing (no script, font, stylesheet or
//! image from anywhere; the icon is an empty `data:` URL), so it works
//! opened from disk and offline. Every chart is drawn by plotters as an
//! inline `<svg>` inside a `<figure class="chart" data-series="N">`, where N
//! is the number of data series (lines or bars) it holds; a chart without
//! data is replaced by a sentence saying so. Every string from the report
//! is HTML-escaped.

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::{DrawingArea, IntoDrawingArea, SVGBackend, WHITE};

use super::assert::parse as parse_assertion;
use super::charts::{
    draw_backlog, draw_latency_over_time, draw_outcomes, draw_spectrum, draw_throughput,
    phases_over_time, spectrum,
};
use super::report::{Bottleneck, LatencySummary, Report, Role};
use super::units::{format_bytes_rate, format_rate, format_unix_utc, format_us};
use crate::smtp::Phase;

/// Errors of writing the HTML report.
#[derive(Debug, thiserror::Error)]
pub enum HtmlError {
    #[error("cannot draw the {chart} chart: {reason}")]
    Draw { chart: String, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// `&`, `<`, `>`, `"` and `'` escaped for text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #d5d9e0;padding-bottom:4px}
.sub{color:#5a6272;margin:0 0 16px}
.verdict{padding:12px 16px;border-radius:6px;font-weight:600;margin:12px 0}
.ok{background:#e3f4e8;color:#14532d}.bad{background:#fde4e4;color:#7f1d1d}.warn{background:#fff4d6;color:#6b4e00}
.verdict ul{margin:6px 0 0;font-weight:400}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.card{background:#fff;border-radius:6px;padding:10px 12px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card b{display:block;font-size:20px}.card span{color:#5a6272;font-size:13px}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid #e4e7ec;text-align:right}
th:first-child,td:first-child{text-align:left}
td.pass{color:#14532d;font-weight:600}td.fail{color:#b91c1c;font-weight:600}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px;align-items:start}
.charts.wide{grid-template-columns:1fr}
figure.chart{margin:0;background:#fff;border-radius:6px;padding:6px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
figure.chart svg{display:block;width:100%;height:auto}
figcaption{font-size:13px;color:#5a6272;padding:4px 6px}
pre{background:#fff;padding:10px;border-radius:6px;overflow:auto;font-size:13px}
.none{color:#5a6272;font-style:italic}
";

/// One chart drawn into an SVG string: `(svg, series drawn)`.
fn chart_svg<F>(size: (u32, u32), draw: F) -> Result<(String, usize), String>
where
    F: FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<usize, String>,
{
    let mut svg = String::new();
    let series;
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        series = draw(&root)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok((svg, series))
}

/// Appends a `<figure>` with the chart `id`, or a note when it has no data.
fn figure<F>(
    out: &mut String,
    id: &str,
    caption: &str,
    size: (u32, u32),
    draw: F,
) -> Result<(), HtmlError>
where
    F: FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<usize, String>,
{
    let (svg, series) = chart_svg(size, draw).map_err(|reason| HtmlError::Draw {
        chart: id.to_string(),
        reason,
    })?;
    if series == 0 {
        let _ = writeln!(
            out,
            "<p class=\"none\" id=\"{id}\">{}: no data in this report.</p>",
            escape(caption)
        );
        return Ok(());
    }
    let _ = writeln!(
        out,
        "<figure class=\"chart\" id=\"{id}\" data-series=\"{series}\">{svg}<figcaption>{}</figcaption></figure>",
        escape(caption)
    );
    Ok(())
}

fn card(out: &mut String, value: &str, label: &str) {
    let _ = write!(
        out,
        "<div class=\"card\"><b>{}</b><span>{}</span></div>",
        escape(value),
        escape(label)
    );
}

fn latency_row(out: &mut String, name: &str, s: &LatencySummary) {
    let _ = writeln!(
        out,
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        escape(name),
        s.count,
        format_us(s.min_us as f64),
        format_us(s.p50_us as f64),
        format_us(s.p90_us as f64),
        format_us(s.p99_us as f64),
        format_us(s.p999_us as f64),
        format_us(s.max_us as f64),
    );
}

/// The page of `report`: one section after another, in reading order.
pub fn html_string(report: &Report) -> Result<String, HtmlError> {
    let mut o = String::with_capacity(256 * 1024);
    page_head(&mut o, report);
    // Validity and checks first: what a reader must know before any figure.
    verdicts(&mut o, report);
    key_figures(&mut o, report);
    open_loop_section(&mut o, report);
    e2e_section(&mut o, report)?;
    throughput_section(&mut o, report)?;
    latency_section(&mut o, report)?;
    latency_over_time_section(&mut o, report)?;
    outcomes_section(&mut o, report)?;
    assertions_section(&mut o, report);
    host_and_config_section(&mut o, report);
    let _ = writeln!(o, "</main></body></html>");
    Ok(o)
}

/// The page's title: the role, and the target when the report (or every
/// input of a merged one) names the same one.
fn page_title(report: &Report) -> String {
    let role = match report.role {
        Role::Blast => "blast",
        Role::Sink => "sink",
    };
    // A merged report lists its inputs' configs: name the target when they
    // share one.
    let targets: Vec<&str> = match report.config.get("configs").and_then(|c| c.as_array()) {
        Some(configs) => configs
            .iter()
            .filter_map(|c| c.get("target")?.as_str())
            .collect(),
        None => report
            .config
            .get("target")
            .and_then(|t| t.as_str())
            .into_iter()
            .collect(),
    };
    let target = match targets.first() {
        Some(t) if targets.iter().all(|x| x == t) => format!(" against {t}"),
        _ => String::new(),
    };
    format!("smtpstorm {role} report{target}")
}

/// The document head (title, inline style), the heading and the line under
/// it: version, start, duration, host, and how many reports were merged.
fn page_head(o: &mut String, report: &Report) {
    let merged = report.config.get("merged_from").and_then(|n| n.as_u64());
    let title = page_title(report);
    let _ = writeln!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <link rel=\"icon\" href=\"data:,\"><title>{}</title><style>{STYLE}</style></head><body><main>",
        escape(&title)
    );
    let _ = writeln!(o, "<h1>{}</h1>", escape(&title));
    let _ = writeln!(
        o,
        "<p class=\"sub\">smtpstorm {} · started {} · {:.2} s measured · {} ({} cores){}</p>",
        escape(&report.version),
        format_unix_utc(report.started_at_unix),
        report.duration_secs,
        escape(&report.host.hostname),
        report.host.cores,
        merged
            .map(|n| format!(" · merged from {n} reports"))
            .unwrap_or_default()
    );
}

/// The verdict boxes: valid or not (with the reasons), how many assertions
/// passed, and a blast run that had nothing accepted.
fn verdicts(o: &mut String, report: &Report) {
    let failed: Vec<_> = report.assertions.iter().filter(|a| !a.ok).collect();
    if report.valid {
        let _ = writeln!(
            o,
            "<div class=\"verdict ok\" id=\"validity\">Valid run: the figures below can be acted on.</div>"
        );
    } else {
        let _ = writeln!(
            o,
            "<div class=\"verdict bad\" id=\"validity\">INVALID run: the blaster's own delays are in the figures.<ul>"
        );
        for why in &report.invalid_reasons {
            let _ = writeln!(o, "<li>{}</li>", escape(why));
        }
        let _ = writeln!(o, "</ul></div>");
    }
    if !report.assertions.is_empty() {
        let class = if failed.is_empty() { "ok" } else { "bad" };
        let _ = writeln!(
            o,
            "<div class=\"verdict {class}\">{} of {} assertions passed.</div>",
            report.assertions.len() - failed.len(),
            report.assertions.len()
        );
    }
    for why in &report.failed_reasons {
        let _ = writeln!(
            o,
            "<div class=\"verdict bad\">Failed run: {}.</div>",
            escape(why)
        );
    }
    if report.role == Role::Blast
        && report.failed_reasons.is_empty()
        && report.counts.messages_accepted == 0
    {
        let _ = writeln!(
            o,
            "<div class=\"verdict bad\">Failed run: the target accepted none of {} messages attempted.</div>",
            report.counts.messages_attempted
        );
    }
}

/// The "Key figures" cards: rates, counts, errors, p99 and CPU per message.
fn key_figures(o: &mut String, report: &Report) {
    let c = &report.counts;
    let _ = writeln!(o, "<h2>Key figures</h2><div class=\"cards\">");
    card(
        o,
        &format_rate(report.rates.messages_per_sec),
        "messages/s accepted",
    );
    card(o, &format_rate(report.rates.sessions_per_sec), "sessions/s");
    card(
        o,
        &format_bytes_rate(report.rates.bytes_per_sec),
        "message bytes",
    );
    card(o, &c.messages_attempted.to_string(), "messages attempted");
    card(o, &c.messages_accepted.to_string(), "accepted");
    card(
        o,
        &c.errors().to_string(),
        "errors (connection, timeout, protocol)",
    );
    if let Some(m) = report.latency.get("message") {
        card(o, &format_us(m.p99_us as f64), "p99 message");
    }
    card(
        o,
        &format!("{:.1} µs", report.cpu.cpu_us_per_message),
        "CPU per message",
    );
    let _ = writeln!(o, "</div>");
}

/// The "End to end" section (`bench --through`, `merge` with a sink's
/// report): the accounting as cards, the delivery latency, the backlog chart.
fn e2e_section(o: &mut String, report: &Report) -> Result<(), HtmlError> {
    let Some(e) = &report.e2e else {
        return Ok(());
    };
    let _ = writeln!(
        o,
        "<h2>End to end</h2><p class=\"sub\">Run {}: {}.</p><div class=\"cards\" id=\"e2e\">",
        escape(&e.run_id),
        escape(&e.clock_note)
    );
    for (v, label) in [
        (e.accepted, "accepted by the server"),
        (e.delivered, "delivered"),
        (e.lost, "lost"),
        (e.late, "late"),
        (e.duplicates, "duplicates"),
        (e.unexpected, "unexpected"),
        (e.untraced, "untraced"),
    ] {
        card(o, &v.to_string(), label);
    }
    if let Some(d) = report.latency.get("delivery") {
        card(o, &format_us(d.p50_us as f64), "p50 delivery");
        card(o, &format_us(d.p99_us as f64), "p99 delivery");
    }
    let _ = writeln!(o, "</div><div class=\"charts wide\">");
    figure(
        o,
        "chart-backlog",
        "Messages accepted so far minus delivered so far, per second (the drain included)",
        (1100, 340),
        |a| draw_backlog(a, report),
    )?;
    let _ = writeln!(o, "</div>");
    Ok(())
}

/// The "Open loop" section (open-loop runs only): the verdict on who was
/// the bottleneck and the table of due, sent, waiting and unsent messages.
fn open_loop_section(o: &mut String, report: &Report) {
    let Some(ol) = &report.open_loop else {
        return;
    };
    let (class, who) = match ol.bottleneck {
        Bottleneck::None => ("ok", "on schedule: every message went out on time on a free connection"),
        Bottleneck::Target => ("warn", "the target was the bottleneck: messages waited for a free connection, and the corrected latencies include the wait"),
        Bottleneck::Blaster => ("bad", "the blaster fell behind its own schedule"),
    };
    let _ = writeln!(
        o,
        "<h2>Open loop</h2><div class=\"verdict {class}\" id=\"open-loop\">Asked {} msg/s, sent {} msg/s: {who}.</div>",
        format_rate(ol.requested_per_sec),
        format_rate(ol.achieved_per_sec)
    );
    let _ = writeln!(
        o,
        "<table><tr><th>messages due</th><th>sent</th><th>waited for a connection</th><th>most waiting at once</th><th>never sent</th><th>busiest thread busy</th></tr>\
         <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}%</td></tr></table>",
        ol.messages_due, ol.messages_sent, ol.messages_waited, ol.max_backlog, ol.messages_unsent, ol.blaster_busy_pct
    );
}

/// The "Throughput over time" chart.
fn throughput_section(o: &mut String, report: &Report) -> Result<(), HtmlError> {
    let _ = writeln!(
        o,
        "<h2>Throughput over time</h2><div class=\"charts wide\">"
    );
    let tl_series = if report.timeline.is_empty() { 0 } else { 3 };
    figure(
        o,
        "chart-throughput",
        "Accepted messages, sessions and errors per second",
        (1100, 380),
        |a| draw_throughput(a, report).map(|()| tl_series),
    )?;
    let _ = writeln!(o, "</div>");
    Ok(())
}

/// The "Latency per phase" section (reports with latency only): the
/// percentile table, corrected and uncorrected, and the spectrum chart.
fn latency_section(o: &mut String, report: &Report) -> Result<(), HtmlError> {
    if report.latency.is_empty() {
        return Ok(());
    }
    let _ = writeln!(
        o,
        "<h2>Latency per phase</h2><table id=\"latency\"><tr><th>phase</th><th>count</th><th>min</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>"
    );
    for phase in Phase::ALL {
        if let Some(s) = report.latency.get(phase.as_str()) {
            latency_row(o, phase.as_str(), s);
        }
        if let Some(s) = report.latency_uncorrected.get(phase.as_str()) {
            latency_row(o, &format!("{} (uncorrected)", phase.as_str()), s);
        }
    }
    if let Some(s) = &report.schedule_lag {
        latency_row(o, "schedule lag", s);
    }
    if let Some(s) = report.latency.get("delivery") {
        latency_row(o, "delivery", s);
    }
    let _ = writeln!(o, "</table><div class=\"charts wide\">");
    let spectra = Phase::ALL
        .iter()
        .filter(|p| {
            report
                .latency
                .get(p.as_str())
                .is_some_and(|s| !spectrum(s).is_empty())
        })
        .count();
    figure(
        o,
        "chart-spectrum",
        "Latency by percentile (HdrHistogram spectrum; x axis 1/(1-p))",
        (1100, 480),
        |a| draw_spectrum(a, report).map(|()| spectra),
    )?;
    let _ = writeln!(o, "</div>");
    Ok(())
}

/// The "Latency over time" section (phases with data over time only): one
/// chart per phase.
fn latency_over_time_section(o: &mut String, report: &Report) -> Result<(), HtmlError> {
    let over_time = phases_over_time(report);
    if over_time.is_empty() {
        return Ok(());
    }
    let _ = writeln!(
        o,
        "<h2>Latency over time</h2><p class=\"sub\">p50, p90, p99 and max of each second (corrected figures).</p><div class=\"charts\">"
    );
    for phase in over_time {
        figure(
            o,
            &format!("chart-over-time-{}", phase.as_str()),
            &format!("{} per second", phase.as_str()),
            (560, 300),
            |a| draw_latency_over_time(a, report, phase),
        )?;
    }
    let _ = writeln!(o, "</div>");
    Ok(())
}

/// The "Outcomes and reply codes" section: the outcomes chart beside the
/// outcome table and the reply-code table.
fn outcomes_section(o: &mut String, report: &Report) -> Result<(), HtmlError> {
    let _ = writeln!(o, "<h2>Outcomes and reply codes</h2><div class=\"charts\">");
    figure(
        o,
        "chart-outcomes",
        "How each attempted message ended",
        (560, 300),
        |a| draw_outcomes(a, report),
    )?;
    let _ = write!(o, "<div>");
    outcomes_table(o, report);
    failures_table(o, report);
    reply_codes_table(o, report);
    let _ = writeln!(o, "</div></div>");
    Ok(())
}

/// The outcome table: each outcome's count and share of the attempted
/// messages, then the session, TLS, recipient, byte and verify counts.
fn outcomes_table(o: &mut String, report: &Report) {
    let c = &report.counts;
    let _ = writeln!(
        o,
        "<table id=\"outcomes\"><tr><th>outcome</th><th>count</th><th>%</th></tr>"
    );
    let pct = |n: u64| {
        if c.messages_attempted > 0 {
            100.0 * n as f64 / c.messages_attempted as f64
        } else {
            0.0
        }
    };
    for (name, n) in [
        ("attempted", c.messages_attempted),
        ("accepted", c.messages_accepted),
        ("tempfailed", c.messages_tempfailed),
        ("rejected", c.messages_rejected),
        ("connection errors", c.connection_errors),
        ("timeouts", c.timeouts),
        ("protocol errors", c.protocol_errors),
    ] {
        let _ = writeln!(
            o,
            "<tr><td>{name}</td><td>{n}</td><td>{:.2}%</td></tr>",
            pct(n)
        );
    }
    for (name, n) in [
        ("sessions", c.sessions),
        ("TLS sessions", c.tls_sessions),
        ("TLS resumed", c.tls_resumed),
        (
            "connections without a session",
            c.connections_without_session,
        ),
        ("recipients", c.recipients),
        ("bytes", c.bytes),
        ("verified ok", c.verify_ok),
        ("verified corrupt", c.verify_corrupt),
    ] {
        let _ = writeln!(o, "<tr><td>{name}</td><td>{n}</td><td></td></tr>");
    }
    let _ = writeln!(o, "</table>");
}

/// The most frequent failures with their counts (reports with failures
/// only).
fn failures_table(o: &mut String, report: &Report) {
    if report.failures.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "<table id=\"failures\"><tr><th>failure (most frequent)</th><th>count</th></tr>"
    );
    for f in &report.failures {
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td></tr>",
            escape(&f.reason),
            f.count
        );
    }
    let _ = writeln!(o, "</table>");
}

/// The reply-code table (reports with reply codes only): each command's
/// replies and their counts.
fn reply_codes_table(o: &mut String, report: &Report) {
    if report.reply_codes.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "<table id=\"reply-codes\"><tr><th>command</th><th>reply</th><th>count</th></tr>"
    );
    for (cmd, codes) in &report.reply_codes {
        for (code, n) in codes {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{n}</td></tr>",
                escape(cmd),
                escape(code)
            );
        }
    }
    let _ = writeln!(o, "</table>");
}

/// The "Assertions" table (reports with assertions only): each expression,
/// pass or FAIL, the measured value and the threshold, with their units.
fn assertions_section(o: &mut String, report: &Report) {
    if report.assertions.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "<h2>Assertions</h2><table id=\"assertions\"><tr><th>assertion</th><th>result</th><th>measured</th><th>threshold</th></tr>"
    );
    for a in &report.assertions {
        let parsed = parse_assertion(&a.expr).ok();
        let measured = match (a.value, &parsed) {
            (None, _) => "no data".to_string(),
            (Some(v), Some(p)) => p.format_value(v),
            (Some(v), None) => format!("{v}"),
        };
        let threshold = parsed.map(|p| p.format_threshold()).unwrap_or_default();
        let (class, word) = if a.ok {
            ("pass", "pass")
        } else {
            ("fail", "FAIL")
        };
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td class=\"{class}\">{word}</td><td>{}</td><td>{}</td></tr>",
            escape(&a.expr),
            escape(&measured),
            escape(&threshold)
        );
    }
    let _ = writeln!(o, "</table>");
}

/// The "Host and configuration" section: the host table with CPU time, then
/// the report's config as pretty-printed JSON.
fn host_and_config_section(o: &mut String, report: &Report) {
    let h = &report.host;
    let _ = writeln!(
        o,
        "<h2>Host and configuration</h2><table id=\"host\">\
         <tr><td>host</td><td>{}</td></tr><tr><td>CPU</td><td>{} ({} cores)</td></tr>\
         <tr><td>kernel</td><td>{}</td></tr><tr><td>CPU time</td><td>user {:.2} s, system {:.2} s; {:.1} µs per session, {:.1} µs per message</td></tr></table>",
        escape(&h.hostname),
        escape(&h.cpu_model),
        h.cores,
        escape(&h.kernel),
        report.cpu.user_secs,
        report.cpu.sys_secs,
        report.cpu.cpu_us_per_session,
        report.cpu.cpu_us_per_message
    );
    let config = serde_json::to_string_pretty(&report.config).unwrap_or_default();
    let _ = writeln!(o, "<pre id=\"config\">{}</pre>", escape(&config));
}

/// Writes the page of `report` to `path`.
pub fn write_html(report: &Report, path: &Path) -> Result<(), HtmlError> {
    let page = html_string(report)?;
    std::fs::write(path, page).map_err(|source| HtmlError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::report::tests::sample_blast_report;

    #[test]
    fn the_page_has_every_section_and_fetches_nothing() {
        let mut r = sample_blast_report();
        r.evaluate_assertions(
            &crate::stats::parse_assertions(&["errors == 0", "p99(message) < 1ms"]).unwrap(),
        );
        r.valid = false;
        r.invalid_reasons = vec!["the blaster <fell> behind".into()];
        let page = html_string(&r).unwrap();
        for id in [
            "validity",
            "chart-throughput",
            "latency",
            "chart-spectrum",
            "chart-outcomes",
            "outcomes",
            "reply-codes",
            "assertions",
            "host",
            "config",
        ] {
            assert!(page.contains(&format!("id=\"{id}\"")), "{id} missing");
        }
        assert!(page.contains("the blaster &lt;fell&gt; behind"), "escaped");
        assert!(page.contains("<td class=\"fail\">FAIL</td>"));
        assert!(page.contains("&lt; 1.00ms"), "threshold with its unit");
        assert_eq!(page.matches("<svg").count(), page.matches("</svg>").count());
        // The SVG namespace is a name, not an address that is fetched.
        let fetchable = page.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
        for fetch in ["src=", "href=\"http", "http:", "https:", "@import", "url("] {
            assert!(
                !fetchable.contains(fetch),
                "the page fetches nothing: {fetch}"
            );
        }
    }

    #[test]
    fn charts_without_data_become_a_sentence() {
        let mut r = sample_blast_report();
        r.timeline.clear();
        r.latency.clear();
        let page = html_string(&r).unwrap();
        assert!(page.contains("<p class=\"none\" id=\"chart-throughput\">"));
        assert!(!page.contains("id=\"chart-spectrum\""));
        assert!(page.contains("id=\"chart-outcomes\" data-series=\"2\""));
    }
}
