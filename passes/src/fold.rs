//! Constant folding: a node whose inputs are all constants is evaluated once at compile time,
//! and a node whose outputs have fully known content (shape arithmetic over dimensions that
//! are concrete, e.g. `Shape → Gather → Div` giving a head size) becomes that content. Outputs
//! larger than [`ConstantFolding::max_bytes`] are left alone so the bundle does not grow.
//!
//! Shape arithmetic over symbolic dimensions (batch, sequence) cannot become constants; it
//! stays as nodes.

use patch_runtime::infer::tensor_of_sym;
use patch_runtime::ir::Def;
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, RuntimeError, Tensor};

use crate::Pass;

pub struct ConstantFolding {
    /// Largest total size of one node's folded outputs.
    pub max_bytes: usize,
}

impl Default for ConstantFolding {
    fn default() -> Self {
        ConstantFolding { max_bytes: 1 << 20 }
    }
}

/// Ops whose result is not a function of their inputs (never folded, never merged).
pub fn is_nondeterministic(op_type: &str) -> bool {
    op_type.starts_with("Random") || matches!(op_type, "Multinomial" | "Bernoulli")
}

impl Pass for ConstantFolding {
    fn name(&self) -> &'static str {
        "fold-constants"
    }

    fn run(&self, graph: &mut Graph, _registry: &OpRegistry) -> Result<bool, RuntimeError> {
        let mut changed = false;
        for id in graph.order().to_vec() {
            let node = graph.node(id);
            if is_nondeterministic(&node.op_type) {
                continue;
            }
            // Outputs whose inferred size is already past the limit are never computed (a
            // `ConstantOfShape` of 10^12 elements must not be allocated to find that out).
            let declared: Option<usize> = node.outputs.iter().try_fold(0usize, |sum, &o| {
                let ty = &graph.value(o).ty;
                let volume = ty.shape.iter().try_fold(1usize, |a, d| {
                    a.checked_mul(usize::try_from(d.as_const()?).ok()?)
                })?;
                sum.checked_add(volume.checked_mul(ty.dtype.size_of())?)
            });
            let all_constant = node.outputs.iter().all(|&o| {
                let ty = &graph.value(o).ty;
                ty.shape.iter().all(|d| d.as_const().is_some())
            });
            if all_constant && declared.is_none_or(|b| b > self.max_bytes) {
                continue;
            }
            // Known content of every output (from symbolic inference).
            let from_sym: Option<Vec<Tensor>> = node
                .outputs
                .iter()
                .map(|&o| {
                    let v = graph.value(o);
                    tensor_of_sym(v.ty.dtype, &v.ty.shape, v.sym.as_deref()?)
                })
                .collect();
            let folded = match from_sym {
                Some(values) => values,
                None => {
                    // Large constants may borrow misaligned bytes (weights embedded in an
                    // ONNX file); ops read typed slices, so those are aligned (copied) here.
                    let consts: Option<Vec<Option<Tensor>>> = node
                        .inputs
                        .iter()
                        .map(|i| match i {
                            None => Some(None),
                            Some(v) => match &graph.value(*v).def {
                                Def::Const(t) => Some(Some(t.to_aligned())),
                                _ => None,
                            },
                        })
                        .collect();
                    let Some(consts) = consts else { continue };
                    if consts.iter().all(Option::is_none) {
                        continue;
                    }
                    let refs: Vec<Option<&Tensor>> = consts.iter().map(Option::as_ref).collect();
                    node.op
                        .eval(&refs)
                        .map_err(|e| RuntimeError::at_node(&node.name, &node.op_type, e))?
                }
            };
            let bytes: usize = folded.iter().map(|t| t.bytes().len()).sum();
            if bytes > self.max_bytes {
                continue;
            }
            graph.fold_node(id, folded)?;
            changed = true;
        }
        if changed {
            graph.detach_unused_consts();
        }
        Ok(changed)
    }
}
