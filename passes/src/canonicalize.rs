//! Canonicalization: ops that leave their input unchanged are bypassed (their users read the
//! input directly; dead-code elimination then removes them). A no-op here is `Identity`, a
//! `Cast` to the input's own type, and a `Reshape`, `Expand`, `Flatten`, `Squeeze` or
//! `Unsqueeze` whose output type equals its input type, or a `Transpose` with the identity
//! permutation. Outputs that are graph outputs keep their producer (their names are the
//! model's interface).
//!
//! A `Reshape` (without `allowzero`) whose target is computed at run time from symbolic
//! dimensions gets a constant target instead when its output type allows one: `0` where the
//! output keeps the input's dimension at the same position, the constant where the dimension
//! is constant, and `-1` for at most one other. Then the shape arithmetic that built the
//! target dies in DCE (`[batch, seq, 576] → [batch, seq, 9, 64]` reads `[0, 0, 9, 64]`).
//!
//! So is a `Slice` with unit steps whose output type equals its input type (it takes the
//! whole input), and a `Concat` whose inputs are all empty along its axis but one.
//!
//! A rank-4 `Transpose{perm = [0, 2, 3, 1]}` (GPT-2's keys: `[b, s, h, d] → [b, h, d, s]` in one
//! step) becomes the head split `[0, 2, 1, 3]` followed by the key transpose `[0, 1, 3, 2]`, the
//! spelling every other exporter uses, so that attention fusion and the KV layout see one form.
//!
//! Also `Shape(Reshape(x, s))` reads `s` when `s` is known to hold no `0` or `-1` (so it is
//! the reshaped tensor's shape as is): the Reshape's data is then no longer needed just for
//! its shape, which lets fusion absorb the Reshape (e.g. the grouped-KV expansion whose shape
//! feeds the attention mask's slicing).

use patch_runtime::ir::{Attr, Attrs, Def};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, NodeId, RuntimeError, Tensor};

use crate::Pass;

pub struct Canonicalize;

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }

    fn run(&self, graph: &mut Graph, registry: &OpRegistry) -> Result<bool, RuntimeError> {
        let graph_outputs: Vec<_> = graph.outputs().iter().map(|(v, _)| *v).collect();
        let mut bypass = Vec::new();
        for (_, node) in graph.nodes() {
            let (Some(Some(input)), [output]) = (node.inputs.first(), node.outputs.as_slice())
            else {
                continue;
            };
            if graph_outputs.contains(output) {
                continue;
            }
            let same_type = graph.value(*input).ty == graph.value(*output).ty;
            let whole_shape = node.attrs.get("end").is_none()
                && matches!(node.attrs.get("start"), None | Some(Attr::Int(0)));
            if node.op_type == "Shape" && node.domain.is_empty() && whole_shape {
                if let Some(target) = reshape_target(graph, *input) {
                    bypass.push((*output, target));
                }
                continue;
            }
            let no_op = match node.op_type.as_str() {
                "Identity" => true,
                "Cast" | "Reshape" | "Expand" | "Flatten" | "Squeeze" | "Unsqueeze" => same_type,
                // Same type with unit steps: the whole input (Phi-3's rotary slice of a full
                // head).
                "Slice" => same_type && unit_steps(graph, node),
                // One input left once the empty ones are dropped.
                "Concat" => {
                    let nonempty: Vec<_> = node
                        .inputs
                        .iter()
                        .flatten()
                        .filter(|v| !is_empty_along(graph, **v, node))
                        .collect();
                    if let ([only], true) = (nonempty.as_slice(), same_type_as(graph, node)) {
                        bypass.push((*output, **only));
                    }
                    false
                }
                "Transpose" => {
                    same_type
                        && match node.attrs.get("perm") {
                            Some(Attr::Ints(p)) => {
                                p.iter().enumerate().all(|(i, &a)| a == i as i64)
                            }
                            _ => false,
                        }
                }
                _ => false,
            };
            if no_op && node.domain.is_empty() {
                bypass.push((*output, *input));
            }
        }
        let mut changed = false;
        for (output, input) in bypass {
            changed |= graph.replace_uses(output, input) > 0;
        }
        let key_transposes: Vec<NodeId> = graph
            .nodes()
            .filter(|(_, n)| {
                n.op_type == "Transpose"
                    && n.domain.is_empty()
                    && matches!(n.attrs.get("perm"), Some(Attr::Ints(p)) if p[..] == [0, 2, 3, 1])
            })
            .map(|(id, _)| id)
            .collect();
        for id in key_transposes {
            let node = graph.node(id);
            let input = node.inputs[0];
            let name = graph.value(node.outputs[0]).name.clone();
            let heads = graph.insert_node_before(
                registry,
                id,
                format!("{}.heads", node.name),
                "",
                "Transpose",
                Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1, 3])),
                vec![input],
                vec![format!("{name}.heads")],
            )?;
            graph.replace_node(
                registry,
                id,
                "",
                "Transpose",
                Attrs::new().with("perm", Attr::Ints(vec![0, 1, 3, 2])),
                vec![Some(heads[0])],
            )?;
            changed = true;
        }
        let reshapes: Vec<(NodeId, Vec<i64>)> = graph
            .nodes()
            .filter(|(_, n)| n.op_type == "Reshape" && n.domain.is_empty())
            .filter_map(|(id, n)| constant_target(graph, n).map(|t| (id, t)))
            .collect();
        for (id, target) in reshapes {
            let node = graph.node(id);
            let (attrs, data) = (node.attrs.clone(), node.inputs[0]);
            // Value names are unique (node names need not be).
            let name = graph.value(node.outputs[0]).name.clone();
            let len = target.len();
            let shape = graph.add_const(
                format!("{name}.target"),
                Tensor::from_vec(vec![len], target)?,
            )?;
            graph.replace_node(registry, id, "", "Reshape", attrs, vec![data, Some(shape)])?;
            changed = true;
        }
        Ok(changed)
    }
}

/// A Slice whose `steps` operand is absent or a constant of ones.
fn unit_steps(graph: &Graph, node: &patch_runtime::ir::Node) -> bool {
    match node.inputs.get(4).copied().flatten() {
        None => true,
        Some(steps) => graph
            .const_value(steps)
            .and_then(|t| t.to_f64_vec().ok())
            .is_some_and(|s| s.iter().all(|&x| x == 1.0)),
    }
}

/// Whether `v` has the constant length 0 along the Concat `node`'s axis.
fn is_empty_along(
    graph: &Graph,
    v: patch_runtime::ValueId,
    node: &patch_runtime::ir::Node,
) -> bool {
    let shape = &graph.value(v).ty.shape;
    let Ok(axis) = node.attrs.int_or("axis", 0) else {
        return false;
    };
    let rank = shape.len() as i64;
    let axis = if axis < 0 { axis + rank } else { axis };
    (0..rank).contains(&axis) && shape[axis as usize].as_const() == Some(0)
}

/// Whether the Concat `node`'s output has the type of its one non-empty input.
fn same_type_as(graph: &Graph, node: &patch_runtime::ir::Node) -> bool {
    let out = &graph.value(node.outputs[0]).ty;
    node.inputs
        .iter()
        .flatten()
        .filter(|v| !is_empty_along(graph, **v, node))
        .all(|v| &graph.value(*v).ty == out)
}

/// The constant target of a Reshape whose target is computed (see the module docs), when its
/// input and output types determine one and `allowzero` is off.
fn constant_target(graph: &Graph, node: &patch_runtime::ir::Node) -> Option<Vec<i64>> {
    if matches!(node.attrs.get("allowzero"), Some(Attr::Int(v)) if *v != 0) {
        return None;
    }
    let (Some(Some(data)), Some(Some(target))) = (node.inputs.first(), node.inputs.get(1)) else {
        return None;
    };
    if matches!(graph.value(*target).def, Def::Const(_)) {
        return None;
    }
    let input = &graph.value(*data).ty.shape;
    let output = &graph.value(*node.outputs.first()?).ty.shape;
    let mut inferred = false;
    output
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if input.get(i) == Some(d) {
                Some(0)
            } else if let Some(c) = d.as_const().filter(|&c| c > 0) {
                Some(c)
            } else if !inferred {
                inferred = true;
                Some(-1)
            } else {
                None
            }
        })
        .collect()
}

/// The shape operand of the `Reshape` producing `v`, when its content is known to be all
/// positive (no `0` copy or `-1` inference entries).
fn reshape_target(graph: &Graph, v: patch_runtime::ValueId) -> Option<patch_runtime::ValueId> {
    let Def::Node(producer, 0) = graph.value(v).def else {
        return None;
    };
    let node = graph.node(producer);
    if node.op_type != "Reshape" || !node.domain.is_empty() {
        return None;
    }
    let target = (*node.inputs.get(1)?)?;
    let sym = graph.value(target).sym.as_ref()?;
    let positive = sym
        .iter()
        .all(|d| d.as_const().map_or(d.is_nonnegative(), |c| c > 0));
    positive.then_some(target)
}
