//! The reference interpreter: runs a graph node by node on concrete tensors.
//!
//! It binds the symbols of the input shapes, evaluates each node in order, and checks every
//! produced tensor against the shape inference derived for it (so a wrong inference rule is
//! caught at the node that has it). Intermediate tensors are dropped after their last use.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::dim::{shape_to_string, Bindings};
use crate::error::RuntimeError;
use crate::ir::{Def, Graph, Node};
use crate::memplan::MemoryPlan;
use crate::ops::hybrid::{self, HybridMatMul};
use crate::pool::{Outputs, Slot};
use crate::tensor::Tensor;

/// Runs `graph` on `inputs` (in graph input order) and returns its outputs in order.
pub fn run(graph: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
    Plan::new(graph)?.run(inputs)
}

/// What a [`Plan`] optimizes; every field on by default. Turning one off is for measuring
/// what it buys (the outputs are the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Outputs go into the static memory plan's slots (else every op allocates its outputs).
    pub memory_plan: bool,
    /// Sibling hybrid products (Q/K/V, gate/up) run as one dispatch.
    pub sibling_groups: bool,
    /// A run asking for the last positions' logits computes only those rows of the LM head.
    pub cut_logit_rows: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            memory_plan: true,
            sibling_groups: true,
            cut_logit_rows: true,
        }
    }
}

/// A graph prepared for repeated runs: constants aligned once, for every node the values
/// whose last use it is, so that each run touches only a flat value array, the sibling
/// hybrid products scheduled together, and the activations' buffers planned
/// ([`MemoryPlan`]): kept between runs in slots sized once per call, so that a decode step
/// allocates no activation memory.
#[derive(Debug)]
pub struct Plan {
    graph: Graph,
    /// Constants by value index (aligned copies of misaligned ones).
    consts: Vec<Option<Tensor>>,
    /// Per node in order: values to drop after it runs.
    frees: Vec<Vec<usize>>,
    memory: MemoryPlan,
    /// The buffers of the memory plan's slots.
    slots: Vec<Arc<Slot>>,
    /// Per node in order: the slot of each output (`None`: allocated by the op).
    out_slots: Vec<Vec<Option<u32>>>,
    /// Whether outputs go into the slots (else every op allocates its outputs).
    use_slots: bool,
    /// Position of the node that computes the logits row by row from its first input (the LM
    /// head), when a run can ask for the last positions' logits only
    /// ([`Plan::run_last_positions`]).
    logits_head: Option<usize>,
    /// Whether such a run uses `logits_head` ([`PlanOptions::cut_logit_rows`]).
    cut_logit_rows: bool,
    /// The value array of the last run, empty, kept for the next (one run at a time gets it;
    /// concurrent runs allocate their own).
    idle_env: Mutex<Vec<Option<Tensor>>>,
    /// Per node in order: how it is scheduled (see [`Sched`]).
    sched: Vec<Sched>,
    /// Per value: its inferred shape, flattened for the check of every produced tensor.
    checks: Vec<Vec<DimCheck>>,
    /// Time per op type and per whole run, when profiling is on.
    profile: Option<Mutex<Profile>>,
}

/// Profiling state: per node position the op type's slot, the time per op type, and the time
/// of whole runs (so that the time outside ops, the interpreter's own, is known too).
#[derive(Debug, Default)]
struct Profile {
    /// Op type (domain-qualified outside the default domain) by slot.
    keys: Vec<String>,
    /// Slot of every node, by position.
    slot: Vec<usize>,
    by_slot: Vec<OpTime>,
    runs: OpTime,
}

impl Profile {
    fn new(graph: &Graph) -> Profile {
        let mut p = Profile::default();
        for (_, node) in graph.nodes() {
            let key = node.qualified_op_type();
            let slot = match p.keys.iter().position(|k| *k == key) {
                Some(s) => s,
                None => {
                    p.keys.push(key);
                    p.by_slot.push(OpTime::default());
                    p.keys.len() - 1
                }
            };
            p.slot.push(slot);
        }
        p
    }
}

/// Scheduling of one node. `patch.HybridMatMul`s that read the same activation and have only
/// constants besides it (Q/K/V, gate/up) run as one kernel dispatch when the first of them is
/// reached; the others then only hand over their result. `PlanOptions::sibling_groups` turns
/// this off (to measure it).
#[derive(Debug)]
enum Sched {
    Alone,
    /// The first of a group: the ops and positions of every member, this node first.
    Lead(Vec<(HybridMatMul, usize)>),
    /// A later member: its output is computed by the lead.
    Follow,
}

/// The sibling groups of `graph` (node positions in order), as [`Sched`] per node.
fn sibling_schedule(graph: &Graph, consts: &[Option<Tensor>]) -> Vec<Sched> {
    let nodes: Vec<&Node> = graph.nodes().map(|(_, n)| n).collect();
    let mut sched: Vec<Sched> = nodes.iter().map(|_| Sched::Alone).collect();
    let mut by_input: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (pos, n) in nodes.iter().enumerate() {
        let groupable = n.domain == hybrid::DOMAIN
            && n.op_type == hybrid::OP_TYPE
            && n.inputs
                .iter()
                .skip(1)
                .flatten()
                .all(|id| consts[id.0 as usize].is_some());
        if let (true, Some(Some(x))) = (groupable, n.inputs.first()) {
            by_input.entry(x.0 as usize).or_default().push(pos);
        }
    }
    for positions in by_input.into_values().filter(|p| p.len() > 1) {
        let ops: Option<Vec<(HybridMatMul, usize)>> = positions
            .iter()
            .map(|&p| {
                HybridMatMul::from_attrs(&nodes[p].attrs)
                    .ok()
                    .map(|op| (op, p))
            })
            .collect();
        let Some(ops) = ops else { continue };
        for &p in &positions[1..] {
            sched[p] = Sched::Follow;
        }
        sched[positions[0]] = Sched::Lead(ops);
    }
    sched
}

/// Position of the node that computes `graph`'s logits output row by row from a `[b, s, h]`
/// first input, and nothing else reads: `patch.HybridMatMul` without a residual, or a `MatMul`
/// by a constant matrix, scheduled alone.
fn logits_head(graph: &Graph, consts: &[Option<Tensor>], sched: &[Sched]) -> Option<usize> {
    let (logits, _) = graph
        .outputs()
        .iter()
        .find(|(_, role)| *role == crate::OutputRole::Logits)?;
    let Def::Node(id, 0) = graph.value(*logits).def else {
        return None;
    };
    let pos = graph.order().iter().position(|&n| n == id)?;
    let node = graph.node(id);
    let rank = |i: usize| {
        let v = node.inputs.get(i).copied().flatten()?;
        Some(graph.value(v).ty.rank())
    };
    let row_wise = match (node.domain.as_str(), node.op_type.as_str()) {
        (hybrid::DOMAIN, hybrid::OP_TYPE) => node.inputs.len() <= 4,
        ("", "MatMul") => {
            let b = node.inputs.get(1).copied().flatten();
            rank(1) == Some(2) && b.is_some_and(|b| consts[b.0 as usize].is_some())
        }
        _ => false,
    };
    let read_inside = graph
        .nodes()
        .any(|(_, n)| n.inputs.iter().flatten().any(|v| v == logits));
    let alone = matches!(sched[pos], Sched::Alone);
    (row_wise && rank(0) == Some(3) && !read_inside && alone).then_some(pos)
}

/// The memory plan of `graph` under the schedule `sched`, its slots, and per node position
/// the slot of each output.
#[allow(clippy::type_complexity)]
fn plan_memory(
    graph: &Graph,
    consts: &[Option<Tensor>],
    sched: &[Sched],
) -> (MemoryPlan, Vec<Arc<Slot>>, Vec<Vec<Option<u32>>>) {
    let mut computed_at: Vec<usize> = (0..sched.len()).collect();
    for (pos, s) in sched.iter().enumerate() {
        if let Sched::Lead(members) = s {
            for (_, p) in members {
                computed_at[*p] = pos;
            }
        }
    }
    let memory = MemoryPlan::new(graph, |v| consts[v].is_some(), Some(&computed_at));
    let slots = (0..memory.slot_count())
        .map(|_| Arc::new(Slot::default()))
        .collect();
    let out_slots = graph
        .nodes()
        .map(|(_, node)| {
            node.outputs
                .iter()
                .map(|o| memory.slot_of(o.0 as usize))
                .collect()
        })
        .collect();
    (memory, slots, out_slots)
}

/// Per node in order: the values whose last use it is (never graph outputs nor the values
/// `is_const` names), so that an executor can drop them right after it.
pub(crate) fn frees_after_last_use(
    graph: &Graph,
    is_const: impl Fn(usize) -> bool,
) -> Vec<Vec<usize>> {
    let mut last_use = vec![usize::MAX; graph.value_count()];
    for (pos, (_, node)) in graph.nodes().enumerate() {
        for id in node.inputs.iter().flatten() {
            last_use[id.0 as usize] = pos;
        }
    }
    for (id, _) in graph.outputs() {
        last_use[id.0 as usize] = usize::MAX;
    }
    let mut frees = vec![Vec::new(); graph.node_count()];
    for (v, &pos) in last_use.iter().enumerate() {
        if pos != usize::MAX && !is_const(v) {
            frees[pos].push(v);
        }
    }
    frees
}

/// A node's inputs as its op reads them.
type InputRefs<'a> = smallvec::SmallVec<[Option<&'a Tensor>; 8]>;

/// Use of the memory plan's slots since the plan was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    pub slots: usize,
    /// Bytes the idle slots hold (buffers lent to live tensors are not counted).
    pub idle_bytes: usize,
    /// Output buffers served from a slot.
    pub hits: u64,
    /// Output buffers allocated because the slot's was in use or too small, and slots
    /// grown for a larger call.
    pub misses: u64,
}

/// Calls and seconds spent in one op type.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTime {
    pub calls: u64,
    pub seconds: f64,
}

impl Plan {
    /// A plan with every optimization on ([`PlanOptions::default`]).
    pub fn new(graph: &Graph) -> Result<Plan, RuntimeError> {
        Plan::with_options(graph, PlanOptions::default())
    }

    pub fn with_options(graph: &Graph, options: PlanOptions) -> Result<Plan, RuntimeError> {
        let mut consts = vec![None; graph.value_count()];
        for (id, t) in graph.consts() {
            consts[id.0 as usize] = Some(t.to_aligned());
        }
        let frees = frees_after_last_use(graph, |v| consts[v].is_some());
        let sched = if options.sibling_groups {
            sibling_schedule(graph, &consts)
        } else {
            graph.nodes().map(|_| Sched::Alone).collect()
        };
        let (memory, slots, out_slots) = plan_memory(graph, &consts, &sched);
        let logits_head = logits_head(graph, &consts, &sched);
        let checks = (0..graph.value_count())
            .map(|v| {
                let shape = &graph.value(crate::ValueId(v as u32)).ty.shape;
                shape.iter().map(DimCheck::of).collect()
            })
            .collect();
        Ok(Plan {
            graph: graph.clone(),
            consts,
            frees,
            memory,
            slots,
            out_slots,
            use_slots: options.memory_plan,
            cut_logit_rows: options.cut_logit_rows,
            logits_head,
            idle_env: Mutex::default(),
            sched,
            checks,
            profile: None,
        })
    }

    /// Turns the memory plan's buffers on (the default) or off (every op allocates its
    /// outputs; to measure it).
    pub fn set_memory_plan(&mut self, on: bool) {
        self.use_slots = on;
    }

    /// The activations' memory plan.
    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.memory
    }

    /// How the slots have served the runs so far.
    pub fn slot_stats(&self) -> SlotStats {
        SlotStats {
            slots: self.slots.len(),
            idle_bytes: self.slots.iter().map(|s| s.idle_bytes()).sum(),
            hits: self.slots.iter().map(|s| s.hits()).sum(),
            misses: self.slots.iter().map(|s| s.misses()).sum(),
        }
    }

    /// Turns the joint scheduling of sibling hybrid products on (the default) or off.
    pub fn set_sibling_groups(&mut self, on: bool) {
        self.sched = if on {
            sibling_schedule(&self.graph, &self.consts)
        } else {
            self.graph.nodes().map(|_| Sched::Alone).collect()
        };
        (self.memory, self.slots, self.out_slots) =
            plan_memory(&self.graph, &self.consts, &self.sched);
        self.logits_head = logits_head(&self.graph, &self.consts, &self.sched);
    }

    /// The LM head's position when runs cut it to the asked rows.
    fn cut_head(&self) -> Option<usize> {
        self.logits_head.filter(|_| self.cut_logit_rows)
    }

    /// Applies `options` (what [`Plan::with_options`] would have built).
    pub fn set_options(&mut self, options: PlanOptions) {
        self.set_memory_plan(options.memory_plan);
        self.cut_logit_rows = options.cut_logit_rows;
        self.set_sibling_groups(options.sibling_groups);
    }

    /// The number of sibling groups scheduled as one dispatch.
    pub fn sibling_groups(&self) -> usize {
        self.sched
            .iter()
            .filter(|s| matches!(s, Sched::Lead(_)))
            .count()
    }

    /// Turns per-op-type timing on (and clears it) or off.
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on.then(|| Mutex::new(Profile::new(&self.graph)));
    }

    /// Time per op type (domain-qualified outside the default domain) since profiling began,
    /// most expensive first.
    pub fn profile(&self) -> Vec<(String, OpTime)> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let p = p.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = p
            .keys
            .iter()
            .cloned()
            .zip(p.by_slot.iter().copied())
            .filter(|(_, t)| t.calls > 0)
            .collect();
        v.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        v
    }

    /// Calls and seconds of whole runs since profiling began (ops and the interpreter around
    /// them); zero when profiling is off.
    pub fn profile_runs(&self) -> OpTime {
        self.profile.as_ref().map_or(OpTime::default(), |p| {
            p.lock().unwrap_or_else(|e| e.into_inner()).runs
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Checks a concrete shape against value `id`'s inferred one, binding the symbols seen for
    /// the first time: on the flattened copy (every produced tensor is checked, a hundred
    /// thousand times per second in decode), and on the symbolic dims only to say what does
    /// not match.
    fn bind(
        &self,
        bindings: &mut Bindings,
        id: crate::ValueId,
        actual: &[usize],
    ) -> Result<(), String> {
        match check_shape(bindings, &self.checks[id.0 as usize], actual) {
            Ok(()) => Ok(()),
            Err(()) => bind_shape(bindings, &self.graph.value(id).ty.shape, actual),
        }
    }

    /// Where the outputs of the node at `pos` go.
    fn outputs(&self, pos: usize) -> Outputs<'_> {
        if self.use_slots {
            Outputs::new(&self.slots, &self.out_slots[pos])
        } else {
            Outputs::none()
        }
    }

    /// The inputs of `node`, from the constants or the environment (on the stack for the
    /// usual few).
    fn input_refs<'a>(
        &'a self,
        node: &Node,
        env: &'a [Option<Tensor>],
    ) -> Result<InputRefs<'a>, RuntimeError> {
        let mut refs = InputRefs::new();
        for slot in &node.inputs {
            match slot {
                None => refs.push(None),
                Some(id) => {
                    let i = id.0 as usize;
                    let t = self.consts[i].as_ref().or(env[i].as_ref());
                    if t.is_none() {
                        return Err(RuntimeError::Undefined(self.graph.value(*id).name.clone()));
                    }
                    refs.push(t);
                }
            }
        }
        Ok(refs)
    }

    /// Runs the graph on `inputs` (in graph input order) and returns its outputs in order.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
        self.run_observed(inputs, &mut |_, _| {})
    }

    /// [`run`](Self::run), calling `observe(node, inputs)` before each node is evaluated (how
    /// calibration sees the activations entering every MatMul).
    pub fn run_observed(
        &self,
        inputs: &[Tensor],
        observe: &mut dyn FnMut(&Node, &[Option<&Tensor>]),
    ) -> Result<Vec<Tensor>, RuntimeError> {
        self.run_rows(inputs, observe, None)
    }

    /// [`run_observed`](Self::run_observed), computing the logits output for the last
    /// `positions` positions only (`[b, positions, vocab]`) when the graph's LM head allows it
    /// ([`Plan::cuts_logits`]): what generation needs, for the cost of `positions` rows of the
    /// largest product instead of every prompt row. Other outputs are unchanged.
    pub fn run_last_positions(
        &self,
        inputs: &[Tensor],
        observe: &mut dyn FnMut(&Node, &[Option<&Tensor>]),
        positions: usize,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        self.run_rows(inputs, observe, Some(positions))
    }

    /// True when [`run_last_positions`](Self::run_last_positions) computes only the asked
    /// positions' logits (the logits come from a product row by row of a `[b, s, h]` input:
    /// `patch.HybridMatMul` without a residual, or a `MatMul` by a constant matrix) and
    /// `PlanOptions::cut_logit_rows` did not turn it off.
    pub fn cuts_logits(&self) -> bool {
        self.cut_head().is_some()
    }

    fn run_rows(
        &self,
        inputs: &[Tensor],
        observe: &mut dyn FnMut(&Node, &[Option<&Tensor>]),
        last_positions: Option<usize>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let run_started = self.profile.as_ref().map(|_| Instant::now());
        let outputs = self.run_nodes(inputs, observe, last_positions)?;
        if let (Some(p), Some(t)) = (&self.profile, run_started) {
            let seconds = t.elapsed().as_secs_f64();
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            p.runs.calls += 1;
            p.runs.seconds += seconds;
        }
        Ok(outputs)
    }

    fn run_nodes(
        &self,
        inputs: &[Tensor],
        observe: &mut dyn FnMut(&Node, &[Option<&Tensor>]),
        last_positions: Option<usize>,
    ) -> Result<Vec<Tensor>, RuntimeError> {
        let graph = &self.graph;
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
            self.bind(&mut bindings, *id, t.shape())
                .map_err(|msg| RuntimeError::Input {
                    name: v.name.clone(),
                    msg,
                })?;
        }

        // The plan's sizes for this call: the slots grow before the first node, if at all.
        if self.use_slots {
            // A cut LM head writes `last_positions` rows, not the planned size: its slot is
            // left to grow to what it writes.
            let cut_slot = match (last_positions, self.cut_head()) {
                (Some(_), Some(pos)) => self.out_slots[pos].first().copied().flatten(),
                _ => None,
            };
            let sizes = self.memory.slot_elements(&bindings);
            for (s, (slot, len)) in self.slots.iter().zip(sizes).enumerate() {
                if let (Some(len), false) = (len, cut_slot == Some(s as u32)) {
                    slot.reserve(len).map_err(|msg| {
                        // Named by the first value planned into the slot.
                        let value = (0..graph.value_count())
                            .find(|&v| self.memory.slot_of(v) == Some(s as u32))
                            .map(|v| graph.value(crate::ValueId(v as u32)).name.clone())
                            .unwrap_or_default();
                        RuntimeError::Tensor(format!("value `{value}`: {msg}"))
                    })?;
                }
            }
        }
        let mut env = std::mem::take(&mut *self.idle_env.lock().unwrap_or_else(|e| e.into_inner()));
        env.resize(graph.value_count(), None);
        for ((id, _), t) in graph.inputs().iter().zip(inputs) {
            env[id.0 as usize] = Some(t.clone());
        }
        let node_at = |p: usize| graph.node(graph.order()[p]);
        // Results of group members computed by their lead, by node position.
        let mut pending: BTreeMap<usize, Tensor> = BTreeMap::new();
        for (pos, ((_, node), frees)) in graph.nodes().zip(&self.frees).enumerate() {
            let cut_input;
            let mut refs = self.input_refs(node, &env)?;
            // The LM head on the last positions only (its output is checked against them).
            let cut_from = match (last_positions, self.cut_head() == Some(pos), refs[0]) {
                (Some(k), true, Some(x)) if x.rank() == 3 && k < x.shape()[1] => {
                    cut_input = x.last_positions(k).map_err(|e| {
                        let e = crate::OpError::Invalid(e.to_string());
                        RuntimeError::at_node(&node.name, &node.op_type, e)
                    })?;
                    refs[0] = Some(&cut_input);
                    Some(x.shape()[1])
                }
                _ => None,
            };
            observe(node, &refs);
            let started = self.profile.as_ref().map(|_| Instant::now());
            let outputs = self.outputs(pos);
            let results = match &self.sched[pos] {
                Sched::Alone => node.op.eval_into(&refs, &outputs),
                Sched::Follow => pending
                    .remove(&pos)
                    .map(|t| vec![t])
                    .ok_or_else(|| crate::OpError::Invalid("its sibling group did not run".into())),
                Sched::Lead(members) => {
                    let member_refs: Vec<InputRefs> = members
                        .iter()
                        .map(|(_, p)| self.input_refs(node_at(*p), &env))
                        .collect::<Result<_, _>>()?;
                    let group: Vec<(&HybridMatMul, &[Option<&Tensor>], Outputs)> = members
                        .iter()
                        .zip(&member_refs)
                        .map(|((op, p), r)| (op, r.as_slice(), self.outputs(*p)))
                        .collect();
                    HybridMatMul::eval_group(&group).map(|outs| {
                        let mut outs = outs.into_iter();
                        let lead = outs.next();
                        for ((_, p), t) in members.iter().skip(1).zip(outs) {
                            pending.insert(*p, t);
                        }
                        lead.into_iter().collect()
                    })
                }
            }
            .map_err(|e| RuntimeError::at_node(&node.name, &node.op_type, e))?;
            drop(refs);
            if let (Some(p), Some(t)) = (&self.profile, started) {
                let seconds = t.elapsed().as_secs_f64();
                let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
                let slot = p.slot[pos];
                let e = &mut p.by_slot[slot];
                e.calls += 1;
                e.seconds += seconds;
            }
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
                // A cut LM head is checked as the whole one: its positions axis as the input's.
                let uncut;
                let shape = match cut_from {
                    Some(positions) if t.rank() == 3 => {
                        uncut = [t.shape()[0], positions, t.shape()[2]];
                        &uncut[..]
                    }
                    _ => t.shape(),
                };
                self.bind(&mut bindings, *out, shape).map_err(|msg| {
                    RuntimeError::Verify(format!(
                        "node `{}` ({}): output `{}`: {msg}",
                        node.name, node.op_type, v.name
                    ))
                })?;
                env[out.0 as usize] = Some(t);
            }
            for &v in frees {
                env[v] = None;
            }
        }

        let outputs = graph
            .outputs()
            .iter()
            .map(|(id, _)| {
                let i = id.0 as usize;
                self.consts[i]
                    .clone()
                    .or_else(|| env[i].clone())
                    .or_else(|| match graph.value(*id).def {
                        Def::Input(k) => Some(inputs[k].clone()),
                        _ => None,
                    })
                    .ok_or_else(|| RuntimeError::Undefined(graph.value(*id).name.clone()))
            })
            .collect();
        // Dropping the values returns their buffers to the slots.
        env.clear();
        *self.idle_env.lock().unwrap_or_else(|e| e.into_inner()) = env;
        outputs
    }
}

/// One inferred dim, as the check of a produced tensor reads it.
#[derive(Debug)]
enum DimCheck {
    Const(i64),
    Sym(std::sync::Arc<str>),
    /// An expression over symbols (checked when its symbols are bound).
    Expr(crate::Dim),
}

impl DimCheck {
    fn of(d: &crate::Dim) -> DimCheck {
        match (d.as_const(), d.as_sym()) {
            (Some(c), _) => DimCheck::Const(c),
            (None, Some(s)) => DimCheck::Sym(s.into()),
            (None, None) => DimCheck::Expr(d.clone()),
        }
    }
}

/// [`bind_shape`] on a precomputed shape, without walking the symbolic dims' trees for
/// constants and single symbols. `Err(())` on any mismatch.
fn check_shape(bindings: &mut Bindings, checks: &[DimCheck], actual: &[usize]) -> Result<(), ()> {
    if checks.len() != actual.len() {
        return Err(());
    }
    let mut compound = false;
    for (c, &a) in checks.iter().zip(actual) {
        match c {
            DimCheck::Const(v) if *v == a as i64 => {}
            DimCheck::Const(_) => return Err(()),
            DimCheck::Sym(s) => match bindings.get(s) {
                Some(&b) if b != a as i64 => return Err(()),
                Some(_) => {}
                None => {
                    bindings.insert(s.clone(), a as i64);
                }
            },
            DimCheck::Expr(_) => compound = true,
        }
    }
    if compound {
        for (c, &a) in checks.iter().zip(actual) {
            if let DimCheck::Expr(d) = c {
                // An expression over a symbol no input binds cannot be checked.
                if matches!(d.eval(bindings), Ok(v) if v != a as i64) {
                    return Err(());
                }
            }
        }
    }
    Ok(())
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
