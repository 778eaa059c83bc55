//! PATCH tile selection (arXiv 2509.23410), PATCH-Tile variant: the 2:4 pattern inside tiles
//! is frozen from a one-shot method (wanda); what is learned is, for every tile of every
//! layer at once, whether it stays dense.
//!
//! Each tile `t` has one logit `θ_t` against a fixed 0. A relaxed mask is drawn with
//! Gumbel-softmax: `m_t = σ((κ θ_t + g_t) / τ)`, `g_t` logistic noise (the difference of two
//! Gumbels), with the scale κ and temperature τ annealed geometrically over the steps. A tile
//! keeps `m_t` of its 2:4-pruned part `P_t = (1 − M_2:4) ⊙ W_t`, so the layer's weight error is
//! `ΔW = Σ_t (1 − m_t) P_t` and its output error on the calibration data is exact from `H`:
//!
//! `L_l = rᵀ A_l r / E_l`,  `r = 1 − m`,  `A_l[t, t'] = tr(P_tᵀ H P_t')`,  `E_l = tr(Wᵀ H W)`.
//!
//! That is [`Allocation::Relative`]: every layer's error relative to its own output. With
//! [`Allocation::Loss`] (the default) the error is the second-order estimate of the LM loss
//! change instead ([`crate::sensitivity`]): output column `c` is weighted by the loss's
//! sensitivity `F_c` to it, `A_l[t, t'] = Σ_c F_c P_t[:, c]ᵀ H P_t'[:, c]`, and `E_l` is one
//! scale shared by all layers, so a tile of an early attention projection and one of a late
//! MLP are compared by what they cost the model's output. [`Allocation::UniformBlocks`] is the
//! same objective with the budget repaired block by block (an ablation).
//!
//! `A_l` is block diagonal over tile columns (tiles in different output columns never
//! interact), so it is computed once (`K·K·N` per layer) and every optimizer step costs only
//! the tiles squared per column. The objective adds a **global** density regularizer
//! `λ |s(r) − s*|`, `s(r) = Σ_t c_t r_t / C` (c_t: weights a 2:4 tile prunes, C: all prunable
//! weights), so layers compete for the dense budget. Gradients are by hand:
//! `∂L/∂θ_t = −(2 (A r)_t / E_l + λ sign(s − s*) c_t / C) · m_t (1 − m_t) κ / τ`,
//! checked against finite differences in the tests; Adam takes the steps.
//!
//! Start: the `round(N(1 − 2 s*))` tiles that are densest under one-shot unstructured (wanda)
//! pruning at `s*` start at `+3σ`, the others at `−3σ`. End: a tile is dense iff `θ_t > 0`,
//! then the budget is repaired (lowest θ to 2:4 first, or highest back to dense) to within
//! 0.5% of the target.

use patch_kernels::{TileKind, TileMap, TileShape};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{h_times, repair_budget, Allocation, MaskError, MaskOptions, MaskTarget, Method};

/// Optimizer settings (defaults documented in docs/CALIBRATION.md; not tuned by a search).
#[derive(Clone, Debug)]
pub struct PatchOptions {
    pub steps: usize,
    /// Adam step on θ.
    pub lr: f64,
    /// κ from, to.
    pub kappa: (f64, f64),
    /// τ from, to.
    pub tau: (f64, f64),
    /// Weight of the global density regularizer.
    pub lambda: f64,
    /// Scale of the initial logits (±3σ).
    pub sigma: f64,
    /// PATCH-Joint's pattern learner (`steps: 0` is PATCH-Tile).
    pub joint: super::joint::JointOptions,
}

impl Default for PatchOptions {
    fn default() -> Self {
        PatchOptions {
            steps: 2000,
            lr: 0.002,
            kappa: (100.0, 500.0),
            tau: (2.0, 0.05),
            lambda: 20.0,
            sigma: 0.01,
            joint: super::joint::JointOptions::default(),
        }
    }
}

/// The quadratic error model of one layer.
#[derive(Clone, Debug)]
pub struct LayerQuad {
    pub kt: usize,
    pub nt: usize,
    /// Per tile column `j`: `A[(i, j), (i', j)]` as a row-major `kt × kt` matrix.
    pub blocks: Vec<Vec<f64>>,
    /// The divisor of `rᵀ A r`: `tr(Wᵀ H W)` for a relative error, one global scale for all
    /// layers when `A` is weighted by the loss sensitivity.
    pub energy: f64,
    /// The layer's relative error `1ᵀ A₀ 1 / tr(Wᵀ H W)` with every tile 2:4, `A₀` unweighted.
    pub full_relative: f64,
}

impl LayerQuad {
    /// Builds the model of `t` with 2:4 keep-pattern `pattern`. With `sensitivity` (one value
    /// per output channel), column `c`'s error counts `sensitivity[c]` times: `A` is then in
    /// units of the loss and `energy` is left at 1 for the caller to set.
    pub fn new(
        t: &MaskTarget<'_>,
        pattern: &[bool],
        tile: TileShape,
        sensitivity: Option<&[f64]>,
    ) -> Result<LayerQuad, MaskError> {
        let gram = t.gram.ok_or_else(|| MaskError::NoStatistics {
            method: Method::Patch,
            weight: t.name.clone(),
        })?;
        let (k, n) = (t.k, t.n);
        let (kt, nt) = tile.grid(k, n);
        let p: Vec<f32> =
            t.w.iter()
                .zip(pattern)
                .map(|(&v, &kp)| if kp { 0.0 } else { v })
                .collect();
        if sensitivity.is_some_and(|f| f.len() != n) {
            return Err(MaskError::Numeric {
                weight: t.name.clone(),
                msg: format!(
                    "{} sensitivities for {n} output channels",
                    sensitivity.map_or(0, <[f64]>::len)
                ),
            });
        }
        let mut blocks = vec![vec![0f64; kt * kt]; nt];
        let mut full_unweighted = 0f64;
        for i in 0..kt {
            // G_i = H · P_i, where P_i is P restricted to the rows of tile row i.
            let (r0, r1) = (i * tile.k, ((i + 1) * tile.k).min(k));
            let mut pi = vec![0f32; k * n];
            pi[r0 * n..r1 * n].copy_from_slice(&p[r0 * n..r1 * n]);
            let g = h_times(gram, &pi, n);
            for kk in 0..k {
                let i2 = kk / tile.k;
                for c in 0..n {
                    let v = p[kk * n + c] as f64 * g[(kk, c)] as f64;
                    if v != 0.0 {
                        full_unweighted += v;
                        let v = sensitivity.map_or(v, |f| v * f[c]);
                        blocks[c / tile.n][i * kt + i2] += v;
                    }
                }
            }
        }
        let hw = h_times(gram, &t.w, n);
        let energy: f64 =
            t.w.iter()
                .zip(hw.iter())
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
        let energy = energy.max(1e-30);
        Ok(LayerQuad {
            kt,
            nt,
            blocks,
            energy: if sensitivity.is_some() { 1.0 } else { energy },
            full_relative: full_unweighted / energy,
        })
    }

    /// `1ᵀ A 1`: the (weighted) error with every tile 2:4, before the division by `energy`.
    pub fn full(&self) -> f64 {
        self.blocks.iter().map(|b| b.iter().sum::<f64>()).sum()
    }

    /// `rᵀ A r / E` and its gradient in `r` (tiles row-major over the grid).
    pub fn loss_grad(&self, r: &[f64], grad: &mut [f64]) -> f64 {
        let mut loss = 0.0;
        for (j, a) in self.blocks.iter().enumerate() {
            for i in 0..self.kt {
                let ar: f64 = (0..self.kt)
                    .map(|i2| a[i * self.kt + i2] * r[i2 * self.nt + j])
                    .sum();
                loss += r[i * self.nt + j] * ar;
                grad[i * self.nt + j] = 2.0 * ar / self.energy;
            }
        }
        loss / self.energy
    }
}

/// The whole objective: layers, pruned counts per tile, and the budget.
#[derive(Clone, Debug)]
pub struct Objective {
    pub layers: Vec<LayerQuad>,
    /// Per layer, per tile: weights a 2:4 tile prunes.
    pub counts: Vec<Vec<f64>>,
    pub total: f64,
    pub target: f64,
    pub lambda: f64,
}

impl Objective {
    /// Loss and `∂L/∂θ` for logits `theta`, noise `noise`, scale `kappa`, temperature `tau`.
    pub fn loss_grad(
        &self,
        theta: &[Vec<f64>],
        noise: &[Vec<f64>],
        kappa: f64,
        tau: f64,
    ) -> (f64, Vec<Vec<f64>>) {
        let m: Vec<Vec<f64>> = theta
            .iter()
            .zip(noise)
            .map(|(th, g)| {
                th.iter()
                    .zip(g)
                    .map(|(&t, &g)| 1.0 / (1.0 + (-(kappa * t + g) / tau).exp()))
                    .collect()
            })
            .collect();
        let r: Vec<Vec<f64>> = m
            .iter()
            .map(|ml| ml.iter().map(|v| 1.0 - v).collect())
            .collect();
        let mut loss = 0.0;
        let mut grad_r: Vec<Vec<f64>> = r.iter().map(|rl| vec![0.0; rl.len()]).collect();
        for (l, q) in self.layers.iter().enumerate() {
            loss += q.loss_grad(&r[l], &mut grad_r[l]);
        }
        let s: f64 = r
            .iter()
            .zip(&self.counts)
            .map(|(rl, cl)| rl.iter().zip(cl).map(|(a, b)| a * b).sum::<f64>())
            .sum::<f64>()
            / self.total;
        loss += self.lambda * (s - self.target).abs();
        let sign = (s - self.target).signum();
        let grad = grad_r
            .iter()
            .enumerate()
            .map(|(l, gl)| {
                gl.iter()
                    .enumerate()
                    .map(|(t, &g)| {
                        let dr = g + self.lambda * sign * self.counts[l][t] / self.total;
                        let mm = m[l][t];
                        -dr * mm * (1.0 - mm) * kappa / tau
                    })
                    .collect()
            })
            .collect();
        (loss, grad)
    }
}

/// Learns the tile maps (see the module docs).
pub fn learn_tile_maps(
    targets: &[MaskTarget<'_>],
    patterns: &[Vec<bool>],
    costs: &[Vec<(usize, f64)>],
    scores: &[Vec<f64>],
    options: &MaskOptions,
    progress: &dyn Fn(&str, usize, usize),
) -> Result<Vec<TileMap>, MaskError> {
    let tile = options.tile;
    let po = &options.patch;
    let s = options.sparsity;
    let weighted = options.allocation.needs_sensitivity();
    let mut layers = Vec::with_capacity(targets.len());
    for (i, t) in targets.iter().enumerate() {
        progress("error model", i, targets.len());
        let sensitivity = if weighted {
            let missing = || MaskError::NoSensitivity {
                allocation: options.allocation,
                weight: t.name.clone(),
            };
            if options.allocation == Allocation::UniformBlocks && t.block.is_none() {
                return Err(missing());
            }
            Some(t.fisher.ok_or_else(missing)?)
        } else {
            None
        };
        layers.push(LayerQuad::new(t, &patterns[i], tile, sensitivity)?);
    }
    if weighted {
        // One scale for every layer, chosen so that the all-2:4 objective equals the relative
        // one's: the optimizer's step and the budget weight λ keep their meaning.
        let weighted_full: f64 = layers.iter().map(LayerQuad::full).sum();
        let relative_full: f64 = layers.iter().map(|q| q.full_relative).sum();
        let scale = (weighted_full / relative_full.max(1e-300)).max(1e-300);
        for q in &mut layers {
            q.energy = scale;
        }
    }
    let counts: Vec<Vec<f64>> = costs
        .iter()
        .map(|c| c.iter().map(|x| x.0 as f64).collect())
        .collect();
    let total = targets.iter().map(|t| (t.k * t.n) as f64).sum::<f64>();
    let obj = Objective {
        layers,
        counts,
        total,
        target: s,
        lambda: po.lambda,
    };

    // Prior: tile density under per-layer unstructured pruning at s (by the same scores).
    let mut density: Vec<(f64, usize, usize)> = Vec::new();
    for (l, t) in targets.iter().enumerate() {
        let mut sorted = scores[l].clone();
        sorted.sort_by(f64::total_cmp);
        let cut = ((s * sorted.len() as f64) as usize).min(sorted.len().saturating_sub(1));
        let threshold = sorted.get(cut).copied().unwrap_or(0.0);
        let (kt, nt) = tile.grid(t.k, t.n);
        let mut kept = vec![(0usize, 0usize); kt * nt];
        for (e, &v) in scores[l].iter().enumerate() {
            let (kk, c) = (e / t.n, e % t.n);
            let slot = &mut kept[(kk / tile.k) * nt + c / tile.n];
            slot.1 += 1;
            if v >= threshold {
                slot.0 += 1;
            }
        }
        for (ti, (kp, all)) in kept.iter().enumerate() {
            density.push((*kp as f64 / (*all).max(1) as f64, l, ti));
        }
    }
    let n_tiles = density.len();
    let n_dense = ((n_tiles as f64) * (1.0 - 2.0 * s)).round().max(0.0) as usize;
    density.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut theta: Vec<Vec<f64>> = obj
        .counts
        .iter()
        .map(|c| vec![-3.0 * po.sigma; c.len()])
        .collect();
    for &(_, l, t) in density.iter().take(n_dense) {
        theta[l][t] = 3.0 * po.sigma;
    }

    // Adam.
    let mut rng = StdRng::seed_from_u64(options.seed);
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    let mut m1: Vec<Vec<f64>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
    let mut m2 = m1.clone();
    let steps = po.steps.max(1);
    for step in 0..steps {
        if step % 50 == 0 {
            progress("learn tiles", step, steps);
        }
        let f = step as f64 / (steps - 1).max(1) as f64;
        let kappa = po.kappa.0 * (po.kappa.1 / po.kappa.0).powf(f);
        let tau = po.tau.0 * (po.tau.1 / po.tau.0).powf(f);
        let noise: Vec<Vec<f64>> = theta
            .iter()
            .map(|t| {
                t.iter()
                    .map(|_| {
                        let u: f64 = rng.gen_range(1e-12..1.0 - 1e-12);
                        (u / (1.0 - u)).ln()
                    })
                    .collect()
            })
            .collect();
        let (_, grad) = obj.loss_grad(&theta, &noise, kappa, tau);
        let t = (step + 1) as i32;
        for l in 0..theta.len() {
            for i in 0..theta[l].len() {
                let g = grad[l][i];
                m1[l][i] = b1 * m1[l][i] + (1.0 - b1) * g;
                m2[l][i] = b2 * m2[l][i] + (1.0 - b2) * g * g;
                let mh = m1[l][i] / (1.0 - b1.powi(t));
                let vh = m2[l][i] / (1.0 - b2.powi(t));
                theta[l][i] -= po.lr * mh / (vh.sqrt() + eps);
            }
        }
    }
    progress("learn tiles", steps, steps);

    let mut maps: Vec<TileMap> = targets
        .iter()
        .zip(&theta)
        .map(|(t, th)| {
            let (kt, nt) = tile.grid(t.k, t.n);
            let kinds = th
                .iter()
                .map(|&v| {
                    if v > 0.0 {
                        TileKind::Dense
                    } else {
                        TileKind::Sparse24
                    }
                })
                .collect();
            TileMap::from_kinds(kt, nt, kinds).expect("one logit per tile")
        })
        .collect();
    if options.allocation == Allocation::UniformBlocks {
        // Each block to the global sparsity, by the learned logits inside it.
        let mut blocks: Vec<u64> = targets.iter().filter_map(|t| t.block).collect();
        blocks.sort_unstable();
        blocks.dedup();
        for b in blocks {
            let members: Vec<usize> = (0..targets.len())
                .filter(|&l| targets[l].block == Some(b))
                .collect();
            let mut sub: Vec<TileMap> = members.iter().map(|&l| maps[l].clone()).collect();
            let sub_costs: Vec<Vec<(usize, f64)>> =
                members.iter().map(|&l| costs[l].clone()).collect();
            let size: usize = members.iter().map(|&l| targets[l].k * targets[l].n).sum();
            repair_budget(&mut sub, &sub_costs, s * size as f64, &|i, t| {
                theta[members[i]][t]
            });
            for (m, &l) in sub.into_iter().zip(&members) {
                maps[l] = m;
            }
        }
    } else {
        repair_budget(&mut maps, costs, s * total, &|l, t| theta[l][t]);
    }
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::Gram;
    use crate::masks::pattern_24;

    fn problem() -> (Vec<Gram>, Vec<Vec<f32>>) {
        let mut rng = StdRng::seed_from_u64(11);
        let (k, n) = (16, 8);
        let mut grams = Vec::new();
        let mut ws = Vec::new();
        for _ in 0..2 {
            let x: Vec<f32> = (0..40 * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut g = Gram::new(k);
            g.add_rows(&x);
            grams.push(g);
            ws.push((0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect());
        }
        (grams, ws)
    }

    #[test]
    fn quadratic_model_is_the_exact_reconstruction_error() {
        let (grams, ws) = problem();
        let tile = TileShape::new(8, 4).unwrap();
        let t = MaskTarget {
            name: "w".into(),
            k: 16,
            n: 8,
            w: ws[0].clone(),
            gram: Some(&grams[0]),
            fisher: None,
            block: None,
        };
        let norms = grams[0].column_norms();
        let sc: Vec<f64> =
            t.w.iter()
                .enumerate()
                .map(|(i, v)| v.abs() as f64 * norms[i / 8])
                .collect();
        let pat = pattern_24(&sc, 16, 8);
        let q = LayerQuad::new(&t, &pat, tile, None).unwrap();
        // Binary r: tiles 0 and 3 sparse.
        let map = TileMap::from_kinds(
            2,
            2,
            vec![
                TileKind::Sparse24,
                TileKind::Dense,
                TileKind::Dense,
                TileKind::Sparse24,
            ],
        )
        .unwrap();
        let r = [1.0, 0.0, 0.0, 1.0];
        let mut g = [0.0; 4];
        let model = q.loss_grad(&r, &mut g);
        let keep = crate::masks::keep_for(&map, &pat, 16, 8, tile);
        let masked = crate::masks::masked_weights(&t.w, &keep);
        let exact = crate::masks::reconstruction_error(&t.w, &masked, &grams[0], 8);
        assert!(
            (model - exact).abs() <= 1e-5 * exact.max(1e-12),
            "{model} vs {exact}"
        );
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (grams, ws) = problem();
        let tile = TileShape::new(8, 4).unwrap();
        let mut layers = Vec::new();
        let mut counts = Vec::new();
        for l in 0..2 {
            let t = MaskTarget {
                name: format!("w{l}"),
                k: 16,
                n: 8,
                w: ws[l].clone(),
                gram: Some(&grams[l]),
                fisher: None,
                block: None,
            };
            let sc: Vec<f64> = t.w.iter().map(|v| v.abs() as f64).collect();
            let pat = pattern_24(&sc, 16, 8);
            counts.push(
                crate::masks::tile_costs(&sc, &pat, 16, 8, tile)
                    .iter()
                    .map(|c| c.0 as f64)
                    .collect(),
            );
            layers.push(LayerQuad::new(&t, &pat, tile, None).unwrap());
        }
        let obj = Objective {
            layers,
            counts,
            total: 256.0,
            target: 0.3,
            lambda: 2.0,
        };
        let theta: Vec<Vec<f64>> = vec![
            vec![0.004, -0.002, 0.001, -0.005],
            vec![0.002, 0.003, -0.001, 0.0005],
        ];
        let noise: Vec<Vec<f64>> = vec![vec![0.3, -0.2, 0.1, 0.05], vec![-0.4, 0.2, 0.0, 0.1]];
        let (kappa, tau) = (100.0, 1.5);
        let (_, grad) = obj.loss_grad(&theta, &noise, kappa, tau);
        let h = 1e-7;
        for l in 0..2 {
            for t in 0..4 {
                let mut up = theta.clone();
                up[l][t] += h;
                let mut dn = theta.clone();
                dn[l][t] -= h;
                let fd = (obj.loss_grad(&up, &noise, kappa, tau).0
                    - obj.loss_grad(&dn, &noise, kappa, tau).0)
                    / (2.0 * h);
                let an = grad[l][t];
                assert!(
                    (fd - an).abs() <= 1e-4 * (1.0 + an.abs()),
                    "layer {l} tile {t}: fd {fd} vs analytic {an}"
                );
            }
        }
    }

    fn layer(rng: &mut StdRng, k: usize, n: usize) -> (Gram, Vec<f32>) {
        let x: Vec<f32> = (0..4 * k * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let mut g = Gram::new(k);
        g.add_rows(&x);
        (g, (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect())
    }

    #[test]
    fn weighted_model_is_the_sensitivity_weighted_error() {
        let mut rng = StdRng::seed_from_u64(5);
        let (k, n) = (16, 8);
        let (gram, w) = layer(&mut rng, k, n);
        let fisher: Vec<f64> = (0..n).map(|c| 0.5 + c as f64).collect();
        let tile = TileShape::new(8, 4).unwrap();
        let t = MaskTarget {
            name: "w".into(),
            k,
            n,
            w: w.clone(),
            gram: Some(&gram),
            fisher: Some(&fisher),
            block: Some(0),
        };
        let sc: Vec<f64> = w.iter().map(|v| v.abs() as f64).collect();
        let pat = pattern_24(&sc, k, n);
        let q = LayerQuad::new(&t, &pat, tile, Some(&fisher)).unwrap();
        assert_eq!(q.energy, 1.0);
        let map = TileMap::from_kinds(
            2,
            2,
            vec![
                TileKind::Dense,
                TileKind::Sparse24,
                TileKind::Sparse24,
                TileKind::Sparse24,
            ],
        )
        .unwrap();
        let mut g = [0.0; 4];
        let model = q.loss_grad(&[0.0, 1.0, 1.0, 1.0], &mut g);
        let keep = crate::masks::keep_for(&map, &pat, k, n, tile);
        let delta: Vec<f32> = w
            .iter()
            .zip(&keep)
            .map(|(&v, &kp)| if kp { 0.0 } else { v })
            .collect();
        // Σ_c F_c Δ[:, c]ᵀ H Δ[:, c], by hand.
        let hd = crate::masks::h_times(&gram, &delta, n);
        let mut exact = 0.0;
        for c in 0..n {
            let col: f64 = (0..k)
                .map(|r| delta[r * n + c] as f64 * hd[(r, c)] as f64)
                .sum();
            exact += fisher[c] * col;
        }
        assert!((model - exact).abs() <= 1e-6 * exact, "{model} vs {exact}");
        let unweighted = LayerQuad::new(&t, &pat, tile, None).unwrap();
        assert!((q.full_relative - unweighted.full() / unweighted.energy).abs() < 1e-9);
    }

    fn options(allocation: Allocation, sparsity: f64) -> MaskOptions {
        MaskOptions {
            method: Method::Patch,
            sparsity,
            tile: TileShape::new(8, 4).unwrap(),
            seed: 3,
            update_weights: false,
            // Two small layers have ~100× less error than a model's sum of layers; a weaker
            // budget weight keeps the error term's share of the gradient what it is there.
            patch: PatchOptions {
                lambda: 1.0,
                ..PatchOptions::default()
            },
            allocation,
        }
    }

    fn sparsity_of(m: &crate::masks::LayerMask, size: usize) -> f64 {
        m.pruned as f64 / size as f64
    }

    #[test]
    fn the_loss_allocation_keeps_the_sensitive_layer_dense() {
        // Two copies of one layer; the model's loss is ten times as sensitive to the second.
        let mut rng = StdRng::seed_from_u64(8);
        let (k, n) = (32, 16);
        let (gram, w) = layer(&mut rng, k, n);
        let low = vec![1.0; n];
        let high = vec![10.0; n];
        let targets: Vec<MaskTarget<'_>> = [&low, &high]
            .iter()
            .enumerate()
            .map(|(i, f)| MaskTarget {
                name: format!("w{i}"),
                k,
                n,
                w: w.clone(),
                gram: Some(&gram),
                fisher: Some(f),
                block: Some(i as u64),
            })
            .collect();
        let quiet = |_: &str, _: usize, _: usize| {};
        let loss = crate::masks::compute_masks(&targets, &options(Allocation::Loss, 0.25), &quiet)
            .unwrap();
        let (s0, s1) = (sparsity_of(&loss[0], k * n), sparsity_of(&loss[1], k * n));
        assert!(s0 > s1 + 0.2, "insensitive {s0} vs sensitive {s1}");
        // The relative allocation sees two equal layers; the uniform one holds both at 25%.
        let relative =
            crate::masks::compute_masks(&targets, &options(Allocation::Relative, 0.25), &quiet)
                .unwrap();
        let r = (
            sparsity_of(&relative[0], k * n),
            sparsity_of(&relative[1], k * n),
        );
        assert!((r.0 - r.1).abs() < 0.2, "relative: {r:?}");
        let uniform = crate::masks::compute_masks(
            &targets,
            &options(Allocation::UniformBlocks, 0.25),
            &quiet,
        )
        .unwrap();
        for m in &uniform {
            let s = sparsity_of(m, k * n);
            assert!((s - 0.25).abs() < 0.02, "uniform block at {s}");
        }
        // Without sensitivities the loss allocation refuses, naming the weight.
        let bare: Vec<MaskTarget<'_>> = targets
            .iter()
            .cloned()
            .map(|mut t| {
                t.fisher = None;
                t
            })
            .collect();
        let err = crate::masks::compute_masks(&bare, &options(Allocation::Loss, 0.25), &quiet)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`w0`") && err.contains("loss"), "{err}");
    }
}
