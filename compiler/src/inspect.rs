//! Model summaries for `patchc inspect`: op histogram, weight MatMuls, parameter count.

use std::collections::BTreeMap;
use std::fmt::Write;

use patch_runtime::ir::Def;
use patch_runtime::{Graph, ValueId};

/// A MatMul or Gemm whose weight operand is a constant (possibly through a `Transpose`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightMatMul {
    pub node: String,
    pub op_type: String,
    /// The constant holding the weight.
    pub weight: String,
    /// Reduction and output sizes of the product (`X[.., K] · W[K, N]`).
    pub k: usize,
    pub n: usize,
    /// True when the constant is stored `[N, K]` (a Transpose or Gemm `transB = 1`).
    pub transposed: bool,
}

/// The constant behind `id`, seeing through one `Transpose` with the default or `[1, 0]` perm.
fn weight_source(graph: &Graph, id: ValueId) -> Option<(ValueId, bool)> {
    match graph.value(id).def {
        Def::Const(_) => Some((id, false)),
        Def::Node(n, 0) => {
            let node = graph.node(n);
            let perm = node.attrs.ints("perm").ok()?;
            let is_swap = perm.is_none_or(|p| p == [1, 0]);
            if node.op_type == "Transpose" && node.domain.is_empty() && is_swap {
                let src = node.inputs.first().copied().flatten()?;
                graph.const_value(src).map(|_| (src, true))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Every MatMul/Gemm with a 2-D constant weight, in graph order.
pub fn weight_matmuls(graph: &Graph) -> Vec<WeightMatMul> {
    let mut out = Vec::new();
    for (_, node) in graph.nodes() {
        if !node.domain.is_empty() || !(node.op_type == "MatMul" || node.op_type == "Gemm") {
            continue;
        }
        let Some(Some(b)) = node.inputs.get(1).copied() else {
            continue;
        };
        let Some((src, mut transposed)) = weight_source(graph, b) else {
            continue;
        };
        if node.op_type == "Gemm" && node.attrs.int_or("transB", 0).unwrap_or(0) != 0 {
            transposed = !transposed;
        }
        let t = graph.const_value(src).expect("weight source is a constant");
        let &[r, c] = t.shape() else {
            continue;
        };
        let (k, n) = if transposed { (c, r) } else { (r, c) };
        out.push(WeightMatMul {
            node: node.name.clone(),
            op_type: node.op_type.clone(),
            weight: graph.value(src).name.clone(),
            k,
            n,
            transposed,
        });
    }
    out
}

/// Count of nodes per op type (domain-qualified when not the default domain).
pub fn op_histogram(graph: &Graph) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for (_, node) in graph.nodes() {
        let key = if node.domain.is_empty() {
            node.op_type.clone()
        } else {
            format!("{}.{}", node.domain, node.op_type)
        };
        *h.entry(key).or_insert(0) += 1;
    }
    h
}

/// The human-readable summary printed by `patchc inspect`.
pub fn summary(graph: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "graph {:?}, opset {}", graph.name, graph.opset);
    let _ = writeln!(s, "\ninputs:");
    for (id, role) in graph.inputs() {
        let v = graph.value(*id);
        let _ = writeln!(
            s,
            "  {:<32} {:<28} {}",
            v.name,
            v.ty.to_string(),
            role.label()
        );
    }
    let _ = writeln!(s, "outputs:");
    for (id, role) in graph.outputs() {
        let v = graph.value(*id);
        let _ = writeln!(
            s,
            "  {:<32} {:<28} {}",
            v.name,
            v.ty.to_string(),
            role.label()
        );
    }
    let hist = op_histogram(graph);
    let _ = writeln!(
        s,
        "\nops ({} nodes, {} types):",
        graph.node_count(),
        hist.len()
    );
    let mut by_count: Vec<_> = hist.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (op, n) in by_count {
        let _ = writeln!(s, "  {op:<24} {n:>6}");
    }
    let mms = weight_matmuls(graph);
    let weight_params: usize = mms.iter().map(|m| m.k * m.n).sum();
    let _ = writeln!(
        s,
        "\nweight matmuls ({}, {} parameters):",
        mms.len(),
        weight_params
    );
    let _ = writeln!(
        s,
        "  {:<40} {:<7} {:>6} {:>6}  weight",
        "node", "op", "K", "N"
    );
    for m in &mms {
        let t = if m.transposed { " (stored [N, K])" } else { "" };
        let _ = writeln!(
            s,
            "  {:<40} {:<7} {:>6} {:>6}  {}{t}",
            m.node, m.op_type, m.k, m.n, m.weight
        );
    }
    let params = graph.const_elements();
    let _ = writeln!(
        s,
        "\nparameters: {params} ({:.2} M) in {} constants",
        params as f64 / 1e6,
        graph.consts().count()
    );
    s
}
