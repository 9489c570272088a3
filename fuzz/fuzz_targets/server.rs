//! cargo-fuzz target for the SMTP server session: `cargo +nightly fuzz run server`.
//!
//! The first input byte selects the configuration (LMTP, bare-LF policy,
//! PROXY, AUTH, STARTTLS, size limit), the next four seed the chunking and
//! fault-verdict PRNG, the rest is the client's byte stream. Invariants
//! (checked in `smtpstorm::smtp::server::fuzzing`, shared with the stable
//! `fuzz_server_stable` test): no panic, every reply line starts with three
//! digits and a space or dash and ends in CRLF, output bounded by 64x input +
//! 8 KiB, buffered input bounded, message hooks balanced, and without faults
//! the result is the same whether the input comes chunked or whole.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smtpstorm::smtp::server::fuzzing::fuzz_one(data);
});
