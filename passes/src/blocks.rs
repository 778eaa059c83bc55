//! Transformer blocks of a fused graph, found by dataflow, and the standalone graph of one
//! block for block-wise calibration.
//!
//! A block is the region between two residual-stream values: its input `x` is the first input
//! of the `patch.RMSNorm` that feeds the block's first prunable MatMul, its output is the next
//! block's input (for the last block, the input of the first `patch.RMSNorm` after it, the
//! final norm). The region holds the nodes on a path from `x` to the output. Everything else it
//! reads is a constant (weights, shape operands) or a *side value* computed from the graph
//! inputs alone (rotary tables, the causal mask, an empty past), which a caller captures once.
//! Weights are grouped into blocks by the first number in their node's name (`layers.12`).

use std::collections::{HashMap, HashSet};

use patch_runtime::dim::Dim;
use patch_runtime::ir::{Def, InputRole, OutputRole, TensorType};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, NodeId, RuntimeError, Tensor, ValueId};

use crate::autodiff::{differentiate, GradRules};
use crate::hybrid::WeightMatMul;

/// One block of a graph (see the module docs).
#[derive(Clone, Debug)]
pub struct Block {
    /// The number in its weights' names.
    pub number: u64,
    pub input: ValueId,
    pub output: ValueId,
    /// The region, in the graph's order.
    pub nodes: Vec<NodeId>,
    /// Indices into the targets passed to [`find_blocks`], in graph order.
    pub targets: Vec<usize>,
    /// Values the region reads that are neither constants nor produced inside it.
    pub side: Vec<ValueId>,
}

/// The first number in a name (`/model/layers.12/mlp` → 12).
pub fn block_number(name: &str) -> Option<u64> {
    let start = name.find(|c: char| c.is_ascii_digit())?;
    let digits: String = name[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn producer(graph: &Graph, v: ValueId) -> Option<NodeId> {
    match graph.value(v).def {
        Def::Node(n, _) => Some(n),
        _ => None,
    }
}

fn is_rms_norm(graph: &Graph, n: NodeId) -> bool {
    let node = graph.node(n);
    node.domain == "patch" && node.op_type == "RMSNorm"
}

/// The blocks of `graph` over its prunable `targets`, or why they cannot be identified (the
/// caller then falls back to the matrix-wise methods).
pub fn find_blocks(graph: &Graph, targets: &[WeightMatMul]) -> Result<Vec<Block>, String> {
    let pos: HashMap<NodeId, usize> = graph
        .order()
        .iter()
        .enumerate()
        .map(|(i, &n)| (n, i))
        .collect();
    let mut order: Vec<usize> = (0..targets.len()).collect();
    order.sort_by_key(|&i| pos.get(&targets[i].node_id).copied().unwrap_or(usize::MAX));
    // Consecutive targets with the same number form a block.
    let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
    for i in order {
        let t = &targets[i];
        if t.op_type != "MatMul" {
            return Err(format!(
                "`{}` is a {}, block-wise learning takes MatMul weights only",
                t.node, t.op_type
            ));
        }
        let number = block_number(&t.node)
            .or_else(|| block_number(&t.weight))
            .ok_or_else(|| format!("`{}` has no block number in its name", t.node))?;
        match groups.last_mut() {
            Some((b, v)) if *b == number => v.push(i),
            _ => {
                if groups.iter().any(|(b, _)| *b == number) {
                    return Err(format!("the weights of block {number} are not contiguous"));
                }
                groups.push((number, vec![i]));
            }
        }
    }
    if groups.is_empty() {
        return Err("no prunable MatMul".into());
    }
    // Block inputs: the first input of the RMSNorm feeding each block's first MatMul.
    let mut inputs = Vec::with_capacity(groups.len());
    for (b, g) in &groups {
        let first = graph.node(targets[g[0]].node_id);
        let a = first.inputs[0].ok_or("a MatMul without input")?;
        let norm = producer(graph, a)
            .filter(|&n| is_rms_norm(graph, n))
            .ok_or_else(|| format!("block {b}: its first MatMul does not read a patch.RMSNorm"))?;
        inputs.push(
            graph.node(norm).inputs[0]
                .ok_or_else(|| format!("block {b}: RMSNorm without input"))?,
        );
    }
    // The last block's output: the input of the first RMSNorm after its last MatMul.
    let last_target = pos[&targets[*groups
        .last()
        .expect("non-empty")
        .1
        .last()
        .expect("non-empty")]
    .node_id];
    let final_norm = graph.order()[last_target + 1..]
        .iter()
        .copied()
        .find(|&n| is_rms_norm(graph, n))
        .ok_or("no patch.RMSNorm after the last block (the final norm)")?;
    let final_input = graph.node(final_norm).inputs[0].ok_or("final norm without input")?;

    let mut blocks = Vec::with_capacity(groups.len());
    let mut claimed: HashSet<NodeId> = HashSet::new();
    for (i, (number, g)) in groups.iter().enumerate() {
        let x = inputs[i];
        let y = inputs.get(i + 1).copied().unwrap_or(final_input);
        let nodes = region(graph, x, y);
        let set: HashSet<NodeId> = nodes.iter().copied().collect();
        for &t in g {
            if !set.contains(&targets[t].node_id) {
                return Err(format!(
                    "block {number}: `{}` is not between the block's input and output",
                    targets[t].node
                ));
            }
        }
        if nodes.iter().any(|n| claimed.contains(n)) {
            return Err(format!("block {number} overlaps the block before it"));
        }
        claimed.extend(nodes.iter().copied());
        let produced: HashSet<ValueId> = nodes
            .iter()
            .flat_map(|&n| graph.node(n).outputs.iter().copied())
            .collect();
        let mut side = Vec::new();
        for &n in &nodes {
            for v in graph.node(n).inputs.iter().flatten() {
                if *v == x || produced.contains(v) || side.contains(v) {
                    continue;
                }
                if matches!(graph.value(*v).def, Def::Const(_)) {
                    continue;
                }
                side.push(*v);
            }
        }
        blocks.push(Block {
            number: *number,
            input: x,
            output: y,
            nodes,
            targets: g.clone(),
            side,
        });
    }
    // Side values must not depend on the residual stream's values (they are captured once);
    // a dependence through `Shape` is on the window's fixed shape only.
    let mut from_stream: HashSet<ValueId> = HashSet::from([blocks[0].input]);
    for &n in graph.order() {
        let node = graph.node(n);
        if node.op_type == "Shape" || node.op_type == "Size" {
            continue;
        }
        if node
            .inputs
            .iter()
            .flatten()
            .any(|v| from_stream.contains(v))
        {
            from_stream.extend(node.outputs.iter().copied());
        }
    }
    for b in &blocks {
        if let Some(v) = b.side.iter().find(|v| from_stream.contains(v)) {
            return Err(format!(
                "block {}: it reads `{}`, which depends on an earlier block other than through its input",
                b.number,
                graph.value(*v).name
            ));
        }
    }
    Ok(blocks)
}

/// Nodes on a path from `x` to `y`, in graph order.
fn region(graph: &Graph, x: ValueId, y: ValueId) -> Vec<NodeId> {
    let mut fwd: HashSet<ValueId> = HashSet::from([x]);
    let mut fwd_nodes = Vec::new();
    for &n in graph.order() {
        let node = graph.node(n);
        if node.inputs.iter().flatten().any(|v| fwd.contains(v)) {
            fwd.extend(node.outputs.iter().copied());
            fwd_nodes.push(n);
        }
    }
    let mut back: HashSet<ValueId> = HashSet::from([y]);
    let mut keep = Vec::new();
    for &n in fwd_nodes.iter().rev() {
        let node = graph.node(n);
        if node.outputs.iter().any(|v| back.contains(v)) {
            back.extend(node.inputs.iter().flatten().copied());
            keep.push(n);
        }
    }
    keep.reverse();
    keep
}

/// The name of the block graph's input holding the stream.
pub const INPUT: &str = "x";
/// The name of the block graph's output.
pub const OUTPUT: &str = "y";
/// The name of the dense target input (with a loss).
pub const TARGET: &str = "target";
/// The name of the loss output.
pub const LOSS: &str = "loss";

/// How to build a block's standalone graph.
pub struct BlockGraphSpec<'a> {
    /// The stream's concrete shape (`[1, seq, hidden]`).
    pub shape: &'a [usize],
    /// Captured side values (see [`Block::side`]).
    pub side: &'a HashMap<ValueId, Tensor>,
    /// Weights read as graph inputs named by the weight (their MatMul's second operand,
    /// oriented `[K, N]`), by target index.
    pub trainable: &'a [usize],
    /// Adds a `target` input, `loss = patch.MseLoss(y, target)` and the gradients of the loss
    /// with respect to the trainable weights (outputs `grad/<weight>`).
    pub with_loss: bool,
}

/// The standalone graph of `block`: input `x` (then one input per trainable weight, then
/// `target`), outputs `y` (then `loss` and the gradients).
pub fn block_graph(
    graph: &Graph,
    registry: &OpRegistry,
    block: &Block,
    targets: &[WeightMatMul],
    spec: &BlockGraphSpec<'_>,
) -> Result<Graph, RuntimeError> {
    let mut g = Graph::new(format!("block {}", block.number), graph.opset);
    let dtype = graph.value(block.input).ty.dtype;
    let shape: Vec<Dim> = spec
        .shape
        .iter()
        .map(|&d| Dim::constant(d as i64))
        .collect();
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    map.insert(
        block.input,
        g.add_input(
            INPUT,
            TensorType::new(dtype, shape.clone()),
            InputRole::Other,
        )?,
    );
    let mut wrt = Vec::new();
    for &t in spec.trainable {
        let target = &targets[t];
        let operand = graph.node(target.node_id).inputs[1]
            .ok_or_else(|| RuntimeError::Undefined(format!("weight of {}", target.node)))?;
        let ty = TensorType::new(
            graph.value(operand).ty.dtype,
            vec![
                Dim::constant(target.k as i64),
                Dim::constant(target.n as i64),
            ],
        );
        map.insert(operand, g.add_input(&target.weight, ty, InputRole::Other)?);
        wrt.push(target.weight.clone());
    }
    for &n in &block.nodes {
        let node = graph.node(n);
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for v in &node.inputs {
            let Some(v) = v else {
                inputs.push(None);
                continue;
            };
            if let Some(&m) = map.get(v) {
                inputs.push(Some(m));
                continue;
            }
            let value = graph.value(*v);
            let t = match &value.def {
                Def::Const(t) => t.clone(),
                _ => spec.side.get(v).cloned().ok_or_else(|| {
                    RuntimeError::Undefined(format!("side value `{}` was not captured", value.name))
                })?,
            };
            let id = g.add_const(value.name.clone(), t)?;
            map.insert(*v, id);
            inputs.push(Some(id));
        }
        let names = node
            .outputs
            .iter()
            .map(|&o| graph.value(o).name.clone())
            .collect();
        let outs = g.add_node(
            registry,
            node.name.clone(),
            &node.domain,
            &node.op_type,
            node.attrs.clone(),
            inputs,
            names,
        )?;
        for (&o, id) in node.outputs.iter().zip(outs) {
            map.insert(o, id);
        }
    }
    let y = *map
        .get(&block.output)
        .ok_or_else(|| RuntimeError::Undefined("block output".into()))?;
    let y = g.add_node(
        registry,
        OUTPUT,
        "",
        "Identity",
        Default::default(),
        vec![Some(y)],
        vec![OUTPUT.into()],
    )?[0];
    g.set_outputs(vec![(y, OutputRole::Other)]);
    if spec.with_loss {
        let ty = g.value(y).ty.clone();
        let t = g.add_input(TARGET, ty, InputRole::Other)?;
        let loss = g.add_node(
            registry,
            LOSS,
            "patch",
            "MseLoss",
            Default::default(),
            vec![Some(y), Some(t)],
            vec![LOSS.into()],
        )?[0];
        g.set_outputs(vec![(y, OutputRole::Other), (loss, OutputRole::Other)]);
        if !wrt.is_empty() {
            differentiate(&mut g, registry, &GradRules::standard(), LOSS, &wrt)?;
        }
    }
    Ok(g)
}
