//! Scalar twin of the SIMD tile kernels: same packed format, same per-tile accumulation order
//! (pair by pair, slot 0 then slot 1), plain f32 multiply-add. X is f32, or bf16 on the
//! paths that round activations (products of two bf16 values are exact in f32).

use crate::cpu::TileJob;
use crate::format::WeightElement;

/// Computes `y[r, c] += Σ_k x[r, k] · W_tile[k, c]` for the columns `job.col0 ..
/// job.col0 + cols` of the tile, reading X from `x` (`job.x` or `job.xb`, same layout).
///
/// # Safety
/// `job` must satisfy the [`TileJob`] contract for `cols` columns with X at `x`; `T` must be
/// the tile dtype.
pub(crate) unsafe fn tile<T: WeightElement, A: WeightElement>(
    job: &TileJob,
    x: *const A,
    cols: usize,
) {
    let nw = job.nw;
    let vals = job.vals as *const T;
    let xv = |p: *const A| (*p).to_f32();
    for r in 0..job.rows {
        let x = x.add(r * job.xs);
        let y = job.y.add(r * job.ys);
        for c in 0..cols {
            let col = job.col0 + c;
            let mut acc = 0f32;
            if job.sparse {
                for g in 0..job.kpad / 4 {
                    let nib = *job.meta.add((g / 8) * nw + col) >> (4 * (g % 8));
                    let v0 = (*vals.add((g * nw + col) * 2)).to_f32();
                    let v1 = (*vals.add((g * nw + col) * 2 + 1)).to_f32();
                    acc += v0 * xv(x.add(4 * g + (nib & 3) as usize));
                    acc += v1 * xv(x.add(4 * g + ((nib >> 2) & 3) as usize));
                }
            } else {
                for kp in 0..job.kpad / 2 {
                    let v0 = (*vals.add((kp * nw + col) * 2)).to_f32();
                    let v1 = (*vals.add((kp * nw + col) * 2 + 1)).to_f32();
                    acc += v0 * xv(x.add(2 * kp));
                    acc += v1 * xv(x.add(2 * kp + 1));
                }
            }
            *y.add(c) += acc;
        }
    }
}
