//! Conversion between [`BundleContents`] and the protobuf manifest.

use std::collections::HashMap;

use bytes::Bytes;

use super::{BundleContents, Generation, ALIGN, FORMAT_VERSION};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::ir::{Attr, Attrs, Graph, InputRole, OutputRole, TensorType};
use crate::ops::OpRegistry;
use crate::tensor::Tensor;

/// Types generated from `proto/bundle.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/patch.bundle.rs"));
}

use proto::attribute::Value as AttrValue;

/// The manifest for `contents`, and the constant tensors in the order of its tensor table.
pub fn encode(contents: &BundleContents) -> (proto::Manifest, Vec<Tensor>) {
    let g = &contents.graph;
    let decl = |id: crate::ValueId, role: String| {
        let v = g.value(id);
        proto::ValueDecl {
            name: v.name.clone(),
            dtype: v.ty.dtype.onnx_code(),
            dims: v.ty.shape.iter().map(|d| d.to_string()).collect(),
            role,
        }
    };
    let mut tensors = Vec::new();
    let mut entries = Vec::new();
    let mut constants = Vec::new();
    let mut offset = 0u64;
    for (id, t) in g.consts() {
        let name = g.value(id).name.clone();
        offset = offset.next_multiple_of(ALIGN as u64);
        entries.push(proto::TensorEntry {
            name: name.clone(),
            dtype: t.dtype().onnx_code(),
            dims: t.shape().iter().map(|&d| d as u64).collect(),
            offset,
            length: t.bytes().len() as u64,
        });
        offset += t.bytes().len() as u64;
        constants.push(name);
        tensors.push(t.clone());
    }
    let nodes = g
        .nodes()
        .map(|(_, n)| proto::Node {
            name: n.name.clone(),
            domain: n.domain.clone(),
            op_type: n.op_type.clone(),
            attrs: n.attrs.0.iter().map(|(k, v)| encode_attr(k, v)).collect(),
            inputs: n
                .inputs
                .iter()
                .map(|i| i.map(|id| g.value(id).name.clone()).unwrap_or_default())
                .collect(),
            outputs: n.outputs.iter().map(|o| g.value(*o).name.clone()).collect(),
        })
        .collect();
    let graph = proto::Graph {
        name: g.name.clone(),
        opset: g.opset,
        inputs: g
            .inputs()
            .iter()
            .map(|(id, r)| decl(*id, r.label()))
            .collect(),
        constants,
        nodes,
        outputs: g
            .outputs()
            .iter()
            .map(|(id, r)| decl(*id, r.label()))
            .collect(),
    };
    let gen = &contents.generation;
    let manifest = proto::Manifest {
        format_version: FORMAT_VERSION,
        graph: Some(graph),
        tensors: entries,
        tokenizer_json: contents.tokenizer_json.clone().unwrap_or_default(),
        generation: Some(proto::Generation {
            eos_token_ids: gen.eos_token_ids.clone(),
            bos_token_id: gen.bos_token_id.unwrap_or(0),
            has_bos: gen.bos_token_id.is_some(),
            chat_template: gen.chat_template.clone().unwrap_or_default(),
            max_context: gen.max_context.unwrap_or(0),
            bos_policy: match gen.add_bos_token {
                None => proto::BosPolicy::BosFromPostProcessor,
                Some(true) => proto::BosPolicy::BosAlways,
                Some(false) => proto::BosPolicy::BosNever,
            } as i32,
        }),
        compile_report_json: contents.compile_report_json.clone(),
        metadata: contents.metadata.clone().into_iter().collect(),
    };
    (manifest, tensors)
}

fn encode_attr(name: &str, a: &Attr) -> proto::Attribute {
    let value = match a {
        Attr::Int(v) => AttrValue::Int(*v),
        Attr::Float(v) => AttrValue::Float(*v),
        Attr::String(s) => AttrValue::String(s.clone()),
        Attr::Tensor(t) => AttrValue::Tensor(proto::InlineTensor {
            dtype: t.dtype().onnx_code(),
            dims: t.shape().iter().map(|&d| d as u64).collect(),
            data: t.bytes().clone(),
        }),
        Attr::Ints(v) => AttrValue::Ints(proto::Ints { values: v.clone() }),
        Attr::Floats(v) => AttrValue::Floats(proto::Floats { values: v.clone() }),
        Attr::Strings(v) => AttrValue::Strings(proto::Strings { values: v.clone() }),
    };
    proto::Attribute {
        name: name.to_string(),
        value: Some(value),
    }
}

pub enum DecodeError {
    /// The manifest is inconsistent with itself or the data section.
    Corrupt(String),
    /// The graph it describes does not build or verify.
    Graph(RuntimeError),
}

impl From<RuntimeError> for DecodeError {
    fn from(e: RuntimeError) -> Self {
        DecodeError::Graph(e)
    }
}

fn dtype(code: i32, what: &str) -> Result<DType, DecodeError> {
    DType::from_onnx(code)
        .ok_or_else(|| DecodeError::Corrupt(format!("{what}: unknown dtype code {code}")))
}

fn dims(v: &[u64]) -> Vec<usize> {
    v.iter().map(|&d| d as usize).collect()
}

fn decode_type(v: &proto::ValueDecl) -> Result<TensorType, DecodeError> {
    let shape = v
        .dims
        .iter()
        .map(|d| d.parse::<Dim>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DecodeError::Corrupt(format!("value `{}`: {e}", v.name)))?;
    Ok(TensorType::new(dtype(v.dtype, &v.name)?, shape))
}

fn decode_attr(a: &proto::Attribute) -> Result<Attr, DecodeError> {
    Ok(match &a.value {
        Some(AttrValue::Int(v)) => Attr::Int(*v),
        Some(AttrValue::Float(v)) => Attr::Float(*v),
        Some(AttrValue::String(s)) => Attr::String(s.clone()),
        Some(AttrValue::Tensor(t)) => Attr::Tensor(
            Tensor::from_bytes(dtype(t.dtype, &a.name)?, dims(&t.dims), t.data.clone())
                .map_err(|e| DecodeError::Corrupt(format!("attribute `{}`: {e}", a.name)))?
                .to_aligned(),
        ),
        Some(AttrValue::Ints(v)) => Attr::Ints(v.values.clone()),
        Some(AttrValue::Floats(v)) => Attr::Floats(v.values.clone()),
        Some(AttrValue::Strings(v)) => Attr::Strings(v.values.clone()),
        None => {
            return Err(DecodeError::Corrupt(format!(
                "attribute `{}` has no value",
                a.name
            )))
        }
    })
}

/// Rebuilds the contents from a manifest; tensors are slices of `data`.
pub fn decode(
    m: proto::Manifest,
    data: &Bytes,
    registry: &OpRegistry,
) -> Result<BundleContents, DecodeError> {
    let pg = m
        .graph
        .ok_or_else(|| DecodeError::Corrupt("the manifest has no graph".into()))?;
    let mut graph = Graph::new(pg.name.clone(), pg.opset);
    for v in &pg.inputs {
        let role = InputRole::from_label(&v.role).ok_or_else(|| {
            DecodeError::Corrupt(format!("input `{}`: unknown role `{}`", v.name, v.role))
        })?;
        graph.add_input(v.name.clone(), decode_type(v)?, role)?;
    }
    let entries: HashMap<&str, &proto::TensorEntry> =
        m.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for name in &pg.constants {
        let e = entries.get(name.as_str()).ok_or_else(|| {
            DecodeError::Corrupt(format!("constant `{name}` has no tensor entry"))
        })?;
        let end = e
            .offset
            .checked_add(e.length)
            .filter(|&end| end <= data.len() as u64)
            .ok_or_else(|| {
                DecodeError::Corrupt(format!(
                    "tensor `{name}` lies outside the data section ({}+{} > {})",
                    e.offset,
                    e.length,
                    data.len()
                ))
            })?;
        let bytes = data.slice(e.offset as usize..end as usize);
        let t = Tensor::from_bytes(dtype(e.dtype, name)?, dims(&e.dims), bytes)
            .map_err(|err| DecodeError::Corrupt(format!("tensor `{name}`: {err}")))?;
        graph.add_const(name.clone(), t)?;
    }
    for n in &pg.nodes {
        let mut attrs = Attrs::new();
        for a in &n.attrs {
            attrs.0.insert(a.name.clone(), decode_attr(a)?);
        }
        let inputs = n
            .inputs
            .iter()
            .map(|i| {
                if i.is_empty() {
                    return Ok(None);
                }
                graph.value_by_name(i).map(Some).ok_or_else(|| {
                    DecodeError::Corrupt(format!("node `{}` reads undefined `{i}`", n.name))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        graph.add_node(
            registry,
            n.name.clone(),
            &n.domain,
            &n.op_type,
            attrs,
            inputs,
            n.outputs.clone(),
        )?;
    }
    let mut outputs = Vec::new();
    for v in &pg.outputs {
        let id = graph
            .value_by_name(&v.name)
            .ok_or_else(|| DecodeError::Corrupt(format!("output `{}` is undefined", v.name)))?;
        let role = OutputRole::from_label(&v.role).ok_or_else(|| {
            DecodeError::Corrupt(format!("output `{}`: unknown role `{}`", v.name, v.role))
        })?;
        outputs.push((id, role));
    }
    graph.set_outputs(outputs);
    graph.verify(registry)?;
    let gen = m.generation.unwrap_or_default();
    Ok(BundleContents {
        graph,
        tokenizer_json: (!m.tokenizer_json.is_empty()).then_some(m.tokenizer_json),
        generation: Generation {
            eos_token_ids: gen.eos_token_ids,
            bos_token_id: gen.has_bos.then_some(gen.bos_token_id),
            chat_template: (!gen.chat_template.is_empty()).then_some(gen.chat_template),
            max_context: (gen.max_context > 0).then_some(gen.max_context),
            add_bos_token: match proto::BosPolicy::try_from(gen.bos_policy) {
                Ok(proto::BosPolicy::BosFromPostProcessor) => None,
                Ok(proto::BosPolicy::BosAlways) => Some(true),
                Ok(proto::BosPolicy::BosNever) => Some(false),
                Err(_) => {
                    return Err(DecodeError::Corrupt(format!(
                        "generation metadata: unknown BOS policy {}",
                        gen.bos_policy
                    )));
                }
            },
        },
        compile_report_json: m.compile_report_json,
        metadata: m.metadata.into_iter().collect(),
    })
}
