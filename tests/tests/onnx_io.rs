//! ONNX ingestion and emission: lossless re-encoding, zero-copy weights, export round trip.

use patch_compiler::onnx::{self, export};
use patch_runtime::interp;
use patch_runtime::ops::OpRegistry;
use patch_tests::{fixture_dir, import_fixture, read_case, FIXTURES};

#[test]
fn re_encoding_an_unmodified_model_is_byte_identical() {
    for name in FIXTURES {
        let path = fixture_dir(name).join("model.onnx");
        let model = onnx::load_model(&path).unwrap();
        let original = std::fs::read(&path).unwrap();
        assert!(
            model.encode() == original,
            "{name}: re-encoded bytes differ from the file"
        );
    }
}

#[test]
fn weights_are_borrowed_from_the_memory_mapped_files() {
    // Embedded weights borrow the model file; external ones borrow model.onnx.data.
    let path = fixture_dir("llama_torchscript_op17").join("model.onnx");
    let model = onnx::load_model(&path).unwrap();
    let graph = onnx::import_model(&model, &OpRegistry::onnx(), &Default::default()).unwrap();
    let big: Vec<_> = graph.consts().filter(|(_, t)| t.len() >= 4096).collect();
    assert!(!big.is_empty());
    for (id, t) in &big {
        assert!(
            t.borrows_from(&model.file_bytes),
            "{} was copied",
            graph.value(*id).name
        );
    }

    let path = fixture_dir("llama_dynamo_op18").join("model.onnx");
    let model = onnx::load_model(&path).unwrap();
    let graph = onnx::import_model(&model, &OpRegistry::onnx(), &Default::default()).unwrap();
    let data = std::fs::read(fixture_dir("llama_dynamo_op18").join("model.onnx.data")).unwrap();
    let external: Vec<_> = graph
        .consts()
        .filter(|(_, t)| t.len() >= 4096 && !t.borrows_from(&model.file_bytes))
        .collect();
    assert!(
        !external.is_empty(),
        "the dynamo fixture keeps its weights external"
    );
    for (id, t) in external {
        // Not in the model file and not copied: the bytes must equal a slice of the data file
        // and live outside any heap copy of it (checked by content here, by address above).
        let needle = &t.bytes()[..64];
        assert!(
            data.windows(64).any(|w| w == needle),
            "{}: bytes are not from model.onnx.data",
            graph.value(id).name
        );
    }
}

#[test]
fn exported_graphs_import_back_to_the_same_ir_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    for (name, storage) in [
        (
            "llama_dynamo_op18",
            export::ConstantStorage::External { min_bytes: 1024 },
        ),
        ("gpt2", export::ConstantStorage::Embedded),
    ] {
        let graph = import_fixture(name);
        let path = dir.path().join(format!("{name}.onnx"));
        export::save_model(export::export_graph(&graph), &path, storage).unwrap();
        let model = onnx::load_model(&path).unwrap();
        let again = onnx::import_model(&model, &OpRegistry::onnx(), &Default::default()).unwrap();
        assert_eq!(
            graph.to_text(),
            again.to_text(),
            "{name}: IR changed through export"
        );
        let case = read_case(&fixture_dir(name).join("cases/seq7"));
        let inputs: Vec<_> = case.inputs.iter().map(|(_, t)| t.clone()).collect();
        let a = interp::run(&graph, &inputs).unwrap();
        let b = interp::run(&again, &inputs).unwrap();
        assert_eq!(
            a[0].bytes(),
            b[0].bytes(),
            "{name}: outputs changed through export"
        );
    }
    // Nothing but the two models and one data file: no temporary file left behind.
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "gpt2.onnx",
            "llama_dynamo_op18.onnx",
            "llama_dynamo_op18.onnx.data"
        ]
    );
}

/// Every opset from 13 to 23 imports and runs: the TorchScript export (opset 17) relabelled
/// 13..=17 and the dynamo export (opset 18) relabelled 18..=23 use only ops whose semantics
/// do not change across those versions, so each must still match ONNX Runtime's goldens.
#[test]
fn opsets_13_to_23_import_and_match_the_goldens() {
    use patch_compiler::onnx::proto::ModelProto;
    use prost::Message;
    for (name, opsets) in [
        ("llama_torchscript_op17", 13..=17),
        ("llama_dynamo_op18", 18..=23),
    ] {
        let dir = fixture_dir(name);
        let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
        let case = read_case(&dir.join("cases/seq7"));
        let inputs: Vec<_> = case.inputs.iter().map(|(_, t)| t.clone()).collect();
        for opset in opsets {
            let mut proto = ModelProto::decode(bytes.as_slice()).unwrap();
            for o in &mut proto.opset_import {
                if o.domain.as_deref().unwrap_or("").is_empty() {
                    o.version = Some(opset);
                }
            }
            let model = onnx::OnnxModel::from_bytes(proto.encode_to_vec().into(), &dir).unwrap();
            let graph = onnx::import_model(&model, &OpRegistry::onnx(), &Default::default())
                .unwrap_or_else(|e| panic!("{name} at opset {opset}: {e}"));
            assert_eq!(graph.opset, opset);
            let out = interp::run(&graph, &inputs).unwrap();
            let err = patch_tests::max_abs_diff(&out[0], &case.outputs[0].1);
            assert!(err <= 1e-4, "{name} at opset {opset}: {err}");
        }
    }
}

#[test]
fn the_registry_covers_the_required_op_set() {
    let registry = OpRegistry::onnx();
    let required =
        "Add Sub Mul Div Pow Sqrt Reciprocal Neg Exp Tanh Erf Sigmoid Softmax Cast Where \
        Equal Less LessOrEqual Greater And Or Not IsNaN Max Min ReduceMean ReduceSum ReduceMax \
        MatMul Gemm Gather GatherND Reshape Transpose Unsqueeze Squeeze Concat Slice Split Expand \
        Range Shape ConstantOfShape Constant Trilu CumSum Cos Sin LayerNormalization Flatten";
    let missing: Vec<&str> = required
        .split_whitespace()
        .filter(|op| !registry.contains("", op))
        .collect();
    assert!(
        missing.is_empty(),
        "ops missing from the registry: {missing:?}"
    );
}
