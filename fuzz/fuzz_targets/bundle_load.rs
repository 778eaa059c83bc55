//! Bundle bytes -> decode (checksum off) -> inspect -> one forward step of one token.
//! The body is `patch_tests::fuzz::bundle_load`, which the regression test replays findings through.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| patch_tests::fuzz::bundle_load(data));
