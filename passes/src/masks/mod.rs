//! Hybrid masks at a target global sparsity: which tiles of every weight stay dense, which
//! become 2:4, and which elements the 2:4 tiles keep.
//!
//! Sparsity `s` is pruned weights over prunable weights; a 2:4 tile prunes half of its
//! weights, so `s = 0.5` makes every tile 2:4. Methods:
//!
//! * `magnitude`, `wanda`: element scores `|W|` and `|W|·‖X_k‖`; inside a 2:4 tile every group
//!   of four K-elements of a column keeps its two best; each layer makes 2:4 the tiles whose
//!   pruned elements cost least (sum of squared scores), to its share `s` of its weights.
//! * `sparsegpt`: the same per-layer tile choice as `wanda`, then the OBS sweep of SparseGPT
//!   over K with the inverse Hessian: 2:4 choices by `w² / [H⁻¹]_kk` group by group, and the
//!   kept weights (dense tiles included) updated to absorb the pruning error.
//! * `patch` (default): tile choices learned across all layers at once (see [`patch`]), the
//!   2:4 pattern inside tiles frozen from `wanda` (PATCH-Tile), or learned too when
//!   `patch.joint.steps > 0` (PATCH-Joint, see [`joint`]).
//!
//! Every method finishes with a global budget repair, so the achieved sparsity is the target
//! within 0.5% (relative). `update_weights` adds the SparseGPT weight update on the final mask;
//! for PATCH-Tile the frozen one-shot pattern is then SparseGPT's own (its OBS selection inside
//! the learned tile map), for the other methods the mask stays as chosen.

pub mod blockwise;
pub mod joint;
pub mod linalg;
pub mod patch;
pub mod sparsegpt;

use std::fmt;
use std::str::FromStr;

use patch_kernels::{TileKind, TileMap, TileShape};

use crate::calibration::Gram;

/// A mask method (`--method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Magnitude,
    Wanda,
    SparseGpt,
    Patch,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Magnitude => "magnitude",
            Method::Wanda => "wanda",
            Method::SparseGpt => "sparsegpt",
            Method::Patch => "patch",
        }
    }
    /// Whether the method needs calibration statistics.
    pub fn needs_calibration(self) -> bool {
        self != Method::Magnitude
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "magnitude" => Method::Magnitude,
            "wanda" => Method::Wanda,
            "sparsegpt" => Method::SparseGpt,
            "patch" => Method::Patch,
            _ => {
                return Err(format!(
                    "unknown method `{s}` (expected magnitude, wanda, sparsegpt or patch)"
                ))
            }
        })
    }
}

/// One prunable weight, oriented `[K, N]` (`y = x · W`).
#[derive(Clone, Debug)]
pub struct MaskTarget<'a> {
    pub name: String,
    pub k: usize,
    pub n: usize,
    pub w: Vec<f32>,
    /// Statistics of the activation entering it (required by every method but magnitude).
    pub gram: Option<&'a Gram>,
    /// Per output channel: the LM loss's sensitivity to the product's output
    /// ([`crate::sensitivity`]); required by [`Allocation::Loss`] and
    /// [`Allocation::UniformBlocks`].
    pub fisher: Option<&'a [f64]>,
    /// The transformer block the weight belongs to (for [`Allocation::UniformBlocks`]).
    pub block: Option<u64>,
}

/// How `patch` shares the global budget between matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Tiles of every matrix compete by their estimated effect on the LM loss: each matrix's
    /// reconstruction error weighted per output channel by the loss's sensitivity.
    Loss,
    /// By each matrix's output error relative to its own output energy (no gradients).
    Relative,
    /// As `Loss` inside each block, every block held to the global sparsity.
    UniformBlocks,
}

impl Allocation {
    pub fn name(self) -> &'static str {
        match self {
            Allocation::Loss => "loss",
            Allocation::Relative => "relative",
            Allocation::UniformBlocks => "uniform-blocks",
        }
    }

    /// Whether the allocation needs the targets' `fisher`.
    pub fn needs_sensitivity(self) -> bool {
        self != Allocation::Relative
    }
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Allocation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "loss" => Allocation::Loss,
            "relative" => Allocation::Relative,
            "uniform-blocks" => Allocation::UniformBlocks,
            _ => {
                return Err(format!(
                    "unknown allocation `{s}` (expected loss, relative or uniform-blocks)"
                ))
            }
        })
    }
}

/// The mask chosen for one weight.
#[derive(Clone, Debug)]
pub struct LayerMask {
    pub map: TileMap,
    /// Row-major `[K, N]`: true keeps the element.
    pub keep: Vec<bool>,
    /// Updated weights (SparseGPT), row-major `[K, N]`, already zero where pruned.
    pub weights: Option<Vec<f32>>,
    /// Pruned weights.
    pub pruned: usize,
    /// `tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)`: the layer output's relative squared error on the
    /// calibration data (None without statistics).
    pub error: Option<f64>,
    /// PATCH-Joint only: the layer's error (before any weight update) with the one-shot
    /// pattern and with the learned one.
    pub joint: Option<(f64, f64)>,
}

/// Options of [`compute_masks`].
#[derive(Clone, Debug)]
pub struct MaskOptions {
    pub method: Method,
    pub sparsity: f64,
    pub tile: TileShape,
    pub seed: u64,
    /// Apply the SparseGPT weight update once the mask is fixed (implied by `sparsegpt`).
    pub update_weights: bool,
    pub patch: patch::PatchOptions,
    /// How `patch` shares the budget between matrices (the other methods: per matrix).
    pub allocation: Allocation,
}

#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("method `{method}` needs calibration statistics for `{weight}`")]
    NoStatistics { method: Method, weight: String },
    #[error("`{weight}`: {msg}")]
    Numeric { weight: String, msg: String },
    #[error("the `{allocation}` allocation needs the loss sensitivity of `{weight}`{}", if *.allocation == Allocation::UniformBlocks { " and its block" } else { "" })]
    NoSensitivity {
        allocation: Allocation,
        weight: String,
    },
}

/// Element scores of a method that has them (magnitude, wanda).
pub fn scores(method: Method, t: &MaskTarget<'_>) -> Result<Vec<f64>, MaskError> {
    match method {
        Method::Magnitude => Ok(t.w.iter().map(|v| v.abs() as f64).collect()),
        _ => {
            let g = t.gram.ok_or_else(|| MaskError::NoStatistics {
                method,
                weight: t.name.clone(),
            })?;
            let norms = g.column_norms();
            Ok(t.w
                .iter()
                .enumerate()
                .map(|(i, v)| v.abs() as f64 * norms[i / t.n])
                .collect())
        }
    }
}

/// The 2:4 pattern of the whole matrix from element scores: in every column, each group of
/// four consecutive K-elements keeps its two best (ties: the lower index). A last partial
/// group of `r < 4` rows keeps `min(r, 2)`.
pub fn pattern_24(scores: &[f64], k: usize, n: usize) -> Vec<bool> {
    let mut keep = vec![false; k * n];
    for g0 in (0..k).step_by(4) {
        let rows = (k - g0).min(4);
        for c in 0..n {
            let mut idx: Vec<usize> = (0..rows).collect();
            idx.sort_by(|&a, &b| {
                scores[(g0 + b) * n + c]
                    .total_cmp(&scores[(g0 + a) * n + c])
                    .then(a.cmp(&b))
            });
            for &r in idx.iter().take(2) {
                keep[(g0 + r) * n + c] = true;
            }
        }
    }
    keep
}

/// Per tile (row-major over the grid): elements a 2:4 tile prunes, and the summed squared
/// score of those elements.
pub fn tile_costs(
    scores: &[f64],
    pattern: &[bool],
    k: usize,
    n: usize,
    tile: TileShape,
) -> Vec<(usize, f64)> {
    let (kt, nt) = tile.grid(k, n);
    let mut out = vec![(0usize, 0f64); kt * nt];
    for kk in 0..k {
        for c in 0..n {
            if !pattern[kk * n + c] {
                let e = &mut out[(kk / tile.k) * nt + c / tile.n];
                e.0 += 1;
                e.1 += scores[kk * n + c].powi(2);
            }
        }
    }
    out
}

/// The keep-mask of `map`: dense tiles keep everything, 2:4 tiles follow `pattern`.
pub fn keep_for(map: &TileMap, pattern: &[bool], k: usize, n: usize, tile: TileShape) -> Vec<bool> {
    let mut keep = vec![true; k * n];
    for kk in 0..k {
        for c in 0..n {
            if map.get(kk / tile.k, c / tile.n) == TileKind::Sparse24 {
                keep[kk * n + c] = pattern[kk * n + c];
            }
        }
    }
    keep
}

/// A layer's uniform share: the cheapest tiles (cost per pruned element) become 2:4 until the
/// layer prunes as close as possible to `sparsity × k × n`.
pub fn uniform_map(
    costs: &[(usize, f64)],
    kt: usize,
    nt: usize,
    k: usize,
    n: usize,
    sparsity: f64,
) -> TileMap {
    let want = sparsity * (k * n) as f64;
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| {
        let ca = costs[a].1 / costs[a].0.max(1) as f64;
        let cb = costs[b].1 / costs[b].0.max(1) as f64;
        ca.total_cmp(&cb).then(a.cmp(&b))
    });
    let mut map = TileMap::uniform(kt, nt, TileKind::Dense);
    let mut pruned = 0usize;
    for t in order {
        let next = pruned + costs[t].0;
        // Take the tile when that lands closer to the share than stopping here.
        if (next as f64 - want).abs() <= (pruned as f64 - want).abs() {
            map.set(t / nt, t % nt, TileKind::Sparse24);
            pruned = next;
        } else {
            break;
        }
    }
    map
}

/// Pruned elements of `map` under `pattern`.
pub fn pruned_count(costs: &[(usize, f64)], map: &TileMap) -> usize {
    map.kinds()
        .iter()
        .zip(costs)
        .filter(|(k, _)| **k == TileKind::Sparse24)
        .map(|(_, c)| c.0)
        .sum()
}

/// Moves tiles between dense and 2:4 across all layers until the global pruned count is
/// within 0.5% of `target`. `priority(layer, tile)`: higher means more deserving of staying
/// dense; tiles are flipped lowest-priority first (to 2:4) or highest first (to dense).
pub fn repair_budget(
    maps: &mut [TileMap],
    costs: &[Vec<(usize, f64)>],
    target: f64,
    priority: &dyn Fn(usize, usize) -> f64,
) {
    let total = |maps: &[TileMap]| -> usize {
        maps.iter()
            .zip(costs)
            .map(|(m, c)| pruned_count(c, m))
            .sum()
    };
    let tol = 0.005 * target;
    let mut pruned = total(maps) as f64;
    if (pruned - target).abs() <= tol {
        return;
    }
    let to_sparse = pruned < target;
    let mut cands: Vec<(f64, usize, usize)> = Vec::new();
    for (l, m) in maps.iter().enumerate() {
        for (t, kind) in m.kinds().iter().enumerate() {
            let wanted = if to_sparse {
                TileKind::Dense
            } else {
                TileKind::Sparse24
            };
            if *kind == wanted && costs[l][t].0 > 0 {
                cands.push((priority(l, t), l, t));
            }
        }
    }
    if to_sparse {
        cands.sort_by(|a, b| a.0.total_cmp(&b.0));
    } else {
        cands.sort_by(|a, b| b.0.total_cmp(&a.0));
    }
    for (_, l, t) in cands {
        if (pruned - target).abs() <= tol {
            break;
        }
        let c = costs[l][t].0 as f64;
        let next = if to_sparse { pruned + c } else { pruned - c };
        // Do not overshoot further than we are now.
        if (next - target).abs() > (pruned - target).abs() {
            continue;
        }
        let nt = maps[l].n_tiles();
        let kind = if to_sparse {
            TileKind::Sparse24
        } else {
            TileKind::Dense
        };
        maps[l].set(t / nt, t % nt, kind);
        pruned = next;
    }
}

/// `w` with the elements `keep` drops set to zero.
pub fn masked_weights(w: &[f32], keep: &[bool]) -> Vec<f32> {
    w.iter()
        .zip(keep)
        .map(|(&v, &k)| if k { v } else { 0.0 })
        .collect()
}

/// Test data: the Gram matrix of `rows` random rows of width `k` whose features are coupled to
/// their neighbour (`x_j + coupling · x_{j+1}`), so that masks interact through `H`.
#[cfg(test)]
pub(crate) fn correlated_gram(
    rng: &mut impl rand::Rng,
    k: usize,
    rows: usize,
    coupling: f32,
) -> Gram {
    let x: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let x: Vec<f32> = x
        .chunks(k)
        .flat_map(|r| (0..k).map(move |j| r[j] + coupling * r[(j + 1) % k]))
        .collect();
    let mut g = Gram::new(k);
    g.add_rows(&x);
    g
}

/// `H · D` for a row-major `[K, N]` `d`, in f32 (matrixmultiply).
pub fn h_times(gram: &Gram, d: &[f32], n: usize) -> ndarray::Array2<f32> {
    let k = gram.k;
    let h = ndarray::Array2::from_shape_fn((k, k), |(i, j)| gram.h[i * k + j] as f32);
    let dv = ndarray::ArrayView2::from_shape((k, n), d).expect("d is k × n");
    let mut out = ndarray::Array2::<f32>::zeros((k, n));
    ndarray::linalg::general_mat_mul(1.0, &h, &dv, 0.0, &mut out);
    out
}

/// `tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)` for `ΔW = W − W'` (products in f32, sums in f64).
pub fn reconstruction_error(w: &[f32], w_new: &[f32], gram: &Gram, n: usize) -> f64 {
    let quad = |d: &[f32]| -> f64 {
        let hd = h_times(gram, d, n);
        d.iter()
            .zip(hd.iter())
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    };
    let delta: Vec<f32> = w.iter().zip(w_new).map(|(&a, &b)| a - b).collect();
    let denom = quad(w);
    if denom <= 0.0 {
        return 0.0;
    }
    quad(&delta) / denom
}

/// Masks for every target at the options' global sparsity. `progress(done, total)` is called
/// per weight (per optimizer phase for `patch`).
pub fn compute_masks(
    targets: &[MaskTarget<'_>],
    options: &MaskOptions,
    progress: &dyn Fn(&str, usize, usize),
) -> Result<Vec<LayerMask>, MaskError> {
    let tile = options.tile;
    let s = options.sparsity;
    let score_method = match options.method {
        Method::Magnitude => Method::Magnitude,
        _ => Method::Wanda,
    };
    let mut patterns = Vec::with_capacity(targets.len());
    let mut costs = Vec::with_capacity(targets.len());
    let mut all_scores = Vec::with_capacity(targets.len());
    for (i, t) in targets.iter().enumerate() {
        progress("scores", i, targets.len());
        let sc = scores(score_method, t)?;
        let pat = pattern_24(&sc, t.k, t.n);
        costs.push(tile_costs(&sc, &pat, t.k, t.n, tile));
        patterns.push(pat);
        all_scores.push(sc);
    }
    let target_pruned = s * targets.iter().map(|t| t.k * t.n).sum::<usize>() as f64;
    let mut maps: Vec<TileMap> = match options.method {
        // Full 2:4: nothing to choose.
        _ if s >= 0.5 => targets
            .iter()
            .map(|t| {
                let (kt, nt) = tile.grid(t.k, t.n);
                TileMap::uniform(kt, nt, TileKind::Sparse24)
            })
            .collect(),
        Method::Patch => {
            patch::learn_tile_maps(targets, &patterns, &costs, &all_scores, options, progress)?
        }
        _ => targets
            .iter()
            .zip(&costs)
            .map(|(t, c)| {
                let (kt, nt) = tile.grid(t.k, t.n);
                uniform_map(c, kt, nt, t.k, t.n, s)
            })
            .collect(),
    };
    // Normalized cost per pruned element: cheap tiles go 2:4 first, dear ones back to dense.
    let layer_scale: Vec<f64> = all_scores
        .iter()
        .map(|sc| sc.iter().map(|v| v * v).sum::<f64>().max(1e-300))
        .collect();
    // `patch` repairs its own maps by logit order.
    if options.method != Method::Patch {
        repair_budget(&mut maps, &costs, target_pruned, &|l, t| {
            costs[l][t].1 / layer_scale[l] / costs[l][t].0.max(1) as f64
        });
    }
    let joint = options.method == Method::Patch && options.patch.joint.steps > 0;
    let mut joint_errors = vec![None; targets.len()];
    if joint {
        for (i, t) in targets.iter().enumerate() {
            progress("learn patterns", i, targets.len());
            let numeric = |msg| MaskError::Numeric {
                weight: t.name.clone(),
                msg,
            };
            let g = t.gram.ok_or_else(|| MaskError::NoStatistics {
                method: Method::Patch,
                weight: t.name.clone(),
            })?;
            let problem =
                joint::PatternProblem::new(&t.w, t.k, t.n, g, &maps[i], tile, &patterns[i])
                    .map_err(numeric)?;
            let seed = options.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let learned = problem.learn(&options.patch.joint, seed).map_err(numeric)?;
            problem.apply(&mut patterns[i], &learned.choice);
            joint_errors[i] = Some((learned.prior_loss, learned.loss));
        }
        progress("learn patterns", targets.len(), targets.len());
    }
    let update = options.update_weights || options.method == Method::SparseGpt;
    let mut out = Vec::with_capacity(targets.len());
    for (i, t) in targets.iter().enumerate() {
        progress("masks", i, targets.len());
        let map = maps[i].clone();
        let (keep, weights) = if update {
            let g = t.gram.ok_or_else(|| MaskError::NoStatistics {
                method: Method::SparseGpt,
                weight: t.name.clone(),
            })?;
            // SparseGPT and PATCH-Tile select 2:4 patterns inside the map as they sweep.
            let obs_patterns =
                options.method == Method::SparseGpt || (options.method == Method::Patch && !joint);
            let fixed = (!obs_patterns).then(|| keep_for(&map, &patterns[i], t.k, t.n, tile));
            let (w, keep) = sparsegpt::prune(&t.w, t.k, t.n, g, &map, tile, fixed.as_deref())
                .map_err(|msg| MaskError::Numeric {
                    weight: t.name.clone(),
                    msg,
                })?;
            (keep, Some(w))
        } else {
            (keep_for(&map, &patterns[i], t.k, t.n, tile), None)
        };
        let pruned = keep.iter().filter(|&&k| !k).count();
        let error = t.gram.map(|g| {
            let masked = match &weights {
                Some(w) => w.clone(),
                None => masked_weights(&t.w, &keep),
            };
            reconstruction_error(&t.w, &masked, g, t.n)
        });
        out.push(LayerMask {
            map,
            keep,
            weights,
            pruned,
            error,
            joint: joint_errors[i],
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_keeps_the_two_best_of_every_group() {
        // k = 6 (one full group, one partial of 2), n = 1.
        let sc = [0.1, 0.9, 0.5, 0.2, 0.3, 0.4];
        assert_eq!(
            pattern_24(&sc, 6, 1),
            vec![false, true, true, false, true, true]
        );
    }

    #[test]
    fn uniform_map_and_repair_hit_the_budget() {
        let tile = TileShape::new(4, 2).unwrap();
        let (k, n) = (16, 8);
        let sc: Vec<f64> = (0..k * n).map(|i| ((i * 37) % 11) as f64).collect();
        let pat = pattern_24(&sc, k, n);
        let costs = tile_costs(&sc, &pat, k, n, tile);
        assert!(costs.iter().all(|c| c.0 == 4));
        let (kt, nt) = tile.grid(k, n);
        let map = uniform_map(&costs, kt, nt, k, n, 0.25);
        assert_eq!(pruned_count(&costs, &map), 32);
        let mut maps = vec![map.clone(), map];
        let costs2 = vec![costs.clone(), costs];
        repair_budget(&mut maps, &costs2, 0.375 * 256.0, &|_, t| t as f64);
        let got: usize = maps
            .iter()
            .zip(&costs2)
            .map(|(m, c)| pruned_count(c, m))
            .sum();
        assert_eq!(got, 96);
    }
}
