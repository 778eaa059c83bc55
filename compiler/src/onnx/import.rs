//! ONNX model → IR.
//!
//! Graph inputs keep their declared dtypes and symbolic dims (`dim_param` names become
//! symbols), initializers and `Constant` nodes become IR constants borrowing the model's
//! memory, and nodes are added in a topological order through the op registry, which infers
//! every value's type. Opsets 13 to 23 of the default domain are accepted.

use std::collections::{HashMap, HashSet};

use patch_runtime::ir::{Attr, Attrs};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{DType, Dim, Graph, InputRole, OutputRole, RuntimeError, TensorType};

use super::load::{LoadError, OnnxModel};
use super::proto::{attribute_proto::AttributeType, type_proto, NodeProto, ValueInfoProto};

pub const MIN_OPSET: i64 = 13;
pub const MAX_OPSET: i64 = 23;

/// Errors of importing a decoded model into the IR.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Ir(#[from] RuntimeError),
    #[error("the model has no graph")]
    NoGraph,
    #[error("default-domain opset {0} is not supported (supported: {MIN_OPSET} to {MAX_OPSET}); re-export with an opset in that range")]
    Opset(i64),
    #[error("the model imports no default-domain opset")]
    NoOpset,
    #[error("graph input `{name}`: {msg}")]
    Input { name: String, msg: String },
    #[error("node `{node}` ({op_type}): attribute `{attr}`: {msg}")]
    Attribute {
        node: String,
        op_type: String,
        attr: String,
        msg: String,
    },
    #[error("graph is cyclic: node `{0}` depends on its own output")]
    Cycle(String),
    #[error("node `{node}` reads `{value}`, which no input, initializer or node defines")]
    Undefined { node: String, value: String },
    #[error("graph output `{0}` is not defined")]
    UndefinedOutput(String),
}

#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Fixed values for symbolic input dims (e.g. `batch = 1`), applied at import.
    pub fixed_dims: HashMap<String, i64>,
}

/// Imports `model` into an IR graph, verified.
pub fn import_model(
    model: &OnnxModel,
    registry: &OpRegistry,
    options: &ImportOptions,
) -> Result<Graph, ImportError> {
    let proto = &model.proto;
    let graph_proto = proto.graph.as_ref().ok_or(ImportError::NoGraph)?;
    let opset = proto
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .ok_or(ImportError::NoOpset)?;
    if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
        return Err(ImportError::Opset(opset));
    }
    let name = graph_proto.name.clone().unwrap_or_default();
    let mut graph = Graph::new(name, opset);

    let initializer_names: HashSet<&str> = graph_proto
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    for input in &graph_proto.input {
        let name = input.name.clone().unwrap_or_default();
        if initializer_names.contains(name.as_str()) {
            continue; // IR < 4 lists initializers as inputs too.
        }
        let ty = value_info_type(input, options)?;
        graph.add_input(name.clone(), ty, InputRole::from_name(&name))?;
    }
    for init in &graph_proto.initializer {
        let t = model.tensor(init)?;
        graph.add_const(init.name.clone().unwrap_or_default(), t)?;
    }

    let order = topological_order(&graph_proto.node, &graph)?;
    for (i, &index) in order.iter().enumerate() {
        let node = &graph_proto.node[index];
        let node_name = match node.name.as_deref() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("{}_{i}", node.op_type.as_deref().unwrap_or("node")),
        };
        let op_type = node.op_type.clone().unwrap_or_default();
        let domain = node.domain.clone().unwrap_or_default();
        let attrs = convert_attrs(model, node, &node_name, &op_type)?;

        // Constants become IR constants directly.
        if op_type == "Constant" && domain.is_empty() && node.output.len() == 1 {
            if let Some(t) = constant_value(&attrs) {
                graph.add_const(node.output[0].clone(), t)?;
                continue;
            }
        }
        let mut inputs = Vec::with_capacity(node.input.len());
        for name in &node.input {
            if name.is_empty() {
                inputs.push(None);
                continue;
            }
            let id = graph
                .value_by_name(name)
                .ok_or_else(|| ImportError::Undefined {
                    node: node_name.clone(),
                    value: name.clone(),
                })?;
            inputs.push(Some(id));
        }
        // Before opset 18 an equal Split takes its part count from the node's outputs; the
        // op only sees attributes, so state the count as opset 18's `num_outputs`.
        let mut attrs = attrs;
        if op_type == "Split"
            && domain.is_empty()
            && inputs.get(1).copied().flatten().is_none()
            && attrs.get("num_outputs").is_none()
        {
            attrs = attrs.with("num_outputs", Attr::Int(node.output.len() as i64));
        }
        let outputs: Vec<String> = node
            .output
            .iter()
            .enumerate()
            .map(|(j, o)| {
                if o.is_empty() {
                    format!("{node_name}:unused{j}")
                } else {
                    o.clone()
                }
            })
            .collect();
        graph.add_node(
            registry, node_name, &domain, &op_type, attrs, inputs, outputs,
        )?;
    }

    let mut outputs = Vec::new();
    for out in &graph_proto.output {
        let name = out.name.clone().unwrap_or_default();
        let id = graph
            .value_by_name(&name)
            .ok_or_else(|| ImportError::UndefinedOutput(name.clone()))?;
        outputs.push((id, OutputRole::from_name(&name)));
    }
    graph.set_outputs(outputs);
    graph.verify(registry)?;
    Ok(graph)
}

/// The IR type of a graph input: dtype and dims (`dim_param` becomes a symbol; a missing dim
/// becomes a symbol named after the input and axis).
fn value_info_type(
    vi: &ValueInfoProto,
    options: &ImportOptions,
) -> Result<TensorType, ImportError> {
    let name = vi.name.clone().unwrap_or_default();
    let bad = |msg: String| ImportError::Input {
        name: name.clone(),
        msg,
    };
    let tensor = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t,
        _ => return Err(bad("only tensor inputs are supported".into())),
    };
    let code = tensor.elem_type.unwrap_or(0);
    let dtype = DType::from_onnx(code)
        .ok_or_else(|| bad(format!("unsupported element type code {code}")))?;
    let shape = tensor
        .shape
        .as_ref()
        .ok_or_else(|| bad("the input has no declared shape (rank is needed)".into()))?;
    let dims = shape
        .dim
        .iter()
        .enumerate()
        .map(|(axis, d)| {
            use super::proto::tensor_shape_proto::dimension::Value;
            match &d.value {
                Some(Value::DimValue(v)) if *v >= 0 => Ok(Dim::constant(*v)),
                Some(Value::DimValue(v)) => {
                    Err(bad(format!("negative dimension {v} at axis {axis}")))
                }
                // Exporters name dims with expressions too (Optimum's
                // `past_sequence_length + sequence_length`): keep them as expressions.
                Some(Value::DimParam(p)) if !p.is_empty() => Ok(match options.fixed_dims.get(p) {
                    Some(&v) => Dim::constant(v),
                    None => p
                        .parse::<Dim>()
                        .unwrap_or_else(|_| Dim::sym(&sanitize_symbol(p))),
                }),
                _ => Ok(Dim::sym(&format!("{}_{axis}", sanitize_symbol(&name)))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TensorType::new(dtype, dims))
}

/// Symbols print inside shapes, so keep them to identifier characters.
fn sanitize_symbol(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn constant_value(attrs: &Attrs) -> Option<patch_runtime::Tensor> {
    use patch_runtime::Tensor;
    let (name, attr) = attrs.0.iter().next()?;
    if attrs.0.len() != 1 {
        return None;
    }
    match (name.as_str(), attr) {
        ("value", Attr::Tensor(t)) => Some(t.clone()),
        ("value_int", Attr::Int(v)) => Some(Tensor::scalar(*v)),
        ("value_float", Attr::Float(v)) => Some(Tensor::scalar(*v)),
        ("value_ints", Attr::Ints(v)) => Tensor::from_vec(vec![v.len()], v.clone()).ok(),
        ("value_floats", Attr::Floats(v)) => Tensor::from_vec(vec![v.len()], v.clone()).ok(),
        _ => None,
    }
}

fn convert_attrs(
    model: &OnnxModel,
    node: &NodeProto,
    node_name: &str,
    op_type: &str,
) -> Result<Attrs, ImportError> {
    let mut attrs = Attrs::new();
    for a in &node.attribute {
        let name = a.name.clone().unwrap_or_default();
        let bad = |msg: String| ImportError::Attribute {
            node: node_name.to_string(),
            op_type: op_type.to_string(),
            attr: name.clone(),
            msg,
        };
        if a.ref_attr_name.is_some() {
            return Err(bad(
                "attribute references (functions) are not supported".into()
            ));
        }
        let kind =
            AttributeType::try_from(a.r#type.unwrap_or(0)).unwrap_or(AttributeType::Undefined);
        let string = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let value = match kind {
            AttributeType::Int => Attr::Int(a.i.unwrap_or(0)),
            AttributeType::Float => Attr::Float(a.f.unwrap_or(0.0)),
            AttributeType::String => Attr::String(string(a.s.as_deref().unwrap_or_default())),
            AttributeType::Ints => Attr::Ints(a.ints.clone()),
            AttributeType::Floats => Attr::Floats(a.floats.clone()),
            AttributeType::Strings => Attr::Strings(a.strings.iter().map(|s| string(s)).collect()),
            AttributeType::Tensor => {
                let t =
                    a.t.as_ref()
                        .ok_or_else(|| bad("tensor attribute without a tensor".into()))?;
                Attr::Tensor(
                    model
                        .tensor(t)
                        .map_err(|e| bad(e.to_string()))?
                        .to_aligned(),
                )
            }
            other => {
                return Err(bad(format!(
                    "attributes of type {} are not supported",
                    other.as_str_name()
                )))
            }
        };
        attrs.0.insert(name, value);
    }
    Ok(attrs)
}

/// Kahn's algorithm over value names, stable in the file's node order. A node whose inputs
/// can never all be defined is on a cycle (or reads an undefined value).
fn topological_order(nodes: &[NodeProto], graph: &Graph) -> Result<Vec<usize>, ImportError> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in &n.output {
            if !o.is_empty() {
                producer.insert(o.as_str(), i);
            }
        }
    }
    let mut pending = vec![0usize; nodes.len()];
    let mut consumers: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        let deps: HashSet<usize> = n
            .input
            .iter()
            .filter(|v| !v.is_empty() && graph.value_by_name(v).is_none())
            .filter_map(|v| producer.get(v.as_str()).copied())
            .collect();
        pending[i] = deps.len();
        for d in deps {
            consumers[d].push(i);
        }
        for v in &n.input {
            if !v.is_empty()
                && graph.value_by_name(v).is_none()
                && !producer.contains_key(v.as_str())
            {
                return Err(ImportError::Undefined {
                    node: n.name.clone().unwrap_or_default(),
                    value: v.clone(),
                });
            }
        }
    }
    // A min-heap on the node index keeps the file order whenever it is already valid.
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = (0..nodes.len())
        .filter(|&i| pending[i] == 0)
        .map(std::cmp::Reverse)
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        order.push(i);
        for &c in &consumers[i] {
            pending[c] -= 1;
            if pending[c] == 0 {
                ready.push(std::cmp::Reverse(c));
            }
        }
    }
    if order.len() != nodes.len() {
        let stuck = (0..nodes.len())
            .find(|&i| pending[i] > 0)
            .expect("some node is pending");
        let n = &nodes[stuck];
        return Err(ImportError::Cycle(
            n.name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("{} #{stuck}", n.op_type.as_deref().unwrap_or("node"))),
        ));
    }
    Ok(order)
}
