//! Scalar twin of the SIMD tile kernels: same packed format, same per-tile accumulation order
//! (pair by pair, slot 0 then slot 1), plain f32 multiply-add.

use crate::cpu::TileJob;
use crate::format::WeightElement;

/// Computes `y[r, c] += Σ_k x[r, k] · W_tile[k, c]` for the columns `job.col0 ..
/// job.col0 + cols` of the tile.
///
/// # Safety
/// `job` must satisfy the [`TileJob`] contract for `cols` columns; `T` must be the tile dtype.
pub(crate) unsafe fn tile<T: WeightElement>(job: &TileJob, cols: usize) {
    let nw = job.nw;
    let vals = job.vals as *const T;
    for r in 0..job.rows {
        let x = job.x.add(r * job.xs);
        let y = job.y.add(r * job.ys);
        for c in 0..cols {
            let col = job.col0 + c;
            let mut acc = 0f32;
            if job.sparse {
                for g in 0..job.kpad / 4 {
                    let nib = *job.meta.add((g / 8) * nw + col) >> (4 * (g % 8));
                    let v0 = (*vals.add((g * nw + col) * 2)).to_f32();
                    let v1 = (*vals.add((g * nw + col) * 2 + 1)).to_f32();
                    acc += v0 * *x.add(4 * g + (nib & 3) as usize);
                    acc += v1 * *x.add(4 * g + ((nib >> 2) & 3) as usize);
                }
            } else {
                for kp in 0..job.kpad / 2 {
                    let v0 = (*vals.add((kp * nw + col) * 2)).to_f32();
                    let v1 = (*vals.add((kp * nw + col) * 2 + 1)).to_f32();
                    acc += v0 * *x.add(2 * kp);
                    acc += v1 * *x.add(2 * kp + 1);
                }
            }
            *y.add(c) += acc;
        }
    }
}
