//! The hybrid tile microkernels, written once over [`TileSimd`] and instantiated per vector
//! width: [`Avx2`] (8 output columns per `ymm`) and [`Avx512`] (16 per `zmm`). Accumulators
//! are f32 in column layout: one vector holds `LANES` consecutive output columns.
//!
//! What the kernels read is the packed format as stored ([`crate::format`]): a dense tile row
//! holds, per column, the (even-k, odd-k) pair of one K-pair; a 2:4 tile row holds, per
//! column, the two kept values of a group of four K rows, and one metadata word per column
//! holds eight groups' nibbles (bits 1:0 index the first kept row, bits 3:2 the second).
//!
//! * Dense block, bf16 ([`dense`]): per K-pair, one load of `LANES` column pairs split into
//!   even-k and odd-k vectors (two integer ops, which are also the bf16 -> f32 conversion),
//!   two FMAs per row with broadcast activations.
//! * Dense block, f32 / f16 ([`dense_pairs`], GEMV and GEMM): a column's stored (even-k,
//!   odd-k) pair times the broadcast pair `(x[2kp], x[2kp + 1])` as stored, so no even/odd
//!   split runs per K-pair: the lanes of an accumulator hold interleaved partial sums of
//!   `LANES / 2` columns, added pairwise once at the end ([`TileSimd::add_pair_sums`]).
//! * 2:4 block ([`sparse`]): per group, one load of `LANES` kept-value pairs and, every eight
//!   groups, `LANES` metadata words; [`TileSimd::select`] (`vpermilps`, which works inside
//!   128-bit lanes) picks `x[4g + i0]` and `x[4g + i1]` per column from the low two bits of
//!   the word shifted by `4q` and `4q + 2`.
//! * GEMV (one row of X): one of two strategies per job ([`crate::GemvPolicy`], chosen per
//!   CPU vendor, path and tile kind by the driver and handed over in `TileJob::streamed`).
//!   In registers, the accumulators of up to [`GEMV_REGISTER_VECTORS`]
//!   vectors stay in registers over the whole tile ([`dense_pairs`] for f32 / f16, the
//!   blocks above with one row for bf16 and 2:4), and the tile is read in strips that many
//!   vectors wide. Streamed, the accumulators of up to [`GEMV_CHUNK`] vectors live in an
//!   L1-resident array and the tile is read front to back, with the next lines prefetched
//!   ([`gemv_dense_streamed`], [`gemv_sparse_streamed`]): on Intel the faster one for narrow
//!   (bf16 / f16) dense tiles, on AMD (two cycles per 512-bit store) the slower one on
//!   AVX-512.
//!
//! The scalar twin of every kernel here is [`crate::scalar::tile`]; the property tests in
//! `kernels/tests/kernels.rs` run each width against it on random ragged shapes.
//!
//! # Safety
//! Every function is `unsafe`: it uses instructions of its width (call it only on a path
//! [`crate::SimdPath::is_supported`] accepted) and raw pointers that must satisfy the
//! [`TileJob`] contract.

use core::arch::x86_64::*;

use crate::cpu::{for_each_block, TileJob, DT_BF16, DT_F16, DT_F32};
use crate::simd::{Avx2, Avx512, F32Simd};

/// Bytes of one stored weight value of dtype `DT`.
#[inline(always)]
const fn elem_size(dt: u8) -> usize {
    if dt == DT_F32 {
        4
    } else {
        2
    }
}

/// Vectors of columns a one-row pass with its accumulators in registers covers (16
/// accumulators on f32 / f16).
pub(crate) const GEMV_REGISTER_VECTORS: usize = 8;
/// Vectors of columns whose accumulators one streamed one-row pass keeps.
const GEMV_CHUNK: usize = 16;
/// K-pairs of one streamed dense block: a column group's accumulators stay in registers over
/// the block and go through the L1 array once per block.
const GEMV_KBLOCK: usize = 8;

/// A vector width the tile kernels run on: the operations their bodies need beyond
/// [`F32Simd`], the shapes that fit its registers, and its entry points (the functions that
/// carry its `#[target_feature]`s; each forwards to the one generic body).
pub(crate) trait TileSimd: F32Simd {
    /// 32-bit integer vectors of `LANES` lanes (metadata words).
    type I: Copy;
    /// GEMM register blocks (rows, vectors of columns): [`dense`] (bf16), [`dense_pairs`]
    /// (f32 / f16) and [`sparse`].
    const GEMM_BLOCK_DENSE: (usize, usize);
    const GEMM_BLOCK_PAIRS: (usize, usize);
    const GEMM_BLOCK_SPARSE: (usize, usize);

    /// Loads `LANES` column pairs at `p` and returns (even-k values, odd-k values) as f32.
    unsafe fn split<const DT: u8>(p: *const u8) -> (Self::V, Self::V);
    /// The `LANES` values (`LANES / 2` column pairs) at `p` as f32, in stored order (f32 and
    /// f16 only).
    unsafe fn pairs<const DT: u8>(p: *const u8) -> Self::V;
    /// `(p[0], p[1])` in every 64-bit lane.
    unsafe fn broadcast_pair(p: *const f32) -> Self::V;
    /// `p[0..4]` in every 128-bit lane.
    unsafe fn broadcast_quad(p: *const f32) -> Self::V;
    /// Lane `i` gets lane `idx[i] & 3` of its own 128-bit quarter of `quad` (`vpermilps`).
    unsafe fn select(quad: Self::V, idx: Self::I) -> Self::V;
    /// Loads `LANES` metadata words.
    unsafe fn load_meta(p: *const u32) -> Self::I;
    unsafe fn zero_i() -> Self::I;
    /// Every lane shifted right by `n` bits.
    unsafe fn shr(i: Self::I, n: u32) -> Self::I;
    /// Adds the pairwise sums of `lo` (columns `0 .. LANES / 2`, interleaved) and `hi`
    /// (columns `LANES / 2 .. LANES`) to `y[0 .. LANES]`.
    unsafe fn add_pair_sums(lo: Self::V, hi: Self::V, y: *mut f32);

    /// Runs `job` over `nvec` full vectors of columns starting at `job.col0` (entry point).
    unsafe fn run_tile(job: &TileJob, nvec: usize);
    /// [`dense`] with this width's target features.
    #[allow(clippy::too_many_arguments)]
    unsafe fn dense_block<const DT: u8, const MR: usize, const NV: usize>(
        x: *const f32,
        xs: usize,
        w: *const u8,
        ws: usize,
        kpairs: usize,
        y: *mut f32,
        ys: usize,
    );
    /// [`sparse`] with this width's target features.
    #[allow(clippy::too_many_arguments)]
    unsafe fn sparse_block<const DT: u8, const MR: usize, const NV: usize>(
        x: *const f32,
        xs: usize,
        vals: *const u8,
        vs: usize,
        meta: *const u32,
        ms: usize,
        groups: usize,
        y: *mut f32,
        ys: usize,
    );
    /// [`dense_pairs`] with this width's target features.
    unsafe fn pairs_block<const DT: u8, const MR: usize, const NV: usize>(
        x: *const f32,
        xs: usize,
        w: *const u8,
        ws: usize,
        kpairs: usize,
        y: *mut f32,
        ys: usize,
    );
    /// [`gemv_dense_streamed`] with this width's target features.
    unsafe fn gemv_dense_stream<const DT: u8>(
        x: *const f32,
        w: *const u8,
        ws: usize,
        kpairs: usize,
        nvec: usize,
        y: *mut f32,
    );
    /// [`gemv_sparse_streamed`] with this width's target features.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemv_sparse_stream<const DT: u8>(
        x: *const f32,
        vals: *const u8,
        vs: usize,
        meta: *const u32,
        ms: usize,
        groups: usize,
        nvec: usize,
        y: *mut f32,
    );
}

/// The entry points of a [`TileSimd`] impl: each carries the width's target features and
/// forwards to the generic body, which inlines into it.
macro_rules! entry_points {
    ($features:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn run_tile(job: &TileJob, nvec: usize) {
            match job.dtype {
                DT_F32 => run::<Self, DT_F32>(job, nvec),
                DT_BF16 => run::<Self, DT_BF16>(job, nvec),
                _ => run::<Self, DT_F16>(job, nvec),
            }
        }
        #[target_feature(enable = $features)]
        unsafe fn dense_block<const DT: u8, const MR: usize, const NV: usize>(
            x: *const f32,
            xs: usize,
            w: *const u8,
            ws: usize,
            kpairs: usize,
            y: *mut f32,
            ys: usize,
        ) {
            dense::<Self, DT, MR, NV>(x, xs, w, ws, kpairs, y, ys)
        }
        #[target_feature(enable = $features)]
        unsafe fn sparse_block<const DT: u8, const MR: usize, const NV: usize>(
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
            sparse::<Self, DT, MR, NV>(x, xs, vals, vs, meta, ms, groups, y, ys)
        }
        #[target_feature(enable = $features)]
        unsafe fn pairs_block<const DT: u8, const MR: usize, const NV: usize>(
            x: *const f32,
            xs: usize,
            w: *const u8,
            ws: usize,
            kpairs: usize,
            y: *mut f32,
            ys: usize,
        ) {
            dense_pairs::<Self, DT, MR, NV>(x, xs, w, ws, kpairs, y, ys)
        }
        #[target_feature(enable = $features)]
        unsafe fn gemv_dense_stream<const DT: u8>(
            x: *const f32,
            w: *const u8,
            ws: usize,
            kpairs: usize,
            nvec: usize,
            y: *mut f32,
        ) {
            gemv_dense_streamed::<Self, DT>(x, w, ws, kpairs, nvec, y)
        }
        #[target_feature(enable = $features)]
        unsafe fn gemv_sparse_stream<const DT: u8>(
            x: *const f32,
            vals: *const u8,
            vs: usize,
            meta: *const u32,
            ms: usize,
            groups: usize,
            nvec: usize,
            y: *mut f32,
        ) {
            gemv_sparse_streamed::<Self, DT>(x, vals, vs, meta, ms, groups, nvec, y)
        }
    };
}

// ---------------------------------------------------------------------------------------------
// The kernels, once for every width.

/// `y[r, v * LANES ..] += acc[r][v]` for a block of rows of stride `ys`.
#[inline(always)]
pub(crate) unsafe fn store_acc<S: F32Simd, const MR: usize, const NV: usize>(
    acc: &[[S::V; NV]; MR],
    y: *mut f32,
    ys: usize,
) {
    for (r, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            let p = y.add(r * ys + v * S::LANES);
            S::store(p, S::add(S::load(p), *a));
        }
    }
}

/// Dense block: `MR` rows by `NV * LANES` columns over `kpairs` K-pairs; `w` at the block's
/// first column of K-pair 0, tile rows of `ws` bytes.
#[inline(always)]
unsafe fn dense<S: TileSimd, const DT: u8, const MR: usize, const NV: usize>(
    x: *const f32,
    xs: usize,
    w: *const u8,
    ws: usize,
    kpairs: usize,
    y: *mut f32,
    ys: usize,
) {
    let vbytes = S::LANES * 2 * elem_size(DT);
    let mut acc = [[S::zero(); NV]; MR];
    for kp in 0..kpairs {
        let wp = w.add(kp * ws);
        let mut e = [S::zero(); NV];
        let mut o = [S::zero(); NV];
        for v in 0..NV {
            (e[v], o[v]) = S::split::<DT>(wp.add(v * vbytes));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let xr = x.add(r * xs + 2 * kp);
            let (x0, x1) = (S::splat(*xr), S::splat(*xr.add(1)));
            for v in 0..NV {
                acc_r[v] = S::mul_add(e[v], x0, acc_r[v]);
                acc_r[v] = S::mul_add(o[v], x1, acc_r[v]);
            }
        }
    }
    store_acc::<S, MR, NV>(&acc, y, ys);
}

/// 2:4 block: `MR` rows by `NV * LANES` columns over `groups` groups of four K rows; `vals`
/// rows of `vs` bytes, `meta` rows of `ms` words.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn sparse<S: TileSimd, const DT: u8, const MR: usize, const NV: usize>(
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
    let vbytes = S::LANES * 2 * elem_size(DT);
    let mut acc = [[S::zero(); NV]; MR];
    let mut mw = [S::zero_i(); NV];
    for g in 0..groups {
        if g % 8 == 0 {
            for (v, m) in mw.iter_mut().enumerate() {
                *m = S::load_meta(meta.add((g / 8) * ms + v * S::LANES));
            }
        }
        let vp = vals.add(g * vs);
        let mut e = [S::zero(); NV];
        let mut o = [S::zero(); NV];
        let mut second = [S::zero_i(); NV];
        for v in 0..NV {
            (e[v], o[v]) = S::split::<DT>(vp.add(v * vbytes));
            second[v] = S::shr(mw[v], 2);
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let quad = S::broadcast_quad(x.add(r * xs + 4 * g));
            for v in 0..NV {
                acc_r[v] = S::mul_add(e[v], S::select(quad, mw[v]), acc_r[v]);
                acc_r[v] = S::mul_add(o[v], S::select(quad, second[v]), acc_r[v]);
            }
        }
        for m in mw.iter_mut() {
            *m = S::shr(*m, 4);
        }
    }
    store_acc::<S, MR, NV>(&acc, y, ys);
}

/// Dense f32 / f16 block without the even/odd split: `MR` rows by `NV * LANES` columns over
/// `kpairs` K-pairs, each stored (even-k, odd-k) pair times the broadcast X pair, the pairs of
/// each accumulator summed once at the end (two accumulators per vector of columns).
#[inline(always)]
unsafe fn dense_pairs<S: TileSimd, const DT: u8, const MR: usize, const NV: usize>(
    x: *const f32,
    xs: usize,
    w: *const u8,
    ws: usize,
    kpairs: usize,
    y: *mut f32,
    ys: usize,
) {
    let half = S::LANES * elem_size(DT);
    let mut lo = [[S::zero(); NV]; MR];
    let mut hi = [[S::zero(); NV]; MR];
    for kp in 0..kpairs {
        let wp = w.add(kp * ws);
        let mut wl = [S::zero(); NV];
        let mut wh = [S::zero(); NV];
        for v in 0..NV {
            let p = wp.add(v * 2 * half);
            (wl[v], wh[v]) = (S::pairs::<DT>(p), S::pairs::<DT>(p.add(half)));
        }
        for r in 0..MR {
            let xx = S::broadcast_pair(x.add(r * xs + 2 * kp));
            for v in 0..NV {
                lo[r][v] = S::mul_add(wl[v], xx, lo[r][v]);
                hi[r][v] = S::mul_add(wh[v], xx, hi[r][v]);
            }
        }
    }
    for r in 0..MR {
        for v in 0..NV {
            S::add_pair_sums(lo[r][v], hi[r][v], y.add(r * ys + v * S::LANES));
        }
    }
}

/// Dense GEMV over `nvec` vectors of columns with the accumulators in L1: `w` at the first
/// column of K-pair 0, rows of `ws` bytes, `y` at the first output. The tile is read in
/// blocks of [`GEMV_KBLOCK`] K-pairs (a few KB, front to back), each block column group by
/// column group, the next block's lines requested while this one is multiplied.
#[inline(always)]
unsafe fn gemv_dense_streamed<S: TileSimd, const DT: u8>(
    x: *const f32,
    w: *const u8,
    ws: usize,
    kpairs: usize,
    nvec: usize,
    y: *mut f32,
) {
    let vbytes = S::LANES * 2 * elem_size(DT);
    // bf16: one accumulator per vector of columns (even and odd k split); f32 / f16: two
    // (interleaved pairs of LANES / 2 columns each).
    let per_vec = if DT == DT_BF16 { 1 } else { 2 };
    let abytes = vbytes / per_vec;
    let mut v0 = 0;
    while v0 < nvec {
        let nv = (nvec - v0).min(GEMV_CHUNK);
        let wc = w.add(v0 * vbytes);
        let yc = y.add(v0 * S::LANES);
        let mut acc = [S::zero(); 2 * GEMV_CHUNK];
        let naccs = per_vec * nv;
        for k0 in (0..kpairs).step_by(GEMV_KBLOCK) {
            let k1 = (k0 + GEMV_KBLOCK).min(kpairs);
            let mut a0 = 0;
            while a0 < naccs {
                let na = (naccs - a0).min(4);
                let mut r = [S::zero(); 4];
                r[..na].copy_from_slice(&acc[a0..a0 + na]);
                for kp in k0..k1 {
                    let row = wc.add(kp * ws);
                    let ahead = row.add(GEMV_KBLOCK * ws + a0 * abytes);
                    for line in (0..na * abytes).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(line) as *const i8);
                    }
                    if DT == DT_BF16 {
                        let (x0, x1) = (S::splat(*x.add(2 * kp)), S::splat(*x.add(2 * kp + 1)));
                        for (i, a) in r.iter_mut().enumerate().take(na) {
                            let (e, o) = S::split::<DT>(row.add((a0 + i) * abytes));
                            *a = S::mul_add(o, x1, S::mul_add(e, x0, *a));
                        }
                    } else {
                        let xp = S::broadcast_pair(x.add(2 * kp));
                        for (i, a) in r.iter_mut().enumerate().take(na) {
                            *a = S::mul_add(S::pairs::<DT>(row.add((a0 + i) * abytes)), xp, *a);
                        }
                    }
                }
                acc[a0..a0 + na].copy_from_slice(&r[..na]);
                a0 += na;
            }
        }
        for v in 0..nv {
            let p = yc.add(v * S::LANES);
            if DT == DT_BF16 {
                S::store(p, S::add(S::load(p), acc[v]));
            } else {
                S::add_pair_sums(acc[2 * v], acc[2 * v + 1], p);
            }
        }
        v0 += nv;
    }
}

/// 2:4 GEMV over `nvec` vectors of columns with the accumulators in L1 (arguments as
/// [`sparse`], one row), the tile read group by group.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_sparse_streamed<S: TileSimd, const DT: u8>(
    x: *const f32,
    vals: *const u8,
    vs: usize,
    meta: *const u32,
    ms: usize,
    groups: usize,
    nvec: usize,
    y: *mut f32,
) {
    let vbytes = S::LANES * 2 * elem_size(DT);
    let mut v0 = 0;
    while v0 < nvec {
        let nv = (nvec - v0).min(GEMV_CHUNK);
        let (vc, mc, yc) = (
            vals.add(v0 * vbytes),
            meta.add(v0 * S::LANES),
            y.add(v0 * S::LANES),
        );
        let mut acc = [S::zero(); GEMV_CHUNK];
        for g in 0..groups {
            let quad = S::broadcast_quad(x.add(4 * g));
            // Group g's nibble is at bits 4(g % 8) of word g / 8.
            let shift = 4 * (g % 8) as u32;
            let (vp, mp) = (vc.add(g * vs), mc.add((g / 8) * ms));
            for (v, a) in acc.iter_mut().enumerate().take(nv) {
                let m0 = S::shr(S::load_meta(mp.add(v * S::LANES)), shift);
                let m1 = S::shr(m0, 2);
                let (e, o) = S::split::<DT>(vp.add(v * vbytes));
                let t = S::mul_add(e, S::select(quad, m0), *a);
                *a = S::mul_add(o, S::select(quad, m1), t);
            }
        }
        for (v, a) in acc.iter().enumerate().take(nv) {
            let p = yc.add(v * S::LANES);
            S::store(p, S::add(S::load(p), *a));
        }
        v0 += nv;
    }
}

macro_rules! dispatch_block {
    ($s:ty, $kern:ident, $dt:ident, $mr:expr, $nv:expr, ($($a:expr),*)) => {
        match ($mr, $nv) {
            (1, 1) => <$s>::$kern::<$dt, 1, 1>($($a),*),
            (1, 2) => <$s>::$kern::<$dt, 1, 2>($($a),*),
            (1, 3) => <$s>::$kern::<$dt, 1, 3>($($a),*),
            (1, 4) => <$s>::$kern::<$dt, 1, 4>($($a),*),
            (1, 5) => <$s>::$kern::<$dt, 1, 5>($($a),*),
            (1, 6) => <$s>::$kern::<$dt, 1, 6>($($a),*),
            (1, 7) => <$s>::$kern::<$dt, 1, 7>($($a),*),
            (1, 8) => <$s>::$kern::<$dt, 1, 8>($($a),*),
            (2, 1) => <$s>::$kern::<$dt, 2, 1>($($a),*),
            (2, 2) => <$s>::$kern::<$dt, 2, 2>($($a),*),
            (3, 1) => <$s>::$kern::<$dt, 3, 1>($($a),*),
            (3, 2) => <$s>::$kern::<$dt, 3, 2>($($a),*),
            (4, 1) => <$s>::$kern::<$dt, 4, 1>($($a),*),
            (4, 2) => <$s>::$kern::<$dt, 4, 2>($($a),*),
            (5, 1) => <$s>::$kern::<$dt, 5, 1>($($a),*),
            (5, 2) => <$s>::$kern::<$dt, 5, 2>($($a),*),
            (6, 1) => <$s>::$kern::<$dt, 6, 1>($($a),*),
            (6, 2) => <$s>::$kern::<$dt, 6, 2>($($a),*),
            (7, 1) => <$s>::$kern::<$dt, 7, 1>($($a),*),
            (7, 2) => <$s>::$kern::<$dt, 7, 2>($($a),*),
            (8, 1) => <$s>::$kern::<$dt, 8, 1>($($a),*),
            (8, 2) => <$s>::$kern::<$dt, 8, 2>($($a),*),
            other => unreachable!("no tile block kernel for {other:?}"),
        }
    };
}

/// Runs `job` over `nvec` full vectors of `S::LANES` columns starting at `job.col0`.
#[inline(always)]
unsafe fn run<S: TileSimd, const DT: u8>(job: &TileJob, nvec: usize) {
    let esz = elem_size(DT);
    let row_bytes = job.nw * 2 * esz;
    // A one-row dense f32 job on 8 lanes reads its tile in strips of 32 of its 128 columns
    // (256 of every 1024 bytes, four rows per 4 KB page), which the hardware prefetchers follow
    // poorly: the job's whole column range is requested into L2 first. Zen 4 with
    // `PATCH_KERNEL_PATH=avx2`: dense f32 decode 30 -> 35 tokens/s (medians of 4 alternations);
    // on bf16 and f16 tiles the same was 5-8% slower, so they do not do it.
    if job.rows == 1 && !job.sparse && !job.streamed && DT == DT_F32 && S::LANES == 8 {
        let w = job.vals.add(job.col0 * 2 * esz);
        let bytes = nvec * S::LANES * 2 * esz;
        for kp in 0..job.kpad / 2 {
            let row = w.add(kp * row_bytes);
            for line in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(row.add(line) as *const i8);
            }
        }
    }
    if job.streamed {
        let w = job.vals.add(job.col0 * 2 * esz);
        if job.sparse {
            let meta = job.meta.add(job.col0);
            S::gemv_sparse_stream::<DT>(
                job.x,
                w,
                row_bytes,
                meta,
                job.nw,
                job.kpad / 4,
                nvec,
                job.y,
            );
        } else {
            S::gemv_dense_stream::<DT>(job.x, w, row_bytes, job.kpad / 2, nvec, job.y);
        }
        return;
    }
    // f32 / f16 dense tiles multiply stored pairs (no split).
    let pairs = !job.sparse && DT != DT_BF16;
    let block = if job.rows == 1 {
        (1, GEMV_REGISTER_VECTORS)
    } else if job.sparse {
        S::GEMM_BLOCK_SPARSE
    } else if pairs {
        S::GEMM_BLOCK_PAIRS
    } else {
        S::GEMM_BLOCK_DENSE
    };
    for_each_block(job, nvec, S::LANES, block, |xo, y, col, mr, nv| {
        let x = job.x.add(xo);
        let w = job.vals.add(col * 2 * esz);
        if job.sparse {
            let meta = job.meta.add(col);
            let groups = job.kpad / 4;
            dispatch_block!(
                S,
                sparse_block,
                DT,
                mr,
                nv,
                (x, job.xs, w, row_bytes, meta, job.nw, groups, y, job.ys)
            );
        } else if pairs {
            dispatch_block!(
                S,
                pairs_block,
                DT,
                mr,
                nv,
                (x, job.xs, w, row_bytes, job.kpad / 2, y, job.ys)
            );
        } else {
            dispatch_block!(
                S,
                dense_block,
                DT,
                mr,
                nv,
                (x, job.xs, w, row_bytes, job.kpad / 2, y, job.ys)
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The widths.

impl TileSimd for Avx2 {
    type I = __m256i;
    // 16 ymm registers. bf16: 4 rows x 16 columns of accumulators. f32 / f16: 4 rows x 8
    // columns, 8 accumulators, 2 weight vectors and the X pair (on SPR 5-15% faster than the
    // split 4 x 16 block). 2:4: 4 x 8 (its metadata and selected activations take registers).
    const GEMM_BLOCK_DENSE: (usize, usize) = (4, 2);
    const GEMM_BLOCK_PAIRS: (usize, usize) = (4, 1);
    const GEMM_BLOCK_SPARSE: (usize, usize) = (4, 1);

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn split<const DT: u8>(p: *const u8) -> (__m256, __m256) {
        if DT == DT_BF16 {
            // One 32-bit lane = (k even in the low half, k odd in the high half) of one
            // column; bf16 -> f32 is a 16-bit shift.
            let v = _mm256_loadu_si256(p as *const __m256i);
            let e = _mm256_slli_epi32::<16>(v);
            let o = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF_0000u32 as i32));
            (_mm256_castsi256_ps(e), _mm256_castsi256_ps(o))
        } else {
            let (a, b) = (
                Self::pairs::<DT>(p),
                Self::pairs::<DT>(p.add(8 * elem_size(DT))),
            );
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
    unsafe fn pairs<const DT: u8>(p: *const u8) -> __m256 {
        if DT == DT_F32 {
            _mm256_loadu_ps(p as *const f32)
        } else {
            debug_assert_eq!(DT, DT_F16);
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn broadcast_pair(p: *const f32) -> __m256 {
        _mm256_castpd_ps(_mm256_set1_pd((p as *const f64).read_unaligned()))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn broadcast_quad(p: *const f32) -> __m256 {
        let q = _mm_loadu_ps(p);
        _mm256_set_m128(q, q)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn select(quad: __m256, idx: __m256i) -> __m256 {
        _mm256_permutevar_ps(quad, idx)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_meta(p: *const u32) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn zero_i() -> __m256i {
        _mm256_setzero_si256()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn shr(i: __m256i, n: u32) -> __m256i {
        _mm256_srl_epi32(i, _mm_cvtsi32_si128(n as i32))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn add_pair_sums(lo: __m256, hi: __m256, y: *mut f32) {
        // hadd gives [c0 c1 c4 c5 | c2 c3 c6 c7]; the 64-bit permute restores the order.
        let sums = _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(
            _mm256_hadd_ps(lo, hi),
        )));
        _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), sums));
    }

    entry_points!("avx2,fma,f16c");
}

impl TileSimd for Avx512 {
    type I = __m512i;
    // 32 zmm registers. bf16 and 2:4: 8 rows x 32 columns. f32 / f16: 6 rows x 32 columns,
    // 24 accumulators, 4 weight vectors and the X pair (10-20% faster than the split 8 x 32
    // block on f32, 5-10% on f16; 8 x 16 was slower than both).
    const GEMM_BLOCK_DENSE: (usize, usize) = (8, 2);
    const GEMM_BLOCK_PAIRS: (usize, usize) = (6, 2);
    const GEMM_BLOCK_SPARSE: (usize, usize) = (8, 2);

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn split<const DT: u8>(p: *const u8) -> (__m512, __m512) {
        if DT == DT_BF16 {
            let v = _mm512_loadu_si512(p as *const _);
            let e = _mm512_slli_epi32::<16>(v);
            let o = _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32));
            (_mm512_castsi512_ps(e), _mm512_castsi512_ps(o))
        } else {
            let (a, b) = (
                Self::pairs::<DT>(p),
                Self::pairs::<DT>(p.add(16 * elem_size(DT))),
            );
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
    unsafe fn pairs<const DT: u8>(p: *const u8) -> __m512 {
        if DT == DT_F32 {
            _mm512_loadu_ps(p as *const f32)
        } else {
            debug_assert_eq!(DT, DT_F16);
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn broadcast_pair(p: *const f32) -> __m512 {
        _mm512_castpd_ps(_mm512_set1_pd((p as *const f64).read_unaligned()))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn broadcast_quad(p: *const f32) -> __m512 {
        _mm512_broadcast_f32x4(_mm_loadu_ps(p))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn select(quad: __m512, idx: __m512i) -> __m512 {
        _mm512_permutevar_ps(quad, idx)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn load_meta(p: *const u32) -> __m512i {
        _mm512_loadu_si512(p as *const _)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn zero_i() -> __m512i {
        _mm512_setzero_si512()
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn shr(i: __m512i, n: u32) -> __m512i {
        _mm512_srl_epi32(i, _mm_cvtsi32_si128(n as i32))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")]
    unsafe fn add_pair_sums(lo: __m512, hi: __m512, y: *mut f32) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let sums = _mm512_add_ps(
            _mm512_permutex2var_ps(lo, even, hi),
            _mm512_permutex2var_ps(lo, odd, hi),
        );
        _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), sums));
    }

    entry_points!("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c");
}
