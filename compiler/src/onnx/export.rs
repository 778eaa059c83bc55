//! IR → ONNX model, and writing models to disk atomically.
//!
//! Export keeps names, attributes and symbolic input/output dims, so that an exported graph
//! imports back to the same IR text. Constants are written as `raw_data` (borrowing the IR's
//! bytes while encoding) or, when asked, to one external data file with 64-byte alignment.

use patch_runtime::atomic::write_atomically;
use std::path::Path;

use bytes::Bytes;
use patch_runtime::ir::{Attr, Attrs};
use patch_runtime::{Dim, Graph, Tensor, TensorType};
use prost::Message;

use super::proto::{
    attribute_proto::AttributeType, tensor_proto, tensor_shape_proto, type_proto, AttributeProto,
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

/// ONNX IR version written by [`export_graph`] (IR 10 is the first to carry everything we
/// emit; ONNX Runtime 1.17 and later read it).
pub const EXPORT_IR_VERSION: i64 = 10;

/// Where constants go when exporting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConstantStorage {
    /// Every constant inside the model file.
    Embedded,
    /// Constants of at least this many bytes go to `<model file name>.data`.
    External { min_bytes: usize },
}

pub fn tensor_to_proto(name: &str, t: &Tensor) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: t.shape().iter().map(|&d| d as i64).collect(),
        data_type: Some(t.dtype().onnx_code()),
        raw_data: Some(t.bytes().clone()),
        ..TensorProto::default()
    }
}

fn dim_proto(d: &Dim) -> tensor_shape_proto::Dimension {
    use tensor_shape_proto::dimension::Value;
    tensor_shape_proto::Dimension {
        value: Some(match d.as_const() {
            Some(v) => Value::DimValue(v),
            None => Value::DimParam(d.to_string()),
        }),
        denotation: None,
    }
}

fn value_info(name: &str, ty: &TensorType) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(ty.dtype.onnx_code()),
                shape: Some(TensorShapeProto {
                    dim: ty.shape.iter().map(dim_proto).collect(),
                }),
            })),
            denotation: None,
        }),
        ..ValueInfoProto::default()
    }
}

fn attr_proto(name: &str, a: &Attr) -> AttributeProto {
    let mut p = AttributeProto {
        name: Some(name.to_string()),
        ..AttributeProto::default()
    };
    let kind = match a {
        Attr::Int(v) => {
            p.i = Some(*v);
            AttributeType::Int
        }
        Attr::Float(v) => {
            p.f = Some(*v);
            AttributeType::Float
        }
        Attr::String(s) => {
            p.s = Some(Bytes::from(s.clone().into_bytes()));
            AttributeType::String
        }
        Attr::Tensor(t) => {
            p.t = Some(tensor_to_proto("", t));
            AttributeType::Tensor
        }
        Attr::Ints(v) => {
            p.ints = v.clone();
            AttributeType::Ints
        }
        Attr::Floats(v) => {
            p.floats = v.clone();
            AttributeType::Floats
        }
        Attr::Strings(v) => {
            p.strings = v
                .iter()
                .map(|s| Bytes::from(s.clone().into_bytes()))
                .collect();
            AttributeType::Strings
        }
    };
    p.r#type = Some(kind as i32);
    p
}

fn attrs_proto(attrs: &Attrs) -> Vec<AttributeProto> {
    attrs.0.iter().map(|(k, v)| attr_proto(k, v)).collect()
}

/// Converts a graph into a model proto with every constant embedded.
pub fn export_graph(graph: &Graph) -> ModelProto {
    let mut g = GraphProto {
        name: Some(graph.name.clone()),
        ..GraphProto::default()
    };
    for (id, _) in graph.inputs() {
        let v = graph.value(*id);
        g.input.push(value_info(&v.name, &v.ty));
    }
    for (id, t) in graph.consts() {
        g.initializer
            .push(tensor_to_proto(&graph.value(id).name, t));
    }
    let mut domains = std::collections::BTreeSet::new();
    for (_, node) in graph.nodes() {
        if !node.domain.is_empty() {
            domains.insert(node.domain.clone());
        }
        g.node.push(NodeProto {
            name: Some(node.name.clone()),
            op_type: Some(node.op_type.clone()),
            domain: (!node.domain.is_empty()).then(|| node.domain.clone()),
            input: node
                .inputs
                .iter()
                .map(|i| i.map(|id| graph.value(id).name.clone()).unwrap_or_default())
                .collect(),
            output: node
                .outputs
                .iter()
                .map(|o| graph.value(*o).name.clone())
                .collect(),
            attribute: attrs_proto(&node.attrs)
                .into_iter()
                // `num_outputs` exists from opset 18; earlier the output count says it.
                .filter(|a| {
                    !(node.op_type == "Split"
                        && graph.opset < 18
                        && a.name.as_deref() == Some("num_outputs"))
                })
                .collect(),
            ..NodeProto::default()
        });
    }
    for (id, _) in graph.outputs() {
        let v = graph.value(*id);
        g.output.push(value_info(&v.name, &v.ty));
    }
    let mut opset_import = vec![OperatorSetIdProto {
        domain: Some(String::new()),
        version: Some(graph.opset),
    }];
    for d in domains {
        opset_import.push(OperatorSetIdProto {
            domain: Some(d),
            version: Some(1),
        });
    }
    ModelProto {
        ir_version: Some(EXPORT_IR_VERSION),
        producer_name: Some("patchc".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        opset_import,
        graph: Some(g),
        ..ModelProto::default()
    }
}

/// Saves a model proto to `path`, moving large initializers to `<file name>.data` when
/// `storage` asks for it. Both files are written atomically.
pub fn save_model(
    mut model: ModelProto,
    path: &Path,
    storage: ConstantStorage,
) -> std::io::Result<()> {
    if let (ConstantStorage::External { min_bytes }, Some(graph)) = (storage, model.graph.as_mut())
    {
        let data_name = format!(
            "{}.data",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let mut data: Vec<u8> = Vec::new();
        for t in &mut graph.initializer {
            let Some(raw) = t.raw_data.take_if(|r| r.len() >= min_bytes) else {
                continue;
            };
            let offset = data.len().next_multiple_of(64);
            data.resize(offset, 0);
            data.extend_from_slice(&raw);
            t.data_location = Some(tensor_proto::DataLocation::External as i32);
            let entry = |k: &str, v: String| StringStringEntryProto {
                key: Some(k.into()),
                value: Some(v),
            };
            t.external_data = vec![
                entry("location", data_name.clone()),
                entry("offset", offset.to_string()),
                entry("length", raw.len().to_string()),
            ];
        }
        write_atomically(&path.with_file_name(&data_name), &[&data])?;
    }
    write_atomically(path, &[&model.encode_to_vec()])
}
