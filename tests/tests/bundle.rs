//! The `.patch` bundle: round trip, zero-copy aligned tensors, and clear errors for truncated,
//! corrupt, foreign or other-version files.

use std::path::Path;

use patch_runtime::bundle::{self, BundleContents, Generation, LoadOptions, ALIGN};
use patch_runtime::interp;
use patch_runtime::ops::OpRegistry;
use patch_tests::{fixture_dir, import_fixture, read_case, FIXTURES};

fn contents(name: &str) -> BundleContents {
    BundleContents {
        graph: import_fixture(name),
        tokenizer_json: Some(bytes::Bytes::from_static(b"{\"version\": \"1.0\"}")),
        generation: Generation {
            eos_token_ids: vec![2, 7],
            bos_token_id: Some(1),
            chat_template: Some("{{ messages }}".into()),
            max_context: Some(256),
            add_bos_token: Some(true),
        },
        compile_report_json: "{\"sparsity\": 0}".into(),
        metadata: [("source".to_string(), name.to_string())].into(),
    }
}

fn load(path: &Path) -> Result<bundle::Bundle, String> {
    bundle::load_bundle(path, &OpRegistry::onnx(), LoadOptions::default())
        .map_err(|e| e.to_string())
}

#[test]
fn bundles_round_trip_every_fixture() {
    let dir = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let c = contents(name);
        let path = dir.path().join(format!("{name}.patch"));
        bundle::write_bundle(&path, &c).unwrap();
        let b = load(&path).unwrap();
        assert_eq!(
            b.contents.graph.to_text(),
            c.graph.to_text(),
            "{name}: IR changed"
        );
        assert_eq!(b.contents.generation, c.generation);
        assert_eq!(b.contents.tokenizer_json, c.tokenizer_json);
        assert_eq!(b.contents.compile_report_json, c.compile_report_json);
        assert_eq!(b.contents.metadata, c.metadata);
        // Weights are 64-byte aligned slices of the map: typed access needs no copy.
        for (_, t) in b.contents.graph.consts().filter(|(_, t)| t.len() >= 1024) {
            assert_eq!(t.bytes().as_ptr() as usize % ALIGN, 0);
            assert!(t.is_aligned());
        }
        let case = read_case(&fixture_dir(name).join("cases/seq7"));
        let inputs: Vec<_> = case.inputs.iter().map(|(_, t)| t.clone()).collect();
        let want = interp::run(&c.graph, &inputs).unwrap();
        let got = interp::run(&b.contents.graph, &inputs).unwrap();
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(
                w.bytes(),
                g.bytes(),
                "{name}: outputs changed through the bundle"
            );
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".patch"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn written(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("m.patch");
    bundle::write_bundle(&path, &contents("gpt2")).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

#[test]
fn corruption_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut bytes) = written(dir.path());
    let n = bytes.len();
    bytes[n - 100] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = load(&path).unwrap_err();
    assert!(err.contains("corrupt") && err.contains("checksum"), "{err}");
}

#[test]
fn truncation_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = written(dir.path());
    for keep in [bytes.len() - 1, bytes.len() / 2, 40] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.contains("truncated"), "{keep} bytes: {err}");
    }
    // Bytes appended after the data section are refused as well, naming how many.
    let mut grown = bytes.clone();
    grown.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&path, &grown).unwrap();
    let err = load(&path).unwrap_err();
    assert!(
        err.contains("has 4096 bytes after its end") && err.contains("appended"),
        "{err}"
    );
}

#[test]
fn foreign_files_and_other_versions_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut bytes) = written(dir.path());
    bytes[8] = 2;
    std::fs::write(&path, &bytes).unwrap();
    let err = load(&path).unwrap_err();
    assert!(
        err.contains("format version 2") && err.contains("recompile"),
        "{err}"
    );

    let onnx = fixture_dir("gpt2").join("model.onnx");
    let err = load(&onnx).unwrap_err();
    assert!(err.contains("not a PATCH bundle"), "{err}");
    let err = load(&dir.path().join("missing.patch")).unwrap_err();
    assert!(
        err.contains("cannot access") && err.contains("missing.patch"),
        "{err}"
    );
}

#[test]
fn a_failed_write_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("no-such-dir").join("m.patch");
    assert!(bundle::write_bundle(&target, &contents("gpt2")).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// The metadata files transformers 5 and GGUF exports write beside a model: the chat template
/// as `chat_template.jinja` (over a JSON copy) and the context as `context_length`.
#[test]
fn chat_template_jinja_and_context_length_reach_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let model = patch_tests::stage_fixture("llama_optimum_with_past", dir.path());
    std::fs::write(
        dir.path().join("generation.json"),
        r#"{"eos_token_id": 511, "context_length": 96, "chat_template": "the JSON copy"}"#,
    )
    .unwrap();
    let jinja = "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}\n";
    std::fs::write(dir.path().join("chat_template.jinja"), jinja).unwrap();
    let out = dir.path().join("m.patch");
    let options = patch_compiler::pipeline::CompileOptions::new(model, out.clone());
    patch_compiler::pipeline::compile(&options, &OpRegistry::onnx()).unwrap();
    let b = load(&out).unwrap();
    assert_eq!(b.contents.generation.chat_template.as_deref(), Some(jinja));
    assert_eq!(b.contents.generation.max_context, Some(96));
    // A template file that is not UTF-8 is an error naming it, before any output.
    std::fs::write(dir.path().join("chat_template.jinja"), [0xffu8, 0xfe]).unwrap();
    std::fs::remove_file(&out).unwrap();
    let err = patch_compiler::pipeline::compile(&options, &OpRegistry::onnx()).unwrap_err();
    assert!(err.to_string().contains("chat_template.jinja"), "{err}");
    assert!(!out.exists());
}

/// A plain prompt starts with BOS as transformers' `tokenizer(text)` starts it: the tokenizer
/// configuration's `add_bos_token` when it states one, else the tokenizer.json post-processor;
/// token metadata the model cannot honour is refused at compile time, naming the folder.
#[test]
fn bos_follows_the_tokenizer_configuration_and_bad_ids_are_refused() {
    // The word tokenizer with a post-processor that prepends `w1`, as LLaMA's and Gemma's do.
    let with_template = patch_tests::word_tokenizer_json(512).replace(
        r#""post_processor": null"#,
        r#""post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "w1", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"w1": {"id": "w1", "ids": [1], "tokens": ["w1"]}}}"#,
    );
    let cases: [(&str, Option<&str>, &[u32]); 4] = [
        // The post-processor decides.
        (&with_template, None, &[1, 5, 6]),
        // The configuration overrides it either way.
        (&with_template, Some(r#"{"add_bos_token": false}"#), &[5, 6]),
        (
            &patch_tests::word_tokenizer_json(512),
            Some(r#"{"add_bos_token": true, "bos_token_id": 1}"#),
            &[1, 5, 6],
        ),
        (
            &patch_tests::word_tokenizer_json(512),
            Some(r#"{"add_bos_token": false, "bos_token_id": 1}"#),
            &[5, 6],
        ),
    ];
    for (tokenizer, config, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let model = patch_tests::stage_fixture("llama_optimum_with_past", dir.path());
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer).unwrap();
        if let Some(config) = config {
            std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
        }
        let out = dir.path().join("m.patch");
        let options = patch_compiler::pipeline::CompileOptions::new(model, out.clone());
        patch_compiler::pipeline::compile(&options, &OpRegistry::onnx()).unwrap();
        let lm = patch_tests::load_model(&out);
        let bos = lm.generation.bos_token_id.map(|b| b as u32);
        let ids = lm
            .tokenizer()
            .unwrap()
            .encode_prompt("w5 w6", bos, lm.generation.add_bos_token)
            .unwrap();
        assert_eq!(ids, want, "{config:?}");
    }
    for (config, says) in [
        (
            r#"{"add_bos_token": true}"#,
            "add_bos_token is true but no bos_token_id is given",
        ),
        (
            r#"{"eos_token_id": 512}"#,
            "eos_token_id 512 is not a token of the model (ids are within 0..512)",
        ),
        (
            r#"{"bos_token_id": -1}"#,
            "bos_token_id -1 is not a token of the model",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = patch_tests::stage_fixture("llama_optimum_with_past", dir.path());
        std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
        let out = dir.path().join("m.patch");
        let options = patch_compiler::pipeline::CompileOptions::new(model, out.clone());
        let err = patch_compiler::pipeline::compile(&options, &OpRegistry::onnx()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(says), "{msg}");
        assert!(msg.contains("generation metadata in"), "{msg}");
        assert!(!out.exists());
    }
}

/// A tokenizer that cannot be read, or that has more tokens than the model has ids, is refused
/// at compile time (it would fail, or index past the logits, only at run time), naming the file.
#[test]
fn unreadable_or_foreign_tokenizers_are_refused_at_compile_time() {
    for (tokenizer, says) in [
        ("not json".to_string(), "cannot read tokenizer.json"),
        (
            patch_tests::word_tokenizer_json(600),
            "it has 600 tokens but the model's logits have 512",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = patch_tests::stage_fixture("llama_optimum_with_past", dir.path());
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer).unwrap();
        let out = dir.path().join("m.patch");
        let options = patch_compiler::pipeline::CompileOptions::new(model, out.clone());
        let msg = patch_compiler::pipeline::compile(&options, &OpRegistry::onnx())
            .unwrap_err()
            .to_string();
        assert!(msg.contains(says), "{msg}");
        assert!(
            msg.starts_with("tokenizer `") && msg.contains("tokenizer.json`"),
            "{msg}"
        );
        assert_eq!(msg.matches("tokenizer:").count(), 0, "{msg}");
        assert!(!out.exists());
    }
}
