//! The CPU driver: `Y[M, N] = X[M, K] · W (+ bias)` over a [`PackedWeight`], multi-threaded
//! over output column panels, dispatching every tile to the SIMD path chosen at run time.

use std::borrow::Cow;
use std::sync::OnceLock;

use half::{bf16, f16};

use crate::dispatch::{available_cpus, GemvPolicy, SimdPath};
use crate::format::{PackedWeight, TileKind, WeightDtype};
use crate::pool::ThreadPool;
#[cfg(target_arch = "x86_64")]
use crate::simd::{Avx2, Avx512};
#[cfg(target_arch = "x86_64")]
use crate::tiles::TileSimd;
use crate::{scalar, KernelError};

pub(crate) const DT_F32: u8 = 0;
pub(crate) const DT_BF16: u8 = 1;
pub(crate) const DT_F16: u8 = 2;

/// Columns in one unit of work handed to a thread (a multiple of every path's lane count).
const UNIT: usize = 16;
/// Rows of X processed per pass over a weight column panel (keeps the X panel in L2).
const ROW_CHUNK: usize = 256;

/// The process-wide kernels ([`CpuKernels::global`]).
static GLOBAL: OnceLock<Result<CpuKernels, KernelError>> = OnceLock::new();

/// One tile's worth of work for a kernel.
///
/// Contract: `x` points at `X[m0, tile.k0]` of an X whose rows hold at least
/// `tile.k0 + kpad` readable floats (zero padded past K), row stride `xs`; `xb` is null or
/// points at the same position of the bf16 copy of X (same layout); `vals`/`meta` point
/// at the tile's values and metadata; `y` points at `Y[m0, tile.n0 + col0]`, row stride `ys`,
/// and the kernel owns those `rows` x `cols` outputs for the duration of the call.
pub(crate) struct TileJob {
    pub dtype: u8,
    pub sparse: bool,
    pub x: *const f32,
    pub xb: *const u16,
    pub xs: usize,
    pub rows: usize,
    pub vals: *const u8,
    pub meta: *const u32,
    pub nw: usize,
    pub kpad: usize,
    pub col0: usize,
    pub y: *mut f32,
    pub ys: usize,
    /// A one-row job streams its accumulators through L1 ([`GemvPolicy::Streamed`]);
    /// false for every job of more rows.
    pub streamed: bool,
}

/// Walks a tile job in register blocks: for every group of at most `nv_max` vectors of
/// `lanes` columns (outer) and every group of at most `mr_max` rows (inner), calls
/// `block(x_row, y, column, mr, nv)` with the X row offset `m0 * xs`, the Y pointer of the
/// block's first output and the block's first column within the tile. Inner rows reuse the
/// weight block while it is in L1.
///
/// # Safety
/// `job` must satisfy the [`TileJob`] contract for `nvec * lanes` columns.
#[inline(always)]
pub(crate) unsafe fn for_each_block(
    job: &TileJob,
    nvec: usize,
    lanes: usize,
    (mr_max, nv_max): (usize, usize),
    mut block: impl FnMut(usize, *mut f32, usize, usize, usize),
) {
    let mut v0 = 0;
    while v0 < nvec {
        let nv = (nvec - v0).min(nv_max);
        let mut m0 = 0;
        while m0 < job.rows {
            let mr = (job.rows - m0).min(mr_max);
            let y = job.y.add(m0 * job.ys + v0 * lanes);
            block(m0 * job.xs, y, job.col0 + v0 * lanes, mr, nv);
            m0 += mr;
        }
        v0 += nv;
    }
}

/// One product of [`CpuKernels::matmul_group`]: `y = x · w (+ bias)`.
pub struct GroupProduct<'a> {
    pub w: &'a PackedWeight,
    pub bias: Option<&'a [f32]>,
    pub y: &'a mut [f32],
}

/// Output pointer shared by the threads of one call; each writes a disjoint column range.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: threads write disjoint column ranges of Y (see `CpuKernels::matmul`), and the
// pointer does not outlive the `&mut [f32]` it comes from (the pool joins before returning).
unsafe impl Sync for SharedOut {}
// SAFETY: as above.
unsafe impl Send for SharedOut {}

impl SharedOut {
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// CPU kernels bound to one SIMD path and one thread pool.
pub struct CpuKernels {
    path: SimdPath,
    gemv: GemvPolicy,
    pool: ThreadPool,
}

impl std::fmt::Debug for CpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuKernels")
            .field("path", &self.path)
            .field("gemv", &self.gemv)
            .field("threads", &self.threads())
            .finish()
    }
}

impl CpuKernels {
    /// Kernels on `path` (an error if this CPU lacks it) with `threads` threads (≥ 1).
    pub fn new(path: SimdPath, threads: usize) -> Result<Self, KernelError> {
        if !path.is_supported() {
            return Err(KernelError::UnsupportedPath(path));
        }
        if threads == 0 {
            return Err(KernelError::BadThreads("0".into()));
        }
        Ok(CpuKernels {
            path,
            gemv: GemvPolicy::Tuned,
            pool: ThreadPool::new(threads),
        })
    }

    /// The same kernels with one-row products on `gemv` (the default is
    /// [`GemvPolicy::Tuned`]; the others exist to measure and test both strategies).
    pub fn with_gemv(mut self, gemv: GemvPolicy) -> Self {
        self.gemv = gemv;
        self
    }

    pub fn gemv(&self) -> GemvPolicy {
        self.gemv
    }

    /// The detected path on every CPU this process may use.
    pub fn detected() -> Result<Self, KernelError> {
        Self::new(SimdPath::detect(), available_cpus())
    }

    /// The process-wide instance: the one [`init_global`](Self::init_global) set, else
    /// built once by [`detected`](Self::detected) on first use.
    pub fn global() -> Result<&'static CpuKernels, KernelError> {
        GLOBAL
            .get_or_init(CpuKernels::detected)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Sets the process-wide instance to `path` with `threads` threads, before anything
    /// uses it (a tool's `--threads`); once it exists, the instance in use is returned if it
    /// has that path and thread count, and [`KernelError::GlobalInUse`] otherwise.
    pub fn init_global(path: SimdPath, threads: usize) -> Result<&'static CpuKernels, KernelError> {
        let kernels = GLOBAL
            .get_or_init(|| CpuKernels::new(path, threads))
            .as_ref()
            .map_err(Clone::clone)?;
        if kernels.path == path && kernels.threads() == threads {
            Ok(kernels)
        } else {
            Err(KernelError::GlobalInUse {
                path: kernels.path,
                threads: kernels.threads(),
            })
        }
    }

    /// [`init_global`](Self::init_global) for a tool's `--threads` and `--kernel-path`
    /// (`None`: every CPU, the detected path). A thread count above the CPUs is cut to them;
    /// the second value is then a note saying so, for the tool to print.
    pub fn init_global_requested(
        threads: Option<usize>,
        path: Option<SimdPath>,
    ) -> Result<(&'static CpuKernels, Option<String>), KernelError> {
        let used = crate::dispatch::resolve_threads(threads)?;
        let note = threads.filter(|&n| n > used).map(|n| {
            format!("--threads {n} is more than the {used} CPUs this process may use; using {used}")
        });
        let kernels = Self::init_global(path.unwrap_or_else(SimdPath::detect), used)?;
        Ok((kernels, note))
    }

    pub fn path(&self) -> SimdPath {
        self.path
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Runs `f(t)` for every thread index `t < threads()` on this instance's pool and returns
    /// when all are done (for other data-parallel ops that want the same workers). `f` must
    /// not call back into this pool.
    pub fn run_on_threads(&self, f: &(dyn Fn(usize) + Sync)) {
        self.pool.run(f)
    }

    /// `y[M, N] = x[M, K] · W (+ bias)`, all row-major f32, accumulation in f32.
    pub fn matmul(
        &self,
        m: usize,
        x: &[f32],
        w: &PackedWeight,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        self.matmul_group(m, x, &mut [GroupProduct { w, bias, y }])
    }

    /// Several products of the same `x` (sibling projections: Q/K/V, gate/up) in one dispatch
    /// to the pool: `x` is padded (and rounded for the `vdpbf16ps` path) once, and the column
    /// panels of every product are split across the threads together.
    pub fn matmul_group(
        &self,
        m: usize,
        x: &[f32],
        products: &mut [GroupProduct<'_>],
    ) -> Result<(), KernelError> {
        let Some(first) = products.first() else {
            return Ok(());
        };
        let k = first.w.k();
        for p in products.iter() {
            let n = p.w.n();
            let check = |what: &'static str, expected: usize, got: usize| {
                if expected == got {
                    Ok(())
                } else {
                    Err(KernelError::Shape {
                        what,
                        expected,
                        got,
                        m,
                        k: p.w.k(),
                        n,
                    })
                }
            };
            check("x", m * p.w.k(), x.len())?;
            check("y", m * n, p.y.len())?;
            if let Some(b) = p.bias {
                check("bias", n, b.len())?;
            }
        }
        if m == 0 {
            return Ok(());
        }
        // X rows padded to a multiple of 4 so every tile can read whole groups.
        let kp = k.div_ceil(4) * 4;
        let xpad: Cow<[f32]> = if kp == k {
            Cow::Borrowed(x)
        } else {
            let mut v = vec![0f32; m * kp];
            for (dst, src) in v.chunks_exact_mut(kp).zip(x.chunks_exact(k.max(1))) {
                dst[..k].copy_from_slice(src);
            }
            Cow::Owned(v)
        };
        // The bf16 copy of X for the `vdpbf16ps` path (zero padded like `xpad`).
        let rounds: Vec<bool> = products
            .iter()
            .map(|p| self.path.rounds_activations(m, p.w.dtype()))
            .collect();
        let xb: Option<Vec<u16>> = rounds
            .iter()
            .any(|&r| r)
            .then(|| round_to_bf16(self.path, &xpad));
        // Work units (UNIT columns of one tile column) of every product, laid end to end.
        let units_of = |w: &PackedWeight, j: usize| w.tile(0, j).nw.div_ceil(UNIT);
        let unit_counts: Vec<usize> = products
            .iter()
            .map(|p| {
                if p.w.tile_map().k_tiles() == 0 {
                    p.w.n().div_ceil(UNIT)
                } else {
                    (0..p.w.tile_map().n_tiles())
                        .map(|j| units_of(p.w, j))
                        .sum()
                }
            })
            .collect();
        let total: usize = unit_counts.iter().sum();
        if total == 0 {
            return Ok(());
        }
        let used = self.threads().min(total).max(1);
        // Threads take runs of units of equal cost (bytes read), not of equal count: a 2:4
        // tile column reads about half of a dense one, and a hybrid matrix has both.
        let bounds = balanced_bounds(products, &unit_counts, used, |dtype, kind, kpad| {
            self.column_cost(m, dtype, kind, kpad)
        });
        let outs: Vec<SharedOut> = products
            .iter_mut()
            .map(|p| SharedOut(p.y.as_mut_ptr()))
            .collect();
        let products: &[GroupProduct<'_>] = products;
        let xs: &[f32] = &xpad;
        let xb: Option<&[u16]> = xb.as_deref();
        let work = |t: usize| {
            if t >= used {
                return;
            }
            let (u0, u1) = (bounds[t], bounds[t + 1]);
            let mut base = 0;
            for (pi, p) in products.iter().enumerate() {
                let (w, bias, out) = (p.w, p.bias, &outs[pi]);
                let n = w.n();
                let map = w.tile_map();
                if map.k_tiles() == 0 {
                    // K == 0: Y is just the bias.
                    let (a, b) = (u0.max(base), u1.min(base + unit_counts[pi]));
                    if a < b {
                        let (c0, c1) = ((a - base) * UNIT, ((b - base) * UNIT).min(n));
                        for r in 0..m {
                            for c in c0..c1 {
                                // SAFETY: (r, c) is inside Y and column c belongs to this
                                // thread only.
                                unsafe { *out.ptr().add(r * n + c) = bias.map_or(0.0, |b| b[c]) };
                            }
                        }
                    }
                    base += unit_counts[pi];
                    continue;
                }
                let xb = xb.filter(|_| rounds[pi]);
                for j in 0..map.n_tiles() {
                    let nu = units_of(w, j);
                    let (a, b) = (u0.max(base), u1.min(base + nu));
                    if a < b {
                        let nw = w.tile(0, j).nw;
                        let (c0, c1) = ((a - base) * UNIT, ((b - base) * UNIT).min(nw));
                        // SAFETY: columns c0..c1 of tile column j of this product belong to
                        // this thread only; `xs` (and `xb`) has m rows of kp values.
                        unsafe { self.panel(m, xs, xb, kp, w, bias, out.ptr(), j, c0, c1) };
                    }
                    base += nu;
                }
            }
        };
        if used == 1 {
            work(0);
        } else {
            self.pool.run(&work);
        }
        Ok(())
    }

    /// The relative cost of one column of a tile in a product of `m` rows: its bytes (values,
    /// plus the metadata of a 2:4 tile) for a one-row product, which reading the weight
    /// bounds; its multiply-adds for more rows (a 2:4 tile does half, at about 0.8 of the
    /// dense tile's time in kernel-bench; AMX expands it to dense first).
    fn column_cost(&self, m: usize, dtype: WeightDtype, kind: TileKind, kpad: usize) -> u64 {
        let kpad = kpad as u64;
        let amx = self.path == SimdPath::Amx && self.path.rounds_activations(m, dtype);
        match kind {
            TileKind::Dense if m > 1 => 5 * kpad,
            TileKind::Sparse24 if m > 1 => {
                if amx {
                    5 * kpad
                } else {
                    4 * kpad
                }
            }
            TileKind::Dense => kpad * dtype.size() as u64,
            TileKind::Sparse24 => kpad / 2 * dtype.size() as u64 + kpad / 8,
        }
    }

    /// Computes columns `c0..c1` of tile column `j` for all rows.
    ///
    /// # Safety
    /// `y` is the start of an `m x n` row-major output no one else writes in those columns;
    /// `xs` (and `xb` when present) holds `m` rows of `kp` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel(
        &self,
        m: usize,
        xs: &[f32],
        xb: Option<&[u16]>,
        kp: usize,
        w: &PackedWeight,
        bias: Option<&[f32]>,
        y: *mut f32,
        j: usize,
        c0: usize,
        c1: usize,
    ) {
        let n = w.n();
        let n0 = w.tile(0, j).n0;
        let lanes = self.path.lanes();
        let dtype = match w.dtype() {
            WeightDtype::F32 => DT_F32,
            WeightDtype::Bf16 => DT_BF16,
            WeightDtype::F16 => DT_F16,
        };
        let vals = w.values().as_ptr();
        let meta = w.meta().as_ptr();
        // The one-row strategy per tile kind, resolved once for the panel.
        let streams = |sparse| self.gemv.streams(self.path, w.dtype(), sparse);
        let (stream_dense, stream_sparse) = (streams(false), streams(true));
        for mc in (0..m).step_by(ROW_CHUNK) {
            let rows = ROW_CHUNK.min(m - mc);
            for r in mc..mc + rows {
                let yr = y.add(r * n + n0);
                for c in c0..c1 {
                    *yr.add(c) = bias.map_or(0.0, |b| b[n0 + c]);
                }
            }
            for i in 0..w.tile_map().k_tiles() {
                let t = w.tile(i, j);
                let sparse = t.kind == TileKind::Sparse24;
                let mut job = TileJob {
                    dtype,
                    sparse,
                    x: xs.as_ptr().add(mc * kp + t.k0),
                    xb: xb.map_or(std::ptr::null(), |b| b.as_ptr().add(mc * kp + t.k0)),
                    xs: kp,
                    rows,
                    vals: vals.add(t.val_offset),
                    meta: meta.add(t.meta_offset),
                    nw: t.nw,
                    kpad: t.kpad,
                    col0: c0,
                    y: y.add(mc * n + n0 + c0),
                    ys: n,
                    streamed: rows == 1 && if sparse { stream_sparse } else { stream_dense },
                };
                let nvec = match self.path {
                    SimdPath::Scalar => 0,
                    _ => (c1 - c0) / lanes,
                };
                match self.path {
                    #[cfg(target_arch = "x86_64")]
                    SimdPath::Amx if !job.xb.is_null() => crate::amx::run_tile(&job, nvec),
                    #[cfg(target_arch = "x86_64")]
                    SimdPath::Avx512Bf16 if !job.xb.is_null() => {
                        crate::avx512bf16::run_tile_bf16_dot(&job, nvec)
                    }
                    #[cfg(target_arch = "x86_64")]
                    SimdPath::Avx512 | SimdPath::Avx512Bf16 | SimdPath::Amx => {
                        <Avx512 as TileSimd>::run_tile(&job, nvec)
                    }
                    #[cfg(target_arch = "x86_64")]
                    SimdPath::Avx2 => <Avx2 as TileSimd>::run_tile(&job, nvec),
                    _ => {}
                }
                let done = nvec * lanes;
                if done < c1 - c0 {
                    job.col0 += done;
                    job.y = job.y.add(done);
                    let cols = c1 - c0 - done;
                    let xb16 = job.xb as *const bf16;
                    match w.dtype() {
                        WeightDtype::F32 => scalar::tile::<f32, f32>(&job, job.x, cols),
                        WeightDtype::Bf16 if !xb16.is_null() => {
                            scalar::tile::<bf16, bf16>(&job, xb16, cols)
                        }
                        WeightDtype::Bf16 => scalar::tile::<bf16, f32>(&job, job.x, cols),
                        WeightDtype::F16 => scalar::tile::<f16, f32>(&job, job.x, cols),
                    }
                }
            }
        }
    }
}

/// Unit boundaries `b[0] = 0 ≤ b[1] ≤ … ≤ b[used] = total` over the units of `products`
/// (laid end to end, `unit_counts` per product) that give each of `used` threads about the
/// same cost, `column_cost(dtype, kind, kpad)` per column of a tile.
fn balanced_bounds(
    products: &[GroupProduct<'_>],
    unit_counts: &[usize],
    used: usize,
    column_cost: impl Fn(WeightDtype, TileKind, usize) -> u64,
) -> Vec<usize> {
    let total: usize = unit_counts.iter().sum();
    if used <= 1 {
        return vec![0, total];
    }
    // The cost of every unit in order, generated twice (a decode step makes hundreds of
    // these calls; the LM head alone has thousands of units, not worth an allocation).
    let costs = || {
        products.iter().zip(unit_counts).flat_map(|(p, &count)| {
            let map = p.w.tile_map();
            let tiles = if map.k_tiles() == 0 { 0 } else { map.n_tiles() };
            let flat = std::iter::repeat_n(1, if tiles == 0 { count } else { 0 });
            let per_tile = (0..tiles).flat_map(|j| {
                let column: u64 = (0..map.k_tiles())
                    .map(|i| {
                        let t = p.w.tile(i, j);
                        column_cost(p.w.dtype(), t.kind, t.kpad)
                    })
                    .sum::<u64>()
                    .max(1);
                let nw = p.w.tile(0, j).nw;
                (0..nw.div_ceil(UNIT)).map(move |u| column * UNIT.min(nw - u * UNIT) as u64)
            });
            flat.chain(per_tile)
        })
    };
    let sum: u64 = costs().sum();
    let mut bounds = Vec::with_capacity(used + 1);
    bounds.push(0);
    let (mut acc, mut unit, mut t) = (0u64, 0usize, 1usize);
    for c in costs() {
        // The first unit whose cost midpoint lies past thread t's share starts thread t.
        while t < used && 2 * acc + c > 2 * (sum * t as u64 / used as u64) {
            bounds.push(unit);
            t += 1;
        }
        acc += c;
        unit += 1;
    }
    while bounds.len() < used {
        bounds.push(total);
    }
    bounds.push(total);
    bounds
}

/// `x` rounded to nearest-even bf16 bits (SIMD where the path has the conversion; NaN
/// stays NaN, subnormals may flush to zero there).
fn round_to_bf16(path: SimdPath, x: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; x.len()];
    #[cfg(target_arch = "x86_64")]
    if matches!(path, SimdPath::Avx512Bf16 | SimdPath::Amx) {
        // SAFETY: the path is only constructed on CPUs that support it.
        unsafe { crate::avx512bf16::round_to_bf16(x, &mut out) };
        return out;
    }
    let _ = path;
    for (o, v) in out.iter_mut().zip(x) {
        *o = bf16::from_f32(*v).to_bits();
    }
    out
}

/// `y = x · W (+ bias)` on the process-wide [`CpuKernels::global`] instance.
pub fn matmul(
    m: usize,
    x: &[f32],
    w: &PackedWeight,
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<(), KernelError> {
    CpuKernels::global()?.matmul(m, x, w, bias, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{magnitude_24_mask, pack, TileMap, TileShape};

    /// A 512 x 512 f32 weight whose first half of tile columns is 2:4 and second half dense
    /// (clumped, as learned maps are): an equal count of units would give the second thread
    /// about 1.9x the bytes of the first.
    fn clumped() -> PackedWeight {
        let (k, n) = (512, 512);
        let tile = TileShape::default();
        let (kt, nt) = tile.grid(k, n);
        let kinds = (0..kt * nt)
            .map(|t| {
                if t % nt < nt / 2 {
                    TileKind::Sparse24
                } else {
                    TileKind::Dense
                }
            })
            .collect();
        let map = TileMap::from_kinds(kt, nt, kinds).unwrap();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 - 3.0).collect();
        let mask = magnitude_24_mask(&w, k, n, tile, &map).unwrap();
        pack(&w, k, n, tile, &map, Some(&mask)).unwrap()
    }

    #[test]
    fn threads_get_runs_of_equal_bytes_not_equal_counts() {
        let w = clumped();
        let mut y = vec![0f32; 512];
        let products = [GroupProduct {
            w: &w,
            bias: None,
            y: &mut y,
        }];
        let units = vec![512 / UNIT];
        let kern = CpuKernels::new(SimdPath::Scalar, 1).unwrap();
        let cost = |dtype, kind, kpad| kern.column_cost(1, dtype, kind, kpad);
        let bounds = balanced_bounds(&products, &units, 2, cost);
        assert_eq!((bounds[0], bounds[2]), (0, 32));
        // A sparse unit costs 128 · 4 / 2 + 16 = 272 bytes per column of each tile, a dense
        // one 512: the first thread takes the 16 sparse units and about four dense ones.
        let bytes =
            |u: std::ops::Range<usize>| -> u64 { u.map(|u| if u < 16 { 272 } else { 512 }).sum() };
        let (a, b) = (bytes(0..bounds[1]), bytes(bounds[1]..32));
        assert!(a.abs_diff(b) <= 512, "{bounds:?}: {a} vs {b} bytes");
        assert!(bounds[1] > 16, "{bounds:?}");
        // Many threads: monotone, every unit once.
        let bounds = balanced_bounds(&products, &units, 7, cost);
        assert_eq!(bounds.len(), 8);
        assert!(bounds.windows(2).all(|p| p[0] <= p[1]));
        assert_eq!((bounds[0], bounds[7]), (0, 32));
        // More rows: multiply-adds, a 2:4 unit at 0.8 of a dense one.
        let cost = |dtype, kind, kpad| kern.column_cost(64, dtype, kind, kpad);
        let bounds = balanced_bounds(&products, &units, 2, cost);
        assert!((17..=18).contains(&bounds[1]), "{bounds:?}");
    }
}
