//! Canonicalization: ops that leave their input unchanged are bypassed (their users read the
//! input directly; dead-code elimination then removes them). A no-op here is `Identity`, a
//! `Cast` to the input's own type, and a `Reshape`, `Expand`, `Flatten`, `Squeeze` or
//! `Unsqueeze` whose output type equals its input type, or a `Transpose` with the identity
//! permutation. Outputs that are graph outputs keep their producer (their names are the
//! model's interface).

use patch_runtime::ir::Attr;
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
