//! PATCH-Joint: the 2:4 pattern inside the 2:4 tiles is learned too, not frozen.
//!
//! Every full group of four K-elements of a column inside a 2:4 tile has six logits `φ_p`, one
//! per 2:4 pattern ([`PATTERNS`]). A relaxed pattern is drawn with Gumbel-softmax,
//! `q = softmax((φ + g) / τ)` (τ annealed geometrically), and element `e` of the group is kept
//! with weight `k_e = Σ_p q_p [e ∈ p]`, so the layer's weight error is
//! `ΔW_e = (1 − k_e) W_e` in learnable groups (partial groups keep their one-shot pattern,
//! dense tiles have no error). The objective is the exact output reconstruction error on the
//! calibration data, normalized as the tile objective is: `L = tr(ΔWᵀ H ΔW) / tr(Wᵀ H W)`.
//!
//! Hand-derived gradient (checked against finite differences in the tests):
//! `∂L/∂ΔW = 2 H ΔW / E`, `∂L/∂k_e = −W_e ∂L/∂ΔW_e`, `∂L/∂q_p = Σ_{e∈p} ∂L/∂k_e`,
//! `∂L/∂φ_p = q_p (∂L/∂q_p − Σ_p' q_p' ∂L/∂q_p') / τ`. Adam takes the steps.
//!
//! Prior (as MaskLLM): the one-shot pattern's logit starts at `prior` (3), the other five at 0.
//! The tile map is fixed before this runs (the tile variables of the learned map are saturated
//! by then), so the problem separates by layer and runs one layer at a time. Every
//! `CHECK_EVERY` steps the hard pattern (argmax φ) is scored exactly and the best one seen,
//! starting from the prior itself, is returned: the result is never worse than the one-shot
//! pattern on the objective.
//!
//! Each step costs one `H · ΔW` product (`K·K·N` multiply-adds per layer), run on the CPU
//! kernels' GEMM and thread pool.

use crate::calibration::Gram;
use patch_kernels::{pack, CpuKernels, TileKind, TileMap, TileShape};

/// The six 2:4 patterns of a group of four: bit `q` set keeps element `q`.
pub const PATTERNS: [u8; 6] = [0b0011, 0b0101, 0b1001, 0b0110, 0b1010, 0b1100];

/// How often (in steps) the hard pattern is scored.
const CHECK_EVERY: usize = 10;

/// Settings of the pattern learner (defaults documented in docs/CALIBRATION.md).
#[derive(Clone, Debug)]
pub struct JointOptions {
    /// Adam steps per layer; 0 keeps the one-shot pattern (PATCH-Tile).
    pub steps: usize,
    /// Adam step on φ (logit units).
    pub lr: f64,
    /// τ from, to.
    pub tau: (f64, f64),
    /// Initial logit of the one-shot pattern (the others start at 0).
    pub prior: f64,
}

impl Default for JointOptions {
    fn default() -> Self {
        JointOptions {
            steps: 0,
            lr: 0.1,
            tau: (1.0, 0.1),
            prior: 3.0,
        }
    }
}

/// `H · D` for `H` `[K, K]` and `D` `[K, N]` (row-major f32), on the CPU kernels' dense GEMM
/// (f32 accumulation).
fn h_product(h: &[f32], k: usize, d: &[f32], n: usize) -> Result<Vec<f32>, String> {
    let tile = TileShape::new(128, 128).map_err(|e| e.to_string())?;
    let (kt, nt) = tile.grid(k, n);
    let map = TileMap::uniform(kt, nt, TileKind::Dense);
    let packed = pack(d, k, n, tile, &map, None).map_err(|e| e.to_string())?;
    let kernels = CpuKernels::global().map_err(|e| e.to_string())?;
    let mut out = vec![0f32; k * n];
    kernels
        .matmul(k, h, &packed, None, &mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// One layer's pattern problem.
pub struct PatternProblem<'a> {
    k: usize,
    n: usize,
    w: &'a [f32],
    /// `H` in f32, row-major `[K, K]`.
    h: Vec<f32>,
    energy: f64,
    /// `ΔW` outside the learnable groups (partial groups of 2:4 tiles); zero in them.
    base: Vec<f32>,
    /// Learnable groups: the element index `row0 · N + col` of the group's first element.
    groups: Vec<usize>,
    /// Per group, the index into [`PATTERNS`] of the one-shot pattern.
    prior: Vec<u8>,
}

impl<'a> PatternProblem<'a> {
    /// The groups of `w` (`[K, N]`) in the 2:4 tiles of `map`, starting from `pattern` (a
    /// keep-mask with exactly two kept elements in every full group).
    pub fn new(
        w: &'a [f32],
        k: usize,
        n: usize,
        gram: &Gram,
        map: &TileMap,
        tile: TileShape,
        pattern: &[bool],
    ) -> Result<PatternProblem<'a>, String> {
        let h: Vec<f32> = gram.h.iter().map(|&v| v as f32).collect();
        let mut base = vec![0f32; k * n];
        let mut groups = Vec::new();
        let mut prior = Vec::new();
        for r0 in (0..k).step_by(4) {
            let rows = (k - r0).min(4);
            for c in 0..n {
                if map.get(r0 / tile.k, c / tile.n) != TileKind::Sparse24 {
                    continue;
                }
                if rows < 4 {
                    for r in r0..r0 + rows {
                        if !pattern[r * n + c] {
                            base[r * n + c] = w[r * n + c];
                        }
                    }
                    continue;
                }
                let bits = (0..4).fold(0u8, |b, q| b | ((pattern[(r0 + q) * n + c] as u8) << q));
                let p = PATTERNS
                    .iter()
                    .position(|&p| p == bits)
                    .ok_or_else(|| format!("group at ({r0}, {c}) does not keep 2 of 4"))?;
                groups.push(r0 * n + c);
                prior.push(p as u8);
            }
        }
        let hw = h_product(&h, k, w, n)?;
        let energy: f64 = w.iter().zip(&hw).map(|(&a, &b)| a as f64 * b as f64).sum();
        Ok(PatternProblem {
            k,
            n,
            w,
            h,
            energy: energy.max(1e-30),
            base,
            groups,
            prior,
        })
    }

    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// `L` for soft keep weights `keep` (4 per group) and `∂L/∂keep` into `grad`.
    fn loss_grad_keep(&self, keep: &[f32], grad: Option<&mut [f32]>) -> Result<f64, String> {
        let n = self.n;
        let mut delta = self.base.clone();
        for (g, &e0) in self.groups.iter().enumerate() {
            for q in 0..4 {
                let e = e0 + q * n;
                delta[e] = (1.0 - keep[g * 4 + q]) * self.w[e];
            }
        }
        let hd = h_product(&self.h, self.k, &delta, n)?;
        let loss: f64 = delta
            .iter()
            .zip(&hd)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum::<f64>()
            / self.energy;
        if let Some(grad) = grad {
            let scale = 2.0 / self.energy;
            for (g, &e0) in self.groups.iter().enumerate() {
                for q in 0..4 {
                    let e = e0 + q * n;
                    grad[g * 4 + q] = (-(self.w[e] as f64) * hd[e] as f64 * scale) as f32;
                }
            }
        }
        Ok(loss)
    }

    /// Exact `L` of hard patterns (one index into [`PATTERNS`] per group).
    pub fn hard_loss(&self, choice: &[u8]) -> Result<f64, String> {
        let keep: Vec<f32> = choice
            .iter()
            .flat_map(|&p| (0..4).map(move |q| ((PATTERNS[p as usize] >> q) & 1) as f32))
            .collect();
        self.loss_grad_keep(&keep, None)
    }

    /// `L` and `∂L/∂φ` for logits `phi` (6 per group), Gumbel noise `noise` and temperature
    /// `tau`.
    pub fn loss_grad(
        &self,
        phi: &[f32],
        noise: &[f32],
        tau: f64,
        grad: &mut [f32],
    ) -> Result<f64, String> {
        let groups = self.groups.len();
        let mut q = vec![[0f32; 6]; groups];
        let mut keep = vec![0f32; groups * 4];
        par_chunks(groups, |range, q, keep| {
            for (i, g) in range.enumerate() {
                q[i] = softmax(&phi[g * 6..g * 6 + 6], &noise[g * 6..g * 6 + 6], tau);
                for (p, &bits) in PATTERNS.iter().enumerate() {
                    for e in 0..4 {
                        if (bits >> e) & 1 == 1 {
                            keep[i * 4 + e] += q[i][p];
                        }
                    }
                }
            }
        })(&mut q, &mut keep);
        let mut dkeep = vec![0f32; groups * 4];
        let loss = self.loss_grad_keep(&keep, Some(&mut dkeep))?;
        par_chunks(groups, |range, grad: &mut [[f32; 6]], _: &mut [f32]| {
            for (i, g) in range.enumerate() {
                let dk = &dkeep[g * 4..g * 4 + 4];
                let qg = &q[g];
                let mut dq = [0f64; 6];
                for (p, &bits) in PATTERNS.iter().enumerate() {
                    dq[p] = (0..4)
                        .filter(|e| (bits >> e) & 1 == 1)
                        .map(|e| dk[e] as f64)
                        .sum();
                }
                let mean: f64 = (0..6).map(|p| qg[p] as f64 * dq[p]).sum();
                for p in 0..6 {
                    grad[i][p] = (qg[p] as f64 * (dq[p] - mean) / tau) as f32;
                }
            }
        })(as_groups(grad), &mut []);
        Ok(loss)
    }

    /// The keep-mask of `pattern` with every learnable group set to `choice`.
    pub fn apply(&self, pattern: &mut [bool], choice: &[u8]) {
        for (&e0, &p) in self.groups.iter().zip(choice) {
            for q in 0..4 {
                pattern[e0 + q * self.n] = (PATTERNS[p as usize] >> q) & 1 == 1;
            }
        }
    }

    /// Learns the patterns; returns the best hard choice seen and its loss, and the prior's.
    pub fn learn(&self, options: &JointOptions, seed: u64) -> Result<Learned, String> {
        let groups = self.groups.len();
        let prior_loss = self.hard_loss(&self.prior)?;
        let mut best = (self.prior.clone(), prior_loss);
        if groups == 0 || options.steps == 0 {
            return Ok(Learned {
                choice: best.0,
                loss: prior_loss,
                prior_loss,
            });
        }
        let mut phi = vec![0f32; groups * 6];
        for (g, &p) in self.prior.iter().enumerate() {
            phi[g * 6 + p as usize] = options.prior as f32;
        }
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let mut m1 = vec![0f32; groups * 6];
        let mut m2 = vec![0f32; groups * 6];
        let mut grad = vec![0f32; groups * 6];
        let mut noise = vec![0f32; groups * 6];
        let steps = options.steps;
        for step in 0..steps {
            let f = step as f64 / (steps - 1).max(1) as f64;
            let tau = options.tau.0 * (options.tau.1 / options.tau.0).powf(f);
            let stream = seed ^ (step as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03);
            par_chunks(groups, |range, noise: &mut [[f32; 6]], _: &mut [f32]| {
                for (i, g) in range.enumerate() {
                    for (p, v) in noise[i].iter_mut().enumerate() {
                        *v = gumbel(stream, (g * 6 + p) as u64);
                    }
                }
            })(as_groups(&mut noise), &mut []);
            self.loss_grad(&phi, &noise, tau, &mut grad)?;
            let t = (step + 1) as i32;
            let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let lr = options.lr;
            std::thread::scope(|s| {
                let chunk = phi.len().div_ceil(threads()).max(1);
                for (((phi, m1), m2), grad) in phi
                    .chunks_mut(chunk)
                    .zip(m1.chunks_mut(chunk))
                    .zip(m2.chunks_mut(chunk))
                    .zip(grad.chunks(chunk))
                {
                    s.spawn(move || {
                        for i in 0..phi.len() {
                            let g = grad[i] as f64;
                            let a = b1 * m1[i] as f64 + (1.0 - b1) * g;
                            let b = b2 * m2[i] as f64 + (1.0 - b2) * g * g;
                            m1[i] = a as f32;
                            m2[i] = b as f32;
                            phi[i] -= (lr * (a / c1) / ((b / c2).sqrt() + eps)) as f32;
                        }
                    });
                }
            });
            if (step + 1) % CHECK_EVERY == 0 || step + 1 == steps {
                let choice = argmax(&phi);
                let loss = self.hard_loss(&choice)?;
                if loss < best.1 {
                    best = (choice, loss);
                }
            }
        }
        Ok(Learned {
            choice: best.0,
            loss: best.1,
            prior_loss,
        })
    }
}

/// The outcome of [`PatternProblem::learn`].
#[derive(Clone, Debug)]
pub struct Learned {
    /// One index into [`PATTERNS`] per learnable group.
    pub choice: Vec<u8>,
    pub loss: f64,
    /// The one-shot pattern's loss.
    pub prior_loss: f64,
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Splits `groups` into one contiguous range per thread and runs `f(range, a, b)` on each with
/// the matching chunks of `a` (one item per group) and `b` (four per group, or empty).
fn par_chunks<A: Send, F>(groups: usize, f: F) -> impl FnOnce(&mut [A], &mut [f32])
where
    F: Fn(std::ops::Range<usize>, &mut [A], &mut [f32]) + Sync,
{
    move |a: &mut [A], b: &mut [f32]| {
        let chunk = groups.div_ceil(threads()).max(1);
        let per = if b.is_empty() { 0 } else { 4 };
        let f = &f;
        std::thread::scope(|s| {
            let mut b = b;
            for (c, a) in a.chunks_mut(chunk).enumerate() {
                let take = (a.len() * per).min(b.len());
                let (head, tail) = std::mem::take(&mut b).split_at_mut(take);
                b = tail;
                let start = c * chunk;
                s.spawn(move || f(start..start + a.len(), a, head));
            }
        });
    }
}

fn as_groups(v: &mut [f32]) -> &mut [[f32; 6]] {
    let (groups, rest) = v.as_chunks_mut::<6>();
    debug_assert!(rest.is_empty(), "six logits per group");
    groups
}

/// `q = softmax((φ + g) / τ)` over the six patterns of a group.
pub(crate) fn softmax(phi: &[f32], noise: &[f32], tau: f64) -> [f32; 6] {
    let inv = (1.0 / tau) as f32;
    let mut z = [0f32; 6];
    for p in 0..6 {
        z[p] = (phi[p] + noise[p]) * inv;
    }
    let zmax = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in z.iter_mut() {
        *v = (*v - zmax).exp();
        sum += *v;
    }
    z.map(|v| v / sum)
}

/// Standard Gumbel noise for draw `index` of stream `stream`: a counter-based generator
/// (splitmix64 of the pair), so the draws do not depend on how groups are split over threads.
pub(crate) fn gumbel(stream: u64, index: u64) -> f32 {
    let mut x = stream ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    // 24 random bits, strictly inside (0, 1).
    let u = ((x >> 40) as f32 + 0.5) / (1u64 << 24) as f32;
    -fast_ln(-fast_ln(u))
}

/// `ln x` for finite normal `x > 0` to about 1e-5 absolute (plenty for noise): the exponent
/// from the bits, `ln(1 + m)` on `[0, 1)` by a least-squares degree-6 polynomial.
fn fast_ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000) - 1.0;
    let p = m
        * (0.999_876_6
            + m * (-0.497_609_2
                + m * (0.316_694_9 + m * (-0.192_254_8 + m * (0.084_504_4 - m * 0.018_067_8)))));
    p + e as f32 * std::f32::consts::LN_2
}

pub(crate) fn argmax(phi: &[f32]) -> Vec<u8> {
    phi.chunks(6)
        .map(|l| {
            (0..6)
                .fold(0usize, |b, p| if l[p] > l[b] { p } else { b })
                .try_into()
                .expect("six patterns")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masks::{
        correlated_gram, keep_for, masked_weights, pattern_24, reconstruction_error,
    };
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn problem(k: usize, n: usize, seed: u64) -> (Gram, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let g = correlated_gram(&mut rng, k, 3 * k, 0.7);
        let w = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        (g, w)
    }

    fn setup(k: usize, n: usize) -> (Gram, Vec<f32>, TileMap, TileShape, Vec<bool>) {
        let (g, w) = problem(k, n, 5);
        let tile = TileShape::new(8, 4).unwrap();
        let (kt, nt) = tile.grid(k, n);
        let map = TileMap::spread(kt, nt, 0.6);
        let sc: Vec<f64> = w.iter().map(|v| v.abs() as f64).collect();
        let pat = pattern_24(&sc, k, n);
        (g, w, map, tile, pat)
    }

    #[test]
    fn fast_ln_is_close_to_ln() {
        for i in 1..2000 {
            let x = i as f32 / 1999.0 * 8.0 + 1e-6 * i as f32;
            assert!((fast_ln(x) - x.ln()).abs() < 2e-5, "{x}");
        }
        for x in [1e-7f32, 3e-5, 0.01, 0.5, 0.999_999] {
            assert!((fast_ln(x) - x.ln()).abs() < 2e-5, "{x}");
        }
    }

    #[test]
    fn hard_loss_is_the_reconstruction_error() {
        // Ragged: K = 18 leaves a partial group of two rows, N = 7 a partial tile column.
        let (k, n) = (18, 7);
        let (g, w, map, tile, pat) = setup(k, n);
        let pp = PatternProblem::new(&w, k, n, &g, &map, tile, &pat).unwrap();
        assert!(pp.groups() > 0);
        let keep = keep_for(&map, &pat, k, n, tile);
        let masked = masked_weights(&w, &keep);
        let exact = reconstruction_error(&w, &masked, &g, n);
        let got = pp.hard_loss(&pp.prior).unwrap();
        assert!((got - exact).abs() <= 1e-4 * exact, "{got} vs {exact}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (k, n) = (16, 8);
        let (g, w, map, tile, pat) = setup(k, n);
        let pp = PatternProblem::new(&w, k, n, &g, &map, tile, &pat).unwrap();
        let groups = pp.groups();
        let mut rng = StdRng::seed_from_u64(9);
        let phi: Vec<f32> = (0..groups * 6).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let noise: Vec<f32> = (0..groups * 6).map(|_| rng.gen_range(-0.5..0.5)).collect();
        let tau = 0.8;
        let mut grad = vec![0f32; groups * 6];
        pp.loss_grad(&phi, &noise, tau, &mut grad).unwrap();
        let mut scratch = vec![0f32; groups * 6];
        let h = 1e-2f32;
        let mut checked = 0;
        for i in (0..groups * 6).step_by(5) {
            let mut up = phi.clone();
            up[i] += h;
            let mut dn = phi.clone();
            dn[i] -= h;
            let fd = (pp.loss_grad(&up, &noise, tau, &mut scratch).unwrap()
                - pp.loss_grad(&dn, &noise, tau, &mut scratch).unwrap())
                / (2.0 * h as f64);
            let an = grad[i] as f64;
            let scale = grad.iter().map(|v| v.abs()).fold(0f32, f32::max) as f64;
            assert!(
                (fd - an).abs() <= 2e-3 * scale,
                "logit {i}: fd {fd} vs analytic {an} (max |grad| {scale})"
            );
            checked += 1;
        }
        assert!(checked > 10);
    }

    #[test]
    fn learning_never_loses_to_the_prior_and_usually_wins() {
        let (k, n) = (32, 16);
        let (g, w, map, tile, pat) = setup(k, n);
        let pp = PatternProblem::new(&w, k, n, &g, &map, tile, &pat).unwrap();
        let options = JointOptions {
            steps: 200,
            ..JointOptions::default()
        };
        let learned = pp.learn(&options, 1).unwrap();
        assert!(learned.loss <= learned.prior_loss);
        // On correlated features magnitude's pattern is far from optimal.
        assert!(
            learned.loss < 0.9 * learned.prior_loss,
            "{} vs prior {}",
            learned.loss,
            learned.prior_loss
        );
        let mut pattern = pat.clone();
        pp.apply(&mut pattern, &learned.choice);
        let keep = keep_for(&map, &pattern, k, n, tile);
        for r0 in (0..k).step_by(4) {
            for c in 0..n {
                let kept = (0..4).filter(|q| keep[(r0 + q) * n + c]).count();
                let sparse = map.get(r0 / tile.k, c / tile.n) == TileKind::Sparse24;
                assert_eq!(kept, if sparse { 2 } else { 4 });
            }
        }
        let masked = masked_weights(&w, &keep);
        let exact = reconstruction_error(&w, &masked, &g, n);
        assert!((exact - learned.loss).abs() <= 1e-4 * exact);
        // Deterministic for a seed.
        assert_eq!(pp.learn(&options, 1).unwrap().choice, learned.choice);
    }
}
