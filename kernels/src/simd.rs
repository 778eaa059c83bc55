//! One kernel body for every vector width.
//!
//! A kernel written once as an `#[inline(always)]` function generic over [`F32Simd`] is
//! instantiated per path inside a `#[target_feature]` entry point (`body::<Avx512>` in an
//! `avx512f` function, `body::<Avx2>` in an `avx2,fma` one, `body::<Scalar>` anywhere): the
//! trait's methods carry the same target features and `#[inline]`, so each instance compiles
//! to straight vector code with no calls. [`Scalar`] (one lane, `f32::mul_add`) is the twin
//! every instance is tested against; a body's results may differ between widths only by the
//! order of its sums.
//!
//! # Safety
//! Every method is `unsafe` because it uses instructions the CPU may lack: call them only
//! from code that runs after the path was checked (`SimdPath::is_supported`), and give
//! `load`/`store` pointers valid for `LANES` floats.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// f32 vectors of `LANES` lanes.
pub trait F32Simd: Copy {
    type V: Copy;
    const LANES: usize;
    /// # Safety
    /// See the module documentation.
    unsafe fn zero() -> Self::V;
    /// # Safety
    /// See the module documentation.
    unsafe fn splat(x: f32) -> Self::V;
    /// # Safety
    /// `p` is valid for reading `LANES` floats (no alignment needed).
    unsafe fn load(p: *const f32) -> Self::V;
    /// # Safety
    /// `p` is valid for writing `LANES` floats (no alignment needed).
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c`, fused (one rounding).
    ///
    /// # Safety
    /// See the module documentation.
    unsafe fn mul_add(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// # Safety
    /// See the module documentation.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// The sum of the lanes.
    ///
    /// # Safety
    /// See the module documentation.
    unsafe fn reduce_add(v: Self::V) -> f32;
    /// The sums of the lanes of four vectors: four [`reduce_add`](Self::reduce_add) up to
    /// the order of the additions, in one shuffle tree.
    ///
    /// # Safety
    /// See the module documentation.
    #[inline(always)]
    unsafe fn reduce_add4(v: [Self::V; 4]) -> [f32; 4] {
        v.map(|x| Self::reduce_add(x))
    }
}

/// One lane: the portable twin.
#[derive(Clone, Copy, Debug)]
pub struct Scalar;

impl F32Simd for Scalar {
    type V = f32;
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn zero() -> f32 {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        p.read_unaligned()
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        p.write_unaligned(v)
    }
    #[inline(always)]
    unsafe fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    unsafe fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn reduce_add(v: f32) -> f32 {
        v
    }
}

/// 256-bit AVX2 + FMA vectors.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct Avx2;

#[cfg(target_arch = "x86_64")]
impl F32Simd for Avx2 {
    type V = __m256;
    const LANES: usize = 8;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(p: *mut f32, v: __m256) {
        _mm256_storeu_ps(p, v)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mul_add(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce_add(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce_add4(v: [__m256; 4]) -> [f32; 4] {
        hadd4(v)
    }
}

/// `[Σ v[0], Σ v[1], Σ v[2], Σ v[3]]` of four 8-lane vectors.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hadd4(v: [__m256; 4]) -> [f32; 4] {
    // [a01 a23 b01 b23 | a45 a67 b45 b67], then [Σa0-3 Σb0-3 Σc0-3 Σd0-3 | Σa4-7 ...].
    let ab = _mm256_hadd_ps(v[0], v[1]);
    let cd = _mm256_hadd_ps(v[2], v[3]);
    let abcd = _mm256_hadd_ps(ab, cd);
    let s = _mm_add_ps(
        _mm256_castps256_ps128(abcd),
        _mm256_extractf128_ps::<1>(abcd),
    );
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), s);
    out
}

/// 512-bit AVX-512F vectors.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct Avx512;

#[cfg(target_arch = "x86_64")]
impl F32Simd for Avx512 {
    type V = __m512;
    const LANES: usize = 16;
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn mul_add(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce_add(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce_add4(v: [__m512; 4]) -> [f32; 4] {
        // Each vector folded to 8 lanes (low half + high half), then the AVX2 tree.
        hadd4(v.map(|x| {
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
            _mm256_add_ps(_mm512_castps512_ps256(x), high)
        }))
    }
}

/// `Σ a[i] · b[i]` over `a.len()` elements on `S`: two independent accumulators of full
/// vectors, then the scalar tail. The sum order depends on `S::LANES` only.
///
/// # Safety
/// `S`'s instructions must be available (see the module documentation).
#[inline(always)]
pub unsafe fn dot<S: F32Simd>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let b = &b[..n];
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let l = S::LANES;
    let full = n / l * l;
    let (mut s0, mut s1) = (S::zero(), S::zero());
    let mut c = 0;
    while c + 2 * l <= full {
        s0 = S::mul_add(S::load(pa.add(c)), S::load(pb.add(c)), s0);
        s1 = S::mul_add(S::load(pa.add(c + l)), S::load(pb.add(c + l)), s1);
        c += 2 * l;
    }
    if c < full {
        s0 = S::mul_add(S::load(pa.add(c)), S::load(pb.add(c)), s0);
    }
    let mut s = if l == 1 {
        S::reduce_add(s0) + S::reduce_add(s1)
    } else {
        S::reduce_add(S::add(s0, s1))
    };
    for i in full..n {
        s = a[i].mul_add(b[i], s);
    }
    s
}

/// `[Σ a[i] · b[u][i]]` for the four rows `b[u]` (each at least `a.len()` long): one
/// accumulator per row over full vectors, one reduction for the four, then the scalar tails.
///
/// # Safety
/// `S`'s instructions must be available (see the module documentation).
#[inline(always)]
pub unsafe fn dot4<S: F32Simd>(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let n = a.len();
    let b = b.map(|r| &r[..n]);
    let l = S::LANES;
    let full = n / l * l;
    let mut acc = [S::zero(); 4];
    let mut c = 0;
    while c < full {
        let x = S::load(a.as_ptr().add(c));
        for (s, r) in acc.iter_mut().zip(&b) {
            *s = S::mul_add(x, S::load(r.as_ptr().add(c)), *s);
        }
        c += l;
    }
    let mut sums = S::reduce_add4(acc);
    for (s, r) in sums.iter_mut().zip(&b) {
        for i in full..n {
            *s = a[i].mul_add(r[i], *s);
        }
    }
    sums
}

/// `acc[i] += p · x[i]` for `i < acc.len()`, with `acc` held in registers across calls by
/// the caller's loop where it can; here one vector at a time, then the scalar tail.
///
/// # Safety
/// `S`'s instructions must be available; `x.len() >= acc.len()`.
#[inline(always)]
pub unsafe fn axpy<S: F32Simd>(p: f32, x: &[f32], acc: &mut [f32]) {
    let n = acc.len();
    let x = &x[..n];
    let l = S::LANES;
    let full = n / l * l;
    let pv = S::splat(p);
    let mut c = 0;
    while c < full {
        let a = acc.as_mut_ptr().add(c);
        S::store(a, S::mul_add(pv, S::load(x.as_ptr().add(c)), S::load(a)));
        c += l;
    }
    for i in full..n {
        acc[i] = p.mul_add(x[i], acc[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
    }

    /// Every width against the scalar twin and an f64 sum, on ragged lengths.
    #[test]
    fn dot_and_axpy_agree_across_widths() {
        for n in [0usize, 1, 7, 8, 15, 16, 17, 31, 33, 64, 100] {
            let (a, b) = (random(n, 1), random(n, 2));
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let tol = 1e-5
                * (1.0
                    + a.iter()
                        .zip(&b)
                        .map(|(x, y)| (x * y).abs() as f64)
                        .sum::<f64>());
            // SAFETY: the scalar path needs nothing.
            let scalar = unsafe { dot::<Scalar>(&a, &b) };
            // Four rows against one: each sum as `dot`'s, within the same bound.
            let rows: Vec<Vec<f32>> = (0..4).map(|u| random(n, 10 + u)).collect();
            let exact4: Vec<f64> = rows
                .iter()
                .map(|r| a.iter().zip(r).map(|(x, y)| *x as f64 * *y as f64).sum())
                .collect();
            let tol4: Vec<f64> = rows
                .iter()
                .map(|r| {
                    1e-5 * (1.0
                        + a.iter()
                            .zip(r)
                            .map(|(x, y)| (x * y).abs() as f64)
                            .sum::<f64>())
                })
                .collect();
            let four = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
            let check4 = |name: &str, got: [f32; 4]| {
                for u in 0..4 {
                    assert!(
                        (got[u] as f64 - exact4[u]).abs() <= tol4[u],
                        "{name} dot4 row {u}, n {n}: {} vs {}",
                        got[u],
                        exact4[u]
                    );
                }
            };
            // SAFETY: as above.
            check4("scalar", unsafe { dot4::<Scalar>(&a, four) });
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: AVX2 and FMA were detected.
                    check4("avx2", unsafe { dot4::<Avx2>(&a, four) });
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F was detected.
                    check4("avx512", unsafe { dot4::<Avx512>(&a, four) });
                }
            }
            assert!(
                (scalar as f64 - exact).abs() <= tol,
                "n {n}: {scalar} vs {exact}"
            );
            let init = random(n, 3);
            let mut want = init.clone();
            // SAFETY: as above.
            unsafe { axpy::<Scalar>(0.37, &a, &mut want) };
            #[cfg(target_arch = "x86_64")]
            {
                let mut widths: Vec<(&str, f32, Vec<f32>)> = Vec::new();
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    let mut acc = init.clone();
                    // SAFETY: AVX2 and FMA were detected.
                    let d = unsafe {
                        axpy::<Avx2>(0.37, &a, &mut acc);
                        dot::<Avx2>(&a, &b)
                    };
                    widths.push(("avx2", d, acc));
                }
                if is_x86_feature_detected!("avx512f") {
                    let mut acc = init.clone();
                    // SAFETY: AVX-512F was detected.
                    let d = unsafe {
                        axpy::<Avx512>(0.37, &a, &mut acc);
                        dot::<Avx512>(&a, &b)
                    };
                    widths.push(("avx512", d, acc));
                }
                for (name, d, acc) in widths {
                    assert!(
                        (d as f64 - exact).abs() <= tol,
                        "{name} n {n}: {d} vs {exact}"
                    );
                    // axpy is one fused multiply-add per element on every width: bit for bit.
                    assert_eq!(acc, want, "{name} axpy, n {n}");
                }
            }
        }
    }
}
