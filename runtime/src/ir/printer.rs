//! The stable text form of a graph: one line per input, constant, node and output, in
//! definition order. Deterministic for a given graph, so diffs of it are reviewable.
//!
//! ```text
//! graph "llama" opset 18 {
//!   input %input_ids: i64[batch, seq]  # ids
//!   const %w: f32[64, 64]
//!   const %shape: i64[2] = [-1, 64]
//!   %y: f32[batch, seq, 64] = MatMul(%x, %w)  # node_name
//!   %a: f32[..], %b: f32[..] = Split(%y, %s) {axis = -1}
//!   output %logits  # logits
//! }
//! ```

use std::fmt::Write;

use super::{Def, Graph};
use crate::dim::shape_to_string;

pub fn print(graph: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graph {:?} opset {} {{", graph.name, graph.opset);
    for (id, role) in graph.inputs() {
        let v = graph.value(*id);
        let _ = writeln!(out, "  input %{}: {}  # {}", v.name, v.ty, role.label());
    }
    for (id, t) in graph.consts() {
        let v = graph.value(id);
        let _ = write!(out, "  const %{}: {}", v.name, v.ty);
        if t.len() <= 8 {
            if let Ok(vals) = t.to_f64_vec() {
                let vals: Vec<String> = vals.iter().map(|x| format!("{x}")).collect();
                let _ = write!(out, " = [{}]", vals.join(", "));
            }
        }
        out.push('\n');
    }
    for (_, node) in graph.nodes() {
        out.push_str("  ");
        for (i, o) in node.outputs.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let v = graph.value(*o);
            let _ = write!(out, "%{}: {}", v.name, v.ty);
        }
        out.push_str(" = ");
        if !node.domain.is_empty() {
            let _ = write!(out, "{}.", node.domain);
        }
        let _ = write!(out, "{}(", node.op_type);
        for (i, input) in node.inputs.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            match input {
                Some(id) => {
                    let _ = write!(out, "%{}", graph.value(*id).name);
                }
                None => out.push('_'),
            }
        }
        out.push(')');
        if !node.attrs.is_empty() {
            let parts: Vec<String> = node
                .attrs
                .0
                .iter()
                .map(|(k, v)| format!("{k} = {v}"))
                .collect();
            let _ = write!(out, " {{{}}}", parts.join(", "));
        }
        // Symbolic contents of shape values make shape arithmetic readable.
        let syms: Vec<String> = node
            .outputs
            .iter()
            .filter_map(|o| graph.value(*o).sym.as_ref())
            .map(|s| shape_to_string(s))
            .collect();
        if !syms.is_empty() {
            let _ = write!(out, " -> {}", syms.join(", "));
        }
        if !node.name.is_empty() {
            let _ = write!(out, "  # {}", node.name);
        }
        out.push('\n');
    }
    for (id, role) in graph.outputs() {
        let v = graph.value(*id);
        let source = match v.def {
            Def::Input(_) => " (input)",
            Def::Const(_) => " (const)",
            Def::Node(..) | Def::Detached => "",
        };
        let _ = writeln!(
            out,
            "  output %{}: {}{}  # {}",
            v.name,
            v.ty,
            source,
            role.label()
        );
    }
    out.push_str("}\n");
    out
}
