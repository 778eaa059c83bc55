//! Small dense f64 linear algebra for the mask methods (row-major square matrices).

/// Lower Cholesky factor `L` of a symmetric positive definite `a` (`a = L Lᵀ`), in place in
/// the lower triangle (the upper triangle is zeroed). Fails on a non-positive pivot.
pub fn cholesky_lower(a: &mut [f64], n: usize) -> Result<(), String> {
    for i in 0..n {
        for j in 0..=i {
            let (ri, rj) = (i * n, j * n);
            let dot = dot(&a[ri..ri + j], &a[rj..rj + j]);
            let v = a[ri + j] - dot;
            if i == j {
                if v <= 0.0 || !v.is_finite() {
                    return Err(format!(
                        "matrix is not positive definite (pivot {i} is {v})"
                    ));
                }
                a[ri + i] = v.sqrt();
            } else {
                a[ri + j] = v / a[rj + j];
            }
        }
        for j in i + 1..n {
            a[i * n + j] = 0.0;
        }
    }
    Ok(())
}

/// `Σ a_i b_i` in eight independent lanes (so that it vectorizes).
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, ra) = a.as_chunks::<8>();
    let (cb, rb) = b.as_chunks::<8>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f64>() + tail
}

/// `y += a · x`.
pub fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (v, &u) in y.iter_mut().zip(x) {
        *v += a * u;
    }
}

/// `(L Lᵀ)⁻¹` from the lower factor `l`.
pub fn inverse_from_cholesky(l: &[f64], n: usize) -> Vec<f64> {
    // Linv: lower triangular inverse, row by row (row i = (e_i − Σ_{p<i} L[i,p]·Linv[p,·]) /
    // L[i,i]), so every update runs along contiguous rows.
    let mut linv = vec![0f64; n * n];
    for i in 0..n {
        let (done, rest) = linv.split_at_mut(i * n);
        let row = &mut rest[..n];
        row[i] = 1.0;
        for p in 0..i {
            let f = l[i * n + p];
            if f == 0.0 {
                continue;
            }
            axpy(&mut row[..=p], -f, &done[p * n..p * n + p + 1]);
        }
        let d = 1.0 / l[i * n + i];
        row[..=i].iter_mut().for_each(|v| *v *= d);
    }
    // A⁻¹ = Linvᵀ Linv: entry (i, j) = Σ_p Linv[p, i] Linv[p, j] for p ≥ max(i, j).
    let mut out = vec![0f64; n * n];
    for p in 0..n {
        let row = &linv[p * n..p * n + p + 1];
        for i in 0..=p {
            let a = row[i];
            if a == 0.0 {
                continue;
            }
            let o = &mut out[i * n..i * n + p + 1];
            for (dst, &b) in o.iter_mut().zip(row) {
                *dst += a * b;
            }
        }
    }
    // Only the lower-left part of each row i (j ≤ p) was filled symmetric-complete; mirror.
    for i in 0..n {
        for j in 0..i {
            let v = out[i * n + j];
            out[j * n + i] = v;
        }
    }
    out
}

/// Upper Cholesky factor `U` of `a` (`a = Uᵀ U`), row-major.
pub fn cholesky_upper(a: &[f64], n: usize) -> Result<Vec<f64>, String> {
    let mut l = a.to_vec();
    cholesky_lower(&mut l, n)?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = l[i * n + j];
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize) -> Vec<f64> {
        // B Bᵀ + n I for a fixed B.
        let b: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7919) % 13) as f64 / 13.0 - 0.5)
            .collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|p| b[i * n + p] * b[j * n + p]).sum::<f64>()
                    + if i == j { n as f64 } else { 0.0 };
            }
        }
        a
    }

    #[test]
    fn inverse_and_factors_reconstruct() {
        let n = 7;
        let a = spd(n);
        let mut l = a.clone();
        cholesky_lower(&mut l, n).unwrap();
        let inv = inverse_from_cholesky(&l, n);
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n).map(|p| a[i * n + p] * inv[p * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-10, "({i},{j}) = {v}");
            }
        }
        let u = cholesky_upper(&inv, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                let v: f64 = (0..n).map(|p| u[p * n + i] * u[p * n + j]).sum();
                assert!((v - inv[i * n + j]).abs() < 1e-10);
            }
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0);
            }
        }
        let mut bad = vec![1.0, 2.0, 2.0, 1.0];
        assert!(cholesky_lower(&mut bad, 2).is_err());
    }
}
