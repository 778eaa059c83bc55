//! The hybrid MatMul rewrite: every weight MatMul/Gemm becomes a `patch.HybridMatMul` holding
//! its weight packed in the hybrid tile format (see `patch_kernels::format`).
//!
//! Targets are MatMul/Gemm nodes whose weight operand is a 2-D f32 constant, directly or
//! through one `Transpose` (Gemm: `transA = 0`, `alpha = 1`, and `C` absent or a constant
//! `[N]` bias with `beta = 1`). A weight with a vocabulary-sized dimension (the LM head, a tied
//! embedding) is never pruned: it is packed all dense (in the chosen dtype, so that a bf16
//! bundle reads the LM head in bf16 too), and a mask given for it is an error.
//!
//! A weight listed in [`HybridMatMulRewrite::masks`] is packed with its tile map and keep-mask;
//! every other target is packed all dense, which keeps the node's outputs equal to the
//! original's up to the weight dtype's rounding (bitwise-equal sums are not promised: the
//! kernels accumulate in a different order than the reference MatMul, ≤ 1e-6 relative in f32).

use std::collections::HashMap;

use patch_kernels::format::{pack, PackedWeight, TileKind, TileMap, TileShape, WeightDtype};
use patch_kernels::{bf16, f16};
use patch_runtime::ir::{Def, NodeId, OutputRole};
use patch_runtime::ops::hybrid::{HybridMatMul, DOMAIN, OP_TYPE};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{DType, Graph, OpError, RuntimeError, ValueId};

use crate::{Pass, Progress};

/// A MatMul or Gemm whose weight operand is a constant (possibly through a `Transpose`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightMatMul {
    pub node_id: NodeId,
    pub node: String,
    pub op_type: String,
    /// The constant holding the weight.
    pub weight_id: ValueId,
    pub weight: String,
    /// Reduction and output sizes of the product (`X[.., K] · W[K, N]`).
    pub k: usize,
    pub n: usize,
    /// True when the constant is stored `[N, K]` (a Transpose or Gemm `transB = 1`).
    pub transposed: bool,
    /// Constant bias `[N]` (Gemm's `C`).
    pub bias: Option<ValueId>,
    /// False for weights the rewrite leaves alone: a non-f32 weight or activation, or a Gemm
    /// form the kernels do not cover.
    pub rewritable: bool,
    /// False for weights that must stay dense: a vocabulary-sized dimension.
    pub prunable: bool,
}

impl WeightMatMul {
    /// The weight as f32 in the `X · W` orientation, row-major `[K, N]`.
    pub fn oriented_weight(&self, graph: &Graph) -> Result<Vec<f32>, RuntimeError> {
        let w = graph
            .const_value(self.weight_id)
            .expect("weight source is a constant")
            .to_aligned();
        let stored = w.as_slice::<f32>()?;
        if !self.transposed {
            return Ok(stored.to_vec());
        }
        let (k, n) = (self.k, self.n);
        let mut v = vec![0f32; k * n];
        for (r, row) in stored.chunks_exact(k).enumerate() {
            for (kk, &x) in row.iter().enumerate() {
                v[kk * n + r] = x;
            }
        }
        Ok(v)
    }
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

/// The vocabulary size: the last dim of the graph's logits output, when it is a constant.
pub fn vocab_size(graph: &Graph) -> Option<usize> {
    graph
        .outputs()
        .iter()
        .find(|(_, role)| *role == OutputRole::Logits)
        .and_then(|(id, _)| graph.value(*id).ty.shape.last()?.as_const())
        .map(|v| v as usize)
}

/// Every MatMul/Gemm with a 2-D constant weight, in graph order.
pub fn weight_matmuls(graph: &Graph) -> Vec<WeightMatMul> {
    let vocab = vocab_size(graph);
    let mut out = Vec::new();
    for (node_id, node) in graph.nodes() {
        if !node.domain.is_empty() || !(node.op_type == "MatMul" || node.op_type == "Gemm") {
            continue;
        }
        let Some(Some(b)) = node.inputs.get(1).copied() else {
            continue;
        };
        let Some((src, mut transposed)) = weight_source(graph, b) else {
            continue;
        };
        let is_gemm = node.op_type == "Gemm";
        if is_gemm && node.attrs.int_or("transB", 0).unwrap_or(0) != 0 {
            transposed = !transposed;
        }
        let t = graph.const_value(src).expect("weight source is a constant");
        let &[r, c] = t.shape() else {
            continue;
        };
        let (k, n) = if transposed { (c, r) } else { (r, c) };
        let a_is_f32 = node
            .inputs
            .first()
            .copied()
            .flatten()
            .is_some_and(|a| graph.value(a).ty.dtype == DType::F32);
        let mut rewritable = t.dtype() == DType::F32 && a_is_f32 && k > 0 && n > 0;
        let prunable = vocab.is_none_or(|v| k != v && n != v);
        let mut bias = None;
        if is_gemm {
            let a = &node.attrs;
            let c = node.inputs.get(2).copied().flatten();
            let bias_ok = match c {
                None => true,
                Some(c) => {
                    bias = Some(c);
                    graph
                        .const_value(c)
                        .is_some_and(|t| t.shape() == [n] && t.dtype() == DType::F32)
                        && a.float_or("beta", 1.0).unwrap_or(0.0) == 1.0
                }
            };
            rewritable &= bias_ok
                && a.int_or("transA", 0).unwrap_or(1) == 0
                && a.float_or("alpha", 1.0).unwrap_or(0.0) == 1.0;
        }
        out.push(WeightMatMul {
            node_id,
            node: node.name.clone(),
            op_type: node.op_type.clone(),
            weight_id: src,
            weight: graph.value(src).name.clone(),
            k,
            n,
            transposed,
            bias,
            rewritable,
            prunable,
        });
    }
    out
}

/// A learned mask for one weight: which tiles stay dense, and which elements are kept
/// (row-major `[K, N]`, in the `X · W` orientation whatever the stored layout).
#[derive(Clone, Debug)]
pub struct WeightMask {
    pub map: TileMap,
    pub keep: Vec<bool>,
    /// Replacement weights (row-major `[K, N]`, e.g. after a SparseGPT update).
    pub weights: Option<Vec<f32>>,
}

/// Rewrites weight MatMuls into `patch.HybridMatMul` (see the module docs).
#[derive(Clone)]
pub struct HybridMatMulRewrite {
    pub tile: TileShape,
    pub dtype: WeightDtype,
    /// Masks by weight constant name; weights not listed are packed all dense.
    pub masks: HashMap<String, WeightMask>,
    /// Called after each packed weight with `(done, total)`.
    pub progress: Option<Progress>,
}

impl std::fmt::Debug for HybridMatMulRewrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridMatMulRewrite")
            .field("tile", &self.tile)
            .field("dtype", &self.dtype)
            .field("masks", &self.masks.len())
            .finish()
    }
}

impl HybridMatMulRewrite {
    /// All weights dense, stored as `dtype`.
    pub fn dense(tile: TileShape, dtype: WeightDtype) -> Self {
        HybridMatMulRewrite {
            tile,
            dtype,
            masks: HashMap::new(),
            progress: None,
        }
    }

    fn packed(&self, graph: &Graph, t: &WeightMatMul) -> Result<PackedWeight, RuntimeError> {
        let (k, n) = (t.k, t.n);
        let mask = self.masks.get(&t.weight);
        if mask.is_some() && !t.prunable {
            return Err(RuntimeError::at_node(
                &t.node,
                &t.op_type,
                OpError::Invalid(format!(
                    "weight `{}` has a vocabulary-sized dimension and must stay dense",
                    t.weight
                )),
            ));
        }
        let oriented = match mask.and_then(|m| m.weights.clone()) {
            Some(w) if w.len() == k * n => w,
            _ => t.oriented_weight(graph)?,
        };
        // Without a mask every tile is dense and `pack` keeps every element (zeros included).
        let (map, keep) = match mask {
            Some(m) => (m.map.clone(), Some(m.keep.as_slice())),
            None => {
                let (kt, nt) = self.tile.grid(k, n);
                (TileMap::uniform(kt, nt, TileKind::Dense), None)
            }
        };
        let fail = |e: patch_kernels::PackError| {
            RuntimeError::at_node(
                &t.node,
                &t.op_type,
                OpError::Invalid(format!("packing weight `{}`: {e}", t.weight)),
            )
        };
        match self.dtype {
            WeightDtype::F32 => pack(&oriented, k, n, self.tile, &map, keep).map_err(fail),
            WeightDtype::Bf16 => {
                let w: Vec<bf16> = oriented.iter().map(|&x| bf16::from_f32(x)).collect();
                pack(&w, k, n, self.tile, &map, keep).map_err(fail)
            }
            WeightDtype::F16 => {
                let w: Vec<f16> = oriented.iter().map(|&x| f16::from_f32(x)).collect();
                pack(&w, k, n, self.tile, &map, keep).map_err(fail)
            }
        }
    }
}

impl Pass for HybridMatMulRewrite {
    fn name(&self) -> &'static str {
        "hybrid-matmul"
    }

    fn run(&self, graph: &mut Graph, registry: &OpRegistry) -> Result<bool, RuntimeError> {
        let mut changed = false;
        // One packed copy per (weight, orientation), shared by every node that uses it.
        let mut packed_consts = HashMap::new();
        let targets: Vec<_> = weight_matmuls(graph)
            .into_iter()
            .filter(|t| t.rewritable)
            .collect();
        let total = targets.len();
        for (done, t) in targets.into_iter().enumerate() {
            if let Some(p) = &self.progress {
                p(done, total);
            }
            let key = (t.weight_id, t.transposed);
            let (attrs, values, meta) = match packed_consts.get(&key) {
                Some(done) => Clone::clone(done),
                None => {
                    let packed = self.packed(graph, &t)?;
                    let (attrs, values, meta) = HybridMatMul::encode(&packed);
                    let suffix = if t.transposed { ".t" } else { "" };
                    let values =
                        graph.add_const(format!("{}{suffix}.hybrid_values", t.weight), values)?;
                    let meta =
                        graph.add_const(format!("{}{suffix}.hybrid_meta", t.weight), meta)?;
                    packed_consts.insert(key, (attrs.clone(), values, meta));
                    (attrs, values, meta)
                }
            };
            let x = graph.node(t.node_id).inputs[0];
            graph.replace_node(
                registry,
                t.node_id,
                DOMAIN,
                OP_TYPE,
                attrs,
                vec![x, Some(values), Some(meta), t.bias],
            )?;
            changed = true;
        }
        if let Some(p) = &self.progress {
            p(total, total);
        }
        Ok(changed)
    }
}
