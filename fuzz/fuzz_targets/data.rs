//! cargo-fuzz target for the DATA scanner (`cargo +nightly fuzz run
//! data`): one policy byte, four chunking-seed bytes, then a body.
//!
//! The invariants are checked in `tests/fuzzing/data.rs` (see its module
//! doc), shared with the stable bounded run in `tests/fuzz_core.rs`; they
//! are test code, not part of the smtpstorm library.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzzing/mod.rs"]
mod fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::data::check(data);
});
