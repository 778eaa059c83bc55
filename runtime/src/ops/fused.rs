//! Fused ops the fusion pass (`passes/src/fuse/`) produces, in the `patch` domain:
//!
//! * `patch.RMSNorm(X, scale?) {epsilon, axis = -1}`: `X / sqrt(mean(X², last axis) + eps) ·
//!   scale`, the mean accumulated in f64 (the unfused graph accumulates in f32; the two agree to
//!   f32 rounding).
//! * `patch.Silu(X)`: `X · sigmoid(X)`.
//! * `patch.SwiGLU(G, U)`: `G · sigmoid(G) · U`, G and U of one shape.
//! * `patch.GeGLU(G, U)`: `gelu_tanh(G) · U` (Gemma's gated MLP), G and U of one shape.
//! * `patch.Softcap(X) {cap}`: `cap · tanh(X / cap)` (Gemma 2's final logits).
//! * `patch.Rotary(X, Cos, Sin) {half, axis = -1}`: `X · Cos + rotate_half(X) · Sin` with
//!   `rotate_half(X) = concat(-X[..., half:], X[..., :half])`, the last axis of X `2 · half`,
//!   Cos and Sin broadcast to X (not along the last axis).
//! * `patch.Attention(Q, K, V, Mask?) {scale, softcap?}`: `softmax(c(scale · Q Kᵀ) + Mask) V`
//!   per head, with `c(x) = softcap · tanh(x / softcap)` when `softcap` is set (Gemma 2), else
//!   `c(x) = x`; Q
//!   `[b, h, s, d]`, K and V `[b, hk, t, d]` with `h` a multiple of `hk` (grouped KV heads:
//!   query head `j` reads KV head `j / (h / hk)`), Mask additive and broadcastable to
//!   `[b, h, s, t]`. A row whose scores are all `-inf` gives zeros (the exporters' `Where(IsNaN)`
//!   after the softmax). From 16 query rows (prefill) each head is two GEMMs around a row-wise
//!   softmax per block of 64 query rows, over the keys from the first to the last one the block
//!   can see (so a causal mask halves the work and a sliding window bounds it); below (decode)
//!   rows run one by one over the keys their masks leave visible, the others skipped.
//!
//!   With `layout = "bshd"` the same op reads Q as `[b, s, h, d]`, K and V as `[b, t, hk, d]`
//!   and writes `[b, s, h, d]`: the exporters' head-layout transposes folded in (the
//!   `kv-layout` pass), and the layout the in-place KV cache grows in. Its decode runs per
//!   KV head for all the query heads that share it (keys and values read once, the same sums
//!   as the row-by-row path); when those groups do not divide among the pool's threads the
//!   keys are split into ranges too and the partial softmaxes merged (within f32 rounding).
//! * `patch.KvAppend(Past, New) {axis}`: `Concat([Past, New], axis)`. When the axes before
//!   `axis` are 1 (a batch-1 cache in the `[b, t, hk, d]` layout) and `Past` owns room after its
//!   bytes (an append buffer, see `crate::append`), `New` is written there and the result
//!   shares the buffer: decode does not copy the cache each step.
//!
//! All take and return f32 (the pass only fuses f32 subgraphs) and split rows over the kernels'
//! thread pool when the tensor is large enough to pay for the wake-up.

use std::sync::Arc;

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, ShapeBuilder};
use patch_kernels::simd;

use super::{
    arity, for_each_part_balanced, for_each_row, for_each_row_split, norm_axis, opt, req,
    InputFact, Op, OpError, OpRegistry, OutputFact, Outputs,
};
use crate::dtype::DType;
use crate::ir::{Attrs, TensorType};
use crate::tensor::Tensor;

pub fn register(r: &mut OpRegistry) {
    r.register("patch", "RMSNorm", 1, |attrs, _| {
        Ok(Arc::new(RmsNorm::from_attrs(attrs)?))
    });
    r.register("patch", "Silu", 1, |_, _| {
        Ok(Arc::new(Activation { gate: Gate::Silu }))
    });
    // The fusion pass's GELU: the tanh form vectorized here, the exact (erf) one elementwise.
    r.register("patch", "Gelu", 1, |attrs, opset| {
        match attrs.string("approximate")? {
            Some("tanh") => Ok(Arc::new(Activation {
                gate: Gate::GeluTanh,
            })),
            _ => super::elementwise::gelu(attrs, opset),
        }
    });
    r.register("patch", "SwiGLU", 1, |_, _| {
        Ok(Arc::new(Gated { gate: Gate::Silu }))
    });
    r.register("patch", "GeGLU", 1, |_, _| {
        Ok(Arc::new(Gated {
            gate: Gate::GeluTanh,
        }))
    });
    r.register("patch", "Softcap", 1, |attrs, _| {
        Ok(Arc::new(Softcap::from_attrs(attrs)?))
    });
    r.register("patch", "Rotary", 1, |attrs, _| {
        Ok(Arc::new(Rotary::from_attrs(attrs)?))
    });
    r.register("patch", "Attention", 1, |attrs, _| {
        Ok(Arc::new(Attention::from_attrs(attrs)?))
    });
    r.register("patch", "KvAppend", 1, |attrs, _| {
        Ok(Arc::new(KvAppend {
            axis: attrs.req_int("axis")?,
        }))
    });
}

/// `patch.KvAppend` (see the module docs).
#[derive(Debug)]
pub struct KvAppend {
    pub axis: i64,
}

impl Op for KvAppend {
    fn view_of(&self) -> Option<usize> {
        Some(0)
    }

    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        super::shape::Concat { axis: self.axis }.infer(inputs)
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let (past, new) = (req(inputs, 0)?, req(inputs, 1)?);
        let axis = norm_axis(self.axis, past.rank())?;
        if past.shape()[..axis].iter().all(|&d| d == 1) {
            let grown = past.append_outer(new, axis).map_err(tensor_err)?;
            return Ok(vec![grown]);
        }
        super::shape::Concat { axis: self.axis }.eval(inputs)
    }
}

/// Query rows from which attention runs as two GEMMs per head instead of row by row.
const GEMM_MIN_ROWS: usize = 16;

/// Query rows per block of the prefill path (each block attends up to its last visible key).
const PREFILL_ROW_BLOCK: usize = 64;

/// Multiply-adds from which decode attention spreads over the pool (≈ 10 µs on one core).
const DECODE_PARALLEL_WORK: usize = 1 << 17;

pub(crate) fn tensor_err(e: crate::RuntimeError) -> OpError {
    OpError::Invalid(e.to_string())
}

pub(crate) fn require_f32(op: &str, what: &str, ty: &TensorType) -> Result<(), OpError> {
    if ty.dtype == DType::F32 {
        Ok(())
    } else {
        Err(OpError::Invalid(format!(
            "{op}: {what} must be f32, got {}",
            ty.dtype
        )))
    }
}

/// The activation of a gated row: both are `x / (1 + exp(-a(x)))`, SiLU with `a(x) = x` and
/// GELU-tanh with `a(x) = 2·sqrt(2/π)·(x + 0.044715·x³)` (`0.5·(1 + tanh(z)) = sigmoid(2z)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    Silu,
    GeluTanh,
}

/// `2·sqrt(2/π)`, GELU-tanh's sigmoid argument scale.
const GELU_TANH_2S: f32 = 1.595_769;

/// `o[i] = act(g[i]) · u[i]` (`u` absent: 1) with the vectorized [`exp_in_place`] (relative
/// error ≤ 2e-7); AVX-512 or AVX2 when the CPU has them.
fn gated_row(gate: Gate, o: &mut [f32], g: &[f32], u: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { gated_row_avx512(gate, o, g, u) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { gated_row_avx2(gate, o, g, u) };
        }
    }
    gated_row_body(gate, o, g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gated_row_avx512(gate: Gate, o: &mut [f32], g: &[f32], u: Option<&[f32]>) {
    gated_row_body(gate, o, g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated_row_avx2(gate: Gate, o: &mut [f32], g: &[f32], u: Option<&[f32]>) {
    gated_row_body(gate, o, g, u)
}

#[inline(always)]
fn gated_row_body(gate: Gate, o: &mut [f32], g: &[f32], u: Option<&[f32]>) {
    const CHUNK: usize = 64;
    let mut e = [0f32; CHUNK];
    for (c, (oc, gc)) in o.chunks_mut(CHUNK).zip(g.chunks(CHUNK)).enumerate() {
        let e = &mut e[..gc.len()];
        match gate {
            Gate::Silu => {
                for (x, &v) in e.iter_mut().zip(gc) {
                    *x = -v;
                }
            }
            Gate::GeluTanh => {
                for (x, &v) in e.iter_mut().zip(gc) {
                    *x = -GELU_TANH_2S * (v + 0.044715 * v * v * v);
                }
            }
        }
        exp_in_place(e);
        match u {
            Some(u) => {
                let uc = &u[c * CHUNK..][..gc.len()];
                for (((d, &v), &x), &w) in oc.iter_mut().zip(gc).zip(e.iter()).zip(uc) {
                    *d = v * w / (1.0 + x);
                }
            }
            None => {
                for ((d, &v), &x) in oc.iter_mut().zip(gc).zip(e.iter()) {
                    *d = v / (1.0 + x);
                }
            }
        }
    }
}

/// `x ← cap · tanh(x / cap)` for every element, as `sign(y)·(1 - e)/(1 + e)` with
/// `e = exp(-2|y|)` (no overflow; absolute error ≤ 3e-7 · cap).
pub(crate) fn softcap_in_place(xs: &mut [f32], cap: f32) {
    const CHUNK: usize = 64;
    let mut e = [0f32; CHUNK];
    let inv = 1.0 / cap;
    for xc in xs.chunks_mut(CHUNK) {
        let e = &mut e[..xc.len()];
        for (t, &x) in e.iter_mut().zip(xc.iter()) {
            *t = -2.0 * (x * inv).abs();
        }
        exp_in_place(e);
        for (x, &t) in xc.iter_mut().zip(e.iter()) {
            let th = (1.0 - t) / (1.0 + t);
            *x = if x.is_nan() {
                *x
            } else {
                cap * th.copysign(*x)
            };
        }
    }
}

/// `patch.RMSNorm`: normalizes over the last axis.
#[derive(Debug)]
pub struct RmsNorm {
    pub epsilon: f32,
}

impl RmsNorm {
    pub fn from_attrs(attrs: &Attrs) -> Result<RmsNorm, OpError> {
        let axis = attrs.int_or("axis", -1)?;
        if axis != -1 {
            return Err(OpError::Invalid(format!(
                "patch.RMSNorm normalizes the last axis only (axis -1), got axis {axis}"
            )));
        }
        let epsilon = attrs.float_or("epsilon", 1e-5)?;
        if epsilon.is_nan() || epsilon < 0.0 {
            return Err(OpError::Invalid(format!(
                "patch.RMSNorm: epsilon must be a non-negative number, got {epsilon}"
            )));
        }
        Ok(RmsNorm { epsilon })
    }
}

impl Op for RmsNorm {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 2)?;
        let x = req(inputs, 0)?;
        require_f32("patch.RMSNorm", "X", x.ty)?;
        let Some(last) = x.ty.shape.last() else {
            return Err(OpError::Invalid(
                "patch.RMSNorm: X must have rank ≥ 1".into(),
            ));
        };
        if let Some(s) = opt(inputs, 1) {
            require_f32("patch.RMSNorm", "scale", s.ty)?;
            if s.ty.shape.as_slice() != std::slice::from_ref(last) {
                return Err(OpError::Invalid(format!(
                    "patch.RMSNorm: scale must have shape [{last}] (X's last axis), got {}",
                    s.ty
                )));
            }
        }
        Ok(vec![OutputFact::new(x.ty.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 2)?;
        let xt = req(inputs, 0)?;
        let x = xt.as_slice::<f32>().map_err(tensor_err)?;
        let width = *xt.shape().last().unwrap_or(&1);
        let scale = opt(inputs, 1)
            .map(|s| s.as_slice::<f32>().map_err(tensor_err))
            .transpose()?;
        if scale.is_some_and(|s| s.len() != width) {
            return Err(OpError::Invalid(format!(
                "patch.RMSNorm: scale has {} elements, X's last axis {width}",
                scale.map_or(0, |s| s.len())
            )));
        }
        let eps = self.epsilon as f64;
        let mut out = outputs.f32(0, x.len());
        for_each_row(&mut out, width, &|r, o| {
            let src = &x[r * width..(r + 1) * width];
            let ss: f64 = src.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let inv = (1.0 / (ss / width as f64 + eps).sqrt()) as f32;
            match scale {
                Some(w) => {
                    for ((d, &v), &g) in o.iter_mut().zip(src).zip(w) {
                        *d = g * (v * inv);
                    }
                }
                None => {
                    for (d, &v) in o.iter_mut().zip(src) {
                        *d = v * inv;
                    }
                }
            }
        });
        Ok(vec![out
            .into_tensor(xt.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

/// `patch.Silu` (`x · sigmoid(x)`) and `patch.Gelu {approximate = "tanh"}` (`x ·
/// sigmoid(2·sqrt(2/π)·(x + 0.044715·x³))`): a gate without its second operand, through the
/// gated rows' vectorized `exp`.
#[derive(Debug)]
pub struct Activation {
    gate: Gate,
}

impl Activation {
    fn name(&self) -> &'static str {
        match self.gate {
            Gate::Silu => "patch.Silu",
            Gate::GeluTanh => "patch.Gelu",
        }
    }
}

impl Op for Activation {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        require_f32(self.name(), "X", x.ty)?;
        Ok(vec![OutputFact::new(x.ty.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 1)?;
        let xt = req(inputs, 0)?;
        let x = xt.as_slice::<f32>().map_err(tensor_err)?;
        let width = *xt.shape().last().unwrap_or(&1);
        let mut out = outputs.f32(0, x.len());
        for_each_row(&mut out, width.max(1), &|r, o| {
            gated_row(self.gate, o, &x[r * o.len()..(r + 1) * o.len()], None);
        });
        Ok(vec![out
            .into_tensor(xt.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

/// `patch.SwiGLU` (`silu(g) · u`) and `patch.GeGLU` (`gelu_tanh(g) · u`) for G and U of the
/// same shape.
#[derive(Debug)]
pub struct Gated {
    gate: Gate,
}

impl Gated {
    fn name(&self) -> &'static str {
        match self.gate {
            Gate::Silu => "patch.SwiGLU",
            Gate::GeluTanh => "patch.GeGLU",
        }
    }
}

impl Op for Gated {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        let g = req(inputs, 0)?;
        let u = req(inputs, 1)?;
        require_f32(self.name(), "G", g.ty)?;
        require_f32(self.name(), "U", u.ty)?;
        if g.ty.shape != u.ty.shape {
            return Err(OpError::Invalid(format!(
                "{}: G {} and U {} must have the same shape",
                self.name(),
                g.ty,
                u.ty
            )));
        }
        Ok(vec![OutputFact::new(g.ty.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let (gt, ut) = (req(inputs, 0)?, req(inputs, 1)?);
        if gt.shape() != ut.shape() {
            return Err(OpError::Invalid(format!(
                "{}: G {:?} and U {:?} must have the same shape",
                self.name(),
                gt.shape(),
                ut.shape()
            )));
        }
        let g = gt.as_slice::<f32>().map_err(tensor_err)?;
        let u = ut.as_slice::<f32>().map_err(tensor_err)?;
        let width = *gt.shape().last().unwrap_or(&1);
        let mut out = outputs.f32(0, g.len());
        for_each_row(&mut out, width.max(1), &|r, o| {
            let w = o.len();
            let (gs, us) = (&g[r * w..(r + 1) * w], &u[r * w..(r + 1) * w]);
            gated_row(self.gate, o, gs, Some(us));
        });
        Ok(vec![out
            .into_tensor(gt.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

/// `patch.Softcap`: `cap · tanh(x / cap)`.
#[derive(Debug)]
pub struct Softcap {
    pub cap: f32,
}

impl Softcap {
    pub fn from_attrs(attrs: &Attrs) -> Result<Softcap, OpError> {
        let cap = attrs_softcap(attrs, "cap")?.ok_or_else(|| OpError::BadAttr {
            name: "cap".into(),
            msg: "patch.Softcap needs a cap".into(),
        })?;
        Ok(Softcap { cap })
    }
}

/// A softcapping attribute: absent, or finite and positive.
fn attrs_softcap(attrs: &Attrs, name: &str) -> Result<Option<f32>, OpError> {
    match attrs.float(name)? {
        Some(cap) if !(cap.is_finite() && cap > 0.0) => Err(OpError::BadAttr {
            name: name.into(),
            msg: format!("must be finite and positive, got {cap}"),
        }),
        cap => Ok(cap),
    }
}

impl Op for Softcap {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        require_f32("patch.Softcap", "X", x.ty)?;
        Ok(vec![OutputFact::new(x.ty.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 1)?;
        let xt = req(inputs, 0)?;
        let x = xt.as_slice::<f32>().map_err(tensor_err)?;
        let width = *xt.shape().last().unwrap_or(&1);
        let mut out = outputs.f32(0, x.len());
        for_each_row(&mut out, width.max(1), &|r, o| {
            o.copy_from_slice(&x[r * o.len()..(r + 1) * o.len()]);
            softcap_in_place(o, self.cap);
        });
        Ok(vec![out
            .into_tensor(xt.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

/// `patch.Rotary`: rotary position embedding in the rotate-half layout.
#[derive(Debug)]
pub struct Rotary {
    pub half: usize,
    /// The rotated axis as the exporter wrote it; must name the last axis.
    pub axis: i64,
}

impl Rotary {
    pub fn from_attrs(attrs: &Attrs) -> Result<Rotary, OpError> {
        let half = attrs.req_int("half")?;
        if half <= 0 {
            return Err(OpError::Invalid(format!(
                "patch.Rotary: half must be positive, got {half}"
            )));
        }
        let axis = attrs.int_or("axis", -1)?;
        Ok(Rotary {
            half: half as usize,
            axis,
        })
    }
}

/// Element strides of a row-major tensor of shape `from` read as broadcast (right-aligned,
/// ONNX multidirectional rules restricted to `from`'s side) to the shape `to`: 0 on broadcast
/// axes.
pub(crate) fn broadcast_strides(from: &[usize], to: &[usize]) -> Result<Vec<usize>, String> {
    if from.len() > to.len() {
        return Err(format!("{from:?} has more axes than {to:?}"));
    }
    let mut dims = vec![1usize; to.len() - from.len()];
    dims.extend_from_slice(from);
    let mut strides = vec![0usize; to.len()];
    let mut acc = 1;
    for a in (0..to.len()).rev() {
        if dims[a] == to[a] && to[a] != 1 {
            strides[a] = acc;
        } else if dims[a] != 1 {
            return Err(format!("{from:?} does not broadcast to {to:?}"));
        }
        acc *= dims[a];
    }
    Ok(strides)
}

impl Op for Rotary {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 3, 3)?;
        let x = req(inputs, 0)?;
        for (what, i) in [("X", 0), ("Cos", 1), ("Sin", 2)] {
            require_f32("patch.Rotary", what, req(inputs, i)?.ty)?;
        }
        if norm_axis(self.axis, x.ty.rank())? + 1 != x.ty.rank() {
            return Err(OpError::Invalid(format!(
                "patch.Rotary: axis {} of X {} is not its last axis",
                self.axis, x.ty
            )));
        }
        let last = x.ty.shape.last().and_then(|d| d.as_const());
        if last.is_some_and(|d| d != 2 * self.half as i64) {
            return Err(OpError::Invalid(format!(
                "patch.Rotary: X {} must have a last axis of 2 · half = {}",
                x.ty,
                2 * self.half
            )));
        }
        for i in [1, 2] {
            let t = req(inputs, i)?.ty;
            if t.rank() > x.ty.rank() || t.shape.last() != x.ty.shape.last() {
                return Err(OpError::Invalid(format!(
                    "patch.Rotary: table {} does not broadcast to X {} along the rows",
                    t, x.ty
                )));
            }
        }
        Ok(vec![OutputFact::new(x.ty.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 3, 3)?;
        let (xt, ct, st) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        let bad = |msg: String| OpError::Invalid(format!("patch.Rotary: {msg}"));
        let d = 2 * self.half;
        if xt.shape().last() != Some(&d) {
            return Err(bad(format!("X {:?} needs a last axis of {d}", xt.shape())));
        }
        let lead: Vec<usize> = xt.shape()[..xt.rank() - 1].to_vec();
        // Cos and Sin vary along the rows only: the last axis must be X's own.
        let table_strides = |t: &Tensor| match broadcast_strides(t.shape(), xt.shape()) {
            Ok(st) if t.shape().last() == Some(&d) => Ok(st),
            Ok(_) => Err(bad(format!("Cos/Sin {:?} must end in {d}", t.shape()))),
            Err(e) => Err(bad(e)),
        };
        let (cs, ss) = (table_strides(ct)?, table_strides(st)?);
        let (x, cos, sin) = (
            xt.as_slice::<f32>().map_err(tensor_err)?,
            ct.as_slice::<f32>().map_err(tensor_err)?,
            st.as_slice::<f32>().map_err(tensor_err)?,
        );
        let half = self.half;
        let offset = |row: usize, strides: &[usize]| {
            let (mut rest, mut off) = (row, 0);
            for a in (0..lead.len()).rev() {
                off += (rest % lead[a]) * strides[a];
                rest /= lead[a];
            }
            off
        };
        let mut out = outputs.f32(0, x.len());
        for_each_row(&mut out, d, &|row, o| {
            let xr = &x[row * d..(row + 1) * d];
            let c = &cos[offset(row, &cs)..][..d];
            let s = &sin[offset(row, &ss)..][..d];
            for j in 0..half {
                o[j] = xr[j] * c[j] - xr[j + half] * s[j];
                o[j + half] = xr[j + half] * c[j + half] + xr[j] * s[j + half];
            }
        });
        Ok(vec![out
            .into_tensor(xt.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

/// `patch.Attention`: scaled dot-product attention with grouped KV heads.
#[derive(Debug)]
pub struct Attention {
    pub scale: f32,
    /// `softcap · tanh(scores / softcap)` before the mask, when set.
    pub softcap: Option<f32>,
    /// `layout = "bshd"`: Q, K, V and the output have the sequence axis before the heads.
    pub seq_major: bool,
    /// Key ranges one seq-major decode group is split into; `None`: the pool's thread count
    /// when the groups do not divide among the threads, else 1.
    pub key_parts: Option<usize>,
}

impl Attention {
    pub fn from_attrs(attrs: &Attrs) -> Result<Attention, OpError> {
        let scale = attrs.float("scale")?.ok_or_else(|| OpError::BadAttr {
            name: "scale".into(),
            msg: "patch.Attention needs a scale".into(),
        })?;
        if !scale.is_finite() {
            return Err(OpError::Invalid(format!(
                "patch.Attention: scale must be finite, got {scale}"
            )));
        }
        let seq_major = match attrs.string("layout")? {
            None | Some("bhsd") => false,
            Some("bshd") => true,
            Some(other) => {
                return Err(OpError::BadAttr {
                    name: "layout".into(),
                    msg: format!("patch.Attention layout must be bhsd or bshd, got `{other}`"),
                })
            }
        };
        Ok(Attention {
            scale,
            softcap: attrs_softcap(attrs, "softcap")?,
            seq_major,
            key_parts: None,
        })
    }

    /// `[b, heads, seq, d]` of a Q/K/V/output shape in this op's layout.
    fn dims<T: Clone>(&self, shape: &[T]) -> [T; 4] {
        let [b, x, y, d] = [0, 1, 2, 3].map(|i| shape[i].clone());
        if self.seq_major {
            [b, y, x, d]
        } else {
            [b, x, y, d]
        }
    }

    /// The element strides of (batch, head, position) in a tensor of `heads` heads and `seq`
    /// positions of width `d`, in this op's layout.
    fn strides(&self, heads: usize, seq: usize, d: usize) -> [usize; 3] {
        if self.seq_major {
            [seq * heads * d, d, heads * d]
        } else {
            [heads * seq * d, seq * d, d]
        }
    }
}

/// `exp(x)` for every element, in place, by a degree-6 polynomial after range reduction
/// (Cephes `expf`: relative error ≤ 2e-7), written so the compiler vectorizes it where it is
/// inlined into a target-feature function (the softmax's AVX-512 / AVX2 twins). Inputs below
/// -87.34 (results below the normal range, `-inf` included) give 0; inputs above 88.38 give
/// `+inf` (so the last 0.35 of the f32 range saturates early: the softmax calls it on
/// `score - max ≤ 0`).
#[inline(always)]
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
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
        let scaled = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
        *x = if *x < -87.336_55 {
            0.0
        } else if *x > 88.376_26 {
            f32::INFINITY
        } else {
            scaled
        };
    }
}

/// The max and the sum of `exp(score - max)` of a row [`softmax_row`] normalized.
type SoftmaxStats = Option<(f32, f32)>;

/// Adds the mask row (`stride` apart) to the scores in `row`, then replaces them by their
/// softmax and returns its max and sum; `None` (row contents unspecified) when every score is
/// `-inf` or one is NaN. Max and sum run in 16 independent lanes so they vectorize.
pub(crate) fn softmax_row(row: &mut [f32], mask: Option<(&[f32], usize)>) -> SoftmaxStats {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { softmax_row_avx512(row, mask) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { softmax_row_avx2(row, mask) };
        }
    }
    softmax_row_body(row, mask)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(row: &mut [f32], mask: Option<(&[f32], usize)>) -> SoftmaxStats {
    softmax_row_body(row, mask)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32], mask: Option<(&[f32], usize)>) -> SoftmaxStats {
    softmax_row_body(row, mask)
}

#[inline(always)]
fn softmax_row_body(row: &mut [f32], mask: Option<(&[f32], usize)>) -> SoftmaxStats {
    match mask {
        Some((m, 1)) => row.iter_mut().zip(m).for_each(|(x, &a)| *x += a),
        Some((m, stride)) => row
            .iter_mut()
            .enumerate()
            .for_each(|(j, x)| *x += m[j * stride]),
        None => {}
    }
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for c in chunks.by_ref() {
        for l in 0..16 {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    if max == f32::NEG_INFINITY {
        return None;
    }
    for x in row.iter_mut() {
        *x -= max;
    }
    exp_in_place(row);
    let mut sums = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for c in chunks.by_ref() {
        for l in 0..16 {
            sums[l] += c[l];
        }
    }
    let sum: f32 = sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    if !sum.is_finite() {
        // A NaN score (the max skips NaN, the exponentials do not).
        return None;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
    Some((max, sum))
}

/// Decode attention for the query heads that share one KV head (see `Attention::eval`).
struct DecodeGroup<'a> {
    /// One query row per head of the group.
    queries: Vec<&'a [f32]>,
    masks: Vec<Option<(&'a [f32], usize)>>,
    /// (data from the group's first key, stride between positions, width).
    keys: (&'a [f32], usize, usize),
    values: (&'a [f32], usize, usize),
    positions: usize,
    scale: f32,
    softcap: Option<f32>,
}

impl DecodeGroup<'_> {
    /// Writes the group's output rows (`queries.len() × value width`) to `o`, and each row's
    /// softmax max and sum to `stats` (`(-inf, 0)` for a row that sees no key).
    fn run(&self, o: &mut [f32], stats: &mut [(f32, f32)]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                return unsafe { self.run_avx512(o, stats) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA.
                return unsafe { self.run_avx2(o, stats) };
            }
        }
        // SAFETY: the scalar path needs no CPU feature.
        unsafe { self.run_body::<simd::Scalar>(o, stats) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, o: &mut [f32], stats: &mut [(f32, f32)]) {
        self.run_body::<simd::Avx512>(o, stats)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, o: &mut [f32], stats: &mut [(f32, f32)]) {
        self.run_body::<simd::Avx2>(o, stats)
    }

    /// One body for every vector width (the sums differ between widths only in order).
    /// Keys and values are read once per query of the group, from cache after the first;
    /// the output rows are accumulated in registers, up to [`PV_VECTORS`] vectors at a time.
    ///
    /// # Safety
    /// `S`'s instructions must be available.
    #[inline(always)]
    unsafe fn run_body<S: simd::F32Simd>(&self, o: &mut [f32], stats: &mut [(f32, f32)]) {
        let (t, (k, ks, d), (v, vs, dv)) = (self.positions, self.keys, self.values);
        let rows = self.queries.len();
        let mut scores = vec![0f32; rows * t];
        stats.fill((f32::NEG_INFINITY, 0.0));
        let masked = |g: usize, j: usize| matches!(self.masks[g], Some((m, stride)) if m[j * stride] == f32::NEG_INFINITY);
        // The KV cache was last read a whole token ago: it comes from DRAM. Keys are fetched
        // a few rows ahead of use and values now, for the `P · V` pass, whole rows (every KV
        // head of the position), so the other heads' passes over these rows find them cached.
        let prefetch = |j: usize| {
            if j + PREFETCH_ROWS < t {
                prefetch_row::<false>(k.as_ptr().add((j + PREFETCH_ROWS) * ks), ks);
            }
            prefetch_row::<false>(v.as_ptr().add(j * vs), vs);
        };
        // Only the keys some row of the group can see are read (a sliding window, or padding,
        // cuts both ends); the others stay `-inf`.
        let (lo, hi) = visible_keys(&self.masks, t);
        // Every line this group reads is requested into L2 up front: the reads are a few
        // hundred strided rows from DRAM, and one row's latency at a time (even 16 rows
        // ahead) left the call latency-bound.
        for j in lo..hi {
            prefetch_row::<true>(k.as_ptr().add(j * ks), d);
            prefetch_row::<true>(v.as_ptr().add(j * vs), dv);
        }
        scores.fill(f32::NEG_INFINITY);
        // Four keys at a time: the four dot products of a query share one reduction.
        let mut j = lo;
        while j + 4 <= hi {
            for u in 0..4 {
                prefetch(j + u);
            }
            let key = |u: usize| &k[(j + u) * ks..][..d];
            let keys = [key(0), key(1), key(2), key(3)];
            for (g, qi) in self.queries.iter().enumerate() {
                let dots = simd::dot4::<S>(qi, keys);
                for (u, dot) in dots.into_iter().enumerate() {
                    scores[g * t + j + u] = if masked(g, j + u) {
                        f32::NEG_INFINITY
                    } else {
                        self.scale * dot
                    };
                }
            }
            j += 4;
        }
        for j in j..hi {
            prefetch(j);
            let key = &k[j * ks..][..d];
            for (g, qi) in self.queries.iter().enumerate() {
                scores[g * t + j] = if masked(g, j) {
                    f32::NEG_INFINITY
                } else {
                    self.scale * simd::dot::<S>(qi, key)
                };
            }
        }
        if let Some(cap) = self.softcap {
            // Masked keys stay -inf (cap · tanh(-inf / cap) would be -cap).
            for x in scores.iter_mut().filter(|x| **x != f32::NEG_INFINITY) {
                *x = cap * (*x / cap).tanh();
            }
        }
        for (g, (row, &m)) in scores
            .chunks_exact_mut(t.max(1))
            .zip(&self.masks)
            .enumerate()
        {
            let st = if t == 0 {
                None
            } else {
                softmax_row_body(row, m)
            };
            if st.is_none() {
                row.fill(0.0);
            }
            stats[g] = st.unwrap_or((f32::NEG_INFINITY, 0.0));
        }
        let l = S::LANES;
        for (g, out_row) in o.chunks_exact_mut(dv).enumerate() {
            let probs = &scores[g * t..(g + 1) * t];
            let full = if l == 1 { 0 } else { dv / l * l };
            let mut c0 = 0;
            while c0 < full {
                let nv = ((full - c0) / l).min(PV_VECTORS);
                let dst = out_row.as_mut_ptr().add(c0);
                let src = v.as_ptr().add(c0);
                match nv {
                    PV_VECTORS => pv_block::<S, PV_VECTORS>(probs, src, vs, dst),
                    3 => pv_block::<S, 3>(probs, src, vs, dst),
                    2 => pv_block::<S, 2>(probs, src, vs, dst),
                    _ => pv_block::<S, 1>(probs, src, vs, dst),
                }
                c0 += nv * l;
            }
            let tail = &mut out_row[full..];
            if tail.is_empty() {
                continue;
            }
            tail.fill(0.0);
            for (j, &p) in probs.iter().enumerate() {
                if p != 0.0 {
                    simd::axpy::<simd::Scalar>(p, &v[j * vs + full..][..dv - full], tail);
                }
            }
        }
    }
}

/// The keys `[lo, hi)` that any of `masks` (rows over `t` keys) leaves visible (not `-inf`);
/// all of them when a row has no mask, `(0, 0)` when none is visible.
fn visible_keys(masks: &[Option<(&[f32], usize)>], t: usize) -> (usize, usize) {
    let (mut lo, mut hi) = (t, 0);
    for m in masks {
        let Some((m, stride)) = m else {
            return (0, t);
        };
        let seen = |j: &usize| m[j * stride] != f32::NEG_INFINITY;
        if let Some(first) = (0..t).find(seen) {
            lo = lo.min(first);
            hi = hi.max((0..t).rev().find(seen).map_or(0, |j| j + 1));
        }
    }
    if lo >= hi {
        (0, 0)
    } else {
        (lo, hi)
    }
}

/// Output vectors one pass of the decode attention's `P · V` keeps in registers.
const PV_VECTORS: usize = 4;

/// Key positions between a row's prefetch and its use in the decode attention.
const PREFETCH_ROWS: usize = 16;

/// Asks for the cache lines of `floats` floats from `p`, into every level or (`L2_ONLY`) into
/// L2 (a hint: any address may be given, nothing is read).
#[inline(always)]
fn prefetch_row<const L2_ONLY: bool>(p: *const f32, floats: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..floats).step_by(16) {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        let at = p.wrapping_add(line) as *const i8;
        // SAFETY: a prefetch never faults and reads nothing architecturally.
        unsafe {
            if L2_ONLY {
                _mm_prefetch::<_MM_HINT_T1>(at)
            } else {
                _mm_prefetch::<_MM_HINT_T0>(at)
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, floats);
}

/// `dst[0 .. NV * LANES] = Σ_j probs[j] · v[j * vs ..]` over the keys with a non-zero
/// probability (a masked key is never read), the accumulators in registers.
///
/// # Safety
/// `S`'s instructions must be available; `v` is readable for `NV * LANES` floats at every
/// `j * vs` with `j < probs.len()`, and `dst` writable for `NV * LANES` floats.
#[inline(always)]
unsafe fn pv_block<S: simd::F32Simd, const NV: usize>(
    probs: &[f32],
    v: *const f32,
    vs: usize,
    dst: *mut f32,
) {
    let l = S::LANES;
    // Even and odd keys into separate accumulators: two independent chains of FMAs.
    let (mut even, mut odd) = ([S::zero(); NV], [S::zero(); NV]);
    let step = |acc: &mut [S::V; NV], j: usize, p: f32| {
        if p != 0.0 {
            let (pv, row) = (S::splat(p), v.add(j * vs));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = S::mul_add(pv, S::load(row.add(i * l)), *a);
            }
        }
    };
    let pairs = probs.len() / 2;
    for jp in 0..pairs {
        step(&mut even, 2 * jp, probs[2 * jp]);
        step(&mut odd, 2 * jp + 1, probs[2 * jp + 1]);
    }
    if probs.len() % 2 == 1 {
        step(&mut even, probs.len() - 1, probs[probs.len() - 1]);
    }
    for i in 0..NV {
        S::store(dst.add(i * l), S::add(even[i], odd[i]));
    }
}

impl Op for Attention {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 3, 4)?;
        let (q, k, v) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        let want = if self.seq_major {
            "[batch, seq, heads, head_dim]"
        } else {
            "[batch, heads, seq, head_dim]"
        };
        for (what, t) in [("Q", q.ty), ("K", k.ty), ("V", v.ty)] {
            require_f32("patch.Attention", what, t)?;
            if t.rank() != 4 {
                return Err(OpError::Invalid(format!(
                    "patch.Attention: {what} must be {want}, got {t}"
                )));
            }
        }
        let (qs, ks, vs) = (
            self.dims(&q.ty.shape),
            self.dims(&k.ty.shape),
            self.dims(&v.ty.shape),
        );
        let bad = |msg: String| Err(OpError::Invalid(format!("patch.Attention: {msg}")));
        if qs[0] != ks[0] || ks[0] != vs[0] || ks[1] != vs[1] || ks[2] != vs[2] || qs[3] != ks[3] {
            return bad(format!("Q {}, K {}, V {} do not fit", q.ty, k.ty, v.ty));
        }
        if let (Some(h), Some(hk)) = (qs[1].as_const(), ks[1].as_const()) {
            if hk == 0 || h % hk != 0 {
                return bad(format!(
                    "{h} query heads are not a multiple of {hk} KV heads"
                ));
            }
        }
        if let Some(m) = opt(inputs, 3) {
            require_f32("patch.Attention", "Mask", m.ty)?;
            if m.ty.rank() > 4 {
                return bad(format!("Mask {} has rank > 4", m.ty));
            }
        }
        // The output has Q's layout with V's head width.
        let mut shape = q.ty.shape.clone();
        shape[3] = vs[3].clone();
        Ok(vec![OutputFact::new(TensorType::new(DType::F32, shape))])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 3, 4)?;
        let (qt, kt, vt) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        let bad = |msg: String| OpError::Invalid(format!("patch.Attention: {msg}"));
        let (qd, kd, vd) = (qt.shape(), kt.shape(), vt.shape());
        if qd.len() != 4 || kd.len() != 4 || vd.len() != 4 {
            return Err(bad("Q, K and V must have rank 4".into()));
        }
        let [b, h, s, d] = self.dims(qd);
        let [kb, hk, t, kdim] = self.dims(kd);
        let [vb, hv, tv, dv] = self.dims(vd);
        if kb != b || vb != b || hv != hk || tv != t || kdim != d {
            return Err(bad(format!("Q {qd:?}, K {kd:?}, V {vd:?} do not fit")));
        }
        if hk == 0 || h % hk != 0 {
            return Err(bad(format!(
                "{h} query heads are not a multiple of {hk} KV heads"
            )));
        }
        let group = h / hk;
        let (q, k, v) = (
            qt.as_slice::<f32>().map_err(tensor_err)?,
            kt.as_slice::<f32>().map_err(tensor_err)?,
            vt.as_slice::<f32>().map_err(tensor_err)?,
        );
        // Element strides of (batch, head, position) in each operand.
        let (qst, kst, vst) = (
            self.strides(h, s, d),
            self.strides(hk, t, d),
            self.strides(hk, t, dv),
        );
        let mask = opt(inputs, 3)
            .map(|m| -> Result<_, OpError> {
                let strides = broadcast_strides(m.shape(), &[b, h, s, t]).map_err(bad)?;
                Ok((m.as_slice::<f32>().map_err(tensor_err)?, strides))
            })
            .transpose()?;
        let (scale, softcap) = (self.scale, self.softcap);
        let mask_row = |batch: usize, head: usize, i: usize| -> Option<(&[f32], usize)> {
            mask.as_ref().map(|(m, st)| {
                let base = batch * st[0] + head * st[1] + i * st[2];
                (&m[base..], st[3])
            })
        };
        let mut out = outputs.f32(0, b * h * s * dv);
        if s >= GEMM_MIN_ROWS {
            // Prefill: per (batch, head), two GEMMs through matrixmultiply around a row-wise
            // softmax, written head-major (then transposed for a seq-major output); heads are
            // spread over the pool.
            let transpose = self.seq_major && h > 1 && s > 1;
            let mut head_major_copy = if transpose {
                vec![0f32; out.len()]
            } else {
                Vec::new()
            };
            let head_major: &mut [f32] = if transpose {
                &mut head_major_copy
            } else {
                &mut out
            };
            // Work items: (batch·head, first row, rows) of every block of query rows, spread
            // over the pool by their cost (a causal block sees the past keys and its prefix of
            // the prompt, so later blocks cost more; heads alone would split 9 heads 5:4).
            let items: Vec<(usize, usize, usize)> = (0..b * h)
                .flat_map(|bh| {
                    (0..s)
                        .step_by(PREFILL_ROW_BLOCK)
                        .map(move |i0| (bh, i0, PREFILL_ROW_BLOCK.min(s - i0)))
                })
                .collect();
            let lens: Vec<usize> = items.iter().map(|&(_, _, rows)| rows * dv).collect();
            let costs: Vec<f64> = items
                .iter()
                .map(|&(_, i0, rows)| (rows * (t.saturating_sub(s) + i0 + rows)) as f64)
                .collect();
            for_each_part_balanced(head_major, &lens, &costs, &|item, ob| {
                let (bh, i0, rows) = items[item];
                let (batch, head) = (bh / h, bh % h);
                let kv = head / group;
                /// `rows × cols` starting at `at`, rows `stride` apart.
                fn view(
                    data: &[f32],
                    rows: usize,
                    cols: usize,
                    at: usize,
                    stride: usize,
                ) -> ArrayView2<'_, f32> {
                    ArrayView2::from_shape((rows, cols).strides((stride, 1)), &data[at..])
                        .expect("sizes checked above")
                }
                let qh = view(q, s, d, batch * qst[0] + head * qst[1], qst[2]);
                let kh = view(k, t, d, batch * kst[0] + kv * kst[1], kst[2]);
                let vh = view(v, t, dv, batch * vst[0] + kv * vst[1], vst[2]);
                // Blocks of query rows attend only to the keys from the first to the last any
                // of their rows can see (a causal mask halves the work, a sliding window cuts
                // the start too); the keys cut are `-inf` for every row of the block, so the
                // softmax over the rest is the same.
                {
                    let masks: Vec<_> = (i0..i0 + rows).map(|i| mask_row(batch, head, i)).collect();
                    let (k0, keys) = visible_keys(&masks, t);
                    if keys == 0 {
                        ob.fill(0.0);
                        return;
                    }
                    let qb = qh.slice(ndarray::s![i0..i0 + rows, ..]);
                    let (kb, vb) = (
                        kh.slice(ndarray::s![k0..keys, ..]),
                        vh.slice(ndarray::s![k0..keys, ..]),
                    );
                    let mut scores = Array2::<f32>::zeros((rows, keys - k0));
                    general_mat_mul(scale, &qb, &kb.t(), 0.0, &mut scores);
                    for (r, mut row) in scores.rows_mut().into_iter().enumerate() {
                        let row = row.as_slice_mut().expect("standard layout");
                        if let Some(cap) = softcap {
                            softcap_in_place(row, cap);
                        }
                        let mask = masks[r].map(|(m, st)| (&m[k0 * st..], st));
                        if softmax_row(row, mask).is_none() {
                            row.fill(0.0);
                        }
                    }
                    let mut oh =
                        ArrayViewMut2::from_shape((rows, dv), ob).expect("sizes checked above");
                    general_mat_mul(1.0, &scores, &vb, 0.0, &mut oh);
                }
            });
            if transpose {
                for (bh, block) in head_major_copy.chunks_exact(s * dv).enumerate() {
                    let (batch, head) = (bh / h, bh % h);
                    for (i, row) in block.chunks_exact(dv).enumerate() {
                        let at = ((batch * s + i) * h + head) * dv;
                        out[at..at + dv].copy_from_slice(row);
                    }
                }
            }
        } else if self.seq_major {
            // Decode, seq-major: the query heads that share a KV head are contiguous in the
            // output, so each (batch, position, KV head) reads its keys and values once for
            // all of them. The same sums in the same order as the row-by-row path below.
            let parallel = b * s * h * t * (d + dv) >= DECODE_PARALLEL_WORK;
            let threads = patch_kernels::CpuKernels::global().map_or(1, |k| k.threads());
            // The group over keys `[j0, j1)` of (batch, position, KV head) `c`.
            let job = |c: usize, j0: usize, j1: usize| {
                let (batch, i, kv) = (c / (s * hk), (c / hk) % s, c % hk);
                let heads = kv * group..(kv + 1) * group;
                let (kb, vb) = (batch * kst[0] + kv * kst[1], batch * vst[0] + kv * vst[1]);
                DecodeGroup {
                    queries: heads
                        .clone()
                        .map(|head| &q[batch * qst[0] + head * qst[1] + i * qst[2]..][..d])
                        .collect(),
                    masks: heads
                        .map(|head| mask_row(batch, head, i).map(|(m, st)| (&m[j0 * st..], st)))
                        .collect(),
                    keys: (&k[kb + j0 * kst[2]..], kst[2], d),
                    values: (&v[vb + j0 * vst[2]..], vst[2], dv),
                    positions: j1 - j0,
                    scale,
                    softcap,
                }
            };
            let chunks = b * s * hk;
            let parts = self.key_parts.unwrap_or(
                if parallel && threads > 1 && !chunks.is_multiple_of(threads) {
                    threads
                } else {
                    1
                },
            );
            if parts > 1 && t >= parts {
                // Fewer (or unevenly many) groups than threads: split the keys too, and merge
                // the partial softmaxes (flash-decoding). Within f32 rounding of the unsplit
                // path, not bit for bit.
                // Items are key-range major: each thread's share is a run of positions read
                // for every KV head, so its keys and values stream as one block of rows.
                let width = group * dv + 2 * group;
                let mut partial = vec![0f32; chunks * parts * width];
                for_each_row_split(&mut partial, width, parallel, &|item, buf| {
                    let (p, c) = (item / chunks, item % chunks);
                    let (j0, j1) = (t * p / parts, t * (p + 1) / parts);
                    let (o, st) = buf.split_at_mut(group * dv);
                    let mut stats = vec![(0f32, 0f32); group];
                    job(c, j0, j1).run(o, &mut stats);
                    for (g, (mx, sum)) in stats.into_iter().enumerate() {
                        st[2 * g] = mx;
                        st[2 * g + 1] = sum;
                    }
                });
                for (c, out_group) in out.chunks_exact_mut(group * dv).enumerate() {
                    let item = |p: usize| &partial[(p * chunks + c) * width..][..width];
                    for (g, out_row) in out_group.chunks_exact_mut(dv).enumerate() {
                        let stat = |p: usize| {
                            let st = &item(p)[group * dv..];
                            (st[2 * g], st[2 * g + 1])
                        };
                        let top = (0..parts)
                            .map(|p| stat(p).0)
                            .fold(f32::NEG_INFINITY, f32::max);
                        if top == f32::NEG_INFINITY {
                            continue;
                        }
                        let weights: Vec<f32> = (0..parts)
                            .map(|p| {
                                let (mx, sum) = stat(p);
                                if sum > 0.0 {
                                    sum * (mx - top).exp()
                                } else {
                                    0.0
                                }
                            })
                            .collect();
                        let total: f32 = weights.iter().sum();
                        for (p, w) in weights.iter().enumerate() {
                            let part = &item(p)[g * dv..][..dv];
                            for (acc, &x) in out_row.iter_mut().zip(part) {
                                *acc += w / total * x;
                            }
                        }
                    }
                }
            } else {
                for_each_row_split(&mut out, group * dv, parallel, &|c, o| {
                    let mut stats = vec![(0f32, 0f32); group];
                    job(c, 0, t).run(o, &mut stats);
                });
            }
        } else {
            // Decode: one output row at a time, in the output's own order, through the same
            // kernel as the grouped path (so the two layouts agree bit for bit); a masked key
            // costs nothing.
            for_each_row(&mut out, dv, &|row, o| {
                let (batch, head, i) = (row / (s * h), (row / s) % h, row % s);
                let kv = head / group;
                let (kb, vb) = (batch * kst[0] + kv * kst[1], batch * vst[0] + kv * vst[1]);
                let one = DecodeGroup {
                    queries: vec![&q[batch * qst[0] + head * qst[1] + i * qst[2]..][..d]],
                    masks: vec![mask_row(batch, head, i)],
                    keys: (&k[kb..], kst[2], d),
                    values: (&v[vb..], vst[2], dv),
                    positions: t,
                    scale,
                    softcap,
                };
                one.run(o, &mut [(0.0, 0.0)]);
            });
        }
        let mut shape = qd.to_vec();
        shape[3] = dv;
        Ok(vec![out.into_tensor(shape).map_err(tensor_err)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Attr;
    use ndarray::IxDyn;
    use rand::{Rng, SeedableRng};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        Tensor::from_vec(shape.to_vec(), v).unwrap()
    }

    fn close(got: &Tensor, want: &[f64], tol: f64) {
        let g = got.as_slice::<f32>().unwrap();
        assert_eq!(g.len(), want.len());
        for (i, (&a, &b)) in g.iter().zip(want).enumerate() {
            assert!(
                (a as f64 - b).abs() <= tol * (1.0 + b.abs()),
                "at {i}: {a} vs {b}"
            );
        }
    }

    /// Against the ONNX `RMSNormalization` op (itself checked against ONNX Runtime in
    /// `norm.rs`), on ragged row widths and enough rows to take the threaded path.
    #[test]
    fn rms_norm_matches_onnx_rms_normalization() {
        let r = OpRegistry::onnx();
        for (shape, eps) in [(vec![3usize, 7], 1e-5f32), (vec![2, 300, 129], 1e-6)] {
            let attrs = Attrs::new()
                .with("axis", Attr::Int(-1))
                .with("epsilon", Attr::Float(eps));
            let x = random(&shape, 1);
            let w = random(&shape[shape.len() - 1..], 2);
            let want = r
                .build("", "RMSNormalization", 23, &attrs, "ref")
                .unwrap()
                .eval(&[Some(&x), Some(&w)])
                .unwrap();
            let want = want[0].to_f64_vec().unwrap();
            let fused = r.build("patch", "RMSNorm", 1, &attrs, "f").unwrap();
            let got = fused.eval(&[Some(&x), Some(&w)]).unwrap();
            close(&got[0], &want, 1e-6);
        }
        let bad = Attrs::new().with("axis", Attr::Int(1));
        assert!(r.build("patch", "RMSNorm", 1, &bad, "f").is_err());
    }

    /// Against a plain f64 softmax attention: grouped heads, a causal mask broadcast over
    /// heads with one fully masked row (which must give zeros), a head size that is not a
    /// multiple of 8, and enough rows for the threaded path; with and without softcapping, and
    /// with a sliding window of 3 keys (decode and prefill paths).
    #[test]
    fn attention_matches_a_plain_reference() {
        let r = OpRegistry::onnx();
        for ((b, h, hk, s, t, d), softcap, window) in [
            (1usize, 4usize, 2usize, 3usize, 5usize, 13usize),
            (2, 6, 2, 200, 230, 64),
        ]
        .into_iter()
        .flat_map(|shape| {
            [
                (shape, None, None),
                (shape, Some(0.7f32), None),
                (shape, None, Some(3usize)),
            ]
        }) {
            let q = random(&[b, h, s, d], 6);
            let k = random(&[b, hk, t, d], 7);
            let v = random(&[b, hk, t, d], 8);
            let mut m = vec![0f32; b * s * t];
            for bi in 0..b {
                for i in 0..s {
                    for j in 0..t {
                        let last = i + (t - s);
                        let outside = window.is_some_and(|w| j + w <= last);
                        if j > last || i == 1 || outside {
                            m[(bi * s + i) * t + j] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            let mask = Tensor::from_vec(vec![b, 1, s, t], m.clone()).unwrap();
            let scale = 0.3f32;
            let mut attrs = Attrs::new().with("scale", Attr::Float(scale));
            if let Some(cap) = softcap {
                attrs = attrs.with("softcap", Attr::Float(cap));
            }
            let op = r.build("patch", "Attention", 1, &attrs, "a").unwrap();
            let got = op
                .eval(&[Some(&q), Some(&k), Some(&v), Some(&mask)])
                .unwrap();
            let (qv, kv, vv) = (
                q.to_f64_vec().unwrap(),
                k.to_f64_vec().unwrap(),
                v.to_f64_vec().unwrap(),
            );
            let mut want = vec![0f64; b * h * s * d];
            for bi in 0..b {
                for hi in 0..h {
                    let kh = bi * hk + hi / (h / hk);
                    for i in 0..s {
                        let qrow = &qv[((bi * h + hi) * s + i) * d..][..d];
                        let scores: Vec<f64> = (0..t)
                            .map(|j| {
                                let krow = &kv[(kh * t + j) * d..][..d];
                                let dot: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                                let x = scale as f64 * dot;
                                let x = softcap.map_or(x, |c| c as f64 * (x / c as f64).tanh());
                                x + m[(bi * s + i) * t + j] as f64
                            })
                            .collect();
                        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        if max == f64::NEG_INFINITY {
                            continue;
                        }
                        let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        for (j, p) in e.iter().enumerate() {
                            for c in 0..d {
                                want[((bi * h + hi) * s + i) * d + c] +=
                                    p / sum * vv[(kh * t + j) * d + c];
                            }
                        }
                    }
                }
            }
            close(&got[0], &want, 2e-5);
            // Row 1 of every head is fully masked: zeros.
            let g = got[0].as_slice::<f32>().unwrap();
            assert!(g[d..2 * d].iter().all(|&x| x == 0.0));
        }
        let no_scale = r.build("patch", "Attention", 1, &Attrs::new(), "a");
        assert!(no_scale.is_err());
        for cap in [0.0, -1.0, f32::INFINITY] {
            let attrs = Attrs::new()
                .with("scale", Attr::Float(1.0))
                .with("softcap", Attr::Float(cap));
            assert!(r.build("patch", "Attention", 1, &attrs, "a").is_err());
        }
    }

    /// GeGLU, SwiGLU and the tanh GELU against f64 references (ragged widths, large
    /// magnitudes), and Softcap, including values far beyond the cap.
    #[test]
    fn gated_activations_and_softcap_match_f64_references() {
        let r = OpRegistry::onnx();
        let gelu = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        };
        let silu = |x: f64| x / (1.0 + (-x).exp());
        for shape in [vec![3usize, 7], vec![2, 5, 67], vec![1, 300]] {
            let mut g = random(&shape, 11);
            let u = random(&shape, 12);
            // Spread the gate over ±12 so both tails of the activations are exercised.
            let gv: Vec<f32> = g
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .map(|x| 12.0 * x)
                .collect();
            g = Tensor::from_vec(shape.clone(), gv).unwrap();
            let (gd, ud) = (g.to_f64_vec().unwrap(), u.to_f64_vec().unwrap());
            for (op, act) in [("GeGLU", &gelu as &dyn Fn(f64) -> f64), ("SwiGLU", &silu)] {
                let fused = r.build("patch", op, 1, &Attrs::new(), "g").unwrap();
                let got = fused.eval(&[Some(&g), Some(&u)]).unwrap();
                let want: Vec<f64> = gd.iter().zip(&ud).map(|(&a, &b)| act(a) * b).collect();
                close(&got[0], &want, 1e-5);
            }
            let tanh = Attrs::new().with("approximate", Attr::String("tanh".into()));
            let fused = r.build("patch", "Gelu", 1, &tanh, "g").unwrap();
            let got = fused.eval(&[Some(&g)]).unwrap();
            close(
                &got[0],
                &gd.iter().map(|&x| gelu(x)).collect::<Vec<_>>(),
                1e-5,
            );
            // The exact GELU stays the elementwise op (erf).
            let exact = r.build("patch", "Gelu", 1, &Attrs::new(), "g").unwrap();
            let got = exact.eval(&[Some(&g)]).unwrap();
            let erf_gelu: Vec<f64> = gd
                .iter()
                .map(|&x| {
                    0.5 * x * (1.0 + crate::ops::elementwise::erf(x / std::f64::consts::SQRT_2))
                })
                .collect();
            close(&got[0], &erf_gelu, 1e-5);
            for cap in [0.5f32, 30.0] {
                let attrs = Attrs::new().with("cap", Attr::Float(cap));
                let fused = r.build("patch", "Softcap", 1, &attrs, "s").unwrap();
                let got = fused.eval(&[Some(&g)]).unwrap();
                let c = cap as f64;
                let want: Vec<f64> = gd.iter().map(|&x| c * (x / c).tanh()).collect();
                close(&got[0], &want, 1e-5);
            }
        }
        assert!(r.build("patch", "Softcap", 1, &Attrs::new(), "s").is_err());
    }

    fn attention_op(r: &OpRegistry, scale: f32, layout: &str) -> Arc<dyn Op> {
        let attrs = Attrs::new()
            .with("scale", Attr::Float(scale))
            .with("layout", Attr::String(layout.into()));
        r.build("patch", "Attention", 1, &attrs, "a").unwrap()
    }

    /// `[b, x, y, d]` → `[b, y, x, d]`.
    fn swap12(t: &Tensor) -> Tensor {
        let a = t.to_array::<f32>().unwrap();
        let p = a.permuted_axes(IxDyn(&[0, 2, 1, 3]));
        Tensor::from_array(p.as_standard_layout().to_owned())
    }

    /// The decode kernel on every vector width against its scalar twin and an f64 softmax
    /// attention: ragged key and value widths, a masked key, a row that sees no key.
    #[test]
    fn decode_kernel_widths_match_the_scalar_twin() {
        for (d, dv, t) in [
            (64usize, 64usize, 37usize),
            (13, 21, 5),
            (16, 40, 1),
            (7, 3, 0),
        ] {
            let rows = 3;
            let data = |n: usize, seed: u64| {
                random(&[n.max(1)], seed)
                    .as_slice::<f32>()
                    .unwrap()
                    .to_vec()
            };
            let (ks, vs) = (d + 3, dv + 5);
            let queries: Vec<Vec<f32>> = (0..rows).map(|g| data(d, 10 + g as u64)).collect();
            let (keys, values) = (data(t * ks, 20), data(t * vs, 21));
            // Row 0: no mask; row 1: key 1 masked out; row 2: every key masked out.
            let mut m1 = vec![0f32; t.max(1)];
            if t > 1 {
                m1[1] = f32::NEG_INFINITY;
            }
            let m2 = vec![f32::NEG_INFINITY; t.max(1)];
            let group = DecodeGroup {
                queries: queries.iter().map(|q| q.as_slice()).collect(),
                masks: vec![None, Some((&m1[..], 1)), Some((&m2[..], 1))],
                keys: (&keys, ks, d),
                values: (&values, vs, dv),
                positions: t,
                scale: 0.3,
                softcap: None,
            };
            let mut want = vec![0f64; rows * dv];
            for g in 0..rows {
                let visible: Vec<usize> = (0..t)
                    .filter(|&j| !(g == 2 || (g == 1 && j == 1)))
                    .collect();
                let sc: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        0.3 * (0..d)
                            .map(|c| queries[g][c] as f64 * keys[j * ks + c] as f64)
                            .sum::<f64>()
                    })
                    .collect();
                let top = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - top).exp()).sum();
                for (&j, x) in visible.iter().zip(&sc) {
                    for c in 0..dv {
                        want[g * dv + c] += (x - top).exp() / z * values[j * vs + c] as f64;
                    }
                }
            }
            type Kernel<'a> = &'a dyn Fn(&mut [f32], &mut [(f32, f32)]);
            let run = |f: Kernel| {
                let mut o = vec![f32::NAN; rows * dv];
                let mut st = vec![(0f32, 0f32); rows];
                f(&mut o, &mut st);
                assert_eq!(st[2], (f32::NEG_INFINITY, 0.0), "a row with no key");
                o
            };
            // SAFETY: the scalar body needs no CPU feature.
            let scalar = run(&|o, st| unsafe { group.run_body::<simd::Scalar>(o, st) });
            let mut widths = vec![("scalar", scalar.clone())];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: AVX2 and FMA were detected.
                    widths.push(("avx2", run(&|o, st| unsafe { group.run_avx2(o, st) })));
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F was detected.
                    widths.push(("avx512", run(&|o, st| unsafe { group.run_avx512(o, st) })));
                }
            }
            for (name, got) in widths {
                for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{name} d {d} dv {dv} t {t} at {i}: {a} vs {b}"
                    );
                    assert!(
                        (a - scalar[i]).abs() <= 1e-5 * (1.0 + scalar[i].abs()),
                        "{name} vs scalar at {i}"
                    );
                }
            }
        }
    }

    /// The seq-major layout is the head-major one on transposed operands, bit for bit, on the
    /// decode path (1 and 5 query rows) and the GEMM path (ragged 37 rows), grouped heads, a
    /// ragged head width and a causal mask.
    #[test]
    fn seq_major_attention_is_head_major_attention_transposed() {
        let r = OpRegistry::onnx();
        for (b, h, hk, s, t, d) in [
            (1usize, 6usize, 2usize, 1usize, 9usize, 13usize),
            (2, 4, 4, 5, 11, 8),
            (1, 9, 3, 37, 45, 16),
        ] {
            let q = random(&[b, h, s, d], 16);
            let k = random(&[b, hk, t, d], 17);
            let v = random(&[b, hk, t, d], 18);
            let m: Vec<f32> = (0..s * t)
                .map(|x| {
                    let (i, j) = (x / t, x % t);
                    if j > i + (t - s) {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(vec![1, 1, s, t], m).unwrap();
            let build = |layout| attention_op(&r, 0.25, layout);
            let head_major = build("bhsd")
                .eval(&[Some(&q), Some(&k), Some(&v), Some(&mask)])
                .unwrap();
            let (qs, ks, vs) = (swap12(&q), swap12(&k), swap12(&v));
            let seq_major = build("bshd")
                .eval(&[Some(&qs), Some(&ks), Some(&vs), Some(&mask)])
                .unwrap();
            assert_eq!(seq_major[0].shape(), &[b, s, h, d]);
            assert_eq!(
                seq_major[0].as_slice::<f32>().unwrap(),
                swap12(&head_major[0]).as_slice::<f32>().unwrap(),
                "b {b} h {h} hk {hk} s {s} t {t} d {d}"
            );
        }
        let attrs = Attrs::new()
            .with("scale", Attr::Float(0.25))
            .with("layout", Attr::String("sbhd".into()));
        let err = r.build("patch", "Attention", 1, &attrs, "a").unwrap_err();
        assert!(err.to_string().contains("bhsd or bshd"), "{err}");
    }

    /// Decode with the keys split into 2, 3 and 7 ranges (as when the KV groups do not divide
    /// among the pool's threads): the merged partial softmaxes stay within f32 rounding of the
    /// head-major row-by-row path, a masked tail and a range that sees no key included.
    #[test]
    fn split_key_decode_matches_the_unsplit_path() {
        let r = OpRegistry::onnx();
        let (h, hk, t, d) = (9usize, 3usize, 1500usize, 64usize);
        let q = random(&[1, h, 1, d], 21);
        let k = random(&[1, hk, t, d], 22);
        let v = random(&[1, hk, t, d], 23);
        // The last 300 keys are masked out: with 7 ranges the last sees none.
        let m: Vec<f32> = (0..t)
            .map(|j| if j >= t - 300 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(vec![1, 1, 1, t], m).unwrap();
        let want = attention_op(&r, 0.125, "bhsd")
            .eval(&[Some(&q), Some(&k), Some(&v), Some(&mask)])
            .unwrap();
        let want = want[0].to_f64_vec().unwrap();
        let (qs, ks, vs) = (swap12(&q), swap12(&k), swap12(&v));
        for parts in [2, 3, 7] {
            let op = Attention {
                scale: 0.125,
                softcap: None,
                seq_major: true,
                key_parts: Some(parts),
            };
            let got = op
                .eval(&[Some(&qs), Some(&ks), Some(&vs), Some(&mask)])
                .unwrap();
            close(&got[0], &want, 1e-5);
        }
    }

    /// Appending in place gives what Concat gives; the second of two appends to one past (a
    /// cache that branched) copies instead of overwriting the first's tokens.
    #[test]
    fn kv_append_is_concat_and_grows_in_place() {
        let r = OpRegistry::onnx();
        let op = r
            .build(
                "patch",
                "KvAppend",
                1,
                &Attrs::new().with("axis", Attr::Int(1)),
                "kv",
            )
            .unwrap();
        let concat = r
            .build(
                "",
                "Concat",
                13,
                &Attrs::new().with("axis", Attr::Int(1)),
                "c",
            )
            .unwrap();
        let (hk, d) = (3usize, 5usize);
        let empty =
            Tensor::with_append_capacity(DType::F32, vec![1, 0, hk, d], 8 * hk * d).unwrap();
        let mut past = empty.clone();
        let mut plain = Tensor::zeros(DType::F32, vec![1, 0, hk, d]);
        for (step, n) in [4usize, 1, 1, 1, 3].into_iter().enumerate() {
            let new = random(&[1, n, hk, d], 30 + step as u64);
            let grown = op.eval(&[Some(&past), Some(&new)]).unwrap().remove(0);
            plain = concat.eval(&[Some(&plain), Some(&new)]).unwrap().remove(0);
            assert_eq!(grown.shape(), plain.shape());
            assert_eq!(
                grown.as_slice::<f32>().unwrap(),
                plain.as_slice::<f32>().unwrap()
            );
            // In place while the 8 positions of room last, then a copy with new room.
            let in_place = grown.bytes().as_ptr() == empty.bytes().as_ptr();
            assert_eq!(in_place, grown.shape()[1] <= 8, "step {step}");
            past = grown;
        }
        assert!(past.append_room() > 0);
        // Two continuations of one past: both are right, the first did not get overwritten.
        let base = op
            .eval(&[Some(&empty), Some(&random(&[1, 2, hk, d], 40))])
            .unwrap()
            .remove(0);
        let (x, y) = (random(&[1, 1, hk, d], 41), random(&[1, 1, hk, d], 42));
        let bx = op.eval(&[Some(&base), Some(&x)]).unwrap().remove(0);
        let by = op.eval(&[Some(&base), Some(&y)]).unwrap().remove(0);
        for (grown, tail) in [(&bx, &x), (&by, &y)] {
            let want = concat.eval(&[Some(&base), Some(tail)]).unwrap().remove(0);
            assert_eq!(
                grown.as_slice::<f32>().unwrap(),
                want.as_slice::<f32>().unwrap()
            );
        }
        // Batch 2 is not a byte append: it falls back to Concat.
        let b2 = op
            .eval(&[
                Some(&random(&[2, 3, hk, d], 43)),
                Some(&random(&[2, 1, hk, d], 44)),
            ])
            .unwrap();
        assert_eq!(b2[0].shape(), &[2, 4, hk, d]);
    }

    /// Against its definition, with Cos/Sin of shape [b, 1, s, d] broadcast over heads.
    #[test]
    fn rotary_matches_its_definition() {
        let r = OpRegistry::onnx();
        let (b, h, s, d) = (2usize, 3usize, 5usize, 8usize);
        let x = random(&[b, h, s, d], 9);
        let cos = random(&[b, 1, s, d], 10);
        let sin = random(&[b, 1, s, d], 11);
        let op = r
            .build(
                "patch",
                "Rotary",
                1,
                &Attrs::new().with("half", Attr::Int(4)),
                "r",
            )
            .unwrap();
        let got = op.eval(&[Some(&x), Some(&cos), Some(&sin)]).unwrap();
        let (xv, cv, sv) = (
            x.to_f64_vec().unwrap(),
            cos.to_f64_vec().unwrap(),
            sin.to_f64_vec().unwrap(),
        );
        let mut want = vec![0f64; xv.len()];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..s {
                    let row = ((bi * h + hi) * s + i) * d;
                    let trow = (bi * s + i) * d;
                    for j in 0..d {
                        let rot = if j < d / 2 {
                            -xv[row + j + d / 2]
                        } else {
                            xv[row + j - d / 2]
                        };
                        want[row + j] = xv[row + j] * cv[trow + j] + rot * sv[trow + j];
                    }
                }
            }
        }
        close(&got[0], &want, 1e-6);
        let wrong = r
            .build(
                "patch",
                "Rotary",
                1,
                &Attrs::new().with("half", Attr::Int(3)),
                "r",
            )
            .unwrap();
        assert!(wrong.eval(&[Some(&x), Some(&cos), Some(&sin)]).is_err());
    }

    #[test]
    fn exp_matches_std_within_its_bound() {
        let mut xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.05).collect();
        xs.extend([
            f32::NEG_INFINITY,
            -1e30,
            -88.0,
            88.0,
            0.0,
            -0.0,
            f32::INFINITY,
        ]);
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = (x as f64).exp();
            if want < f32::MIN_POSITIVE as f64 {
                assert!(g.abs() <= f32::MIN_POSITIVE, "exp({x}) = {g}");
            } else if x > 88.376_26 {
                assert_eq!(g, f32::INFINITY, "exp({x})");
            } else {
                assert!(
                    ((g as f64 - want) / want).abs() <= 4e-7,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
    }

    #[test]
    fn silu_and_swiglu_match_their_definitions() {
        let r = OpRegistry::onnx();
        let g = random(&[5, 300, 33], 3);
        let u = random(&[5, 300, 33], 4);
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let gv = g.to_f64_vec().unwrap();
        let uv = u.to_f64_vec().unwrap();
        let silu = r.build("patch", "Silu", 1, &Attrs::new(), "s").unwrap();
        let got = silu.eval(&[Some(&g)]).unwrap();
        let want: Vec<f64> = gv.iter().map(|&x| x * sig(x)).collect();
        close(&got[0], &want, 1e-6);
        let swiglu = r.build("patch", "SwiGLU", 1, &Attrs::new(), "g").unwrap();
        let got = swiglu.eval(&[Some(&g), Some(&u)]).unwrap();
        let want: Vec<f64> = gv.iter().zip(&uv).map(|(&a, &b)| a * sig(a) * b).collect();
        close(&got[0], &want, 1e-6);
        let other = random(&[5, 300, 32], 5);
        assert!(swiglu.eval(&[Some(&g), Some(&other)]).is_err());
    }
}
