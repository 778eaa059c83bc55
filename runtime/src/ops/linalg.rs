//! Matrix products: `MatMul` (numpy `matmul` semantics) and `Gemm`.
//!
//! f32 and f64 run through `ndarray::linalg::general_mat_mul` (matrixmultiply), one call per
//! batch matrix; f16 and bf16 compute in f32 and round back; integers use a naive loop with
//! wrapping arithmetic (exact modulo 2^bits, like the hardware).

use std::sync::Arc;

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, IxDyn, LinalgScalar, ShapeBuilder};

use super::elementwise::{broadcast_shapes, cast};
use super::{arity, opt, req, InputFact, Op, OpError, OpRegistry, OutputFact, Outputs};
use crate::dim::{shape_to_string, Dim, Shape};
use crate::dtype::DType;
use crate::ir::{Attrs, TensorType};
use crate::tensor::{Element, Tensor};

pub fn register(r: &mut OpRegistry) {
    r.register("", "MatMul", 13, |_, _| Ok(Arc::new(MatMul)));
    r.register("", "Gemm", 13, |attrs, _| {
        Ok(Arc::new(Gemm::from_attrs(attrs)?))
    });
}

fn tensor_err(e: crate::RuntimeError) -> OpError {
    OpError::Invalid(e.to_string())
}

/// Element types MatMul and Gemm accept.
fn check_dtype(op: &str, index: usize, d: DType) -> Result<(), OpError> {
    match d {
        DType::F32
        | DType::F64
        | DType::F16
        | DType::BF16
        | DType::I32
        | DType::I64
        | DType::U32
        | DType::U64 => Ok(()),
        _ => Err(OpError::DType {
            index,
            got: d,
            expected: format!("{op} supports f32, f64, f16, bf16, i32, i64, u32 and u64"),
        }),
    }
}

fn check_same_dtype(op: &str, a: DType, index: usize, b: DType) -> Result<(), OpError> {
    if a != b {
        return Err(OpError::DType {
            index,
            got: b,
            expected: format!("{a} like input 0 of {op}"),
        });
    }
    Ok(())
}

/// Output shape of numpy `matmul` on symbolic shapes: a 1-D operand is promoted to a matrix
/// and the added dim removed from the result, batch dims broadcast. Inner dims must agree
/// when both are constant.
pub fn matmul_shape(a: &[Dim], b: &[Dim]) -> Result<Shape, OpError> {
    let both = || format!("{} x {}", shape_to_string(a), shape_to_string(b));
    if a.is_empty() || b.is_empty() {
        return Err(OpError::Shape(format!(
            "MatMul operands must have rank >= 1, got {}",
            both()
        )));
    }
    let one = Dim::constant(1);
    let a2: Shape = if a.len() == 1 {
        vec![one.clone(), a[0].clone()]
    } else {
        a.to_vec()
    };
    let b2: Shape = if b.len() == 1 {
        vec![b[0].clone(), one]
    } else {
        b.to_vec()
    };
    let (ra, rb) = (a2.len(), b2.len());
    if let (Some(x), Some(y)) = (a2[ra - 1].as_const(), b2[rb - 2].as_const()) {
        if x != y {
            return Err(OpError::Shape(format!(
                "MatMul inner dimensions differ: {x} vs {y} in {}",
                both()
            )));
        }
    }
    let batch = broadcast_shapes(&[&a2[..ra - 2].to_vec(), &b2[..rb - 2].to_vec()])
        .map_err(|e| OpError::Shape(format!("MatMul batch dimensions of {}: {e}", both())))?;
    let mut out = batch;
    if a.len() > 1 {
        out.push(a2[ra - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[rb - 1].clone());
    }
    Ok(out)
}

/// A concrete batched matrix product: output batch shape, per-batch matrix indices into each
/// operand, and the matrix sizes.
#[derive(Debug)]
struct Plan {
    a_index: Vec<usize>,
    b_index: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    out_shape: Vec<usize>,
}

impl Plan {
    fn new(a: &[usize], b: &[usize]) -> Result<Plan, OpError> {
        let both = || format!("{a:?} x {b:?}");
        if a.is_empty() || b.is_empty() {
            return Err(OpError::Shape(format!(
                "MatMul operands must have rank >= 1, got {}",
                both()
            )));
        }
        let a2: Vec<usize> = if a.len() == 1 {
            vec![1, a[0]]
        } else {
            a.to_vec()
        };
        let b2: Vec<usize> = if b.len() == 1 {
            vec![b[0], 1]
        } else {
            b.to_vec()
        };
        let (ra, rb) = (a2.len(), b2.len());
        let (m, k, k2, n) = (a2[ra - 2], a2[ra - 1], b2[rb - 2], b2[rb - 1]);
        if k != k2 {
            return Err(OpError::Shape(format!(
                "MatMul inner dimensions differ: {k} vs {k2} in {}",
                both()
            )));
        }
        let (ab, bb) = (&a2[..ra - 2], &b2[..rb - 2]);
        let rank = ab.len().max(bb.len());
        let mut batch = Vec::with_capacity(rank);
        for i in 0..rank {
            let x = (ab.len() + i).checked_sub(rank).map_or(1, |j| ab[j]);
            let y = (bb.len() + i).checked_sub(rank).map_or(1, |j| bb[j]);
            batch.push(match (x, y) {
                (x, y) if x == y => x,
                (1, y) => y,
                (x, 1) => x,
                _ => {
                    return Err(OpError::Shape(format!(
                        "MatMul batch dimensions {x} and {y} do not broadcast in {}",
                        both()
                    )))
                }
            });
        }
        checked_volume(&[&batch[..], &[m, n]].concat(), "MatMul")?;
        let mut out_shape = batch.clone();
        if a.len() > 1 {
            out_shape.push(m);
        }
        if b.len() > 1 {
            out_shape.push(n);
        }
        Ok(Plan {
            a_index: batch_index(&batch, ab),
            b_index: batch_index(&batch, bb),
            m,
            k,
            n,
            out_shape,
        })
    }

    fn batches(&self) -> usize {
        self.a_index.len()
    }
}

/// The number of elements of an output shape, or an error when it overflows.
fn checked_volume(shape: &[usize], op: &str) -> Result<usize, OpError> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| OpError::Shape(format!("{op} output shape {shape:?} is too large")))
}

/// For every batch position of the broadcast `batch` shape (row-major), the index of the
/// matrix of an operand whose batch shape is `sub` (right-aligned, dims of 1 broadcast).
fn batch_index(batch: &[usize], sub: &[usize]) -> Vec<usize> {
    let rank = batch.len();
    let pad = rank - sub.len();
    let mut strides = vec![0usize; rank];
    let mut s = 1usize;
    for i in (0..rank).rev() {
        let d = if i >= pad { sub[i - pad] } else { 1 };
        strides[i] = if d == 1 { 0 } else { s };
        s *= d;
    }
    let total: usize = batch.iter().product();
    let mut out = Vec::with_capacity(total);
    let mut idx = vec![0usize; rank];
    for _ in 0..total {
        out.push(idx.iter().zip(&strides).map(|(i, s)| i * s).sum());
        for d in (0..rank).rev() {
            idx[d] += 1;
            if idx[d] < batch[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// A rank-2 tensor as a matrix view.
fn as_matrix<T: Element>(t: &Tensor) -> Result<ArrayView2<'_, T>, OpError> {
    let s = t.shape();
    if s.len() != 2 {
        return Err(OpError::Shape(format!(
            "expected a matrix, got shape {s:?}"
        )));
    }
    ArrayView2::from_shape((s[0], s[1]), t.as_slice::<T>().map_err(tensor_err)?)
        .map_err(|e| OpError::Invalid(e.to_string()))
}

/// `y = x · w` for one row-major `[m, k] x [k, n]` pair, through matrixmultiply.
fn mat_mul_blas<T: LinalgScalar>(
    m: usize,
    k: usize,
    n: usize,
    x: &[T],
    w: &[T],
    y: &mut [T],
) -> Result<(), OpError> {
    let e = |e: ndarray::ShapeError| OpError::Invalid(format!("MatMul: {e}"));
    let xa = ArrayView2::from_shape((m, k), x).map_err(e)?;
    let wa = ArrayView2::from_shape((k, n), w).map_err(e)?;
    let mut ya = ArrayViewMut2::from_shape((m, n), y).map_err(e)?;
    general_mat_mul(T::one(), &xa, &wa, T::zero(), &mut ya);
    Ok(())
}

/// Rows of X up to which the f32 product streams W once, row by row (a GEMV), instead of
/// packing it for a GEMM.
const GEMV_MAX_ROWS: usize = 4;
/// Columns per block of the GEMV: the accumulators of one block stay in L1.
const GEMV_BLOCK: usize = 256;
/// Products smaller than this many multiply-adds run on the calling thread alone.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `y[.., c0..c1] = x · w[.., c0..c1]` for `m ≤ GEMV_MAX_ROWS`, W read once in column blocks.
/// Compiled for AVX-512 and AVX2+FMA too, chosen at run time (the body is plain Rust that the
/// compiler vectorizes).
#[allow(clippy::too_many_arguments)]
fn gemv_columns(
    m: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    c0: usize,
    c1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { gemv_avx512(m, k, n, x, w, y, c0, c1) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { gemv_avx2(m, k, n, x, w, y, c0, c1) };
        }
    }
    gemv_body(m, k, n, x, w, y, c0, c1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_avx512(
    m: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    c0: usize,
    c1: usize,
) {
    gemv_body(m, k, n, x, w, y, c0, c1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_avx2(
    m: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    c0: usize,
    c1: usize,
) {
    gemv_body(m, k, n, x, w, y, c0, c1)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemv_body(
    m: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    c0: usize,
    c1: usize,
) {
    let mut acc = [[0f32; GEMV_BLOCK]; GEMV_MAX_ROWS];
    let mut b0 = c0;
    while b0 < c1 {
        let bw = GEMV_BLOCK.min(c1 - b0);
        for a in acc.iter_mut().take(m) {
            a.fill(0.0);
        }
        for kk in 0..k {
            let wr = &w[kk * n + b0..kk * n + b0 + bw];
            for (i, a) in acc.iter_mut().enumerate().take(m) {
                let xv = x[i * k + kk];
                for (av, &wv) in a[..bw].iter_mut().zip(wr) {
                    // Not `mul_add`: without FMA in the target that is a libm call.
                    *av += xv * wv;
                }
            }
        }
        for (i, a) in acc.iter().enumerate().take(m) {
            y[i * n + b0..i * n + b0 + bw].copy_from_slice(&a[..bw]);
        }
        b0 += bw;
    }
}

/// `y = x · w` in f32 (row-major `[m, k] x [k, n]`): a blocked GEMV for a few rows, else
/// matrixmultiply; split over the kernels' thread pool by output columns when large enough.
fn mat_mul_f32(
    m: usize,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
) -> Result<(), OpError> {
    if m >= PACKED_MIN_ROWS && k >= 16 && n >= 16 {
        if let Some(()) = mat_mul_packed(m, k, n, x, w, y) {
            return Ok(());
        }
    }
    let pool = patch_kernels::CpuKernels::global()
        .ok()
        .filter(|p| p.threads() > 1);
    let parts = match pool {
        Some(p) if m * k * n >= PARALLEL_MIN_WORK && n >= 64 => p.threads(),
        _ => 1,
    };
    if parts == 1 {
        if m <= GEMV_MAX_ROWS {
            gemv_columns(m, k, n, x, w, y, 0, n);
            return Ok(());
        }
        return mat_mul_blas(m, k, n, x, w, y);
    }
    let out = SharedF32(y.as_mut_ptr());
    let work = |t: usize| {
        // Column ranges on 16-column boundaries, disjoint across threads.
        let edge = |t: usize| ((n.div_ceil(16) * t / parts) * 16).min(n);
        let (c0, c1) = (edge(t), edge(t + 1));
        if c0 >= c1 {
            return;
        }
        if m <= GEMV_MAX_ROWS {
            // SAFETY: this thread only writes columns c0..c1 of every row of Y.
            let y = unsafe { std::slice::from_raw_parts_mut(out.ptr(), m * n) };
            gemv_columns(m, k, n, x, w, y, c0, c1);
        } else {
            let cols = c1 - c0;
            let xa = ArrayView2::from_shape((m, k), x).expect("x is m x k");
            let wa = ArrayView2::from_shape((k, n), w).expect("w is k x n");
            let wa = wa.slice(ndarray::s![.., c0..c1]);
            // SAFETY: rows of `cols` floats at stride n starting at column c0: inside Y and
            // written by this thread only.
            let mut ya = unsafe {
                ArrayViewMut2::from_shape_ptr((m, cols).strides((n, 1)), out.ptr().add(c0))
            };
            general_mat_mul(1.0, &xa, &wa, 0.0, &mut ya);
        }
    };
    pool.expect("parts > 1 needs the pool")
        .run_on_threads(&work);
    Ok(())
}

/// Gemm's `C` broadcast to `[m, n]`.
fn broadcast_c<'a, T>(
    cv: &'a ndarray::ArrayViewD<'a, T>,
    shape: &[usize],
    m: usize,
    n: usize,
) -> Result<ndarray::ArrayView2<'a, T>, OpError> {
    cv.broadcast(IxDyn(&[m, n]))
        .ok_or_else(|| {
            OpError::Shape(format!(
                "Gemm: C of shape {shape:?} does not broadcast to [{m}, {n}]"
            ))
        })?
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| OpError::Invalid(format!("Gemm: {e}")))
}

/// Rows of X from which an f32 product packs W into dense tiles and runs the kernels' GEMM
/// (run-time SIMD, the thread pool): packing costs `K·N` copies against `M·K·N` multiply-adds.
const PACKED_MIN_ROWS: usize = 64;

/// `y = x · w` on the kernels' dense GEMM; `None` when the kernels are unavailable (the caller
/// falls back to matrixmultiply).
fn mat_mul_packed(m: usize, k: usize, n: usize, x: &[f32], w: &[f32], y: &mut [f32]) -> Option<()> {
    let kernels = patch_kernels::CpuKernels::global().ok()?;
    let tile = patch_kernels::TileShape::new(128, 128).ok()?;
    let (kt, nt) = tile.grid(k, n);
    let map = patch_kernels::TileMap::uniform(kt, nt, patch_kernels::TileKind::Dense);
    let packed = patch_kernels::pack(w, k, n, tile, &map, None).ok()?;
    kernels.matmul(m, x, &packed, None, y).ok()
}

/// The output pointer shared by the column-split workers (each writes its own columns).
#[derive(Clone, Copy)]
struct SharedF32(*mut f32);
// SAFETY: workers write disjoint columns; the caller waits for all of them.
unsafe impl Send for SharedF32 {}
unsafe impl Sync for SharedF32 {}
impl SharedF32 {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// `y = x · w` for one row-major `[m, k] x [k, n]` pair with wrapping integer arithmetic.
fn mat_mul_int(
    m: usize,
    k: usize,
    n: usize,
    x: &[i64],
    w: &[i64],
    y: &mut [i64],
) -> Result<(), OpError> {
    y.fill(0);
    for i in 0..m {
        let y_row = &mut y[i * n..(i + 1) * n];
        for (kk, &xv) in x[i * k..(i + 1) * k].iter().enumerate() {
            let w_row = &w[kk * n..(kk + 1) * n];
            for (acc, &wv) in y_row.iter_mut().zip(w_row) {
                *acc = acc.wrapping_add(xv.wrapping_mul(wv));
            }
        }
    }
    Ok(())
}

/// Runs `mm` on every batch matrix of the plan.
fn batched<T: Element>(
    plan: &Plan,
    a: &[T],
    b: &[T],
    mm: impl Fn(usize, usize, usize, &[T], &[T], &mut [T]) -> Result<(), OpError>,
) -> Result<Vec<T>, OpError> {
    let mut out = vec![T::default(); plan.batches() * plan.m * plan.n];
    batched_into(plan, a, b, mm, &mut out)?;
    Ok(out)
}

/// [`batched`] into `out` (of the plan's output volume).
fn batched_into<T: Element>(
    plan: &Plan,
    a: &[T],
    b: &[T],
    mm: impl Fn(usize, usize, usize, &[T], &[T], &mut [T]) -> Result<(), OpError>,
    out: &mut [T],
) -> Result<(), OpError> {
    let (m, k, n) = (plan.m, plan.k, plan.n);
    if m * n == 0 {
        return Ok(());
    }
    for (bi, y) in out.chunks_exact_mut(m * n).enumerate() {
        let ai = plan.a_index[bi] * m * k;
        let bj = plan.b_index[bi] * k * n;
        mm(m, k, n, &a[ai..ai + m * k], &b[bj..bj + k * n], y)?;
    }
    Ok(())
}

/// Evaluates numpy `matmul` on two tensors of the same dtype.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor, OpError> {
    matmul_into(a, b, &Outputs::none())
}

/// [`matmul`], an `f32` product written into the buffer `outputs` gives.
pub fn matmul_into(a: &Tensor, b: &Tensor, outputs: &Outputs<'_>) -> Result<Tensor, OpError> {
    check_dtype("MatMul", 0, a.dtype())?;
    check_same_dtype("MatMul", a.dtype(), 1, b.dtype())?;
    let plan = Plan::new(a.shape(), b.shape())?;
    let shape = plan.out_shape.clone();
    let out = match a.dtype() {
        DType::F32 => {
            let mut out = outputs.f32(0, plan.batches() * plan.m * plan.n);
            batched_into(
                &plan,
                a.as_slice::<f32>().map_err(tensor_err)?,
                b.as_slice::<f32>().map_err(tensor_err)?,
                mat_mul_f32,
                &mut out,
            )?;
            out.into_tensor(shape)
        }
        DType::F64 => Tensor::from_vec(
            shape,
            batched(
                &plan,
                a.as_slice::<f64>().map_err(tensor_err)?,
                b.as_slice::<f64>().map_err(tensor_err)?,
                mat_mul_blas::<f64>,
            )?,
        ),
        DType::F16 | DType::BF16 => {
            let y = matmul(&cast(a, DType::F32)?, &cast(b, DType::F32)?)?;
            return cast(&y, a.dtype());
        }
        d => {
            let av = a.to_i64_vec().map_err(tensor_err)?;
            let bv = b.to_i64_vec().map_err(tensor_err)?;
            let y = Tensor::from_vec(shape, batched(&plan, &av, &bv, mat_mul_int)?)
                .map_err(tensor_err)?;
            return cast(&y, d);
        }
    };
    out.map_err(tensor_err)
}

/// `MatMul(A, B)` with numpy semantics.
#[derive(Debug)]
struct MatMul;

impl Op for MatMul {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        check_dtype("MatMul", 0, a.ty.dtype)?;
        check_same_dtype("MatMul", a.ty.dtype, 1, b.ty.dtype)?;
        let shape = matmul_shape(&a.ty.shape, &b.ty.shape)?;
        Ok(vec![OutputFact::new(TensorType::new(a.ty.dtype, shape))])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        Ok(vec![matmul_into(
            req(inputs, 0)?,
            req(inputs, 1)?,
            outputs,
        )?])
    }
}

/// Checks that `from` broadcasts unidirectionally to `to` (right-aligned, each dim 1 or
/// equal) wherever both dims are constant; `what` names the operand in the message.
pub fn check_unidirectional(from: &[Dim], to: &[Dim], what: &str) -> Result<(), OpError> {
    let bad = || {
        OpError::Shape(format!(
            "{what} of shape {} does not broadcast to {}",
            shape_to_string(from),
            shape_to_string(to)
        ))
    };
    if from.len() > to.len() {
        return Err(bad());
    }
    let pad = to.len() - from.len();
    for (i, d) in from.iter().enumerate() {
        if let (Some(x), Some(y)) = (d.as_const(), to[pad + i].as_const()) {
            if x != 1 && x != y {
                return Err(bad());
            }
        }
    }
    Ok(())
}

/// `Gemm(A, B, C?)`: `Y = alpha * A' · B' + beta * C` with `A'`, `B'` optionally transposed
/// and `C` broadcast to `[M, N]`.
#[derive(Debug)]
struct Gemm {
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
}

impl Gemm {
    fn from_attrs(attrs: &Attrs) -> Result<Gemm, OpError> {
        Ok(Gemm {
            alpha: attrs.float_or("alpha", 1.0)?,
            beta: attrs.float_or("beta", 1.0)?,
            trans_a: attrs.int_or("transA", 0)? != 0,
            trans_b: attrs.int_or("transB", 0)? != 0,
        })
    }

    /// `(M, K)` of `A'` and `(K, N)` of `B'` from the stored shapes.
    fn dims<D: Clone>(&self, a: &[D], b: &[D]) -> ((D, D), (D, D)) {
        let ma = if self.trans_a {
            (a[1].clone(), a[0].clone())
        } else {
            (a[0].clone(), a[1].clone())
        };
        let mb = if self.trans_b {
            (b[1].clone(), b[0].clone())
        } else {
            (b[0].clone(), b[1].clone())
        };
        (ma, mb)
    }

    fn describe(&self, a: &str, b: &str) -> String {
        format!(
            "A {a}{} x B {b}{}",
            if self.trans_a { " (transposed)" } else { "" },
            if self.trans_b { " (transposed)" } else { "" }
        )
    }

    /// `Y` in f32 or f64 through matrixmultiply.
    fn eval_blas<T: Element + LinalgScalar>(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: Option<&Tensor>,
        alpha: T,
        beta: T,
        (m, n): (usize, usize),
    ) -> Result<Tensor, OpError> {
        let av = as_matrix::<T>(a)?;
        let bv = as_matrix::<T>(b)?;
        let av = if self.trans_a { av.reversed_axes() } else { av };
        let bv = if self.trans_b { bv.reversed_axes() } else { bv };
        let mut y = ndarray::Array2::<T>::zeros((m, n));
        let mut beta_used = T::zero();
        if let Some(c) = c.filter(|_| self.beta != 0.0) {
            let cv = c.view::<T>().map_err(tensor_err)?;
            y.assign(&broadcast_c(&cv, c.shape(), m, n)?);
            beta_used = beta;
        }
        general_mat_mul(alpha, &av, &bv, beta_used, &mut y);
        Ok(Tensor::from_array(y.into_dyn()))
    }

    /// `Y` in f32: transposed operands copied row-major, then the threaded product of
    /// [`mat_mul_f32`], scaled by alpha, plus beta·C.
    fn eval_f32(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: Option<&Tensor>,
        (m, k, n): (usize, usize, usize),
    ) -> Result<Tensor, OpError> {
        let row_major = |t: &Tensor, trans: bool| -> Result<Vec<f32>, OpError> {
            let v = t.as_slice::<f32>().map_err(tensor_err)?;
            if !trans {
                return Ok(v.to_vec());
            }
            let (r, cols) = (t.shape()[0], t.shape()[1]);
            let mut out = vec![0f32; v.len()];
            for i in 0..r {
                for j in 0..cols {
                    out[j * r + i] = v[i * cols + j];
                }
            }
            Ok(out)
        };
        let (av, bv) = (row_major(a, self.trans_a)?, row_major(b, self.trans_b)?);
        let mut y = vec![0f32; m * n];
        mat_mul_f32(m, k, n, &av, &bv, &mut y)?;
        if self.alpha != 1.0 {
            y.iter_mut().for_each(|v| *v *= self.alpha);
        }
        if let Some(c) = c.filter(|_| self.beta != 0.0) {
            let cv = c.view::<f32>().map_err(tensor_err)?;
            let cb = broadcast_c(&cv, c.shape(), m, n)?;
            for (o, &cc) in y.iter_mut().zip(cb.iter()) {
                *o += self.beta * cc;
            }
        }
        Tensor::from_vec(vec![m, n], y).map_err(tensor_err)
    }

    /// `Y` for integer types, with wrapping arithmetic; alpha and beta must be integers.
    fn eval_int(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: Option<&Tensor>,
        (m, k, n): (usize, usize, usize),
    ) -> Result<Tensor, OpError> {
        let integral = |name: &str, v: f32| -> Result<i64, OpError> {
            if v.is_finite() && v.fract() == 0.0 {
                Ok(v as i64)
            } else {
                Err(OpError::BadAttr {
                    name: name.into(),
                    msg: format!("{v} is not an integer, required for {} Gemm", a.dtype()),
                })
            }
        };
        let alpha = integral("alpha", self.alpha)?;
        let beta = integral("beta", self.beta)?;
        let av = a.to_i64_vec().map_err(tensor_err)?;
        let bv = b.to_i64_vec().map_err(tensor_err)?;
        let (a1, b1) = (a.shape()[1], b.shape()[1]);
        let at = |i: usize, kk: usize| {
            if self.trans_a {
                av[kk * a1 + i]
            } else {
                av[i * a1 + kk]
            }
        };
        let bt = |kk: usize, j: usize| {
            if self.trans_b {
                bv[j * b1 + kk]
            } else {
                bv[kk * b1 + j]
            }
        };
        let cb = match c.filter(|_| beta != 0) {
            Some(c) => {
                let cv = c.to_i64_vec().map_err(tensor_err)?;
                let arr = ndarray::ArrayD::from_shape_vec(IxDyn(c.shape()), cv)
                    .map_err(|e| OpError::Invalid(format!("Gemm: {e}")))?;
                let b = arr.broadcast(IxDyn(&[m, n])).ok_or_else(|| {
                    OpError::Shape(format!(
                        "Gemm: C of shape {:?} does not broadcast to [{m}, {n}]",
                        c.shape()
                    ))
                })?;
                Some(b.iter().copied().collect::<Vec<i64>>())
            }
            None => None,
        };
        let mut y = vec![0i64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0i64;
                for kk in 0..k {
                    acc = acc.wrapping_add(at(i, kk).wrapping_mul(bt(kk, j)));
                }
                let mut v = acc.wrapping_mul(alpha);
                if let Some(cb) = &cb {
                    v = v.wrapping_add(cb[i * n + j].wrapping_mul(beta));
                }
                y[i * n + j] = v;
            }
        }
        cast(
            &Tensor::from_vec(vec![m, n], y).map_err(tensor_err)?,
            a.dtype(),
        )
    }

    fn eval_tensors(&self, a: &Tensor, b: &Tensor, c: Option<&Tensor>) -> Result<Tensor, OpError> {
        check_dtype("Gemm", 0, a.dtype())?;
        check_same_dtype("Gemm", a.dtype(), 1, b.dtype())?;
        if let Some(c) = c {
            check_same_dtype("Gemm", a.dtype(), 2, c.dtype())?;
        }
        if a.rank() != 2 || b.rank() != 2 {
            return Err(OpError::Shape(format!(
                "Gemm takes matrices, got {}",
                self.describe(&format!("{:?}", a.shape()), &format!("{:?}", b.shape()))
            )));
        }
        let ((m, k), (k2, n)) = self.dims(a.shape(), b.shape());
        if k != k2 {
            return Err(OpError::Shape(format!(
                "Gemm inner dimensions differ: {k} vs {k2} in {}",
                self.describe(&format!("{:?}", a.shape()), &format!("{:?}", b.shape()))
            )));
        }
        checked_volume(&[m, n], "Gemm")?;
        if let Some(c) = c {
            let to = [Dim::from(m), Dim::from(n)];
            let from: Vec<Dim> = c.shape().iter().map(|&d| Dim::from(d)).collect();
            check_unidirectional(&from, &to, "Gemm C")?;
        }
        match a.dtype() {
            DType::F32 => self.eval_f32(a, b, c, (m, k, n)),
            DType::F64 => {
                self.eval_blas::<f64>(a, b, c, self.alpha as f64, self.beta as f64, (m, n))
            }
            DType::F16 | DType::BF16 => {
                let c32 = c.map(|c| cast(c, DType::F32)).transpose()?;
                let y =
                    self.eval_tensors(&cast(a, DType::F32)?, &cast(b, DType::F32)?, c32.as_ref())?;
                cast(&y, a.dtype())
            }
            _ => self.eval_int(a, b, c, (m, k, n)),
        }
    }
}

impl Op for Gemm {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 3)?;
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        check_dtype("Gemm", 0, a.ty.dtype)?;
        check_same_dtype("Gemm", a.ty.dtype, 1, b.ty.dtype)?;
        let describe =
            || self.describe(&shape_to_string(&a.ty.shape), &shape_to_string(&b.ty.shape));
        if a.ty.rank() != 2 || b.ty.rank() != 2 {
            return Err(OpError::Shape(format!(
                "Gemm takes matrices, got {}",
                describe()
            )));
        }
        let ((m, k), (k2, n)) = self.dims(&a.ty.shape, &b.ty.shape);
        if let (Some(x), Some(y)) = (k.as_const(), k2.as_const()) {
            if x != y {
                return Err(OpError::Shape(format!(
                    "Gemm inner dimensions differ: {x} vs {y} in {}",
                    describe()
                )));
            }
        }
        let out = vec![m, n];
        if let Some(c) = opt(inputs, 2) {
            check_same_dtype("Gemm", a.ty.dtype, 2, c.ty.dtype)?;
            check_unidirectional(&c.ty.shape, &out, "Gemm C")?;
        }
        Ok(vec![OutputFact::new(TensorType::new(a.ty.dtype, out))])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 3)?;
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        Ok(vec![self.eval_tensors(a, b, opt(inputs, 2))?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use patch_kernels::reference::gemm_f32;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn sym_shape(dims: &[&str]) -> Shape {
        dims.iter()
            .map(|d| match d.parse::<i64>() {
                Ok(v) => Dim::constant(v),
                Err(_) => Dim::sym(d),
            })
            .collect()
    }

    fn infer_op(op: &dyn Op, tys: &[TensorType]) -> Result<Vec<OutputFact>, OpError> {
        let facts: Vec<Option<InputFact<'_>>> = tys
            .iter()
            .map(|ty| {
                Some(InputFact {
                    ty,
                    value: None,
                    sym: None,
                })
            })
            .collect();
        op.infer(&facts)
    }

    fn random(rng: &mut StdRng, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn matmul_infers_symbolic_shapes() {
        let f = |a: &[&str], b: &[&str]| {
            let out = infer_op(
                &MatMul,
                &[
                    TensorType::new(DType::F32, sym_shape(a)),
                    TensorType::new(DType::F32, sym_shape(b)),
                ],
            )?;
            Ok::<String, OpError>(shape_to_string(&out[0].ty.shape))
        };
        assert_eq!(
            f(&["batch", "seq", "64"], &["64", "192"]).unwrap(),
            "[batch, seq, 192]"
        );
        assert_eq!(
            f(
                &["batch", "12", "seq", "64"],
                &["batch", "12", "64", "total"]
            )
            .unwrap(),
            "[batch, 12, seq, total]"
        );
        assert_eq!(
            f(&["2", "1", "3", "5"], &["4", "5", "7"]).unwrap(),
            "[2, 4, 3, 7]"
        );
        assert_eq!(f(&["64"], &["batch", "64", "8"]).unwrap(), "[batch, 8]");
        assert_eq!(f(&["batch", "seq", "64"], &["64"]).unwrap(), "[batch, seq]");
        assert_eq!(f(&["64"], &["64"]).unwrap(), "[]");
        // A symbolic inner dim cannot be checked and is accepted.
        assert_eq!(f(&["seq", "k"], &["64", "8"]).unwrap(), "[seq, 8]");
        let err = f(&["batch", "seq", "64"], &["32", "192"]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, OpError::Shape(_)), "{err}");
        assert!(
            msg.contains("[batch, seq, 64]") && msg.contains("[32, 192]"),
            "{msg}"
        );
        assert!(matches!(
            f(&["2", "3", "4"], &["5", "4", "6"]),
            Err(OpError::Shape(_))
        ));
        assert!(f(&[], &["3"]).is_err());
        let err = infer_op(
            &MatMul,
            &[
                TensorType::new(DType::Bool, sym_shape(&["2", "2"])),
                TensorType::new(DType::Bool, sym_shape(&["2", "2"])),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("bool"), "{err}");
        let err = infer_op(
            &MatMul,
            &[
                TensorType::new(DType::F32, sym_shape(&["2", "2"])),
                TensorType::new(DType::F16, sym_shape(&["2", "2"])),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, OpError::DType { index: 1, .. }), "{err}");
    }

    #[test]
    fn matmul_matches_reference_gemm_on_ragged_shapes() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut cases = vec![(1, 1, 1), (1, 7, 1), (3, 1, 5), (17, 33, 9), (64, 64, 64)];
        for _ in 0..20 {
            cases.push((
                rng.gen_range(1..70),
                rng.gen_range(1..90),
                rng.gen_range(1..70),
            ));
        }
        for (m, k, n) in cases {
            let a = random(&mut rng, &[m, k]);
            let b = random(&mut rng, &[k, n]);
            let y = matmul(&a, &b).unwrap();
            assert_eq!(y.shape(), &[m, n]);
            let mut want = vec![0f32; m * n];
            gemm_f32(
                m,
                k,
                n,
                a.as_slice().unwrap(),
                b.as_slice().unwrap(),
                None,
                &mut want,
            );
            assert_close(
                y.as_slice::<f32>().unwrap(),
                &want,
                1e-5,
                &format!("[{m}, {k}] x [{k}, {n}]"),
            );
        }
    }

    /// Checks a broadcast batched product batch by batch against the scalar reference.
    fn check_batched(a_shape: &[usize], b_shape: &[usize], out_shape: &[usize]) {
        let mut rng = StdRng::seed_from_u64(11);
        let a = random(&mut rng, a_shape);
        let b = random(&mut rng, b_shape);
        let y = matmul(&a, &b).unwrap();
        assert_eq!(y.shape(), out_shape, "{a_shape:?} x {b_shape:?}");
        // Independent broadcast: index each operand's batch with numpy rules.
        let a3 = if a_shape.len() == 1 {
            vec![1, a_shape[0]]
        } else {
            a_shape.to_vec()
        };
        let b3 = if b_shape.len() == 1 {
            vec![b_shape[0], 1]
        } else {
            b_shape.to_vec()
        };
        let (m, k) = (a3[a3.len() - 2], a3[a3.len() - 1]);
        let n = b3[b3.len() - 1];
        let ab = &a3[..a3.len() - 2];
        let bb = &b3[..b3.len() - 2];
        let rank = ab.len().max(bb.len());
        let batch: Vec<usize> = (0..rank)
            .map(|i| {
                let x = (ab.len() + i).checked_sub(rank).map_or(1, |j| ab[j]);
                let y = (bb.len() + i).checked_sub(rank).map_or(1, |j| bb[j]);
                x.max(y)
            })
            .collect();
        let total: usize = batch.iter().product();
        let flat = |sub: &[usize], idx: &[usize]| {
            let pad = rank - sub.len();
            let mut f = 0;
            for (i, &d) in sub.iter().enumerate() {
                f = f * d + if d == 1 { 0 } else { idx[pad + i] };
            }
            f
        };
        let av = a.as_slice::<f32>().unwrap();
        let bv = b.as_slice::<f32>().unwrap();
        let yv = y.as_slice::<f32>().unwrap();
        for t in 0..total {
            let mut idx = vec![0; rank];
            let mut r = t;
            for d in (0..rank).rev() {
                idx[d] = r % batch[d];
                r /= batch[d];
            }
            let ai = flat(ab, &idx) * m * k;
            let bi = flat(bb, &idx) * k * n;
            let mut want = vec![0f32; m * n];
            gemm_f32(
                m,
                k,
                n,
                &av[ai..ai + m * k],
                &bv[bi..bi + k * n],
                None,
                &mut want,
            );
            assert_close(
                &yv[t * m * n..(t + 1) * m * n],
                &want,
                1e-5,
                &format!("{a_shape:?} x {b_shape:?} batch {t}"),
            );
        }
    }

    #[test]
    fn matmul_broadcasts_batches_like_numpy() {
        check_batched(&[2, 1, 3, 5], &[4, 5, 7], &[2, 4, 3, 7]);
        check_batched(&[4, 5, 7], &[2, 1, 7, 3], &[2, 4, 5, 3]);
        check_batched(&[2, 3, 4, 6], &[2, 3, 6, 5], &[2, 3, 4, 5]);
        check_batched(&[3, 13, 17], &[17, 9], &[3, 13, 9]);
        check_batched(&[13, 17], &[3, 17, 9], &[3, 13, 9]);
        check_batched(&[1, 4, 2], &[5, 2, 3], &[5, 4, 3]);
        check_batched(&[17], &[3, 17, 9], &[3, 9]);
        check_batched(&[3, 13, 17], &[17], &[3, 13]);
        check_batched(&[17], &[17], &[]);
    }

    #[test]
    fn matmul_eval_errors_name_both_shapes() {
        let a = Tensor::zeros(DType::F32, vec![2, 3]);
        let b = Tensor::zeros(DType::F32, vec![4, 5]);
        let err = matmul(&a, &b).unwrap_err();
        assert!(matches!(err, OpError::Shape(_)));
        assert!(err.to_string().contains("[2, 3] x [4, 5]"), "{err}");
        let a = Tensor::zeros(DType::F32, vec![2, 2, 3]);
        let b = Tensor::zeros(DType::F32, vec![3, 3, 5]);
        assert!(matches!(matmul(&a, &b), Err(OpError::Shape(_))));
        let s = Tensor::scalar(1f32);
        assert!(matmul(&s, &b).is_err());
        // An output too large to count is an error, not an overflow.
        let wide = Tensor::zeros(DType::F32, vec![1 << 40, 0]);
        let tall = Tensor::zeros(DType::F32, vec![0, 1 << 40]);
        assert!(matches!(matmul(&wide, &tall), Err(OpError::Shape(_))));
        let i8s = Tensor::zeros(DType::I8, vec![2, 2]);
        let err = matmul(&i8s, &i8s).unwrap_err();
        assert!(err.to_string().contains("i8"), "{err}");
    }

    #[test]
    fn matmul_handles_empty_dims() {
        let a = Tensor::zeros(DType::F32, vec![2, 0]);
        let b = Tensor::zeros(DType::F32, vec![0, 3]);
        let y = matmul(&a, &b).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert!(y.as_slice::<f32>().unwrap().iter().all(|&v| v == 0.0));
        let a = Tensor::zeros(DType::F32, vec![0, 4, 2]);
        let b = Tensor::zeros(DType::F32, vec![2, 3]);
        assert_eq!(matmul(&a, &b).unwrap().shape(), &[0, 4, 3]);
    }

    #[test]
    fn matmul_f64_half_and_int_types() {
        let av = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let bv = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let want = [58.0, 64.0, 139.0, 154.0];
        let a = Tensor::from_vec(vec![2, 3], av.to_vec()).unwrap();
        let b = Tensor::from_vec(vec![3, 2], bv.to_vec()).unwrap();
        assert_eq!(matmul(&a, &b).unwrap().as_slice::<f64>().unwrap(), &want);
        let a16 =
            Tensor::from_vec(vec![2, 3], av.iter().map(|&x| f16::from_f64(x)).collect()).unwrap();
        let b16 =
            Tensor::from_vec(vec![3, 2], bv.iter().map(|&x| f16::from_f64(x)).collect()).unwrap();
        let y = matmul(&a16, &b16).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        assert_eq!(y.to_f64_vec().unwrap(), want);
        let abf = cast(&a, DType::BF16).unwrap();
        let bbf = cast(&b, DType::BF16).unwrap();
        let y = matmul(&abf, &bbf).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        // bf16 has 8 significant bits: 139 rounds to 139 (exact), 154 to 154.
        let got: Vec<f64> = y
            .as_slice::<bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_f64())
            .collect();
        assert_eq!(got, want);
        for d in [DType::I64, DType::I32, DType::U32, DType::U64] {
            let y = matmul(&cast(&a, d).unwrap(), &cast(&b, d).unwrap()).unwrap();
            assert_eq!(y.dtype(), d);
            assert_eq!(y.to_i64_vec().unwrap(), vec![58, 64, 139, 154], "{d}");
        }
        // Integer overflow wraps instead of panicking.
        let big = Tensor::from_vec(vec![1, 1], vec![i32::MAX]).unwrap();
        let two = Tensor::from_vec(vec![1, 1], vec![2i32]).unwrap();
        assert_eq!(
            matmul(&big, &two).unwrap().as_slice::<i32>().unwrap(),
            &[i32::MAX.wrapping_mul(2)]
        );
    }

    #[test]
    fn matmul_op_through_registry() {
        let mut r = OpRegistry::empty();
        register(&mut r);
        let op = r.build("", "MatMul", 17, &Attrs::new(), "mm").unwrap();
        let a = Tensor::from_vec(vec![1, 2], vec![1f32, 2.]).unwrap();
        let b = Tensor::from_vec(vec![2, 1], vec![3f32, 4.]).unwrap();
        let y = op.eval(&[Some(&a), Some(&b)]).unwrap();
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[11.]);
        assert!(op.eval(&[Some(&a)]).is_err());
        assert!(r.build("", "MatMul", 12, &Attrs::new(), "mm").is_err());
    }

    /// Independent Gemm: explicit index arithmetic in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive_gemm(
        a: &Tensor,
        b: &Tensor,
        c: Option<&Tensor>,
        alpha: f64,
        beta: f64,
        ta: bool,
        tb: bool,
    ) -> Vec<f32> {
        let (as_, bs) = (a.shape(), b.shape());
        let (m, k) = if ta {
            (as_[1], as_[0])
        } else {
            (as_[0], as_[1])
        };
        let n = if tb { bs[0] } else { bs[1] };
        let av = a.to_f64_vec().unwrap();
        let bv = b.to_f64_vec().unwrap();
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f64;
                for kk in 0..k {
                    let x = if ta {
                        av[kk * as_[1] + i]
                    } else {
                        av[i * as_[1] + kk]
                    };
                    let w = if tb {
                        bv[j * bs[1] + kk]
                    } else {
                        bv[kk * bs[1] + j]
                    };
                    acc += x * w;
                }
                let mut v = alpha * acc;
                if let Some(c) = c {
                    let cs = c.shape();
                    let cv = c.to_f64_vec().unwrap();
                    let ci = match cs.len() {
                        0 => 0,
                        1 => {
                            if cs[0] == 1 {
                                0
                            } else {
                                j
                            }
                        }
                        _ => {
                            let r = if cs[0] == 1 { 0 } else { i };
                            let q = if cs[1] == 1 { 0 } else { j };
                            r * cs[1] + q
                        }
                    };
                    v += beta * cv[ci];
                }
                y[i * n + j] = v as f32;
            }
        }
        y
    }

    #[test]
    fn gemm_matches_naive_with_transposes_and_broadcast_c() {
        let mut rng = StdRng::seed_from_u64(3);
        let (m, k, n) = (5, 7, 3);
        for ta in [false, true] {
            for tb in [false, true] {
                for c_shape in [
                    None,
                    Some(vec![]),
                    Some(vec![n]),
                    Some(vec![m, 1]),
                    Some(vec![m, n]),
                    Some(vec![1, n]),
                ] {
                    let a = random(&mut rng, &if ta { [k, m] } else { [m, k] });
                    let b = random(&mut rng, &if tb { [n, k] } else { [k, n] });
                    let c = c_shape.as_ref().map(|s| random(&mut rng, s));
                    let mut attrs = Attrs::new()
                        .with("alpha", crate::ir::Attr::Float(0.5))
                        .with("beta", crate::ir::Attr::Float(2.0));
                    if ta {
                        attrs = attrs.with("transA", crate::ir::Attr::Int(1));
                    }
                    if tb {
                        attrs = attrs.with("transB", crate::ir::Attr::Int(1));
                    }
                    let op = Gemm::from_attrs(&attrs).unwrap();
                    let y = op.eval(&[Some(&a), Some(&b), c.as_ref()]).unwrap();
                    assert_eq!(y[0].shape(), &[m, n]);
                    let want = naive_gemm(&a, &b, c.as_ref(), 0.5, 2.0, ta, tb);
                    assert_close(
                        y[0].as_slice::<f32>().unwrap(),
                        &want,
                        1e-5,
                        &format!("transA={ta} transB={tb} C={c_shape:?}"),
                    );
                    // The f64 path agrees too.
                    let a64 = cast(&a, DType::F64).unwrap();
                    let b64 = cast(&b, DType::F64).unwrap();
                    let c64 = c.as_ref().map(|c| cast(c, DType::F64).unwrap());
                    let y64 = op.eval(&[Some(&a64), Some(&b64), c64.as_ref()]).unwrap();
                    let y64 = cast(&y64[0], DType::F32).unwrap();
                    assert_close(y64.as_slice::<f32>().unwrap(), &want, 1e-6, "f64");
                }
            }
        }
    }

    #[test]
    fn gemm_gpt2_conv1d_default_attrs_and_ints() {
        // GPT-2 Conv1D: Gemm(x[M, K], w[K, N], bias[N]) with alpha = beta = 1.
        let x = Tensor::from_vec(vec![2, 2], vec![1f32, 2., 3., 4.]).unwrap();
        let w = Tensor::from_vec(vec![2, 3], vec![1f32, 0., 1., 0., 1., 1.]).unwrap();
        let bias = Tensor::from_vec(vec![3], vec![10f32, 20., 30.]).unwrap();
        let op = Gemm::from_attrs(&Attrs::new()).unwrap();
        let y = op.eval(&[Some(&x), Some(&w), Some(&bias)]).unwrap();
        assert_eq!(
            y[0].as_slice::<f32>().unwrap(),
            &[11., 22., 33., 13., 24., 37.]
        );
        // beta = 0 ignores C, even when it holds infinities.
        let inf = Tensor::from_vec(vec![3], vec![f32::INFINITY; 3]).unwrap();
        let op0 =
            Gemm::from_attrs(&Attrs::new().with("beta", crate::ir::Attr::Float(0.0))).unwrap();
        let y = op0.eval(&[Some(&x), Some(&w), Some(&inf)]).unwrap();
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[1., 2., 3., 3., 4., 7.]);
        let xi = cast(&x, DType::I64).unwrap();
        let wi = cast(&w, DType::I64).unwrap();
        let bi = cast(&bias, DType::I64).unwrap();
        let y = op.eval(&[Some(&xi), Some(&wi), Some(&bi)]).unwrap();
        assert_eq!(y[0].as_slice::<i64>().unwrap(), &[11, 22, 33, 13, 24, 37]);
        let half =
            Gemm::from_attrs(&Attrs::new().with("alpha", crate::ir::Attr::Float(0.5))).unwrap();
        assert!(matches!(
            half.eval(&[Some(&xi), Some(&wi), None]),
            Err(OpError::BadAttr { .. })
        ));
        let xh = cast(&x, DType::F16).unwrap();
        let wh = cast(&w, DType::F16).unwrap();
        let bh = cast(&bias, DType::F16).unwrap();
        let y = op.eval(&[Some(&xh), Some(&wh), Some(&bh)]).unwrap();
        assert_eq!(y[0].dtype(), DType::F16);
        assert_eq!(
            y[0].to_f64_vec().unwrap(),
            vec![11., 22., 33., 13., 24., 37.]
        );
    }

    #[test]
    fn gemm_infers_symbolic_shapes_and_rejects_bad_operands() {
        let op = Gemm::from_attrs(&Attrs::new().with("transB", crate::ir::Attr::Int(1))).unwrap();
        let out = infer_op(
            &op,
            &[
                TensorType::new(DType::F32, sym_shape(&["batch*seq", "768"])),
                TensorType::new(DType::F32, sym_shape(&["2304", "768"])),
                TensorType::new(DType::F32, sym_shape(&["2304"])),
            ],
        )
        .unwrap();
        assert_eq!(out[0].ty.dtype, DType::F32);
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch*seq, 2304]");
        let plain = Gemm::from_attrs(&Attrs::new()).unwrap();
        let err = infer_op(
            &plain,
            &[
                TensorType::new(DType::F32, sym_shape(&["n", "768"])),
                TensorType::new(DType::F32, sym_shape(&["2304", "768"])),
            ],
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("[n, 768]") && err.to_string().contains("[2304, 768]"),
            "{err}"
        );
        let err = infer_op(
            &plain,
            &[
                TensorType::new(DType::F32, sym_shape(&["n", "4"])),
                TensorType::new(DType::F32, sym_shape(&["4", "8"])),
                TensorType::new(DType::F32, sym_shape(&["3"])),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("[3]"), "{err}");
        assert!(infer_op(
            &plain,
            &[
                TensorType::new(DType::F32, sym_shape(&["n", "4", "1"])),
                TensorType::new(DType::F32, sym_shape(&["4", "8"])),
            ],
        )
        .is_err());
        let a = Tensor::zeros(DType::F32, vec![2, 4]);
        let b = Tensor::zeros(DType::F32, vec![4, 3]);
        let c = Tensor::zeros(DType::F32, vec![2, 2]);
        assert!(matches!(
            plain.eval(&[Some(&a), Some(&b), Some(&c)]),
            Err(OpError::Shape(_))
        ));
    }
}
