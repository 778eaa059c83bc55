//! Shared helpers for the cross-crate tests: locating fixtures and reading their ONNX Runtime
//! goldens (ONNX test-data layout: `cases/<case>/input_<i>.pb`, `output_<i>.pb`).

pub mod fuzz;

use std::path::{Path, PathBuf};

use patch_compiler::onnx::{self, proto::TensorProto};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, Tensor};
use prost::Message;

/// The fixtures every parity test runs on.
pub const FIXTURES: [&str; 5] = [
    "llama_dynamo_op18",
    "llama_torchscript_op17",
    "llama_optimum_with_past",
    "gpt2",
    "qwen2",
];

/// Fixtures of the other families users run, each exported by the torch dynamo exporter (no
/// cache) and by Optimum with past (one also by TorchScript): Qwen3 (q/k norms), Mistral
/// (sliding window), Gemma 2 (softcapping, GELU-tanh gated MLP, four norms per block, tied
/// embedding), Gemma 3 (q/k norms, local and global layers), Phi-3 (fused qkv and gate_up
/// projections); and LLaMA, Qwen3 and Gemma 3 exported through transformers 5 (`*_tf5_*`).
pub const FAMILY_FIXTURES: [&str; 16] = [
    "qwen3_dynamo",
    "mistral_dynamo",
    "gemma2_dynamo",
    "gemma3_dynamo",
    "phi3_dynamo",
    "phi3_torchscript",
    "qwen3_optimum_with_past",
    "mistral_optimum_with_past",
    "gemma2_optimum_with_past",
    "gemma3_optimum_with_past",
    "phi3_optimum_with_past",
    "gpt2_optimum_with_past",
    "llama_tf5_dynamo",
    "llama_tf5_torchscript",
    "qwen3_tf5_dynamo",
    "gemma3_tf5_dynamo",
];

/// The fixtures exported with a KV cache (they also have the `greedy8` decode cases).
pub const WITH_PAST_FIXTURES: [&str; 7] = [
    "llama_optimum_with_past",
    "qwen3_optimum_with_past",
    "mistral_optimum_with_past",
    "gemma2_optimum_with_past",
    "gemma3_optimum_with_past",
    "phi3_optimum_with_past",
    "gpt2_optimum_with_past",
];

/// The golden cases every fixture has.
pub const CASES: [&str; 4] = ["seq1", "seq7", "seq64", "batch2_leftpad"];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository root")
        .to_path_buf()
}

pub fn fixture_dir(name: &str) -> PathBuf {
    repo_root().join("models/fixtures").join(name)
}

/// Loads and imports a fixture's model.
pub fn import_fixture(name: &str) -> Graph {
    let path = fixture_dir(name).join("model.onnx");
    let model = onnx::load_model(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    onnx::import_model(&model, &OpRegistry::onnx(), &Default::default())
        .unwrap_or_else(|e| panic!("importing {}: {e}", path.display()))
}

/// Reads one serialized `TensorProto`.
pub fn read_tensor(path: &Path) -> (String, Tensor) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let proto =
        TensorProto::decode(bytes.as_slice()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t =
        onnx::tensor_from_proto(&proto, None).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (proto.name.unwrap_or_default(), t)
}

/// Inputs and expected outputs of one case directory, in index order.
pub struct Case {
    pub inputs: Vec<(String, Tensor)>,
    pub outputs: Vec<(String, Tensor)>,
}

pub fn read_case(dir: &Path) -> Case {
    let read_all = |prefix: &str| {
        let mut out = Vec::new();
        for i in 0.. {
            let p = dir.join(format!("{prefix}_{i}.pb"));
            if !p.exists() {
                break;
            }
            out.push(read_tensor(&p));
        }
        assert!(!out.is_empty(), "no {prefix}_*.pb in {}", dir.display());
        out
    };
    Case {
        inputs: read_all("input"),
        outputs: read_all("output"),
    }
}

/// Maximum absolute difference between two f32 tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shape mismatch");
    let (x, y) = (
        a.as_slice::<f32>().expect("f32"),
        b.as_slice::<f32>().expect("f32"),
    );
    x.iter()
        .zip(y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max)
}

/// Tolerance of the interpreter against ONNX Runtime on every output (f32 throughout).
pub const ORT_TOLERANCE: f32 = 1e-4;

/// Runs every golden case of fixture `name` through `graph` (`what` names the graph in
/// messages) and checks each output against ONNX Runtime's within [`ORT_TOLERANCE`], the input
/// order, the output count, and the logits' argmax.
pub fn check_against_ort(name: &str, graph: &Graph, what: &str) {
    for case in CASES {
        let golden = read_case(&fixture_dir(name).join("cases").join(case));
        for ((want_name, _), (id, _)) in golden.inputs.iter().zip(graph.inputs()) {
            assert_eq!(
                want_name,
                &graph.value(*id).name,
                "{name}/{case}: input order"
            );
        }
        let inputs: Vec<_> = golden.inputs.iter().map(|(_, t)| t.clone()).collect();
        let got = patch_runtime::interp::run(graph, &inputs)
            .unwrap_or_else(|e| panic!("{name}/{case} ({what}): {e}"));
        assert_eq!(
            got.len(),
            golden.outputs.len(),
            "{name}/{case}: output count"
        );
        for ((out_name, want), got) in golden.outputs.iter().zip(&got) {
            let err = max_abs_diff(got, want);
            println!("{name:<26} {what:<9} {case:<15} {out_name:<18} max_abs_err {err:.3e}");
            assert!(
                err <= ORT_TOLERANCE,
                "{name}/{case}/{out_name} ({what}): max abs error {err} > {ORT_TOLERANCE}"
            );
            if out_name == "logits" {
                assert_eq!(argmax_last(got), argmax_last(want), "{name}/{case}: argmax");
            }
        }
    }
}

/// Argmax over the last axis, for every leading position.
pub fn argmax_last(t: &Tensor) -> Vec<usize> {
    let n = *t.shape().last().expect("rank >= 1");
    t.as_slice::<f32>()
        .expect("f32")
        .chunks(n)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                })
                .0
        })
        .collect()
}

/// A WordLevel `tokenizer.json` over `w0 .. w{n-1}` (whitespace pre-tokenizer), so that the
/// fixtures' random models can be driven through text.
pub fn word_tokenizer_json(n: usize) -> String {
    let vocab: Vec<String> = (0..n).map(|i| format!("\"w{i}\": {i}")).collect();
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null,
        "decoder": null,
        "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "w0"}}}}"#,
        vocab.join(", ")
    )
}

/// Copies fixture `name`'s files into `dir` with a 512-word tokenizer beside them — a model
/// folder as `patchc compile` reads one — and returns the model's path.
pub fn stage_fixture(name: &str, dir: &Path) -> PathBuf {
    for entry in std::fs::read_dir(fixture_dir(name)).expect("fixture folder") {
        let p = entry.expect("fixture entry").path();
        if p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().expect("file name"))).expect("copy");
        }
    }
    std::fs::write(dir.join("tokenizer.json"), word_tokenizer_json(512)).expect("tokenizer");
    dir.join("model.onnx")
}

/// Compiles fixture `name` (staged by [`stage_fixture`], with a `generation.json` giving
/// `max_context`) into `dir` with 32×16 tiles and returns the bundle's path.
pub fn compile_fixture(name: &str, dir: &Path, max_context: usize) -> PathBuf {
    let model = stage_fixture(name, dir);
    std::fs::write(
        dir.join("generation.json"),
        format!(r#"{{"eos_token_id": 511, "bos_token_id": 1, "max_context": {max_context}}}"#),
    )
    .expect("generation.json");
    let out = dir.join(format!("{name}.patch"));
    let options = patch_compiler::pipeline::CompileOptions {
        tile: patch_kernels::TileShape::new(32, 16).expect("tile shape"),
        ..patch_compiler::pipeline::CompileOptions::new(model, out.clone())
    };
    patch_compiler::pipeline::compile(&options, &patch_runtime::ops::OpRegistry::onnx())
        .expect("compile");
    out
}

/// Loads a bundle as a language model.
pub fn load_model(path: &Path) -> patch_runtime::llm::LanguageModel {
    let registry = patch_runtime::ops::OpRegistry::onnx();
    let options = patch_runtime::bundle::LoadOptions::default();
    let b = patch_runtime::bundle::load_bundle(path, &registry, options).expect("load bundle");
    patch_runtime::llm::LanguageModel::new(b.contents).expect("language model")
}

/// The prepared SmolLM2 with-past model, or `None` (saying so) when `prepare.sh` has not run;
/// with `PATCH_REQUIRE_MODELS=1` a missing model fails instead.
pub fn smollm2_model() -> Option<PathBuf> {
    let model = repo_root().join("models/smollm2-135m/model_with_past.onnx");
    if model.with_extension("onnx.data").exists() {
        return Some(model);
    }
    let msg = "SmolLM2 is not prepared: run `bash models/smollm2-135m/prepare.sh`";
    assert!(
        std::env::var("PATCH_REQUIRE_MODELS").map_or(true, |v| v != "1"),
        "{msg} (PATCH_REQUIRE_MODELS=1)"
    );
    eprintln!("skipped: {msg}");
    None
}

/// `[b, x, y, d]` → `[b, y, x, d]` (f32).
pub fn swap_axes_12(t: &Tensor) -> Tensor {
    let (b, x, y, d) = (t.shape()[0], t.shape()[1], t.shape()[2], t.shape()[3]);
    let src = t.as_slice::<f32>().expect("f32");
    let mut out = vec![0f32; src.len()];
    for bi in 0..b {
        for xi in 0..x {
            for yi in 0..y {
                let from = ((bi * x + xi) * y + yi) * d;
                let to = ((bi * y + yi) * x + xi) * d;
                out[to..to + d].copy_from_slice(&src[from..from + d]);
            }
        }
    }
    Tensor::from_vec(vec![b, y, x, d], out).expect("same volume")
}

/// True when `graph`'s past inputs are seq-major (`[b, t, hk, d]`, after the `kv-layout`
/// pass) rather than as exported (`[b, hk, t, d]`).
pub fn has_seq_major_cache(graph: &Graph) -> bool {
    graph.inputs().iter().any(|(id, role)| {
        matches!(
            role,
            patch_runtime::InputRole::PastKey(_) | patch_runtime::InputRole::PastValue(_)
        ) && graph.value(*id).ty.shape[1].as_const().is_none()
    })
}

/// A golden case's inputs as `graph` takes them: past keys/values swapped to `[b, t, hk, d]`
/// when the graph's cache is seq-major.
pub fn feed(graph: &Graph, case: &Case) -> Vec<Tensor> {
    let seq_major = has_seq_major_cache(graph);
    graph
        .inputs()
        .iter()
        .zip(&case.inputs)
        .map(|((_, role), (_, t))| match role {
            patch_runtime::InputRole::PastKey(_) | patch_runtime::InputRole::PastValue(_)
                if seq_major =>
            {
                swap_axes_12(t)
            }
            _ => t.clone(),
        })
        .collect()
}
