//! The reference interpreter reproduces ONNX Runtime's outputs on every fixture and case:
//! max abs error ≤ 1e-4 on every output (logits and KV-cache presents) and identical argmax.

use patch_tests::{check_against_ort, import_fixture, FIXTURES};

fn check_fixture(name: &str) {
    check_against_ort(name, &import_fixture(name), "imported");
}

#[test]
fn llama_dynamo_op18_matches_onnx_runtime() {
    check_fixture(FIXTURES[0]);
}

#[test]
fn llama_torchscript_op17_matches_onnx_runtime() {
    check_fixture(FIXTURES[1]);
}

#[test]
fn llama_optimum_with_past_matches_onnx_runtime() {
    check_fixture(FIXTURES[2]);
}

#[test]
fn gpt2_matches_onnx_runtime() {
    check_fixture(FIXTURES[3]);
}

#[test]
fn qwen2_matches_onnx_runtime() {
    check_fixture(FIXTURES[4]);
}
