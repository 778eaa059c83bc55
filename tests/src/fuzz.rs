//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs` call these), shared with the
//! regression test that replays every input a fuzzer ever found (`tests/fuzz/<target>/`).
//! Contract of each: any input ends in `Ok` or an error value, never a panic, an abort, a
//! hang or an allocation beyond what the input's own size justifies; where a property is
//! checked, a violation panics (that is a finding).

use std::path::Path;
use std::sync::OnceLock;

use patch_compiler::onnx::{import_model, OnnxModel};
use patch_runtime::bundle::{decode_bundle, LoadOptions};
use patch_runtime::llm::text::{render_chat, ChatMessage, StreamDecoder, TextTokenizer};
use patch_runtime::llm::LanguageModel;
use patch_runtime::ops::OpRegistry;
use patch_runtime::Graph;

/// The fuzz targets, by name (the names of `fuzz/fuzz_targets/*.rs` and `tests/fuzz/*`).
pub const TARGETS: [&str; 4] = ["onnx_import", "bundle_load", "tokenizer", "ir_text"];

/// The op registry, and (once) the tensor size limit the fuzzers run under: 1 GiB, half of
/// libFuzzer's malloc limit, so that an input asking for more gets the error a user would.
fn registry() -> &'static OpRegistry {
    static REGISTRY: OnceLock<OpRegistry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        patch_runtime::tensor::set_max_tensor_bytes(1 << 30);
        OpRegistry::onnx()
    })
}

/// Runs the target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "onnx_import" => onnx_import(data),
        "bundle_load" => bundle_load(data),
        "tokenizer" => tokenizer(data),
        "ir_text" => ir_text(data),
        _ => panic!("no fuzz target `{name}`; the targets are {TARGETS:?}"),
    }
}

/// ONNX bytes -> decode -> import (which verifies the graph) -> the compiler's cleanup
/// pipeline (constant folding, canonicalization, CSE, DCE) -> the IR's text form.
pub fn onnx_import(data: &[u8]) {
    // External data resolves inside an empty directory: a model can only name files there
    // (the loader refuses locations that leave it).
    let dir = std::env::temp_dir().join("patch-fuzz-onnx-empty");
    let Ok(model) = OnnxModel::from_bytes(bytes::Bytes::copy_from_slice(data), dir) else {
        return;
    };
    let Ok(mut graph) = import_model(&model, registry(), &Default::default()) else {
        return;
    };
    let _ = graph.parameter_count();
    if patch_passes::cleanup_pipeline(registry())
        .run(&mut graph)
        .is_ok()
    {
        let _ = graph.to_text();
    }
}

/// Bundle bytes -> decode (checksum off, so that mutations reach the manifest and graph
/// decoders) -> inspect (text form, parameter count) -> one forward step of one token.
pub fn bundle_load(data: &[u8]) {
    let options = LoadOptions {
        verify_checksum: false,
    };
    let Ok(bundle) = decode_bundle(
        bytes::Bytes::copy_from_slice(data),
        Path::new("<fuzz>"),
        registry(),
        options,
    ) else {
        return;
    };
    let _ = bundle.contents.graph.to_text();
    let _ = bundle.contents.graph.parameter_count();
    let Ok(model) = LanguageModel::new(bundle.contents) else {
        return;
    };
    let mut cache = model.new_cache();
    let _ = model.forward(&mut cache, &[0], 1);
}

struct SmolText {
    tokenizer: TextTokenizer,
    template: String,
}

fn smol_text() -> &'static SmolText {
    static TEXT: OnceLock<SmolText> = OnceLock::new();
    TEXT.get_or_init(|| {
        let dir = crate::repo_root().join("models/smollm2-135m");
        let read = |name: &str| {
            std::fs::read(dir.join(name)).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run models/smollm2-135m/prepare.sh first",
                    dir.join(name).display()
                )
            })
        };
        let generation: serde_json::Value =
            serde_json::from_slice(&read("generation.json")).expect("generation.json is JSON");
        SmolText {
            tokenizer: TextTokenizer::from_bytes(&read("tokenizer.json"))
                .expect("the SmolLM2 tokenizer loads"),
            template: generation["chat_template"]
                .as_str()
                .expect("generation.json has a chat template")
                .to_string(),
        }
    })
}

/// Prompt bytes -> the SmolLM2 tokenizer and chat template: encode -> decode, streaming
/// decode, chat rendering, and ids from raw bytes. Checks that decoding what was encoded gives
/// the text back (where the vocabulary can hold it) and that the streamed pieces add up to
/// the whole decode.
pub fn tokenizer(data: &[u8]) {
    let t = smol_text();
    let prompt = String::from_utf8_lossy(data);
    let ids = t.tokenizer.encode(&prompt).expect("any text encodes");
    let decoded = t.tokenizer.decode(&ids).expect("encoded ids decode");
    // The text comes back unless it holds special-token syntax, or bytes the vocabulary has
    // no token for: SmolLM2's lacks 21 of the 256 byte-level tokens (control bytes 4, 6,
    // 19, 20, 22, 29 among them), which encode to its unknown token `<|endoftext|>`.
    let special = |id: &u32| {
        t.tokenizer
            .token(*id)
            .is_some_and(|tok| tok.starts_with('<') && tok.ends_with('>') && tok.len() > 2)
    };
    if !prompt.contains('<') && !ids.iter().any(special) {
        assert_eq!(decoded, prompt, "decode(encode(text)) differs; ids {ids:?}");
    }
    let mut stream = StreamDecoder::new();
    let mut pieces = String::new();
    for &id in &ids {
        pieces.push_str(&stream.push(&t.tokenizer, id).expect("decodes"));
    }
    pieces.push_str(&stream.finish(&t.tokenizer).expect("decodes"));
    assert_eq!(
        pieces, decoded,
        "streamed pieces differ from the whole decode"
    );
    if let Ok(chat) = render_chat(
        &t.template,
        &[ChatMessage::user(&prompt)],
        "<|im_start|>",
        "<|im_end|>",
    ) {
        t.tokenizer.encode(&chat).expect("a rendered chat encodes");
    }
    // Ids from raw bytes, inside and outside the vocabulary: text or an error.
    let raw: Vec<u32> = data
        .chunks(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)])) * 2)
        .collect();
    let _ = t.tokenizer.decode(&raw);
}

/// IR text -> parse -> (when it parses) verify and print -> parse again: printing a parsed
/// graph and parsing that gives the same text.
pub fn ir_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(graph) = Graph::parse_text(text, registry()) else {
        return;
    };
    let printed = graph.to_text();
    let again = Graph::parse_text(&printed, registry()).unwrap_or_else(|e| {
        panic!("the printed form of a parsed graph does not parse: {e}\n{printed}")
    });
    assert_eq!(again.to_text(), printed, "print(parse(print(g))) differs");
    let _ = graph.verify(registry());
}

/// A small causal-LM-shaped graph (ids -> embedding -> MLP with a residual -> logits over 64
/// tokens), weights drawn from a fixed sequence: the smallest bundle with the inputs and
/// outputs a generation loop takes and hybrid matmuls in it, so that a fuzzer runs
/// thousands of forward steps a second.
pub fn tiny_language_model() -> Graph {
    use patch_runtime::ir::Attrs;
    use patch_runtime::{Dim, InputRole, OutputRole, Tensor, TensorType};
    let registry = registry();
    let mut g = Graph::new("tiny", 18);
    let mut state = 0x2545_f491_u32;
    let mut weights = |k: usize, n: usize| {
        let v: Vec<f32> = (0..k * n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32 - 0.5) * 0.5
            })
            .collect();
        Tensor::from_vec(vec![k, n], v).expect("weights")
    };
    let shape = vec![Dim::sym("batch"), Dim::sym("seq")];
    let ids = g
        .add_input(
            "input_ids",
            TensorType::new(patch_runtime::DType::I64, shape),
            InputRole::TokenIds,
        )
        .expect("input");
    let embed = g.add_const("embed", weights(64, 32)).expect("const");
    let w1 = g.add_const("mlp.up", weights(32, 48)).expect("const");
    let w2 = g.add_const("mlp.down", weights(48, 32)).expect("const");
    let head = g.add_const("lm_head", weights(32, 64)).expect("const");
    let mut node = |op: &str, inputs: Vec<patch_runtime::ValueId>, out: &str| {
        g.add_node(
            registry,
            out,
            "",
            op,
            Attrs::new(),
            inputs.into_iter().map(Some).collect(),
            vec![out.to_string()],
        )
        .expect("node")[0]
    };
    let x = node("Gather", vec![embed, ids], "x");
    let up = node("MatMul", vec![x, w1], "up");
    let act = node("Relu", vec![up], "act");
    let down = node("MatMul", vec![act, w2], "down");
    let res = node("Add", vec![x, down], "residual");
    let logits = node("MatMul", vec![res, head], "logits");
    g.set_outputs(vec![(logits, OutputRole::Logits)]);
    g.verify(registry).expect("the tiny model verifies");
    g
}

/// Writes seed inputs for every target into `dir/<target>/`: the ONNX op fixtures and the
/// tiny model as ONNX; the tiny model compiled to bundles (dense f32, dense f16, 50% 2:4 in
/// bf16); prompts; the IR text of every imported fixture and of the compiled tiny model.
pub fn write_seeds(dir: &Path) -> std::io::Result<usize> {
    use patch_compiler::onnx::export::{export_graph, save_model, ConstantStorage};
    use patch_compiler::pipeline::{compile, CompileOptions};
    let mut written = 0;
    let sub = |t: &str| -> std::io::Result<std::path::PathBuf> {
        let d = dir.join(t);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    let onnx_dir = sub("onnx_import")?;
    for entry in std::fs::read_dir(crate::repo_root().join("models/fixtures/ops"))? {
        let case = entry?.path();
        let model = case.join("model.onnx");
        if model.is_file() {
            let name = case.file_name().unwrap_or_default().to_string_lossy();
            std::fs::copy(&model, onnx_dir.join(format!("op-{name}.onnx")))?;
            written += 1;
        }
    }
    let work_dir = tempfile::tempdir()?;
    let work = work_dir.path();
    let tiny = work.join("tiny.onnx");
    save_model(
        export_graph(&tiny_language_model()),
        &tiny,
        ConstantStorage::Embedded,
    )?;
    std::fs::copy(&tiny, onnx_dir.join("tiny-lm.onnx"))?;
    written += 1;
    std::fs::write(
        work.join("generation.json"),
        r#"{"eos_token_id": 63, "bos_token_id": 1, "max_context": 32}"#,
    )?;
    let bundle_dir = sub("bundle_load")?;
    let ir_dir = sub("ir_text")?;
    let variants = [
        ("dense-f32", 0.0, patch_kernels::WeightDtype::F32),
        ("dense-f16", 0.0, patch_kernels::WeightDtype::F16),
        ("sparse50-bf16", 0.5, patch_kernels::WeightDtype::Bf16),
    ];
    for (name, sparsity, weights) in variants {
        let out = work.join(format!("{name}.patch"));
        let mut options = CompileOptions {
            sparsity,
            weights,
            tile: patch_kernels::TileShape::new(16, 16).expect("tile"),
            ..CompileOptions::new(tiny.clone(), out.clone())
        };
        options.calib.method = patch_passes::masks::Method::Magnitude;
        compile(&options, registry()).map_err(std::io::Error::other)?;
        std::fs::copy(&out, bundle_dir.join(format!("tiny-{name}.patch")))?;
        let b = patch_runtime::bundle::load_bundle(&out, registry(), Default::default())
            .map_err(std::io::Error::other)?;
        std::fs::write(
            ir_dir.join(format!("tiny-{name}.ir")),
            b.contents.graph.to_text(),
        )?;
        written += 2;
    }
    for name in crate::FIXTURES.into_iter().chain(crate::FAMILY_FIXTURES) {
        std::fs::write(
            ir_dir.join(format!("{name}.ir")),
            crate::import_fixture(name).to_text(),
        )?;
        written += 1;
    }
    let text_dir = sub("tokenizer")?;
    let prompts: [(&str, &[u8]); 5] = [
        ("plain", b"The capital of France is"),
        ("chat", b"<|im_start|>user\nHello!<|im_end|>\n"),
        (
            "unicode",
            "Grüße, 東京, emoji 😀 and\ttabs  and spaces".as_bytes(),
        ),
        ("jinja", b"{% if x %}{{ y }}{% endif %}"),
        ("bytes", b"\xff\xfe\x00bad utf-8"),
    ];
    for (name, text) in prompts {
        std::fs::write(text_dir.join(format!("{name}.txt")), text)?;
        written += 1;
    }
    Ok(written)
}
