//! cargo-fuzz target for command parsing (`cargo +nightly fuzz run
//! wire`): the input is one command line without its CRLF.
//!
//! The invariants are checked in `tests/fuzzing/wire.rs` (see its module
//! doc), shared with the stable bounded run in `tests/fuzz_core.rs`; they
//! are test code, not part of the smtpstorm library.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzzing/mod.rs"]
mod fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::wire::check(data);
});
