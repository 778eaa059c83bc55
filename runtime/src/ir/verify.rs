//! The verifier: checks that a graph is well formed, so that every pass can be followed by a
//! check that names the first thing it broke.
//!
//! Invariants: the node order is topological (hence acyclic) and covers every live node once;
//! each value is defined exactly once and every use refers to a defined value; graph outputs
//! are defined; each node's recorded output types equal what inference derives again.

use std::collections::HashSet;

use super::{Def, Graph, NodeId};
use crate::error::RuntimeError;
use crate::infer;
use crate::ops::OpRegistry;

pub fn verify(graph: &Graph, registry: &OpRegistry) -> Result<(), RuntimeError> {
    let mut defined = vec![false; graph.value_count()];
    for (i, v) in graph.values.iter().enumerate() {
        if matches!(v.def, Def::Input(_) | Def::Const(_)) {
            defined[i] = true;
        }
    }
    let mut seen: HashSet<NodeId> = HashSet::new();
    for &id in &graph.order {
        let node = graph.nodes[id.0 as usize]
            .as_ref()
            .ok_or_else(|| RuntimeError::Verify(format!("order lists removed node #{}", id.0)))?;
        if !seen.insert(id) {
            return Err(RuntimeError::Verify(format!(
                "node `{}` is scheduled twice",
                node.name
            )));
        }
        for input in node.inputs.iter().flatten() {
            if !defined[input.0 as usize] {
                let v = graph.value(*input);
                return match v.def {
                    Def::Node(..) => Err(RuntimeError::Cycle(node.name.clone())),
                    _ => Err(RuntimeError::Undefined(v.name.clone())),
                };
            }
        }
        for (index, out) in node.outputs.iter().enumerate() {
            let v = graph.value(*out);
            match v.def {
                Def::Node(n, i) if n == id && i == index => {}
                _ => return Err(RuntimeError::Redefined(v.name.clone())),
            }
            if defined[out.0 as usize] {
                return Err(RuntimeError::Redefined(v.name.clone()));
            }
            defined[out.0 as usize] = true;
        }
        // The op must still be buildable from its attributes and agree with the recorded types.
        let opset = if node.domain.is_empty() {
            graph.opset
        } else {
            1
        };
        registry.build(&node.domain, &node.op_type, opset, &node.attrs, &node.name)?;
        let facts = infer::infer_node(
            graph,
            &node.name,
            &node.op_type,
            node.op.as_ref(),
            &node.inputs,
        )?;
        for (out, fact) in node.outputs.iter().zip(&facts) {
            let v = graph.value(*out);
            if v.ty != fact.ty {
                return Err(RuntimeError::Verify(format!(
                    "node `{}` ({}): output `{}` is recorded as {} but infers as {}",
                    node.name, node.op_type, v.name, v.ty, fact.ty
                )));
            }
        }
    }
    let live = graph.nodes.iter().filter(|n| n.is_some()).count();
    if live != seen.len() {
        return Err(RuntimeError::Verify(format!(
            "{} live nodes but {} scheduled",
            live,
            seen.len()
        )));
    }
    for (out, _) in graph.outputs() {
        if !defined[out.0 as usize] {
            return Err(RuntimeError::Undefined(graph.value(*out).name.clone()));
        }
    }
    Ok(())
}
