//! AVX512-BF16 tile kernels: bf16 tiles times bf16-rounded X with `vdpbf16ps`, which adds both
//! products of a 32-bit lane's bf16 pair into that lane's f32 accumulator. The packed K-pair
//! layout is the operand as is: one 64-byte load is 16 columns' (even-k, odd-k) pairs.
//!
//! Dense: the X pair (x[2kp], x[2kp + 1]) broadcast to every lane.
//! 2:4: x[4g .. 4g + 4] (four bf16) broadcast to all eight 64-bit lanes, then `vpermw` picks
//! x[4g + i0] into the low and x[4g + i1] into the high half of each lane; since the four
//! values repeat every four words, the word indices need only their two low bits right, which
//! are the metadata nibble's bits 1:0 (low word) and bits 3:2 moved to 17:16 (high word).
//!
//! Only AVX-512 has this instruction, so these kernels have no other width; everything else on
//! this path runs the shared kernels of [`crate::tiles`].

use core::arch::x86_64::*;

use crate::cpu::{for_each_block, TileJob, DT_BF16};
use crate::simd::Avx512;
use crate::tiles::store_acc;

/// Output columns per vector.
const LANES: usize = 16;

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
    store_acc::<Avx512, MR, NV>(&acc, y, ys);
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
    store_acc::<Avx512, MR, NV>(&acc, y, ys);
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
