//! Scalar reference kernels: the ground truth that optimized kernels are tested against.

/// `y[m, n] = sum_k x[m, k] * w[k, n]` (+ `bias[n]`), all row-major, f32 accumulation.
///
/// Contract: `x.len() == m * k`, `w.len() == k * n`, `y.len() == m * n`, and `bias`, when
/// present, has `n` elements. The weight is in ONNX layout (`[K, N]`, K the reduction).
pub fn gemm_f32(
    m: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    assert_eq!(x.len(), m * k, "x must be m*k");
    assert_eq!(w.len(), k * n, "w must be k*n");
    assert_eq!(y.len(), m * n, "y must be m*n");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "bias must have n elements");
    }
    for (row, y_row) in y.chunks_exact_mut(n.max(1)).take(m).enumerate() {
        match bias {
            Some(b) => y_row.copy_from_slice(b),
            None => y_row.fill(0.0),
        }
        for (kk, &xv) in x[row * k..(row + 1) * k].iter().enumerate() {
            let w_row = &w[kk * n..(kk + 1) * n];
            for (acc, &wv) in y_row.iter_mut().zip(w_row) {
                *acc += xv * wv;
            }
        }
    }
}

/// `n` deterministic pseudo-random values in [-1, 1) from `seed` (xorshift64): test and
/// benchmark data that needs no RNG crate and is the same on every platform.
pub fn uniform_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Naive triple loop in f64, independent of the row-streaming order used above.
    fn gemm_f64(m: usize, k: usize, n: usize, x: &[f32], w: &[f32]) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|kk| x[i * k + kk] as f64 * w[kk * n + j] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn gemm_matches_f64_on_ragged_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(m, k, n) in &[(1, 1, 1), (1, 7, 3), (5, 13, 9), (17, 64, 33), (3, 129, 2)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut y = vec![f32::NAN; m * n];
            gemm_f32(m, k, n, &x, &w, Some(&bias), &mut y);
            let want = gemm_f64(m, k, n, &x, &w);
            for j in 0..m * n {
                let expect = want[j] + bias[j % n] as f64;
                assert!(
                    (y[j] as f64 - expect).abs() <= 1e-5 * (k as f64).sqrt(),
                    "({m},{k},{n}) at {j}: {} vs {expect}",
                    y[j]
                );
            }
        }
    }
}
