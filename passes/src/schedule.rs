//! Memory-aware scheduling: reorders the nodes so that fewer activations are alive at once.
//!
//! A list scheduler over the dataflow: among the nodes whose inputs are ready it runs the one
//! that frees the most activation bytes net of what it allocates (the last reader of a buffer
//! frees it; a view, [`Op::view_of`], allocates nothing and keeps its source alive), ties
//! broken by the current order, so that an order with nothing to gain is kept as it is. Sizes
//! are those of the executor's memory plan (`f32` node outputs) with every symbol at
//! [`MemorySchedule::hint`]. The new order is kept only when the plan's arena at the hint is
//! smaller, or as small with fewer bytes alive at the peak: the pass never makes the plan
//! more expensive.
//!
//! [`Op::view_of`]: patch_runtime::ops::Op::view_of

use std::collections::{BTreeSet, HashMap};

use patch_runtime::dim::{volume, Bindings};
use patch_runtime::memplan::{MemoryFigures, MemoryPlan};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{DType, Graph, NodeId, RuntimeError};

use crate::Pass;

pub struct MemorySchedule {
    /// The value every symbolic dim takes when sizes are compared.
    pub hint: i64,
}

impl Default for MemorySchedule {
    /// Sizes compared at 512 for every symbol (a prompt of 512 tokens, batch 512 too: only
    /// the ratios between sizes matter to the order).
    fn default() -> MemorySchedule {
        MemorySchedule { hint: 512 }
    }
}

impl Pass for MemorySchedule {
    fn name(&self) -> &'static str {
        "schedule"
    }

    fn run(&self, graph: &mut Graph, _registry: &OpRegistry) -> Result<bool, RuntimeError> {
        let hint = hint_bindings(graph, self.hint);
        let Some(before) = figures(graph, &hint) else {
            return Ok(false);
        };
        let order = memory_order(graph, &hint);
        if order == graph.order() {
            return Ok(false);
        }
        let old = graph.order().to_vec();
        graph.set_order(order)?;
        let better = figures(graph, &hint)
            .is_some_and(|after| (after.arena, after.peak_live) < (before.arena, before.peak_live));
        if !better {
            graph.set_order(old)?;
        }
        Ok(better)
    }
}

/// Every symbol of the graph's value types bound to `hint`.
pub fn hint_bindings(graph: &Graph, hint: i64) -> Bindings {
    let mut b = Bindings::new();
    for v in 0..graph.value_count() {
        let value = graph.value(patch_runtime::ValueId(v as u32));
        for d in &value.ty.shape {
            for s in d.symbols() {
                b.insert(s, hint);
            }
        }
    }
    b
}

/// The memory plan's figures for `graph` in its current order under `bindings`.
pub fn figures(graph: &Graph, bindings: &Bindings) -> Option<MemoryFigures> {
    MemoryPlan::of_graph(graph).figures(graph, bindings)
}

/// The greedy order (see the module docs).
fn memory_order(graph: &Graph, hint: &Bindings) -> Vec<NodeId> {
    let order = graph.order().to_vec();
    let n = order.len();
    let nv = graph.value_count();
    let nodes: Vec<_> = order.iter().map(|&id| graph.node(id)).collect();
    let mut producer = vec![None::<usize>; nv];
    for (p, node) in nodes.iter().enumerate() {
        for o in &node.outputs {
            producer[o.0 as usize] = Some(p);
        }
    }
    // Storage root of every value (through views), and the bytes of each root.
    let mut root: Vec<usize> = (0..nv).collect();
    let mut bytes = vec![0usize; nv];
    for node in &nodes {
        let view = node.op.view_of();
        for o in &node.outputs {
            let v = o.0 as usize;
            let source = view.and_then(|i| node.inputs.get(i).copied().flatten());
            match source {
                Some(s) => root[v] = root[s.0 as usize],
                None => {
                    let value = graph.value(*o);
                    if value.ty.dtype == DType::F32 {
                        let elems = volume(&value.ty.shape).eval(hint).unwrap_or(0);
                        bytes[v] = usize::try_from(elems).unwrap_or(0) * DType::F32.size_of();
                    }
                }
            }
        }
    }
    // Reads left of every root (by any alias); graph outputs never free theirs.
    let mut reads_left = vec![0usize; nv];
    let mut escapes = vec![false; nv];
    for node in &nodes {
        for i in node.inputs.iter().flatten() {
            reads_left[root[i.0 as usize]] += 1;
        }
    }
    for (o, _) in graph.outputs() {
        escapes[root[o.0 as usize]] = true;
    }
    // Dependencies between positions.
    let mut waiting = vec![0usize; n];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (p, node) in nodes.iter().enumerate() {
        let mut deps: Vec<usize> = node
            .inputs
            .iter()
            .flatten()
            .filter_map(|i| producer[i.0 as usize])
            .collect();
        deps.sort_unstable();
        deps.dedup();
        waiting[p] = deps.len();
        for d in deps {
            users[d].push(p);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&p| waiting[p] == 0).collect();
    let mut out = Vec::with_capacity(n);
    let mut reads: HashMap<usize, usize> = HashMap::new();
    while !ready.is_empty() {
        // Net bytes freed by running `p` now.
        let mut gain = |p: usize| -> i64 {
            reads.clear();
            for i in nodes[p].inputs.iter().flatten() {
                *reads.entry(root[i.0 as usize]).or_default() += 1;
            }
            let freed: usize = reads
                .iter()
                .filter(|(r, k)| !escapes[**r] && reads_left[**r] == **k)
                .map(|(r, _)| bytes[*r])
                .sum();
            let allocated: usize = nodes[p].outputs.iter().map(|o| bytes[o.0 as usize]).sum();
            freed as i64 - allocated as i64
        };
        let mut best = None::<(i64, usize)>;
        for &p in &ready {
            let g = gain(p);
            if best.is_none_or(|(bg, _)| g > bg) {
                best = Some((g, p));
            }
        }
        let (_, p) = best.expect("ready is not empty");
        ready.remove(&p);
        for i in nodes[p].inputs.iter().flatten() {
            reads_left[root[i.0 as usize]] -= 1;
        }
        for &u in &users[p] {
            waiting[u] -= 1;
            if waiting[u] == 0 {
                ready.insert(u);
            }
        }
        out.push(order[p]);
    }
    out
}
