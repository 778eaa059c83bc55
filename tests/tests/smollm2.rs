//! End to end on the real model: SmolLM2-135M-Instruct as `models/smollm2-135m/prepare.sh`
//! prepares it (CI runs the script first), compiled to a bundle and checked against the ONNX
//! Runtime figures in `models/smollm2-135m/goldens.json`: the first perplexity windows of the
//! Brown evaluation split, and greedy continuations token for token (plain and chat).
//!
//! Without the prepared weights the test says so and passes, unless `PATCH_REQUIRE_MODELS=1`
//! (set by `.ci/run`), where their absence is a failure.

use std::path::{Path, PathBuf};

use patch_compiler::pipeline::{self, CompileOptions};
use patch_runtime::bundle::{self, LoadOptions};
use patch_runtime::llm::eval::perplexity;
use patch_runtime::llm::sampler::argmax;
use patch_runtime::llm::text::render_chat;
use patch_runtime::llm::{ChatMessage, LanguageModel};
use patch_runtime::ops::OpRegistry;
use patch_tests::repo_root;
use serde_json::Value;

fn prepared() -> Option<(PathBuf, PathBuf)> {
    let root = repo_root();
    let model = root.join("models/smollm2-135m/model_with_past.onnx");
    let text = root.join("models/brown/build/eval.txt");
    let ready = model.with_extension("onnx.data").exists() && text.exists();
    if ready {
        return Some((model, text));
    }
    let msg = "SmolLM2 is not prepared: run `bash models/smollm2-135m/prepare.sh` and \
               `bash models/brown/prepare.sh`";
    if std::env::var("PATCH_REQUIRE_MODELS").is_ok_and(|v| v == "1") {
        panic!("{msg} (PATCH_REQUIRE_MODELS=1)");
    }
    eprintln!("skipped: {msg}");
    None
}

fn goldens() -> Value {
    let p = repo_root().join("models/smollm2-135m/goldens.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn compile(model: &Path, dir: &Path) -> LanguageModel {
    let out = dir.join("smollm2.patch");
    pipeline::compile(
        &CompileOptions::new(model.to_path_buf(), out.clone()),
        &OpRegistry::onnx(),
    )
    .unwrap();
    let b = bundle::load_bundle(&out, &OpRegistry::onnx(), LoadOptions::default()).unwrap();
    LanguageModel::new(b.contents).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_matches_onnx_runtime_perplexity_windows_and_greedy_text() {
    let Some((model_path, text)) = prepared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = compile(&model_path, dir.path());
    assert!(model.has_kv_cache());
    assert_eq!((model.layers(), model.vocab()), (30, 49152));
    let g = goldens();
    let tok = model.tokenizer().unwrap();

    // Perplexity: the first two 512-token windows of the evaluation split.
    let stream = tok.encode(&std::fs::read_to_string(text).unwrap()).unwrap();
    let want = &g["first_windows_512"]["nll_sums_with_past_graph"];
    let p = perplexity(&model, &stream[..1024], 512, |_, _| {}).unwrap();
    for (w, got) in p.window_nll.iter().enumerate() {
        let want = want[w].as_f64().unwrap();
        println!("window {w}: NLL sum {got:.4}, ONNX Runtime {want:.4}");
        assert!((got - want).abs() <= 0.01, "window {w}: {got} vs {want}");
    }

    // Greedy continuations, token for token, plain and through the chat template.
    let template = model.generation.chat_template.clone().unwrap();
    for case in g["greedy"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        let text = if name == "chat" {
            render_chat(
                &template,
                &[ChatMessage::user(prompt)],
                "<|im_start|>",
                "<|im_end|>",
            )
            .unwrap()
        } else {
            prompt.to_string()
        };
        assert_eq!(
            text,
            case["prompt_text"].as_str().unwrap(),
            "{name}: prompt text"
        );
        let prompt_ids = tok.encode(&text).unwrap();
        assert_eq!(prompt_ids, ids(&case["prompt_ids"]), "{name}: prompt ids");
        let want = ids(&case["generated_ids"]);
        let mut cache = model.new_cache();
        let mut logits = model.forward(&mut cache, &prompt_ids, 1).unwrap();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let next = argmax(logits.last());
            got.push(next);
            logits = model.forward(&mut cache, &[next], 1).unwrap();
        }
        assert_eq!(got, want, "{name}: greedy continuation");
        assert_eq!(
            tok.decode(&got).unwrap(),
            tok.decode(&want).unwrap(),
            "{name}: text"
        );
    }
}
