//! Dead-code elimination: removes nodes none of whose outputs reach a graph output, then
//! detaches the constants nothing uses any more.

use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, RuntimeError};

use crate::Pass;

pub struct DeadCodeElimination;

impl Pass for DeadCodeElimination {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn run(&self, graph: &mut Graph, _registry: &OpRegistry) -> Result<bool, RuntimeError> {
        let mut uses = graph.use_counts();
        let mut removed = false;
        // Reverse topological order: a node's users are visited before it.
        for id in graph.order().to_vec().into_iter().rev() {
            let node = graph.node(id);
            if node.outputs.iter().all(|o| uses[o.0 as usize] == 0) {
                for input in node.inputs.iter().flatten() {
                    uses[input.0 as usize] -= 1;
                }
                graph.remove_node(id);
                removed = true;
            }
        }
        Ok(graph.detach_unused_consts() > 0 || removed)
    }
}
