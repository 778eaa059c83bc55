//! What fusion left in the decode path: the float compute that still runs as single
//! reference ops, one dispatch and one pass over memory each, on every generated token.
//!
//! The decode path is everything that depends on the token embedding or the KV cache: values
//! reached, through float tensors only, from the token-id input's float consumers (the
//! embedding gather) and from the past keys and values. Side values computed from the graph's
//! inputs alone (the causal mask, rotary tables, positions) are computed once per step for all
//! layers and are not counted; neither is integer shape arithmetic.
//!
//! Not counted either, because they are what a fused block consists of: ops of the `patch`
//! domain (fused ops, hybrid products, cache appends), weight products (`MatMul` / `Gemm` with
//! a constant operand), the residual and bias adds that the hybrid products take in their
//! epilogue, default-domain ops that are whole computations (`LayerNormalization`), and data
//! movement (reshapes, transposes, slices, concats, gathers).

use std::collections::{BTreeMap, HashSet};

use patch_runtime::ir::{Def, InputRole};
use patch_runtime::{Graph, NodeId, ValueId};

/// Default-domain ops that are already one kernel for the whole computation.
const WHOLE_OPS: &[&str] = &["LayerNormalization", "RMSNormalization", "Gelu"];

/// Ops that move or index data without arithmetic.
const DATA_MOVEMENT: &[&str] = &[
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Concat",
    "Slice",
    "Split",
    "Gather",
    "Expand",
    "Identity",
];

fn is_const(graph: &Graph, v: Option<ValueId>) -> bool {
    v.is_some_and(|v| matches!(graph.value(v).def, Def::Const(_)))
}

fn producer(graph: &Graph, v: Option<ValueId>) -> Option<NodeId> {
    match graph.value(v?).def {
        Def::Node(n, _) => Some(n),
        _ => None,
    }
}

fn is_weight_product(graph: &Graph, n: NodeId) -> bool {
    let node = graph.node(n);
    matches!(node.op_type.as_str(), "MatMul" | "Gemm")
        && node.domain.is_empty()
        && node.inputs.iter().any(|v| is_const(graph, *v))
}

/// An `Add` that a hybrid product absorbs: the residual add of two activations of one shape,
/// or a constant bias added to a weight product's output.
fn is_epilogue_add(graph: &Graph, n: NodeId) -> bool {
    let node = graph.node(n);
    if node.op_type != "Add" || !node.domain.is_empty() || node.inputs.len() != 2 {
        return false;
    }
    let (a, b) = (node.inputs[0], node.inputs[1]);
    let from_product = |v| {
        producer(graph, v).is_some_and(|p| {
            let node = graph.node(p);
            is_weight_product(graph, p)
                || (node.domain == "patch" && node.op_type == "HybridMatMul")
        })
    };
    match (is_const(graph, a), is_const(graph, b)) {
        (false, false) => {
            let shape = |v: Option<ValueId>| v.map(|v| &graph.value(v).ty.shape);
            shape(a) == shape(b)
        }
        (true, false) => from_product(b),
        (false, true) => from_product(a),
        (true, true) => false,
    }
}

/// The nodes of the decode path (see the module docs), in graph order.
pub fn decode_path(graph: &Graph) -> Vec<NodeId> {
    let is_float = |v: ValueId| graph.value(v).ty.dtype.is_float();
    let mut live: HashSet<ValueId> = graph
        .inputs()
        .iter()
        .filter(|(_, role)| matches!(role, InputRole::PastKey(_) | InputRole::PastValue(_)))
        .map(|(v, _)| *v)
        .collect();
    let ids: HashSet<ValueId> = graph
        .inputs()
        .iter()
        .filter(|(_, role)| *role == InputRole::TokenIds)
        .map(|(v, _)| *v)
        .collect();
    let mut path = Vec::new();
    for &n in graph.order() {
        let node = graph.node(n);
        let reads_live = node.inputs.iter().flatten().any(|v| live.contains(v));
        let embeds = node.inputs.iter().flatten().any(|v| ids.contains(v));
        if !(reads_live || embeds) {
            continue;
        }
        let float_outputs: Vec<ValueId> = node
            .outputs
            .iter()
            .copied()
            .filter(|&v| is_float(v))
            .collect();
        if float_outputs.is_empty() {
            continue;
        }
        live.extend(float_outputs);
        path.push(n);
    }
    path
}

/// Op types left unfused in the decode path, with their counts (see the module docs).
pub fn unfused_in_decode_path(graph: &Graph) -> BTreeMap<String, usize> {
    let mut left = BTreeMap::new();
    for n in decode_path(graph) {
        let node = graph.node(n);
        let op = node.op_type.as_str();
        let part_of_a_fused_block = node.domain == "patch"
            || DATA_MOVEMENT.contains(&op)
            || (node.domain.is_empty() && WHOLE_OPS.contains(&op))
            || is_weight_product(graph, n)
            || is_epilogue_add(graph, n);
        if !part_of_a_fused_block {
            let name = if node.domain.is_empty() {
                node.op_type.clone()
            } else {
                format!("{}.{}", node.domain, node.op_type)
            };
            *left.entry(name).or_insert(0) += 1;
        }
    }
    left
}
