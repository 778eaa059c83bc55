//! Canonicalization: ops that leave their input unchanged are bypassed (their users read the
//! input directly; dead-code elimination then removes them). A no-op here is `Identity`, a
//! `Cast` to the input's own type, and a `Reshape`, `Expand`, `Flatten`, `Squeeze` or
//! `Unsqueeze` whose output type equals its input type, or a `Transpose` with the identity
//! permutation. Outputs that are graph outputs keep their producer (their names are the
//! model's interface).
//!
//! Also `Shape(Reshape(x, s))` reads `s` when `s` is known to hold no `0` or `-1` (so it is
//! the reshaped tensor's shape as is): the Reshape's data is then no longer needed just for
//! its shape, which lets fusion absorb the Reshape (e.g. the grouped-KV expansion whose shape
//! feeds the attention mask's slicing).

use patch_runtime::ir::{Attr, Def};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, RuntimeError};

use crate::Pass;

pub struct Canonicalize;

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }

    fn run(&self, graph: &mut Graph, _registry: &OpRegistry) -> Result<bool, RuntimeError> {
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
        Ok(changed)
    }
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
