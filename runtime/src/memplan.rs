//! The executor's static memory plan: which activations share a buffer.
//!
//! Every `f32` value a node produces is planned (other dtypes are shapes, indices and masks,
//! small enough to allocate). A value lives from the node that produces it to its last reader,
//! extended through the views that share its bytes (an op's [`Op::view_of`]); values whose
//! lifetimes do not overlap share a slot. Slots are chosen once, at plan time, in schedule
//! order: a value takes a free slot of the same size, else one provably larger, else one
//! provably smaller (which grows to it), else a new one. Sizes are expressions of the graph's
//! symbolic dims, so the arena (the sum of the slots) is one expression too, evaluated once per
//! call ([`MemoryPlan::slot_elements`]) to size the buffers before the first node runs.
//!
//! Graph outputs escape to the caller and keep slots of their own. Outputs of views take no
//! slot: their bytes are their source's.
//!
//! [`Op::view_of`]: crate::ops::Op::view_of

use crate::dim::{volume, Bindings, Dim};
use crate::dtype::DType;
use crate::ir::{Def, Graph};

/// Slot assignment of a graph's activations (see the module docs).
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    /// Slot of every value, by value index (`None`: not planned).
    slot_of: Vec<Option<u32>>,
    /// Size of every slot, in `f32` elements.
    slot_elements: Vec<Dim>,
    /// Number of planned values.
    planned: usize,
    /// Sum of the planned values' sizes, in elements: the memory without reuse.
    unshared_elements: Dim,
    /// Per node position: the positions of the nodes whose outputs are computed there.
    computed_here: Vec<Vec<usize>>,
}

/// Figures of a plan under one call's dims, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryFigures {
    /// Sum of the slot sizes.
    pub arena: usize,
    /// Sum of the planned values' sizes (every activation in its own buffer).
    pub unshared: usize,
    /// The most bytes of planned values alive at once, in this schedule: no assignment of
    /// buffers can do with less.
    pub peak_live: usize,
}

impl MemoryPlan {
    /// Plans the values of `graph` in its node order; `is_const(v)` names values that need no
    /// buffer (constants the executor keeps). `computed_at[p]`, when given, is the position
    /// at which the executor computes the node at position `p` (never after `p`: a sibling
    /// product computed with the first of its group).
    pub fn new(
        graph: &Graph,
        is_const: impl Fn(usize) -> bool,
        computed_at: Option<&[usize]>,
    ) -> MemoryPlan {
        let lifetimes = Lifetimes::of(graph, &is_const);
        let mut plan = MemoryPlan {
            slot_of: vec![None; graph.value_count()],
            slot_elements: Vec::new(),
            planned: 0,
            unshared_elements: Dim::constant(0),
            computed_here: Vec::new(),
        };
        let nodes: Vec<_> = graph.nodes().map(|(_, node)| node).collect();
        // Per position: the nodes whose outputs are computed there.
        let mut computed_here: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
        for p in 0..nodes.len() {
            let at = computed_at.and_then(|c| c.get(p).copied()).unwrap_or(p);
            computed_here[at.min(p)].push(p);
        }
        // Slots free for the next node's outputs.
        let mut free: Vec<u32> = Vec::new();
        for (pos, here) in computed_here.iter().enumerate() {
            for node in here.iter().map(|&p| nodes[p]) {
                let is_view = node.op.view_of().is_some();
                for out in &node.outputs {
                    let v = out.0 as usize;
                    if is_view || !planned(graph, v, &is_const) {
                        continue;
                    }
                    let need = volume(&graph.value(*out).ty.shape);
                    plan.planned += 1;
                    plan.unshared_elements = plan.unshared_elements.clone() + need.clone();
                    let slot = if lifetimes.escapes[v] {
                        plan.new_slot(need)
                    } else {
                        plan.take_free(&mut free, need)
                    };
                    plan.slot_of[v] = Some(slot);
                }
            }
            // Inputs and outputs whose lifetime ends here give their slot back (after the
            // outputs were placed: a node never writes into a slot it reads).
            for &v in &lifetimes.ending[pos] {
                if let Some(s) = plan.slot_of[v] {
                    free.push(s);
                }
            }
        }
        plan.computed_here = computed_here;
        plan
    }

    /// [`MemoryPlan::new`] in node order, with the graph's constants as the values that need
    /// no buffer (how the compiler reports the plan).
    pub fn of_graph(graph: &Graph) -> MemoryPlan {
        let is_const = |v: usize| graph.const_value(crate::ValueId(v as u32)).is_some();
        MemoryPlan::new(graph, is_const, None)
    }

    fn new_slot(&mut self, elements: Dim) -> u32 {
        self.slot_elements.push(elements);
        (self.slot_elements.len() - 1) as u32
    }

    /// A slot from `free` for a value of `need` elements (removed from `free`), or a new one.
    fn take_free(&mut self, free: &mut Vec<u32>, need: Dim) -> u32 {
        let size = |s: &u32| &self.slot_elements[*s as usize];
        let pick = free
            .iter()
            .position(|s| *size(s) == need)
            .or_else(|| {
                free.iter()
                    .position(|s| (size(s).clone() - need.clone()).is_nonnegative())
            })
            .or_else(|| {
                free.iter()
                    .position(|s| (need.clone() - size(s).clone()).is_nonnegative())
            });
        match pick {
            Some(i) => {
                let s = free.swap_remove(i);
                let slot = &mut self.slot_elements[s as usize];
                if !(slot.clone() - need.clone()).is_nonnegative() {
                    *slot = need;
                }
                s
            }
            None => self.new_slot(need),
        }
    }

    /// The slot of value `v`, if it has one.
    pub fn slot_of(&self, v: usize) -> Option<u32> {
        self.slot_of.get(v).copied().flatten()
    }

    pub fn slot_count(&self) -> usize {
        self.slot_elements.len()
    }

    pub fn planned_values(&self) -> usize {
        self.planned
    }

    /// Size of every slot, in `f32` elements, as expressions of the graph's dims.
    pub fn slot_sizes(&self) -> &[Dim] {
        &self.slot_elements
    }

    /// The arena's size in bytes: the sum of the slots.
    pub fn arena_bytes(&self) -> Dim {
        let elements = self
            .slot_elements
            .iter()
            .cloned()
            .fold(Dim::constant(0), |a, b| a + b);
        elements * Dim::constant(DType::F32.size_of() as i64)
    }

    /// Bytes of the planned values without any sharing.
    pub fn unshared_bytes(&self) -> Dim {
        self.unshared_elements.clone() * Dim::constant(DType::F32.size_of() as i64)
    }

    /// Every slot's size under `bindings`, in elements; `None` where a symbol is not bound
    /// (a size known only once a node has run).
    pub fn slot_elements<'a>(
        &'a self,
        bindings: &'a Bindings,
    ) -> impl Iterator<Item = Option<usize>> + 'a {
        self.slot_elements
            .iter()
            .map(|d| d.eval(bindings).ok().and_then(|n| usize::try_from(n).ok()))
    }

    /// The plan's figures under `bindings` (`None` when a size depends on an unbound symbol).
    pub fn figures(&self, graph: &Graph, bindings: &Bindings) -> Option<MemoryFigures> {
        let eval = |d: &Dim| d.eval(bindings).ok().and_then(|n| usize::try_from(n).ok());
        let bytes = |d: &Dim| eval(d).map(|n| n * DType::F32.size_of());
        let arena = eval(&self.arena_bytes())?;
        let unshared = bytes(&self.unshared_elements)?;
        // Live bytes after each node: the outputs computed there appear, ended lifetimes
        // leave.
        let lifetimes = Lifetimes::of(graph, &|v| self.slot_of[v].is_none());
        let nodes: Vec<_> = graph.nodes().map(|(_, node)| node).collect();
        let size = |v: crate::ValueId| bytes(&volume(&graph.value(v).ty.shape));
        let (mut live, mut peak) = (0usize, 0usize);
        for (pos, here) in self.computed_here.iter().enumerate() {
            for out in here.iter().flat_map(|&p| &nodes[p].outputs) {
                if self.slot_of(out.0 as usize).is_some() {
                    live += size(*out)?;
                }
            }
            peak = peak.max(live);
            for &v in &lifetimes.ending[pos] {
                if self.slot_of(v).is_some() {
                    live -= size(crate::ValueId(v as u32))?;
                }
            }
        }
        Some(MemoryFigures {
            arena,
            unshared,
            peak_live: peak,
        })
    }
}

/// When every value's lifetime ends, in node positions.
struct Lifetimes {
    /// Per node position: the values whose last use (through views) it is.
    ending: Vec<Vec<usize>>,
    /// Per value: read by the caller (a graph output, or viewed by one).
    escapes: Vec<bool>,
}

impl Lifetimes {
    fn of(graph: &Graph, is_const: &dyn Fn(usize) -> bool) -> Lifetimes {
        let n = graph.value_count();
        let nodes: Vec<_> = graph.nodes().map(|(_, node)| node).collect();
        let mut last = vec![None::<usize>; n];
        let mut escapes = vec![false; n];
        for (id, _) in graph.outputs() {
            escapes[id.0 as usize] = true;
        }
        for (pos, node) in nodes.iter().enumerate() {
            for id in node.inputs.iter().flatten() {
                last[id.0 as usize] = Some(pos);
            }
            for out in &node.outputs {
                let v = out.0 as usize;
                last[v] = last[v].max(Some(pos));
            }
        }
        // A view's source lives as long as the view (later views first, so chains carry).
        for node in nodes.iter().rev() {
            let source = node
                .op
                .view_of()
                .and_then(|i| node.inputs.get(i).copied().flatten());
            if let Some(src) = source {
                let s = src.0 as usize;
                for out in &node.outputs {
                    let o = out.0 as usize;
                    last[s] = last[s].max(last[o]);
                    escapes[s] |= escapes[o];
                }
            }
        }
        let mut ending = vec![Vec::new(); nodes.len()];
        for (v, pos) in last.iter().enumerate() {
            if let (Some(pos), false, false) = (pos, escapes[v], is_const(v)) {
                ending[*pos].push(v);
            }
        }
        Lifetimes { ending, escapes }
    }
}

/// True for the values the plan gives a slot: `f32` node outputs that are not constants.
fn planned(graph: &Graph, v: usize, is_const: &dyn Fn(usize) -> bool) -> bool {
    let value = graph.value(crate::ValueId(v as u32));
    value.ty.dtype == DType::F32 && matches!(value.def, Def::Node(..)) && !is_const(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Attrs, InputRole, OutputRole, TensorType, ValueId};
    use crate::ops::OpRegistry;

    /// A chain builder: every node reads the named values and writes one output.
    struct Chain {
        g: Graph,
        registry: OpRegistry,
    }

    impl Chain {
        fn new(x_shape: &[&str]) -> (Chain, ValueId) {
            let mut g = Graph::new("t", 17);
            let shape = x_shape
                .iter()
                .map(|d| d.parse::<i64>().map_or_else(|_| Dim::sym(d), Dim::constant))
                .collect();
            let x = g
                .add_input("x", TensorType::new(DType::F32, shape), InputRole::Other)
                .unwrap();
            let registry = OpRegistry::onnx();
            (Chain { g, registry }, x)
        }

        fn node(&mut self, op: &str, inputs: &[ValueId]) -> ValueId {
            self.node_with(op, Attrs::default(), inputs)
        }

        fn node_with(&mut self, op: &str, attrs: Attrs, inputs: &[ValueId]) -> ValueId {
            let name = format!("v{}", self.g.value_count());
            let inputs = inputs.iter().map(|&v| Some(v)).collect();
            let outs = self.g.add_node(
                &self.registry,
                name.clone(),
                "",
                op,
                attrs,
                inputs,
                vec![name],
            );
            outs.unwrap()[0]
        }

        fn finish(mut self, outputs: &[ValueId]) -> Graph {
            self.g
                .set_outputs(outputs.iter().map(|&v| (v, OutputRole::Other)).collect());
            self.g
        }
    }

    fn bindings(pairs: &[(&str, i64)]) -> Bindings {
        pairs
            .iter()
            .map(|(k, v)| (std::sync::Arc::from(*k), *v))
            .collect()
    }

    #[test]
    fn values_whose_lifetimes_do_not_overlap_share_a_slot() {
        // a = relu(x); b = neg(a); c = relu(b); d = neg(c): at most two alive at once.
        let (mut c, x) = Chain::new(&["batch", "seq", "64"]);
        let a = c.node("Relu", &[x]);
        let b = c.node("Neg", &[a]);
        let cc = c.node("Relu", &[b]);
        let d = c.node("Neg", &[cc]);
        let g = c.finish(&[d]);
        let plan = MemoryPlan::new(&g, |_| false, None);
        assert_eq!(plan.planned_values(), 4);
        let slot = |v: ValueId| plan.slot_of(v.0 as usize).unwrap();
        // A node never writes where it reads; `c` takes `a`'s slot once `b` is written.
        assert_ne!(slot(a), slot(b));
        assert_eq!(slot(cc), slot(a));
        // The graph output keeps a slot of its own.
        assert!(slot(d) != slot(a) && slot(d) != slot(b));
        assert_eq!(plan.slot_count(), 3);
        assert_eq!(plan.arena_bytes().to_string(), "768*batch*seq");
        assert_eq!(plan.unshared_bytes().to_string(), "1024*batch*seq");
        // Two values are alive at once; the escaping output costs the third slot.
        let f = plan
            .figures(&g, &bindings(&[("batch", 2), ("seq", 5)]))
            .unwrap();
        assert_eq!((f.arena, f.unshared, f.peak_live), (7680, 10240, 5120));
        let partial = bindings(&[("batch", 1)]);
        let sizes: Vec<_> = plan.slot_elements(&partial).collect();
        assert_eq!(sizes, vec![None; 3]);
    }

    #[test]
    fn a_view_keeps_its_source_alive_and_takes_no_slot() {
        // a = relu(x); v = identity(a) (shares a's bytes); b = neg(x); c = add(v, b).
        let (mut c, x) = Chain::new(&["8"]);
        let a = c.node("Relu", &[x]);
        let v = c.node("Identity", &[a]);
        let b = c.node("Neg", &[x]);
        let s = c.node("Add", &[v, b]);
        let g = c.finish(&[s]);
        let plan = MemoryPlan::new(&g, |_| false, None);
        assert_eq!(plan.slot_of(v.0 as usize), None);
        // `a`'s last reader is the Identity, but its bytes are read through `v` by the Add:
        // `b` must not take its slot.
        assert_ne!(plan.slot_of(a.0 as usize), plan.slot_of(b.0 as usize));
    }

    #[test]
    fn sizes_that_cannot_be_ordered_get_separate_slots_and_larger_slots_grow() {
        // p = relu(x[s]); q = relu(y[t]) after p dies: s and t are unrelated, no sharing.
        let (mut c, x) = Chain::new(&["s"]);
        let y =
            c.g.add_input(
                "y",
                TensorType::new(DType::F32, vec![Dim::sym("t")]),
                InputRole::Other,
            )
            .unwrap();
        let p = c.node("Relu", &[x]);
        let p2 = c.node("Neg", &[p]);
        let q = c.node("Relu", &[y]);
        let q2 = c.node("Neg", &[q]);
        let g = c.finish(&[p2, q2]);
        let plan = MemoryPlan::new(&g, |_| false, None);
        assert_ne!(plan.slot_of(p.0 as usize), plan.slot_of(q.0 as usize));
        assert_eq!(plan.arena_bytes().to_string(), "8*s + 8*t");

        // A value twice as large as the dead one whose slot it takes: the slot grows to it.
        let (mut c, x) = Chain::new(&["n"]);
        let a = c.node("Neg", &[x]);
        let b = c.node("Relu", &[a]);
        let axis = Attrs::new().with("axis", crate::ir::Attr::Int(0));
        let twice = c.node_with("Concat", axis, &[b, b]);
        let out = c.node("Neg", &[twice]);
        let g = c.finish(&[out]);
        let plan = MemoryPlan::new(&g, |_| false, None);
        assert_eq!(plan.slot_of(twice.0 as usize), plan.slot_of(a.0 as usize));
        let sizes: Vec<String> = plan.slot_sizes().iter().map(|d| d.to_string()).collect();
        assert_eq!(sizes, ["2*n", "n", "2*n"]);
    }

    #[test]
    fn siblings_computed_early_do_not_share_with_values_alive_then() {
        // a = relu(x); b = neg(a); k = relu(x) computed with `a` (position 0).
        let (mut c, x) = Chain::new(&["4"]);
        let a = c.node("Relu", &[x]);
        let b = c.node("Neg", &[a]);
        let k = c.node("Relu", &[x]);
        let s = c.node("Add", &[b, k]);
        let g = c.finish(&[s]);
        let late = MemoryPlan::new(&g, |_| false, None);
        // Computed at its own position, `k` reuses `a`'s slot (dead after `b`).
        assert_eq!(late.slot_of(k.0 as usize), late.slot_of(a.0 as usize));
        let early = MemoryPlan::new(&g, |_| false, Some(&[0, 1, 0, 3]));
        assert_ne!(early.slot_of(k.0 as usize), early.slot_of(a.0 as usize));
        assert_ne!(early.slot_of(k.0 as usize), early.slot_of(b.0 as usize));
    }
}
