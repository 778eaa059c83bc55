//! IR text -> parse -> print -> parse again: the same text.
//! The body is `patch_tests::fuzz::ir_text`, which the regression test replays findings through.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| patch_tests::fuzz::ir_text(data));
