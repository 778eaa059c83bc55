//! Model summaries for `patchc inspect`: op histogram, weight MatMuls, parameter count, and
//! what fusion would leave unfused.

use std::collections::BTreeMap;
use std::fmt::Write;

use patch_passes::fuse::unfused::unfused_in_decode_path;
use patch_passes::fuse::{Fuse, FuseLimits};
pub use patch_passes::hybrid::{weight_matmuls, WeightMatMul};
use patch_passes::PassError;
use patch_runtime::ops::OpRegistry;
use patch_runtime::Graph;

/// Count of nodes per op type (domain-qualified when not the default domain).
pub fn op_histogram(graph: &Graph) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for (_, node) in graph.nodes() {
        let key = node.qualified_op_type();
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

/// What the compiler's fusion would make of `graph` (cleanup and fusion run on a copy): the
/// fused ops it forms and the ops it would leave unfused in the decode path.
pub fn fusion_summary(graph: &Graph, registry: &OpRegistry) -> Result<String, Box<PassError>> {
    let mut fused = graph.clone();
    patch_passes::cleanup_pipeline(registry)
        .run(&mut fused)
        .map_err(Box::new)?;
    let fuse = Fuse::new(FuseLimits::default());
    let report = fuse.report_handle();
    patch_passes::fusion_pipeline(registry, fuse)
        .run(&mut fused)
        .map_err(Box::new)?;
    let report = report.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut s = String::new();
    let formed: Vec<String> = report
        .fused
        .iter()
        .map(|(op, n)| format!("{op} ×{n}"))
        .collect();
    let _ = writeln!(
        s,
        "
fusion: {}",
        if formed.is_empty() {
            "nothing fused".to_string()
        } else {
            formed.join(", ")
        }
    );
    let unfused = unfused_in_decode_path(&fused);
    if unfused.is_empty() {
        let _ = writeln!(s, "left unfused in the decode path: nothing");
    } else {
        let _ = writeln!(
            s,
            "left unfused in the decode path (each runs as its own op on every token):"
        );
        for (op, n) in unfused {
            let _ = writeln!(s, "  {op:<24} {n:>6}");
        }
    }
    Ok(s)
}
