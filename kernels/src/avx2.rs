//! AVX2 + FMA + F16C tile kernels (8 output columns per `ymm`, f32 accumulators in column
//! layout): the same algorithm as [`crate::avx512`] on 256-bit vectors. `vpermilps` works
//! inside 128-bit lanes, so broadcasting `x[4g .. 4g + 4]` to both lanes and indexing with
//! the metadata word gives `x[4g + i0]` per column exactly as on AVX-512.

use core::arch::x86_64::*;

use crate::cpu::{for_each_block, TileJob, DT_BF16, DT_F16, DT_F32};

/// Output columns per vector.
pub(crate) const LANES: usize = 8;

/// Loads 8 column pairs starting at `p` and returns (even-k values, odd-k values) as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn split<const DT: u8>(p: *const u8) -> (__m256, __m256) {
    if DT == DT_BF16 {
        let v = _mm256_loadu_si256(p as *const __m256i);
        let e = _mm256_slli_epi32::<16>(v);
        let o = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000u32 as i32));
        (_mm256_castsi256_ps(e), _mm256_castsi256_ps(o))
    } else {
        let (a, b) = if DT == DT_F32 {
            let q = p as *const f32;
            (_mm256_loadu_ps(q), _mm256_loadu_ps(q.add(8)))
        } else {
            debug_assert_eq!(DT, DT_F16);
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
            )
        };
        // shuffle gives [e0 e1 e4 e5 | e2 e3 e6 e7]; the 64-bit permute restores the order.
        let even = _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(
            _mm256_shuffle_ps::<0x88>(a, b),
        )));
        let odd = _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(
            _mm256_shuffle_ps::<0xDD>(a, b),
        )));
        (even, odd)
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_acc<const MR: usize, const NV: usize>(
    acc: &[[__m256; NV]; MR],
    y: *mut f32,
    ys: usize,
) {
    for (r, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            add_into(y.add(r * ys + v * LANES), *a);
        }
    }
}

/// Dense block: `MR` rows by `NV * 16` columns over `kpairs` K-pairs.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    for kp in 0..kpairs {
        let wp = w.add(kp * ws);
        let mut e = [_mm256_setzero_ps(); NV];
        let mut o = [_mm256_setzero_ps(); NV];
        for v in 0..NV {
            (e[v], o[v]) = split::<DT>(wp.add(v * LANES * 2 * esz));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let xr = x.add(r * xs + 2 * kp);
            let x0 = _mm256_set1_ps(*xr);
            let x1 = _mm256_set1_ps(*xr.add(1));
            for v in 0..NV {
                acc_r[v] = _mm256_fmadd_ps(e[v], x0, acc_r[v]);
                acc_r[v] = _mm256_fmadd_ps(o[v], x1, acc_r[v]);
            }
        }
    }
    store_acc(&acc, y, ys);
}

/// 2:4 block: `MR` rows by `NV * 16` columns over `groups` groups of four K rows.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    let mut mw = [_mm256_setzero_si256(); NV];
    for g in 0..groups {
        if g % 8 == 0 {
            for (v, m) in mw.iter_mut().enumerate() {
                *m = _mm256_loadu_si256(meta.add((g / 8) * ms + v * LANES) as *const __m256i);
            }
        }
        let vp = vals.add(g * vs);
        let mut e = [_mm256_setzero_ps(); NV];
        let mut o = [_mm256_setzero_ps(); NV];
        let mut s1 = [_mm256_setzero_si256(); NV];
        for v in 0..NV {
            (e[v], o[v]) = split::<DT>(vp.add(v * LANES * 2 * esz));
            s1[v] = _mm256_srli_epi32::<2>(mw[v]);
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            // x[4g .. 4g + 4] in every 128-bit lane; vpermilps uses bits 1:0 of each index.
            let x4h = _mm_loadu_ps(x.add(r * xs + 4 * g));
            let x4 = _mm256_set_m128(x4h, x4h);
            for v in 0..NV {
                let xa = _mm256_permutevar_ps(x4, mw[v]);
                let xb = _mm256_permutevar_ps(x4, s1[v]);
                acc_r[v] = _mm256_fmadd_ps(e[v], xa, acc_r[v]);
                acc_r[v] = _mm256_fmadd_ps(o[v], xb, acc_r[v]);
            }
        }
        for m in mw.iter_mut() {
            *m = _mm256_srli_epi32::<4>(*m);
        }
    }
    store_acc(&acc, y, ys);
}

// ---------------------------------------------------------------------------------------------
// GEMV (one row of X). Sixteen ymm registers cannot hold accumulators for a whole tile row,
// and a pass over a part of each row reads the tile with a stride the prefetchers handle
// worse than one sequential stream. So the accumulators of up to [`GEMV_CHUNK`] vectors of
// columns live in an L1-resident array, each K step updates every one of them (two K-pairs
// per load and store of an accumulator), and the tile streams front to back.
// f32 / f16 tiles are not split into even-k and odd-k vectors (two shuffles per vector):
// an (even, odd) pair of a column is multiplied by the broadcast pair (x[2kp], x[2kp + 1]) as
// stored, so the lanes of an accumulator hold interleaved partial sums of four columns that
// are added pairwise once, at the end.

/// Vectors of 8 columns whose accumulators one GEMV pass keeps.
const GEMV_CHUNK: usize = 16;

/// The f32 values of four (even-k, odd-k) column pairs starting at `p`, in stored order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pairs4<const DT: u8>(p: *const u8) -> __m256 {
    if DT == DT_F32 {
        _mm256_loadu_ps(p as *const f32)
    } else {
        debug_assert_eq!(DT, DT_F16);
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// `(p[0], p[1])` in every 64-bit lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn broadcast_pair(p: *const f32) -> __m256 {
    _mm256_castpd_ps(_mm256_set1_pd((p as *const f64).read_unaligned()))
}

/// Adds the interleaved pair sums of `lo` (columns 0-3) and `hi` (columns 4-7) to `y[0..8]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_pairs(lo: __m256, hi: __m256, y: *mut f32) {
    // hadd gives [c0 c1 c4 c5 | c2 c3 c6 c7]; the 64-bit permute restores the order.
    let sums = _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(
        _mm256_hadd_ps(lo, hi),
    )));
    add_into(y, sums);
}

/// `y[0..8] += a`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_into(y: *mut f32, a: __m256) {
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), a));
}

/// K-pairs of one dense GEMV block: a column group's accumulators stay in registers over
/// the block and go through the L1 array once per block.
const GEMV_KBLOCK: usize = 8;

/// Dense GEMV over `nvec` vectors of 8 columns: `w` at the first column of K-pair 0, rows of
/// `ws` bytes, `y` at the first output. The tile is read in blocks of [`GEMV_KBLOCK`] K-pairs
/// (a few KB, front to back), each block column group by column group.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_dense<const DT: u8>(
    x: *const f32,
    w: *const u8,
    ws: usize,
    kpairs: usize,
    nvec: usize,
    y: *mut f32,
) {
    let esz = if DT == DT_F32 { 4 } else { 2 };
    let vbytes = LANES * 2 * esz;
    let mut v0 = 0;
    while v0 < nvec {
        let nv = (nvec - v0).min(GEMV_CHUNK);
        let wc = w.add(v0 * vbytes);
        let yc = y.add(v0 * LANES);
        // bf16: one accumulator per vector of 8 columns (even and odd k split);
        // f32 / f16: two (interleaved pairs of 4 columns each).
        let per_vec = if DT == DT_BF16 { 1 } else { 2 };
        let mut acc = [_mm256_setzero_ps(); 2 * GEMV_CHUNK];
        let naccs = per_vec * nv;
        for k0 in (0..kpairs).step_by(GEMV_KBLOCK) {
            let k1 = (k0 + GEMV_KBLOCK).min(kpairs);
            let mut a0 = 0;
            while a0 < naccs {
                let na = (naccs - a0).min(4);
                let mut r = [_mm256_setzero_ps(); 4];
                r[..na].copy_from_slice(&acc[a0..a0 + na]);
                for kp in k0..k1 {
                    let row = wc.add(kp * ws);
                    // Ask for this column group's lines of the next block now.
                    let ahead = row.add(GEMV_KBLOCK * ws + a0 * vbytes / per_vec);
                    let bytes = na * vbytes / per_vec;
                    for line in (0..bytes).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(line) as *const i8);
                    }
                    if DT == DT_BF16 {
                        let (x0, x1) = (
                            _mm256_set1_ps(*x.add(2 * kp)),
                            _mm256_set1_ps(*x.add(2 * kp + 1)),
                        );
                        for (i, a) in r.iter_mut().enumerate().take(na) {
                            let (e, o) = split::<DT>(row.add((a0 + i) * vbytes));
                            *a = _mm256_fmadd_ps(o, x1, _mm256_fmadd_ps(e, x0, *a));
                        }
                    } else {
                        let xp = broadcast_pair(x.add(2 * kp));
                        for (i, a) in r.iter_mut().enumerate().take(na) {
                            *a = _mm256_fmadd_ps(
                                pairs4::<DT>(row.add((a0 + i) * vbytes / 2)),
                                xp,
                                *a,
                            );
                        }
                    }
                }
                acc[a0..a0 + na].copy_from_slice(&r[..na]);
                a0 += na;
            }
        }
        for v in 0..nv {
            let p = yc.add(v * LANES);
            if DT == DT_BF16 {
                add_into(p, acc[v]);
            } else {
                store_pairs(acc[2 * v], acc[2 * v + 1], p);
            }
        }
        v0 += nv;
    }
}

/// 2:4 GEMV over `nvec` vectors of 8 columns (arguments as [`sparse`], one row).
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_sparse<const DT: u8>(
    x: *const f32,
    vals: *const u8,
    vs: usize,
    meta: *const u32,
    ms: usize,
    groups: usize,
    nvec: usize,
    y: *mut f32,
) {
    let esz = if DT == DT_F32 { 4 } else { 2 };
    let vbytes = LANES * 2 * esz;
    let mut v0 = 0;
    while v0 < nvec {
        let nv = (nvec - v0).min(GEMV_CHUNK);
        let (vc, mc, yc) = (
            vals.add(v0 * vbytes),
            meta.add(v0 * LANES),
            y.add(v0 * LANES),
        );
        let mut acc = [_mm256_setzero_ps(); GEMV_CHUNK];
        for g in 0..groups {
            let x4h = _mm_loadu_ps(x.add(4 * g));
            let x4 = _mm256_set_m128(x4h, x4h);
            // Group g's nibble is at bits 4(g % 8) of word g / 8.
            let shift = _mm_cvtsi32_si128(4 * (g % 8) as i32);
            let (vp, mp) = (vc.add(g * vs), mc.add((g / 8) * ms));
            for (v, a) in acc.iter_mut().enumerate().take(nv) {
                let m0 = _mm256_srl_epi32(
                    _mm256_loadu_si256(mp.add(v * LANES) as *const __m256i),
                    shift,
                );
                let m1 = _mm256_srli_epi32::<2>(m0);
                let (e, o) = split::<DT>(vp.add(v * vbytes));
                let t = _mm256_fmadd_ps(e, _mm256_permutevar_ps(x4, m0), *a);
                *a = _mm256_fmadd_ps(o, _mm256_permutevar_ps(x4, m1), t);
            }
        }
        for (v, a) in acc.iter().enumerate().take(nv) {
            add_into(yc.add(v * LANES), *a);
        }
        v0 += nv;
    }
}

macro_rules! dispatch {
    ($kern:ident, $dt:ident, $mr:expr, $nv:expr, ($($a:expr),*)) => {
        match ($mr, $nv) {
            (1, 1) => $kern::<$dt, 1, 1>($($a),*),
            (1, 2) => $kern::<$dt, 1, 2>($($a),*),
            (2, 1) => $kern::<$dt, 2, 1>($($a),*),
            (2, 2) => $kern::<$dt, 2, 2>($($a),*),
            (3, 1) => $kern::<$dt, 3, 1>($($a),*),
            (3, 2) => $kern::<$dt, 3, 2>($($a),*),
            (4, 1) => $kern::<$dt, 4, 1>($($a),*),
            (4, 2) => $kern::<$dt, 4, 2>($($a),*),
            other => unreachable!("no avx2 block kernel for {other:?}"),
        }
    };
}

/// Runs the tile job over `nvec` full vectors of 8 columns starting at `job.col0`.
///
/// # Safety
/// The CPU must support the AVX2 path and `job` must satisfy the [`TileJob`] contract for
/// `nvec * 8` columns.
pub(crate) unsafe fn run_tile(job: &TileJob, nvec: usize) {
    match job.dtype {
        DT_F32 => run::<DT_F32>(job, nvec),
        DT_BF16 => run::<DT_BF16>(job, nvec),
        _ => run::<DT_F16>(job, nvec),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run<const DT: u8>(job: &TileJob, nvec: usize) {
    let esz = if DT == DT_F32 { 4 } else { 2 };
    // GEMV: whole tile rows (`gemv_dense` / `gemv_sparse`). GEMM: 16 ymm registers hold
    // 4 rows x 16 (dense) or 8 (2:4) columns.
    let (mr_max, nv_max) = if job.sparse { (4, 1) } else { (4, 2) };
    let row_bytes = job.nw * 2 * esz;
    if job.rows == 1 {
        let w = job.vals.add(job.col0 * 2 * esz);
        if job.sparse {
            let meta = job.meta.add(job.col0);
            gemv_sparse::<DT>(job.x, w, row_bytes, meta, job.nw, job.kpad / 4, nvec, job.y);
        } else {
            gemv_dense::<DT>(job.x, w, row_bytes, job.kpad / 2, nvec, job.y);
        }
        return;
    }
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
