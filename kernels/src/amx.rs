//! AMX-BF16 tile kernels for bf16 GEMMs (prefill): `tdpbf16ps` multiplies a 16 x 32 bf16
//! tile of X by a 16-K-pair x 16-column bf16 tile of W into a 16 x 16 f32 tile, 8,192
//! multiply-adds per instruction.
//!
//! The dense packed layout is AMX's B operand as stored: one tile row is a K-pair, 16
//! columns' (even-k, odd-k) pairs are 64 bytes, and the row stride is the packed row. 2:4
//! tiles have no AMX form, so a job on one is first expanded to that dense layout in a
//! per-thread scratch buffer (zeros where the mask drops a value; [`expand_24`], vectorized)
//! and then run as dense: the expansion is read once per block of up to 256 rows, where the
//! product does `rows` multiply-adds per element. What the tiles cannot cover (rows past a
//! multiple of 16, K past a multiple of 32) runs on the `vdpbf16ps` kernels of
//! [`crate::avx512bf16`], the same arithmetic on the same rounded X.
//!
//! The instructions are written with `asm!` (Rust has no stable AMX intrinsics). Tile
//! registers are state no compiled code touches: a job configures them (`ldtilecfg`), keeps
//! accumulators in `tmm0-3`, operands in `tmm4-7` across `asm!` blocks, and releases them
//! (`tilerelease`) before it returns. Linux grants a process the AMX state only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), which [`supported`] makes once.

use core::arch::asm;
use core::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use crate::cpu::{TileJob, DT_BF16};

/// Rows and columns of one f32 accumulator tile; K elements of one X tile.
const TILE_ROWS: usize = 16;
const TILE_COLS: usize = 16;
const TILE_K: usize = 32;

/// Whether this CPU has AMX-TILE and AMX-BF16 and the kernel lets this process use them.
pub(crate) fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
        // Leaf 7 reads as zeros (no AMX) on CPUs older than it.
        let edx = __cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        request_tile_data()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: true when granted (Linux 5.16 and
/// later with AMX enabled in XCR0).
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a plain system call with integer arguments; it only changes which XSAVE
    // features this process may use.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64; // bytes per row, little-endian u16
            c[48 + t] = TILE_ROWS as u8;
        }
        TileConfig(c)
    }
}

thread_local! {
    /// Per-thread dense copy of a 2:4 tile (u32 = one column's bf16 K-pair).
    static SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Runs a bf16 tile job with bf16 X over `nvec` full vectors of 16 columns.
///
/// # Safety
/// [`supported`] must be true and the CPU must support the AVX512-BF16 path; the tile dtype
/// must be bf16, `job.xb` non-null, and `job` must satisfy the [`TileJob`] contract for
/// `nvec * 16` columns.
pub(crate) unsafe fn run_tile(job: &TileJob, nvec: usize) {
    debug_assert_eq!(job.dtype, DT_BF16);
    if nvec == 0 {
        return;
    }
    if job.rows < TILE_ROWS {
        crate::avx512bf16::run_tile_bf16_dot(job, nvec);
        return;
    }
    if !job.sparse {
        let w = job.vals.add(job.col0 * 4);
        dense(job, w, job.nw * 4, nvec);
        return;
    }
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let cols = nvec * TILE_COLS;
        let need = job.kpad / 2 * cols;
        if s.len() < need {
            s.resize(need, 0);
        }
        expand_24(job, nvec, &mut s[..need]);
        dense(job, s.as_ptr() as *const u8, cols * 4, nvec);
    });
}

/// The dense product of `job`'s rows with the dense bf16 K-pair rows at `w` (row stride `ws`
/// bytes, first column = `job.col0`), `nvec` vectors of 16 columns, into `job.y`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")]
unsafe fn dense(job: &TileJob, w: *const u8, ws: usize, nvec: usize) {
    let rows16 = job.rows / TILE_ROWS * TILE_ROWS;
    let kfull = job.kpad / TILE_K * TILE_K;
    let (xs_bytes, ys_bytes) = (job.xs * 2, job.ys * 4);
    if kfull > 0 {
        let cfg = TileConfig::full();
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        let ksteps = kfull / TILE_K;
        let mut v = 0;
        while v < nvec {
            let nt = if nvec - v >= 2 { 2 } else { 1 };
            let b = w.add(v * TILE_COLS * 4);
            let mut r = 0;
            while r < rows16 {
                let mt = if rows16 - r >= 2 * TILE_ROWS { 2 } else { 1 };
                let a = job.xb.add(r * job.xs) as *const u8;
                let y = job.y.add(r * job.ys + v * TILE_COLS) as *mut u8;
                let (sa, sy) = (xs_bytes, ys_bytes);
                match (mt, nt) {
                    (2, 2) => block::<2, 2>(a, sa, b, ws, y, sy, ksteps),
                    (2, _) => block::<2, 1>(a, sa, b, ws, y, sy, ksteps),
                    (_, 2) => block::<1, 2>(a, sa, b, ws, y, sy, ksteps),
                    _ => block::<1, 1>(a, sa, b, ws, y, sy, ksteps),
                }
                r += mt * TILE_ROWS;
            }
            v += nt;
        }
        asm!("tilerelease", options(nostack, nomem));
    }
    // What the tiles leave: K past the last multiple of 32 (all rows), then rows past the
    // last multiple of 16 (K up to there).
    let sub = |rows: usize, r0: usize, k0: usize, kpad: usize| TileJob {
        dtype: DT_BF16,
        sparse: false,
        x: job.x.add(r0 * job.xs + k0),
        xb: job.xb.add(r0 * job.xs + k0),
        xs: job.xs,
        rows,
        vals: w.add(k0 / 2 * ws),
        meta: job.meta,
        nw: ws / 4,
        kpad,
        col0: 0,
        y: job.y.add(r0 * job.ys),
        ys: job.ys,
        streamed: false,
    };
    if kfull < job.kpad {
        crate::avx512bf16::run_tile_bf16_dot(&sub(job.rows, 0, kfull, job.kpad - kfull), nvec);
    }
    if rows16 < job.rows && kfull > 0 {
        crate::avx512bf16::run_tile_bf16_dot(&sub(job.rows - rows16, rows16, 0, kfull), nvec);
    }
}

/// `tileloadd` / `tilestored` / `tdpbf16ps` on named tile registers, one instruction each
/// (tile register names must be literal in `asm!`).
macro_rules! tile_load {
    ($tmm:literal, $p:expr, $stride:expr) => {
        asm!(
            concat!("tileloadd ", $tmm, ", [{p} + {s}*1]"),
            p = in(reg) $p, s = in(reg) $stride, options(nostack, readonly),
        )
    };
}
macro_rules! tile_store {
    ($tmm:literal, $p:expr, $stride:expr) => {
        asm!(
            concat!("tilestored [{p} + {s}*1], ", $tmm),
            p = in(reg) $p, s = in(reg) $stride, options(nostack),
        )
    };
}
macro_rules! tile_dot {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbf16ps ", $c, ", ", $a, ", ", $b),
            options(nostack, nomem)
        )
    };
}

/// One block of `MT` x `NT` accumulator tiles (16 rows x 16 columns each; `MT`, `NT` ≤ 2)
/// over `ksteps` steps of 32 K: `a` at X's first row and K, `b` at W's first K-pair row and
/// column, `y` at the block's first output; strides in bytes. Accumulators: tmm0 (rows 0-15,
/// cols 0-15), tmm1 (rows 0-15, cols 16-31), tmm2 (rows 16-31, cols 0-15), tmm3 (rows 16-31,
/// cols 16-31); X tiles tmm4 / tmm5, W tiles tmm6 / tmm7. A step reads 16 X rows of 64 bytes
/// (32 bf16 K) and 16 W K-pair rows of 64 bytes.
///
/// # Safety
/// The full tile configuration is loaded; the pointers cover the block.
#[inline(always)]
unsafe fn block<const MT: usize, const NT: usize>(
    a: *const u8,
    sa: usize,
    b: *const u8,
    sb: usize,
    y: *mut u8,
    sy: usize,
    ksteps: usize,
) {
    let (two_rows, two_cols) = (MT == 2, NT == 2);
    let (a1, b1) = (a.add(TILE_ROWS * sa), b.add(64));
    let (y1, y2) = (y.add(64), y.add(TILE_ROWS * sy));
    let y3 = y2.add(64);
    tile_load!("tmm0", y, sy);
    if two_cols {
        tile_load!("tmm1", y1, sy);
    }
    if two_rows {
        tile_load!("tmm2", y2, sy);
    }
    if two_rows && two_cols {
        tile_load!("tmm3", y3, sy);
    }
    for k in 0..ksteps {
        let (ak, bk) = (k * 64, k * TILE_ROWS * sb);
        tile_load!("tmm4", a.add(ak), sa);
        tile_load!("tmm6", b.add(bk), sb);
        if two_cols {
            tile_load!("tmm7", b1.add(bk), sb);
        }
        tile_dot!("tmm0", "tmm4", "tmm6");
        if two_rows {
            tile_load!("tmm5", a1.add(ak), sa);
        }
        if two_cols {
            tile_dot!("tmm1", "tmm4", "tmm7");
        }
        if two_rows {
            tile_dot!("tmm2", "tmm5", "tmm6");
        }
        if two_rows && two_cols {
            tile_dot!("tmm3", "tmm5", "tmm7");
        }
    }
    tile_store!("tmm0", y, sy);
    if two_cols {
        tile_store!("tmm1", y1, sy);
    }
    if two_rows {
        tile_store!("tmm2", y2, sy);
    }
    if two_rows && two_cols {
        tile_store!("tmm3", y3, sy);
    }
}

/// Writes the dense K-pair rows of `nvec * 16` columns (from `job.col0`) of the 2:4 tile of
/// `job` into `out` (`kpad / 2` rows of `nvec * 16` words): for group `g`, rows `2g` and
/// `2g + 1` hold the four K values of the group, the two kept ones at the positions the
/// metadata nibble names, zeros elsewhere.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")]
unsafe fn expand_24(job: &TileJob, nvec: usize, out: &mut [u32]) {
    let cols = nvec * TILE_COLS;
    debug_assert_eq!(out.len(), job.kpad / 2 * cols);
    let vs = job.nw * 4;
    let low = _mm512_set1_epi32(0xFFFF);
    let three = _mm512_set1_epi32(3);
    let slot = |s: i32| _mm512_set1_epi32(s);
    for g in 0..job.kpad / 4 {
        let vrow = job.vals.add(g * vs + job.col0 * 4);
        let mrow = job.meta.add((g / 8) * job.nw + job.col0);
        let shift = _mm_cvtsi32_si128(4 * (g % 8) as i32);
        let (even, odd) = (
            out.as_mut_ptr().add(2 * g * cols),
            out.as_mut_ptr().add((2 * g + 1) * cols),
        );
        for v in 0..nvec {
            let kept = _mm512_loadu_si512(vrow.add(v * 64) as *const _);
            let (v0, v1) = (_mm512_and_si512(kept, low), _mm512_srli_epi32::<16>(kept));
            let nib = _mm512_srl_epi32(
                _mm512_loadu_si512(mrow.add(v * TILE_COLS) as *const _),
                shift,
            );
            let i0 = _mm512_and_si512(nib, three);
            let i1 = _mm512_and_si512(_mm512_srli_epi32::<2>(nib), three);
            // The value at K slot s of the group: v0 where i0 == s, v1 where i1 == s.
            let at = |s: i32| {
                let a = _mm512_maskz_mov_epi32(_mm512_cmpeq_epi32_mask(i0, slot(s)), v0);
                _mm512_mask_mov_epi32(a, _mm512_cmpeq_epi32_mask(i1, slot(s)), v1)
            };
            let e = _mm512_or_si512(at(0), _mm512_slli_epi32::<16>(at(1)));
            let o = _mm512_or_si512(at(2), _mm512_slli_epi32::<16>(at(3)));
            _mm512_storeu_si512(even.add(v * TILE_COLS) as *mut _, e);
            _mm512_storeu_si512(odd.add(v * TILE_COLS) as *mut _, o);
        }
    }
}
