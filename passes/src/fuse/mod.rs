//! Fusion with an e-graph ([egg]): the graph's dataflow becomes one e-graph, named rewrite
//! rules ([`rules`]) add fused ops (`patch.RMSNorm`, `patch.Silu`, `patch.SwiGLU`,
//! `patch.GeGLU`, `patch.Gelu`, `patch.Softcap`, `patch.Attention`, `patch.Rotary`) as equivalent forms of the subgraphs they recognize,
//! extraction picks the cheapest form of every node, and each node whose cheapest form is a
//! fused op is replaced in place.
//!
//! * **Encoding.** A node with one output is an e-node whose symbol is its op and attributes
//!   (`ReduceMean{keepdims=1}`); a one-element constant is a leaf named by its value (`2`,
//!   `1e-5`, `-1`) so rules can match it; any other value (graph inputs, weights, outputs of
//!   multi-output or nondeterministic nodes) is an opaque leaf `%<id>`. Structurally equal
//!   nodes share an e-class (hash-consing), which also means common subexpressions are found.
//! * **Cost model and extraction.** The cost of a program is the number of nodes it runs
//!   (each one a dispatch and a pass over memory; a fused op does its work in one). For each
//!   node, last to first, the fused form in its e-class that absorbs the most nodes is chosen,
//!   and only if it absorbs at least one and every absorbed node is used by nothing outside
//!   the fused subgraph (otherwise the absorbed values would still be computed): so every
//!   applied rewrite strictly lowers the cost, and none raises it. (Egg's tree-cost extractor
//!   is not used: on a 30-layer residual stream tree costs double per layer and overflow.)
//! * **Replacement.** The fused op must infer the node's recorded type; skipped matches are
//!   counted in the report with their reason. The replaced node keeps its name, position and
//!   output, so no user changes; dead-code elimination then drops the absorbed nodes.
//! * **Limits.** The runner stops at [`FuseLimits`]; the stop reason and e-graph size are in
//!   the report (`patchc compile` puts them in the compile report).

pub mod rules;
pub mod unfused;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egg::{EGraph, Id, Language, Runner, SymbolLang};
use patch_runtime::ir::{Attr, Attrs, Def};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, NodeId, RuntimeError, ValueId};

use crate::fold::is_nondeterministic;
use crate::{attrs_key, Pass};

/// Runner limits of one fusion run.
#[derive(Clone, Copy, Debug)]
pub struct FuseLimits {
    pub iterations: usize,
    pub nodes: usize,
    pub time: Duration,
}

impl Default for FuseLimits {
    fn default() -> Self {
        FuseLimits {
            iterations: 8,
            nodes: 200_000,
            time: Duration::from_secs(20),
        }
    }
}

/// What the last run of the pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FuseReport {
    /// Why the runner stopped (`Saturated` when every rule was applied everywhere it could).
    pub stop_reason: String,
    pub iterations: usize,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    /// Nodes replaced, by fused op type.
    pub fused: Vec<(String, usize)>,
    /// Matches not applied, by reason.
    pub skipped: Vec<(String, usize)>,
}

/// The fusion pass.
#[derive(Default)]
pub struct Fuse {
    pub limits: FuseLimits,
    report: Arc<Mutex<FuseReport>>,
}

impl Fuse {
    pub fn new(limits: FuseLimits) -> Fuse {
        Fuse {
            limits,
            report: Arc::default(),
        }
    }

    /// The report of the last run, readable after the pass has moved into a pipeline.
    pub fn report_handle(&self) -> Arc<Mutex<FuseReport>> {
        Arc::clone(&self.report)
    }
}

/// A fused op as the rules build it and the graph receives it.
#[derive(Clone, Debug, PartialEq)]
pub enum FusedOp {
    RmsNorm {
        epsilon: f32,
    },
    Silu,
    SwiGlu,
    /// `gelu_tanh(gate) · up`.
    GeGlu,
    Attention {
        scale: f32,
        /// `cap · tanh(scores / cap)` before the mask, when set.
        softcap: Option<f32>,
    },
    /// `cap · tanh(x / cap)`.
    Softcap {
        cap: f32,
    },
    Rotary {
        half: i64,
        axis: i64,
    },
    /// GELU with the tanh approximation.
    GeluTanh,
}

impl FusedOp {
    const PREFIX: &'static str = "patch.";

    /// The e-node symbol (op and attributes).
    pub fn symbol(&self) -> String {
        match self {
            FusedOp::RmsNorm { epsilon } => format!("patch.RMSNorm{{epsilon={epsilon:e}}}"),
            FusedOp::Silu => "patch.Silu".into(),
            FusedOp::SwiGlu => "patch.SwiGLU".into(),
            FusedOp::GeGlu => "patch.GeGLU".into(),
            FusedOp::Attention {
                scale,
                softcap: None,
            } => format!("patch.Attention{{scale={scale:e}}}"),
            FusedOp::Attention {
                scale,
                softcap: Some(cap),
            } => format!("patch.Attention{{scale={scale:e},softcap={cap:e}}}"),
            FusedOp::Softcap { cap } => format!("patch.Softcap{{cap={cap:e}}}"),
            FusedOp::Rotary { half, axis } => format!("patch.Rotary{{half={half},axis={axis}}}"),
            FusedOp::GeluTanh => "patch.Gelu{approximate=tanh}".into(),
        }
    }

    pub fn parse(symbol: &str) -> Option<FusedOp> {
        let rest = symbol.strip_prefix(Self::PREFIX)?;
        if let Some(eps) = rest
            .strip_prefix("RMSNorm{epsilon=")
            .and_then(|r| r.strip_suffix('}'))
        {
            return eps.parse().ok().map(|epsilon| FusedOp::RmsNorm { epsilon });
        }
        if let Some(attrs) = rest
            .strip_prefix("Attention{scale=")
            .and_then(|r| r.strip_suffix('}'))
        {
            let (scale, softcap) = match attrs.split_once(",softcap=") {
                Some((scale, cap)) => (scale, Some(cap.parse().ok()?)),
                None => (attrs, None),
            };
            return scale
                .parse()
                .ok()
                .map(|scale| FusedOp::Attention { scale, softcap });
        }
        if let Some(cap) = rest
            .strip_prefix("Softcap{cap=")
            .and_then(|r| r.strip_suffix('}'))
        {
            return cap.parse().ok().map(|cap| FusedOp::Softcap { cap });
        }
        if let Some((half, axis)) = rest
            .strip_prefix("Rotary{half=")
            .and_then(|r| r.strip_suffix('}'))
            .and_then(|r| r.split_once(",axis="))
        {
            return Some(FusedOp::Rotary {
                half: half.parse().ok()?,
                axis: axis.parse().ok()?,
            });
        }
        match rest {
            "Gelu{approximate=tanh}" => Some(FusedOp::GeluTanh),
            "Silu" => Some(FusedOp::Silu),
            "SwiGLU" => Some(FusedOp::SwiGlu),
            "GeGLU" => Some(FusedOp::GeGlu),
            _ => None,
        }
    }

    pub fn op_type(&self) -> &'static str {
        match self {
            FusedOp::RmsNorm { .. } => "RMSNorm",
            FusedOp::Silu => "Silu",
            FusedOp::SwiGlu => "SwiGLU",
            FusedOp::GeGlu => "GeGLU",
            FusedOp::Attention { .. } => "Attention",
            FusedOp::Softcap { .. } => "Softcap",
            FusedOp::Rotary { .. } => "Rotary",
            FusedOp::GeluTanh => "Gelu",
        }
    }

    fn attrs(&self) -> Attrs {
        match self {
            FusedOp::RmsNorm { epsilon } => Attrs::new()
                .with("axis", Attr::Int(-1))
                .with("epsilon", Attr::Float(*epsilon)),
            FusedOp::Attention { scale, softcap } => {
                let attrs = Attrs::new().with("scale", Attr::Float(*scale));
                match softcap {
                    Some(cap) => attrs.with("softcap", Attr::Float(*cap)),
                    None => attrs,
                }
            }
            FusedOp::Softcap { cap } => Attrs::new().with("cap", Attr::Float(*cap)),
            FusedOp::Rotary { half, axis } => Attrs::new()
                .with("half", Attr::Int(*half))
                .with("axis", Attr::Int(*axis)),
            FusedOp::GeluTanh => Attrs::new().with("approximate", Attr::String("tanh".into())),
            FusedOp::Silu | FusedOp::SwiGlu | FusedOp::GeGlu => Attrs::new(),
        }
    }
}

/// The e-node symbol of a node: domain, op type and attributes (see [`attrs_key`]).
fn node_symbol(domain: &str, op_type: &str, attrs: &Attrs) -> String {
    let mut s = if domain.is_empty() {
        op_type.to_string()
    } else {
        format!("{domain}.{op_type}")
    };
    if !attrs.is_empty() {
        s.push('{');
        s.push_str(&attrs_key(attrs));
        s.push('}');
    }
    s
}

/// The leaf symbol of a one-element numeric constant: its value, shortest form.
fn scalar_symbol(t: &patch_runtime::Tensor) -> Option<String> {
    if t.len() != 1 || t.rank() > 1 {
        return None;
    }
    let v = t.to_f64_vec().ok()?[0];
    if v.is_nan() {
        return None;
    }
    Some(if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{}", v as f32)
    })
}

/// The graph as an e-graph, and the way back.
struct Encoded {
    egraph: EGraph<SymbolLang, ()>,
    /// E-class of every value that has one.
    class_of: HashMap<ValueId, Id>,
    /// Nodes encoded as e-nodes (one output each), with their output.
    encoded: Vec<(NodeId, ValueId)>,
}

fn encode(graph: &Graph) -> Encoded {
    let mut egraph = EGraph::<SymbolLang, ()>::default();
    let mut class_of: HashMap<ValueId, Id> = HashMap::new();
    let mut encoded = Vec::new();
    let absent = egraph.add(SymbolLang::leaf("_"));
    let leaf = |egraph: &mut EGraph<SymbolLang, ()>, v: ValueId| -> Id {
        let value = graph.value(v);
        let sym = match &value.def {
            Def::Const(t) => scalar_symbol(t).unwrap_or_else(|| format!("%{}", v.0)),
            _ => format!("%{}", v.0),
        };
        egraph.add(SymbolLang::leaf(sym))
    };
    for &id in graph.order() {
        let node = graph.node(id);
        let mut children = Vec::with_capacity(node.inputs.len());
        for input in &node.inputs {
            children.push(match input {
                None => absent,
                Some(v) => match class_of.get(v) {
                    Some(&c) => c,
                    None => {
                        let c = leaf(&mut egraph, *v);
                        class_of.insert(*v, c);
                        c
                    }
                },
            });
        }
        if let ([out], false) = (node.outputs.as_slice(), is_nondeterministic(&node.op_type)) {
            let sym = node_symbol(&node.domain, &node.op_type, &node.attrs);
            let c = egraph.add(SymbolLang::new(sym, children));
            class_of.insert(*out, c);
            encoded.push((id, *out));
        } else {
            for out in &node.outputs {
                let c = leaf(&mut egraph, *out);
                class_of.insert(*out, c);
            }
        }
    }
    egraph.rebuild();
    Encoded {
        egraph,
        class_of,
        encoded,
    }
}

fn bump(list: &mut Vec<(String, usize)>, key: &str) {
    match list.iter_mut().find(|(k, _)| k == key) {
        Some((_, n)) => *n += 1,
        None => list.push((key.to_string(), 1)),
    }
}

/// Nodes between `root` and the values `stops` (exclusive), walking the data inputs (float and
/// bool tensors) backwards; `None` when more than `limit` nodes would be absorbed. Integer
/// inputs (shapes, indices, axes) are side inputs: their producers are not absorbed, and die in
/// dead-code elimination when nothing else reads them.
fn absorbed_nodes(
    graph: &Graph,
    root: NodeId,
    stops: &HashSet<ValueId>,
    limit: usize,
) -> Option<Vec<NodeId>> {
    let is_data = |v: &ValueId| !graph.value(*v).ty.dtype.is_int();
    let mut seen: HashSet<NodeId> = HashSet::new();
    let mut stack: Vec<ValueId> = graph
        .node(root)
        .inputs
        .iter()
        .flatten()
        .filter(|v| is_data(v))
        .copied()
        .collect();
    let mut out = Vec::new();
    while let Some(v) = stack.pop() {
        if stops.contains(&v) {
            continue;
        }
        if let Def::Node(n, _) = graph.value(v).def {
            if seen.insert(n) {
                if seen.len() > limit {
                    return None;
                }
                out.push(n);
                stack.extend(graph.node(n).inputs.iter().flatten().filter(|v| is_data(v)));
            }
        }
    }
    Some(out)
}

type Users = HashMap<ValueId, Vec<NodeId>>;

/// Shape conditions the patterns cannot state: an absorbed `Expand` only repeats along a new
/// unit axis (`[b, hk, 1, t, d] → [b, hk, R, t, d]`, repeat_kv), and an absorbed `Reshape`
/// keeps the last two dimensions (it only merges or splits the leading ones).
fn shapes_fit(graph: &Graph, inner: &[NodeId]) -> bool {
    let shape_of =
        |v: Option<&Option<ValueId>>| v.and_then(|v| v.map(|v| &graph.value(v).ty.shape));
    inner.iter().all(|&n| {
        let node = graph.node(n);
        let (Some(input), Some(output)) = (
            shape_of(node.inputs.first()),
            node.outputs.first().map(|v| &graph.value(*v).ty.shape),
        ) else {
            return true;
        };
        match node.op_type.as_str() {
            "Expand" => {
                input.len() == 5
                    && output.len() == 5
                    && input[2].as_const() == Some(1)
                    && (0..5).all(|i| i == 2 || input[i] == output[i])
            }
            "Reshape" => {
                input.len() >= 2
                    && output.len() >= 2
                    && input[input.len() - 2..] == output[output.len() - 2..]
            }
            _ => true,
        }
    })
}

impl Fuse {
    /// Checks replacing node `root` by the fused e-node `enode`: every input must be an
    /// existing value, and the nodes it absorbs (at least one, at most 64) must be used by
    /// nothing outside the fused subgraph. Returns the inputs and the absorbed nodes.
    #[allow(clippy::too_many_arguments)]
    fn candidate(
        &self,
        graph: &Graph,
        root: NodeId,
        enode: &SymbolLang,
        values_of: &HashMap<Id, Vec<ValueId>>,
        users: &Users,
        graph_outputs: &HashSet<ValueId>,
        egraph: &EGraph<SymbolLang, ()>,
    ) -> Result<(Vec<ValueId>, Vec<NodeId>), &'static str> {
        let inputs: Option<Vec<ValueId>> = enode
            .children()
            .iter()
            .map(|c| {
                values_of
                    .get(&egraph.find(*c))
                    .and_then(|vs| vs.first().copied())
            })
            .collect();
        let inputs = inputs.ok_or("an input has no value in the graph")?;
        let stops: HashSet<ValueId> = enode
            .children()
            .iter()
            .flat_map(|c| values_of[&egraph.find(*c)].iter().copied())
            .collect();
        let inner = absorbed_nodes(graph, root, &stops, 64).ok_or("subgraph too large")?;
        if inner.is_empty() {
            return Err("absorbs nothing");
        }
        let inner_set: HashSet<NodeId> = inner.iter().copied().collect();
        let escapes = inner.iter().any(|&n| {
            graph.node(n).outputs.iter().any(|o| {
                graph_outputs.contains(o)
                    || users
                        .get(o)
                        .is_some_and(|us| us.iter().any(|u| *u != root && !inner_set.contains(u)))
            })
        });
        if escapes {
            return Err("an absorbed value is used elsewhere");
        }
        if !shapes_fit(graph, &inner) {
            return Err("an absorbed reshape or expand is not the layout change the rule means");
        }
        Ok((inputs, inner))
    }
}

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn run(&self, graph: &mut Graph, registry: &OpRegistry) -> Result<bool, RuntimeError> {
        let Encoded {
            egraph,
            class_of,
            encoded,
        } = encode(graph);
        let runner = Runner::default()
            .with_egraph(egraph)
            .with_iter_limit(self.limits.iterations)
            .with_node_limit(self.limits.nodes)
            .with_time_limit(self.limits.time)
            .run(&rules::all());
        let mut report = FuseReport {
            stop_reason: runner
                .stop_reason
                .as_ref()
                .map_or("none".into(), |r| format!("{r:?}")),
            iterations: runner.iterations.len(),
            egraph_nodes: runner.egraph.total_number_of_nodes(),
            egraph_classes: runner.egraph.number_of_classes(),
            ..FuseReport::default()
        };
        let egraph = &runner.egraph;

        // Values of every e-class, earliest defined first (any of them is the same value).
        let position: HashMap<NodeId, usize> = graph
            .order()
            .iter()
            .enumerate()
            .map(|(i, &n)| (n, i))
            .collect();
        let rank = |v: ValueId| match graph.value(v).def {
            Def::Node(n, _) => position.get(&n).map_or(usize::MAX, |&p| p + 1),
            _ => 0,
        };
        let mut values_of: HashMap<Id, Vec<ValueId>> = HashMap::new();
        for (&v, &c) in &class_of {
            values_of.entry(egraph.find(c)).or_default().push(v);
        }
        for vs in values_of.values_mut() {
            vs.sort_by_key(|&v| (rank(v), v.0));
        }
        let mut users: Users = HashMap::new();
        for (id, node) in graph.nodes() {
            for v in node.inputs.iter().flatten() {
                users.entry(*v).or_default().push(id);
            }
        }
        let graph_outputs: HashSet<ValueId> = graph.outputs().iter().map(|(v, _)| *v).collect();

        // Roots last to first, so an outer fusion absorbs the inner ones it contains. For each
        // node, of the fused forms in its e-class, the one that absorbs the most nodes wins.
        let mut absorbed: HashSet<NodeId> = HashSet::new();
        let mut replacements = Vec::new();
        for &(id, out) in encoded.iter().rev() {
            if absorbed.contains(&id) {
                continue;
            }
            let node = graph.node(id);
            let class = egraph.find(class_of[&out]);
            let mut best: Option<(FusedOp, Vec<ValueId>, Vec<NodeId>)> = None;
            let mut reasons = Vec::new();
            for enode in &egraph[class].nodes {
                let Some(fused) = FusedOp::parse(enode.op.as_str()) else {
                    continue;
                };
                if node.domain == "patch" && node.op_type == fused.op_type() {
                    continue;
                }
                match self.candidate(graph, id, enode, &values_of, &users, &graph_outputs, egraph) {
                    Ok((inputs, inner)) => {
                        if best.as_ref().is_none_or(|(_, _, b)| inner.len() > b.len()) {
                            best = Some((fused, inputs, inner));
                        }
                    }
                    Err(reason) => reasons.push(reason),
                }
            }
            match best {
                Some((fused, inputs, inner)) => {
                    absorbed.extend(inner);
                    replacements.push((id, fused, inputs));
                }
                // Counted only when no fused form of the node could be used.
                None => {
                    if let Some(reason) = reasons.first() {
                        bump(&mut report.skipped, reason);
                    }
                }
            }
        }
        let mut changed = false;
        for (id, fused, inputs) in replacements {
            let result = graph.replace_node(
                registry,
                id,
                "patch",
                fused.op_type(),
                fused.attrs(),
                inputs.into_iter().map(Some).collect(),
            );
            match result {
                Ok(()) => {
                    bump(&mut report.fused, &format!("patch.{}", fused.op_type()));
                    changed = true;
                }
                // The fused op does not accept these types (e.g. not f32): keep the node.
                Err(RuntimeError::Verify(_) | RuntimeError::Node { .. }) => {
                    bump(&mut report.skipped, "types the fused op does not take");
                }
                Err(e) => return Err(e),
            }
        }
        report.fused.sort();
        report.skipped.sort();
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = report;
        Ok(changed)
    }
}
