//! SparseGPT (Frantar & Alistarh, 2023) for hybrid masks: one OBS sweep over the K rows of a
//! weight `W[K, N]` (`y = x · W`) with the upper Cholesky factor `U` of `H⁻¹`
//! (`H` damped by 1% of its mean diagonal). At the first row of every group of four, each
//! column in a 2:4 tile keeps the two of the group's four weights with the largest
//! `w² / U_kk²`; then every pruned weight's error `(w − 0) / U_kk` is propagated to the rows
//! after it in the same column, dense tiles included. With a fixed keep-mask the selection is
//! skipped and only the update runs (the `--update-weights` path of the other methods).

use patch_kernels::{TileKind, TileMap, TileShape};

use super::linalg::{cholesky_lower, cholesky_upper, inverse_from_cholesky};
use crate::calibration::Gram;

/// Relative damping added to the diagonal of `H`.
pub const DAMP: f64 = 0.01;

/// The upper Cholesky factor of the damped `H⁻¹`, and the rows whose feature never fired
/// (zero diagonal: their weights are pruned for free).
fn inverse_factor(gram: &Gram) -> Result<(Vec<f64>, Vec<bool>), String> {
    let k = gram.k;
    let mut h = gram.h.clone();
    let dead: Vec<bool> = (0..k).map(|i| h[i * k + i] <= 0.0).collect();
    for (i, &d) in dead.iter().enumerate() {
        if d {
            h[i * k + i] = 1.0;
        }
    }
    let mean = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k.max(1) as f64;
    for i in 0..k {
        h[i * k + i] += DAMP * mean;
    }
    cholesky_lower(&mut h, k)?;
    let inv = inverse_from_cholesky(&h, k);
    Ok((cholesky_upper(&inv, k)?, dead))
}

/// Prunes `w` (`[K, N]`, row-major) to `map` (or to `fixed` when given) and returns the
/// updated weights (zero where pruned) and the keep-mask.
pub fn prune(
    w: &[f32],
    k: usize,
    n: usize,
    gram: &Gram,
    map: &TileMap,
    tile: TileShape,
    fixed: Option<&[bool]>,
) -> Result<(Vec<f32>, Vec<bool>), String> {
    let (u, dead) = inverse_factor(gram)?;
    let mut wk: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    for (r, &d) in dead.iter().enumerate() {
        if d {
            wk[r * n..(r + 1) * n].fill(0.0);
        }
    }
    let mut keep = vec![true; k * n];
    let mut err = vec![0f64; n];
    for r in 0..k {
        if r % 4 == 0 {
            let rows = (k - r).min(4);
            for c in 0..n {
                match fixed {
                    Some(f) => {
                        for q in 0..rows {
                            keep[(r + q) * n + c] = f[(r + q) * n + c];
                        }
                    }
                    None if map.get(r / tile.k, c / tile.n) == TileKind::Sparse24 => {
                        let score = |q: usize| {
                            let d = u[(r + q) * k + r + q];
                            wk[(r + q) * n + c].powi(2) / (d * d)
                        };
                        let mut idx: Vec<usize> = (0..rows).collect();
                        idx.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
                        for &q in idx.iter().skip(2) {
                            keep[(r + q) * n + c] = false;
                        }
                    }
                    None => {}
                }
            }
        }
        let d = u[r * k + r];
        let row = &mut wk[r * n..(r + 1) * n];
        let mut any = false;
        for c in 0..n {
            if keep[r * n + c] {
                err[c] = 0.0;
            } else {
                err[c] = row[c] / d;
                row[c] = 0.0;
                any = true;
            }
        }
        if !any {
            continue;
        }
        propagate(
            &mut wk[(r + 1) * n..],
            &u[r * k + r + 1..(r + 1) * k],
            &err,
            n,
        );
    }
    let out = wk
        .iter()
        .zip(&keep)
        .map(|(&v, &kp)| if kp { v as f32 } else { 0.0 })
        .collect();
    Ok((out, keep))
}

/// `rows[r2] −= f[r2] · err` for every row of `rows` (`n` wide), split over the kernels'
/// thread pool when large.
fn propagate(rows: &mut [f64], f: &[f64], err: &[f64], n: usize) {
    let count = f.len();
    let update = |rows: &mut [f64], f: &[f64]| {
        for (dst, &fr) in rows.chunks_exact_mut(n).zip(f) {
            if fr != 0.0 {
                super::linalg::axpy(dst, -fr, err);
            }
        }
    };
    let pool = patch_kernels::CpuKernels::global()
        .ok()
        .filter(|p| p.threads() > 1 && count * n >= 1 << 16);
    let Some(pool) = pool else {
        update(rows, f);
        return;
    };
    let parts = pool.threads();
    let mut chunks = Vec::with_capacity(parts);
    let mut rest: &mut [f64] = rows;
    for t in 0..parts {
        let (r0, r1) = (count * t / parts, count * (t + 1) / parts);
        let (head, tail) = rest.split_at_mut((r1 - r0) * n);
        chunks.push(std::sync::Mutex::new((head, &f[r0..r1])));
        rest = tail;
    }
    pool.run_on_threads(&|t| {
        let mut c = chunks[t].lock().unwrap_or_else(|e| e.into_inner());
        let (rows, f) = &mut *c;
        update(rows, f);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masks::{
        correlated_gram, keep_for, masked_weights, pattern_24, reconstruction_error,
    };
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn obs_update_beats_plain_masking_and_keeps_2_of_4() {
        let mut rng = StdRng::seed_from_u64(3);
        let (k, n, rows) = (16, 8, 64);
        // Correlated features make the update matter.
        let g = correlated_gram(&mut rng, k, rows, 0.5);
        let w: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let tile = TileShape::new(8, 4).unwrap();
        let (kt, nt) = tile.grid(k, n);
        let map = TileMap::spread(kt, nt, 0.5);
        let (new_w, keep) = prune(&w, k, n, &g, &map, tile, None).unwrap();
        for g0 in (0..k).step_by(4) {
            for c in 0..n {
                let kept = (0..4).filter(|q| keep[(g0 + q) * n + c]).count();
                let sparse = map.get(g0 / tile.k, c / tile.n) == TileKind::Sparse24;
                assert_eq!(kept, if sparse { 2 } else { 4 });
            }
        }
        let norms = g.column_norms();
        let sc: Vec<f64> = w
            .iter()
            .enumerate()
            .map(|(i, v)| v.abs() as f64 * norms[i / n])
            .collect();
        let plain_keep = keep_for(&map, &pattern_24(&sc, k, n), k, n, tile);
        let plain = masked_weights(&w, &plain_keep);
        let e_obs = reconstruction_error(&w, &new_w, &g, n);
        let e_plain = reconstruction_error(&w, &plain, &g, n);
        assert!(e_obs < e_plain, "OBS {e_obs} vs wanda masking {e_plain}");
        // A fixed mask is respected exactly and still improves on plain masking.
        let (w2, keep2) = prune(&w, k, n, &g, &map, tile, Some(&plain_keep)).unwrap();
        assert_eq!(keep2, plain_keep);
        assert!(reconstruction_error(&w, &w2, &g, n) < e_plain);
    }
}
