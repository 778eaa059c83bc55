//! The reference interpreter reproduces ONNX Runtime's outputs on every fixture and case:
//! max abs error ≤ 1e-4 on every output (logits and KV-cache presents) and identical argmax.

use patch_runtime::interp;
use patch_tests::{
    argmax_last, fixture_dir, import_fixture, max_abs_diff, read_case, CASES, FIXTURES,
};

/// Tolerance on logits and presents against ONNX Runtime (f32 throughout).
const TOLERANCE: f32 = 1e-4;

fn check_fixture(name: &str) {
    let graph = import_fixture(name);
    for case in CASES {
        let dir = fixture_dir(name).join("cases").join(case);
        let golden = read_case(&dir);
        for ((want_name, _), (id, _)) in golden.inputs.iter().zip(graph.inputs()) {
            assert_eq!(
                want_name,
                &graph.value(*id).name,
                "{name}/{case}: input order"
            );
        }
        let inputs: Vec<_> = golden.inputs.iter().map(|(_, t)| t.clone()).collect();
        let outputs = interp::run(&graph, &inputs).unwrap_or_else(|e| panic!("{name}/{case}: {e}"));
        assert_eq!(
            outputs.len(),
            golden.outputs.len(),
            "{name}/{case}: output count"
        );
        for ((out_name, want), got) in golden.outputs.iter().zip(&outputs) {
            let err = max_abs_diff(got, want);
            println!("{name:<26} {case:<15} {out_name:<18} max_abs_err {err:.3e}");
            assert!(
                err <= TOLERANCE,
                "{name}/{case}/{out_name}: max abs error {err} > {TOLERANCE}"
            );
            if out_name == "logits" {
                assert_eq!(
                    argmax_last(got),
                    argmax_last(want),
                    "{name}/{case}: argmax differs"
                );
            }
        }
    }
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
