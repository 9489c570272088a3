//! Per-thread recorders, merge and reports.
