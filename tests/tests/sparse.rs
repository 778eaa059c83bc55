//! Sparse compiles on the exporter fixtures: calibration on text through the model's own
//! tokenizer, every mask method, the budget, the rewritten graph against a plain graph with the
//! same masked weights, determinism, and the errors that must come before any long work.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use patch_compiler::calibrate::CalibOptions;
use patch_compiler::pipeline::{self, CompileError, CompileOptions};
use patch_compiler::report::{Report, SparseReport};
use patch_kernels::{TileKind, TileShape};
use patch_passes::masks::{Allocation, Method};
use patch_runtime::bundle::{self, LoadOptions};
use patch_runtime::ops::hybrid::HybridMatMul;
use patch_runtime::ops::OpRegistry;
use patch_runtime::{interp, Graph, Tensor, ValueId};
use patch_tests::{fixture_dir, read_case, stage_fixture};

/// The fixture copied into `dir` with a word tokenizer and `words` words of calibration text.
fn setup(name: &str, dir: &Path, words: usize) -> (PathBuf, PathBuf) {
    let model = stage_fixture(name, dir);
    let text: Vec<String> = (0..words)
        .map(|i| format!("w{}", (i * 7919 + i / 3) % 500))
        .collect();
    let calib = dir.join("calib.txt");
    std::fs::write(&calib, text.join(" ")).unwrap();
    (model, calib)
}

fn options(model: &Path, out: &Path, calib: &Path, s: f64, method: Method) -> CompileOptions {
    CompileOptions {
        sparsity: s,
        tile: TileShape::new(16, 16).unwrap(),
        calib: CalibOptions {
            method,
            text: Some(calib.to_path_buf()),
            samples: 4,
            seq: 32,
            patch: patch_passes::masks::patch::PatchOptions {
                steps: 300,
                ..Default::default()
            },
            ..CalibOptions::default()
        },
        ..CompileOptions::new(model.to_path_buf(), out.to_path_buf())
    }
}

fn load(path: &Path) -> Graph {
    bundle::load_bundle(path, &OpRegistry::onnx(), LoadOptions::default())
        .unwrap()
        .contents
        .graph
}

/// The same graph with every HybridMatMul replaced by a plain MatMul over its unpacked
/// (masked) weight, followed by Adds of its bias and folded residual: the reference the sparse
/// kernels must reproduce. Rebuilt node by node so that the extra Adds sit in order.
fn unpacked_reference(g: &Graph) -> Graph {
    let registry = OpRegistry::onnx();
    let mut r = Graph::new(g.name.clone(), g.opset);
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    for (id, role) in g.inputs() {
        let v = g.value(*id);
        map.insert(
            *id,
            r.add_input(v.name.clone(), v.ty.clone(), *role).unwrap(),
        );
    }
    for (id, t) in g.consts() {
        map.insert(
            id,
            r.add_const(g.value(id).name.clone(), t.clone()).unwrap(),
        );
    }
    for (_, n) in g.nodes() {
        let inputs: Vec<Option<ValueId>> = n.inputs.iter().map(|i| i.map(|i| map[&i])).collect();
        let names: Vec<String> = n.outputs.iter().map(|o| g.value(*o).name.clone()).collect();
        let outs = if n.op_type == "HybridMatMul" {
            let op = HybridMatMul::from_attrs(&n.attrs).unwrap();
            let values = g.const_value(n.inputs[1].unwrap()).unwrap();
            let meta = g.const_value(n.inputs[2].unwrap()).unwrap();
            let w = op.weight(values, meta).unwrap().unpack_f32();
            let c = r
                .add_const(
                    format!("{}.unpacked", n.name),
                    Tensor::from_vec(vec![op.k, op.n], w).unwrap(),
                )
                .unwrap();
            let addends: Vec<ValueId> = inputs.iter().skip(3).flatten().copied().collect();
            let product_name = |last: bool, i: usize| {
                if last {
                    names[0].clone()
                } else {
                    format!("{}.ref{i}", names[0])
                }
            };
            let mut y = r
                .add_node(
                    &registry,
                    format!("{}.matmul", n.name),
                    "",
                    "MatMul",
                    Default::default(),
                    vec![inputs[0], Some(c)],
                    vec![product_name(addends.is_empty(), 0)],
                )
                .unwrap()[0];
            for (i, &a) in addends.iter().enumerate() {
                y = r
                    .add_node(
                        &registry,
                        format!("{}.add{i}", n.name),
                        "",
                        "Add",
                        Default::default(),
                        vec![Some(y), Some(a)],
                        vec![product_name(i + 1 == addends.len(), i + 1)],
                    )
                    .unwrap()[0];
            }
            vec![y]
        } else {
            r.add_node(
                &registry,
                n.name.clone(),
                &n.domain,
                &n.op_type,
                n.attrs.clone(),
                inputs,
                names,
            )
            .unwrap()
        };
        for (o, v) in n.outputs.iter().zip(outs) {
            map.insert(*o, v);
        }
    }
    r.set_outputs(
        g.outputs()
            .iter()
            .map(|(id, role)| (map[id], *role))
            .collect(),
    );
    r
}

/// The sparse part of the report stored in the bundle at `path`, read back typed.
fn sparse_report(path: &Path) -> SparseReport {
    let b = bundle::load_bundle(path, &OpRegistry::onnx(), LoadOptions::default()).unwrap();
    Report::from_json(&b.contents.compile_report_json)
        .expect("the stored report reads back")
        .sparse
        .expect("a sparse compile has a sparse report")
}

#[test]
fn every_method_meets_the_budget_and_the_kernels_match_the_masked_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = setup("llama_optimum_with_past", dir.path(), 400);
    let case = read_case(&fixture_dir("llama_optimum_with_past").join("cases/seq7"));
    for method in [
        Method::Magnitude,
        Method::Wanda,
        Method::SparseGpt,
        Method::Patch,
    ] {
        for s in [0.25, 0.5] {
            let out = dir.path().join(format!("{method}-{s}.patch"));
            let report = pipeline::compile(
                &options(&model, &out, &calib, s, method),
                &OpRegistry::onnx(),
            )
            .unwrap();
            let rep = sparse_report(&out);
            let achieved = rep.achieved_sparsity;
            assert!(
                (achieved - s).abs() <= 0.005 * s + 1e-9,
                "{method} at {s}: achieved {achieved}"
            );
            assert_eq!(rep.method, method.name());
            let g = load(&out);
            let mut sparse_tiles = 0;
            for (_, n) in g.nodes().filter(|(_, n)| n.op_type == "HybridMatMul") {
                let op = HybridMatMul::from_attrs(&n.attrs).unwrap();
                let sparse = op
                    .map
                    .kinds()
                    .iter()
                    .filter(|k| **k == TileKind::Sparse24)
                    .count();
                if op.n == 512 {
                    assert_eq!(sparse, 0, "the LM head must stay dense");
                } else if s == 0.5 {
                    assert_eq!(sparse, op.map.kinds().len(), "{method}: s = 0.5 is all 2:4");
                }
                sparse_tiles += sparse;
            }
            assert!(sparse_tiles > 0, "{method} at {s}: no 2:4 tile");
            // Packed weights count as the matrices they hold, not as their bytes: the
            // bundle's count is the imported model's, less the small constants folded away.
            let imported = report.bundle.as_ref().unwrap().parameters as f64;
            let counted = g.parameter_count() as f64;
            assert!(
                counted <= imported && counted >= 0.99 * imported,
                "{method} at {s}: {counted} parameters in the bundle, {imported} imported"
            );
            let reference = unpacked_reference(&g);
            // The bundle's cache is seq-major (`kv-layout`): feed the past in that layout.
            let inputs = patch_tests::feed(&g, &case);
            let got = interp::run(&g, &inputs).unwrap();
            let want = interp::run(&reference, &inputs).unwrap();
            let err = patch_tests::max_abs_diff(&got[0], &want[0]);
            assert!(
                err <= 1e-4,
                "{method} at {s}: kernels vs masked reference {err}"
            );
            assert!(got[0]
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite()));
            assert!(out.with_extension("tiles.svg").exists());
        }
    }
}

#[test]
fn the_learned_method_is_deterministic_for_a_seed_and_beats_wanda() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = setup("llama_dynamo_op18", dir.path(), 400);
    let run = |name: &str, method: Method| {
        let out = dir.path().join(name);
        // The summed relative layer errors compared below are what the `relative` allocation
        // minimizes (the `loss` one weighs layers by the model's loss instead).
        let mut o = options(&model, &out, &calib, 0.35, method);
        o.calib.allocation = Allocation::Relative;
        pipeline::compile(&o, &OpRegistry::onnx()).unwrap();
        (load(&out).to_text(), sparse_report(&out))
    };
    let (a, ra) = run("a.patch", Method::Patch);
    let (b, _) = run("b.patch", Method::Patch);
    assert_eq!(a, b, "same seed, same graph");
    let (_, rm) = run("w.patch", Method::Wanda);
    let total = summed_error;
    assert!(
        total(&ra) < total(&rm),
        "summed layer errors: patch {} vs wanda {}",
        total(&ra),
        total(&rm)
    );
}

fn summed_error(r: &SparseReport) -> f64 {
    r.layers
        .iter()
        .map(|l| l.reconstruction_error.expect("a layer error"))
        .sum()
}

#[test]
fn patch_joint_learns_patterns_that_beat_the_frozen_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = setup("llama_dynamo_op18", dir.path(), 400);
    let case = read_case(&fixture_dir("llama_dynamo_op18").join("cases/seq7"));
    let inputs: Vec<Tensor> = case.inputs.iter().map(|(_, t)| t.clone()).collect();
    for s in [0.35, 0.5] {
        let run = |name: &str, joint_steps: usize| {
            let out = dir.path().join(name);
            let mut o = options(&model, &out, &calib, s, Method::Patch);
            o.calib.patch.joint.steps = joint_steps;
            pipeline::compile(&o, &OpRegistry::onnx()).unwrap();
            (load(&out), sparse_report(&out))
        };
        let (_, tile) = run("tile.patch", 0);
        let (g, joint) = run("joint.patch", 100);
        let (g2, _) = run("joint2.patch", 100);
        assert_eq!(g.to_text(), g2.to_text(), "same seed, same graph");
        assert_eq!(joint.joint_steps, 100);
        for l in &joint.layers {
            let (prior, learned) = (
                l.joint_prior_error.expect("a joint prior error"),
                l.joint_learned_error.expect("a joint learned error"),
            );
            assert!(learned <= prior, "{}: {learned} > {prior}", l.node);
        }
        assert_eq!(tile.layers[0].joint_prior_error, None);
        let achieved = joint.achieved_sparsity;
        assert!((achieved - s).abs() <= 0.005 * s, "achieved {achieved}");
        assert!(
            summed_error(&joint) < summed_error(&tile),
            "at {s}: joint {} vs tile {}",
            summed_error(&joint),
            summed_error(&tile)
        );
        let got = interp::run(&g, &inputs).unwrap();
        let want = interp::run(&unpacked_reference(&g), &inputs).unwrap();
        assert!(patch_tests::max_abs_diff(&got[0], &want[0]) <= 1e-4);
    }
}

#[test]
fn bad_calibration_input_fails_before_the_long_work() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = setup("llama_dynamo_op18", dir.path(), 50);
    let out = dir.path().join("x.patch");
    let err = pipeline::compile(
        &options(&model, &out, &calib, 0.3, Method::Wanda),
        &OpRegistry::onnx(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CompileError::Calib(_)), "{msg}");
    assert!(
        msg.contains("has 50 tokens") && msg.contains("need 128"),
        "{msg}"
    );
    assert!(!out.exists(), "no output on error");
    // Magnitude needs no calibration text at all.
    let mut o = options(
        &model,
        &out,
        &dir.path().join("missing.txt"),
        0.3,
        Method::Magnitude,
    );
    o.calib.text = None;
    pipeline::compile(&o, &OpRegistry::onnx()).unwrap();
    // Learned patterns belong to the patch method only.
    o.calib.patch.joint.steps = 10;
    let err = pipeline::compile(&o, &OpRegistry::onnx()).unwrap_err();
    assert!(err.to_string().contains("--joint-steps"), "{err}");
    // Without a tokenizer, calibration cannot read text.
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = pipeline::compile(
        &options(&model, &out, &calib, 0.3, Method::Patch),
        &OpRegistry::onnx(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}

#[test]
fn the_loss_allocation_differentiates_the_model_and_caches_its_sensitivities() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = setup("llama_optimum_with_past", dir.path(), 400);
    let cache = dir.path().join("calib.cache");
    let run = |name: &str, allocation: Allocation| {
        let out = dir.path().join(name);
        let mut o = options(&model, &out, &calib, 0.35, Method::Patch);
        o.calib.cache = Some(cache.clone());
        o.calib.allocation = allocation;
        o.calib.blockwise = None;
        let report = pipeline::compile(&o, &OpRegistry::onnx()).unwrap();
        (
            load(&out).to_text(),
            sparse_report(&out),
            report.bundle.unwrap(),
        )
    };
    let (a, ra, ja) = run("a.patch", Allocation::Loss);
    assert_eq!(ra.allocation.as_deref(), Some("loss"));
    assert_eq!(ra.allocation_fallback, None);
    // 16 windows asked, 4 calibration windows: the sensitivities come from those 4.
    let sensitivity = ra.sensitivity.as_ref().expect("loss sensitivities");
    assert_eq!(sensitivity.windows, 4);
    let ppl = sensitivity.dense_perplexity;
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");
    assert!(ja.phase_seconds.contains_key("sensitivity"));
    assert!(!ra.block_sparsity.is_empty());
    // The second compile reads the sensitivities back from the cache: the same bundle.
    let (b, rb, jb) = run("b.patch", Allocation::Loss);
    assert_eq!(a, b);
    assert_eq!(rb.sensitivity, ra.sensitivity);
    assert!(!jb.phase_seconds.contains_key("sensitivity"), "recomputed");
    // Uniform block budgets hold every block at the global sparsity.
    let (_, ru, _) = run("u.patch", Allocation::UniformBlocks);
    for blk in &ru.block_sparsity {
        let s = blk.sparsity;
        assert!((s - 0.35).abs() < 0.06, "block {} at {s}", blk.block);
    }
    let (_, rr, _) = run("r.patch", Allocation::Relative);
    assert_eq!(rr.allocation.as_deref(), Some("relative"));
    assert_eq!(rr.sensitivity, None);
}

/// The default method (tiles chosen by loss gradients, masks and weights learned through each
/// block) runs on every family with past: its gradients reach through GeGLU, Softcap and
/// softcapped attention (Gemma 2), q/k norms (Qwen3, Gemma 3) and sliced fused projections
/// (Phi-3); the budget is met, every block is learned, none falls back to matrix-wise except
/// GPT-2, whose Conv1D projections are Gemms and whose blocks start at a LayerNorm: it meets
/// the budget matrix by matrix and the report says why.
#[test]
fn the_default_method_learns_blocks_on_every_family() {
    for name in patch_tests::WITH_PAST_FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let (model, calib) = setup(name, dir.path(), 400);
        let out = dir.path().join("m.patch");
        let mut o = options(&model, &out, &calib, 0.4, Method::Patch);
        if let Some(bw) = o.calib.blockwise.as_mut() {
            bw.steps = 20;
        }
        pipeline::compile(&o, &OpRegistry::onnx()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let rep = sparse_report(&out);
        let achieved = rep.achieved_sparsity;
        println!("{name}: achieved {achieved}, blocks {:?}", rep.blockwise);
        assert!(
            (achieved - 0.4).abs() <= 0.01,
            "{name}: achieved {achieved}"
        );
        if name.starts_with("gpt2") {
            let why = rep.blockwise_fallback.as_deref().unwrap_or_default();
            assert!(why.contains("is a Gemm"), "{name}: {why}");
            continue;
        }
        assert_eq!(rep.blockwise_fallback, None, "{name}");
        assert_eq!(rep.blockwise.len(), 2, "{name}");
    }
}

/// A calibration cache whose key matches is still checked against the model before use: a
/// non-finite statistic, a Gram matrix of the wrong width, a truncated file or another file
/// type is named in the report and recomputed (the bundle equals the one made without it),
/// never trusted or a panic.
#[test]
fn a_calibration_cache_that_does_not_fit_the_model_is_named_and_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let (model, calib) = setup("llama_optimum_with_past", dir.path(), 400);
    let cache = dir.path().join("calib.cache");
    let run = |name: &str| {
        let out = dir.path().join(name);
        let mut o = options(&model, &out, &calib, 0.35, Method::Patch);
        o.calib.cache = Some(cache.clone());
        o.calib.allocation = Allocation::Relative;
        o.calib.blockwise = None;
        pipeline::compile(&o, &OpRegistry::onnx()).unwrap();
        (load(&out).to_text(), sparse_report(&out))
    };
    let (reference, first) = run("first.patch");
    assert_eq!(first.cache_rejected, None);
    let good = std::fs::read(&cache).unwrap();
    // The layout of the first Gram entry: magic, key, count, then name, k, rows, k² f64.
    let u64_at =
        |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let key_end = 16 + u64_at(&good, 8);
    let name_len = u64_at(&good, key_end + 8);
    let name_at = key_end + 16;
    let name = std::str::from_utf8(&good[name_at..name_at + name_len])
        .unwrap()
        .to_string();
    let k_at = name_at + name_len;
    let k = u64_at(&good, k_at);
    let h_at = k_at + 16;

    let mut nan = good.clone();
    nan[h_at..h_at + 8].copy_from_slice(&f64::NAN.to_le_bytes());
    let mut narrow = good[..k_at].to_vec();
    narrow.extend_from_slice(&((k / 2) as u64).to_le_bytes());
    narrow.extend_from_slice(&good[k_at + 8..h_at]);
    narrow.extend_from_slice(&good[h_at..h_at + (k / 2) * (k / 2) * 8]);
    narrow.extend_from_slice(&good[h_at + k * k * 8..]);
    type Expected = Box<dyn Fn(&str) -> bool>;
    let cases: Vec<(&str, Vec<u8>, Expected)> = vec![
        (
            "nan",
            nan,
            Box::new(move |m: &str| {
                m == format!("holds a non-finite value in the statistics of `{name}`")
            }),
        ),
        (
            "narrow",
            narrow,
            Box::new(move |m: &str| {
                m.starts_with(&format!("holds a {}-wide Gram matrix for `", k / 2))
                    && m.ends_with(&format!("` multiplies a {k}-wide input"))
            }),
        ),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            Box::new(|m: &str| m == "is truncated or malformed"),
        ),
        (
            "other file",
            b"{\"not\": \"a cache\"}".to_vec(),
            Box::new(|m: &str| m == "is not a calibration cache (no PATCHCAL header)"),
        ),
    ];
    for (what, bytes, expected) in cases {
        std::fs::write(&cache, &bytes).unwrap();
        let (text, report) = run(&format!("{what}.patch"));
        let why = report.cache_rejected.as_deref().unwrap_or_default();
        assert!(expected(why), "{what}: {why:?}");
        assert_eq!(text, reference, "{what}: the recomputed statistics differ");
        // Written again: the next compile uses it.
        assert_eq!(
            std::fs::read(&cache).unwrap(),
            good,
            "{what}: not rewritten"
        );
    }
}
