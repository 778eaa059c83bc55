//! The reference interpreter: runs a graph node by node on concrete tensors.
//!
//! It binds the symbols of the input shapes, evaluates each node in order, and checks every
//! produced tensor against the shape inference derived for it (so a wrong inference rule is
//! caught at the node that has it). Intermediate tensors are dropped after their last use.

use std::collections::HashMap;

use crate::dim::{shape_to_string, Bindings};
use crate::error::RuntimeError;
use crate::ir::{Def, Graph, ValueId};
use crate::tensor::Tensor;

/// Runs `graph` on `inputs` (in graph input order) and returns its outputs in order.
pub fn run(graph: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
    if inputs.len() != graph.inputs().len() {
        return Err(RuntimeError::Input {
            name: graph.name.clone(),
            msg: format!(
                "the graph takes {} inputs but {} were given",
                graph.inputs().len(),
                inputs.len()
            ),
        });
    }
    let mut bindings = Bindings::new();
    for ((id, _), t) in graph.inputs().iter().zip(inputs) {
        let v = graph.value(*id);
        if t.dtype() != v.ty.dtype {
            return Err(RuntimeError::Input {
                name: v.name.clone(),
                msg: format!("expected {}, got {}", v.ty.dtype, t.dtype()),
            });
        }
        bind_shape(&mut bindings, &v.ty.shape, t.shape()).map_err(|msg| RuntimeError::Input {
            name: v.name.clone(),
            msg,
        })?;
    }

    let mut uses = graph.use_counts();
    let mut env: HashMap<ValueId, Tensor> = HashMap::new();
    for ((id, _), t) in graph.inputs().iter().zip(inputs) {
        env.insert(*id, t.clone());
    }
    let fetch = |env: &HashMap<ValueId, Tensor>, id: ValueId| -> Option<Tensor> {
        match &graph.value(id).def {
            // A misaligned weight is copied for this use only and dropped after it.
            Def::Const(t) => Some(t.to_aligned()),
            _ => env.get(&id).cloned(),
        }
    };

    for (_, node) in graph.nodes() {
        let args: Vec<Option<Tensor>> = node
            .inputs
            .iter()
            .map(|i| i.and_then(|id| fetch(&env, id)))
            .collect();
        for (slot, arg) in node.inputs.iter().zip(&args) {
            if let (Some(id), None) = (slot, arg) {
                return Err(RuntimeError::Undefined(graph.value(*id).name.clone()));
            }
        }
        let refs: Vec<Option<&Tensor>> = args.iter().map(|a| a.as_ref()).collect();
        let results = node
            .op
            .eval(&refs)
            .map_err(|e| RuntimeError::at_node(&node.name, &node.op_type, e))?;
        if results.len() < node.outputs.len() {
            return Err(RuntimeError::at_node(
                &node.name,
                &node.op_type,
                crate::OpError::Invalid(format!(
                    "produced {} outputs, the node has {}",
                    results.len(),
                    node.outputs.len()
                )),
            ));
        }
        for (out, t) in node.outputs.iter().zip(results) {
            let v = graph.value(*out);
            if t.dtype() != v.ty.dtype {
                return Err(RuntimeError::Verify(format!(
                    "node `{}` ({}): output `{}` is {} but inference said {}",
                    node.name,
                    node.op_type,
                    v.name,
                    t.dtype(),
                    v.ty.dtype
                )));
            }
            bind_shape(&mut bindings, &v.ty.shape, t.shape()).map_err(|msg| {
                RuntimeError::Verify(format!(
                    "node `{}` ({}): output `{}`: {msg}",
                    node.name, node.op_type, v.name
                ))
            })?;
            env.insert(*out, t);
        }
        for id in node.inputs.iter().flatten() {
            let n = &mut uses[id.0 as usize];
            *n = n.saturating_sub(1);
            if *n == 0 {
                env.remove(id);
            }
        }
    }

    graph
        .outputs()
        .iter()
        .map(|(id, _)| {
            fetch(&env, *id).ok_or_else(|| RuntimeError::Undefined(graph.value(*id).name.clone()))
        })
        .collect()
}

/// Unifies a symbolic shape with a concrete one: binds single-symbol dims seen for the first
/// time and checks everything else.
fn bind_shape(
    bindings: &mut Bindings,
    shape: &[crate::Dim],
    actual: &[usize],
) -> Result<(), String> {
    let mismatch = || {
        format!(
            "shape {} does not match the concrete shape {actual:?}",
            shape_to_string(shape)
        )
    };
    if shape.len() != actual.len() {
        return Err(mismatch());
    }
    // Single symbols first, so that expressions over them can be checked afterwards.
    for (d, &a) in shape.iter().zip(actual) {
        if let Some(s) = d.as_sym() {
            match bindings.get(s) {
                Some(&b) if b != a as i64 => {
                    return Err(format!("{} (symbol `{s}` is already {b})", mismatch()));
                }
                Some(_) => {}
                None => {
                    bindings.insert(s.into(), a as i64);
                }
            }
        }
    }
    for (d, &a) in shape.iter().zip(actual) {
        match d.eval(bindings) {
            Ok(v) if v == a as i64 => {}
            Ok(_) => return Err(mismatch()),
            // A symbol that no input binds (a data-dependent size) is learnt only when it
            // stands alone, handled above; an expression over one cannot be checked.
            Err(_) => {}
        }
    }
    Ok(())
}
