//! ONNX bytes -> decode -> import (verified) -> text form and parameter count.
//! The body is `patch_tests::fuzz::onnx_import`, which the regression test replays findings through.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| patch_tests::fuzz::onnx_import(data));
