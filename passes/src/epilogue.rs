//! Residual epilogues: `Add(HybridMatMul(x, W, ...), r)` becomes `HybridMatMul(x, W, ..., r)`,
//! whose kernel adds `r` to its output as it writes it — one node and one pass over the
//! activations fewer per residual connection (two per transformer block).
//!
//! Folded only when the product has no other user and is not a graph output, the product
//! does not already carry a residual, and `r` has exactly the sum's type (no broadcasting).
//! The sum keeps its value id, name and position; the product is left to dead-code
//! elimination. Exact: `r + (x·W + b)` and `(x·W + b) + r` are the same f32 sum.

use patch_runtime::ir::Def;
use patch_runtime::ops::hybrid;
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, NodeId, RuntimeError};

use crate::Pass;

/// Input index of the residual on `patch.HybridMatMul`.
const RESIDUAL: usize = 4;

pub struct ResidualEpilogue;

impl Pass for ResidualEpilogue {
    fn name(&self) -> &'static str {
        "epilogue"
    }

    fn run(&self, graph: &mut Graph, registry: &OpRegistry) -> Result<bool, RuntimeError> {
        let uses = graph.use_counts();
        let is_output =
            |g: &Graph, v: patch_runtime::ValueId| g.outputs().iter().any(|(o, _)| *o == v);
        let mut changed = false;
        let adds: Vec<NodeId> = graph
            .nodes()
            .filter(|(_, n)| n.domain.is_empty() && n.op_type == "Add" && n.inputs.len() == 2)
            .map(|(id, _)| id)
            .collect();
        for add in adds {
            let node = graph.node(add);
            let (Some(a), Some(b)) = (node.inputs[0], node.inputs[1]) else {
                continue;
            };
            let sum_ty = graph.value(node.outputs[0]).ty.clone();
            let fold = [(a, b), (b, a)]
                .into_iter()
                .find_map(|(product, residual)| {
                    let Def::Node(mm, 0) = graph.value(product).def else {
                        return None;
                    };
                    let mm_node = graph.node(mm);
                    let foldable = mm_node.domain == hybrid::DOMAIN
                        && mm_node.op_type == hybrid::OP_TYPE
                        && mm_node.inputs.len() <= RESIDUAL
                        && uses[product.0 as usize] == 1
                        && !is_output(graph, product)
                        && graph.value(product).ty == sum_ty
                        && graph.value(residual).ty == sum_ty;
                    foldable.then(|| {
                        let mut inputs = mm_node.inputs.clone();
                        inputs.resize(RESIDUAL, None);
                        inputs.push(Some(residual));
                        (mm_node.attrs.clone(), inputs)
                    })
                });
            if let Some((attrs, inputs)) = fold {
                graph.replace_node(
                    registry,
                    add,
                    hybrid::DOMAIN,
                    hybrid::OP_TYPE,
                    attrs,
                    inputs,
                )?;
                changed = true;
            }
        }
        Ok(changed)
    }
}
