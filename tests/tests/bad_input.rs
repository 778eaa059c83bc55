//! Bad input gives a clear error naming what and where, never a panic.

use std::path::Path;

use patch_compiler::onnx::{
    self,
    import::ImportError,
    proto::{self, ModelProto},
};
use patch_runtime::ops::OpRegistry;
use patch_tests::fixture_dir;
use prost::Message;

fn import_file(path: &Path) -> Result<patch_runtime::Graph, String> {
    let model = onnx::load_model(path).map_err(|e| e.to_string())?;
    onnx::import_model(&model, &OpRegistry::onnx(), &Default::default()).map_err(|e| e.to_string())
}

fn fixture_proto(name: &str) -> ModelProto {
    let bytes = std::fs::read(fixture_dir(name).join("model.onnx")).unwrap();
    ModelProto::decode(bytes.as_slice()).unwrap()
}

fn write_model(dir: &Path, model: &ModelProto) -> std::path::PathBuf {
    let path = dir.join("model.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    path
}

#[test]
fn truncated_protobuf_is_a_decode_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture_dir("gpt2").join("model.onnx")).unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = import_file(&path).unwrap_err();
    assert!(
        err.contains("not a valid ONNX model") && err.contains("model.onnx"),
        "{err}"
    );
}

#[test]
fn garbage_and_empty_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.onnx");
    std::fs::write(
        &path,
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x0f not onnx",
    )
    .unwrap();
    let err = import_file(&path).unwrap_err();
    assert!(err.contains("not a valid ONNX model"), "{err}");
    std::fs::write(&path, b"").unwrap();
    let err = import_file(&path).unwrap_err();
    assert!(err.contains("is empty"), "{err}");
    let err = import_file(&dir.path().join("missing.onnx")).unwrap_err();
    assert!(
        err.contains("cannot read") && err.contains("missing.onnx"),
        "{err}"
    );
}

#[test]
fn missing_external_data_names_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_dir("llama_dynamo_op18").join("model.onnx");
    std::fs::copy(&src, dir.path().join("model.onnx")).unwrap();
    let err = import_file(&dir.path().join("model.onnx")).unwrap_err();
    assert!(
        err.contains("model.onnx.data") && err.contains("tensor `"),
        "{err}"
    );

    // A truncated data file: the tensor's range lies past its end.
    let data = std::fs::read(fixture_dir("llama_dynamo_op18").join("model.onnx.data")).unwrap();
    std::fs::write(dir.path().join("model.onnx.data"), &data[..data.len() / 2]).unwrap();
    let err = import_file(&dir.path().join("model.onnx")).unwrap_err();
    assert!(err.contains("outside the file"), "{err}");
}

#[test]
fn external_data_may_not_escape_the_model_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = fixture_proto("llama_dynamo_op18");
    let graph = model.graph.as_mut().unwrap();
    let t = graph
        .initializer
        .iter_mut()
        .find(|t| !t.external_data.is_empty())
        .unwrap();
    for e in &mut t.external_data {
        if e.key.as_deref() == Some("location") {
            e.value = Some("../../etc/passwd".into());
        }
    }
    let err = import_file(&write_model(dir.path(), &model)).unwrap_err();
    assert!(err.contains("relative path inside"), "{err}");
}

#[test]
fn initializer_size_mismatch_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = fixture_proto("llama_torchscript_op17");
    let graph = model.graph.as_mut().unwrap();
    let t = graph
        .initializer
        .iter_mut()
        .find(|t| t.raw_data.as_ref().is_some_and(|r| r.len() > 1000))
        .unwrap();
    let name = t.name.clone().unwrap();
    let raw = t.raw_data.take().unwrap();
    t.raw_data = Some(raw.slice(..raw.len() - 4));
    let err = import_file(&write_model(dir.path(), &model)).unwrap_err();
    assert!(err.contains(&name) && err.contains("bytes"), "{err}");
}

#[test]
fn unknown_dtypes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = fixture_proto("llama_torchscript_op17");
    let t = &mut model.graph.as_mut().unwrap().initializer[0];
    let name = t.name.clone().unwrap();
    t.data_type = Some(proto::tensor_proto::DataType::Complex64 as i32);
    let err = import_file(&write_model(dir.path(), &model)).unwrap_err();
    assert!(err.contains(&name) && err.contains("COMPLEX64"), "{err}");

    let mut model = fixture_proto("llama_torchscript_op17");
    model.graph.as_mut().unwrap().initializer[0].data_type = Some(99);
    let err = import_file(&write_model(dir.path(), &model)).unwrap_err();
    assert!(err.contains("code 99"), "{err}");
}

/// A two-node graph `a = Add(x, b); b = Neg(a)`.
fn cyclic_model() -> ModelProto {
    let mut model = fixture_proto("gpt2");
    let graph = model.graph.as_mut().unwrap();
    let input = graph.input[0].name.clone().unwrap();
    let node = |name: &str, op: &str, inputs: &[&str], output: &str| proto::NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    };
    graph.node = vec![
        node("first", "Add", &[&input, "b"], "a"),
        node("second", "Neg", &["a"], "b"),
    ];
    graph.output.truncate(1);
    graph.output[0].name = Some("b".into());
    model
}

#[test]
fn cyclic_graphs_are_rejected_naming_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let err = import_file(&write_model(dir.path(), &cyclic_model())).unwrap_err();
    assert!(
        err.contains("cyclic") && (err.contains("`first`") || err.contains("`second`")),
        "{err}"
    );
}

#[test]
fn unsupported_ops_and_opsets_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = fixture_proto("gpt2");
    let graph = model.graph.as_mut().unwrap();
    let n = graph
        .node
        .iter_mut()
        .find(|n| n.op_type.as_deref() == Some("Tanh"))
        .unwrap();
    let node_name = n.name.clone().unwrap();
    n.op_type = Some("FancyTanh".into());
    n.domain = Some("com.example".into());
    let err = import_file(&write_model(dir.path(), &model)).unwrap_err();
    assert!(
        err.contains("FancyTanh") && err.contains("com.example") && err.contains(&node_name),
        "{err}"
    );

    let mut model = fixture_proto("gpt2");
    model.opset_import[0].version = Some(11);
    let loaded = onnx::OnnxModel::from_bytes(model.encode_to_vec().into(), dir.path()).unwrap();
    let err = onnx::import_model(&loaded, &OpRegistry::onnx(), &Default::default()).unwrap_err();
    assert!(matches!(err, ImportError::Opset(11)), "{err}");
    assert!(err.to_string().contains("13 to 23"));
}

#[test]
fn a_graph_reading_an_undefined_value_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = fixture_proto("gpt2");
    let graph = model.graph.as_mut().unwrap();
    let node = graph
        .node
        .iter_mut()
        .find(|n| n.op_type.as_deref() == Some("MatMul"))
        .unwrap();
    node.input[0] = "nowhere".into();
    let err = import_file(&write_model(dir.path(), &model)).unwrap_err();
    assert!(err.contains("`nowhere`"), "{err}");
}

/// The fixture with every external tensor moved into the `.onnx` file (the torch dynamo
/// exporter's default below 2 GB), its largest MatMul weight behind a Transpose, padded until the largest weight's bytes start at an
/// offset that is not a multiple of 4, and the offset found.
fn embedded_misaligned(name: &str) -> (Vec<u8>, usize) {
    let data = std::fs::read(fixture_dir(name).join("model.onnx.data")).unwrap();
    let mut model = fixture_proto(name);
    let graph = model.graph.as_mut().unwrap();
    for t in graph.initializer.iter_mut() {
        let entry = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key.as_deref() == Some(k))
                .and_then(|e| e.value.clone())
        };
        let Some(_) = entry("location") else { continue };
        let offset: usize = entry("offset").map_or(0, |v| v.parse().unwrap());
        let length: usize = entry("length").map_or(data.len() - offset, |v| v.parse().unwrap());
        t.raw_data = Some(bytes::Bytes::copy_from_slice(
            &data[offset..offset + length],
        ));
        t.external_data.clear();
        t.data_location = None;
    }
    // As dynamo writes a tied LM head: the largest MatMul weight stored transposed, behind a
    // Transpose node, which constant folding evaluates on the embedded (misaligned) bytes.
    let weights: Vec<String> = graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("MatMul"))
        .map(|n| n.input[1].clone())
        .collect();
    let t = graph
        .initializer
        .iter_mut()
        .filter(|t| {
            weights
                .iter()
                .any(|w| t.name.as_deref() == Some(w.as_str()))
        })
        .filter(|t| t.dims.len() == 2 && t.data_type == Some(1))
        .max_by_key(|t| t.dims[0] * t.dims[1])
        .unwrap();
    let (k, n) = (t.dims[0] as usize, t.dims[1] as usize);
    let raw = t.raw_data.clone().unwrap();
    let mut transposed = vec![0u8; raw.len()];
    for (i, row) in raw.chunks_exact(4 * n).enumerate() {
        for (j, v) in row.chunks_exact(4).enumerate() {
            transposed[4 * (j * k + i)..][..4].copy_from_slice(v);
        }
    }
    let name = t.name.clone().unwrap();
    t.name = Some(format!("{name}.stored_transposed"));
    t.dims = vec![n as i64, k as i64];
    t.raw_data = Some(bytes::Bytes::from(transposed));
    graph.node.insert(
        0,
        proto::NodeProto {
            name: Some("tied_transpose".into()),
            op_type: Some("Transpose".into()),
            input: vec![format!("{name}.stored_transposed")],
            output: vec![name],
            attribute: vec![proto::AttributeProto {
                name: Some("perm".into()),
                r#type: Some(7),
                ints: vec![1, 0],
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    let largest = graph
        .initializer
        .iter()
        .filter_map(|t| t.raw_data.clone())
        .max_by_key(|b| b.len())
        .unwrap();
    for pad in 0..4 {
        model.doc_string = Some("x".repeat(pad));
        let encoded = model.encode_to_vec();
        let at = encoded
            .windows(largest.len())
            .position(|w| w == &largest[..])
            .unwrap();
        if at % 4 != 0 {
            return (encoded, at);
        }
    }
    unreachable!("one of four paddings misaligns the weight");
}

/// Embedded weights at unaligned offsets import, fold (the tied embedding's Transpose),
/// pack and run exactly as the same weights read from an external data file.
#[test]
fn embedded_misaligned_weights_compile_like_external_ones() {
    let name = "llama_dynamo_op18";
    let (encoded, offset) = embedded_misaligned(name);
    assert_ne!(offset % 4, 0);
    let (ext_dir, emb_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let external = patch_tests::compile_fixture(name, ext_dir.path(), 64);
    // The same staging, then the model replaced by the embedded one, its data file removed.
    let staged = patch_tests::stage_fixture(name, emb_dir.path());
    std::fs::write(&staged, &encoded).unwrap();
    std::fs::remove_file(emb_dir.path().join("model.onnx.data")).unwrap();
    let weights = onnx::load_model(&staged).unwrap();
    let graph = onnx::import_model(&weights, &OpRegistry::onnx(), &Default::default()).unwrap();
    assert!(
        graph
            .consts()
            .any(|(_, t)| t.len() >= 1024 && !t.is_aligned()),
        "the test needs a large misaligned weight"
    );
    std::fs::copy(
        ext_dir.path().join("generation.json"),
        emb_dir.path().join("generation.json"),
    )
    .unwrap();
    let out = emb_dir.path().join("embedded.patch");
    let options = patch_compiler::pipeline::CompileOptions {
        tile: patch_kernels::TileShape::new(32, 16).unwrap(),
        ..patch_compiler::pipeline::CompileOptions::new(staged, out.clone())
    };
    patch_compiler::pipeline::compile(&options, &OpRegistry::onnx()).unwrap();
    let load = |p: &Path| {
        patch_runtime::bundle::load_bundle(p, &OpRegistry::onnx(), Default::default()).unwrap()
    };
    let (a, b) = (load(&external), load(&out));
    assert_eq!(a.contents.graph.to_text(), b.contents.graph.to_text());
    let case = patch_tests::read_case(&fixture_dir(name).join("cases/seq7"));
    let inputs = patch_tests::feed(&a.contents.graph, &case);
    let want = patch_runtime::interp::run(&a.contents.graph, &inputs).unwrap();
    let got = patch_runtime::interp::run(&b.contents.graph, &inputs).unwrap();
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w.bytes(), g.bytes(), "outputs differ");
    }
}

/// A graph whose sizes come from values (here a constant shape of 2^62 elements) is refused
/// before anything is allocated, with and without the memory plan: the error names the value
/// or the node and op, and the machine's limit.
#[test]
fn a_graph_asking_for_more_memory_than_the_machine_has_is_refused_before_allocating() {
    let text = "graph \"huge\" opset 18 {
  input %x: f32[1]  # other
  const %shape: i64[2] = [2147483648, 2147483648]
  %big: f32[2147483648, 2147483648] = ConstantOfShape(%shape)  # fill
  %y: f32[2147483648, 2147483648] = Add(%big, %x)  # add
  output %y: f32[2147483648, 2147483648]  # other
}
";
    let registry = OpRegistry::onnx();
    let graph = patch_runtime::Graph::parse_text(text, &registry).expect("the text parses");
    let x = patch_runtime::Tensor::from_vec(vec![1], vec![1.0f32]).unwrap();
    let limit = patch_runtime::tensor::max_tensor_bytes();
    // With the memory plan, before the first node runs: its slots are sized up front.
    let err = patch_runtime::interp::run(&graph, std::slice::from_ref(&x)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "tensor: value `big`: a slot of the memory plan would make 4611686018427387904 f32 \
             elements, more than the {limit} bytes one tensor may take on this machine"
        )
    );
    // Without it, by the op.
    let mut plan = patch_runtime::interp::Plan::new(&graph).unwrap();
    plan.set_memory_plan(false);
    assert_eq!(
        plan.run(&[x]).unwrap_err().to_string(),
        format!(
            "node `fill` (ConstantOfShape): ConstantOfShape would make 4611686018427387904 f32 \
             elements, more than the {limit} bytes one tensor may take on this machine"
        )
    );
}
