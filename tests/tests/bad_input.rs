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
