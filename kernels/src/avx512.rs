//! AVX-512 tile kernels (16 output columns per `zmm`, f32 accumulators in column layout).
//!
//! Dense tiles: per K-pair, one load of 16 column pairs, split into the even-k and odd-k
//! vectors, two FMAs per row with broadcast activations.
//! 2:4 tiles: per group of four K rows, one load of 16 kept-value pairs and (every 8 groups)
//! 16 metadata words; `vpermilps` picks `x[4g + i0]` and `x[4g + i1]` for every lane from the
//! low two bits of the metadata word shifted by `4q` and `4q + 2` — the packed format is read
//! as is.

use core::arch::x86_64::*;

use crate::cpu::{for_each_block, TileJob, DT_BF16, DT_F16, DT_F32};

/// Output columns per vector.
pub(crate) const LANES: usize = 16;

/// Loads 16 column pairs starting at `p` and returns (even-k values, odd-k values) as f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
unsafe fn split<const DT: u8>(p: *const u8) -> (__m512, __m512) {
    if DT == DT_BF16 {
        // One 32-bit lane = (k even in the low half, k odd in the high half) of one column;
        // bf16 -> f32 is a 16-bit shift.
        let v = _mm512_loadu_si512(p as *const _);
        let e = _mm512_slli_epi32::<16>(v);
        let o = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
        (_mm512_castsi512_ps(e), _mm512_castsi512_ps(o))
    } else {
        let (a, b) = if DT == DT_F32 {
            let q = p as *const f32;
            (_mm512_loadu_ps(q), _mm512_loadu_ps(q.add(16)))
        } else {
            debug_assert_eq!(DT, DT_F16);
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32) as *const __m256i)),
            )
        };
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        (
            _mm512_permutex2var_ps(a, even, b),
            _mm512_permutex2var_ps(a, odd, b),
        )
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
unsafe fn store_acc<const MR: usize, const NV: usize>(
    acc: &[[__m512; NV]; MR],
    y: *mut f32,
    ys: usize,
) {
    for (r, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            let p = y.add(r * ys + v * LANES);
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *a));
        }
    }
}

/// Dense block: `MR` rows by `NV * 16` columns over `kpairs` K-pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn dense<const DT: u8, const MR: usize, const NV: usize>(
    x: *const f32,
    xs: usize,
    w: *const u8,
    ws: usize,
    kpairs: usize,
    y: *mut f32,
    ys: usize,
) {
    let esz = if DT == DT_F32 { 4 } else { 2 };
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for kp in 0..kpairs {
        let wp = w.add(kp * ws);
        let mut e = [_mm512_setzero_ps(); NV];
        let mut o = [_mm512_setzero_ps(); NV];
        for v in 0..NV {
            (e[v], o[v]) = split::<DT>(wp.add(v * LANES * 2 * esz));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let xr = x.add(r * xs + 2 * kp);
            let x0 = _mm512_set1_ps(*xr);
            let x1 = _mm512_set1_ps(*xr.add(1));
            for v in 0..NV {
                acc_r[v] = _mm512_fmadd_ps(e[v], x0, acc_r[v]);
                acc_r[v] = _mm512_fmadd_ps(o[v], x1, acc_r[v]);
            }
        }
    }
    store_acc(&acc, y, ys);
}

/// 2:4 block: `MR` rows by `NV * 16` columns over `groups` groups of four K rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn sparse<const DT: u8, const MR: usize, const NV: usize>(
    x: *const f32,
    xs: usize,
    vals: *const u8,
    vs: usize,
    meta: *const u32,
    ms: usize,
    groups: usize,
    y: *mut f32,
    ys: usize,
) {
    let esz = if DT == DT_F32 { 4 } else { 2 };
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let mut mw = [_mm512_setzero_si512(); NV];
    for g in 0..groups {
        if g % 8 == 0 {
            for (v, m) in mw.iter_mut().enumerate() {
                *m = _mm512_loadu_si512(meta.add((g / 8) * ms + v * LANES) as *const _);
            }
        }
        let vp = vals.add(g * vs);
        let mut e = [_mm512_setzero_ps(); NV];
        let mut o = [_mm512_setzero_ps(); NV];
        let mut s1 = [_mm512_setzero_si512(); NV];
        for v in 0..NV {
            (e[v], o[v]) = split::<DT>(vp.add(v * LANES * 2 * esz));
            s1[v] = _mm512_srli_epi32::<2>(mw[v]);
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // x[4g .. 4g + 4] in every 128-bit lane; vpermilps uses bits 1:0 of each index.
            let x4 = _mm512_broadcast_f32x4(_mm_loadu_ps(x.add(r * xs + 4 * g)));
            for v in 0..NV {
                let xa = _mm512_permutevar_ps(x4, mw[v]);
                let xb = _mm512_permutevar_ps(x4, s1[v]);
                acc_r[v] = _mm512_fmadd_ps(e[v], xa, acc_r[v]);
                acc_r[v] = _mm512_fmadd_ps(o[v], xb, acc_r[v]);
            }
        }
        for m in mw.iter_mut() {
            *m = _mm512_srli_epi32::<4>(*m);
        }
    }
    store_acc(&acc, y, ys);
}

// GEMV (one row of X) on f32 / f16 tiles: an (even-k, odd-k) pair of a column is multiplied
// by the broadcast pair (x[2kp], x[2kp + 1]) as stored, so no even/odd split (two
// `vpermt2ps` per 16 columns) runs per K-pair; the lanes of an accumulator hold interleaved
// partial sums of eight columns, added pairwise once per block. bf16 tiles keep the split
// above, which is two integer ops that also do the bf16 -> f32 conversion.

/// The f32 values of eight (even-k, odd-k) column pairs starting at `p`, in stored order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
unsafe fn pairs8<const DT: u8>(p: *const u8) -> __m512 {
    if DT == DT_F32 {
        _mm512_loadu_ps(p as *const f32)
    } else {
        debug_assert_eq!(DT, DT_F16);
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// Adds the interleaved pair sums of `lo` (columns 0-7) and `hi` (columns 8-15) to
/// `y[0..16]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
unsafe fn store_pairs(lo: __m512, hi: __m512, y: *mut f32) {
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let sums = _mm512_add_ps(
        _mm512_permutex2var_ps(lo, even, hi),
        _mm512_permutex2var_ps(lo, odd, hi),
    );
    _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), sums));
}

/// Dense f32 / f16 GEMV block: one row by `NV * 16` columns over `kpairs` K-pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
unsafe fn gemv_dense_pairs<const DT: u8, const NV: usize>(
    x: *const f32,
    w: *const u8,
    ws: usize,
    kpairs: usize,
    y: *mut f32,
) {
    let esz = if DT == DT_F32 { 4 } else { 2 };
    let mut lo = [_mm512_setzero_ps(); NV];
    let mut hi = [_mm512_setzero_ps(); NV];
    for kp in 0..kpairs {
        let wp = w.add(kp * ws);
        let xx = _mm512_castpd_ps(_mm512_set1_pd(
            (x.add(2 * kp) as *const f64).read_unaligned(),
        ));
        for v in 0..NV {
            let p = wp.add(v * LANES * 2 * esz);
            lo[v] = _mm512_fmadd_ps(pairs8::<DT>(p), xx, lo[v]);
            hi[v] = _mm512_fmadd_ps(pairs8::<DT>(p.add(LANES * esz)), xx, hi[v]);
        }
    }
    for v in 0..NV {
        store_pairs(lo[v], hi[v], y.add(v * LANES));
    }
}

macro_rules! dispatch_gemv {
    ($kern:ident, $dt:ident, $nv:expr, ($($a:expr),*)) => {
        match $nv {
            1 => $kern::<$dt, 1>($($a),*),
            2 => $kern::<$dt, 2>($($a),*),
            3 => $kern::<$dt, 3>($($a),*),
            4 => $kern::<$dt, 4>($($a),*),
            5 => $kern::<$dt, 5>($($a),*),
            6 => $kern::<$dt, 6>($($a),*),
            7 => $kern::<$dt, 7>($($a),*),
            8 => $kern::<$dt, 8>($($a),*),
            other => unreachable!("no avx512 GEMV kernel for {other} vectors"),
        }
    };
}

macro_rules! dispatch {
    ($kern:ident, $dt:ident, $mr:expr, $nv:expr, ($($a:expr),*)) => {
        match ($mr, $nv) {
            (1, 1) => $kern::<$dt, 1, 1>($($a),*),
            (1, 2) => $kern::<$dt, 1, 2>($($a),*),
            (1, 3) => $kern::<$dt, 1, 3>($($a),*),
            (1, 4) => $kern::<$dt, 1, 4>($($a),*),
            (1, 5) => $kern::<$dt, 1, 5>($($a),*),
            (1, 6) => $kern::<$dt, 1, 6>($($a),*),
            (1, 7) => $kern::<$dt, 1, 7>($($a),*),
            (1, 8) => $kern::<$dt, 1, 8>($($a),*),
            (2, 1) => $kern::<$dt, 2, 1>($($a),*),
            (2, 2) => $kern::<$dt, 2, 2>($($a),*),
            (3, 1) => $kern::<$dt, 3, 1>($($a),*),
            (3, 2) => $kern::<$dt, 3, 2>($($a),*),
            (4, 1) => $kern::<$dt, 4, 1>($($a),*),
            (4, 2) => $kern::<$dt, 4, 2>($($a),*),
            (5, 1) => $kern::<$dt, 5, 1>($($a),*),
            (5, 2) => $kern::<$dt, 5, 2>($($a),*),
            (6, 1) => $kern::<$dt, 6, 1>($($a),*),
            (6, 2) => $kern::<$dt, 6, 2>($($a),*),
            (7, 1) => $kern::<$dt, 7, 1>($($a),*),
            (7, 2) => $kern::<$dt, 7, 2>($($a),*),
            (8, 1) => $kern::<$dt, 8, 1>($($a),*),
            (8, 2) => $kern::<$dt, 8, 2>($($a),*),
            other => unreachable!("no avx512 block kernel for {other:?}"),
        }
    };
}

/// Runs the tile job over `nvec` full vectors of 16 columns starting at `job.col0`.
///
/// # Safety
/// The CPU must support the AVX-512 path and `job` must satisfy the [`TileJob`] contract for
/// `nvec * 16` columns.
pub(crate) unsafe fn run_tile(job: &TileJob, nvec: usize) {
    match job.dtype {
        DT_F32 => run::<DT_F32>(job, nvec),
        DT_BF16 => run::<DT_BF16>(job, nvec),
        _ => run::<DT_F16>(job, nvec),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
unsafe fn run<const DT: u8>(job: &TileJob, nvec: usize) {
    let esz = if DT == DT_F32 { 4 } else { 2 };
    // GEMV: one row, up to 128 columns at once (16 accumulators) so the tile streams
    // sequentially. GEMM: 8 rows by 32 columns, the weight block stays in L1 across rows.
    let (mr_max, nv_max) = if job.rows == 1 { (1, 8) } else { (8, 2) };
    let row_bytes = job.nw * 2 * esz;
    for_each_block(job, nvec, LANES, (mr_max, nv_max), |xo, y, col, mr, nv| {
        let x = job.x.add(xo);
        let w = job.vals.add(col * 2 * esz);
        if job.sparse {
            let meta = job.meta.add(col);
            dispatch!(
                sparse,
                DT,
                mr,
                nv,
                (
                    x,
                    job.xs,
                    w,
                    row_bytes,
                    meta,
                    job.nw,
                    job.kpad / 4,
                    y,
                    job.ys
                )
            );
        } else if mr == 1 && DT != DT_BF16 {
            dispatch_gemv!(gemv_dense_pairs, DT, nv, (x, w, row_bytes, job.kpad / 2, y));
        } else {
            dispatch!(
                dense,
                DT,
                mr,
                nv,
                (x, job.xs, w, row_bytes, job.kpad / 2, y, job.ys)
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// AVX512-BF16: bf16 tiles times bf16-rounded X with `vdpbf16ps`, which adds both products of a
// 32-bit lane's bf16 pair into that lane's f32 accumulator. The packed K-pair layout is the
// operand as is: one 64-byte load is 16 columns' (even-k, odd-k) pairs.
// Dense: the X pair (x[2kp], x[2kp + 1]) broadcast to every lane.
// 2:4: x[4g .. 4g + 4] (four bf16) broadcast to all eight 64-bit lanes, then `vpermw` picks
// x[4g + i0] into the low and x[4g + i1] into the high half of each lane; since the four
// values repeat every four words, the word indices need only their two low bits right, which
// are the metadata nibble's bits 1:0 (low word) and bits 3:2 moved to 17:16 (high word).

/// Bits of the 16 high words of a zmm.
const HIGH_WORDS: i32 = 0xFFFF_0000u32 as i32;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")]
unsafe fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are 512-bit plain vector types.
    core::mem::transmute::<__m512i, __m512bh>(v)
}

/// Dense bf16 block with bf16 X: `MR` rows by `NV * 16` columns over `kpairs` K-pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn dense_dot<const MR: usize, const NV: usize>(
    x: *const u16,
    xs: usize,
    w: *const u8,
    ws: usize,
    kpairs: usize,
    y: *mut f32,
    ys: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for kp in 0..kpairs {
        let wp = w.add(kp * ws);
        let mut wv = [_mm512_setzero_si512(); NV];
        for (v, wv) in wv.iter_mut().enumerate() {
            *wv = _mm512_loadu_si512(wp.add(v * 64) as *const _);
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let pair = (x.add(r * xs + 2 * kp) as *const i32).read_unaligned();
            let xp = bh(_mm512_set1_epi32(pair));
            for v in 0..NV {
                acc_r[v] = _mm512_dpbf16_ps(acc_r[v], bh(wv[v]), xp);
            }
        }
    }
    store_acc(&acc, y, ys);
}

/// 2:4 bf16 block with bf16 X: `MR` rows by `NV * 16` columns over `groups` groups.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn sparse_dot<const MR: usize, const NV: usize>(
    x: *const u16,
    xs: usize,
    vals: *const u8,
    vs: usize,
    meta: *const u32,
    ms: usize,
    groups: usize,
    y: *mut f32,
    ys: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    let mut mw = [_mm512_setzero_si512(); NV];
    let high = _mm512_set1_epi32(HIGH_WORDS);
    for g in 0..groups {
        if g % 8 == 0 {
            for (v, m) in mw.iter_mut().enumerate() {
                *m = _mm512_loadu_si512(meta.add((g / 8) * ms + v * LANES) as *const _);
            }
        }
        let vp = vals.add(g * vs);
        let mut wv = [_mm512_setzero_si512(); NV];
        let mut idx = [_mm512_setzero_si512(); NV];
        for v in 0..NV {
            wv[v] = _mm512_loadu_si512(vp.add(v * 64) as *const _);
            // Low word: the nibble as is; high word: the nibble shifted right by 2.
            // 0xD8 = (b & c) | (a & !c).
            let up = _mm512_slli_epi32::<14>(mw[v]);
            idx[v] = _mm512_ternarylogic_epi32::<0xD8>(mw[v], up, high);
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let quad = (x.add(r * xs + 4 * g) as *const i64).read_unaligned();
            let x4 = _mm512_set1_epi64(quad);
            for v in 0..NV {
                let xp = _mm512_permutexvar_epi16(idx[v], x4);
                acc_r[v] = _mm512_dpbf16_ps(acc_r[v], bh(wv[v]), bh(xp));
            }
        }
        for m in mw.iter_mut() {
            *m = _mm512_srli_epi32::<4>(*m);
        }
    }
    store_acc(&acc, y, ys);
}

macro_rules! dispatch_dot {
    ($kern:ident, $mr:expr, $nv:expr, ($($a:expr),*)) => {
        match ($mr, $nv) {
            (1, 1) => $kern::<1, 1>($($a),*),
            (1, 2) => $kern::<1, 2>($($a),*),
            (1, 3) => $kern::<1, 3>($($a),*),
            (1, 4) => $kern::<1, 4>($($a),*),
            (2, 1) => $kern::<2, 1>($($a),*),
            (2, 2) => $kern::<2, 2>($($a),*),
            (2, 3) => $kern::<2, 3>($($a),*),
            (2, 4) => $kern::<2, 4>($($a),*),
            (3, 1) => $kern::<3, 1>($($a),*),
            (3, 2) => $kern::<3, 2>($($a),*),
            (3, 3) => $kern::<3, 3>($($a),*),
            (3, 4) => $kern::<3, 4>($($a),*),
            (4, 1) => $kern::<4, 1>($($a),*),
            (4, 2) => $kern::<4, 2>($($a),*),
            (4, 3) => $kern::<4, 3>($($a),*),
            (4, 4) => $kern::<4, 4>($($a),*),
            (5, 1) => $kern::<5, 1>($($a),*),
            (5, 2) => $kern::<5, 2>($($a),*),
            (5, 3) => $kern::<5, 3>($($a),*),
            (5, 4) => $kern::<5, 4>($($a),*),
            (6, 1) => $kern::<6, 1>($($a),*),
            (6, 2) => $kern::<6, 2>($($a),*),
            (6, 3) => $kern::<6, 3>($($a),*),
            (6, 4) => $kern::<6, 4>($($a),*),
            other => unreachable!("no avx512-bf16 block kernel for {other:?}"),
        }
    };
}

/// Block shapes (rows, vectors of 16 columns) of the bf16-dot GEMM kernels, sized so the
/// accumulators and operands fit the 32 zmm registers.
const DOT_BLOCK_DENSE: (usize, usize) = (6, 4);
const DOT_BLOCK_SPARSE: (usize, usize) = (6, 3);

/// Runs a bf16 tile job with bf16 X (`job.xb`) over `nvec` full vectors of 16 columns.
///
/// # Safety
/// The CPU must support the AVX512-BF16 path, the tile dtype must be bf16, `job.xb` must be
/// non-null, and `job` must satisfy the [`TileJob`] contract for `nvec * 16` columns.
pub(crate) unsafe fn run_tile_bf16_dot(job: &TileJob, nvec: usize) {
    debug_assert_eq!(job.dtype, DT_BF16);
    run_dot(job, nvec)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")]
unsafe fn run_dot(job: &TileJob, nvec: usize) {
    let (mr_max, nv_max) = if job.sparse {
        DOT_BLOCK_SPARSE
    } else {
        DOT_BLOCK_DENSE
    };
    let row_bytes = job.nw * 4;
    for_each_block(job, nvec, LANES, (mr_max, nv_max), |xo, y, col, mr, nv| {
        let x = job.xb.add(xo);
        let w = job.vals.add(col * 4);
        if job.sparse {
            let meta = job.meta.add(col);
            dispatch_dot!(
                sparse_dot,
                mr,
                nv,
                (
                    x,
                    job.xs,
                    w,
                    row_bytes,
                    meta,
                    job.nw,
                    job.kpad / 4,
                    y,
                    job.ys
                )
            );
        } else {
            dispatch_dot!(
                dense_dot,
                mr,
                nv,
                (x, job.xs, w, row_bytes, job.kpad / 2, y, job.ys)
            );
        }
    });
}

/// `out[i]` = `x[i]` rounded to nearest-even bf16 (`vcvtneps2bf16`).
///
/// # Safety
/// The CPU must support AVX512-BF16; `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")]
pub(crate) unsafe fn round_to_bf16(x: &[f32], out: &mut [u16]) {
    debug_assert_eq!(x.len(), out.len());
    let full = x.len() / 16 * 16;
    for i in (0..full).step_by(16) {
        let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr().add(i)));
        _mm256_storeu_si256(
            out.as_mut_ptr().add(i) as *mut __m256i,
            core::mem::transmute::<__m256bh, __m256i>(v),
        );
    }
    for i in full..x.len() {
        out[i] = half::bf16::from_f32(x[i]).to_bits();
    }
}
