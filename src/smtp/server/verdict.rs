//! The reply a fault verdict gets: its enhanced status code and its text
//! (used by the session's command replies and by the body's final reply).

/// The enhanced code that goes with a fault verdict's reply code.
pub(super) fn enh_of(code: u16) -> &'static str {
    match code {
        421 => "4.3.2",
        452 => "4.3.1",
        400..=499 => "4.3.0",
        552 => "5.3.4",
        553 => "5.1.3",
        554 => "5.3.0",
        500..=599 => "5.7.1",
        _ => "2.0.0",
    }
}

/// The text of a fault verdict's reply.
pub(super) fn fault_text(code: u16) -> &'static str {
    if code < 500 {
        "Temporary failure, try again later"
    } else {
        "Rejected"
    }
}
