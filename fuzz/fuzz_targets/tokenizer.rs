//! Prompt bytes -> the SmolLM2 tokenizer and chat template: encode, decode, stream, render.
//! The body is `patch_tests::fuzz::tokenizer`, which the regression test replays findings through.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| patch_tests::fuzz::tokenizer(data));
