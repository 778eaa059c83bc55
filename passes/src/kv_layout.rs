//! Sequence-major attention: folds the exporters' head-layout transposes into the fused ops and
//! turns the KV-cache concatenations into in-place appends.
//!
//! Exporters split heads as `Transpose(Reshape(x, [b, s, h, d]), [0, 2, 1, 3])`, rotate,
//! attend in `[b, h, s, d]` and transpose back. Per `patch.Attention` (head-major) whose Q, K
//! and V are such transposes (optionally through `patch.Rotary`) and whose output feeds only
//! the transpose back, this pass
//!
//! * reads Q, K and V in `[b, s, h, d]` instead (`layout = "bshd"`); each rotation reads the
//!   untransposed input, with its Cos/Sin tables transposed once from `[c, 1, s, d]` to
//!   `[c, s, 1, d]` (shared by every layer);
//! * when K and V are `Concat(past, new, axis 2)` of past graph inputs, re-lays the cache out
//!   as `[b, t, hk, d]`: the past inputs are retyped, the concatenations become
//!   `patch.KvAppend(past, new) {axis = 1}` under the present outputs' names, so a batch-1
//!   cache grows in place (see `patch_runtime::append`) instead of being copied every step;
//! * bypasses the transpose back (its users read the attention directly).
//!
//! This changes the graph's I/O contract for past/present tensors (positions before heads);
//! the LLM driver reads the layout from the past inputs' types. Exact: the same products and
//! sums in the same order (the attention op's two layouts are tested equal bit for bit). A
//! layer that does not match whole is left alone.

use std::collections::HashMap;

use patch_runtime::ir::{Attr, Attrs, Def, InputRole};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, NodeId, RuntimeError, TensorType, ValueId};

use crate::dce::DeadCodeElimination;
use crate::Pass;

pub struct KvLayout;

const SWAP_HEADS: [i64; 4] = [0, 2, 1, 3];

/// A per-head norm after the head split (Gemma 3's q/k norms): `RMSNorm(Transpose(x), w)`
/// over the last axis with `w` of rank ≤ 1, which commutes with the transpose.
#[derive(Clone, Debug)]
struct HeadNorm {
    scale: Option<ValueId>,
    attrs: Attrs,
    /// The head-major norm this replaces (its names are reused).
    old: NodeId,
}

/// `x` split into heads: `Transpose(x, [0, 2, 1, 3])`, maybe normalized per head.
#[derive(Clone, Debug)]
struct Heads {
    x: ValueId,
    norm: Option<HeadNorm>,
}

/// A head-major operand of the attention, as the pass rebuilds it seq-major.
#[derive(Clone, Debug)]
enum Operand {
    /// The heads of `x`: `x` itself (normalized, if the heads are).
    Plain(Heads),
    /// `Rotary(heads, cos, sin)`: the rotation of the seq-major heads.
    Rotated {
        x: Heads,
        cos: ValueId,
        sin: ValueId,
        attrs: Attrs,
        /// The head-major rotation this replaces (its names are reused).
        old: NodeId,
    },
}

/// K or V: the operand, and the past graph input it is appended to, if cached.
#[derive(Clone, Debug)]
struct Cached {
    new: Operand,
    /// (past input, present value) of a `Concat(past, new, axis 2)`.
    cache: Option<(ValueId, ValueId)>,
}

#[derive(Debug)]
struct Layer {
    attention: NodeId,
    q: Operand,
    k: Cached,
    v: Cached,
    /// The transpose back to `[b, s, h, d]` after the attention.
    back: ValueId,
}

fn producer(graph: &Graph, v: ValueId) -> Option<NodeId> {
    match graph.value(v).def {
        Def::Node(n, 0) => Some(n),
        _ => None,
    }
}

fn is_swap_heads(graph: &Graph, n: NodeId) -> bool {
    let node = graph.node(n);
    node.domain.is_empty()
        && node.op_type == "Transpose"
        && node.attrs.ints("perm").ok().flatten() == Some(&SWAP_HEADS[..])
        && graph.value(node.outputs[0]).ty.rank() == 4
}

struct Matcher<'g> {
    graph: &'g Graph,
    /// Uses by nodes (graph outputs not counted).
    node_uses: Vec<usize>,
    is_output: Vec<bool>,
    /// Per value: the whole-shape `Shape` nodes that read it (exporters read the past length
    /// from the first layer's past keys).
    shape_users: Vec<Vec<NodeId>>,
}

impl Matcher<'_> {
    /// A value read by one node only and not a graph output.
    fn private(&self, v: ValueId) -> bool {
        self.node_uses[v.0 as usize] == 1 && !self.is_output[v.0 as usize]
    }

    /// `v` as the heads of a `[b, s, h, d]` value (see [`Heads`]); `v` must be private.
    fn heads(&self, v: ValueId) -> Option<Heads> {
        let g = self.graph;
        if !self.private(v) {
            return None;
        }
        let n = producer(g, v)?;
        if is_swap_heads(g, n) {
            return Some(Heads {
                x: g.node(n).inputs[0]?,
                norm: None,
            });
        }
        let node = g.node(n);
        let last_axis = matches!(node.attrs.int_or("axis", -1).ok()?, -1 | 3);
        if node.domain != "patch" || node.op_type != "RMSNorm" || !last_axis {
            return None;
        }
        let t = node.inputs.first().copied()??;
        let scale = node.inputs.get(1).copied().flatten();
        let per_channel = scale.is_none_or(|w| g.value(w).ty.rank() <= 1);
        let t_node = producer(g, t)?;
        (per_channel && self.private(t) && is_swap_heads(g, t_node)).then(|| Heads {
            x: g.node(t_node).inputs[0].expect("a transpose has its input"),
            norm: Some(HeadNorm {
                scale,
                attrs: node.attrs.clone(),
                old: n,
            }),
        })
    }

    fn operand(&self, v: ValueId) -> Option<Operand> {
        let g = self.graph;
        if let Some(heads) = self.heads(v) {
            return Some(Operand::Plain(heads));
        }
        if !self.private(v) {
            return None;
        }
        let n = producer(g, v)?;
        let node = g.node(n);
        if node.domain != "patch" || node.op_type != "Rotary" || node.inputs.len() != 3 {
            return None;
        }
        let axis = node.attrs.int_or("axis", -1).ok()?;
        let (t, cos, sin) = (node.inputs[0]?, node.inputs[1]?, node.inputs[2]?);
        let table_ok = |c: ValueId| {
            let ty = &g.value(c).ty;
            ty.rank() == 4 && ty.shape[1].as_const() == Some(1)
        };
        let heads = self.heads(t)?;
        (matches!(axis, -1 | 3) && table_ok(cos) && table_ok(sin)).then(|| Operand::Rotated {
            x: heads,
            cos,
            sin,
            attrs: node.attrs.clone(),
            old: n,
        })
    }

    fn cached(&self, v: ValueId, role: fn(&InputRole) -> bool) -> Option<Cached> {
        let g = self.graph;
        if let Some(new) = self.operand(v) {
            return Some(Cached { new, cache: None });
        }
        // `present = Concat(past, new, axis 2)`, read by the attention and maybe a graph output.
        if self.node_uses[v.0 as usize] != 1 {
            return None;
        }
        let n = producer(g, v)?;
        let node = g.node(n);
        let axis = node.attrs.int_or("axis", 0).ok()?;
        if !node.domain.is_empty() || node.op_type != "Concat" || !matches!(axis, 2 | -2) {
            return None;
        }
        let [Some(past), Some(new)] = node.inputs[..] else {
            return None;
        };
        let Def::Input(i) = g.value(past).def else {
            return None;
        };
        let shape_reads = self.shape_users[past.0 as usize].len();
        let past_ok = role(&g.inputs()[i].1)
            && self.node_uses[past.0 as usize] == 1 + shape_reads
            && !self.is_output[past.0 as usize]
            && g.value(past).ty.rank() == 4
            && g.value(past).ty.shape[0].as_const().is_none_or(|b| b == 1);
        let new = self.operand(new)?;
        past_ok.then_some(Cached {
            new,
            cache: Some((past, v)),
        })
    }

    fn layer(&self, attention: NodeId) -> Option<Layer> {
        let g = self.graph;
        let node = g.node(attention);
        let head_major = matches!(node.attrs.string("layout").ok()?, None | Some("bhsd"));
        if node.domain != "patch" || node.op_type != "Attention" || !head_major {
            return None;
        }
        let q = self.operand(node.inputs.first().copied()??)?;
        let k = self.cached(node.inputs.get(1).copied()??, |r| {
            matches!(r, InputRole::PastKey(_))
        })?;
        let v = self.cached(node.inputs.get(2).copied()??, |r| {
            matches!(r, InputRole::PastValue(_))
        })?;
        if k.cache.is_some() != v.cache.is_some() {
            return None;
        }
        // The output feeds exactly one transpose back to `[b, s, h, d]`.
        let out = node.outputs[0];
        if !self.private(out) {
            return None;
        }
        let back = g
            .nodes()
            .find(|(_, n)| n.inputs.contains(&Some(out)))
            .filter(|(id, _)| is_swap_heads(g, *id))
            .map(|(_, n)| n.outputs[0])?;
        Some(Layer {
            attention,
            q,
            k,
            v,
            back,
        })
    }
}

/// The rotary tables transposed to `[c, s, 1, d]`, each once, before the first rewritten
/// attention that reads it (layers are rewritten in graph order; a table may be computed
/// anywhere before its first reader, as Gemma 3's local and global tables are).
#[derive(Default)]
struct SeqMajorTables {
    done: HashMap<ValueId, ValueId>,
}

impl SeqMajorTables {
    fn get(
        &mut self,
        graph: &mut Graph,
        registry: &OpRegistry,
        table: ValueId,
        before: NodeId,
    ) -> Result<ValueId, RuntimeError> {
        if let Some(&done) = self.done.get(&table) {
            return Ok(done);
        }
        let name = format!("{}/seq_major", graph.value(table).name);
        let out = graph.insert_node_before(
            registry,
            before,
            name.clone(),
            "",
            "Transpose",
            Attrs::new().with("perm", Attr::Ints(SWAP_HEADS.to_vec())),
            vec![Some(table)],
            vec![name],
        )?[0];
        self.done.insert(table, out);
        Ok(out)
    }
}

/// The seq-major form of an attention operand, new nodes placed before node `at`.
fn seq_major_operand(
    graph: &mut Graph,
    registry: &OpRegistry,
    operand: &Operand,
    at: NodeId,
    tables: &mut SeqMajorTables,
) -> Result<ValueId, RuntimeError> {
    match operand {
        Operand::Plain(heads) => seq_major_heads(graph, registry, heads, at),
        Operand::Rotated {
            x,
            cos,
            sin,
            attrs,
            old,
        } => {
            let x = seq_major_heads(graph, registry, x, at)?;
            let cos = tables.get(graph, registry, *cos, at)?;
            let sin = tables.get(graph, registry, *sin, at)?;
            let old = graph.node(*old);
            let value = format!("{}/seq_major", graph.value(old.outputs[0]).name);
            Ok(graph.insert_node_before(
                registry,
                at,
                format!("{}/seq_major", old.name),
                "patch",
                "Rotary",
                attrs.clone(),
                vec![Some(x), Some(cos), Some(sin)],
                vec![value],
            )?[0])
        }
    }
}

/// The seq-major heads: `x`, normalized when the heads were, new nodes placed before `at`.
fn seq_major_heads(
    graph: &mut Graph,
    registry: &OpRegistry,
    heads: &Heads,
    at: NodeId,
) -> Result<ValueId, RuntimeError> {
    let Some(norm) = &heads.norm else {
        return Ok(heads.x);
    };
    let old = graph.node(norm.old);
    let value = format!("{}/seq_major", graph.value(old.outputs[0]).name);
    Ok(graph.insert_node_before(
        registry,
        at,
        format!("{}/seq_major", old.name),
        "patch",
        "RMSNorm",
        norm.attrs.clone(),
        vec![Some(heads.x), norm.scale],
        vec![value],
    )?[0])
}

/// `ty` with axes 1 and 2 swapped.
fn swapped(ty: &TensorType) -> TensorType {
    let mut shape = ty.shape.clone();
    shape.swap(1, 2);
    TensorType::new(ty.dtype, shape)
}

impl Pass for KvLayout {
    fn name(&self) -> &'static str {
        "kv-layout"
    }

    fn run(&self, graph: &mut Graph, registry: &OpRegistry) -> Result<bool, RuntimeError> {
        let mut node_uses = graph.use_counts();
        let mut is_output = vec![false; graph.value_count()];
        for (v, _) in graph.outputs() {
            is_output[v.0 as usize] = true;
            node_uses[v.0 as usize] -= 1;
        }
        let mut shape_users = vec![Vec::new(); graph.value_count()];
        for (id, n) in graph.nodes() {
            let whole = n.attrs.get("start").is_none() && n.attrs.get("end").is_none();
            if let (true, true, [Some(x)]) =
                (n.domain.is_empty(), n.op_type == "Shape", &n.inputs[..])
            {
                if whole {
                    shape_users[x.0 as usize].push(id);
                }
            }
        }
        let matcher = Matcher {
            graph,
            node_uses,
            is_output,
            shape_users,
        };
        // In graph order (see `SeqMajorTables`).
        let layers: Vec<Layer> = graph
            .order()
            .iter()
            .filter_map(|&id| matcher.layer(id))
            .collect();
        if layers.is_empty() {
            return Ok(false);
        }

        // The cache's new layout first, so that the appends infer from it. Whole-shape reads of
        // a past input get its dims back in the exported order: `Gather(Shape(past), [0, 2, 1,
        // 3])`.
        let shape_reads: Vec<(ValueId, Vec<NodeId>)> = layers
            .iter()
            .flat_map(|l| [&l.k, &l.v])
            .filter_map(|c| c.cache)
            .map(|(past, _)| (past, matcher.shape_users[past.0 as usize].clone()))
            .collect();
        for (past, readers) in shape_reads {
            let ty = swapped(&graph.value(past).ty);
            graph.value_mut(past).ty = ty;
            for reader in readers {
                let old = graph.node(reader).outputs[0];
                let name = graph.value(old).name.clone();
                let perm = graph.add_const(
                    format!("{name}/head_major_order"),
                    patch_runtime::Tensor::from_vec(vec![4], SWAP_HEADS.to_vec())?,
                )?;
                let seq_major = graph.insert_node_before(
                    registry,
                    reader,
                    format!("{name}/seq_major"),
                    "",
                    "Shape",
                    Attrs::new(),
                    vec![Some(past)],
                    vec![format!("{name}/seq_major")],
                )?[0];
                let head_major = graph.insert_node_before(
                    registry,
                    reader,
                    format!("{name}/head_major"),
                    "",
                    "Gather",
                    Attrs::new().with("axis", Attr::Int(0)),
                    vec![Some(seq_major), Some(perm)],
                    vec![format!("{name}/head_major")],
                )?[0];
                graph.replace_uses(old, head_major);
            }
        }
        let mut tables = SeqMajorTables::default();
        for layer in &layers {
            let at = layer.attention;
            let prefix = graph.node(at).name.clone();
            let mut build = |graph: &mut Graph, operand: &Operand| {
                seq_major_operand(graph, registry, operand, at, &mut tables)
            };
            let q = build(graph, &layer.q)?;
            let mut kv = Vec::new();
            for c in [&layer.k, &layer.v] {
                let new = build(graph, &c.new)?;
                kv.push(match c.cache {
                    None => new,
                    Some((past, present)) => {
                        // The appended cache takes over the present output's name.
                        let name = graph.value(present).name.clone();
                        graph.rename_value(present, format!("{name}/head_major"))?;
                        let grown = graph.insert_node_before(
                            registry,
                            at,
                            format!("{name}/append"),
                            "patch",
                            "KvAppend",
                            Attrs::new().with("axis", Attr::Int(1)),
                            vec![Some(past), Some(new)],
                            vec![name],
                        )?[0];
                        graph.replace_uses(present, grown);
                        grown
                    }
                });
            }
            let node = graph.node(at);
            let mut attrs = node.attrs.clone();
            attrs = attrs.with("layout", Attr::String("bshd".into()));
            let mask = node.inputs.get(3).copied().flatten();
            let value = format!("{}/seq_major", graph.value(node.outputs[0]).name);
            let mut inputs = vec![Some(q), Some(kv[0]), Some(kv[1])];
            if mask.is_some() {
                inputs.push(mask);
            }
            let out = graph.insert_node_before(
                registry,
                at,
                format!("{prefix}/seq_major"),
                "patch",
                "Attention",
                attrs,
                inputs,
                vec![value],
            )?[0];
            if graph.value(out).ty != graph.value(layer.back).ty {
                return Err(RuntimeError::Verify(format!(
                    "kv-layout: `{}` would be {} where the transpose back gave {}",
                    graph.value(out).name,
                    graph.value(out).ty,
                    graph.value(layer.back).ty
                )));
            }
            graph.replace_uses(layer.back, out);
        }
        // The head-major nodes are dead now (they read the retyped past inputs, so they must go
        // before the verifier sees them).
        DeadCodeElimination.run(graph, registry)?;
        Ok(true)
    }
}
