//! cargo-fuzz target for reply parsing (`cargo +nightly fuzz run
//! reply`): four chunking-seed bytes, then a server's byte stream.
//!
//! The invariants are checked in `tests/fuzzing/reply.rs` (see its module
//! doc), shared with the stable bounded run in `tests/fuzz_core.rs`; they
//! are test code, not part of the smtpstorm library.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzzing/mod.rs"]
mod fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::reply::check(data);
});
