//! Training losses and the gradients of the forward ops that have no ONNX gradient op, in the
//! `patch` domain (since opset 1). A loss returns an f32 scalar (shape `[]`); its gradient op
//! takes the forward inputs and `dL`, the incoming gradient of that scalar (f32, shape `[]` or
//! `[1]`), and returns the vector-Jacobian product with respect to the first input only.
//!
//! * `patch.MseLoss(Y, T)`: `mean((Y - T)²)` over every element, Y and T f32 of one shape (no
//!   broadcasting); 0 when they are empty.
//! * `patch.MseLossGrad(Y, T, dL)` → dY `= 2 · (Y - T) · dL / numel`.
//! * `patch.CrossEntropy(Logits, Labels) {ignore_index = -100}`: the mean over rows of
//!   `-log softmax(Logits)[label]`, Logits f32 `[..., V]`, Labels i64 of Logits' shape without
//!   the last axis. Rows whose label is `ignore_index` are left out of the mean (0 when every
//!   row is); any other label outside `[0, V)` is an error naming its row.
//! * `patch.CrossEntropyGrad(Logits, Labels, dL) {ignore_index = -100}` → dLogits
//!   `= (softmax(Logits) - onehot(label)) · dL / kept` per kept row, zeros for ignored rows.
//! * `patch.KlDiv(Logits, TeacherLogits) {temperature = 1.0}`: Hinton's distillation loss
//!   `T² · mean over rows of KL(p_t ‖ p_s) = Σ p_t (log p_t - log p_s)`, with
//!   `p_s = softmax(Logits / T)` and `p_t = softmax(TeacherLogits / T)` along the last axis,
//!   both f32 of one shape. The `T²` factor keeps the gradient's scale independent of `T`.
//! * `patch.KlDivGrad(Logits, TeacherLogits, dL) {temperature = 1.0}` → dLogits
//!   `= T · (p_s - p_t) · dL / rows` (the teacher gets no gradient).
//! * `patch.GatherGrad(Data, Indices, dY) {axis = 0}` → dData: the vector-Jacobian product of
//!   ONNX `Gather(Data, Indices, axis)` with respect to Data, i.e. zeros of Data's shape with
//!   every slice of dY added at its index (repeated indices accumulate). Indices are int32 or
//!   int64, negative ones count from the end, out-of-range ones are errors; Data (f32) is read
//!   for its shape only, dY has Gather's output shape.
//!
//! Softmax statistics are log-sum-exp stable: one pass for the row max, one for the sum of
//! `exp(x - max)` (`fused.rs`'s Cephes `exp`, relative error ≤ 2e-7, in a form that
//! vectorizes fully), sums in f64. Loss sums accumulate in f64 and round to f32 once. Each row
//! kernel is compiled for AVX-512, AVX2 + FMA and the baseline, chosen at run time; rows split
//! over the kernels' thread pool when the tensor is large enough to pay for the wake-up.

use std::sync::Arc;

use super::{
    arity, for_each_row, for_each_row_split, norm_axis, req, InputFact, Op, OpError, OpRegistry,
    OutputFact, Outputs, PARALLEL_MIN,
};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::ir::{Attrs, TensorType};
use crate::tensor::Tensor;

pub fn register(r: &mut OpRegistry) {
    r.register("patch", "MseLoss", 1, |_, _| Ok(Arc::new(MseLoss)));
    r.register("patch", "MseLossGrad", 1, |_, _| Ok(Arc::new(MseLossGrad)));
    r.register("patch", "CrossEntropy", 1, |attrs, _| {
        Ok(Arc::new(CrossEntropy::from_attrs(attrs)?))
    });
    r.register("patch", "CrossEntropyGrad", 1, |attrs, _| {
        Ok(Arc::new(CrossEntropyGrad(CrossEntropy::from_attrs(attrs)?)))
    });
    r.register("patch", "KlDiv", 1, |attrs, _| {
        Ok(Arc::new(KlDiv::from_attrs(attrs)?))
    });
    r.register("patch", "KlDivGrad", 1, |attrs, _| {
        Ok(Arc::new(KlDivGrad(KlDiv::from_attrs(attrs)?)))
    });
    r.register("patch", "GatherGrad", 1, |attrs, _| {
        Ok(Arc::new(GatherGrad {
            axis: attrs.int_or("axis", 0)?,
        }))
    });
}

// ---------------------------------------------------------------------------------------------
// Shared checks

fn tensor_err(e: crate::RuntimeError) -> OpError {
    OpError::Invalid(e.to_string())
}

fn invalid(op: &str, msg: impl std::fmt::Display) -> OpError {
    OpError::Invalid(format!("{op}: {msg}"))
}

fn require_dtype(op: &str, what: &str, ty: &TensorType, dtype: DType) -> Result<(), OpError> {
    if ty.dtype == dtype {
        Ok(())
    } else {
        Err(invalid(
            op,
            format!("{what} must be {dtype}, got {}", ty.dtype),
        ))
    }
}

/// False when the two shapes provably differ (other ranks, or two constant sizes that differ);
/// symbolic sizes are checked again on the tensors.
fn may_match(a: &[Dim], b: &[Dim]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| match (x.as_const(), y.as_const()) {
                (Some(p), Some(q)) => p == q,
                _ => true,
            })
}

/// Checks `dL` (input `i`) is an f32 scalar of shape `[]` or `[1]`.
fn infer_scalar(op: &str, inputs: &[Option<InputFact<'_>>], i: usize) -> Result<(), OpError> {
    let d = req(inputs, i)?;
    require_dtype(op, "dL", d.ty, DType::F32)?;
    if !may_match(&d.ty.shape, &[]) && !may_match(&d.ty.shape, &[Dim::constant(1)]) {
        return Err(invalid(
            op,
            format!("dL must be a scalar of shape [] or [1], got {}", d.ty),
        ));
    }
    Ok(())
}

/// The value of `dL` (see [`infer_scalar`]).
fn scalar_value(op: &str, t: &Tensor) -> Result<f32, OpError> {
    let v = t.as_slice::<f32>().map_err(tensor_err)?;
    match v {
        [x] if t.rank() <= 1 => Ok(*x),
        _ => Err(invalid(
            op,
            format!(
                "dL must be a scalar of shape [] or [1], got {}{:?}",
                t.dtype(),
                t.shape()
            ),
        )),
    }
}

fn scalar_fact() -> Vec<OutputFact> {
    vec![OutputFact::new(TensorType::new(DType::F32, Vec::new()))]
}

fn scalar_out(outputs: &Outputs<'_>, v: f64) -> Result<Vec<Tensor>, OpError> {
    let mut out = outputs.f32(0, 1);
    out[0] = v as f32;
    Ok(vec![out.into_tensor(Vec::new()).map_err(tensor_err)?])
}

/// Two f32 tensors of one shape (inputs 0 and 1) at inference.
fn infer_pair<'a>(
    op: &str,
    names: [&str; 2],
    inputs: &[Option<InputFact<'a>>],
    min_rank: usize,
) -> Result<&'a TensorType, OpError> {
    let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
    require_dtype(op, names[0], a.ty, DType::F32)?;
    require_dtype(op, names[1], b.ty, DType::F32)?;
    if a.ty.rank() < min_rank {
        return Err(invalid(
            op,
            format!("{} must have rank ≥ {min_rank}, got {}", names[0], a.ty),
        ));
    }
    if !may_match(&a.ty.shape, &b.ty.shape) {
        return Err(invalid(
            op,
            format!(
                "{} {} and {} {} must have the same shape",
                names[0], a.ty, names[1], b.ty
            ),
        ));
    }
    Ok(a.ty)
}

/// The f32 data of two tensors of one shape (inputs 0 and 1).
fn eval_pair<'a>(
    op: &str,
    names: [&str; 2],
    inputs: &[Option<&'a Tensor>],
    min_rank: usize,
) -> Result<(&'a Tensor, &'a [f32], &'a [f32]), OpError> {
    let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
    if a.shape() != b.shape() {
        return Err(invalid(
            op,
            format!(
                "{} {:?} and {} {:?} must have the same shape",
                names[0],
                a.shape(),
                names[1],
                b.shape()
            ),
        ));
    }
    if a.rank() < min_rank {
        return Err(invalid(
            op,
            format!(
                "{} must have rank ≥ {min_rank}, got {:?}",
                names[0],
                a.shape()
            ),
        ));
    }
    let x = a.as_slice::<f32>().map_err(|e| invalid(op, e))?;
    let y = b.as_slice::<f32>().map_err(|e| invalid(op, e))?;
    Ok((a, x, y))
}

/// `Σ f(r)` over `rows` rows in f64, the rows split over the pool when `work` (elements read)
/// is large. Each row's f64 value travels through the pool's f32 rows as a (hi, lo) pair, so
/// the sum keeps f64 precision.
fn sum_rows(rows: usize, work: usize, f: &(dyn Fn(usize) -> f64 + Sync)) -> f64 {
    let mut parts = vec![0f32; 2 * rows];
    for_each_row_split(&mut parts, 2, work >= PARALLEL_MIN, &|r, o| {
        let v = f(r);
        let hi = v as f32;
        o[0] = hi;
        o[1] = if hi.is_finite() {
            (v - hi as f64) as f32
        } else {
            0.0
        };
    });
    parts
        .chunks_exact(2)
        .map(|p| p[0] as f64 + p[1] as f64)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Row kernels: a scalar body compiled three times (AVX-512, AVX2 + FMA, baseline), the variant
// chosen at run time.

/// Defines `fn $name(args) -> ret` running `$body(args)` compiled for the best instruction
/// set the CPU has (the body must be `#[inline(always)]` so that it is compiled into each).
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),*) = $body:ident) => {
        simd_dispatch!($(#[$meta])* fn $name($($arg: $ty),*) -> () = $body);
    };
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Elements per block of the exp temporaries.
const CHUNK: usize = 64;

/// f64 accumulator lanes (independent chains, so the sums vectorize).
const LANES: usize = 16;

/// The largest element (NaN skipped; `-inf` for an empty row), in 16 lanes.
#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in chunks.by_ref() {
        for l in 0..16 {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a })
}

/// Adds the elements of `x` to `acc`, in f64.
#[inline(always)]
fn add_lanes(acc: &mut [f64; LANES], x: &[f32]) {
    let mut chunks = x.chunks_exact(LANES);
    for c in chunks.by_ref() {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v as f64;
        }
    }
    acc[0] += chunks.remainder().iter().map(|&v| v as f64).sum::<f64>();
}

/// `exp(x)` for every element, in place: `fused.rs`'s `exp_in_place` (the Cephes
/// polynomial, bit for bit the same results) with `2ⁿ` built by adding `1.5 · 2²³ + 127` to
/// the float `n` and shifting its bits, instead of `n as i32`: LLVM turns that saturating cast
/// into one scalar conversion per lane, which makes the whole loop ~4× slower.
#[inline(always)]
fn exp_fast(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// `1.5 · 2²³ + 127`: adding it to a small integral float leaves `n + 127` in the low
    /// mantissa bits.
    const BIAS: f32 = 12_582_912.0 + 127.0;
    for x in xs.iter_mut() {
        let v = x.clamp(-87.336_55, 88.376_26);
        let n = (v * LOG2E + 0.5).floor();
        let r = v - n * LN2_HI - n * LN2_LO;
        let p = ((((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r
            + 4.166_579_6e-2)
            * r
            + 1.666_666_5e-1)
            * r
            + 0.5)
            * r
            * r)
            + r
            + 1.0;
        // n ∈ [-126, 128], so `n + 127` fits the 9 bits that survive the shift.
        let scaled = p * f32::from_bits((n + BIAS).to_bits() << 23);
        *x = if *x < -87.336_55 {
            0.0
        } else if *x > 88.376_26 {
            f32::INFINITY
        } else {
            scaled
        };
    }
}

/// `e[j] = exp(s · (x[j] - m))`.
#[inline(always)]
fn scaled_exp(e: &mut [f32], x: &[f32], m: f32, s: f32) {
    for (d, &v) in e.iter_mut().zip(x) {
        *d = s * (v - m);
    }
    exp_fast(e);
}

/// `(max, Σ exp(s · (x - max)))` of a row, the sum in f64.
#[inline(always)]
fn softmax_stats_body(x: &[f32], s: f32) -> (f32, f64) {
    let m = max_body(x);
    let mut e = [0f32; CHUNK];
    let mut acc = [0f64; LANES];
    for c in x.chunks(CHUNK) {
        let e = &mut e[..c.len()];
        scaled_exp(e, c, m, s);
        add_lanes(&mut acc, e);
    }
    (m, acc.iter().sum())
}

simd_dispatch!(
    /// [`softmax_stats_body`].
    fn softmax_stats(x: &[f32], s: f32) -> (f32, f64) = softmax_stats_body
);

/// `o = (softmax(z) - onehot(label)) · c`.
#[inline(always)]
fn ce_grad_row_body(o: &mut [f32], z: &[f32], label: usize, c: f32) {
    let m = max_body(z);
    let mut acc = [0f64; LANES];
    for (oc, zc) in o.chunks_mut(CHUNK).zip(z.chunks(CHUNK)) {
        scaled_exp(oc, zc, m, 1.0);
        add_lanes(&mut acc, oc);
    }
    let k = (c as f64 / acc.iter().sum::<f64>()) as f32;
    for v in o.iter_mut() {
        *v *= k;
    }
    o[label] -= c;
}

simd_dispatch!(
    /// [`ce_grad_row_body`].
    fn ce_grad_row(o: &mut [f32], z: &[f32], label: usize, c: f32) = ce_grad_row_body
);

/// `KL(p_t ‖ p_s)` of one row, `p = softmax(s · logits)`:
/// `s · Σ p_t (t - z) + lse(s z) - lse(s t)` (as `Σ p_t = 1`), sums in f64 (terms in f32). Teacher entries
/// with `p_t = 0` add nothing (even against a `-inf` student logit).
#[inline(always)]
fn kl_row_body(z: &[f32], t: &[f32], s: f32) -> f64 {
    let (mz, mt) = (max_body(z), max_body(t));
    let (mut ez, mut et) = ([0f32; CHUNK], [0f32; CHUNK]);
    let (mut sz, mut st, mut w) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
    for (zc, tc) in z.chunks(CHUNK).zip(t.chunks(CHUNK)) {
        let n = zc.len();
        let (ez, et) = (&mut ez[..n], &mut et[..n]);
        scaled_exp(ez, zc, mz, s);
        scaled_exp(et, tc, mt, s);
        add_lanes(&mut sz, ez);
        add_lanes(&mut st, et);
        // The terms of `Σ p_t (t - z)` (unnormalized), in f32, summed in f64.
        for (((d, &p), &a), &b) in ez.iter_mut().zip(et.iter()).zip(tc).zip(zc) {
            *d = if p > 0.0 { p * (a - b) } else { 0.0 };
        }
        add_lanes(&mut w, ez);
    }
    let (sz, st, w): (f64, f64, f64) = (sz.iter().sum(), st.iter().sum(), w.iter().sum());
    let s64 = s as f64;
    let lse_z = s64 * mz as f64 + sz.ln();
    let lse_t = s64 * mt as f64 + st.ln();
    s64 * w / st + (lse_z - lse_t)
}

simd_dispatch!(
    /// [`kl_row_body`].
    fn kl_row(z: &[f32], t: &[f32], s: f32) -> f64 = kl_row_body
);

/// `o = (softmax(s z) - softmax(s t)) · c`.
#[inline(always)]
fn kl_grad_row_body(o: &mut [f32], z: &[f32], t: &[f32], s: f32, c: f32) {
    // The student's exponentials stay in `o`; the teacher's are computed twice.
    let mz = max_body(z);
    let mut sz = [0f64; LANES];
    for (oc, zc) in o.chunks_mut(CHUNK).zip(z.chunks(CHUNK)) {
        scaled_exp(oc, zc, mz, s);
        add_lanes(&mut sz, oc);
    }
    let (mt, st) = softmax_stats_body(t, s);
    let (kz, kt) = (
        (c as f64 / sz.iter().sum::<f64>()) as f32,
        (c as f64 / st) as f32,
    );
    let mut et = [0f32; CHUNK];
    for (oc, tc) in o.chunks_mut(CHUNK).zip(t.chunks(CHUNK)) {
        let et = &mut et[..tc.len()];
        scaled_exp(et, tc, mt, s);
        for (d, &e) in oc.iter_mut().zip(et.iter()) {
            *d = kz * *d - kt * e;
        }
    }
}

simd_dispatch!(
    /// [`kl_grad_row_body`].
    fn kl_grad_row(o: &mut [f32], z: &[f32], t: &[f32], s: f32, c: f32) = kl_grad_row_body
);

/// `Σ (y - t)²` in f64.
#[inline(always)]
fn sq_diff_sum_body(y: &[f32], t: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let (yc, tc) = (y.chunks_exact(LANES), t.chunks_exact(LANES));
    let tail: f64 = yc
        .remainder()
        .iter()
        .zip(tc.remainder())
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    for (a, b) in yc.zip(tc) {
        for l in 0..LANES {
            let d = a[l] as f64 - b[l] as f64;
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f64>() + tail
}

simd_dispatch!(
    /// [`sq_diff_sum_body`].
    fn sq_diff_sum(y: &[f32], t: &[f32]) -> f64 = sq_diff_sum_body
);

/// Elements per task of the MSE sum.
const MSE_BLOCK: usize = 1 << 14;

// ---------------------------------------------------------------------------------------------
// MseLoss

/// `patch.MseLoss` (see the module docs).
#[derive(Debug)]
pub struct MseLoss;

impl MseLoss {
    const OP: &'static str = "patch.MseLoss";

    /// The loss in f64.
    fn loss(y: &[f32], t: &[f32]) -> f64 {
        let n = y.len();
        if n == 0 {
            return 0.0;
        }
        let blocks = n.div_ceil(MSE_BLOCK);
        let total = sum_rows(blocks, n, &|b| {
            let r = b * MSE_BLOCK..((b + 1) * MSE_BLOCK).min(n);
            sq_diff_sum(&y[r.clone()], &t[r])
        });
        total / n as f64
    }
}

impl Op for MseLoss {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        infer_pair(Self::OP, ["Y", "T"], inputs, 0)?;
        Ok(scalar_fact())
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let (_, y, t) = eval_pair(Self::OP, ["Y", "T"], inputs, 0)?;
        scalar_out(outputs, Self::loss(y, t))
    }
}

/// `patch.MseLossGrad` (see the module docs).
#[derive(Debug)]
pub struct MseLossGrad;

impl Op for MseLossGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        const OP: &str = "patch.MseLossGrad";
        arity(inputs, 3, 3)?;
        let y = infer_pair(OP, ["Y", "T"], inputs, 0)?;
        infer_scalar(OP, inputs, 2)?;
        Ok(vec![OutputFact::new(y.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        const OP: &str = "patch.MseLossGrad";
        arity(inputs, 3, 3)?;
        let (yt, y, t) = eval_pair(OP, ["Y", "T"], inputs, 0)?;
        let dl = scalar_value(OP, req(inputs, 2)?)?;
        let c = (2.0 * dl as f64 / y.len().max(1) as f64) as f32;
        let mut out = outputs.f32(0, y.len());
        let width = yt.shape().last().copied().unwrap_or(1).max(1);
        for_each_row(&mut out, width, &|r, o| {
            let (yr, tr) = (&y[r * width..][..width], &t[r * width..][..width]);
            for ((d, &a), &b) in o.iter_mut().zip(yr).zip(tr) {
                *d = (a - b) * c;
            }
        });
        Ok(vec![out
            .into_tensor(yt.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

// ---------------------------------------------------------------------------------------------
// CrossEntropy

/// `patch.CrossEntropy` (see the module docs).
#[derive(Debug)]
pub struct CrossEntropy {
    pub ignore_index: i64,
}

/// Logits and labels of a cross-entropy, checked.
struct CeRows<'a> {
    logits: &'a Tensor,
    z: &'a [f32],
    /// Per row, its label, `None` for an ignored row.
    labels: Vec<Option<usize>>,
    kept: usize,
    width: usize,
}

impl CrossEntropy {
    pub fn from_attrs(attrs: &Attrs) -> Result<CrossEntropy, OpError> {
        Ok(CrossEntropy {
            ignore_index: attrs.int_or("ignore_index", -100)?,
        })
    }

    fn infer_inputs(&self, op: &str, inputs: &[Option<InputFact<'_>>]) -> Result<(), OpError> {
        let (z, l) = (req(inputs, 0)?, req(inputs, 1)?);
        require_dtype(op, "Logits", z.ty, DType::F32)?;
        require_dtype(op, "Labels", l.ty, DType::I64)?;
        let Some((_, lead)) = z.ty.shape.split_last() else {
            return Err(invalid(
                op,
                format!("Logits must have rank ≥ 1, got {}", z.ty),
            ));
        };
        if !may_match(lead, &l.ty.shape) {
            return Err(invalid(
                op,
                format!(
                    "Labels {} must have the shape of Logits {} without its last axis",
                    l.ty, z.ty
                ),
            ));
        }
        Ok(())
    }

    fn rows<'a>(&self, op: &str, inputs: &[Option<&'a Tensor>]) -> Result<CeRows<'a>, OpError> {
        let (zt, lt) = (req(inputs, 0)?, req(inputs, 1)?);
        let Some((&width, lead)) = zt.shape().split_last() else {
            return Err(invalid(op, "Logits must have rank ≥ 1, got a scalar"));
        };
        if lead != lt.shape() {
            return Err(invalid(
                op,
                format!(
                    "Labels {:?} must have the shape of Logits {:?} without its last axis",
                    lt.shape(),
                    zt.shape()
                ),
            ));
        }
        let z = zt.as_slice::<f32>().map_err(|e| invalid(op, e))?;
        let raw = lt
            .as_slice::<i64>()
            .map_err(|e| invalid(op, format!("Labels: {e}")))?;
        let mut kept = 0;
        let labels = raw
            .iter()
            .enumerate()
            .map(|(row, &l)| {
                if l == self.ignore_index {
                    return Ok(None);
                }
                if l < 0 || l as u64 >= width as u64 {
                    return Err(invalid(
                        op,
                        format!("label {l} at row {row} is outside [0, {width})"),
                    ));
                }
                kept += 1;
                Ok(Some(l as usize))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CeRows {
            logits: zt,
            z,
            labels,
            kept,
            width,
        })
    }

    /// The loss in f64.
    fn loss(&self, inputs: &[Option<&Tensor>]) -> Result<f64, OpError> {
        let CeRows {
            z,
            labels,
            kept,
            width,
            ..
        } = self.rows("patch.CrossEntropy", inputs)?;
        if kept == 0 {
            return Ok(0.0);
        }
        let total = sum_rows(labels.len(), z.len(), &|r| match labels[r] {
            None => 0.0,
            Some(label) => {
                let row = &z[r * width..][..width];
                let (m, sum) = softmax_stats(row, 1.0);
                m as f64 + sum.ln() - row[label] as f64
            }
        });
        Ok(total / kept as f64)
    }
}

impl Op for CrossEntropy {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        self.infer_inputs("patch.CrossEntropy", inputs)?;
        Ok(scalar_fact())
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        scalar_out(outputs, self.loss(inputs)?)
    }
}

/// `patch.CrossEntropyGrad` (see the module docs).
#[derive(Debug)]
pub struct CrossEntropyGrad(pub CrossEntropy);

impl Op for CrossEntropyGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        const OP: &str = "patch.CrossEntropyGrad";
        arity(inputs, 3, 3)?;
        self.0.infer_inputs(OP, inputs)?;
        infer_scalar(OP, inputs, 2)?;
        Ok(vec![OutputFact::new(req(inputs, 0)?.ty.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        const OP: &str = "patch.CrossEntropyGrad";
        arity(inputs, 3, 3)?;
        let CeRows {
            logits,
            z,
            labels,
            kept,
            width,
        } = self.0.rows(OP, inputs)?;
        let dl = scalar_value(OP, req(inputs, 2)?)?;
        let mut out = outputs.f32(0, z.len());
        if kept > 0 && width > 0 {
            let c = (dl as f64 / kept as f64) as f32;
            for_each_row(&mut out, width, &|r, o| {
                if let Some(label) = labels[r] {
                    ce_grad_row(o, &z[r * width..][..width], label, c);
                }
            });
        }
        Ok(vec![out
            .into_tensor(logits.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

// ---------------------------------------------------------------------------------------------
// KlDiv

/// `patch.KlDiv` (see the module docs).
#[derive(Debug)]
pub struct KlDiv {
    pub temperature: f32,
}

impl KlDiv {
    pub fn from_attrs(attrs: &Attrs) -> Result<KlDiv, OpError> {
        let temperature = attrs.float_or("temperature", 1.0)?;
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(OpError::BadAttr {
                name: "temperature".into(),
                msg: format!("patch.KlDiv needs a finite temperature > 0, got {temperature}"),
            });
        }
        Ok(KlDiv { temperature })
    }

    /// The loss in f64.
    fn loss(&self, inputs: &[Option<&Tensor>]) -> Result<f64, OpError> {
        let (zt, z, t) = eval_pair("patch.KlDiv", ["Logits", "TeacherLogits"], inputs, 1)?;
        let width = zt.shape().last().copied().unwrap_or(0);
        let rows = z.len().checked_div(width).unwrap_or(0);
        if rows == 0 {
            return Ok(0.0);
        }
        let s = 1.0 / self.temperature;
        let total = sum_rows(rows, 2 * z.len(), &|r| {
            kl_row(&z[r * width..][..width], &t[r * width..][..width], s)
        });
        let tt = self.temperature as f64;
        Ok(tt * tt * total / rows as f64)
    }
}

impl Op for KlDiv {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        infer_pair("patch.KlDiv", ["Logits", "TeacherLogits"], inputs, 1)?;
        Ok(scalar_fact())
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        scalar_out(outputs, self.loss(inputs)?)
    }
}

/// `patch.KlDivGrad` (see the module docs).
#[derive(Debug)]
pub struct KlDivGrad(pub KlDiv);

impl Op for KlDivGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        const OP: &str = "patch.KlDivGrad";
        arity(inputs, 3, 3)?;
        let z = infer_pair(OP, ["Logits", "TeacherLogits"], inputs, 1)?;
        infer_scalar(OP, inputs, 2)?;
        Ok(vec![OutputFact::new(z.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        const OP: &str = "patch.KlDivGrad";
        arity(inputs, 3, 3)?;
        let (zt, z, t) = eval_pair(OP, ["Logits", "TeacherLogits"], inputs, 1)?;
        let dl = scalar_value(OP, req(inputs, 2)?)?;
        let width = zt.shape().last().copied().unwrap_or(0);
        let rows = z.len().checked_div(width).unwrap_or(0);
        let mut out = outputs.f32(0, z.len());
        if rows > 0 {
            let temp = self.0.temperature;
            let c = (temp as f64 * dl as f64 / rows as f64) as f32;
            for_each_row(&mut out, width, &|r, o| {
                let (zr, tr) = (&z[r * width..][..width], &t[r * width..][..width]);
                kl_grad_row(o, zr, tr, 1.0 / temp, c);
            });
        }
        Ok(vec![out
            .into_tensor(zt.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

// ---------------------------------------------------------------------------------------------
// GatherGrad

/// `patch.GatherGrad` (see the module docs).
#[derive(Debug)]
pub struct GatherGrad {
    pub axis: i64,
}

impl GatherGrad {
    const OP: &'static str = "patch.GatherGrad";
}

impl Op for GatherGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        let op = Self::OP;
        arity(inputs, 3, 3)?;
        let (data, idx, dy) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        require_dtype(op, "Data", data.ty, DType::F32)?;
        require_dtype(op, "dY", dy.ty, DType::F32)?;
        if !matches!(idx.ty.dtype, DType::I32 | DType::I64) {
            return Err(invalid(
                op,
                format!("Indices must be int32 or int64, got {}", idx.ty.dtype),
            ));
        }
        let axis = norm_axis(self.axis, data.ty.rank()).map_err(|e| invalid(op, e))?;
        let want: Vec<Dim> = data.ty.shape[..axis]
            .iter()
            .chain(&idx.ty.shape)
            .chain(&data.ty.shape[axis + 1..])
            .cloned()
            .collect();
        if !may_match(&want, &dy.ty.shape) {
            return Err(invalid(
                op,
                format!(
                    "dY {} must have Gather's output shape {} (Data {}, Indices {}, axis {axis})",
                    dy.ty,
                    crate::dim::shape_to_string(&want),
                    data.ty,
                    idx.ty
                ),
            ));
        }
        if let (Some(v), Some(n)) = (idx.value, data.ty.shape[axis].as_const()) {
            let ints = v.to_i64_vec().map_err(|e| invalid(op, e))?;
            for (k, &i) in ints.iter().enumerate() {
                norm_gather_index(i, k, n as usize, axis)?;
            }
        }
        Ok(vec![OutputFact::new(data.ty.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        let op = Self::OP;
        arity(inputs, 3, 3)?;
        let (data, indices, dyt) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        if data.dtype() != DType::F32 {
            return Err(invalid(
                op,
                format!("Data must be f32, got {}", data.dtype()),
            ));
        }
        if !matches!(indices.dtype(), DType::I32 | DType::I64) {
            return Err(invalid(
                op,
                format!("Indices must be int32 or int64, got {}", indices.dtype()),
            ));
        }
        let shape = data.shape();
        let axis = norm_axis(self.axis, shape.len()).map_err(|e| invalid(op, e))?;
        let n = shape[axis];
        let idx = indices
            .to_i64_vec()
            .map_err(|e| invalid(op, e))?
            .into_iter()
            .enumerate()
            .map(|(k, i)| norm_gather_index(i, k, n, axis))
            .collect::<Result<Vec<_>, _>>()?;
        let want: Vec<usize> = shape[..axis]
            .iter()
            .chain(indices.shape())
            .chain(&shape[axis + 1..])
            .copied()
            .collect();
        if dyt.shape() != want.as_slice() {
            return Err(invalid(
                op,
                format!(
                    "dY {:?} must have Gather's output shape {want:?} (Data {shape:?}, \
                     Indices {:?}, axis {axis})",
                    dyt.shape(),
                    indices.shape()
                ),
            ));
        }
        let dy = dyt
            .as_slice::<f32>()
            .map_err(|e| invalid(op, format!("dY: {e}")))?;
        let inner: usize = shape[axis + 1..].iter().product();
        let k = idx.len();
        let mut out = outputs.f32(0, data.len());
        if !out.is_empty() {
            // One output block `[n, inner]` per index of the axes before `axis`.
            for_each_row(&mut out, n * inner, &|o, block| {
                for (j, &i) in idx.iter().enumerate() {
                    let src = &dy[(o * k + j) * inner..][..inner];
                    for (d, &g) in block[i * inner..][..inner].iter_mut().zip(src) {
                        *d += g;
                    }
                }
            });
        }
        Ok(vec![out.into_tensor(shape.to_vec()).map_err(tensor_err)?])
    }
}

/// Index `i` (the `k`-th) of a gather along an axis of size `n`, negative from the end.
fn norm_gather_index(i: i64, k: usize, n: usize, axis: usize) -> Result<usize, OpError> {
    let j = if i < 0 { i + n as i64 } else { i };
    if j < 0 || j >= n as i64 {
        return Err(invalid(
            GatherGrad::OP,
            format!("index {i} (Indices element {k}) is out of range for axis {axis} of size {n}"),
        ));
    }
    Ok(j as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dim::shape_of;
    use crate::ir::Attr;
    use rand::{Rng, SeedableRng};

    fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    fn random(shape: &[usize], seed: u64, range: f32) -> Tensor {
        let mut g = rng(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| g.gen_range(-range..range)).collect();
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    fn op(name: &str, attrs: &Attrs) -> Arc<dyn Op> {
        OpRegistry::onnx()
            .build("patch", name, 1, attrs, "n")
            .unwrap()
    }

    fn ce(ignore_index: i64) -> CrossEntropy {
        CrossEntropy { ignore_index }
    }

    fn scalar_of(t: &Tensor) -> f64 {
        assert_eq!(t.shape(), &[] as &[usize]);
        t.as_slice::<f32>().unwrap()[0] as f64
    }

    /// Checks `grad` against central differences of `loss` at `x`, every element, with
    /// `|fd - grad| ≤ atol + rtol · |grad|`. The step is the one f32 actually takes.
    fn check_fd(
        what: &str,
        x: &Tensor,
        grad: &Tensor,
        loss: &dyn Fn(&Tensor) -> f64,
        eps: f32,
        (atol, rtol): (f64, f64),
    ) {
        assert_eq!(grad.shape(), x.shape(), "{what}");
        let xs = x.as_slice::<f32>().unwrap();
        let g = grad.as_slice::<f32>().unwrap();
        let mut worst = 0f64;
        for i in 0..xs.len() {
            let at = |v: f32| {
                let mut p = xs.to_vec();
                p[i] = v;
                Tensor::from_vec(x.shape().to_vec(), p).unwrap()
            };
            let (hi, lo) = (xs[i] + eps, xs[i] - eps);
            let fd = (loss(&at(hi)) - loss(&at(lo))) / (hi as f64 - lo as f64);
            let err = (fd - g[i] as f64).abs();
            worst = worst.max(err);
            assert!(
                err <= atol + rtol * fd.abs(),
                "{what}: element {i}: finite difference {fd}, gradient {}",
                g[i]
            );
        }
        assert!(worst.is_finite(), "{what}");
    }

    #[test]
    fn exp_fast_is_fused_exp_bit_for_bit() {
        let mut xs: Vec<f32> = (-40_000..=40_000).map(|i| i as f32 * 0.0025).collect();
        xs.extend([
            f32::NEG_INFINITY,
            -1e30,
            -87.336_55,
            -87.34,
            88.376_26,
            88.38,
            -0.0,
            f32::MIN_POSITIVE,
            f32::INFINITY,
        ]);
        let (mut fast, mut want) = (xs.clone(), xs.clone());
        exp_fast(&mut fast);
        super::super::fused::exp_in_place(&mut want);
        for ((&x, &a), &b) in xs.iter().zip(&fast).zip(&want) {
            assert_eq!(a.to_bits(), b.to_bits(), "exp({x}): {a} vs {b}");
        }
        let mut nan = [f32::NAN];
        exp_fast(&mut nan);
        assert!(nan[0].is_nan());
    }

    /// The dispatched kernels (AVX-512 or AVX2 here) give the baseline bodies' results bit for
    /// bit, on a ragged row width.
    #[test]
    fn simd_kernels_match_their_scalar_bodies() {
        let v = 1000 + 37;
        let z = random(&[v], 60, 6.0);
        let t = random(&[v], 61, 6.0);
        let (z, t) = (z.as_slice::<f32>().unwrap(), t.as_slice::<f32>().unwrap());
        let (m, s) = softmax_stats(z, 0.7);
        let (m0, s0) = softmax_stats_body(z, 0.7);
        assert_eq!((m.to_bits(), s.to_bits()), (m0.to_bits(), s0.to_bits()));
        assert_eq!(
            kl_row(z, t, 0.4).to_bits(),
            kl_row_body(z, t, 0.4).to_bits()
        );
        assert_eq!(
            sq_diff_sum(z, t).to_bits(),
            sq_diff_sum_body(z, t).to_bits()
        );
        let (mut a, mut b) = (vec![0f32; v], vec![0f32; v]);
        ce_grad_row(&mut a, z, 5, 0.3);
        ce_grad_row_body(&mut b, z, 5, 0.3);
        assert_eq!(a, b);
        kl_grad_row(&mut a, z, t, 0.4, 0.3);
        kl_grad_row_body(&mut b, z, t, 0.4, 0.3);
        assert_eq!(a, b);
    }

    #[test]
    fn every_loss_op_is_registered() {
        let r = OpRegistry::onnx();
        for name in [
            "MseLoss",
            "MseLossGrad",
            "CrossEntropy",
            "CrossEntropyGrad",
            "KlDiv",
            "KlDivGrad",
            "GatherGrad",
        ] {
            assert!(r.contains("patch", name), "{name}");
        }
        assert!(!r.contains("", "CrossEntropy"));
        let bad = Attrs::new().with("temperature", Attr::Float(0.0));
        assert!(r.build("patch", "KlDiv", 1, &bad, "k").is_err());
        assert!(r.build("patch", "KlDivGrad", 1, &bad, "k").is_err());
    }

    #[test]
    fn mse_loss_of_a_hand_example() {
        let y = Tensor::from_vec(vec![2, 2], vec![1f32, 2.0, 3.0, 4.0]).unwrap();
        let t = Tensor::from_vec(vec![2, 2], vec![0f32, 2.0, 5.0, 1.0]).unwrap();
        // (1 + 0 + 4 + 9) / 4.
        let got = op("MseLoss", &Attrs::new())
            .eval(&[Some(&y), Some(&t)])
            .unwrap();
        assert_eq!(scalar_of(&got[0]), 3.5);
        let dl = Tensor::scalar(2f32);
        let g = op("MseLossGrad", &Attrs::new())
            .eval(&[Some(&y), Some(&t), Some(&dl)])
            .unwrap();
        // 2 · (Y - T) · 2 / 4.
        assert_eq!(g[0].as_slice::<f32>().unwrap(), &[1.0, 0.0, -2.0, 3.0]);
        let t3 = Tensor::from_vec(vec![4], vec![0f32, 2.0, 5.0, 1.0]).unwrap();
        let err = op("MseLoss", &Attrs::new())
            .eval(&[Some(&y), Some(&t3)])
            .unwrap_err();
        assert!(err.to_string().contains("patch.MseLoss"), "{err}");
        let empty = Tensor::zeros(DType::F32, vec![0, 3]);
        let got = op("MseLoss", &Attrs::new())
            .eval(&[Some(&empty), Some(&empty)])
            .unwrap();
        assert_eq!(scalar_of(&got[0]), 0.0);
    }

    /// Large enough for the pool: against a plain f64 sum.
    #[test]
    fn mse_loss_matches_a_plain_sum_on_many_blocks() {
        let (y, t) = (random(&[3, 20_001], 1, 2.0), random(&[3, 20_001], 2, 2.0));
        let (yv, tv) = (y.to_f64_vec().unwrap(), t.to_f64_vec().unwrap());
        let want = yv
            .iter()
            .zip(&tv)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            / yv.len() as f64;
        let got = MseLoss::loss(y.as_slice().unwrap(), t.as_slice().unwrap());
        assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
    }

    #[test]
    fn mse_loss_grad_matches_finite_differences() {
        let (y, t) = (random(&[3, 5, 7], 3, 2.0), random(&[3, 5, 7], 4, 2.0));
        let dl = 1.7f32;
        let g = op("MseLossGrad", &Attrs::new())
            .eval(&[Some(&y), Some(&t), Some(&Tensor::scalar(dl))])
            .unwrap();
        let ts = t.as_slice::<f32>().unwrap();
        let loss = |x: &Tensor| MseLoss::loss(x.as_slice().unwrap(), ts) * dl as f64;
        // The loss is quadratic: central differences are exact up to rounding.
        check_fd("MseLossGrad", &y, &g[0], &loss, 1e-2, (1e-7, 1e-5));
    }

    /// Naive f64 cross-entropy per row (`None`: ignored) and its gradient.
    fn ce_reference(z: &[f64], labels: &[Option<usize>], v: usize, dl: f64) -> (f64, Vec<f64>) {
        let kept = labels.iter().flatten().count() as f64;
        let mut loss = 0.0;
        let mut grad = vec![0.0; z.len()];
        for (r, l) in labels.iter().enumerate() {
            let Some(l) = *l else { continue };
            let row = &z[r * v..][..v];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|x| (x - m).exp()).sum();
            loss += m + sum.ln() - row[l];
            for j in 0..v {
                let p = (row[j] - m).exp() / sum;
                grad[r * v + j] = (p - (j == l) as u8 as f64) * dl / kept;
            }
        }
        (loss / kept, grad)
    }

    fn labels_tensor(lead: &[usize], labels: &[i64]) -> Tensor {
        Tensor::from_vec(lead.to_vec(), labels.to_vec()).unwrap()
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_ln_v() {
        let v = 13usize;
        let z = Tensor::from_vec(vec![2, 3, v], vec![0.25f32; 6 * v]).unwrap();
        let l = labels_tensor(&[2, 3], &[0, 12, -100, 5, -100, 7]);
        let got = op("CrossEntropy", &Attrs::new())
            .eval(&[Some(&z), Some(&l)])
            .unwrap();
        let want = (v as f64).ln();
        assert!(
            (scalar_of(&got[0]) - want).abs() <= 1e-6,
            "{got:?} vs {want}"
        );
        // Every row ignored: 0, and a zero gradient.
        let all = Attrs::new().with("ignore_index", Attr::Int(3));
        let l3 = labels_tensor(&[2, 3], &[3; 6]);
        let got = op("CrossEntropy", &all)
            .eval(&[Some(&z), Some(&l3)])
            .unwrap();
        assert_eq!(scalar_of(&got[0]), 0.0);
        let g = op("CrossEntropyGrad", &all)
            .eval(&[Some(&z), Some(&l3), Some(&Tensor::scalar(1f32))])
            .unwrap();
        assert!(g[0].as_slice::<f32>().unwrap().iter().all(|&x| x == 0.0));
    }

    #[test]
    fn cross_entropy_rejects_bad_labels_and_shapes() {
        let z = random(&[2, 3, 5], 5, 1.0);
        let l = labels_tensor(&[2, 3], &[0, 1, 2, 3, 5, -100]);
        let err = op("CrossEntropy", &Attrs::new())
            .eval(&[Some(&z), Some(&l)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("label 5 at row 4"), "{err}");
        let neg = labels_tensor(&[2, 3], &[0, 1, -1, 3, 4, 0]);
        let dl = Tensor::scalar(1f32);
        let err = op("CrossEntropyGrad", &Attrs::new())
            .eval(&[Some(&z), Some(&neg), Some(&dl)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("label -1 at row 2"), "{err}");
        let short = labels_tensor(&[2, 2], &[0, 1, 2, 3]);
        let err = op("CrossEntropy", &Attrs::new())
            .eval(&[Some(&z), Some(&short)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("Labels [2, 2]"), "{err}");
        let wide_dl = Tensor::from_vec(vec![2], vec![1f32, 1.0]).unwrap();
        let ok = labels_tensor(&[2, 3], &[0; 6]);
        let err = op("CrossEntropyGrad", &Attrs::new())
            .eval(&[Some(&z), Some(&ok), Some(&wide_dl)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dL"), "{err}");
    }

    #[test]
    fn loss_ops_infer_types_and_reject_bad_inputs() {
        let f = |shape: &[usize]| TensorType::new(DType::F32, shape_of(shape));
        let i64t = |shape: &[usize]| TensorType::new(DType::I64, shape_of(shape));
        fn fact(ty: &TensorType) -> Option<InputFact<'_>> {
            Some(InputFact {
                ty,
                value: None,
                sym: None,
            })
        }
        let (z, l, dl) = (f(&[2, 3, 5]), i64t(&[2, 3]), f(&[]));
        let out = op("CrossEntropy", &Attrs::new())
            .infer(&[fact(&z), fact(&l)])
            .unwrap();
        assert_eq!(out[0].ty, f(&[]));
        let out = op("CrossEntropyGrad", &Attrs::new())
            .infer(&[fact(&z), fact(&l), fact(&dl)])
            .unwrap();
        assert_eq!(out[0].ty, z);
        let lf = f(&[2, 3]);
        let err = op("CrossEntropy", &Attrs::new())
            .infer(&[fact(&z), fact(&lf)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("patch.CrossEntropy") && err.contains("Labels"),
            "{err}"
        );
        let t = f(&[2, 3, 6]);
        let err = op("KlDiv", &Attrs::new())
            .infer(&[fact(&z), fact(&t)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("patch.KlDiv") && err.contains("TeacherLogits"),
            "{err}"
        );
        let out = op("KlDivGrad", &Attrs::new())
            .infer(&[fact(&z), fact(&z), fact(&f(&[1]))])
            .unwrap();
        assert_eq!(out[0].ty, z);
        let err = op("MseLossGrad", &Attrs::new())
            .infer(&[fact(&z), fact(&z), fact(&f(&[2]))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("patch.MseLossGrad") && err.contains("dL"),
            "{err}"
        );
        // GatherGrad: dY must be Gather's output shape.
        let (data, idx) = (f(&[10, 4]), i64t(&[2, 3]));
        let out = op("GatherGrad", &Attrs::new())
            .infer(&[fact(&data), fact(&idx), fact(&f(&[2, 3, 4]))])
            .unwrap();
        assert_eq!(out[0].ty, data);
        let err = op("GatherGrad", &Attrs::new())
            .infer(&[fact(&data), fact(&idx), fact(&f(&[2, 4]))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("patch.GatherGrad") && err.contains("dY"),
            "{err}"
        );
        // Constant indices are range-checked.
        let bad = Tensor::from_vec(vec![2], vec![3i64, 10]).unwrap();
        let idx2 = i64t(&[2]);
        let err = op("GatherGrad", &Attrs::new())
            .infer(&[
                fact(&data),
                Some(InputFact {
                    ty: &idx2,
                    value: Some(&bad),
                    sym: None,
                }),
                fact(&f(&[2, 4])),
            ])
            .unwrap_err()
            .to_string();
        assert!(err.contains("index 10"), "{err}");
    }

    #[test]
    fn cross_entropy_grad_matches_finite_differences() {
        let shape = [3usize, 5, 7];
        let z = random(&shape, 6, 3.0);
        let mut g = rng(7);
        let labels: Vec<i64> = (0..15)
            .map(|r| if r % 4 == 1 { -7 } else { g.gen_range(0..7) })
            .collect();
        let l = labels_tensor(&shape[..2], &labels);
        let attrs = Attrs::new().with("ignore_index", Attr::Int(-7));
        let dl = 1.3f32;
        let grad = op("CrossEntropyGrad", &attrs)
            .eval(&[Some(&z), Some(&l), Some(&Tensor::scalar(dl))])
            .unwrap();
        // Ignored rows get exact zeros.
        let gs = grad[0].as_slice::<f32>().unwrap();
        assert!(gs[7..14].iter().all(|&x| x == 0.0));
        let fwd = ce(-7);
        let loss = |x: &Tensor| fwd.loss(&[Some(x), Some(&l)]).unwrap() * dl as f64;
        check_fd("CrossEntropyGrad", &z, &grad[0], &loss, 1e-2, (5e-6, 1e-3));
        // The forward op against the f64 reference.
        let kept: Vec<Option<usize>> = labels
            .iter()
            .map(|&x| (x != -7).then_some(x as usize))
            .collect();
        let (want, _) = ce_reference(&z.to_f64_vec().unwrap(), &kept, 7, 1.0);
        let got = fwd.loss(&[Some(&z), Some(&l)]).unwrap();
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    }

    /// Enough rows for the pool and a vocabulary that is not a multiple of the blocks: loss
    /// and gradient against the plain f64 reference.
    #[test]
    fn cross_entropy_matches_a_plain_reference_when_large() {
        let (rows, v) = (90usize, 1000usize);
        let z = random(&[rows, v], 8, 8.0);
        let mut g = rng(9);
        let labels: Vec<i64> = (0..rows)
            .map(|r| {
                if r % 9 == 0 {
                    -100
                } else {
                    g.gen_range(0..v as i64)
                }
            })
            .collect();
        let l = labels_tensor(&[rows], &labels);
        let kept: Vec<Option<usize>> = labels
            .iter()
            .map(|&x| (x >= 0).then_some(x as usize))
            .collect();
        let dl = 0.8f32;
        let (want, want_grad) = ce_reference(&z.to_f64_vec().unwrap(), &kept, v, dl as f64);
        let got = op("CrossEntropy", &Attrs::new())
            .eval(&[Some(&z), Some(&l)])
            .unwrap();
        let got = scalar_of(&got[0]);
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
        let grad = op("CrossEntropyGrad", &Attrs::new())
            .eval(&[Some(&z), Some(&l), Some(&Tensor::scalar(dl))])
            .unwrap();
        let c = dl as f64 / kept.iter().flatten().count() as f64;
        for (i, (&a, &b)) in grad[0]
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .zip(&want_grad)
            .enumerate()
        {
            assert!((a as f64 - b).abs() <= 2e-6 * c, "at {i}: {a} vs {b}");
        }
    }

    /// Naive f64 `T² · mean KL(p_t ‖ p_s)` and its gradient w.r.t. the student logits.
    fn kl_reference(z: &[f64], t: &[f64], v: usize, temp: f64, dl: f64) -> (f64, Vec<f64>) {
        let rows = z.len() / v;
        let softmax = |x: &[f64]| {
            let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = x.iter().map(|a| ((a - m) / temp).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|a| a / s).collect::<Vec<_>>()
        };
        let (mut loss, mut grad) = (0.0, vec![0.0; z.len()]);
        for r in 0..rows {
            let ps = softmax(&z[r * v..][..v]);
            let pt = softmax(&t[r * v..][..v]);
            for j in 0..v {
                loss += pt[j] * (pt[j].ln() - ps[j].ln());
                grad[r * v + j] = temp * (ps[j] - pt[j]) * dl / rows as f64;
            }
        }
        (temp * temp * loss / rows as f64, grad)
    }

    #[test]
    fn kl_div_of_identical_logits_is_zero() {
        let z = random(&[4, 3, 11], 10, 5.0);
        for temp in [1.0f32, 3.0] {
            let attrs = Attrs::new().with("temperature", Attr::Float(temp));
            let got = op("KlDiv", &attrs).eval(&[Some(&z), Some(&z)]).unwrap();
            assert_eq!(scalar_of(&got[0]), 0.0, "T {temp}");
            let g = op("KlDivGrad", &attrs)
                .eval(&[Some(&z), Some(&z), Some(&Tensor::scalar(1f32))])
                .unwrap();
            assert!(g[0]
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .all(|&x| x.abs() <= 1e-8));
        }
        let other = random(&[4, 3, 10], 11, 1.0);
        let err = op("KlDiv", &Attrs::new())
            .eval(&[Some(&z), Some(&other)])
            .unwrap_err();
        assert!(err.to_string().contains("patch.KlDiv"), "{err}");
    }

    #[test]
    fn kl_div_grad_matches_finite_differences() {
        let shape = [3usize, 5, 7];
        let z = random(&shape, 12, 3.0);
        let t = random(&shape, 13, 3.0);
        for temp in [1.0f32, 2.5] {
            let fwd = KlDiv { temperature: temp };
            let dl = 0.9f32;
            let grad = KlDivGrad(KlDiv { temperature: temp })
                .eval(&[Some(&z), Some(&t), Some(&Tensor::scalar(dl))])
                .unwrap();
            let loss = |x: &Tensor| fwd.loss(&[Some(x), Some(&t)]).unwrap() * dl as f64;
            check_fd("KlDivGrad", &z, &grad[0], &loss, 1e-2, (5e-6, 1e-3));
            let (want, _) = kl_reference(
                &z.to_f64_vec().unwrap(),
                &t.to_f64_vec().unwrap(),
                7,
                temp as f64,
                1.0,
            );
            let got = fwd.loss(&[Some(&z), Some(&t)]).unwrap();
            assert!(
                (got - want).abs() <= 1e-6 * want,
                "T {temp}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn kl_div_matches_a_plain_reference_when_large() {
        let (rows, v, temp) = (70usize, 1000usize, 2.0f32);
        let z = random(&[rows, v], 14, 8.0);
        let t = random(&[rows, v], 15, 8.0);
        let dl = 1.1f32;
        let (want, want_grad) = kl_reference(
            &z.to_f64_vec().unwrap(),
            &t.to_f64_vec().unwrap(),
            v,
            temp as f64,
            dl as f64,
        );
        let attrs = Attrs::new().with("temperature", Attr::Float(temp));
        let got = op("KlDiv", &attrs).eval(&[Some(&z), Some(&t)]).unwrap();
        let got = scalar_of(&got[0]);
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
        let grad = op("KlDivGrad", &attrs)
            .eval(&[Some(&z), Some(&t), Some(&Tensor::scalar(dl))])
            .unwrap();
        let c = temp as f64 * dl as f64 / rows as f64;
        for (i, (&a, &b)) in grad[0]
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .zip(&want_grad)
            .enumerate()
        {
            assert!((a as f64 - b).abs() <= 2e-6 * c, "at {i}: {a} vs {b}");
        }
    }

    #[test]
    fn gather_grad_matches_finite_differences() {
        let gather = |axis: i64| {
            OpRegistry::onnx()
                .build(
                    "",
                    "Gather",
                    13,
                    &Attrs::new().with("axis", Attr::Int(axis)),
                    "g",
                )
                .unwrap()
        };
        /// Data shape, indices shape, indices (repeated and negative ones), axis.
        type Case = (&'static [usize], &'static [usize], &'static [i64], i64);
        let cases: [Case; 4] = [
            (&[6, 3], &[2, 4], &[0, 5, 2, 0, -1, 3, 2, 2], 0),
            (&[4, 5, 3], &[3], &[4, -5, 4], 1),
            (&[4, 5, 3], &[2, 2], &[1, 1, -1, 0], -2),
            (&[3, 2], &[], &[1], 0),
        ];
        for (seed, (ds, is, ids, axis)) in cases.into_iter().enumerate() {
            let data = random(ds, 20 + seed as u64, 2.0);
            let idx = Tensor::from_vec(is.to_vec(), ids.to_vec()).unwrap();
            let out_shape = gather(axis).eval(&[Some(&data), Some(&idx)]).unwrap()[0]
                .shape()
                .to_vec();
            let r = random(&out_shape, 30 + seed as u64, 1.0);
            let attrs = Attrs::new().with("axis", Attr::Int(axis));
            let grad = op("GatherGrad", &attrs)
                .eval(&[Some(&data), Some(&idx), Some(&r)])
                .unwrap();
            let rv = r.to_f64_vec().unwrap();
            let loss = |x: &Tensor| {
                let y = gather(axis).eval(&[Some(x), Some(&idx)]).unwrap();
                y[0].to_f64_vec()
                    .unwrap()
                    .iter()
                    .zip(&rv)
                    .map(|(a, b)| a * b)
                    .sum::<f64>()
            };
            let what = format!("GatherGrad case {seed}");
            check_fd(&what, &data, &grad[0], &loss, 1e-2, (1e-6, 1e-6));
        }
        // int32 indices give the same result.
        let data = random(&[6, 3], 40, 1.0);
        let r = random(&[3, 3], 41, 1.0);
        let i64s = Tensor::from_vec(vec![3], vec![1i64, 1, -6]).unwrap();
        let i32s = Tensor::from_vec(vec![3], vec![1i32, 1, -6]).unwrap();
        let a = op("GatherGrad", &Attrs::new())
            .eval(&[Some(&data), Some(&i64s), Some(&r)])
            .unwrap();
        let b = op("GatherGrad", &Attrs::new())
            .eval(&[Some(&data), Some(&i32s), Some(&r)])
            .unwrap();
        assert_eq!(
            a[0].as_slice::<f32>().unwrap(),
            b[0].as_slice::<f32>().unwrap()
        );
        let row1 = &a[0].as_slice::<f32>().unwrap()[3..6];
        let rs = r.as_slice::<f32>().unwrap();
        assert_eq!(row1, &[rs[0] + rs[3], rs[1] + rs[4], rs[2] + rs[5]]);
    }

    #[test]
    fn gather_grad_rejects_bad_indices_and_shapes() {
        let data = random(&[6, 3], 42, 1.0);
        let r = random(&[2, 3], 43, 1.0);
        for bad in [6i64, -7] {
            let idx = Tensor::from_vec(vec![2], vec![0i64, bad]).unwrap();
            let err = op("GatherGrad", &Attrs::new())
                .eval(&[Some(&data), Some(&idx), Some(&r)])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("patch.GatherGrad") && err.contains(&format!("index {bad}")),
                "{err}"
            );
        }
        let idx = Tensor::from_vec(vec![3], vec![0i64, 1, 2]).unwrap();
        let err = op("GatherGrad", &Attrs::new())
            .eval(&[Some(&data), Some(&idx), Some(&r)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dY [2, 3]"), "{err}");
        let fidx = Tensor::from_vec(vec![2], vec![0f32, 1.0]).unwrap();
        assert!(op("GatherGrad", &Attrs::new())
            .eval(&[Some(&data), Some(&fidx), Some(&r)])
            .is_err());
        let axis = Attrs::new().with("axis", Attr::Int(2));
        assert!(op("GatherGrad", &axis)
            .eval(&[Some(&data), Some(&idx), Some(&r)])
            .is_err());
    }

    /// The real size (512 rows of a 49152 vocabulary): prints the time of each op.
    /// `cargo test -p patch-runtime --release --lib loss_ops_at_training_size -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn loss_ops_at_training_size() {
        let (rows, v) = (512usize, 49152usize);
        let z = random(&[rows, v], 50, 4.0);
        let t = random(&[rows, v], 51, 4.0);
        let mut g = rng(52);
        let labels: Vec<i64> = (0..rows).map(|_| g.gen_range(0..v as i64)).collect();
        let l = labels_tensor(&[rows], &labels);
        let dl = Tensor::scalar(1f32);
        let kl = Attrs::new().with("temperature", Attr::Float(2.0));
        let runs: [(&str, &Attrs, Vec<Option<&Tensor>>); 4] = [
            ("CrossEntropy", &Attrs::new(), vec![Some(&z), Some(&l)]),
            (
                "CrossEntropyGrad",
                &Attrs::new(),
                vec![Some(&z), Some(&l), Some(&dl)],
            ),
            ("KlDiv", &kl, vec![Some(&z), Some(&t)]),
            ("KlDivGrad", &kl, vec![Some(&z), Some(&t), Some(&dl)]),
        ];
        for (name, attrs, inputs) in runs {
            let o = op(name, attrs);
            o.eval(&inputs).unwrap();
            let start = std::time::Instant::now();
            let out = o.eval(&inputs).unwrap();
            let dt = start.elapsed();
            let first = out[0].as_slice::<f32>().unwrap()[0];
            assert!(first.is_finite(), "{name}");
            println!("{name}: {:.1} ms", dt.as_secs_f64() * 1e3);
        }
    }
}
