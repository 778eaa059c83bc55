//! Sequential block-wise calibration: masks and weights learned through each transformer
//! block against the dense model's block output.
//!
//! The blocks of the fused graph ([`crate::blocks`]) are processed in order. Two streams of
//! calibration windows run through them: the dense model's (its block outputs are the
//! targets) and the pruned model's (each block is fed the output of the blocks before it,
//! already pruned and updated). For block `i`:
//!
//! 1. the dense stream gives the targets `T = block_i(X_dense)` (read from [`DenseOutputs`]
//!    when the caller captured them, run here otherwise), and the Gram matrices of the
//!    block's MatMul inputs are taken on the pruned stream (sequential statistics);
//! 2. the prior: SparseGPT's OBS sweep inside the tile map of the global allocation, on those
//!    statistics (the kept weights updated when `update_weights`);
//! 3. learning: Adam on the 2:4 pattern logits of every full group of four in the 2:4 tiles
//!    (Gumbel-softmax over the six patterns, prior logit on the OBS pattern, as PATCH-Joint)
//!    and, with `update_weights`, on the weights themselves, minimizing the block's output
//!    error `mean((block(X_pruned) − T)²)`. The gradient comes from the block's graph
//!    differentiated by [`crate::autodiff`] and run by the interpreter: the gradient with
//!    respect to the effective weight `W ⊙ K` (K the relaxed keep mask) is chained to `W`
//!    and to the pattern logits here;
//! 4. the hard mask (argmax pattern) and weights are scored on held-out windows every few
//!    steps; the best seen, starting from the prior, is kept, so a block is never worse than
//!    its prior on the held-out block objective;
//! 5. the pruned stream advances through the block with the kept masks and weights.
//!
//! The tile map (which tiles are 2:4) comes from the global allocation and is not changed here.

use std::collections::HashMap;

use patch_kernels::{TileKind, TileMap, TileShape};
use patch_runtime::interp::Plan;
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, Tensor, ValueId};

use super::joint::{argmax, gumbel, softmax, PATTERNS};
use super::{masked_weights, sparsegpt};
use crate::blocks::{block_graph, Block, BlockGraphSpec};
use crate::calibration::Gram;
use crate::hybrid::WeightMatMul;

/// Settings of the block-wise learner.
#[derive(Clone, Debug)]
pub struct BlockwiseOptions {
    /// Adam steps per block (one calibration window each); 0 keeps the sequential prior.
    pub steps: usize,
    /// Adam step on the pattern logits.
    pub pattern_lr: f64,
    /// Adam step on the weights, relative to the RMS of each weight matrix.
    pub weight_lr: f64,
    /// Gumbel-softmax temperature from, to (geometric).
    pub tau: (f64, f64),
    /// Initial logit of the prior pattern (the others start at 0).
    pub prior: f64,
    /// Windows held out to score hard masks (the rest are learned on).
    pub eval_windows: usize,
    /// Steps between two scorings of the hard mask.
    pub check_every: usize,
    pub seed: u64,
}

impl Default for BlockwiseOptions {
    fn default() -> Self {
        BlockwiseOptions {
            steps: 64,
            pattern_lr: 0.05,
            weight_lr: 2e-3,
            tau: (1.0, 0.1),
            prior: 3.0,
            eval_windows: 8,
            check_every: 16,
            seed: 0,
        }
    }
}

/// What the learner did for one block.
#[derive(Clone, Debug)]
pub struct BlockOutcome {
    pub number: u64,
    /// `mean((y − T)²) / mean(T²)` on the held-out windows, of the prior and of the result.
    pub prior_error: f64,
    pub error: f64,
    /// Whether the learned mask/weights replaced the prior.
    pub learned: bool,
    /// Training loss (relative, as above) per step.
    pub curve: Vec<f64>,
    pub seconds: f64,
    /// Seconds per phase: statistics (both streams through the block), prior (OBS), learning
    /// (steps and scoring), advancing the pruned stream.
    pub phases: [f64; 4],
}

/// The mask and weights chosen for one target.
#[derive(Clone, Debug)]
pub struct LearnedWeight {
    pub keep: Vec<bool>,
    /// The weights to pack (zero where pruned).
    pub weights: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockwiseError {
    #[error("block {block}: {msg}")]
    Block { block: u64, msg: String },
    #[error("block {block}, step {step}: the loss is {loss} (not finite); nothing was kept")]
    NotFinite { block: u64, step: usize, loss: f64 },
}

/// One target's learnable state inside its block.
struct Weight {
    target: usize,
    n: usize,
    /// Master weights `[K, N]`.
    w: Vec<f32>,
    /// Hard keep mask; inside learnable groups it is recomputed from the logits.
    keep: Vec<bool>,
    /// First element of every learnable group (its 4 elements are `n` apart).
    groups: Vec<usize>,
    /// Pattern logits, 6 per group.
    phi: Vec<f32>,
    adam_w: Adam,
    adam_phi: Adam,
    lr_w: f64,
}

struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(n: usize) -> Adam {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn step(&mut self, x: &mut [f32], g: &[f32], lr: f64, t: usize) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let c1 = 1.0 - b1.powi(t as i32);
        let c2 = 1.0 - b2.powi(t as i32);
        let lr = lr as f32;
        for i in 0..x.len() {
            let gi = g[i];
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * gi;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * gi * gi;
            x[i] -= lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + eps);
        }
    }
}

fn pattern_of(keep: &[bool], e0: usize, n: usize) -> Option<u8> {
    let bits: u8 = (0..4).map(|q| (keep[e0 + q * n] as u8) << q).sum();
    PATTERNS.iter().position(|&p| p == bits).map(|p| p as u8)
}

impl Weight {
    #[allow(clippy::too_many_arguments)]
    fn new(
        target: usize,
        (k, n): (usize, usize),
        w: Vec<f32>,
        keep: Vec<bool>,
        map: &TileMap,
        tile: TileShape,
        options: &BlockwiseOptions,
        learn_weights: bool,
    ) -> Weight {
        let mut groups = Vec::new();
        for r in (0..k).step_by(4) {
            // Full groups only, inside one K tile (tiles are multiples of 4 rows).
            if r + 4 > k || (r % tile.k) + 4 > tile.k {
                continue;
            }
            for c in 0..n {
                if map.get(r / tile.k, c / tile.n) == TileKind::Sparse24
                    && pattern_of(&keep, r * n + c, n).is_some()
                {
                    groups.push(r * n + c);
                }
            }
        }
        let mut phi = vec![0f32; groups.len() * 6];
        for (g, &e0) in groups.iter().enumerate() {
            let p = pattern_of(&keep, e0, n).expect("learnable groups hold a 2:4 pattern");
            phi[g * 6 + p as usize] = options.prior as f32;
        }
        let rms =
            (w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w.len().max(1) as f64).sqrt();
        Weight {
            target,
            n,
            adam_w: Adam::new(if learn_weights { w.len() } else { 0 }),
            adam_phi: Adam::new(phi.len()),
            w,
            keep,
            groups,
            phi,
            lr_w: if learn_weights {
                options.weight_lr * rms
            } else {
                0.0
            },
        }
    }

    /// The soft keep weights of every element for logits + noise at `tau` (`q` per group
    /// returned for the backward step), hard outside the learnable groups.
    fn relaxed(&self, noise: Option<(u64, f64)>) -> (Vec<f32>, Vec<[f32; 6]>) {
        let mut soft: Vec<f32> = self.keep.iter().map(|&k| k as u8 as f32).collect();
        let mut qs = Vec::with_capacity(self.groups.len());
        let zero = [0f32; 6];
        for (g, &e0) in self.groups.iter().enumerate() {
            let phi = &self.phi[g * 6..g * 6 + 6];
            let q = match noise {
                Some((stream, tau)) => {
                    let mut gn = [0f32; 6];
                    for (p, v) in gn.iter_mut().enumerate() {
                        *v = gumbel(stream, (g * 6 + p) as u64);
                    }
                    softmax(phi, &gn, tau)
                }
                None => softmax(phi, &zero, 1.0),
            };
            for qq in 0..4 {
                let mut kept = 0f32;
                for (p, &bits) in PATTERNS.iter().enumerate() {
                    if (bits >> qq) & 1 == 1 {
                        kept += q[p];
                    }
                }
                soft[e0 + qq * self.n] = kept;
            }
            qs.push(q);
        }
        (soft, qs)
    }

    /// The hard mask of the current logits.
    fn hard_keep(&self) -> Vec<bool> {
        let mut keep = self.keep.clone();
        let choice = argmax(&self.phi);
        for (&e0, &p) in self.groups.iter().zip(&choice) {
            for q in 0..4 {
                keep[e0 + q * self.n] = (PATTERNS[p as usize] >> q) & 1 == 1;
            }
        }
        keep
    }

    /// Applies one Adam step from `gw = ∂L/∂(W ⊙ K)`.
    fn step(&mut self, gw: &[f32], soft: &[f32], qs: &[[f32; 6]], tau: f64, t: usize, lr_phi: f64) {
        let n = self.n;
        let mut gphi = vec![0f32; self.phi.len()];
        for (g, &e0) in self.groups.iter().enumerate() {
            let q = &qs[g];
            let mut dk = [0f64; 4];
            for (qq, d) in dk.iter_mut().enumerate() {
                let e = e0 + qq * n;
                *d = gw[e] as f64 * self.w[e] as f64;
            }
            let mut dq = [0f64; 6];
            for (p, &bits) in PATTERNS.iter().enumerate() {
                dq[p] = (0..4).filter(|e| (bits >> e) & 1 == 1).map(|e| dk[e]).sum();
            }
            let mean: f64 = (0..6).map(|p| q[p] as f64 * dq[p]).sum();
            for p in 0..6 {
                gphi[g * 6 + p] = (q[p] as f64 * (dq[p] - mean) / tau) as f32;
            }
        }
        self.adam_phi.step(&mut self.phi, &gphi, lr_phi, t);
        if self.lr_w > 0.0 {
            let gmaster: Vec<f32> = gw.iter().zip(soft).map(|(&g, &s)| g * s).collect();
            self.adam_w.step(&mut self.w, &gmaster, self.lr_w, t);
        }
    }
}

/// One matrix's relaxed step: soft keep weights, the pattern probabilities per learnable
/// group, and the effective weight `W ⊙ K`.
type Relaxed = (Vec<f32>, Vec<[f32; 6]>, Vec<f32>);

/// `f(i, item)` for every item, on as many scoped threads as the machine has (items taken
/// from a shared counter, so large and small matrices balance); results in item order.
fn par_map<T: Sync, R: Send>(items: &[T], f: &(dyn Fn(usize, &T) -> R + Sync)) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if threads <= 1 {
        return items.iter().enumerate().map(|(i, t)| f(i, t)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(i, item);
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item ran")
        })
        .collect()
}

/// The dense model's output of every block for every calibration window, kept in bf16 (the
/// rounding, a relative 2⁻⁹ per element, is far below any block's pruning error), so that
/// the learner need not run the dense stream again. `[block][window]`, flattened
/// `[1, seq, hidden]`.
#[derive(Clone, Debug, Default)]
pub struct DenseOutputs {
    pub shape: Vec<usize>,
    pub blocks: Vec<Vec<Vec<half::bf16>>>,
}

impl DenseOutputs {
    /// Bytes needed to keep `blocks × windows` outputs of `elements` each.
    pub fn bytes(blocks: usize, windows: usize, elements: usize) -> usize {
        blocks * windows * elements * std::mem::size_of::<half::bf16>()
    }

    /// Appends `t` as the output of `block` for the next window.
    pub fn push(&mut self, block: usize, t: &Tensor) -> Result<(), String> {
        if self.shape.is_empty() {
            self.shape = t.shape().to_vec();
        } else if self.shape != t.shape() {
            return Err(format!(
                "block outputs of shapes {:?} and {:?}",
                self.shape,
                t.shape()
            ));
        }
        if self.blocks.len() <= block {
            self.blocks.resize(block + 1, Vec::new());
        }
        let x = t.as_slice::<f32>().map_err(|e| e.to_string())?;
        self.blocks[block].push(x.iter().map(|&v| half::bf16::from_f32(v)).collect());
        Ok(())
    }

    fn tensor(&self, block: usize, window: usize) -> Result<Tensor, String> {
        let x = self
            .blocks
            .get(block)
            .and_then(|b| b.get(window))
            .ok_or_else(|| format!("no dense output of block index {block}, window {window}"))?;
        Tensor::from_vec(self.shape.clone(), x.iter().map(|v| v.to_f32()).collect())
            .map_err(|e| e.to_string())
    }
}

/// Everything the learner needs from the caller for one model.
pub struct BlockwiseInput<'a> {
    pub graph: &'a Graph,
    pub registry: &'a OpRegistry,
    pub blocks: &'a [Block],
    pub targets: &'a [WeightMatMul],
    /// Oriented `[K, N]` weights of every target.
    pub weights: &'a [Vec<f32>],
    /// Tile map of every target (the global allocation).
    pub maps: &'a [TileMap],
    pub tile: TileShape,
    /// The first block's input for every calibration window (`[1, seq, hidden]`).
    pub windows: Vec<Tensor>,
    /// Captured side values.
    pub side: &'a HashMap<ValueId, Tensor>,
    /// The dense stream's block outputs when the caller captured them (every block, every
    /// window); `None` runs the dense stream here.
    pub dense_outputs: Option<DenseOutputs>,
    pub update_weights: bool,
}

fn relative_mse(y: &Tensor, t: &Tensor) -> Result<(f64, f64), String> {
    let (y, t) = (
        y.as_slice::<f32>().map_err(|e| e.to_string())?,
        t.as_slice::<f32>().map_err(|e| e.to_string())?,
    );
    let err: f64 = y
        .iter()
        .zip(t)
        .map(|(&a, &b)| ((a - b) as f64).powi(2))
        .sum();
    let energy: f64 = t.iter().map(|&b| (b as f64).powi(2)).sum();
    Ok((err, energy))
}

/// Runs the sequential block-wise calibration (see the module docs). `progress(block, total,
/// message)` is called as blocks start and finish.
pub fn learn(
    input: BlockwiseInput<'_>,
    options: &BlockwiseOptions,
    progress: &dyn Fn(usize, usize, &str),
) -> Result<(Vec<LearnedWeight>, Vec<BlockOutcome>), BlockwiseError> {
    let BlockwiseInput {
        graph,
        registry,
        blocks,
        targets,
        weights,
        maps,
        tile,
        windows,
        side,
        dense_outputs,
        update_weights,
    } = input;
    if let Some(d) = &dense_outputs {
        let complete = d.blocks.len() == blocks.len()
            && d.blocks.iter().all(|b| b.len() == windows.len())
            && windows
                .first()
                .is_none_or(|w| w.shape() == d.shape.as_slice());
        if !complete {
            return Err(BlockwiseError::Block {
                block: blocks.first().map_or(0, |b| b.number),
                msg: format!(
                    "the captured dense outputs cover {} blocks, not {} × {} windows",
                    d.blocks.len(),
                    blocks.len(),
                    windows.len()
                ),
            });
        }
    }
    let mut dense = windows.clone();
    let mut pruned = windows;
    let total_windows = dense.len();
    let eval = options.eval_windows.min(total_windows / 2).max(1);
    let train_windows = total_windows - eval;
    let mut result: Vec<Option<LearnedWeight>> = vec![None; targets.len()];
    let mut outcomes = Vec::with_capacity(blocks.len());
    let started = std::time::Instant::now();
    for (bi, block) in blocks.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let bad = |msg: String| BlockwiseError::Block {
            block: block.number,
            msg,
        };
        let mut phases = [0f64; 4];
        let mut mark = std::time::Instant::now();
        progress(bi, blocks.len(), "statistics");
        let shape = dense[0].shape().to_vec();
        let spec = |with_loss| BlockGraphSpec {
            shape: &shape,
            side,
            trainable: &block.targets,
            with_loss,
        };
        let fwd = block_graph(graph, registry, block, targets, &spec(false))
            .map_err(|e| bad(e.to_string()))?;
        let fwd = Plan::new(&fwd).map_err(|e| bad(e.to_string()))?;
        let dense_inputs = |x: &Tensor, w: &[Vec<f32>]| -> Result<Vec<Tensor>, String> {
            let mut v = vec![x.clone()];
            for (&t, w) in block.targets.iter().zip(w) {
                v.push(
                    Tensor::from_vec(vec![targets[t].k, targets[t].n], w.clone())
                        .map_err(|e| e.to_string())?,
                );
            }
            Ok(v)
        };
        let original: Vec<Vec<f32>> = block.targets.iter().map(|&t| weights[t].clone()).collect();
        // Targets from the dense stream; Gram matrices on the pruned stream.
        let by_node: HashMap<&str, usize> = block
            .targets
            .iter()
            .enumerate()
            .map(|(i, &t)| (targets[t].node.as_str(), i))
            .collect();
        let mut grams: HashMap<String, Gram> = HashMap::new();
        let mut gram_of: Vec<String> = vec![String::new(); block.targets.len()];
        // Block 0 sees the same input on both streams: one run gives the targets and Grams.
        let same_input = bi == 0;
        for w in 0..total_windows {
            match &dense_outputs {
                Some(d) => dense[w] = d.tensor(bi, w).map_err(bad)?,
                None if !same_input => {
                    let out = fwd
                        .run(&dense_inputs(&dense[w], &original).map_err(bad)?)
                        .map_err(|e| bad(e.to_string()))?;
                    dense[w] = out[0].clone();
                }
                None => {}
            }
            let mut seen = std::collections::HashSet::new();
            let mut observe = |node: &patch_runtime::ir::Node, inputs: &[Option<&Tensor>]| {
                let Some(&i) = by_node.get(node.name.as_str()) else {
                    return;
                };
                let Some(Some(x)) = inputs.first() else {
                    return;
                };
                let key = node.inputs[0].map(|v| v.0).unwrap_or(0).to_string();
                gram_of[i] = key.clone();
                if !seen.insert(key.clone()) {
                    return;
                }
                if let Ok(xs) = x.as_slice::<f32>() {
                    let k = targets[block.targets[i]].k;
                    grams
                        .entry(key)
                        .or_insert_with(|| Gram::new(k))
                        .add_rows(xs);
                }
            };
            let out = fwd
                .run_observed(
                    &dense_inputs(&pruned[w], &original).map_err(bad)?,
                    &mut observe,
                )
                .map_err(|e| bad(e.to_string()))?;
            if same_input && dense_outputs.is_none() {
                dense[w] = out[0].clone();
            }
        }
        let targets_t = &dense;
        // Prior: OBS inside the global tile map, on the sequential statistics.
        phases[0] += mark.elapsed().as_secs_f64();
        mark = std::time::Instant::now();
        progress(bi, blocks.len(), "prior");
        let mut state = Vec::with_capacity(block.targets.len());
        for (i, &t) in block.targets.iter().enumerate() {
            let tg = &targets[t];
            let gram = grams
                .get(&gram_of[i])
                .ok_or_else(|| bad(format!("no statistics for `{}`", tg.node)))?;
            if gram.h.iter().any(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "the statistics of `{}` are not finite (a NaN or Inf activation entered the block)",
                    tg.weight
                )));
            }
            let (w1, keep) = sparsegpt::prune(&weights[t], tg.k, tg.n, gram, &maps[t], tile, None)
                .map_err(|m| bad(format!("`{}`: {m}", tg.weight)))?;
            // Master weights: the OBS update on kept elements, the original elsewhere (an
            // element the learner brings back starts from its dense value).
            let master: Vec<f32> = if update_weights {
                w1.iter()
                    .zip(&weights[t])
                    .zip(&keep)
                    .map(|((&u, &o), &k)| if k { u } else { o })
                    .collect()
            } else {
                weights[t].clone()
            };
            state.push(Weight::new(
                t,
                (tg.k, tg.n),
                master,
                keep,
                &maps[t],
                tile,
                options,
                update_weights,
            ));
        }
        let effective = |state: &[Weight], keeps: &[Vec<bool>]| -> Vec<Vec<f32>> {
            state
                .iter()
                .zip(keeps)
                .map(|(s, k)| masked_weights(&s.w, k))
                .collect()
        };
        let score = |eff: &[Vec<f32>]| -> Result<f64, String> {
            let (mut err, mut energy) = (0.0, 0.0);
            for w in train_windows..total_windows {
                let out = fwd
                    .run(&dense_inputs(&pruned[w], eff)?)
                    .map_err(|e| e.to_string())?;
                let (e, n) = relative_mse(&out[0], &targets_t[w])?;
                err += e;
                energy += n;
            }
            Ok(err / energy.max(1e-300))
        };
        let prior_keeps: Vec<Vec<bool>> = state.iter().map(|s| s.keep.clone()).collect();
        let prior_eff = effective(&state, &prior_keeps);
        let prior_error = score(&prior_eff).map_err(bad)?;
        if !prior_error.is_finite() {
            return Err(BlockwiseError::NotFinite {
                block: block.number,
                step: 0,
                loss: prior_error,
            });
        }
        let mut best = (prior_eff, prior_keeps, prior_error, false);
        let mut curve = Vec::new();
        phases[1] += mark.elapsed().as_secs_f64();
        mark = std::time::Instant::now();
        if options.steps > 0 && train_windows > 0 {
            progress(bi, blocks.len(), "learn");
            let train = block_graph(graph, registry, block, targets, &spec(true))
                .map_err(|e| bad(e.to_string()))?;
            let train = Plan::new(&train).map_err(|e| bad(e.to_string()))?;
            for step in 0..options.steps {
                let f = step as f64 / (options.steps - 1).max(1) as f64;
                let tau = options.tau.0 * (options.tau.1 / options.tau.0).powf(f);
                let w = step % train_windows;
                let stream = options.seed
                    ^ (block.number + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ (step as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03);
                // Relaxed masks and effective weights, one matrix per worker.
                let relaxed: Vec<Relaxed> = par_map(&state, &|i, s: &Weight| {
                    let (soft, qs) = s.relaxed(Some((stream ^ i as u64, tau)));
                    let eff = s.w.iter().zip(&soft).map(|(&a, &b)| a * b).collect();
                    (soft, qs, eff)
                });
                let eff: Vec<Vec<f32>> = relaxed.iter().map(|r| r.2.clone()).collect();
                let mut inputs = dense_inputs(&pruned[w], &eff).map_err(bad)?;
                inputs.push(targets_t[w].clone());
                let out = train.run(&inputs).map_err(|e| bad(e.to_string()))?;
                let loss = out[1]
                    .to_f64_vec()
                    .ok()
                    .and_then(|v| v.first().copied())
                    .unwrap_or(f64::NAN);
                let energy = targets_t[w]
                    .as_slice::<f32>()
                    .map_err(|e| bad(e.to_string()))?
                    .iter()
                    .map(|&v| (v as f64).powi(2))
                    .sum::<f64>()
                    / targets_t[w].len().max(1) as f64;
                if !loss.is_finite() {
                    return Err(BlockwiseError::NotFinite {
                        block: block.number,
                        step,
                        loss,
                    });
                }
                curve.push(loss / energy.max(1e-300));
                let grads: Vec<&[f32]> = (0..state.len())
                    .map(|i| out[2 + i].as_slice::<f32>().map_err(|e| bad(e.to_string())))
                    .collect::<Result<_, _>>()?;
                let slots: Vec<std::sync::Mutex<&mut Weight>> =
                    state.iter_mut().map(std::sync::Mutex::new).collect();
                par_map(&slots, &|i, slot: &std::sync::Mutex<&mut Weight>| {
                    let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
                    let (soft, qs, _) = &relaxed[i];
                    s.step(grads[i], soft, qs, tau, step + 1, options.pattern_lr);
                });
                if (step + 1) % options.check_every.max(1) == 0 || step + 1 == options.steps {
                    let keeps: Vec<Vec<bool>> = state.iter().map(Weight::hard_keep).collect();
                    let eff = effective(&state, &keeps);
                    let err = score(&eff).map_err(bad)?;
                    if !err.is_finite() {
                        return Err(BlockwiseError::NotFinite {
                            block: block.number,
                            step,
                            loss: err,
                        });
                    }
                    if err < best.2 {
                        best = (eff, keeps, err, true);
                    }
                }
            }
        }
        let (eff, keeps, error, learned) = best;
        // Advance the pruned stream through the block as it will be packed.
        phases[2] += mark.elapsed().as_secs_f64();
        mark = std::time::Instant::now();
        progress(bi, blocks.len(), "advance");
        for x in pruned.iter_mut() {
            let out = fwd
                .run(&dense_inputs(x, &eff).map_err(bad)?)
                .map_err(|e| bad(e.to_string()))?;
            *x = out[0].clone();
        }
        phases[3] += mark.elapsed().as_secs_f64();
        for ((s, keep), w) in state.iter().zip(keeps).zip(eff) {
            result[s.target] = Some(LearnedWeight { keep, weights: w });
        }
        outcomes.push(BlockOutcome {
            number: block.number,
            prior_error,
            error,
            learned,
            curve,
            seconds: t0.elapsed().as_secs_f64(),
            phases,
        });
        let o = outcomes.last().expect("just pushed");
        let elapsed = started.elapsed().as_secs_f64();
        let eta = elapsed / (bi + 1) as f64 * (blocks.len() - bi - 1) as f64;
        progress(
            bi + 1,
            blocks.len(),
            &format!(
                "block {}: error {:.4} -> {:.4}, ETA {:.0} s",
                o.number, o.prior_error, o.error, eta
            ),
        );
    }
    let result = result
        .into_iter()
        .enumerate()
        .map(|(t, r)| {
            r.ok_or_else(|| BlockwiseError::Block {
                block: 0,
                msg: format!("`{}` belongs to no block", targets[t].weight),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((result, outcomes))
}
