//! Backward (vector-Jacobian product) ops of the fused ops in [`super::fused`], in the `patch`
//! domain, since opset 1. Each takes what its forward op read (those inputs its gradient
//! needs) and the cotangent of the forward's output, and returns the cotangents of the
//! forward's inputs, each with the type of the forward input it belongs to:
//!
//! * `patch.RMSNormGrad(X, Scale?, dY) {epsilon, axis = -1} → (dX, dScale)`: with
//!   `x̂ = X / sqrt(mean(X², last axis) + eps)` and `g = dY · Scale`,
//!   `dX = (g − x̂ · mean(g · x̂)) / sqrt(mean(X²) + eps)` per row and `dScale = Σ_rows dY · x̂`
//!   (shape `[last axis]`). Without Scale (the forward's scale 1), `dScale` is still produced:
//!   the same sum, the gradient a scale of ones would get. Row sums and `dScale` accumulate in
//!   f64, like the forward's mean.
//! * `patch.SiluGrad(X, dY) → dX`: `dY · σ(X) · (1 + X · (1 − σ(X)))`, `σ` the sigmoid.
//! * `patch.SwiGLUGrad(G, U, dY) → (dG, dU)`: `dG = dY · U · silu'(G)`, `dU = dY · silu(G)`;
//!   G, U and dY of one shape.
//! * `patch.GeGLUGrad(G, U, dY) → (dG, dU)`: `dG = dY · U · gelu'(G)`, `dU = dY · gelu(G)` with
//!   the tanh GELU `gelu(x) = x · σ(2z)`, `z = sqrt(2/π)(x + 0.044715 x³)`, so
//!   `gelu'(x) = σ(2z) + x · σ(2z)(1 − σ(2z)) · 2 sqrt(2/π)(1 + 3 · 0.044715 x²)`.
//! * `patch.SoftcapGrad(X, dY) {cap} → dX`: `dY · (1 − tanh²(X / cap))`.
//! * `patch.RotaryGrad(dY, Cos, Sin) {half, axis = -1} → dX`: the transpose of
//!   `patch.Rotary`: `dX[j] = dY[j] Cos[j] + dY[j + half] Sin[j + half]`,
//!   `dX[j + half] = dY[j + half] Cos[j + half] − dY[j] Sin[j]` for `j < half`, Cos and Sin
//!   broadcast to dY as in the forward (the two halves of a table need not be equal).
//! * `patch.AttentionGrad(Q, K, V, Mask?, dO) {scale, softcap?, layout = "bhsd" | "bshd"} →
//!   (dQ, dK, dV)`: the gradients of `patch.Attention` (same shapes, grouped KV heads, Mask and
//!   layouts as there; dO has the forward output's shape). Per (batch, query head), blocks of
//!   64 query rows recompute the probabilities `P` (over the keys up to the last one the block
//!   sees, as the forward) and run `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))` (that row sum
//!   is `rowsum(dO ⊙ O)`), with softcapping `dS ⊙= 1 − (c / softcap)²` for the capped
//!   scores `c`, then `dQ = scale · dS K`, `dK += scale · dSᵀ Q`, `dV += Pᵀ dO` as GEMMs;
//!   the query heads that share a KV head add their dK and dV. A row the mask hides entirely
//!   (or whose scores hold a NaN) gave zeros forward and gets zero gradient. The (batch, query
//!   head) items are spread over the kernels' thread pool.
//!
//! All inputs and outputs are f32.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ndarray::linalg::general_mat_mul;
use ndarray::{s, ArrayView2, ArrayViewMut2, ShapeBuilder};

use super::fused::{broadcast_strides, require_f32, softmax_row, tensor_err};
use super::{
    arity, for_each_row, norm_axis, opt, req, InputFact, Op, OpError, OpRegistry, OutputFact,
    Outputs,
};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::ir::{Attrs, TensorType};
use crate::tensor::Tensor;

pub fn register(r: &mut OpRegistry) {
    r.register("patch", "RMSNormGrad", 1, |attrs, _| {
        Ok(Arc::new(RmsNormGrad::from_attrs(attrs)?))
    });
    r.register("patch", "SiluGrad", 1, |_, _| Ok(Arc::new(SiluGrad)));
    r.register("patch", "SwiGLUGrad", 1, |_, _| {
        Ok(Arc::new(GatedGrad { gelu: false }))
    });
    r.register("patch", "GeGLUGrad", 1, |_, _| {
        Ok(Arc::new(GatedGrad { gelu: true }))
    });
    r.register("patch", "SoftcapGrad", 1, |attrs, _| {
        Ok(Arc::new(SoftcapGrad {
            cap: super::fused::Softcap::from_attrs(attrs)?.cap,
        }))
    });
    r.register("patch", "RotaryGrad", 1, |attrs, _| {
        Ok(Arc::new(RotaryGrad::from_attrs(attrs)?))
    });
    r.register("patch", "AttentionGrad", 1, |attrs, _| {
        Ok(Arc::new(AttentionGrad::from_attrs(attrs)?))
    });
}

/// Elements from which the elementwise and row ops split over the pool (as `for_each_row`).
const PARALLEL_MIN: usize = 1 << 15;

/// Multiply-adds from which attention's backward spreads over the pool.
const ATTENTION_PARALLEL_WORK: usize = 1 << 17;

/// Query rows per block of the attention backward (as the forward's prefill).
const ROW_BLOCK: usize = 64;

/// The kernels' pool, when `parallel` and it has more than one thread.
fn pool(parallel: bool) -> Option<&'static patch_kernels::CpuKernels> {
    patch_kernels::CpuKernels::global()
        .ok()
        .filter(|p| parallel && p.threads() > 1)
}

/// How many runs a row op over `len` elements in `rows` rows splits into: the pool's thread
/// count when the tensor is large enough to pay for the wake-up, else 1.
fn parts_for(len: usize, rows: usize) -> usize {
    pool(len >= PARALLEL_MIN).map_or(1, |p| p.threads().min(rows).max(1))
}

/// Runs `f(p)` for every `p < parts`, on the pool's threads when `parts > 1` (`parts` from
/// [`parts_for`], so at most the pool's thread count).
fn run_parts(parts: usize, f: &(dyn Fn(usize) + Sync)) {
    match pool(parts > 1) {
        Some(p) => p.run_on_threads(&|t| {
            if t < parts {
                f(t)
            }
        }),
        None => (0..parts).for_each(f),
    }
}

/// `buf` cut into `parts` runs of whole `width`-wide rows (part `p` holds rows
/// `rows · p / parts .. rows · (p + 1) / parts`), each behind a mutex for the thread that
/// takes it. A zero `width` gives empty parts.
fn split_rows(buf: &mut [f32], width: usize, parts: usize) -> Vec<Mutex<&mut [f32]>> {
    let rows = buf.len().checked_div(width).unwrap_or(0);
    let mut rest = buf;
    (0..parts)
        .map(|p| {
            let take = (rows * (p + 1) / parts - rows * p / parts) * width;
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
            rest = tail;
            Mutex::new(head)
        })
        .collect()
}

fn lock<'a, T>(m: &'a Mutex<T>) -> MutexGuard<'a, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `d silu(x) / dx = σ(x) (1 + x (1 − σ(x)))` (0 for `x → −∞`, 1 for `x → +∞`).
#[inline]
fn silu_slope(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

fn same_shape(op: &str, what: &str, a: &TensorType, b: &TensorType) -> Result<(), OpError> {
    if a.shape == b.shape {
        Ok(())
    } else {
        Err(OpError::Invalid(format!(
            "{op}: {what} {b} must have the shape of {a}"
        )))
    }
}

/// `patch.RMSNormGrad` (see the module docs).
#[derive(Debug)]
pub struct RmsNormGrad {
    pub epsilon: f32,
}

impl RmsNormGrad {
    /// The forward op's attributes, parsed (and checked) as `patch.RMSNorm` parses them.
    pub fn from_attrs(attrs: &Attrs) -> Result<RmsNormGrad, OpError> {
        let forward = super::fused::RmsNorm::from_attrs(attrs)?;
        Ok(RmsNormGrad {
            epsilon: forward.epsilon,
        })
    }
}

impl Op for RmsNormGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        const OP: &str = "patch.RMSNormGrad";
        arity(inputs, 3, 3)?;
        let (x, dy) = (req(inputs, 0)?, req(inputs, 2)?);
        require_f32(OP, "X", x.ty)?;
        require_f32(OP, "dY", dy.ty)?;
        let Some(last) = x.ty.shape.last() else {
            return Err(OpError::Invalid(format!("{OP}: X must have rank ≥ 1")));
        };
        same_shape(OP, "dY", x.ty, dy.ty)?;
        let dscale = match opt(inputs, 1) {
            Some(s) => {
                require_f32(OP, "Scale", s.ty)?;
                if s.ty.shape.as_slice() != std::slice::from_ref(last) {
                    return Err(OpError::Invalid(format!(
                        "{OP}: Scale must have shape [{last}] (X's last axis), got {}",
                        s.ty
                    )));
                }
                s.ty.clone()
            }
            None => TensorType::new(DType::F32, vec![last.clone()]),
        };
        Ok(vec![OutputFact::new(x.ty.clone()), OutputFact::new(dscale)])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        const OP: &str = "patch.RMSNormGrad";
        arity(inputs, 3, 3)?;
        let (xt, dyt) = (req(inputs, 0)?, req(inputs, 2)?);
        let Some(&width) = xt.shape().last() else {
            return Err(OpError::Invalid(format!("{OP}: X must have rank ≥ 1")));
        };
        if dyt.shape() != xt.shape() {
            return Err(OpError::Invalid(format!(
                "{OP}: dY {:?} must have the shape of X {:?}",
                dyt.shape(),
                xt.shape()
            )));
        }
        let x = xt.as_slice::<f32>().map_err(tensor_err)?;
        let dy = dyt.as_slice::<f32>().map_err(tensor_err)?;
        let scale_t = opt(inputs, 1);
        if let Some(st) = scale_t {
            if st.shape() != [width] {
                return Err(OpError::Invalid(format!(
                    "{OP}: Scale {:?} must have shape [{width}] (X's last axis)",
                    st.shape()
                )));
            }
        }
        let scale = scale_t
            .map(|s| s.as_slice::<f32>().map_err(tensor_err))
            .transpose()?;
        let dscale_shape = scale_t.map_or(vec![width], |s| s.shape().to_vec());
        let eps = self.epsilon as f64;
        let mut dx = outputs.f32(0, x.len());
        let mut dscale = outputs.f32(1, width);
        let rows = x.len().checked_div(width).unwrap_or(0);
        if rows > 0 {
            let parts = parts_for(x.len(), rows);
            let chunks = split_rows(&mut dx, width, parts);
            let partial: Vec<Mutex<Vec<f64>>> =
                (0..parts).map(|_| Mutex::new(vec![0f64; width])).collect();
            // dScale: the parts' f64 partial sums, added in part order (deterministic).
            run_parts(parts, &|p| {
                let r0 = rows * p / parts;
                let mut out = lock(&chunks[p]);
                let mut acc = lock(&partial[p]);
                for (k, o) in out.chunks_exact_mut(width).enumerate() {
                    let at = (r0 + k) * width;
                    let (xr, gr) = (&x[at..at + width], &dy[at..at + width]);
                    let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
                    let inv = 1.0 / (ss / width as f64 + eps).sqrt();
                    // mean(g · x̂) with g = dY · Scale, in f64.
                    let gx: f64 = match scale {
                        Some(w) => xr
                            .iter()
                            .zip(gr)
                            .zip(w)
                            .map(|((&v, &g), &s)| (g as f64) * (s as f64) * (v as f64))
                            .sum(),
                        None => xr.iter().zip(gr).map(|(&v, &g)| g as f64 * v as f64).sum(),
                    };
                    let mean = (gx * inv / width as f64) as f32;
                    let inv = inv as f32;
                    for (j, ((d, &v), &g)) in o.iter_mut().zip(xr).zip(gr).enumerate() {
                        let xh = v * inv;
                        let gw = scale.map_or(g, |w| g * w[j]);
                        *d = inv * (gw - xh * mean);
                        acc[j] += g as f64 * xh as f64;
                    }
                }
            });
            drop(chunks);
            let mut total = vec![0f64; width];
            for p in &partial {
                for (t, &v) in total.iter_mut().zip(lock(p).iter()) {
                    *t += v;
                }
            }
            for (d, t) in dscale.iter_mut().zip(total) {
                *d = t as f32;
            }
        }
        Ok(vec![
            dx.into_tensor(xt.shape().to_vec()).map_err(tensor_err)?,
            dscale.into_tensor(dscale_shape).map_err(tensor_err)?,
        ])
    }
}

/// `patch.SiluGrad` (see the module docs).
#[derive(Debug)]
pub struct SiluGrad;

impl Op for SiluGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        const OP: &str = "patch.SiluGrad";
        arity(inputs, 2, 2)?;
        let (x, dy) = (req(inputs, 0)?, req(inputs, 1)?);
        require_f32(OP, "X", x.ty)?;
        require_f32(OP, "dY", dy.ty)?;
        same_shape(OP, "dY", x.ty, dy.ty)?;
        Ok(vec![OutputFact::new(x.ty.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let (xt, dyt) = (req(inputs, 0)?, req(inputs, 1)?);
        if dyt.shape() != xt.shape() {
            return Err(OpError::Invalid(format!(
                "patch.SiluGrad: dY {:?} must have the shape of X {:?}",
                dyt.shape(),
                xt.shape()
            )));
        }
        let x = xt.as_slice::<f32>().map_err(tensor_err)?;
        let dy = dyt.as_slice::<f32>().map_err(tensor_err)?;
        let width = xt.shape().last().copied().unwrap_or(1).max(1);
        let mut out = outputs.f32(0, x.len());
        for_each_row(&mut out, width, &|r, o| {
            let at = r * o.len();
            for ((d, &v), &g) in o.iter_mut().zip(&x[at..]).zip(&dy[at..]) {
                *d = g * silu_slope(v);
            }
        });
        Ok(vec![out
            .into_tensor(xt.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

/// `patch.SwiGLUGrad` (see the module docs).
#[derive(Debug)]
pub struct GatedGrad {
    /// GeGLU (the tanh GELU gate) instead of SwiGLU.
    gelu: bool,
}

/// `2 sqrt(2/π)` and GELU-tanh's cubic coefficient.
const GELU_2K: f32 = 1.595_769;
const GELU_A: f32 = 0.044715;

/// `(act(x), act'(x))` of a gated unit's activation.
#[inline]
fn gate_and_slope(gelu: bool, x: f32) -> (f32, f32) {
    if gelu {
        let sg = sigmoid(GELU_2K * (x + GELU_A * x * x * x));
        let dz = GELU_2K * (1.0 + 3.0 * GELU_A * x * x);
        (x * sg, sg + x * sg * (1.0 - sg) * dz)
    } else {
        let sg = sigmoid(x);
        (x * sg, sg * (1.0 + x * (1.0 - sg)))
    }
}

impl Op for GatedGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        let op = if self.gelu {
            "patch.GeGLUGrad"
        } else {
            "patch.SwiGLUGrad"
        };
        arity(inputs, 3, 3)?;
        let (g, u, dy) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        require_f32(op, "G", g.ty)?;
        require_f32(op, "U", u.ty)?;
        require_f32(op, "dY", dy.ty)?;
        same_shape(op, "U", g.ty, u.ty)?;
        same_shape(op, "dY", g.ty, dy.ty)?;
        Ok(vec![
            OutputFact::new(g.ty.clone()),
            OutputFact::new(u.ty.clone()),
        ])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 3, 3)?;
        let (gt, ut, dyt) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        if ut.shape() != gt.shape() || dyt.shape() != gt.shape() {
            return Err(OpError::Invalid(format!(
                "patch.{}: G {:?}, U {:?} and dY {:?} must have one shape",
                if self.gelu { "GeGLUGrad" } else { "SwiGLUGrad" },
                gt.shape(),
                ut.shape(),
                dyt.shape()
            )));
        }
        let g = gt.as_slice::<f32>().map_err(tensor_err)?;
        let u = ut.as_slice::<f32>().map_err(tensor_err)?;
        let dy = dyt.as_slice::<f32>().map_err(tensor_err)?;
        let mut dg = outputs.f32(0, g.len());
        let mut du = outputs.f32(1, g.len());
        // Elementwise: element ranges (rows of width 1) split over the pool.
        {
            let parts = parts_for(g.len(), g.len());
            let (dgs, dus) = (split_rows(&mut dg, 1, parts), split_rows(&mut du, 1, parts));
            run_parts(parts, &|p| {
                let at = g.len() * p / parts;
                let (mut dg, mut du) = (lock(&dgs[p]), lock(&dus[p]));
                let n = dg.len();
                let (gs, us, ys) = (&g[at..at + n], &u[at..at + n], &dy[at..at + n]);
                for ((((a, b), &x), &w), &y) in
                    dg.iter_mut().zip(du.iter_mut()).zip(gs).zip(us).zip(ys)
                {
                    let (act, slope) = gate_and_slope(self.gelu, x);
                    *a = y * w * slope;
                    *b = y * act;
                }
            });
        }
        Ok(vec![
            dg.into_tensor(gt.shape().to_vec()).map_err(tensor_err)?,
            du.into_tensor(gt.shape().to_vec()).map_err(tensor_err)?,
        ])
    }
}

/// `patch.RotaryGrad` (see the module docs).
#[derive(Debug)]
pub struct RotaryGrad {
    pub half: usize,
    /// The rotated axis as the exporter wrote it; must name the last axis.
    pub axis: i64,
}

impl RotaryGrad {
    /// The forward op's attributes, parsed (and checked) as `patch.Rotary` parses them.
    pub fn from_attrs(attrs: &Attrs) -> Result<RotaryGrad, OpError> {
        let forward = super::fused::Rotary::from_attrs(attrs)?;
        Ok(RotaryGrad {
            half: forward.half,
            axis: forward.axis,
        })
    }
}

impl Op for RotaryGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        const OP: &str = "patch.RotaryGrad";
        arity(inputs, 3, 3)?;
        let dy = req(inputs, 0)?;
        for (what, i) in [("dY", 0), ("Cos", 1), ("Sin", 2)] {
            require_f32(OP, what, req(inputs, i)?.ty)?;
        }
        if norm_axis(self.axis, dy.ty.rank())? + 1 != dy.ty.rank() {
            return Err(OpError::Invalid(format!(
                "{OP}: axis {} of dY {} is not its last axis",
                self.axis, dy.ty
            )));
        }
        let last = dy.ty.shape.last().and_then(|d| d.as_const());
        if last.is_some_and(|d| d != 2 * self.half as i64) {
            return Err(OpError::Invalid(format!(
                "{OP}: dY {} must have a last axis of 2 · half = {}",
                dy.ty,
                2 * self.half
            )));
        }
        for (what, i) in [("Cos", 1), ("Sin", 2)] {
            let t = req(inputs, i)?.ty;
            if t.rank() > dy.ty.rank() || t.shape.last() != dy.ty.shape.last() {
                return Err(OpError::Invalid(format!(
                    "{OP}: {what} {t} does not broadcast to dY {} along the rows",
                    dy.ty
                )));
            }
        }
        Ok(vec![OutputFact::new(dy.ty.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 3, 3)?;
        let (yt, ct, st) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        let bad = |msg: String| OpError::Invalid(format!("patch.RotaryGrad: {msg}"));
        let d = 2 * self.half;
        if yt.shape().last() != Some(&d) {
            return Err(bad(format!("dY {:?} needs a last axis of {d}", yt.shape())));
        }
        if norm_axis(self.axis, yt.rank())? + 1 != yt.rank() {
            return Err(bad(format!("axis {} is not dY's last axis", self.axis)));
        }
        let lead: Vec<usize> = yt.shape()[..yt.rank() - 1].to_vec();
        let table_strides = |what: &str, t: &Tensor| match broadcast_strides(t.shape(), yt.shape())
        {
            Ok(st) if t.shape().last() == Some(&d) => Ok(st),
            Ok(_) => Err(bad(format!("{what} {:?} must end in {d}", t.shape()))),
            Err(e) => Err(bad(format!("{what}: {e}"))),
        };
        let (cs, ss) = (table_strides("Cos", ct)?, table_strides("Sin", st)?);
        let (dy, cos, sin) = (
            yt.as_slice::<f32>().map_err(tensor_err)?,
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
        let mut out = outputs.f32(0, dy.len());
        for_each_row(&mut out, d, &|row, o| {
            let yr = &dy[row * d..(row + 1) * d];
            let c = &cos[offset(row, &cs)..][..d];
            let s = &sin[offset(row, &ss)..][..d];
            for j in 0..half {
                o[j] = yr[j] * c[j] + yr[j + half] * s[j + half];
                o[j + half] = yr[j + half] * c[j + half] - yr[j] * s[j];
            }
        });
        Ok(vec![out
            .into_tensor(yt.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

/// `patch.SoftcapGrad` (see the module docs).
#[derive(Debug)]
pub struct SoftcapGrad {
    pub cap: f32,
}

impl Op for SoftcapGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        const OP: &str = "patch.SoftcapGrad";
        arity(inputs, 2, 2)?;
        let (x, dy) = (req(inputs, 0)?, req(inputs, 1)?);
        require_f32(OP, "X", x.ty)?;
        require_f32(OP, "dY", dy.ty)?;
        same_shape(OP, "dY", x.ty, dy.ty)?;
        Ok(vec![OutputFact::new(x.ty.clone())])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let (xt, dyt) = (req(inputs, 0)?, req(inputs, 1)?);
        if xt.shape() != dyt.shape() {
            return Err(OpError::Invalid(format!(
                "patch.SoftcapGrad: X {:?} and dY {:?} must have one shape",
                xt.shape(),
                dyt.shape()
            )));
        }
        let x = xt.as_slice::<f32>().map_err(tensor_err)?;
        let dy = dyt.as_slice::<f32>().map_err(tensor_err)?;
        let mut dx = outputs.f32(0, x.len());
        let width = *xt.shape().last().unwrap_or(&1);
        for_each_row(&mut dx, width.max(1), &|r, o| {
            let n = o.len();
            for ((d, &v), &y) in o.iter_mut().zip(&x[r * n..][..n]).zip(&dy[r * n..][..n]) {
                let t = (v / self.cap).tanh();
                *d = y * (1.0 - t * t);
            }
        });
        Ok(vec![dx
            .into_tensor(xt.shape().to_vec())
            .map_err(tensor_err)?])
    }
}

/// `patch.AttentionGrad` (see the module docs).
#[derive(Debug)]
pub struct AttentionGrad {
    pub scale: f32,
    pub softcap: Option<f32>,
    /// `layout = "bshd"`: Q, K, V, dO and the gradients have the sequence axis before the
    /// heads.
    pub seq_major: bool,
}

impl AttentionGrad {
    /// The forward op's attributes, parsed (and checked) as `patch.Attention` parses them.
    pub fn from_attrs(attrs: &Attrs) -> Result<AttentionGrad, OpError> {
        let forward = super::fused::Attention::from_attrs(attrs)?;
        Ok(AttentionGrad {
            scale: forward.scale,
            softcap: forward.softcap,
            seq_major: forward.seq_major,
        })
    }

    /// `[b, heads, seq, d]` of a rank-4 shape in this op's layout.
    fn dims<T: Clone>(&self, shape: &[T]) -> [T; 4] {
        let [b, x, y, d] = [0, 1, 2, 3].map(|i| shape[i].clone());
        if self.seq_major {
            [b, y, x, d]
        } else {
            [b, x, y, d]
        }
    }

    /// Element strides of (batch, head, position) in a tensor of `heads` heads and `seq`
    /// positions of width `d`, in this op's layout.
    fn strides(&self, heads: usize, seq: usize, d: usize) -> [usize; 3] {
        if self.seq_major {
            [seq * heads * d, d, heads * d]
        } else {
            [heads * seq * d, seq * d, d]
        }
    }
}

/// What one (batch, query head) item of the attention backward reads.
struct AttentionBackward<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    dout: &'a [f32],
    /// Element strides of (batch, head, position) in Q, K, V and dO.
    strides: [[usize; 3]; 4],
    /// The mask and its strides broadcast to `[b, h, s, t]`.
    mask: Option<(&'a [f32], Vec<usize>)>,
    /// (s, t, d, dv): query rows, keys, Q/K head width, V head width.
    sizes: (usize, usize, usize, usize),
    /// Query heads per KV head.
    group: usize,
    scale: f32,
    softcap: Option<f32>,
}

impl AttentionBackward<'_> {
    /// The mask row of query `i` of (batch, head) and its stride along the keys.
    fn mask_row(&self, batch: usize, head: usize, i: usize) -> Option<(&[f32], usize)> {
        self.mask.as_ref().map(|(m, st)| {
            let base = batch * st[0] + head * st[1] + i * st[2];
            (&m[base..], st[3])
        })
    }

    /// Writes the gradients of (batch, query head `head`), head-major: `dq` `[s, d]`, and
    /// this head's shares of its KV head's gradients, `dk` `[t, d]` and `dv` `[t, dv]` (all
    /// zeroed by the caller).
    fn run(&self, batch: usize, head: usize, dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
        let (s, t, d, dvw) = self.sizes;
        let [qst, kst, vst, ost] = self.strides;
        let kv = head / self.group;
        /// `rows × cols` starting at `at`, rows `stride` apart.
        fn view(
            data: &[f32],
            rows: usize,
            cols: usize,
            at: usize,
            stride: usize,
        ) -> ArrayView2<'_, f32> {
            ArrayView2::from_shape((rows, cols).strides((stride, 1)), &data[at..])
                .expect("sizes checked by the caller")
        }
        let qh = view(self.q, s, d, batch * qst[0] + head * qst[1], qst[2]);
        let kh = view(self.k, t, d, batch * kst[0] + kv * kst[1], kst[2]);
        let vh = view(self.v, t, dvw, batch * vst[0] + kv * vst[1], vst[2]);
        let oh = view(self.dout, s, dvw, batch * ost[0] + head * ost[1], ost[2]);
        let shape_err = "buffers sized by the caller";
        let mut dqh = ArrayViewMut2::from_shape((s, d), dq).expect(shape_err);
        let mut dkh = ArrayViewMut2::from_shape((t, d), dk).expect(shape_err);
        let mut dvh = ArrayViewMut2::from_shape((t, dvw), dv).expect(shape_err);
        // Keys past the last one a row can see are `-inf` for it: a block of rows needs the
        // keys up to the last any of its rows sees (a causal mask halves the work).
        let visible = |i: usize| match self.mask_row(batch, head, i) {
            None => t,
            Some((m, stride)) => (0..t)
                .rev()
                .find(|&j| m[j * stride] != f32::NEG_INFINITY)
                .map_or(0, |j| j + 1),
        };
        let block = ROW_BLOCK.min(s);
        let (mut p_buf, mut dp_buf) = (vec![0f32; block * t], vec![0f32; block * t]);
        // With softcapping: the capped scores' slope `1 − (c / cap)²` per score.
        let mut slope_buf = vec![0f32; if self.softcap.is_some() { block * t } else { 0 }];
        for i0 in (0..s).step_by(ROW_BLOCK) {
            let rows = ROW_BLOCK.min(s - i0);
            let keys = (i0..i0 + rows).map(visible).max().unwrap_or(0);
            if keys == 0 {
                continue;
            }
            let qb = qh.slice(s![i0..i0 + rows, ..]);
            let ob = oh.slice(s![i0..i0 + rows, ..]);
            let (kb, vb) = (kh.slice(s![..keys, ..]), vh.slice(s![..keys, ..]));
            let mut p = ArrayViewMut2::from_shape((rows, keys), &mut p_buf[..rows * keys])
                .expect(shape_err);
            general_mat_mul(self.scale, &qb, &kb.t(), 0.0, &mut p);
            for (r, mut row) in p.rows_mut().into_iter().enumerate() {
                let row = row.as_slice_mut().expect("standard layout");
                if let Some(cap) = self.softcap {
                    super::fused::softcap_in_place(row, cap);
                    for (sl, &c) in slope_buf[r * keys..(r + 1) * keys].iter_mut().zip(&*row) {
                        let t = c / cap;
                        *sl = 1.0 - t * t;
                    }
                }
                if softmax_row(row, self.mask_row(batch, head, i0 + r)).is_none() {
                    row.fill(0.0);
                }
            }
            let mut ds = ArrayViewMut2::from_shape((rows, keys), &mut dp_buf[..rows * keys])
                .expect(shape_err);
            general_mat_mul(1.0, &ob, &vb.t(), 0.0, &mut ds);
            for (prow, mut dsrow) in p.rows().into_iter().zip(ds.rows_mut()) {
                let prow = prow.as_slice().expect("standard layout");
                let dsrow = dsrow.as_slice_mut().expect("standard layout");
                let sum: f32 = prow.iter().zip(dsrow.iter()).map(|(&a, &b)| a * b).sum();
                for (x, &pj) in dsrow.iter_mut().zip(prow) {
                    *x = pj * (*x - sum);
                }
            }
            if self.softcap.is_some() {
                for (x, &sl) in ds.iter_mut().zip(&slope_buf[..rows * keys]) {
                    *x *= sl;
                }
            }
            general_mat_mul(
                self.scale,
                &ds,
                &kb,
                0.0,
                &mut dqh.slice_mut(s![i0..i0 + rows, ..]),
            );
            general_mat_mul(
                self.scale,
                &ds.t(),
                &qb,
                1.0,
                &mut dkh.slice_mut(s![..keys, ..]),
            );
            general_mat_mul(1.0, &p.t(), &ob, 1.0, &mut dvh.slice_mut(s![..keys, ..]));
        }
    }
}

impl Op for AttentionGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        const OP: &str = "patch.AttentionGrad";
        arity(inputs, 5, 5)?;
        let (q, k, v, dout) = (
            req(inputs, 0)?,
            req(inputs, 1)?,
            req(inputs, 2)?,
            req(inputs, 4)?,
        );
        let want = if self.seq_major {
            "[batch, seq, heads, head_dim]"
        } else {
            "[batch, heads, seq, head_dim]"
        };
        for (what, t) in [("Q", q.ty), ("K", k.ty), ("V", v.ty), ("dO", dout.ty)] {
            require_f32(OP, what, t)?;
            if t.rank() != 4 {
                return Err(OpError::Invalid(format!(
                    "{OP}: {what} must be {want}, got {t}"
                )));
            }
        }
        let (qs, ks, vs) = (
            self.dims(&q.ty.shape),
            self.dims(&k.ty.shape),
            self.dims(&v.ty.shape),
        );
        let bad = |msg: String| Err(OpError::Invalid(format!("{OP}: {msg}")));
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
        // dO has the forward output's shape: Q's layout with V's head width.
        let mut out: Vec<Dim> = q.ty.shape.clone();
        out[3] = vs[3].clone();
        if dout.ty.shape != out {
            return bad(format!(
                "dO {} must have the forward output's shape {}",
                dout.ty,
                TensorType::new(DType::F32, out)
            ));
        }
        if let Some(m) = opt(inputs, 3) {
            require_f32(OP, "Mask", m.ty)?;
            if m.ty.rank() > 4 {
                return bad(format!("Mask {} has rank > 4", m.ty));
            }
        }
        Ok(vec![
            OutputFact::new(q.ty.clone()),
            OutputFact::new(k.ty.clone()),
            OutputFact::new(v.ty.clone()),
        ])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 5, 5)?;
        let (qt, kt, vt, ot) = (
            req(inputs, 0)?,
            req(inputs, 1)?,
            req(inputs, 2)?,
            req(inputs, 4)?,
        );
        let bad = |msg: String| OpError::Invalid(format!("patch.AttentionGrad: {msg}"));
        let (qd, kd, vd, od) = (qt.shape(), kt.shape(), vt.shape(), ot.shape());
        if qd.len() != 4 || kd.len() != 4 || vd.len() != 4 || od.len() != 4 {
            return Err(bad("Q, K, V and dO must have rank 4".into()));
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
        let mut out_shape = qd.to_vec();
        out_shape[3] = dv;
        if od != out_shape.as_slice() {
            return Err(bad(format!(
                "dO {od:?} must have the forward output's shape {out_shape:?}"
            )));
        }
        let mask = opt(inputs, 3)
            .map(|m| -> Result<_, OpError> {
                let strides = broadcast_strides(m.shape(), &[b, h, s, t])
                    .map_err(|e| bad(format!("Mask: {e}")))?;
                Ok((m.as_slice::<f32>().map_err(tensor_err)?, strides))
            })
            .transpose()?;
        let (qst, kst, vst, ost) = (
            self.strides(h, s, d),
            self.strides(hk, t, d),
            self.strides(hk, t, dv),
            self.strides(h, s, dv),
        );
        let group = h / hk;
        let job = AttentionBackward {
            q: qt.as_slice::<f32>().map_err(tensor_err)?,
            k: kt.as_slice::<f32>().map_err(tensor_err)?,
            v: vt.as_slice::<f32>().map_err(tensor_err)?,
            dout: ot.as_slice::<f32>().map_err(tensor_err)?,
            strides: [qst, kst, vst, ost],
            mask,
            sizes: (s, t, d, dv),
            group,
            scale: self.scale,
            softcap: self.softcap,
        };
        // Head-major gradients per (batch, query head): dQ, and each query head's share of
        // its KV head's dK and dV (summed over the group below, so the items share nothing).
        let items = b * h;
        let mut dq_hm = vec![0f32; items * s * d];
        let mut dk_hm = vec![0f32; items * t * d];
        let mut dv_hm = vec![0f32; items * t * dv];
        {
            let (dqs, dks, dvs) = (
                split_rows(&mut dq_hm, s * d, items),
                split_rows(&mut dk_hm, t * d, items),
                split_rows(&mut dv_hm, t * dv, items),
            );
            let next = AtomicUsize::new(0);
            // Nothing to compute without query rows or keys: the gradients are zeros.
            let live = if s == 0 || t == 0 { 0 } else { items };
            let work = |_thread: usize| loop {
                let item = next.fetch_add(1, Ordering::Relaxed);
                if item >= live {
                    break;
                }
                job.run(
                    item / h,
                    item % h,
                    &mut lock(&dqs[item]),
                    &mut lock(&dks[item]),
                    &mut lock(&dvs[item]),
                );
            };
            match pool(live > 1 && live * s * t * (d + dv) >= ATTENTION_PARALLEL_WORK) {
                Some(p) => p.run_on_threads(&work),
                None => work(0),
            }
        }
        // Into the operands' layout, the query heads of a group summed into their KV head.
        let mut dq = outputs.f32(0, qt.len());
        let mut dk = outputs.f32(1, kt.len());
        let mut dvo = outputs.f32(2, vt.len());
        for (item, src) in dq_hm.chunks_exact((s * d).max(1)).enumerate() {
            let (batch, head) = (item / h, item % h);
            for (i, row) in src.chunks_exact(d).enumerate() {
                let at = batch * qst[0] + head * qst[1] + i * qst[2];
                dq[at..at + d].copy_from_slice(row);
            }
        }
        for (hm, out, w, st) in [(&dk_hm, &mut dk, d, kst), (&dv_hm, &mut dvo, dv, vst)] {
            if t * w == 0 {
                continue;
            }
            for (item, src) in hm.chunks_exact(t * w).enumerate() {
                let (batch, kv) = (item / h, (item % h) / group);
                for (j, row) in src.chunks_exact(w).enumerate() {
                    let at = batch * st[0] + kv * st[1] + j * st[2];
                    for (acc, &x) in out[at..at + w].iter_mut().zip(row) {
                        *acc += x;
                    }
                }
            }
        }
        Ok(vec![
            dq.into_tensor(qd.to_vec()).map_err(tensor_err)?,
            dk.into_tensor(kd.to_vec()).map_err(tensor_err)?,
            dvo.into_tensor(vd.to_vec()).map_err(tensor_err)?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Attr;
    use rand::{Rng, SeedableRng};

    /// Finite-difference tolerance: the worst `|central difference − gradient|` over the
    /// checked coordinates must be within this fraction of the gradient's max-abs.
    const TOL: f64 = 1e-2;

    fn values(n: usize, seed: u64, range: f32) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-range..range)).collect()
    }

    fn random(shape: &[usize], seed: u64, range: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(shape.to_vec(), values(n, seed, range)).unwrap()
    }

    fn build(op: &str, attrs: &Attrs) -> Arc<dyn Op> {
        OpRegistry::onnx()
            .build("patch", op, 1, attrs, "n")
            .unwrap()
    }

    /// `L = Σ forward(inputs) · cot`, in f64 from the forward's f32 output.
    fn loss(forward: &dyn Op, inputs: &[Option<Tensor>], cot: &[f32]) -> f64 {
        let refs: Vec<Option<&Tensor>> = inputs.iter().map(|t| t.as_ref()).collect();
        let out = forward.eval(&refs).unwrap().remove(0);
        let out = out.to_f64_vec().unwrap();
        assert_eq!(out.len(), cot.len());
        out.iter().zip(cot).map(|(&o, &c)| o * c as f64).sum()
    }

    /// The worst `|(L(x + εeᵢ) − L(x − εeᵢ)) / 2ε − grad[i]|` over up to `samples` evenly
    /// spread coordinates `i` of input `wrt`, over the gradient's max-abs (which must be
    /// nonzero).
    fn fd_error(
        forward: &dyn Op,
        inputs: &[Option<Tensor>],
        cot: &[f32],
        wrt: usize,
        grad: &[f32],
        eps: f32,
        samples: usize,
    ) -> f64 {
        let x = inputs[wrt].as_ref().unwrap();
        let base = x.as_slice::<f32>().unwrap().to_vec();
        assert_eq!(grad.len(), base.len(), "input {wrt}");
        let top = grad.iter().fold(0f64, |m, &g| m.max((g as f64).abs()));
        assert!(top > 0.0, "the gradient of input {wrt} is all zeros");
        let n = base.len();
        let picks: Vec<usize> = if n <= samples {
            (0..n).collect()
        } else {
            (0..samples).map(|k| k * n / samples).collect()
        };
        let mut worst = 0f64;
        let mut probe = inputs.to_vec();
        for i in picks {
            let at = |v: f32| {
                let mut data = base.clone();
                data[i] = v;
                Some(Tensor::from_vec(x.shape().to_vec(), data).unwrap())
            };
            let (hi, lo) = (base[i] + eps, base[i] - eps);
            probe[wrt] = at(hi);
            let lp = loss(forward, &probe, cot);
            probe[wrt] = at(lo);
            let lm = loss(forward, &probe, cot);
            let fd = (lp - lm) / (hi as f64 - lo as f64);
            worst = worst.max((fd - grad[i] as f64).abs());
        }
        worst / top
    }

    /// Checks `grad` against finite differences within [`TOL`], and that the check rejects
    /// it with its first checked coordinate moved by 5 · TOL of its max-abs (so it can fail).
    #[allow(clippy::too_many_arguments)]
    fn check(
        what: &str,
        forward: &dyn Op,
        inputs: &[Option<Tensor>],
        cot: &[f32],
        wrt: usize,
        grad: &Tensor,
        eps: f32,
        samples: usize,
    ) {
        let g = grad.as_slice::<f32>().unwrap();
        let err = fd_error(forward, inputs, cot, wrt, g, eps, samples);
        assert!(err <= TOL, "{what}: error {err:.2e} of max-abs > {TOL}");
        let top = g.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let mut wrong = g.to_vec();
        wrong[0] += 5.0 * TOL as f32 * top;
        let err = fd_error(forward, inputs, cot, wrt, &wrong, eps, samples);
        assert!(err > TOL, "{what}: a perturbed gradient passed ({err:.2e})");
    }

    fn eval(op: &dyn Op, inputs: &[Option<&Tensor>]) -> Vec<Tensor> {
        op.eval(inputs).unwrap()
    }

    #[test]
    fn grad_ops_are_registered() {
        let r = OpRegistry::onnx();
        for op in [
            "RMSNormGrad",
            "SiluGrad",
            "SwiGLUGrad",
            "GeGLUGrad",
            "SoftcapGrad",
            "RotaryGrad",
            "AttentionGrad",
        ] {
            assert!(r.contains("patch", op), "{op}");
        }
        assert!(r
            .build("patch", "AttentionGrad", 1, &Attrs::new(), "a")
            .is_err());
        assert!(r
            .build("patch", "RotaryGrad", 1, &Attrs::new(), "r")
            .is_err());
    }

    /// With and without Scale, ragged widths, row counts that are not multiples of 8 and one
    /// large enough for the pool; without Scale, dScale is the gradient a scale of ones gets.
    #[test]
    fn rms_norm_grad_matches_finite_differences() {
        for (shape, eps, with_scale) in [
            (vec![3usize, 7], 1e-5f32, true),
            (vec![2, 5, 13], 1e-2, true),
            (vec![5, 10], 1e-5, false),
            // Enough rows for the pool (parts' dScale sums added).
            (vec![300, 129], 1e-5, true),
        ] {
            let attrs = Attrs::new().with("epsilon", Attr::Float(eps));
            let forward = build("RMSNorm", &attrs);
            let grad = build("RMSNormGrad", &attrs);
            let width = shape[shape.len() - 1];
            let x = random(&shape, 1, 3.0);
            let w = random(&[width], 2, 2.0);
            let dy = random(&shape, 3, 1.0);
            let cot = dy.as_slice::<f32>().unwrap();
            let scale = with_scale.then(|| w.clone());
            let got = eval(&*grad, &[Some(&x), scale.as_ref(), Some(&dy)]);
            assert_eq!(got[0].shape(), shape.as_slice());
            assert_eq!(got[1].shape(), &[width]);
            let what = format!("RMSNorm {shape:?} scale {with_scale}");
            check(
                &what,
                &*forward,
                &[Some(x.clone()), scale],
                cot,
                0,
                &got[0],
                1e-2,
                400,
            );
            // dScale against the forward with the given scale, or with ones.
            let ones = Tensor::from_vec(vec![width], vec![1f32; width]).unwrap();
            let s = if with_scale { w } else { ones };
            check(
                &what,
                &*forward,
                &[Some(x), Some(s)],
                cot,
                1,
                &got[1],
                1e-2,
                400,
            );
        }
    }

    #[test]
    fn silu_and_swiglu_grads_match_finite_differences() {
        let (silu, silu_grad) = (
            build("Silu", &Attrs::new()),
            build("SiluGrad", &Attrs::new()),
        );
        let (swiglu, swiglu_grad) = (
            build("SwiGLU", &Attrs::new()),
            build("SwiGLUGrad", &Attrs::new()),
        );
        for shape in [vec![5usize, 37], vec![3, 7, 11]] {
            let g = random(&shape, 4, 4.0);
            let u = random(&shape, 5, 2.0);
            let dy = random(&shape, 6, 1.0);
            let cot = dy.as_slice::<f32>().unwrap();
            let got = eval(&*silu_grad, &[Some(&g), Some(&dy)]);
            check(
                "Silu",
                &*silu,
                &[Some(g.clone())],
                cot,
                0,
                &got[0],
                1e-2,
                400,
            );
            let got = eval(&*swiglu_grad, &[Some(&g), Some(&u), Some(&dy)]);
            let inputs = [Some(g.clone()), Some(u.clone())];
            check("SwiGLU dG", &*swiglu, &inputs, cot, 0, &got[0], 1e-2, 400);
            check("SwiGLU dU", &*swiglu, &inputs, cot, 1, &got[1], 1e-2, 400);
            let (geglu, geglu_grad) = (
                build("GeGLU", &Attrs::new()),
                build("GeGLUGrad", &Attrs::new()),
            );
            let got = eval(&*geglu_grad, &[Some(&g), Some(&u), Some(&dy)]);
            check("GeGLU dG", &*geglu, &inputs, cot, 0, &got[0], 1e-2, 400);
            check("GeGLU dU", &*geglu, &inputs, cot, 1, &got[1], 1e-2, 400);
            for cap in [0.7f32, 30.0] {
                let attrs = Attrs::new().with("cap", Attr::Float(cap));
                let (fwd, grad) = (build("Softcap", &attrs), build("SoftcapGrad", &attrs));
                let got = eval(&*grad, &[Some(&g), Some(&dy)]);
                let what = format!("Softcap {cap}");
                check(&what, &*fwd, &[Some(g.clone())], cot, 0, &got[0], 1e-2, 400);
            }
        }
        // Large enough for the pool: the split ranges give what one range gives.
        let g = random(&[70, 1000], 7, 4.0);
        let u = random(&[70, 1000], 8, 2.0);
        let dy = random(&[70, 1000], 9, 1.0);
        let got = eval(&*swiglu_grad, &[Some(&g), Some(&u), Some(&dy)]);
        let (gv, uv, yv) = (
            g.as_slice::<f32>().unwrap(),
            u.as_slice::<f32>().unwrap(),
            dy.as_slice::<f32>().unwrap(),
        );
        let (dg, du) = (
            got[0].as_slice::<f32>().unwrap(),
            got[1].as_slice::<f32>().unwrap(),
        );
        for i in (0..gv.len()).step_by(997) {
            let sg = sigmoid(gv[i]);
            assert_eq!(
                dg[i],
                yv[i] * uv[i] * (sg * (1.0 + gv[i] * (1.0 - sg))),
                "at {i}"
            );
            assert_eq!(du[i], yv[i] * (gv[i] * sg), "at {i}");
        }
        let other = random(&[5, 36], 10, 1.0);
        let g = random(&[5, 37], 11, 1.0);
        assert!(silu_grad.eval(&[Some(&g), Some(&other)]).is_err());
    }

    /// Head widths 6 and 10, tables broadcast over heads (rank 2 and rank 4) with unequal
    /// halves.
    #[test]
    fn rotary_grad_matches_finite_differences() {
        for (xs, ts, half) in [
            (vec![2usize, 3, 5, 6], vec![5usize, 6], 3i64),
            (vec![2, 2, 7, 10], vec![2, 1, 7, 10], 5),
        ] {
            let attrs = Attrs::new().with("half", Attr::Int(half));
            let (forward, grad) = (build("Rotary", &attrs), build("RotaryGrad", &attrs));
            let x = random(&xs, 12, 2.0);
            let cos = random(&ts, 13, 1.0);
            let sin = random(&ts, 14, 1.0);
            let dy = random(&xs, 15, 1.0);
            let got = eval(&*grad, &[Some(&dy), Some(&cos), Some(&sin)]);
            let inputs = [Some(x), Some(cos), Some(sin)];
            let cot = dy.as_slice::<f32>().unwrap();
            check("Rotary", &*forward, &inputs, cot, 0, &got[0], 1e-2, 1000);
        }
    }

    /// `[b, x, y, d]` → `[b, y, x, d]`.
    fn swap12(t: &Tensor) -> Tensor {
        let a = t.to_array::<f32>().unwrap();
        let p = a.permuted_axes(ndarray::IxDyn(&[0, 2, 1, 3]));
        Tensor::from_array(p.as_standard_layout().to_owned())
    }

    /// Grouped heads (h 6 with hk 2 and 3, h = hk), past keys (s < t), a head width that
    /// differs from V's, a causal mask, a mask with a fully `-inf` row (whose dQ must be
    /// zeros), a rank-2 mask, no mask, more than one block of 64 rows, both layouts, and one
    /// case large enough to run on the pool.
    #[test]
    fn attention_grad_matches_finite_differences() {
        // (layout, b, h, hk, s, t, d, dv, mask: 0 none, 1 causal [1,1,s,t], 2 causal with
        // row 2 hidden [b,1,s,t], 3 causal [s,t])
        let cases = [
            (
                "bhsd", 2usize, 6usize, 2usize, 5usize, 9usize, 6usize, 5usize, 1u8,
            ),
            ("bshd", 1, 6, 3, 19, 23, 8, 8, 2),
            ("bhsd", 1, 6, 3, 4, 7, 6, 6, 2),
            ("bhsd", 1, 2, 1, 70, 75, 4, 3, 3),
            ("bshd", 2, 3, 3, 4, 4, 5, 3, 0),
            // Enough work for the pool.
            ("bshd", 1, 6, 2, 70, 80, 16, 16, 2),
        ];
        // Each case plain and softcapped (a cap small enough to bend the scores).
        let cases = cases
            .into_iter()
            .flat_map(|c| [(c, None), (c, Some(0.9f32))]);
        for ((layout, b, h, hk, s, t, d, dv, mask_kind), softcap) in cases {
            let scale = 0.4f32;
            let mut attrs = Attrs::new()
                .with("scale", Attr::Float(scale))
                .with("layout", Attr::String(layout.into()));
            if let Some(cap) = softcap {
                attrs = attrs.with("softcap", Attr::Float(cap));
            }
            let (forward, grad) = (build("Attention", &attrs), build("AttentionGrad", &attrs));
            let seq = layout == "bshd";
            let shape = |heads: usize, n: usize, w: usize| {
                if seq {
                    vec![b, n, heads, w]
                } else {
                    vec![b, heads, n, w]
                }
            };
            let q = random(&shape(h, s, d), 20, 1.0);
            let k = random(&shape(hk, t, d), 21, 1.0);
            let v = random(&shape(hk, t, dv), 22, 1.0);
            let dout = random(&shape(h, s, dv), 23, 1.0);
            let causal = |i: usize, j: usize| j > i + (t - s);
            let mask = match mask_kind {
                0 => None,
                1 => Some(Tensor::from_vec(
                    vec![1, 1, s, t],
                    (0..s * t)
                        .map(|x| {
                            if causal(x / t, x % t) {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            }
                        })
                        .collect(),
                )),
                2 => Some(Tensor::from_vec(
                    vec![b, 1, s, t],
                    (0..b * s * t)
                        .map(|x| {
                            let (i, j) = ((x / t) % s, x % t);
                            if causal(i, j) || i == 2 {
                                f32::NEG_INFINITY
                            } else {
                                0.5 * ((x % 3) as f32 - 1.0)
                            }
                        })
                        .collect(),
                )),
                _ => Some(Tensor::from_vec(
                    vec![s, t],
                    (0..s * t)
                        .map(|x| {
                            if causal(x / t, x % t) {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            }
                        })
                        .collect(),
                )),
            }
            .transpose()
            .unwrap();
            let got = eval(
                &*grad,
                &[Some(&q), Some(&k), Some(&v), mask.as_ref(), Some(&dout)],
            );
            assert_eq!(got[0].shape(), q.shape());
            assert_eq!(got[1].shape(), k.shape());
            assert_eq!(got[2].shape(), v.shape());
            let inputs = [Some(q.clone()), Some(k), Some(v), mask];
            let cot = dout.as_slice::<f32>().unwrap();
            let what =
                format!("Attention {layout} b {b} h {h} hk {hk} s {s} t {t} d {d} cap {softcap:?}");
            for (wrt, name) in [(0, "dQ"), (1, "dK"), (2, "dV")] {
                let what = format!("{what} {name}");
                check(&what, &*forward, &inputs, cot, wrt, &got[wrt], 5e-3, 300);
            }
            if mask_kind == 2 {
                // Query row 2 sees no key: zero gradient, every head.
                let dq = if seq { got[0].clone() } else { swap12(&got[0]) };
                let dq = dq.as_slice::<f32>().unwrap();
                for bi in 0..b {
                    let row = &dq[(bi * s + 2) * h * d..][..h * d];
                    assert!(row.iter().all(|&x| x == 0.0), "{what}");
                }
            }
        }
    }

    /// The two layouts give the same gradients on transposed operands.
    #[test]
    fn attention_grad_layouts_agree() {
        let (b, h, hk, s, t, d) = (1usize, 6usize, 2usize, 21usize, 30usize, 8usize);
        let q = random(&[b, h, s, d], 30, 1.0);
        let k = random(&[b, hk, t, d], 31, 1.0);
        let v = random(&[b, hk, t, d], 32, 1.0);
        let dout = random(&[b, h, s, d], 33, 1.0);
        let attrs = |layout: &str| {
            Attrs::new()
                .with("scale", Attr::Float(0.3))
                .with("layout", Attr::String(layout.into()))
        };
        let head_major = eval(
            &*build("AttentionGrad", &attrs("bhsd")),
            &[Some(&q), Some(&k), Some(&v), None, Some(&dout)],
        );
        let (qs, ks, vs, os) = (swap12(&q), swap12(&k), swap12(&v), swap12(&dout));
        let seq_major = eval(
            &*build("AttentionGrad", &attrs("bshd")),
            &[Some(&qs), Some(&ks), Some(&vs), None, Some(&os)],
        );
        for (a, b) in head_major.iter().zip(&seq_major) {
            assert_eq!(
                swap12(a).as_slice::<f32>().unwrap(),
                b.as_slice::<f32>().unwrap()
            );
        }
    }

    fn fact(ty: &TensorType) -> InputFact<'_> {
        InputFact {
            ty,
            value: None,
            sym: None,
        }
    }

    fn ty(shape: &[i64]) -> TensorType {
        TensorType::new(
            DType::F32,
            shape.iter().map(|&d| Dim::constant(d)).collect(),
        )
    }

    #[test]
    fn infer_gives_the_forward_input_types_and_rejects_bad_shapes() {
        fn err(op: &dyn Op, inputs: &[Option<InputFact<'_>>], name: &str) {
            let e = op.infer(inputs).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        // RMSNormGrad: dScale is [last] with or without Scale.
        let op = build("RMSNormGrad", &Attrs::new());
        let (x, w, bad_w) = (ty(&[2, 3, 8]), ty(&[8]), ty(&[7]));
        let out = op.infer(&[Some(fact(&x)), None, Some(fact(&x))]).unwrap();
        assert_eq!((&out[0].ty, &out[1].ty), (&x, &w));
        let out = op
            .infer(&[Some(fact(&x)), Some(fact(&w)), Some(fact(&x))])
            .unwrap();
        assert_eq!((&out[0].ty, &out[1].ty), (&x, &w));
        err(
            &*op,
            &[Some(fact(&x)), Some(fact(&bad_w)), Some(fact(&x))],
            "patch.RMSNormGrad: Scale",
        );
        err(
            &*op,
            &[Some(fact(&x)), None, Some(fact(&ty(&[2, 3, 7])))],
            "patch.RMSNormGrad: dY",
        );
        // SiluGrad / SwiGLUGrad.
        let y = ty(&[2, 3, 9]);
        err(
            &*build("SiluGrad", &Attrs::new()),
            &[Some(fact(&x)), Some(fact(&y))],
            "patch.SiluGrad: dY",
        );
        let op = build("SwiGLUGrad", &Attrs::new());
        let out = op
            .infer(&[Some(fact(&x)), Some(fact(&x)), Some(fact(&x))])
            .unwrap();
        assert_eq!(out.len(), 2);
        err(
            &*op,
            &[Some(fact(&x)), Some(fact(&y)), Some(fact(&x))],
            "patch.SwiGLUGrad: U",
        );
        // RotaryGrad: last axis 2 · half, tables broadcast along the rows.
        let op = build("RotaryGrad", &Attrs::new().with("half", Attr::Int(4)));
        let (t, bad_t) = (ty(&[3, 8]), ty(&[3, 6]));
        assert_eq!(
            op.infer(&[Some(fact(&x)), Some(fact(&t)), Some(fact(&t))])
                .unwrap()[0]
                .ty,
            x
        );
        err(
            &*op,
            &[Some(fact(&x)), Some(fact(&t)), Some(fact(&bad_t))],
            "patch.RotaryGrad: Sin",
        );
        err(
            &*op,
            &[Some(fact(&y)), Some(fact(&t)), Some(fact(&t))],
            "patch.RotaryGrad: dY",
        );
        // AttentionGrad: dQ, dK, dV have Q's, K's and V's types; dO must match the output.
        let op = build(
            "AttentionGrad",
            &Attrs::new()
                .with("scale", Attr::Float(0.5))
                .with("layout", Attr::String("bshd".into())),
        );
        let (q, k, v) = (ty(&[1, 5, 6, 8]), ty(&[1, 7, 2, 8]), ty(&[1, 7, 2, 4]));
        let (dout, bad_dout) = (ty(&[1, 5, 6, 4]), ty(&[1, 5, 6, 8]));
        let out = op
            .infer(&[
                Some(fact(&q)),
                Some(fact(&k)),
                Some(fact(&v)),
                None,
                Some(fact(&dout)),
            ])
            .unwrap();
        assert_eq!(
            out.iter().map(|o| o.ty.clone()).collect::<Vec<_>>(),
            vec![q.clone(), k.clone(), v.clone()]
        );
        err(
            &*op,
            &[
                Some(fact(&q)),
                Some(fact(&k)),
                Some(fact(&v)),
                None,
                Some(fact(&bad_dout)),
            ],
            "patch.AttentionGrad: dO",
        );
        let bad_k = ty(&[1, 7, 4, 8]);
        err(
            &*op,
            &[
                Some(fact(&q)),
                Some(fact(&bad_k)),
                Some(fact(&bad_k)),
                None,
                Some(fact(&dout)),
            ],
            "patch.AttentionGrad",
        );
        // The same errors at evaluation, not panics.
        let (qt, kt, vt) = (
            random(&[1, 5, 6, 8], 40, 1.0),
            random(&[1, 7, 2, 8], 41, 1.0),
            random(&[1, 7, 2, 4], 42, 1.0),
        );
        let wrong = random(&[1, 5, 6, 8], 43, 1.0);
        let e = op
            .eval(&[Some(&qt), Some(&kt), Some(&vt), None, Some(&wrong)])
            .unwrap_err();
        assert!(e.to_string().contains("dO"), "{e}");
        let mask = random(&[1, 1, 5, 6], 44, 1.0);
        let ot = random(&[1, 5, 6, 4], 45, 1.0);
        let e = op
            .eval(&[Some(&qt), Some(&kt), Some(&vt), Some(&mask), Some(&ot)])
            .unwrap_err();
        assert!(e.to_string().contains("Mask"), "{e}");
    }

    /// `cargo test -p patch-runtime --release --lib grad::tests::attention_grad_timing --
    /// --ignored --nocapture`: median of 7 runs of the SmolLM2-135M attention shape
    /// (`[1, 512, 9, 64]` queries, 3 KV heads, causal, seq-major), forward beside it.
    #[test]
    #[ignore]
    fn attention_grad_timing() {
        let (s, h, hk, d) = (512usize, 9usize, 3usize, 64usize);
        let attrs = Attrs::new()
            .with("scale", Attr::Float(0.125))
            .with("layout", Attr::String("bshd".into()));
        let (forward, grad) = (build("Attention", &attrs), build("AttentionGrad", &attrs));
        let q = random(&[1, s, h, d], 50, 1.0);
        let k = random(&[1, s, hk, d], 51, 1.0);
        let v = random(&[1, s, hk, d], 52, 1.0);
        let dout = random(&[1, s, h, d], 53, 1.0);
        let mask = Tensor::from_vec(
            vec![1, 1, s, s],
            (0..s * s)
                .map(|x| {
                    if x % s > x / s {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect(),
        )
        .unwrap();
        let median = |f: &dyn Fn()| {
            f();
            let mut ts: Vec<f64> = (0..7)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    f();
                    t0.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            ts.sort_by(f64::total_cmp);
            ts[3]
        };
        let fwd = median(&|| {
            forward
                .eval(&[Some(&q), Some(&k), Some(&v), Some(&mask)])
                .unwrap();
        });
        let bwd = median(&|| {
            grad.eval(&[Some(&q), Some(&k), Some(&v), Some(&mask), Some(&dout)])
                .unwrap();
        });
        let threads = patch_kernels::CpuKernels::global().map_or(1, |k| k.threads());
        println!(
            "attention [1,{s},{h},{d}] / [1,{s},{hk},{d}] causal, {threads} threads: forward \
             {fwd:.2} ms, backward {bwd:.2} ms ({:.1}x)",
            bwd / fwd
        );
    }
}
