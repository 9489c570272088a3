//! The human summary printed at the end of a run (and by `smtpstorm
//! report`): the run's duration and host, rates, the open loop's verdict,
//! CPU time, the outcome table, the per-phase percentile table, assertions
//! and validity.
//!
//! Invariants: latencies are printed with a unit chosen per value (µs below
//! 1 ms, ms below 1 s, s above) by [`super::units::format_us`]; the text it
//! adds is plain ASCII apart from `µ` (strings from the report, such as the
//! host name and assertion expressions, are printed as they are), with no
//! colour codes, so it can be logged.

use std::io::{self, Write};

use super::recorder::Counts;
use super::report::{MergeCheck, Report, Role};
use super::units::{format_bytes_rate, format_rate, format_us};
use crate::smtp::Phase;

/// Writes the summary of `report`.
pub fn write_summary<W: Write>(report: &Report, out: &mut W) -> io::Result<()> {
    write_run_lines(report, out)?;
    writeln!(out)?;
    write_outcome_table(&report.counts, out)?;
    write_latency_table(report, out)?;
    write_trace(report, out)?;
    write_failures(report, out)?;
    write_assertions(report, out)?;
    write_invalid_reasons(report, out)?;
    write_failed_reasons(report, out)
}

/// The lines about the run as a whole: version, role, duration and host;
/// rates; the open loop's verdict (open-loop runs only); CPU time.
fn write_run_lines<W: Write>(report: &Report, out: &mut W) -> io::Result<()> {
    let role = match report.role {
        Role::Blast => "blast",
        Role::Sink => "sink",
    };
    writeln!(
        out,
        "smtpstorm {} {role}: {:.2}s on {} ({} cores)",
        report.version, report.duration_secs, report.host.hostname, report.host.cores
    )?;
    write_what_ran(&report.config, out)?;
    writeln!(
        out,
        "rates: {} msg/s, {} sessions/s, {}",
        format_rate(report.rates.messages_per_sec),
        format_rate(report.rates.sessions_per_sec),
        format_bytes_rate(report.rates.bytes_per_sec)
    )?;
    if let Some(o) = &report.open_loop {
        let who = match o.bottleneck {
            super::report::Bottleneck::None => "on schedule",
            super::report::Bottleneck::Target => "the target was the bottleneck",
            super::report::Bottleneck::Blaster => "the blaster fell behind",
        };
        writeln!(
            out,
            "open loop: asked {} msg/s, sent {} msg/s ({} of {} due; {} waited for a connection, at most {} at once; {} not sent): {who}",
            format_rate(o.requested_per_sec),
            format_rate(o.achieved_per_sec),
            o.messages_sent,
            o.messages_due,
            o.messages_waited,
            o.max_backlog,
            o.messages_unsent,
        )?;
        write_stage_rates(report, out)?;
    }
    let late = report
        .config
        .get("start_late_secs")
        .and_then(|v| v.as_f64());
    if let Some(late) = late.filter(|l| *l > 0.0) {
        writeln!(
            out,
            "started {late:.3}s after --start-at (it had already passed)"
        )?;
    }
    if let Some(m) = &report.merge {
        write_merge_line(m, out)?;
    }
    writeln!(
        out,
        "cpu: user {:.2}s, sys {:.2}s, {:.1}µs/session, {:.1}µs/message",
        report.cpu.user_secs,
        report.cpu.sys_secs,
        report.cpu.cpu_us_per_session,
        report.cpu.cpu_us_per_message
    )?;
    write_tls_line(&report.counts, out)
}

/// What the TLS handshakes negotiated, when there were any: each suite and
/// group with its count, most frequent first, and how many resumed.
fn write_tls_line<W: Write>(c: &Counts, out: &mut W) -> io::Result<()> {
    let entries = c.tls_negotiated.entries();
    if entries.is_empty() {
        return Ok(());
    }
    let pairs: Vec<String> = entries
        .iter()
        .map(|(suite, group, n)| format!("{suite} {group} ({n})"))
        .collect();
    writeln!(
        out,
        "tls: {}; {} of {} resumed",
        pairs.join(", "),
        c.tls_resumed,
        c.tls_sessions
    )
}

/// What ran, from the configuration the report echoes: the backend, the
/// threads and the CPUs they were pinned to, the target or the listeners,
/// and how TLS was asked for. (The suite a handshake negotiated is another
/// line's job, once reports carry it.) Nothing is printed for a report
/// whose configuration says none of it (older reports, merges of them).
fn write_what_ran<W: Write>(config: &serde_json::Value, out: &mut W) -> io::Result<()> {
    let text = |k: &str| config.get(k).and_then(|v| v.as_str());
    let on = |k: &str| config.get(k).and_then(|v| v.as_bool()) == Some(true);
    let mut parts = Vec::new();
    if let Some(io) = text("io") {
        parts.push(format!("io {io}"));
    }
    if let Some(n) = config.get("threads").and_then(|v| v.as_u64()) {
        let cpus: Vec<String> = config
            .get("cpus")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_u64())
                    .map(|c| c.to_string())
                    .collect()
            })
            .unwrap_or_default();
        let plural = if n == 1 { "" } else { "s" };
        if cpus.is_empty() {
            parts.push(format!("{n} thread{plural}"));
        } else {
            parts.push(format!("{n} thread{plural} on CPUs {}", cpus.join(",")));
        }
    }
    if let Some(t) = text("target") {
        parts.push(format!("target {t}"));
    }
    for (key, what) in [("listen", "listening on"), ("tls_listen", "TLS on")] {
        let addrs: Vec<&str> = config
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        if !addrs.is_empty() {
            parts.push(format!("{what} {}", addrs.join(", ")));
        }
    }
    if on("tls") {
        parts.push("implicit TLS".into());
    } else if on("starttls") && config.get("target").is_some() {
        parts.push("STARTTLS".into());
    }
    if on("lmtp") {
        parts.push("LMTP".into());
    }
    if parts.is_empty() {
        return Ok(());
    }
    writeln!(out, "ran: {}", parts.join(", "))
}

/// What `merge` found about its inputs: one line, complete or not.
fn write_merge_line<W: Write>(m: &MergeCheck, out: &mut W) -> io::Result<()> {
    if m.partial || !m.problems.is_empty() {
        return writeln!(
            out,
            "merge: PARTIAL, {} of {} reports added: {}",
            m.merged,
            m.inputs,
            m.problems.join("; ")
        );
    }
    let set = match m.instances {
        Some(n) => format!("instances 0..{} of {n}, each once", n.saturating_sub(1)),
        None => "independent runs (no --instance)".to_string(),
    };
    writeln!(
        out,
        "merge: {} reports, {set}, one configuration, started within {:.3}s (--max-skew {}s)",
        m.merged, m.start_skew_secs, m.max_skew_secs
    )
}

/// The outcome table: each outcome's count and share of the attempted
/// messages, then sessions, TLS, recipients and bytes (TLS resumption and
/// verification only when there were any).
fn write_outcome_table<W: Write>(c: &Counts, out: &mut W) -> io::Result<()> {
    let pct = |n: u64| {
        if c.messages_attempted > 0 {
            100.0 * n as f64 / c.messages_attempted as f64
        } else {
            0.0
        }
    };
    writeln!(out, "{:<20} {:>12} {:>8}", "outcome", "count", "%")?;
    for (name, n) in [
        ("attempted", c.messages_attempted),
        ("accepted", c.messages_accepted),
        ("tempfailed", c.messages_tempfailed),
        ("rejected", c.messages_rejected),
        ("connection errors", c.connection_errors),
        ("timeouts", c.timeouts),
        ("protocol errors", c.protocol_errors),
    ] {
        writeln!(out, "{name:<20} {n:>12} {:>7.2}%", pct(n))?;
    }
    if c.connections_without_session > 0 {
        writeln!(
            out,
            "{:<20} {:>12}",
            "no session", c.connections_without_session
        )?;
    }
    writeln!(out, "{:<20} {:>12}", "sessions", c.sessions)?;
    writeln!(out, "{:<20} {:>12}", "tls sessions", c.tls_sessions)?;
    if c.tls_resumed > 0 {
        writeln!(out, "{:<20} {:>12}", "tls resumed", c.tls_resumed)?;
    }
    writeln!(out, "{:<20} {:>12}", "recipients", c.recipients)?;
    writeln!(out, "{:<20} {:>12}", "bytes", c.bytes)?;
    if c.verify_ok + c.verify_corrupt > 0 {
        writeln!(out, "{:<20} {:>12}", "verified ok", c.verify_ok)?;
        writeln!(out, "{:<20} {:>12}", "verified corrupt", c.verify_corrupt)?;
    }
    Ok(())
}

/// The per-phase percentile table (reports with latency only), preceded by
/// a blank line: each phase corrected, then uncorrected, then schedule lag.
fn write_latency_table<W: Write>(report: &Report, out: &mut W) -> io::Result<()> {
    if report.latency.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<22} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency", "count", "p50", "p90", "p99", "p99.9", "max"
    )?;
    let mut rows: Vec<(String, &super::report::LatencySummary)> = Vec::new();
    for phase in Phase::ALL {
        if let Some(s) = report.latency.get(phase.as_str()) {
            rows.push((phase.as_str().to_string(), s));
        }
        if let Some(s) = report.latency_uncorrected.get(phase.as_str()) {
            rows.push((format!("{} (uncorrected)", phase.as_str()), s));
        }
    }
    if let Some(s) = &report.schedule_lag {
        rows.push(("schedule lag".to_string(), s));
    }
    if let Some(s) = report.latency.get("delivery") {
        rows.push(("delivery".to_string(), s));
    }
    for (name, s) in rows {
        writeln!(
            out,
            "{name:<22} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            s.count,
            format_us(s.p50_us as f64),
            format_us(s.p90_us as f64),
            format_us(s.p99_us as f64),
            format_us(s.p999_us as f64),
            format_us(s.max_us as f64)
        )?;
    }
    Ok(())
}

/// `--trace` and end to end, preceded by a blank line: the blaster's
/// accepted count, the sink's deliveries per run id, the `e2e` accounting.
fn write_trace<W: Write>(report: &Report, out: &mut W) -> io::Result<()> {
    let Some(t) = &report.trace else {
        return Ok(());
    };
    writeln!(out)?;
    if let (Some(run), Some(n)) = (&t.run_id, t.accepted) {
        writeln!(out, "trace: run {run}, {n} traced messages accepted")?;
    }
    for r in &t.runs {
        writeln!(
            out,
            "trace: run {}: {} delivered ({} distinct, {} duplicates, {} recipients), delivery p50 {} p99 {}",
            r.run_id,
            r.messages,
            r.delivered,
            r.duplicates,
            r.recipients,
            format_us(r.delivery.p50_us as f64),
            format_us(r.delivery.p99_us as f64)
        )?;
    }
    if let Some(u) = t.untraced {
        writeln!(out, "trace: {u} messages untraced")?;
    }
    if let Some(e) = &report.e2e {
        writeln!(
            out,
            "end to end: {} accepted, {} delivered, {} lost, {} late, {} duplicates, {} unexpected, {} untraced (drain {:.1}s)",
            e.accepted, e.delivered, e.lost, e.late, e.duplicates, e.unexpected, e.untraced, e.drain_secs
        )?;
        if !e.lost_numbers.is_empty() {
            let shown: Vec<String> = e.lost_numbers.iter().take(10).map(u64::to_string).collect();
            writeln!(
                out,
                "end to end: lost {}{}",
                shown.join(", "),
                if e.lost > 10 { ", ..." } else { "" }
            )?;
        }
        let peak = report.timeline.iter().filter_map(|p| p.backlog).max();
        if let Some(peak) = peak {
            writeln!(out, "end to end: backlog peaked at {peak} messages")?;
        }
        writeln!(out, "end to end: {}", e.clock_note)?;
    }
    Ok(())
}

/// One line per assertion (reports with assertions only), preceded by a
/// blank line: ok or FAIL, the expression and the measured value.
fn write_assertions<W: Write>(report: &Report, out: &mut W) -> io::Result<()> {
    if report.assertions.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    for a in &report.assertions {
        let value = a
            .value
            .map_or_else(|| "no data".to_string(), |v| format!("{v:.3}"));
        writeln!(
            out,
            "assert {:<4} {}  (value {value})",
            if a.ok { "ok" } else { "FAIL" },
            a.expr
        )?;
    }
    Ok(())
}

/// One `INVALID RUN:` line per reason (invalid runs only), preceded by a
/// blank line.
fn write_invalid_reasons<W: Write>(report: &Report, out: &mut W) -> io::Result<()> {
    if report.valid {
        return Ok(());
    }
    writeln!(out)?;
    for why in &report.invalid_reasons {
        writeln!(out, "INVALID RUN: {why}")?;
    }
    Ok(())
}

/// One `FAILED RUN:` line per reason (failed runs only), preceded by a
/// blank line.
fn write_failed_reasons<W: Write>(report: &Report, out: &mut W) -> io::Result<()> {
    if report.failed_reasons.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    for why in &report.failed_reasons {
        writeln!(out, "FAILED RUN: {why}")?;
    }
    Ok(())
}

/// The most frequent reasons messages and connections failed (reports
/// with failures only), preceded by a blank line.
fn write_failures<W: Write>(report: &Report, out: &mut W) -> io::Result<()> {
    if report.failures.is_empty() {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(out, "{:<12} failure (most frequent)", "count")?;
    for f in &report.failures {
        writeln!(out, "{:<12} {}", f.count, f.reason)?;
    }
    Ok(())
}

/// With `--stages`: each second's requested and achieved rate (at most
/// 30 seconds shown, evenly spaced, 6 to a line).
fn write_stage_rates(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    if report.config.get("stages").is_none_or(|s| s.is_null()) {
        return Ok(());
    }
    let points: Vec<_> = report
        .timeline
        .iter()
        .filter(|p| p.requested.is_some())
        .collect();
    if points.is_empty() {
        return Ok(());
    }
    let every = points.len().div_ceil(30);
    writeln!(out, "stages, messages/s per second (requested/achieved):")?;
    let cells: Vec<String> = points
        .iter()
        .step_by(every)
        .map(|p| {
            format!(
                "{:>4}s {}/{}",
                p.t,
                format_rate(p.requested.unwrap_or(0.0)),
                format_rate(p.achieved.unwrap_or(0) as f64)
            )
        })
        .collect();
    for line in cells.chunks(6) {
        writeln!(out, "  {}", line.join("   "))?;
    }
    Ok(())
}

#[cfg(test)]
mod what_ran_tests {
    use super::write_what_ran;

    fn line(config: serde_json::Value) -> String {
        let mut out = Vec::new();
        write_what_ran(&config, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_first_lines_say_which_backend_ran_on_which_cpus_against_what() {
        let l = line(serde_json::json!({
            "io": "uring", "threads": 2, "cpus": [0, 1],
            "target": "unix:/run/dovecot/lmtp", "tls": false, "starttls": true, "lmtp": true,
        }));
        assert_eq!(
            l,
            "ran: io uring, 2 threads on CPUs 0,1, target unix:/run/dovecot/lmtp, STARTTLS, LMTP\n"
        );
        let l = line(serde_json::json!({
            "io": "epoll", "threads": 1, "listen": ["127.0.0.1:2525", "unix:/tmp/s.sock"],
            "tls_listen": [], "starttls": true,
        }));
        assert_eq!(
            l,
            "ran: io epoll, 1 thread, listening on 127.0.0.1:2525, unix:/tmp/s.sock\n"
        );
        assert_eq!(line(serde_json::json!({"rate": 5})), "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::report::tests::sample_blast_report;

    #[test]
    fn summary_lists_rates_outcomes_and_phases() {
        let mut r = sample_blast_report();
        r.evaluate_assertions(&[crate::stats::assert::parse("errors == 0").unwrap()]);
        r.valid = false;
        r.invalid_reasons = vec!["schedule fell behind by 2.0s".into()];
        let mut buf = Vec::new();
        write_summary(&r, &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(
            text.contains("rates: 100.0 msg/s, 10.0 sessions/s"),
            "{text}"
        );
        assert!(
            text.contains("accepted                     1000   99.90%"),
            "{text}"
        );
        let msg = text.lines().find(|l| l.starts_with("message ")).unwrap();
        assert!(msg.contains("1000") && msg.contains("ms"), "{msg}");
        assert!(text.contains("message (uncorrected)"));
        assert!(text.contains("schedule lag"));
        assert!(text.contains("assert ok   errors == 0"));
        assert!(text.contains("INVALID RUN: schedule fell behind"));
        assert!(!text.contains("tls:"), "no TLS, no TLS line: {text}");
    }

    #[test]
    fn the_run_lines_say_what_tls_negotiated_and_the_json_counts_it() {
        let mut r = sample_blast_report();
        // TLS13_AES_128_GCM_SHA256 (0x1301) and X25519 (0x001d), then
        // TLS13_AES_256_GCM_SHA384 (0x1302) with secp256r1 (0x0017).
        r.counts.tls_negotiated.add(0x1301, 0x001d, 7);
        r.counts.tls_negotiated.add(0x1302, 0x0017, 2);
        r.counts.tls_sessions = 9;
        r.counts.tls_resumed = 3;
        let mut buf = Vec::new();
        write_summary(&r, &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let line = text.lines().find(|l| l.starts_with("tls:")).unwrap();
        assert_eq!(
            line,
            "tls: TLS13_AES_128_GCM_SHA256 X25519 (7), TLS13_AES_256_GCM_SHA384 secp256r1 (2); 3 of 9 resumed"
        );
        assert!(text.find("cpu:").unwrap() < text.find("tls:").unwrap());
        let json = serde_json::to_value(r.counts).unwrap();
        assert_eq!(json["tls_negotiated"]["TLS13_AES_128_GCM_SHA256 X25519"], 7);
        let back: Counts = serde_json::from_value(json).unwrap();
        assert_eq!(back.tls_negotiated, r.counts.tls_negotiated);
        // Added up (merge) and subtracted (intervals) pair by pair.
        let mut twice = back;
        twice.add(&back);
        assert_eq!(twice.tls_negotiated.entries()[0].2, 14);
        assert_eq!(twice.delta_since(&back).tls_negotiated, back.tls_negotiated);
    }
}
