//! Calibration statistics: for every weight MatMul, the Gram matrix `H = XᵀX` of the
//! activations entering it (summed over all calibration tokens, accumulated in f64), from which
//! the mask methods compute reconstruction errors exactly (`‖XW − XW'‖² = tr(ΔWᵀ H ΔW)`) and
//! per-feature norms (`‖X_k‖ = √H_kk`).
//!
//! MatMuls that read the same activation (Q/K/V, gate/up) share one matrix.

use std::collections::HashMap;

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use patch_runtime::ir::Node;
use patch_runtime::{DType, Tensor, ValueId};

/// `H = Σ XᵀX` over the rows seen so far, for one activation of width `k`.
#[derive(Clone, Debug)]
pub struct Gram {
    pub k: usize,
    /// Row-major `k × k`, f64.
    pub h: Vec<f64>,
    /// Number of rows (tokens) accumulated.
    pub rows: usize,
}

impl Gram {
    pub fn new(k: usize) -> Gram {
        Gram {
            k,
            h: vec![0.0; k * k],
            rows: 0,
        }
    }

    /// Adds the rows of `x` (`rows × k`, row-major f32): one f32 product per call, summed
    /// into the f64 total. Large products split their output columns over the kernels'
    /// thread pool.
    pub fn add_rows(&mut self, x: &[f32]) {
        let k = self.k;
        let rows = x.len() / k;
        if rows == 0 {
            return;
        }
        let g = gram_f32(&x[..rows * k], rows, k);
        for (acc, &v) in self.h.iter_mut().zip(g.iter()) {
            *acc += v as f64;
        }
        self.rows += rows;
    }

    /// `‖X_j‖` for every input feature `j`.
    pub fn column_norms(&self) -> Vec<f64> {
        (0..self.k)
            .map(|j| self.h[j * self.k + j].max(0.0).sqrt())
            .collect()
    }
}

/// `XᵀX` (`k × k`, row-major) of `rows × k` row-major `x`, in f32: on the kernels' GEMM and
/// thread pool (X packed as the product's weight, Xᵀ copied row-major), matrixmultiply when the
/// kernels are unavailable or the product is small.
pub fn gram_f32(x: &[f32], rows: usize, k: usize) -> Vec<f32> {
    let mut g = vec![0f32; k * k];
    if rows >= 16 && k >= 64 {
        if let Some(()) = gram_packed(x, rows, k, &mut g) {
            return g;
        }
    }
    let xv = ArrayView2::from_shape((rows, k), x).expect("rows × k");
    let mut gv = ArrayViewMut2::from_shape((k, k), &mut g).expect("k × k");
    general_mat_mul(1.0, &xv.t(), &xv, 0.0, &mut gv);
    g
}

fn gram_packed(x: &[f32], rows: usize, k: usize, g: &mut [f32]) -> Option<()> {
    use patch_kernels::{pack, CpuKernels, TileKind, TileMap, TileShape};
    let kernels = CpuKernels::global().ok()?;
    let tile = TileShape::new(128, 128).ok()?;
    let (kt, nt) = tile.grid(rows, k);
    let map = TileMap::uniform(kt, nt, TileKind::Dense);
    let packed = pack(x, rows, k, tile, &map, None).ok()?;
    let mut xt = vec![0f32; rows * k];
    for r in 0..rows {
        for c in 0..k {
            xt[c * rows + r] = x[r * k + c];
        }
    }
    kernels.matmul(k, &xt, &packed, None, g).ok()
}

/// Gram matrices keyed by the activation value they were taken from.
#[derive(Debug, Default)]
pub struct Calibration {
    pub grams: HashMap<ValueId, Gram>,
}

impl Calibration {
    /// An observer for [`patch_runtime::interp::Plan::run_observed`] that accumulates the
    /// first input of every node named in `targets` (node name → activation width), once per
    /// activation: make one observer per run.
    pub fn observe<'a>(
        &'a mut self,
        targets: &'a HashMap<String, usize>,
    ) -> impl FnMut(&Node, &[Option<&Tensor>]) + 'a {
        // An activation read by several MatMuls (Q/K/V) is added once per run.
        let mut seen = std::collections::HashSet::new();
        move |node, inputs| {
            let Some(&k) = targets.get(&node.name) else {
                return;
            };
            let (Some(id), Some(Some(x))) =
                (node.inputs.first().copied().flatten(), inputs.first())
            else {
                return;
            };
            if !seen.insert(id) {
                return;
            }
            if x.dtype() != DType::F32 || x.shape().last() != Some(&k) {
                return;
            }
            if let Ok(xs) = x.as_slice::<f32>() {
                self.grams
                    .entry(id)
                    .or_insert_with(|| Gram::new(k))
                    .add_rows(xs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_is_xtx_accumulated_over_calls() {
        let x1 = [1f32, 2., 3., 4., 5., 6.]; // 2 rows of 3
        let x2 = [0f32, 1., -1.];
        let mut g = Gram::new(3);
        g.add_rows(&x1);
        g.add_rows(&x2);
        assert_eq!(g.rows, 3);
        let rows: Vec<&[f32]> = vec![&x1[0..3], &x1[3..6], &x2[..]];
        for i in 0..3 {
            for j in 0..3 {
                let want: f64 = rows.iter().map(|r| (r[i] * r[j]) as f64).sum();
                assert_eq!(g.h[i * 3 + j], want);
            }
        }
        let norms = g.column_norms();
        assert!((norms[0] - (1f64 + 16.0).sqrt()).abs() < 1e-12);
    }
}
