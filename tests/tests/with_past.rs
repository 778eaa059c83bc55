//! KV-cache decoding on the Optimum with-past fixture: a 7-token prompt with an empty past,
//! then 8 greedy steps that feed our own `present.*` back as `past_key_values.*`. Every
//! step's logits must match ONNX Runtime's step goldens, the chosen tokens must be ORT's,
//! and each step must agree with the full 15-token sequence run in one call.

use patch_runtime::{interp, Tensor};
use patch_tests::{argmax_last, fixture_dir, import_fixture, max_abs_diff, read_case};

const TOLERANCE: f32 = 1e-4;

/// Row `pos` of a `[1, S, V]` logits tensor, as a `[1, 1, V]` tensor.
fn logits_at(t: &Tensor, pos: usize) -> Tensor {
    let v = t.shape()[2];
    let row = t.as_slice::<f32>().unwrap()[pos * v..(pos + 1) * v].to_vec();
    Tensor::from_vec(vec![1, 1, v], row).unwrap()
}

#[test]
fn greedy_decoding_through_the_cache_matches_the_full_sequence() {
    let name = "llama_optimum_with_past";
    let graph = import_fixture(name);
    let cases = fixture_dir(name).join("cases");
    let full = read_case(&cases.join("greedy8_full"));
    let full_inputs: Vec<Tensor> = full.inputs.iter().map(|(_, t)| t.clone()).collect();
    let full_out = interp::run(&graph, &full_inputs).unwrap();
    assert!(max_abs_diff(&full_out[0], &full.outputs[0].1) <= TOLERANCE);

    // Step 0: the prompt with an empty past, exactly as the golden feeds it.
    let step0 = read_case(&cases.join("greedy8/step_0"));
    let inputs: Vec<Tensor> = step0.inputs.iter().map(|(_, t)| t.clone()).collect();
    let mut outputs = interp::run(&graph, &inputs).unwrap();
    let prompt_len = inputs[0].shape()[1];
    let mut token = *argmax_last(&outputs[0]).last().unwrap() as i64;

    for step in 1..=8 {
        let golden = read_case(&cases.join(format!("greedy8/step_{step}")));
        let want_token = golden.inputs[0].1.to_i64_vec().unwrap()[0];
        assert_eq!(
            token, want_token,
            "step {step}: greedy token differs from ONNX Runtime"
        );
        let total = prompt_len + step;
        let mut step_inputs = vec![
            Tensor::from_vec(vec![1, 1], vec![token]).unwrap(),
            Tensor::from_vec(vec![1, total], vec![1i64; total]).unwrap(),
            Tensor::from_vec(vec![1, 1], vec![(total - 1) as i64]).unwrap(),
        ];
        // Our own presents become the past.
        step_inputs.extend(outputs[1..].iter().cloned());
        outputs = interp::run(&graph, &step_inputs).unwrap();
        let err_golden = max_abs_diff(&outputs[0], &golden.outputs[0].1);
        let err_full = max_abs_diff(&outputs[0], &logits_at(&full_out[0], total - 1));
        println!("step {step}: token {token:>3}  vs ORT step {err_golden:.3e}  vs full sequence {err_full:.3e}");
        assert!(err_golden <= TOLERANCE, "step {step}: {err_golden} vs ORT");
        assert!(
            err_full <= TOLERANCE,
            "step {step}: {err_full} vs full sequence"
        );
        token = *argmax_last(&outputs[0]).last().unwrap() as i64;
    }
    // After the last step the cache holds the whole sequence: it equals the full run's.
    for (i, present) in outputs[1..].iter().enumerate() {
        let err = max_abs_diff(present, &full_out[1 + i]);
        assert!(err <= TOLERANCE, "present {i}: {err} vs full sequence");
    }
}
