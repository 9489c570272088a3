//! Per-message bookkeeping: what the replies to one message's MAIL, RCPTs,
//! DATA or BDAT chunks and final reply said so far, and where its body is.

use std::time::Instant;

use super::super::Outcome;

/// Per-message transaction bookkeeping.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Txn {
    pub(super) finished: bool,
    pub(super) mail_ok: bool,
    pub(super) rcpt_replies: u32,
    pub(super) rcpt_ok: u32,
    pub(super) rcpt_temp_code: u16,
    pub(super) rcpt_perm_code: u16,
    /// A BDAT chunk was refused.
    pub(super) chunk_failed: bool,
    /// Next RCPT to send (without pipelining).
    pub(super) next_rcpt: usize,
    /// Offset of the next BDAT chunk in `header ++ body`.
    pub(super) bdat_off: usize,
    /// Final replies: first 2xx, first 4xx, first 5xx code.
    pub(super) final_ok_code: u16,
    pub(super) final_temp_code: u16,
    pub(super) final_perm_code: u16,
    /// The intended time of the message (open loop), for corrected latency.
    pub(super) intended: Option<Instant>,
    /// Start of the `body` phase: the 354, or the first BDAT byte written.
    pub(super) body_started: Option<Instant>,
    /// A BDAT chunk of the message was queued (its first byte's offset is
    /// in `ClientSession::bdat_starts` until written).
    pub(super) bdat_queued: bool,
    /// The `body` phase was reported.
    pub(super) body_reported: bool,
}

/// The outcome a 4xx (TempFailed) or 5xx (Rejected) reply class gives.
pub(super) fn outcome_of(class: u16) -> Outcome {
    if class == 4 {
        Outcome::TempFailed
    } else {
        Outcome::Rejected
    }
}
