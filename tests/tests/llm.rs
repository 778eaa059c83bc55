//! The hybrid MatMul rewrite and the generation loop on the exporter fixtures, against their
//! ONNX Runtime goldens: rewritten graphs keep the outputs, the KV cache reproduces ORT's
//! greedy steps, the no-past path and perplexity agree with ORT's logits.

use patch_kernels::{TileShape, WeightDtype};
use patch_passes::dce::DeadCodeElimination;
use patch_passes::hybrid::HybridMatMulRewrite;
use patch_passes::PassManager;
use patch_runtime::llm::eval::{nll, perplexity};
use patch_runtime::llm::sampler::argmax;
use patch_runtime::ops::OpRegistry;
use patch_runtime::{interp, Tensor};
use patch_tests::{
    argmax_last, compile_fixture, fixture_dir, import_fixture, load_model, max_abs_diff, read_case,
    CASES, FIXTURES, WITH_PAST_FIXTURES,
};

fn rewritten(name: &str, dtype: WeightDtype) -> patch_runtime::Graph {
    let registry = OpRegistry::onnx();
    let mut g = import_fixture(name);
    let tile = TileShape::new(32, 16).unwrap();
    PassManager::new(&registry)
        .with_pass(HybridMatMulRewrite::dense(tile, dtype))
        .with_pass(DeadCodeElimination)
        .run(&mut g)
        .unwrap();
    g
}

fn hybrid_count(g: &patch_runtime::Graph) -> usize {
    g.nodes()
        .filter(|(_, n)| n.op_type == "HybridMatMul")
        .count()
}

#[test]
fn dense_rewrite_keeps_every_fixture_within_1e_4_of_onnx_runtime() {
    for name in FIXTURES {
        let g = rewritten(name, WeightDtype::F32);
        assert!(hybrid_count(&g) > 0, "{name}: nothing was rewritten");
        for case in ["seq7", "batch2_leftpad"] {
            let c = read_case(&fixture_dir(name).join("cases").join(case));
            let inputs: Vec<Tensor> = c.inputs.iter().map(|(_, t)| t.clone()).collect();
            let got = interp::run(&g, &inputs).unwrap();
            let err = max_abs_diff(&got[0], &c.outputs[0].1);
            println!("{name}/{case}: f32 hybrid vs ORT max abs {err:.2e}");
            assert!(err <= 1e-4, "{name}/{case}: {err}");
            assert_eq!(argmax_last(&got[0]), argmax_last(&c.outputs[0].1));
        }
    }
}

/// The fusion pipeline on rewritten graphs: the residual adds after the attention output and
/// MLP down projections fold into the hybrid MatMuls' epilogues (LLaMA layouts), and every
/// case stays within 1e-4 of ONNX Runtime.
#[test]
fn residual_epilogues_fold_and_keep_every_fixture_within_1e_4_of_onnx_runtime() {
    let registry = OpRegistry::onnx();
    for name in FIXTURES {
        let mut g = rewritten(name, WeightDtype::F32);
        let adds_before = g.nodes().filter(|(_, n)| n.op_type == "Add").count();
        let fuse = patch_passes::fuse::Fuse::new(Default::default());
        patch_passes::fusion_pipeline(&registry, fuse)
            .run(&mut g)
            .unwrap();
        let folded = g
            .nodes()
            .filter(|(_, n)| n.op_type == "HybridMatMul" && n.inputs.len() == 5)
            .count();
        let adds_after = g.nodes().filter(|(_, n)| n.op_type == "Add").count();
        println!("{name}: {folded} residual epilogues, Add nodes {adds_before} -> {adds_after}");
        // Two residual connections per layer, two layers. GPT-2's projections are Gemms on a
        // 2-D view whose Reshape back to 3-D sits between the product and the residual Add.
        let want = if name == "gpt2" { 0 } else { 4 };
        assert_eq!(folded, want, "{name}");
        for case in CASES {
            let c = read_case(&fixture_dir(name).join("cases").join(case));
            let inputs: Vec<Tensor> = c.inputs.iter().map(|(_, t)| t.clone()).collect();
            let got = interp::run(&g, &inputs).unwrap();
            let err = max_abs_diff(&got[0], &c.outputs[0].1);
            assert!(err <= 1e-4, "{name}/{case}: {err}");
            assert_eq!(argmax_last(&got[0]), argmax_last(&c.outputs[0].1));
        }
    }
}

/// Sibling products (Q/K/V, gate/up: one X, constant weights) run as one kernel dispatch and
/// give exactly what they give one by one.
#[test]
fn sibling_products_scheduled_together_give_identical_outputs() {
    for name in FIXTURES {
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let g = rewritten(name, dtype);
            let mut plan = interp::Plan::new(&g).unwrap();
            plan.set_sibling_groups(true);
            let groups = plan.sibling_groups();
            // LLaMA layouts: Q/K/V and gate/up in each of 2 layers. GPT-2 has one QKV Gemm and
            // nothing to group.
            let want = if name == "gpt2" { 0 } else { 4 };
            assert_eq!(groups, want, "{name}");
            for case in ["seq7", "seq64"] {
                let c = read_case(&fixture_dir(name).join("cases").join(case));
                let inputs: Vec<Tensor> = c.inputs.iter().map(|(_, t)| t.clone()).collect();
                let together = plan.run(&inputs).unwrap();
                plan.set_sibling_groups(false);
                let alone = plan.run(&inputs).unwrap();
                plan.set_sibling_groups(true);
                for (a, b) in together.iter().zip(&alone) {
                    assert_eq!(
                        a.as_slice::<f32>().ok(),
                        b.as_slice::<f32>().ok(),
                        "{name}/{case} {dtype:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_and_f16_weights_stay_close_to_onnx_runtime() {
    for name in FIXTURES {
        for dtype in [WeightDtype::Bf16, WeightDtype::F16] {
            let g = rewritten(name, dtype);
            let c = read_case(&fixture_dir(name).join("cases").join("seq7"));
            let inputs: Vec<Tensor> = c.inputs.iter().map(|(_, t)| t.clone()).collect();
            let got = interp::run(&g, &inputs).unwrap();
            let want = &c.outputs[0].1;
            let scale = want
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .fold(0f32, |a, v| a.max(v.abs()));
            let err = max_abs_diff(&got[0], want);
            println!("{name}: {dtype:?} weights vs ORT max abs {err:.2e} (max |logit| {scale:.2})");
            // Rounding the weights to 8 (bf16) or 11 (f16) significant bits.
            let bound = if dtype == WeightDtype::Bf16 {
                0.05
            } else {
                0.01
            };
            assert!(err <= bound * scale, "{name} {dtype:?}: {err} vs {scale}");
        }
    }
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    t.to_i64_vec()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

/// Every family exported with past (LLaMA, Qwen3, Mistral's sliding window, Gemma 2's
/// softcapping and Gemma 3's local/global layers, Phi-3), compiled by the default pipeline and
/// decoded through its KV cache, reproduces ONNX Runtime's greedy steps.
#[test]
fn kv_cache_generation_reproduces_onnx_runtime_greedy_steps() {
    for name in WITH_PAST_FIXTURES {
        kv_cache_generation_matches(name);
    }
}

fn kv_cache_generation_matches(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = compile_fixture(name, dir.path(), 256);
    let model = load_model(&path);
    assert!(model.has_kv_cache(), "{name}");
    assert_eq!(model.layers(), 2, "{name}");
    let greedy = fixture_dir(name).join("cases/greedy8");
    let mut cache = model.new_cache();
    let mut feed = ids_of(&read_case(&greedy.join("step_0")).inputs[0].1);
    // One position of one layer's keys, as the ORT goldens' past tensors (`[1, kv, t, d]`) hold
    // it: what the in-place cache must use up per step.
    let past = read_case(&greedy.join("step_1"));
    let (_, key) = past
        .inputs
        .iter()
        .find(|(n, _)| n == "past_key_values.0.key")
        .expect("a with-past case feeds the past keys");
    let position_bytes = key.shape()[1] * key.shape()[3] * 4;
    let mut room_before = 0;
    for step in 0..=8 {
        let c = read_case(&greedy.join(format!("step_{step}")));
        assert_eq!(ids_of(&c.inputs[0].1), feed, "step {step}: fed tokens");
        let logits = model.forward(&mut cache, &feed, 1).unwrap();
        let want = c.outputs[0].1.as_slice::<f32>().unwrap();
        let want_last = &want[want.len() - model.vocab()..];
        let err = logits
            .last()
            .iter()
            .zip(want_last)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{name} step {step}: last logits within {err:.2e} of ORT");
        assert!(
            err <= 1e-4,
            "{name} step {step}: last logits differ by {err}"
        );
        let next = argmax(logits.last());
        assert_eq!(
            next as usize,
            argmax_last(&c.outputs[0].1).pop().unwrap(),
            "{name} step {step}"
        );
        // The cache (re-laid out by `kv-layout`) grows in place: each step uses exactly one
        // position's room of the buffer sized at the start.
        let room = cache.room_in_place();
        if step > 0 {
            assert_eq!(
                room + position_bytes,
                room_before,
                "{name} step {step}: the cache was copied"
            );
        }
        room_before = room;
        feed = vec![next];
    }
    assert!(room_before > 0);
}

#[test]
fn no_past_forward_and_perplexity_agree_with_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = compile_fixture("llama_dynamo_op18", dir.path(), 256);
    let model = load_model(&path);
    assert!(!model.has_kv_cache());
    // Without a cache the layers are counted from the graph's attention ops.
    assert_eq!(model.layers(), 2);
    let c = read_case(&fixture_dir("llama_dynamo_op18").join("cases/seq64"));
    let ids = ids_of(&c.inputs[0].1);
    let want = c.outputs[0].1.as_slice::<f32>().unwrap();
    let v = model.vocab();
    // Prefix then one token at a time: the no-past path recomputes and returns the last rows.
    let mut cache = model.new_cache();
    let all = model.forward(&mut cache, &ids[..60], 60).unwrap();
    for step in 60..64 {
        let l = model.forward(&mut cache, &ids[step..step + 1], 1).unwrap();
        let err = l
            .last()
            .iter()
            .zip(&want[step * v..(step + 1) * v])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err <= 1e-4, "position {step}: {err}");
    }
    assert_eq!(cache.len(), 64);
    assert!((all.row(0)[0] - want[0]).abs() <= 1e-4);
    // One window of 64: the summed NLL equals the one computed from ORT's logits.
    let p = perplexity(&model, &ids, 64, |_, _| {}).unwrap();
    let want_nll: f64 = (0..63)
        .map(|i| nll(&want[i * v..(i + 1) * v], ids[i + 1]))
        .sum();
    assert_eq!(p.windows(), 1);
    assert_eq!(p.predicted, 63);
    assert!(
        (p.window_nll[0] - want_nll).abs() <= 1e-3,
        "{} vs {want_nll}",
        p.window_nll[0]
    );
}

#[test]
fn generation_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = compile_fixture("llama_optimum_with_past", dir.path(), 16);
    let model = load_model(&path);
    let mut cache = model.new_cache();
    let err = model.forward(&mut cache, &[3; 17], 1).unwrap_err();
    assert!(
        err.to_string().contains("exceed the model's context of 16"),
        "{err}"
    );
    let err = model.forward(&mut cache, &[600], 1).unwrap_err();
    assert!(
        err.to_string().contains("outside the vocabulary of 512"),
        "{err}"
    );
    let err = perplexity(&model, &[1, 2, 3], 8, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("fewer than one window"), "{err}");
    let err = perplexity(&model, &[1; 64], 32, |_, _| {}).unwrap_err();
    assert!(
        err.to_string().contains("longer than the model's context"),
        "{err}"
    );
}

/// Generation asks for the last positions' logits only: the LM head then runs on those rows,
/// and they equal the whole run's last rows (within the GEMV/GEMM rounding difference).
#[test]
fn the_lm_head_runs_on_the_kept_positions_only() {
    for name in FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let path = compile_fixture(name, dir.path(), 256);
        let registry = OpRegistry::onnx();
        let options = patch_runtime::bundle::LoadOptions::default();
        let graph = patch_runtime::bundle::load_bundle(&path, &registry, options)
            .unwrap()
            .contents
            .graph;
        let plan = interp::Plan::new(&graph).unwrap();
        println!("{name}: LM head cut {}", plan.cuts_logits());
        assert!(plan.cuts_logits(), "{name}");
        for case in ["seq7", "batch2_leftpad"] {
            let c = read_case(&fixture_dir(name).join("cases").join(case));
            let inputs = patch_tests::feed(&graph, &c);
            let whole = plan.run(&inputs).unwrap().remove(0);
            let [b, s, v] = whole.shape()[..] else {
                panic!("{name}: logits {:?}", whole.shape());
            };
            for keep in [1, 3] {
                let cut = plan
                    .run_last_positions(&inputs, &mut |_, _| {}, keep)
                    .unwrap();
                let want_rows = if plan.cuts_logits() { keep } else { s };
                assert_eq!(cut[0].shape(), &[b, want_rows, v], "{name}/{case}");
                let tail = whole.last_positions(want_rows).unwrap();
                let err = max_abs_diff(&cut[0], &tail);
                assert!(err <= 1e-4, "{name}/{case}: last {keep}: {err}");
                // The other outputs (the presents) are the whole run's.
                for (a, b) in cut.iter().zip(plan.run(&inputs).unwrap()).skip(1) {
                    assert_eq!(a.bytes(), b.bytes(), "{name}/{case}");
                }
            }
        }
    }
}

/// `patchrt run`'s path from text to text (plain prompt → ids → greedy generation → text) on
/// every family with past, against transformers' greedy tokens recorded by the fixture script
/// (`greedy8.generated_tokens`, which equal torch's argmax on the full sequence).
#[test]
fn text_generation_equals_transformers_greedy_tokens() {
    for name in WITH_PAST_FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let model = load_model(&compile_fixture(name, dir.path(), 256));
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir(name).join("fixture.json")).unwrap(),
        )
        .unwrap();
        let words = |key: &str| -> Vec<String> {
            meta["greedy8"][key]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| format!("w{}", t.as_u64().unwrap()))
                .collect()
        };
        let torch: Vec<u64> = meta["greedy8"]["torch_argmax_tokens_on_full_sequence"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        let want = words("generated_tokens");
        assert_eq!(
            want,
            torch[..8]
                .iter()
                .map(|t| format!("w{t}"))
                .collect::<Vec<_>>(),
            "{name}: the fixture's ORT and torch greedy tokens differ"
        );
        let prompt = words("prompt").join(" ");
        let mut streamed = String::new();
        let (text, g) = model
            .generate_text(&prompt, 8, Default::default(), |p| streamed.push_str(p))
            .unwrap();
        println!("{name}: {prompt:?} -> {text:?}");
        assert_eq!(text, want.join(" "), "{name}");
        assert_eq!(streamed, text, "{name}");
        assert_eq!(
            g.stop,
            patch_runtime::llm::generate::Stop::MaxTokens,
            "{name}"
        );
    }
}

/// The plan's options, which tools turn off to measure what each buys, change how a run is
/// done and never what it computes: a plan built with all of them off, and one switched off
/// after it was built, give the default plan's outputs exactly.
#[test]
fn plan_options_change_the_work_not_the_outputs() {
    let off = interp::PlanOptions {
        memory_plan: false,
        sibling_groups: false,
        cut_logit_rows: false,
    };
    for name in FIXTURES {
        let g = rewritten(name, WeightDtype::F32);
        let default = interp::Plan::new(&g).unwrap();
        let built_off = interp::Plan::with_options(&g, off).unwrap();
        let mut switched = interp::Plan::new(&g).unwrap();
        switched.set_options(off);
        for plan in [&built_off, &switched] {
            assert_eq!(plan.sibling_groups(), 0, "{name}");
            assert!(!plan.cuts_logits(), "{name}");
        }
        assert!(name == "gpt2" || default.sibling_groups() > 0, "{name}");
        let c = read_case(&fixture_dir(name).join("cases").join("seq7"));
        let inputs: Vec<Tensor> = c.inputs.iter().map(|(_, t)| t.clone()).collect();
        let want = default.run(&inputs).unwrap();
        for plan in [&built_off, &switched] {
            for (a, b) in want.iter().zip(&plan.run(&inputs).unwrap()) {
                assert_eq!(a.as_slice::<f32>().ok(), b.as_slice::<f32>().ok(), "{name}");
            }
        }
        switched.set_options(interp::PlanOptions::default());
        assert_eq!(
            switched.sibling_groups(),
            default.sibling_groups(),
            "{name}"
        );
        assert_eq!(switched.cuts_logits(), default.cuts_logits(), "{name}");
    }
}
