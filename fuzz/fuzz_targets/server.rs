//! cargo-fuzz target for the SMTP server session (`cargo +nightly fuzz
//! run server`): one config byte, four seed bytes, then the client's bytes.
//!
//! The invariants are checked in `tests/fuzzing/server.rs` (see its module
//! doc), shared with the stable bounded run in `tests/fuzz_core.rs`; they
//! are test code, not part of the smtpstorm library.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzzing/mod.rs"]
mod fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::server::check(data);
});
