//! Shape-manipulating ops: `Shape`, `Size`, `Reshape`, `Transpose`, `Unsqueeze`, `Squeeze`,
//! `Concat`, `Slice`, `Split`, `Expand`, `Range`, `ConstantOfShape`, `Constant`, `Flatten`,
//! `Tile`.
//!
//! Inference works on symbolic shapes and propagates the symbolic content (`sym`) of small
//! integer tensors through every op that only moves elements around, so that exported
//! `Shape → Gather → Unsqueeze → Concat → Reshape` chains give shapes such as
//! `[batch, seq, 4, 16]`. Evaluation is type-agnostic where the op is: elements are moved as
//! unsigned integers of the same width (see [`by_width`]), which covers every dtype.

use std::sync::Arc;

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Slice};

use super::{arity, norm_axis, opt, req, InputFact, Op, OpError, OpRegistry, OutputFact};
use crate::dim::{shape_of, shape_to_string, volume, Dim, Shape};
use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::infer::{sym_of_const, MAX_SYM_ELEMENTS};
use crate::ir::{Attr, Attrs, TensorType};
use crate::tensor::{Element, Tensor};

pub fn register(r: &mut OpRegistry) {
    r.register("", "Shape", 13, |attrs, _| {
        Ok(Arc::new(ShapeOp {
            start: attrs.int_or("start", 0)?,
            end: attrs.int("end")?,
        }))
    });
    r.register("", "Size", 13, |_, _| Ok(Arc::new(Size)));
    r.register("", "Reshape", 13, |attrs, _| {
        Ok(Arc::new(Reshape {
            allowzero: attrs.int_or("allowzero", 0)? != 0,
        }))
    });
    r.register("", "Transpose", 13, |attrs, _| {
        Ok(Arc::new(Transpose {
            perm: attrs.ints("perm")?.map(|p| p.to_vec()),
        }))
    });
    r.register("", "Unsqueeze", 13, |attrs, _| {
        Ok(Arc::new(Unsqueeze {
            axes: attrs.ints("axes")?.map(|a| a.to_vec()),
        }))
    });
    r.register("", "Squeeze", 13, |attrs, _| {
        Ok(Arc::new(Squeeze {
            axes: attrs.ints("axes")?.map(|a| a.to_vec()),
        }))
    });
    r.register("", "Concat", 13, |attrs, _| {
        Ok(Arc::new(Concat {
            axis: attrs.req_int("axis")?,
        }))
    });
    r.register("", "Slice", 13, |_, _| Ok(Arc::new(SliceOp)));
    r.register("patch", "SliceGrad", 1, |_, _| Ok(Arc::new(SliceGrad)));
    r.register("", "Split", 13, |attrs, _| {
        let num_outputs = attrs.int("num_outputs")?;
        if let Some(n) = num_outputs {
            if n < 1 {
                return Err(OpError::BadAttr {
                    name: "num_outputs".into(),
                    msg: format!("must be at least 1, found {n}"),
                });
            }
        }
        Ok(Arc::new(Split {
            axis: attrs.int_or("axis", 0)?,
            split_attr: attrs.ints("split")?.map(|s| s.to_vec()),
            num_outputs: num_outputs.map(|n| n as usize),
        }))
    });
    r.register("", "Expand", 13, |_, _| Ok(Arc::new(Expand)));
    r.register("", "Range", 13, |_, _| Ok(Arc::new(Range)));
    r.register("", "ConstantOfShape", 13, |attrs, _| {
        let value = match attrs.tensor("value")? {
            Some(t) if t.len() == 1 => t.reshaped(Vec::new()).map_err(rt)?,
            Some(t) => {
                return Err(OpError::BadAttr {
                    name: "value".into(),
                    msg: format!("must hold exactly one element, holds {}", t.len()),
                })
            }
            None => Tensor::scalar(0f32),
        };
        Ok(Arc::new(ConstantOfShape { value }))
    });
    r.register("", "Constant", 13, |attrs, _| {
        Ok(Arc::new(Constant {
            value: constant_value(attrs)?,
        }))
    });
    r.register("", "Flatten", 13, |attrs, _| {
        Ok(Arc::new(Flatten {
            axis: attrs.int_or("axis", 1)?,
        }))
    });
    r.register("", "Tile", 13, |_, _| Ok(Arc::new(Tile)));
}

// ---------------------------------------------------------------------------------------------
// Helpers shared with `indexing`.

/// Runs `$body` with `$t` bound to the unsigned integer type as wide as an element of
/// `$dtype`. Type-agnostic ops move elements as such integers (see [`as_bits`]).
macro_rules! by_width {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype.size_of() {
            1 => {
                type $t = u8;
                $body
            }
            2 => {
                type $t = u16;
                $body
            }
            4 => {
                type $t = u32;
                $body
            }
            _ => {
                type $t = u64;
                $body
            }
        }
    };
}
pub(crate) use by_width;

/// Wraps a tensor-level error.
pub(crate) fn rt(e: RuntimeError) -> OpError {
    OpError::Invalid(e.to_string())
}

/// The same bytes viewed as unsigned integers of the element width (no copy).
pub(crate) fn as_bits(t: &Tensor) -> Result<Tensor, OpError> {
    let uint = match t.dtype().size_of() {
        1 => DType::U8,
        2 => DType::U16,
        4 => DType::U32,
        _ => DType::U64,
    };
    Tensor::from_bytes(uint, t.shape().to_vec(), t.bytes().clone()).map_err(rt)
}

/// The inverse of [`as_bits`]: the same bytes as `dtype`.
pub(crate) fn retype(t: Tensor, dtype: DType) -> Result<Tensor, OpError> {
    if t.dtype() == dtype {
        return Ok(t);
    }
    Tensor::from_bytes(dtype, t.shape().to_vec(), t.bytes().clone()).map_err(rt)
}

/// A typed view with errors as [`OpError`].
pub(crate) fn view<T: Element>(t: &Tensor) -> Result<ArrayViewD<'_, T>, OpError> {
    t.view::<T>().map_err(rt)
}

/// The symbolic content of an input: its `sym`, or that of its constant value.
pub(crate) fn sym_of(f: &InputFact<'_>) -> Option<Vec<Dim>> {
    f.sym
        .map(|s| s.to_vec())
        .or_else(|| f.value.and_then(sym_of_const))
}

/// Integer values of a compile-time constant input `i` (axes, steps, indices).
pub(crate) fn const_ints(f: &InputFact<'_>, i: usize) -> Result<Vec<i64>, OpError> {
    if let Some(t) = f.value {
        return t.to_i64_vec().map_err(|_| OpError::DType {
            index: i,
            got: t.dtype(),
            expected: "an integer type".into(),
        });
    }
    if let Some(s) = f.sym {
        if let Some(v) = s.iter().map(Dim::as_const).collect::<Option<Vec<i64>>>() {
            return Ok(v);
        }
    }
    Err(OpError::NotConstant(i))
}

/// Checks that input `i` has an integer dtype.
pub(crate) fn check_int(f: &InputFact<'_>, i: usize) -> Result<(), OpError> {
    if f.ty.dtype.is_int() {
        Ok(())
    } else {
        Err(OpError::DType {
            index: i,
            got: f.ty.dtype,
            expected: "int32 or int64".into(),
        })
    }
}

/// Integer values of a tensor given at run time (axes, shapes, indices).
pub(crate) fn ints_of(t: &Tensor, i: usize) -> Result<Vec<i64>, OpError> {
    t.to_i64_vec().map_err(|_| OpError::DType {
        index: i,
        got: t.dtype(),
        expected: "an integer type".into(),
    })
}

/// The dims of a 1-D shape-like input (`Reshape`'s target, `Expand`'s shape, ...): its
/// symbolic content or constant value.
fn shape_input(f: &InputFact<'_>, i: usize, op: &str) -> Result<Shape, OpError> {
    check_int(f, i)?;
    if f.ty.rank() != 1 {
        return Err(OpError::Shape(format!(
            "{op}: the shape input {i} must be 1-D, found {}",
            f.ty
        )));
    }
    sym_of(f).ok_or_else(|| {
        OpError::Shape(format!(
            "{op}: the shape input {i} ({}) is neither a constant nor computed from known \
             (possibly symbolic) sizes, so the output shape cannot be inferred",
            f.ty
        ))
    })
}

/// Concrete sizes of a constant shape; errors on a symbolic or negative dim.
pub(crate) fn concrete(dims: &[Dim]) -> Result<Vec<usize>, OpError> {
    dims.iter()
        .map(|d| match d.as_const() {
            Some(v) if v >= 0 => Ok(v as usize),
            _ => Err(OpError::Shape(format!(
                "expected a concrete shape, found {}",
                shape_to_string(dims)
            ))),
        })
        .collect()
}

/// `ceil(x / q)` for a constant `q > 0`, exact when `q` divides every coefficient.
pub(crate) fn ceil_div(x: &Dim, q: i64) -> Dim {
    debug_assert!(q > 0, "ceil_div by a non-positive constant");
    if q == 1 {
        return x.clone();
    }
    if let Some(c) = x.as_const() {
        return Dim::constant(c.div_euclid(q) + (c.rem_euclid(q) != 0) as i64);
    }
    x.exact_div(&Dim::constant(q))
        .unwrap_or_else(|| (x.clone() + Dim::constant(q - 1)).floor_div(q))
}

/// True when a dim is provably `<= 0`.
fn non_positive(d: &Dim) -> bool {
    (-d.clone()).is_nonnegative()
}

/// An i64 1-D tensor.
fn i64_tensor(v: Vec<i64>) -> Tensor {
    let n = v.len();
    Tensor::from_vec(vec![n], v).expect("length matches")
}

/// An output fact that carries `sym` when the output is a small int/bool tensor of rank <= 1
/// whose element count matches.
fn fact_with_sym(ty: TensorType, sym: Option<Vec<Dim>>) -> OutputFact {
    let small = ty.rank() <= 1 && (ty.dtype.is_int() || ty.dtype == DType::Bool);
    let count = volume(&ty.shape).as_const();
    match sym {
        Some(s) if small && count == Some(s.len() as i64) && s.len() <= MAX_SYM_ELEMENTS => {
            OutputFact::with_sym(ty, s)
        }
        _ => OutputFact::new(ty),
    }
}

// ---------------------------------------------------------------------------------------------
// Shape, Size

#[derive(Debug)]
struct ShapeOp {
    start: i64,
    end: Option<i64>,
}

impl ShapeOp {
    /// The `[start, end)` range of dims, clamped as ONNX specifies.
    fn range(&self, rank: usize) -> (usize, usize) {
        let r = rank as i64;
        let clamp = |v: i64| {
            let v = if v < 0 { v.saturating_add(r) } else { v };
            v.clamp(0, r) as usize
        };
        let s = clamp(self.start);
        let e = self.end.map_or(rank, clamp);
        (s, e.max(s))
    }
}

impl Op for ShapeOp {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        let (s, e) = self.range(x.ty.rank());
        let dims = x.ty.shape[s..e].to_vec();
        let ty = TensorType::new(DType::I64, vec![Dim::from(dims.len())]);
        Ok(vec![OutputFact::with_sym(ty, dims)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        let (s, e) = self.range(x.rank());
        Ok(vec![i64_tensor(
            x.shape()[s..e].iter().map(|&d| d as i64).collect(),
        )])
    }
}

#[derive(Debug)]
struct Size;

impl Op for Size {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        let ty = TensorType::new(DType::I64, Vec::new());
        Ok(vec![OutputFact::with_sym(ty, vec![volume(&x.ty.shape)])])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 1)?;
        Ok(vec![Tensor::scalar(req(inputs, 0)?.len() as i64)])
    }
}

// ---------------------------------------------------------------------------------------------
// Reshape, Flatten

#[derive(Debug)]
struct Reshape {
    allowzero: bool,
}

/// The output shape of `Reshape(input, target)` (ONNX rules for 0 and -1).
fn reshape_dims(input: &[Dim], target: &[Dim], allowzero: bool) -> Result<Shape, OpError> {
    let fail = |msg: String| {
        OpError::Shape(format!(
            "cannot reshape {} into {}: {msg}",
            shape_to_string(input),
            shape_to_string(target)
        ))
    };
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, d) in target.iter().enumerate() {
        match d.as_const() {
            Some(0) if !allowzero => {
                let copied = input
                    .get(i)
                    .ok_or_else(|| fail(format!("0 at index {i} has no input dim to copy")))?;
                out.push(copied.clone());
            }
            Some(-1) => {
                if infer_at.is_some() {
                    return Err(fail("more than one -1".into()));
                }
                if allowzero && target.iter().any(|t| t.as_const() == Some(0)) {
                    return Err(fail("-1 together with 0 under allowzero".into()));
                }
                infer_at = Some(i);
                out.push(Dim::constant(1));
            }
            Some(v) if v < 0 => return Err(fail(format!("invalid size {v} at index {i}"))),
            // A symbolic size (such as `seq - 1`) is taken as the model computed it.
            _ => out.push(d.clone()),
        }
    }
    let vin = volume(input);
    let vout = volume(&out);
    if let Some(i) = infer_at {
        let inferred = match (vin.as_const(), vout.as_const()) {
            (Some(a), Some(b)) => {
                if b == 0 || a % b != 0 {
                    return Err(fail(format!(
                        "{a} elements are not divisible by the {b} of the other dims"
                    )));
                }
                Dim::constant(a / b)
            }
            _ => vin.exact_div(&vout).ok_or_else(|| {
                fail(format!(
                    "the -1 size is not expressible: volume {vin} is not a multiple of {vout}"
                ))
            })?,
        };
        out[i] = inferred;
    } else if let (Some(a), Some(b)) = (vin.as_const(), vout.as_const()) {
        if a != b {
            return Err(fail(format!("{a} elements cannot become {b}")));
        }
    }
    Ok(out)
}

/// [`reshape_dims`] on concrete sizes, without allocating symbolic dims (Reshape runs a
/// hundred times per decoded token); `None` when the reshape is invalid.
fn reshape_concrete(input: &[usize], target: &[i64], allowzero: bool) -> Option<Vec<usize>> {
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            0 if !allowzero => out.push(*input.get(i)?),
            -1 if infer_at.is_none() && !(allowzero && target.contains(&0)) => {
                infer_at = Some(i);
                out.push(1);
            }
            d if d >= 0 => out.push(usize::try_from(d).ok()?),
            _ => return None,
        }
    }
    let vin: usize = input.iter().product();
    let vout: usize = out.iter().product();
    match infer_at {
        Some(i) if vout != 0 && vin.is_multiple_of(vout) => out[i] = vin / vout,
        None if vin == vout => {}
        _ => return None,
    }
    Some(out)
}

impl Op for Reshape {
    fn view_of(&self) -> Option<usize> {
        Some(0)
    }

    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        let x = req(inputs, 0)?;
        let target = shape_input(&req(inputs, 1)?, 1, "Reshape")?;
        let shape = reshape_dims(&x.ty.shape, &target, self.allowzero)?;
        let ty = TensorType::new(x.ty.dtype, shape);
        Ok(vec![fact_with_sym(ty, sym_of(&x))])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let x = req(inputs, 0)?;
        let target = ints_of(req(inputs, 1)?, 1)?;
        let shape = match reshape_concrete(x.shape(), &target, self.allowzero) {
            Some(shape) => shape,
            // Not a valid reshape: the symbolic rules say why.
            None => {
                let target: Shape = target.into_iter().map(Dim::constant).collect();
                concrete(&reshape_dims(
                    &shape_of(x.shape()),
                    &target,
                    self.allowzero,
                )?)?
            }
        };
        Ok(vec![x.reshaped(shape).map_err(rt)?])
    }
}

#[derive(Debug)]
struct Flatten {
    axis: i64,
}

impl Flatten {
    fn split(&self, rank: usize) -> Result<usize, OpError> {
        let r = rank as i64;
        let a = if self.axis < 0 {
            self.axis + r
        } else {
            self.axis
        };
        if !(0..=r).contains(&a) {
            return Err(OpError::Invalid(format!(
                "Flatten axis {} is out of range for rank {rank}",
                self.axis
            )));
        }
        Ok(a as usize)
    }
}

impl Op for Flatten {
    fn view_of(&self) -> Option<usize> {
        Some(0)
    }

    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        let a = self.split(x.ty.rank())?;
        let shape = vec![volume(&x.ty.shape[..a]), volume(&x.ty.shape[a..])];
        Ok(vec![OutputFact::new(TensorType::new(x.ty.dtype, shape))])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        let a = self.split(x.rank())?;
        let shape = vec![
            x.shape()[..a].iter().product(),
            x.shape()[a..].iter().product(),
        ];
        Ok(vec![x.reshaped(shape).map_err(rt)?])
    }
}

// ---------------------------------------------------------------------------------------------
// Transpose

#[derive(Debug)]
struct Transpose {
    perm: Option<Vec<i64>>,
}

impl Transpose {
    fn perm(&self, rank: usize) -> Result<Vec<usize>, OpError> {
        let Some(p) = &self.perm else {
            return Ok((0..rank).rev().collect());
        };
        if p.len() != rank {
            return Err(OpError::BadAttr {
                name: "perm".into(),
                msg: format!("{p:?} has {} entries for an input of rank {rank}", p.len()),
            });
        }
        let perm = p
            .iter()
            .map(|&a| norm_axis(a, rank))
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = vec![false; rank];
        for &a in &perm {
            if std::mem::replace(&mut seen[a], true) {
                return Err(OpError::BadAttr {
                    name: "perm".into(),
                    msg: format!("{p:?} is not a permutation"),
                });
            }
        }
        Ok(perm)
    }
}

/// Copies the view of `src` with shape `out_shape` and element strides `strides` (0 for a
/// broadcast axis) into a new row-major vector. Axes of extent 1 are dropped and adjacent axes
/// that are contiguous in the source merged, so the innermost loop copies the longest run
/// possible; when the two innermost axes are swapped (a transpose of the last two), it copies
/// in 16x16 tiles so that both sides stay in cache.
pub(crate) fn strided_copy<T: Copy>(src: &[T], out_shape: &[usize], strides: &[usize]) -> Vec<T> {
    let total: usize = out_shape.iter().product();
    if total == 0 {
        return Vec::new();
    }
    // (extent, stride) from the innermost axis outwards, merged.
    let mut axes: Vec<(usize, usize)> = Vec::new();
    for (&n, &st) in out_shape.iter().zip(strides).rev() {
        if n == 1 {
            continue;
        }
        match axes.last_mut() {
            Some(inner) if st == inner.0 * inner.1 && inner.1 != 0 || st == 0 && inner.1 == 0 => {
                inner.0 *= n;
            }
            _ => axes.push((n, st)),
        }
    }
    if axes.is_empty() {
        return vec![src[0]; total];
    }
    axes.reverse();
    let rank = axes.len();
    let (inner, inner_stride) = axes[rank - 1];
    let mut out = vec![src[0]; total];
    let tiled = inner_stride > 1 && rank >= 2 && axes[rank - 2].1 == 1;
    let block = if tiled {
        inner * axes[rank - 2].0
    } else {
        inner
    };
    let outer_axes = if tiled { rank - 2 } else { rank - 1 };
    let mut index = vec![0usize; outer_axes];
    let mut base = 0usize;
    for chunk in out.chunks_exact_mut(block) {
        if tiled {
            let rows = axes[rank - 2].0;
            const T16: usize = 16;
            for i0 in (0..rows).step_by(T16) {
                for j0 in (0..inner).step_by(T16) {
                    for i in i0..(i0 + T16).min(rows) {
                        for j in j0..(j0 + T16).min(inner) {
                            chunk[i * inner + j] = src[base + i + j * inner_stride];
                        }
                    }
                }
            }
        } else if inner_stride == 1 {
            chunk.copy_from_slice(&src[base..base + inner]);
        } else if inner_stride == 0 {
            chunk.fill(src[base]);
        } else {
            for (i, d) in chunk.iter_mut().enumerate() {
                *d = src[base + i * inner_stride];
            }
        }
        for a in (0..outer_axes).rev() {
            index[a] += 1;
            base += axes[a].1;
            if index[a] < axes[a].0 {
                break;
            }
            base -= axes[a].1 * axes[a].0;
            index[a] = 0;
        }
    }
    out
}

fn transpose_t<T: Element>(x: &Tensor, perm: &[usize]) -> Result<Tensor, OpError> {
    let src = x.as_slice::<T>().map_err(rt)?;
    let shape = x.shape();
    let mut in_strides = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        in_strides[a] = in_strides[a + 1] * shape[a + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
    let strides: Vec<usize> = perm.iter().map(|&a| in_strides[a]).collect();
    Tensor::from_vec(out_shape.clone(), strided_copy(src, &out_shape, &strides)).map_err(rt)
}

impl Op for Transpose {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        let perm = self.perm(x.ty.rank())?;
        let shape = perm.iter().map(|&a| x.ty.shape[a].clone()).collect();
        let ty = TensorType::new(x.ty.dtype, shape);
        Ok(vec![fact_with_sym(ty, sym_of(&x))])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        let perm = self.perm(x.rank())?;
        let bits = as_bits(x)?;
        let out = by_width!(x.dtype(), T => transpose_t::<T>(&bits, &perm))?;
        Ok(vec![retype(out, x.dtype())?])
    }
}

// ---------------------------------------------------------------------------------------------
// Unsqueeze, Squeeze

/// Axes from the attribute (older opsets) or from input 1.
fn axes_of(
    attr: &Option<Vec<i64>>,
    inputs: &[Option<InputFact<'_>>],
) -> Result<Option<Vec<i64>>, OpError> {
    if let Some(a) = attr {
        return Ok(Some(a.clone()));
    }
    match opt(inputs, 1) {
        Some(f) => {
            check_int(&f, 1)?;
            Ok(Some(const_ints(&f, 1)?))
        }
        None => Ok(None),
    }
}

fn axes_of_tensors(
    attr: &Option<Vec<i64>>,
    inputs: &[Option<&Tensor>],
) -> Result<Option<Vec<i64>>, OpError> {
    if let Some(a) = attr {
        return Ok(Some(a.clone()));
    }
    opt(inputs, 1).map(|t| ints_of(t, 1)).transpose()
}

/// Normalized, sorted, distinct axes.
fn norm_axes(axes: &[i64], rank: usize) -> Result<Vec<usize>, OpError> {
    let mut out = axes
        .iter()
        .map(|&a| norm_axis(a, rank))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_unstable();
    if out.windows(2).any(|w| w[0] == w[1]) {
        return Err(OpError::Invalid(format!("axes {axes:?} repeat an axis")));
    }
    Ok(out)
}

fn unsqueeze_dims(shape: &[Dim], axes: &[i64]) -> Result<Shape, OpError> {
    let rank = shape.len() + axes.len();
    let axes = norm_axes(axes, rank)?;
    let mut rest = shape.iter();
    Ok((0..rank)
        .map(|i| {
            if axes.binary_search(&i).is_ok() {
                Dim::constant(1)
            } else {
                rest.next().expect("rank counts the input dims").clone()
            }
        })
        .collect())
}

/// [`unsqueeze_dims`] on concrete sizes (without building symbolic dims, as every decode step
/// runs it); `None` when the axes are invalid.
fn unsqueeze_sizes(shape: &[usize], axes: &[i64]) -> Option<Vec<usize>> {
    let rank = shape.len() + axes.len();
    let axes = norm_axes(axes, rank).ok()?;
    let mut rest = shape.iter();
    (0..rank)
        .map(|i| match axes.binary_search(&i) {
            Ok(_) => Some(1),
            Err(_) => rest.next().copied(),
        })
        .collect()
}

/// [`squeeze_dims`] on concrete sizes; `None` when an axis is invalid or not of size 1.
fn squeeze_sizes(shape: &[usize], axes: Option<&[i64]>) -> Option<Vec<usize>> {
    let Some(axes) = axes else {
        return Some(shape.iter().copied().filter(|&d| d != 1).collect());
    };
    let axes = norm_axes(axes, shape.len()).ok()?;
    if axes.iter().any(|&a| shape[a] != 1) {
        return None;
    }
    Some(
        shape
            .iter()
            .enumerate()
            .filter(|(i, _)| axes.binary_search(i).is_err())
            .map(|(_, &d)| d)
            .collect(),
    )
}

#[derive(Debug)]
struct Unsqueeze {
    axes: Option<Vec<i64>>,
}

impl Op for Unsqueeze {
    fn view_of(&self) -> Option<usize> {
        Some(0)
    }

    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 2)?;
        let x = req(inputs, 0)?;
        let axes = axes_of(&self.axes, inputs)?.ok_or(OpError::MissingInput(1))?;
        let ty = TensorType::new(x.ty.dtype, unsqueeze_dims(&x.ty.shape, &axes)?);
        Ok(vec![fact_with_sym(ty, sym_of(&x))])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 2)?;
        let x = req(inputs, 0)?;
        let axes = axes_of_tensors(&self.axes, inputs)?.ok_or(OpError::MissingInput(1))?;
        let shape = match unsqueeze_sizes(x.shape(), &axes) {
            Some(shape) => shape,
            // Not a valid unsqueeze: the symbolic rule says why.
            None => concrete(&unsqueeze_dims(&shape_of(x.shape()), &axes)?)?,
        };
        Ok(vec![x.reshaped(shape).map_err(rt)?])
    }
}

fn squeeze_dims(shape: &[Dim], axes: Option<&[i64]>) -> Result<Shape, OpError> {
    let one = Dim::constant(1);
    let Some(axes) = axes else {
        return Ok(shape.iter().filter(|d| **d != one).cloned().collect());
    };
    let axes = norm_axes(axes, shape.len())?;
    for &a in &axes {
        if shape[a] != one {
            return Err(OpError::Shape(format!(
                "cannot squeeze axis {a} of {}: its size is {}, not 1",
                shape_to_string(shape),
                shape[a]
            )));
        }
    }
    Ok(shape
        .iter()
        .enumerate()
        .filter(|(i, _)| axes.binary_search(i).is_err())
        .map(|(_, d)| d.clone())
        .collect())
}

#[derive(Debug)]
struct Squeeze {
    axes: Option<Vec<i64>>,
}

impl Op for Squeeze {
    fn view_of(&self) -> Option<usize> {
        Some(0)
    }

    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 2)?;
        let x = req(inputs, 0)?;
        let axes = axes_of(&self.axes, inputs)?;
        let ty = TensorType::new(x.ty.dtype, squeeze_dims(&x.ty.shape, axes.as_deref())?);
        Ok(vec![fact_with_sym(ty, sym_of(&x))])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 2)?;
        let x = req(inputs, 0)?;
        let axes = axes_of_tensors(&self.axes, inputs)?;
        let shape = match squeeze_sizes(x.shape(), axes.as_deref()) {
            Some(shape) => shape,
            // Not a valid squeeze: the symbolic rule says why.
            None => concrete(&squeeze_dims(&shape_of(x.shape()), axes.as_deref())?)?,
        };
        Ok(vec![x.reshaped(shape).map_err(rt)?])
    }
}

// ---------------------------------------------------------------------------------------------
// Concat

#[derive(Debug)]
pub(crate) struct Concat {
    pub(crate) axis: i64,
}

/// Row-major concatenation: for each index of the axes before `axis`, every part's
/// contiguous block in turn.
fn concat_t<T: Element>(parts: &[Tensor], axis: usize) -> Result<Tensor, OpError> {
    let first = parts.first().ok_or_else(|| OpError::Arity {
        expected: "at least 1".into(),
        got: 0,
    })?;
    let rank = first.rank();
    let mut out_shape = first.shape().to_vec();
    out_shape[axis] = 0;
    for (i, p) in parts.iter().enumerate() {
        let same_rest =
            p.rank() == rank && (0..rank).all(|a| a == axis || p.shape()[a] == first.shape()[a]);
        if !same_rest {
            return Err(OpError::Shape(format!(
                "Concat on axis {axis}: input {i} has shape {:?} but input 0 has {:?}",
                p.shape(),
                first.shape()
            )));
        }
        out_shape[axis] += p.shape()[axis];
    }
    let outer: usize = out_shape[..axis].iter().product();
    let slices = parts
        .iter()
        .map(|p| p.as_slice::<T>().map_err(rt))
        .collect::<Result<Vec<_>, _>>()?;
    let blocks: Vec<usize> = parts
        .iter()
        .map(|p| p.shape()[axis..].iter().product())
        .collect();
    let mut out = Vec::with_capacity(out_shape.iter().product());
    for o in 0..outer {
        for (s, &b) in slices.iter().zip(&blocks) {
            out.extend_from_slice(&s[o * b..(o + 1) * b]);
        }
    }
    Tensor::from_vec(out_shape, out).map_err(rt)
}

impl Op for Concat {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, usize::MAX)?;
        let first = req(inputs, 0)?;
        let rank = first.ty.rank();
        let axis = norm_axis(self.axis, rank)?;
        let mut shape = first.ty.shape.clone();
        let mut sym = sym_of(&first);
        for i in 1..inputs.len() {
            let f = req(inputs, i)?;
            if f.ty.dtype != first.ty.dtype {
                return Err(OpError::DType {
                    index: i,
                    got: f.ty.dtype,
                    expected: first.ty.dtype.to_string(),
                });
            }
            if f.ty.rank() != rank {
                return Err(OpError::Shape(format!(
                    "Concat: input {i} is {} but input 0 is {}",
                    f.ty, first.ty
                )));
            }
            for (j, (a, b)) in shape.iter_mut().zip(&f.ty.shape).enumerate() {
                if j == axis {
                    *a = a.clone() + b.clone();
                } else if let (Some(x), Some(y)) = (a.as_const(), b.as_const()) {
                    if x != y {
                        return Err(OpError::Shape(format!(
                            "Concat on axis {axis}: input {i} is {} but input 0 is {}",
                            f.ty, first.ty
                        )));
                    }
                } else if !a.is_const() && b.is_const() {
                    *a = b.clone();
                }
            }
            sym = match (sym, sym_of(&f)) {
                (Some(mut s), Some(t)) => {
                    s.extend(t);
                    Some(s)
                }
                _ => None,
            };
        }
        let ty = TensorType::new(first.ty.dtype, shape);
        Ok(vec![fact_with_sym(ty, sym)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, usize::MAX)?;
        let first = req(inputs, 0)?;
        let axis = norm_axis(self.axis, first.rank())?;
        let dtype = first.dtype();
        let mut parts = Vec::with_capacity(inputs.len());
        for i in 0..inputs.len() {
            let t = req(inputs, i)?;
            if t.dtype() != dtype {
                return Err(OpError::DType {
                    index: i,
                    got: t.dtype(),
                    expected: dtype.to_string(),
                });
            }
            parts.push(as_bits(t)?);
        }
        let out = by_width!(dtype, T => concat_t::<T>(&parts, axis))?;
        Ok(vec![retype(out, dtype)?])
    }
}

// ---------------------------------------------------------------------------------------------
// Slice

/// Indices at or beyond this magnitude mean "to the end" / "from the beginning" (exporters
/// write `INT64_MAX` and `INT64_MIN`).
const HUGE: i64 = i64::MAX / 2;

/// One axis of a concrete slice: first index and element count (ONNX clamping rules).
fn slice_concrete(d: i64, s: i64, e: i64, k: i64) -> (i64, i64) {
    let (d, s, e, k) = (d as i128, s as i128, e as i128, k as i128);
    let s = if s < 0 { s + d } else { s };
    let e = if e < 0 { e + d } else { e };
    let (start, len) = if k > 0 {
        let (s, e) = (s.clamp(0, d), e.clamp(0, d));
        (s, if e > s { (e - s - 1) / k + 1 } else { 0 })
    } else if d == 0 {
        (0, 0)
    } else {
        let (s, e) = (s.clamp(0, d - 1), e.clamp(-1, d - 1));
        (s, if s > e { (s - e - 1) / -k + 1 } else { 0 })
    };
    (start as i64, len as i64)
}

/// A possibly negative index resolved against `d`.
fn resolve_index(idx: &Dim, d: &Dim, what: &str) -> Result<Dim, OpError> {
    if let Some(c) = idx.as_const() {
        return Ok(if c < 0 {
            d.clone() + idx.clone()
        } else {
            idx.clone()
        });
    }
    match asymptotic_sign(idx) {
        Some(true) => Ok(idx.clone()),
        Some(false) => Ok(d.clone() + idx.clone()),
        None => Err(OpError::Shape(format!(
            "Slice: the sign of the {what} {idx} on an axis of size {d} is unknown, so the \
             slice length is not expressible"
        ))),
    }
}

/// Whether a symbolic index counts from the front (`Some(true)`) or from the back
/// (`Some(false)`): provably when every coefficient has one sign, otherwise by its sign when
/// every symbol is large (`seq - 1` is a position from the front, `1 - seq` from the back).
/// `None` when even that does not decide (`seq - past`).
fn asymptotic_sign(idx: &Dim) -> Option<bool> {
    if idx.is_nonnegative() {
        return Some(true);
    }
    if non_positive(idx) {
        return Some(false);
    }
    let large: crate::dim::Bindings = idx.symbols().into_iter().map(|s| (s, 1 << 20)).collect();
    match idx.eval(&large).ok()? {
        v if v > 0 => Some(true),
        v if v < 0 => Some(false),
        _ => None,
    }
}

/// `min(x, hi)` when decidable, else `x` (a symbolic index is assumed to be in range).
fn clamp_hi(x: Dim, hi: &Dim) -> Dim {
    x.try_min(hi).unwrap_or(x)
}

/// One axis of a slice on a possibly symbolic axis with possibly symbolic start and end:
/// `(first index, length)`.
fn slice_axis_dims(d: &Dim, s: &Dim, e: &Dim, k: i64) -> Result<(Dim, Dim), OpError> {
    if k == 0 {
        return Err(OpError::Invalid("Slice: a step is 0".into()));
    }
    if let (Some(dc), Some(sc), Some(ec)) = (d.as_const(), s.as_const(), e.as_const()) {
        let (a, n) = slice_concrete(dc, sc, ec, k);
        return Ok((Dim::constant(a), Dim::constant(n)));
    }
    let zero = Dim::constant(0);
    let huge = |x: &Dim| x.as_const().is_some_and(|c| c >= HUGE);
    let tiny = |x: &Dim| x.as_const().is_some_and(|c| c <= -HUGE);
    let floor0 = |x: Dim| if non_positive(&x) { zero.clone() } else { x };
    let (start, len) = if k > 0 {
        let start = if huge(s) {
            d.clone()
        } else if tiny(s) {
            zero.clone()
        } else {
            floor0(clamp_hi(resolve_index(s, d, "start")?, d))
        };
        let end = if huge(e) {
            d.clone()
        } else if tiny(e) {
            zero.clone()
        } else {
            floor0(clamp_hi(resolve_index(e, d, "end")?, d))
        };
        (start.clone(), ceil_div(&(end - start), k))
    } else {
        let last = d.clone() - Dim::constant(1);
        let before = Dim::constant(-1);
        let start = if huge(s) {
            last.clone()
        } else if tiny(s) {
            before.clone()
        } else {
            clamp_hi(resolve_index(s, d, "start")?, &last)
        };
        let end = if huge(e) {
            last.clone()
        } else if tiny(e) {
            before
        } else {
            clamp_hi(resolve_index(e, d, "end")?, &last)
        };
        (start.clone(), ceil_div(&(start - end), -k))
    };
    Ok((start, floor0(len)))
}

/// Per-axis `(start, end, step)` from the inputs, already expanded to every axis of the
/// data (axes not mentioned slice everything).
struct SliceSpec {
    /// `(axis, start, end, step)` for the mentioned axes.
    axes: Vec<(usize, Dim, Dim, i64)>,
}

fn slice_spec(
    rank: usize,
    starts: Vec<Dim>,
    ends: Vec<Dim>,
    axes: Option<Vec<i64>>,
    steps: Option<Vec<i64>>,
) -> Result<SliceSpec, OpError> {
    let n = starts.len();
    if ends.len() != n {
        return Err(OpError::Shape(format!(
            "Slice: {n} starts but {} ends",
            ends.len()
        )));
    }
    let axes = match axes {
        Some(a) => a,
        None => (0..n as i64).collect(),
    };
    let steps = steps.unwrap_or_else(|| vec![1; n]);
    if axes.len() != n || steps.len() != n {
        return Err(OpError::Shape(format!(
            "Slice: {n} starts and ends but {} axes and {} steps",
            axes.len(),
            steps.len()
        )));
    }
    let mut seen = vec![false; rank];
    let mut out = Vec::with_capacity(n);
    for (i, (s, e)) in starts.into_iter().zip(ends).enumerate() {
        let a = norm_axis(axes[i], rank)?;
        if std::mem::replace(&mut seen[a], true) {
            return Err(OpError::Invalid(format!(
                "Slice: axis {} appears twice in {axes:?}",
                axes[i]
            )));
        }
        if steps[i] == 0 {
            return Err(OpError::Invalid(format!("Slice: step {i} is 0")));
        }
        out.push((a, s, e, steps[i]));
    }
    Ok(SliceSpec { axes: out })
}

fn to_nd_slice(start: i64, len: i64, step: i64) -> Slice {
    if len <= 0 {
        return Slice::new(0, Some(0), 1);
    }
    if step > 0 {
        Slice::new(
            start as isize,
            Some((start + (len - 1) * step + 1) as isize),
            step as isize,
        )
    } else {
        let last = start + (len - 1) * step;
        Slice::new(last as isize, Some(start as isize + 1), step as isize)
    }
}

fn slice_t<T: Element>(x: &Tensor, per_axis: &[(i64, i64, i64)]) -> Result<Tensor, OpError> {
    let v = view::<T>(x)?;
    let s = v.slice_each_axis(|ax| {
        let (start, len, step) = per_axis[ax.axis.index()];
        to_nd_slice(start, len, step)
    });
    Ok(Tensor::from_array(s.to_owned()))
}

#[derive(Debug)]
struct SliceOp;

impl Op for SliceOp {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 3, 5)?;
        let x = req(inputs, 0)?;
        let index_dims = |i: usize| -> Result<Vec<Dim>, OpError> {
            let f = req(inputs, i)?;
            check_int(&f, i)?;
            sym_of(&f).ok_or(OpError::NotConstant(i))
        };
        let starts = index_dims(1)?;
        let ends = index_dims(2)?;
        let const_opt = |i: usize| -> Result<Option<Vec<i64>>, OpError> {
            opt(inputs, i)
                .map(|f| {
                    check_int(&f, i)?;
                    const_ints(&f, i)
                })
                .transpose()
        };
        let spec = slice_spec(x.ty.rank(), starts, ends, const_opt(3)?, const_opt(4)?)?;
        let mut shape = x.ty.shape.clone();
        let mut firsts: Vec<Option<(i64, i64, i64)>> = vec![None; shape.len()];
        for (a, s, e, k) in &spec.axes {
            let (first, len) = slice_axis_dims(&x.ty.shape[*a], s, e, *k)?;
            if let (Some(f), Some(n)) = (first.as_const(), len.as_const()) {
                firsts[*a] = Some((f, n, *k));
            }
            shape[*a] = len;
        }
        let ty = TensorType::new(x.ty.dtype, shape);
        // Symbolic content of a sliced 1-D value, when the slice is concrete.
        let sym = match (sym_of(&x), x.ty.rank()) {
            (Some(s), 1) => match &spec.axes[..] {
                [] => Some(s),
                [_] => firsts[0].map(|(f, n, k)| {
                    (0..n)
                        .filter_map(|j| s.get((f + j * k) as usize).cloned())
                        .collect()
                }),
                _ => None,
            },
            (s, 0) => s,
            _ => None,
        };
        Ok(vec![fact_with_sym(ty, sym)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 3, 5)?;
        let x = req(inputs, 0)?;
        let dims = |i: usize| -> Result<Vec<Dim>, OpError> {
            Ok(ints_of(req(inputs, i)?, i)?
                .into_iter()
                .map(Dim::constant)
                .collect())
        };
        let ints_opt = |i: usize| opt(inputs, i).map(|t| ints_of(t, i)).transpose();
        let spec = slice_spec(x.rank(), dims(1)?, dims(2)?, ints_opt(3)?, ints_opt(4)?)?;
        let mut per_axis: Vec<(i64, i64, i64)> =
            x.shape().iter().map(|&d| (0, d as i64, 1)).collect();
        for (a, s, e, k) in &spec.axes {
            let (s, e) = (
                s.as_const().expect("concrete start"),
                e.as_const().expect("concrete end"),
            );
            let (first, len) = slice_concrete(x.shape()[*a] as i64, s, e, *k);
            per_axis[*a] = (first, len, *k);
        }
        let bits = as_bits(x)?;
        let out = by_width!(x.dtype(), T => slice_t::<T>(&bits, &per_axis))?;
        Ok(vec![retype(out, x.dtype())?])
    }
}

/// `patch.SliceGrad(X, dY, starts, ends, axes?, steps?) → dX`: the gradient of `Slice`
/// (f32): zeros of X's shape with dY written where the slice read (the index operands as
/// `Slice` takes them; X is read for its shape only).
#[derive(Debug)]
struct SliceGrad;

impl SliceGrad {
    fn operands<'a>(
        inputs: &'a [Option<&'a Tensor>],
    ) -> Result<(&'a Tensor, &'a Tensor, [Option<&'a Tensor>; 4]), OpError> {
        arity(inputs, 4, 6)?;
        let (x, dy) = (req(inputs, 0)?, req(inputs, 1)?);
        Ok((
            x,
            dy,
            [inputs[2], inputs[3], opt(inputs, 4), opt(inputs, 5)],
        ))
    }
}

impl Op for SliceGrad {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 4, 6)?;
        let (x, dy) = (req(inputs, 0)?, req(inputs, 1)?);
        if x.ty.dtype != DType::F32 || dy.ty.dtype != DType::F32 {
            return Err(OpError::Invalid(format!(
                "patch.SliceGrad: X {} and dY {} must be f32",
                x.ty, dy.ty
            )));
        }
        // dY has the shape the forward Slice gave.
        let mut forward = vec![Some(InputFact {
            ty: x.ty,
            value: None,
            sym: None,
        })];
        forward.extend(inputs[2..].iter().cloned());
        let sliced = SliceOp.infer(&forward)?;
        if sliced[0].ty.shape != dy.ty.shape {
            return Err(OpError::Invalid(format!(
                "patch.SliceGrad: dY {} is not the slice's shape {}",
                dy.ty, sliced[0].ty
            )));
        }
        Ok(vec![OutputFact::new(x.ty.clone())])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        let (x, dy, [starts, ends, axes, steps]) = SliceGrad::operands(inputs)?;
        let ints = |t: Option<&Tensor>, i: usize| t.map(|t| ints_of(t, i)).transpose();
        let dims = |t: Option<&Tensor>, i: usize| -> Result<Vec<Dim>, OpError> {
            Ok(ints(t, i)?
                .ok_or(OpError::MissingInput(i))?
                .into_iter()
                .map(Dim::constant)
                .collect())
        };
        let spec = slice_spec(
            x.rank(),
            dims(starts, 2)?,
            dims(ends, 3)?,
            ints(axes, 4)?,
            ints(steps, 5)?,
        )?;
        let mut per_axis: Vec<(i64, i64, i64)> =
            x.shape().iter().map(|&d| (0, d as i64, 1)).collect();
        for (a, s, e, k) in &spec.axes {
            let (s, e) = (
                s.as_const().expect("concrete start"),
                e.as_const().expect("concrete end"),
            );
            per_axis[*a] = {
                let (first, len) = slice_concrete(x.shape()[*a] as i64, s, e, *k);
                (first, len, *k)
            };
        }
        let mut dx = ArrayD::<f32>::zeros(x.shape());
        let src = view::<f32>(dy)?;
        let mut region = dx.slice_each_axis_mut(|ax| {
            let (start, len, step) = per_axis[ax.axis.index()];
            to_nd_slice(start, len, step)
        });
        if region.shape() != src.shape() {
            return Err(OpError::Invalid(format!(
                "patch.SliceGrad: dY {:?} is not the slice's shape {:?}",
                src.shape(),
                region.shape()
            )));
        }
        region.assign(&src);
        Ok(vec![Tensor::from_array(dx)])
    }
}

// ---------------------------------------------------------------------------------------------
// Split

#[derive(Debug)]
struct Split {
    axis: i64,
    split_attr: Option<Vec<i64>>,
    num_outputs: Option<usize>,
}

impl Split {
    /// Sizes of the parts along an axis of size `d`, given explicit sizes if any.
    fn sizes(&self, d: &Dim, split: Option<Vec<Dim>>) -> Result<Vec<Dim>, OpError> {
        if let Some(s) = split.or_else(|| {
            self.split_attr
                .as_ref()
                .map(|v| v.iter().copied().map(Dim::constant).collect())
        }) {
            if let Some(n) = self.num_outputs {
                if n != s.len() {
                    return Err(OpError::Invalid(format!(
                        "Split: {} sizes given but num_outputs is {n}",
                        s.len()
                    )));
                }
            }
            if s.iter().any(|x| x.as_const().is_some_and(|c| c < 0)) {
                return Err(OpError::Shape(format!(
                    "Split: negative size in {}",
                    shape_to_string(&s)
                )));
            }
            let total = s.iter().cloned().fold(Dim::constant(0), |a, b| a + b);
            if let (Some(t), Some(dc)) = (total.as_const(), d.as_const()) {
                if t != dc {
                    return Err(OpError::Shape(format!(
                        "Split: sizes {} add up to {t}, not the axis size {dc}",
                        shape_to_string(&s)
                    )));
                }
            }
            return Ok(s);
        }
        let n = self.num_outputs.ok_or_else(|| {
            OpError::Invalid(
                "Split without a `split` input needs the number of outputs: the node must \
                 carry the `num_outputs` attribute"
                    .into(),
            )
        })?;
        let n = n as i64;
        if let Some(dc) = d.as_const() {
            if dc < n {
                return Err(OpError::Shape(format!(
                    "Split: cannot split an axis of size {dc} into {n} parts"
                )));
            }
        }
        let chunk = ceil_div(d, n);
        let last = d.clone() - chunk.clone() * Dim::constant(n - 1);
        let mut out = vec![chunk; n as usize - 1];
        out.push(last);
        Ok(out)
    }
}

fn split_t<T: Element>(x: &Tensor, axis: usize, sizes: &[usize]) -> Result<Vec<Tensor>, OpError> {
    let v = view::<T>(x)?;
    let mut off = 0usize;
    Ok(sizes
        .iter()
        .map(|&n| {
            let part = v.slice_axis(
                Axis(axis),
                Slice::new(off as isize, Some((off + n) as isize), 1),
            );
            off += n;
            Tensor::from_array(part.to_owned())
        })
        .collect())
}

impl Op for Split {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 2)?;
        let x = req(inputs, 0)?;
        let axis = norm_axis(self.axis, x.ty.rank())?;
        let split = match opt(inputs, 1) {
            Some(f) => {
                check_int(&f, 1)?;
                Some(sym_of(&f).ok_or(OpError::NotConstant(1))?)
            }
            None => None,
        };
        let sizes = self.sizes(&x.ty.shape[axis], split)?;
        let sym = sym_of(&x).filter(|_| x.ty.rank() == 1);
        let mut off = 0usize;
        Ok(sizes
            .into_iter()
            .map(|n| {
                let part_sym = match (&sym, n.as_const()) {
                    (Some(s), Some(c)) if off + c as usize <= s.len() => {
                        let p = s[off..off + c as usize].to_vec();
                        off += c as usize;
                        Some(p)
                    }
                    _ => None,
                };
                let mut shape = x.ty.shape.clone();
                shape[axis] = n;
                fact_with_sym(TensorType::new(x.ty.dtype, shape), part_sym)
            })
            .collect())
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 2)?;
        let x = req(inputs, 0)?;
        let axis = norm_axis(self.axis, x.rank())?;
        let split = opt(inputs, 1)
            .map(|t| ints_of(t, 1).map(|v| v.into_iter().map(Dim::constant).collect()))
            .transpose()?;
        let sizes = concrete(&self.sizes(&Dim::from(x.shape()[axis]), split)?)?;
        let bits = as_bits(x)?;
        let parts = by_width!(x.dtype(), T => split_t::<T>(&bits, axis, &sizes))?;
        parts.into_iter().map(|p| retype(p, x.dtype())).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Expand, Tile

fn expand_t<T: Element>(x: &Tensor, shape: &[usize]) -> Result<Tensor, OpError> {
    let xs = x.shape();
    let fail = || OpError::Shape(format!("cannot expand {xs:?} to {shape:?}"));
    if xs.len() > shape.len() {
        return Err(fail());
    }
    let lead = shape.len() - xs.len();
    let mut strides = vec![0usize; shape.len()];
    let mut st = 1usize;
    for a in (0..xs.len()).rev() {
        let (have, want) = (xs[a], shape[lead + a]);
        if have == want {
            strides[lead + a] = st;
        } else if have != 1 {
            return Err(fail());
        }
        st *= have;
    }
    let src = x.as_slice::<T>().map_err(rt)?;
    if src.is_empty() && shape.iter().product::<usize>() > 0 {
        return Err(fail());
    }
    Tensor::from_vec(shape.to_vec(), strided_copy(src, shape, &strides)).map_err(rt)
}

#[derive(Debug)]
struct Expand;

impl Op for Expand {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        let x = req(inputs, 0)?;
        let target = shape_input(&req(inputs, 1)?, 1, "Expand")?;
        if target.iter().any(|d| d.as_const().is_some_and(|c| c < 0)) {
            return Err(OpError::Shape(format!(
                "Expand: negative size in {}",
                shape_to_string(&target)
            )));
        }
        let shape = super::elementwise::broadcast_shapes(&[&x.ty.shape, &target])?;
        let ty = TensorType::new(x.ty.dtype, shape);
        // A scalar or one-element symbolic value repeated.
        let sym = match (sym_of(&x), volume(&ty.shape).as_const()) {
            (Some(s), Some(n)) if ty.rank() <= 1 && s.len() == 1 => {
                Some(vec![s[0].clone(); n.max(0) as usize])
            }
            (Some(s), Some(n)) if ty.rank() <= 1 && s.len() as i64 == n => Some(s),
            _ => None,
        };
        Ok(vec![fact_with_sym(ty, sym)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let x = req(inputs, 0)?;
        let target = ints_of(req(inputs, 1)?, 1)?;
        let target: Vec<usize> = target
            .iter()
            .map(|&d| {
                usize::try_from(d)
                    .map_err(|_| OpError::Shape(format!("Expand: negative size in {target:?}")))
            })
            .collect::<Result<_, _>>()?;
        let shape = super::elementwise::broadcast_concrete(x.shape(), &target)?;
        check_output(x.dtype(), &shape, "Expand")?;
        let bits = as_bits(x)?;
        let out = by_width!(x.dtype(), T => expand_t::<T>(&bits, &shape))?;
        Ok(vec![retype(out, x.dtype())?])
    }
}

fn tile_t<T: Element>(x: &Tensor, reps: &[usize]) -> Result<Tensor, OpError> {
    let v = view::<T>(x)?;
    let in_shape = v.shape().to_vec();
    let out_shape: Vec<usize> = in_shape.iter().zip(reps).map(|(d, r)| d * r).collect();
    let mut src = vec![0usize; in_shape.len()];
    let out = ArrayD::from_shape_fn(IxDyn(&out_shape), |idx| {
        for (k, s) in src.iter_mut().enumerate() {
            *s = idx[k] % in_shape[k];
        }
        v[src.as_slice()]
    });
    Ok(Tensor::from_array(out))
}

#[derive(Debug)]
struct Tile;

impl Op for Tile {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        let x = req(inputs, 0)?;
        let reps = shape_input(&req(inputs, 1)?, 1, "Tile")?;
        if reps.len() != x.ty.rank() {
            return Err(OpError::Shape(format!(
                "Tile: {} repeats for an input of rank {}",
                reps.len(),
                x.ty.rank()
            )));
        }
        if reps.iter().any(|d| d.as_const().is_some_and(|c| c < 0)) {
            return Err(OpError::Shape(format!(
                "Tile: negative repeat in {}",
                shape_to_string(&reps)
            )));
        }
        let shape =
            x.ty.shape
                .iter()
                .zip(&reps)
                .map(|(d, r)| d.clone() * r.clone())
                .collect();
        let ty = TensorType::new(x.ty.dtype, shape);
        let sym = match (sym_of(&x), reps.first().and_then(Dim::as_const)) {
            (Some(s), Some(r)) if x.ty.rank() == 1 && r >= 0 => Some(
                s.iter()
                    .cycle()
                    .take(s.len() * r as usize)
                    .cloned()
                    .collect(),
            ),
            _ => None,
        };
        Ok(vec![fact_with_sym(ty, sym)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let x = req(inputs, 0)?;
        let reps = ints_of(req(inputs, 1)?, 1)?;
        if reps.len() != x.rank() {
            return Err(OpError::Shape(format!(
                "Tile: {} repeats for an input of rank {}",
                reps.len(),
                x.rank()
            )));
        }
        let reps: Vec<usize> = reps
            .iter()
            .map(|&r| {
                usize::try_from(r)
                    .map_err(|_| OpError::Shape(format!("Tile: negative repeat in {reps:?}")))
            })
            .collect::<Result<_, _>>()?;
        let out_shape = x
            .shape()
            .iter()
            .zip(&reps)
            .map(|(&d, &r)| d.saturating_mul(r))
            .collect::<Vec<_>>();
        check_output(x.dtype(), &out_shape, "Tile")?;
        let bits = as_bits(x)?;
        let out = by_width!(x.dtype(), T => tile_t::<T>(&bits, &reps))?;
        Ok(vec![retype(out, x.dtype())?])
    }
}

// ---------------------------------------------------------------------------------------------
// Range

#[derive(Debug)]
struct Range;

/// Constant ranges up to this length are computed during inference (their values become
/// symbolic contents); longer ones only get their type.
const RANGE_VALUE_MAX: usize = 1 << 16;

/// Refuses an output of `shape` that would pass [`crate::tensor::max_tensor_bytes`] (sizes
/// that come from values: a shape input, repeats).
fn check_output(dtype: DType, shape: &[usize], op: &str) -> Result<(), OpError> {
    let elements = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .unwrap_or(usize::MAX);
    crate::tensor::check_tensor_size(dtype, elements, op).map_err(OpError::Invalid)
}

/// Number of elements of `Range(start, limit, delta)`.
fn range_len_f64(start: f64, limit: f64, delta: f64) -> Result<usize, OpError> {
    if delta == 0.0 || !delta.is_finite() || !start.is_finite() || !limit.is_finite() {
        return Err(OpError::Invalid(format!(
            "Range({start}, {limit}, {delta}) has no finite length"
        )));
    }
    Ok(((limit - start) / delta).ceil().max(0.0) as usize)
}

fn range_len_i64(start: i64, limit: i64, delta: i64) -> Result<usize, OpError> {
    if delta == 0 {
        return Err(OpError::Invalid("Range: delta is 0".into()));
    }
    let (s, l, d) = (start as i128, limit as i128, delta as i128);
    let n = if d > 0 {
        if l > s {
            (l - s - 1) / d + 1
        } else {
            0
        }
    } else if s > l {
        (s - l - 1) / -d + 1
    } else {
        0
    };
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

fn range_eval(start: &Tensor, limit: &Tensor, delta: &Tensor) -> Result<Tensor, OpError> {
    let dtype = start.dtype();
    for (i, t) in [limit, delta].into_iter().enumerate() {
        if t.dtype() != dtype {
            return Err(OpError::DType {
                index: i + 1,
                got: t.dtype(),
                expected: dtype.to_string(),
            });
        }
    }
    for (i, t) in [start, limit, delta].into_iter().enumerate() {
        if t.len() != 1 {
            return Err(OpError::Shape(format!(
                "Range: input {i} must be a scalar, has shape {:?}",
                t.shape()
            )));
        }
    }
    macro_rules! floats {
        ($t:ty) => {{
            let (s, l, d) = (
                start.as_slice::<$t>().map_err(rt)?[0],
                limit.as_slice::<$t>().map_err(rt)?[0],
                delta.as_slice::<$t>().map_err(rt)?[0],
            );
            let n = range_len_f64(s as f64, l as f64, d as f64)?;
            crate::tensor::check_tensor_size(dtype, n, "Range").map_err(OpError::Invalid)?;
            let v: Vec<$t> = (0..n).map(|i| s + (i as $t) * d).collect();
            Tensor::from_vec(vec![n], v).map_err(rt)
        }};
    }
    macro_rules! ints {
        ($t:ty) => {{
            let (s, l, d) = (
                start.as_slice::<$t>().map_err(rt)?[0] as i64,
                limit.as_slice::<$t>().map_err(rt)?[0] as i64,
                delta.as_slice::<$t>().map_err(rt)?[0] as i64,
            );
            let n = range_len_i64(s, l, d)?;
            crate::tensor::check_tensor_size(dtype, n, "Range").map_err(OpError::Invalid)?;
            let v: Vec<$t> = (0..n as i64).map(|i| (s + i * d) as $t).collect();
            Tensor::from_vec(vec![n], v).map_err(rt)
        }};
    }
    match dtype {
        DType::F32 => floats!(f32),
        DType::F64 => floats!(f64),
        DType::I64 => ints!(i64),
        DType::I32 => ints!(i32),
        DType::I16 => ints!(i16),
        d => Err(OpError::DType {
            index: 0,
            got: d,
            expected: "f32, f64, i16, i32 or i64".into(),
        }),
    }
}

impl Op for Range {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 3, 3)?;
        let (s, l, d) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        let dtype = s.ty.dtype;
        for (i, f) in [(1, l), (2, d)] {
            if f.ty.dtype != dtype {
                return Err(OpError::DType {
                    index: i,
                    got: f.ty.dtype,
                    expected: dtype.to_string(),
                });
            }
        }
        for (i, f) in [s, l, d].into_iter().enumerate() {
            if volume(&f.ty.shape).as_const().is_some_and(|n| n != 1) {
                return Err(OpError::Shape(format!(
                    "Range: input {i} must be a scalar, is {}",
                    f.ty
                )));
            }
        }
        if let (Some(a), Some(b), Some(c)) = (s.value, l.value, d.value) {
            // A long constant range is a type, not a value to carry through inference.
            let first = |t: &Tensor| t.to_f64_vec().ok().and_then(|v| v.first().copied());
            if let (Some(a0), Some(b0), Some(c0)) = (first(a), first(b), first(c)) {
                let n = if dtype.is_int() {
                    range_len_i64(a0 as i64, b0 as i64, c0 as i64)?
                } else {
                    range_len_f64(a0, b0, c0)?
                };
                if n > RANGE_VALUE_MAX {
                    crate::tensor::check_tensor_size(dtype, n, "Range")
                        .map_err(OpError::Invalid)?;
                    let ty = TensorType::new(dtype, shape_of(&[n]));
                    return Ok(vec![OutputFact::new(ty)]);
                }
            }
            let t = range_eval(a, b, c)?;
            let ty = TensorType::new(dtype, shape_of(t.shape()));
            return Ok(vec![fact_with_sym(ty, sym_of_const(&t))]);
        }
        if !dtype.is_int() {
            let i = [s, l, d]
                .iter()
                .position(|f| f.value.is_none())
                .unwrap_or(0);
            return Err(OpError::NotConstant(i));
        }
        let scalar = |f: &InputFact<'_>, i: usize| -> Result<Dim, OpError> {
            match sym_of(f).as_deref() {
                Some([x]) => Ok(x.clone()),
                _ => Err(OpError::NotConstant(i)),
            }
        };
        let (start, limit, delta) = (scalar(&s, 0)?, scalar(&l, 1)?, scalar(&d, 2)?);
        let delta = delta.as_const().ok_or_else(|| {
            OpError::Shape(format!(
                "Range: the length is not expressible with a symbolic delta {delta}"
            ))
        })?;
        if delta == 0 {
            return Err(OpError::Invalid("Range: delta is 0".into()));
        }
        let len = if delta > 0 {
            ceil_div(&(limit - start.clone()), delta)
        } else {
            ceil_div(&(start.clone() - limit), -delta)
        };
        let len = if non_positive(&len) {
            Dim::constant(0)
        } else {
            len
        };
        let sym = len.as_const().map(|n| {
            (0..n.max(0))
                .map(|i| start.clone() + Dim::constant(i * delta))
                .collect()
        });
        Ok(vec![fact_with_sym(TensorType::new(dtype, vec![len]), sym)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 3, 3)?;
        Ok(vec![range_eval(
            req(inputs, 0)?,
            req(inputs, 1)?,
            req(inputs, 2)?,
        )?])
    }
}

// ---------------------------------------------------------------------------------------------
// ConstantOfShape, Constant

#[derive(Debug)]
struct ConstantOfShape {
    /// A scalar.
    value: Tensor,
}

fn fill_t<T: Element>(value: &Tensor, shape: Vec<usize>) -> Result<Tensor, OpError> {
    let v = value.as_slice::<T>().map_err(rt)?[0];
    let n = shape.iter().product();
    Tensor::from_vec(shape, vec![v; n]).map_err(rt)
}

impl Op for ConstantOfShape {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let shape = shape_input(&req(inputs, 0)?, 0, "ConstantOfShape")?;
        if shape.iter().any(|d| d.as_const().is_some_and(|c| c < 0)) {
            return Err(OpError::Shape(format!(
                "ConstantOfShape: negative size in {}",
                shape_to_string(&shape)
            )));
        }
        let n = volume(&shape).as_const();
        let ty = TensorType::new(self.value.dtype(), shape);
        let sym = match (n, sym_of_const(&self.value)) {
            (Some(n), Some(v)) if n >= 0 && (n as usize) <= MAX_SYM_ELEMENTS => {
                Some(vec![v[0].clone(); n as usize])
            }
            _ => None,
        };
        Ok(vec![fact_with_sym(ty, sym)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 1)?;
        let shape = ints_of(req(inputs, 0)?, 0)?;
        let shape: Vec<usize> = shape
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| {
                    OpError::Shape(format!("ConstantOfShape: negative size in {shape:?}"))
                })
            })
            .collect::<Result<_, _>>()?;
        let dtype = self.value.dtype();
        check_output(dtype, &shape, "ConstantOfShape")?;
        let bits = as_bits(&self.value)?;
        let out = by_width!(dtype, T => fill_t::<T>(&bits, shape))?;
        Ok(vec![retype(out, dtype)?])
    }
}

/// The tensor of a `Constant` node from whichever value attribute it has.
fn constant_value(attrs: &Attrs) -> Result<Tensor, OpError> {
    let mut found = Vec::new();
    for (name, a) in &attrs.0 {
        let t = match (name.as_str(), a) {
            ("value", Attr::Tensor(t)) => t.clone(),
            ("value_int", Attr::Int(v)) => Tensor::scalar(*v),
            ("value_ints", Attr::Ints(v)) => i64_tensor(v.clone()),
            ("value_float", Attr::Float(v)) => Tensor::scalar(*v),
            ("value_floats", Attr::Floats(v)) => {
                Tensor::from_vec(vec![v.len()], v.clone()).map_err(rt)?
            }
            ("value" | "value_int" | "value_ints" | "value_float" | "value_floats", _) => {
                return Err(OpError::BadAttr {
                    name: name.clone(),
                    msg: "has the wrong attribute kind for this name".into(),
                })
            }
            ("sparse_value" | "value_string" | "value_strings", _) => {
                return Err(OpError::BadAttr {
                    name: name.clone(),
                    msg: "sparse and string constants are not supported".into(),
                })
            }
            _ => continue,
        };
        found.push((name.clone(), t));
    }
    match found.len() {
        0 => Err(OpError::MissingAttr("value".into())),
        1 => Ok(found.pop().expect("one value").1),
        _ => Err(OpError::Invalid(format!(
            "Constant has several value attributes: {}",
            found
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[derive(Debug)]
struct Constant {
    value: Tensor,
}

impl Op for Constant {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 0, 0)?;
        let ty = TensorType::new(self.value.dtype(), shape_of(self.value.shape()));
        Ok(vec![OutputFact {
            ty,
            sym: sym_of_const(&self.value),
        }])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 0, 0)?;
        Ok(vec![self.value.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> OpRegistry {
        let mut r = OpRegistry::empty();
        register(&mut r);
        r
    }

    fn build(op: &str, attrs: Attrs, opset: i64) -> Arc<dyn Op> {
        registry()
            .build("", op, opset, &attrs, "n")
            .expect("op builds")
    }

    fn f32s(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape, v).unwrap()
    }

    fn i64s(v: Vec<i64>) -> Tensor {
        i64_tensor(v)
    }

    fn run(op: &Arc<dyn Op>, inputs: &[&Tensor]) -> Vec<Tensor> {
        let args: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op.eval(&args).unwrap()
    }

    fn s(name: &str) -> Dim {
        Dim::sym(name)
    }

    fn c(v: i64) -> Dim {
        Dim::constant(v)
    }

    fn ty(dtype: DType, shape: Vec<Dim>) -> TensorType {
        TensorType::new(dtype, shape)
    }

    fn fact<'a>(ty: &'a TensorType) -> InputFact<'a> {
        InputFact {
            ty,
            value: None,
            sym: None,
        }
    }

    fn const_fact<'a>(ty: &'a TensorType, t: &'a Tensor) -> InputFact<'a> {
        InputFact {
            ty,
            value: Some(t),
            sym: None,
        }
    }

    fn sym_fact<'a>(ty: &'a TensorType, sym: &'a [Dim]) -> InputFact<'a> {
        InputFact {
            ty,
            value: None,
            sym: Some(sym),
        }
    }

    fn tty(t: &Tensor) -> TensorType {
        TensorType::new(t.dtype(), shape_of(t.shape()))
    }

    #[test]
    fn shape_with_start_end_and_size() {
        let x = ty(DType::F32, vec![s("batch"), s("seq"), c(64)]);
        let op = build("Shape", Attrs::new(), 17);
        let out = op.infer(&[Some(fact(&x))]).unwrap();
        assert_eq!(out[0].ty, ty(DType::I64, vec![c(3)]));
        assert_eq!(out[0].sym, Some(vec![s("batch"), s("seq"), c(64)]));
        let op = build(
            "Shape",
            Attrs::new()
                .with("start", Attr::Int(1))
                .with("end", Attr::Int(-1)),
            17,
        );
        assert_eq!(
            op.infer(&[Some(fact(&x))]).unwrap()[0].sym,
            Some(vec![s("seq")])
        );
        let t = f32s(vec![2, 3, 4], vec![0.; 24]);
        assert_eq!(run(&op, &[&t])[0].as_slice::<i64>().unwrap(), &[3]);
        let size = build("Size", Attrs::new(), 17);
        let out = size.infer(&[Some(fact(&x))]).unwrap();
        assert_eq!(out[0].sym, Some(vec![s("batch") * s("seq") * c(64)]));
        assert_eq!(run(&size, &[&t])[0].as_slice::<i64>().unwrap(), &[24]);
    }

    #[test]
    fn reshape_eval_with_zero_and_minus_one() {
        let op = build("Reshape", Attrs::new(), 17);
        let x = f32s(vec![2, 3, 4], (0..24).map(|v| v as f32).collect());
        let out = run(&op, &[&x, &i64s(vec![0, -1, 2])]);
        assert_eq!(out[0].shape(), &[2, 6, 2]);
        assert!(op
            .eval(&[Some(&x), Some(&i64s(vec![5, -1]))])
            .unwrap_err()
            .to_string()
            .contains("not divisible"));
        assert!(op.eval(&[Some(&x), Some(&i64s(vec![-1, -1]))]).is_err());
        let az = build("Reshape", Attrs::new().with("allowzero", Attr::Int(1)), 17);
        let empty = f32s(vec![0, 3], vec![]);
        assert_eq!(run(&az, &[&empty, &i64s(vec![3, 0])])[0].shape(), &[3, 0]);
    }

    #[test]
    fn reshape_infers_symbolic_targets() {
        let op = build("Reshape", Attrs::new(), 17);
        let x = ty(DType::F32, vec![s("batch"), s("seq"), c(64)]);
        let st = ty(DType::I64, vec![c(4)]);
        let target = [s("batch"), s("seq"), c(4), c(16)];
        let out = op
            .infer(&[Some(fact(&x)), Some(sym_fact(&st, &target))])
            .unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, seq, 4, 16]");
        let zeros = i64s(vec![0, 0, -1, 16]);
        let out = op
            .infer(&[Some(fact(&x)), Some(const_fact(&st, &zeros))])
            .unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, seq, 4, 16]");
        // -1 absorbing a sum of symbols.
        let kv = ty(DType::F32, vec![s("batch"), s("seq") + s("past"), c(64)]);
        let t2 = ty(DType::I64, vec![c(3)]);
        let flat = i64s(vec![0, -1, 16]);
        let out = op
            .infer(&[Some(fact(&kv)), Some(const_fact(&t2, &flat))])
            .unwrap();
        assert_eq!(
            shape_to_string(&out[0].ty.shape),
            "[batch, 4*past + 4*seq, 16]"
        );
        // Not expressible: an error, not an invented symbol.
        let weird = i64s(vec![0, 0, 3, -1]);
        let err = op
            .infer(&[Some(fact(&x)), Some(const_fact(&st, &weird))])
            .unwrap_err();
        assert!(matches!(err, OpError::Shape(_)), "{err}");
        // Neither constant nor symbolic.
        let err = op.infer(&[Some(fact(&x)), Some(fact(&st))]).unwrap_err();
        assert!(matches!(err, OpError::Shape(_)), "{err}");
        // A 1-D sym passes through a reshape to a scalar.
        let one = ty(DType::I64, vec![c(1)]);
        let scalar_shape = ty(DType::I64, vec![c(0)]);
        let none = i64s(vec![]);
        let seq = [s("seq")];
        let out = op
            .infer(&[
                Some(sym_fact(&one, &seq)),
                Some(const_fact(&scalar_shape, &none)),
            ])
            .unwrap();
        assert_eq!(out[0].ty.rank(), 0);
        assert_eq!(out[0].sym, Some(vec![s("seq")]));
    }

    #[test]
    fn transpose_default_and_perm() {
        let x = f32s(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let op = build("Transpose", Attrs::new(), 17);
        let out = run(&op, &[&x]);
        assert_eq!(out[0].shape(), &[3, 2]);
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[1., 4., 2., 5., 3., 6.]);
        let op = build(
            "Transpose",
            Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1, 3])),
            17,
        );
        let t = ty(DType::F16, vec![s("batch"), s("seq"), c(4), c(16)]);
        let out = op.infer(&[Some(fact(&t))]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, 4, seq, 16]");
        let bad = build(
            "Transpose",
            Attrs::new().with("perm", Attr::Ints(vec![0, 0])),
            17,
        );
        assert!(bad.eval(&[Some(&x)]).is_err());
        // bool goes through the same byte moves
        let b = Tensor::from_vec(vec![1, 3], vec![true, false, true]).unwrap();
        let out = run(&build("Transpose", Attrs::new(), 17), &[&b]);
        assert_eq!(out[0].as_slice::<bool>().unwrap(), &[true, false, true]);
        assert_eq!(out[0].shape(), &[3, 1]);
    }

    /// Slice is linear, so its gradient is its adjoint: `<Slice(X), dY> = <X, SliceGrad(X,
    /// dY)>` on random values, for forward, strided, reversed and clamped slices over one and
    /// two axes; a dY of the wrong shape is refused.
    #[test]
    fn slice_grad_is_the_adjoint_of_slice() {
        let slice = build("Slice", Attrs::new(), 13);
        let grad = registry()
            .build("patch", "SliceGrad", 1, &Attrs::new(), "g")
            .unwrap();
        let shape = vec![3usize, 5, 7];
        let n: usize = shape.iter().product();
        let x = f32s(
            shape.clone(),
            (0..n).map(|i| ((i * 37 % 11) as f32) - 5.0).collect(),
        );
        for (starts, ends, axes, steps) in [
            (vec![1], vec![4], vec![-1], vec![1]),
            (vec![0], vec![7], vec![2], vec![2]),
            (vec![-1], vec![-100], vec![1], vec![-2]),
            (vec![1, 2], vec![3, 100], vec![0, 2], vec![1, 3]),
        ] {
            let args = [i64s(starts), i64s(ends), i64s(axes), i64s(steps)];
            let y = &run(&slice, &[&x, &args[0], &args[1], &args[2], &args[3]])[0];
            let m = y.len();
            let dy = f32s(
                y.shape().to_vec(),
                (0..m).map(|i| ((i * 13 % 7) as f32) - 3.0).collect(),
            );
            let dx = &run(&grad, &[&x, &dy, &args[0], &args[1], &args[2], &args[3]])[0];
            assert_eq!(dx.shape(), x.shape());
            let dot = |a: &Tensor, b: &Tensor| -> f64 {
                let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
                a.iter()
                    .zip(b)
                    .map(|(p, q)| (*p as f64) * (*q as f64))
                    .sum()
            };
            assert_eq!(dot(y, &dy), dot(&x, dx), "{:?}", y.shape());
            let nonzero = dx
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .filter(|v| **v != 0.0)
                .count();
            assert!(nonzero <= m);
        }
        let wrong = f32s(vec![3, 5, 2], vec![1.0; 30]);
        let args = [i64s(vec![1]), i64s(vec![4]), i64s(vec![-1])];
        assert!(grad
            .eval(&[
                Some(&x),
                Some(&wrong),
                Some(&args[0]),
                Some(&args[1]),
                Some(&args[2])
            ])
            .is_err());
    }

    #[test]
    fn unsqueeze_squeeze_eval_and_sym() {
        let un = build("Unsqueeze", Attrs::new(), 17);
        let sq = build("Squeeze", Attrs::new(), 17);
        let x = f32s(vec![2, 3], vec![0.; 6]);
        let out = run(&un, &[&x, &i64s(vec![-1, 0])]);
        assert_eq!(out[0].shape(), &[1, 2, 3, 1]);
        let back = run(&sq, &[&out[0]]);
        assert_eq!(back[0].shape(), &[2, 3]);
        let back = run(&sq, &[&out[0], &i64s(vec![-1])]);
        assert_eq!(back[0].shape(), &[1, 2, 3]);
        assert!(sq.eval(&[Some(&x), Some(&i64s(vec![0]))]).is_err());
        // Symbolic: scalar `seq` → [seq] → scalar again.
        let scalar = ty(DType::I64, vec![]);
        let seq = [s("seq")];
        let axes_ty = ty(DType::I64, vec![c(1)]);
        let zero = i64s(vec![0]);
        let out = un
            .infer(&[
                Some(sym_fact(&scalar, &seq)),
                Some(const_fact(&axes_ty, &zero)),
            ])
            .unwrap();
        assert_eq!(out[0].ty, ty(DType::I64, vec![c(1)]));
        assert_eq!(out[0].sym, Some(vec![s("seq")]));
        let vec1 = out[0].ty.clone();
        let out = sq.infer(&[Some(sym_fact(&vec1, &seq))]).unwrap();
        assert_eq!(out[0].ty.rank(), 0);
        assert_eq!(out[0].sym, Some(vec![s("seq")]));
        // Squeeze without axes keeps symbolic dims.
        let t = ty(DType::F32, vec![c(1), s("seq"), c(1), c(8)]);
        let out = sq.infer(&[Some(fact(&t))]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[seq, 8]");
        // Axes that are not constant.
        let err = un
            .infer(&[Some(fact(&t)), Some(fact(&axes_ty))])
            .unwrap_err();
        assert_eq!(err, OpError::NotConstant(1));
    }

    #[test]
    fn concat_eval_and_symbolic_shape_chain() {
        let op = build("Concat", Attrs::new().with("axis", Attr::Int(-1)), 17);
        let a = f32s(vec![2, 1], vec![1., 2.]);
        let b = f32s(vec![2, 2], vec![3., 4., 5., 6.]);
        let out = run(&op, &[&a, &b]);
        assert_eq!(out[0].shape(), &[2, 3]);
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[1., 3., 4., 2., 5., 6.]);
        let op0 = build("Concat", Attrs::new().with("axis", Attr::Int(0)), 17);
        let one = ty(DType::I64, vec![c(1)]);
        let (sb, ss) = ([s("batch")], [s("seq")]);
        let four = i64s(vec![4]);
        let sixteen = i64s(vec![16]);
        let out = op0
            .infer(&[
                Some(sym_fact(&one, &sb)),
                Some(sym_fact(&one, &ss)),
                Some(const_fact(&one, &four)),
                Some(const_fact(&one, &sixteen)),
            ])
            .unwrap();
        assert_eq!(out[0].ty, ty(DType::I64, vec![c(4)]));
        assert_eq!(out[0].sym, Some(vec![s("batch"), s("seq"), c(4), c(16)]));
        // Concat along a symbolic axis of KV caches.
        let k1 = ty(DType::F32, vec![s("batch"), c(4), s("past"), c(16)]);
        let k2 = ty(DType::F32, vec![s("batch"), c(4), s("seq"), c(16)]);
        let op2 = build("Concat", Attrs::new().with("axis", Attr::Int(-2)), 17);
        let out = op2.infer(&[Some(fact(&k1)), Some(fact(&k2))]).unwrap();
        assert_eq!(
            shape_to_string(&out[0].ty.shape),
            "[batch, 4, past + seq, 16]"
        );
        let bad = ty(DType::F32, vec![s("batch"), c(5), s("seq"), c(16)]);
        assert!(op2.infer(&[Some(fact(&k1)), Some(fact(&bad))]).is_err());
    }

    #[test]
    fn slice_eval_negative_steps_and_clamping() {
        let op = build("Slice", Attrs::new(), 17);
        let x = f32s(vec![2, 5], (0..10).map(|v| v as f32).collect());
        // x[:, ::-2]
        let out = run(
            &op,
            &[
                &x,
                &i64s(vec![-1]),
                &i64s(vec![i64::MIN]),
                &i64s(vec![1]),
                &i64s(vec![-2]),
            ],
        );
        assert_eq!(out[0].shape(), &[2, 3]);
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[4., 2., 0., 9., 7., 5.]);
        // x[1:, 1:INT64_MAX], ends clamp
        let out = run(&op, &[&x, &i64s(vec![1, 1]), &i64s(vec![100, i64::MAX])]);
        assert_eq!(out[0].shape(), &[1, 4]);
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[6., 7., 8., 9.]);
        // x[:, 3:1:-1]
        let out = run(
            &op,
            &[
                &x,
                &i64s(vec![3]),
                &i64s(vec![1]),
                &i64s(vec![-1]),
                &i64s(vec![-1]),
            ],
        );
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[3., 2., 8., 7.]);
        // empty slice
        let out = run(&op, &[&x, &i64s(vec![4]), &i64s(vec![2]), &i64s(vec![1])]);
        assert_eq!(out[0].shape(), &[2, 0]);
        // zero step
        assert!(op
            .eval(&[
                Some(&x),
                Some(&i64s(vec![0])),
                Some(&i64s(vec![1])),
                Some(&i64s(vec![0])),
                Some(&i64s(vec![0])),
            ])
            .is_err());
    }

    #[test]
    fn slice_infers_symbolic_lengths() {
        let op = build("Slice", Attrs::new(), 17);
        let x = ty(DType::F32, vec![s("batch"), s("seq") + s("past")]);
        let one = ty(DType::I64, vec![c(1)]);
        let infer = |st: &[Dim], en: &[Dim], axes: &Tensor, steps: Option<&Tensor>| {
            let mut facts = vec![
                Some(fact(&x)),
                Some(sym_fact(&one, st)),
                Some(sym_fact(&one, en)),
                Some(const_fact(&one, axes)),
            ];
            if let Some(k) = steps {
                facts.push(Some(const_fact(&one, k)));
            }
            op.infer(&facts).map(|o| shape_to_string(&o[0].ty.shape))
        };
        let ax1 = i64s(vec![1]);
        // [:, past:] → seq
        assert_eq!(
            infer(&[s("past")], &[c(i64::MAX)], &ax1, None).unwrap(),
            "[batch, seq]"
        );
        // [:, -seq:] → seq
        assert_eq!(
            infer(&[-s("seq")], &[c(i64::MAX)], &ax1, None).unwrap(),
            "[batch, seq]"
        );
        // [:, :seq] → seq (provably within the axis)
        assert_eq!(
            infer(&[c(0)], &[s("seq")], &ax1, None).unwrap(),
            "[batch, seq]"
        );
        // [:, 1:] → past + seq - 1
        assert_eq!(
            infer(&[c(1)], &[c(i64::MAX)], &ax1, None).unwrap(),
            "[batch, past + seq - 1]"
        );
        // [:, ::-1] → whole axis
        let back = i64s(vec![-1]);
        assert_eq!(
            infer(&[c(-1)], &[c(i64::MIN)], &ax1, Some(&back)).unwrap(),
            "[batch, past + seq]"
        );
        // [:, ::2] → ceil((past + seq) / 2)
        let two = i64s(vec![2]);
        assert_eq!(
            infer(&[c(0)], &[c(i64::MAX)], &ax1, Some(&two)).unwrap(),
            "[batch, (past + seq + 1)/2]"
        );
        // [:, :seq-1] counts from the front; [:, 1-seq:] from the back.
        assert_eq!(
            infer(&[c(0)], &[s("seq") - c(1)], &ax1, None).unwrap(),
            "[batch, seq - 1]"
        );
        assert_eq!(
            infer(&[c(1) - s("seq")], &[c(i64::MAX)], &ax1, None).unwrap(),
            "[batch, seq - 1]"
        );
        // start of unknown sign: an error, not a fresh symbol.
        let err = infer(&[s("seq") - s("past")], &[c(i64::MAX)], &ax1, None).unwrap_err();
        assert!(matches!(err, OpError::Shape(_)), "{err}");
        // Slicing a 1-D sym keeps its content.
        let sh = ty(DType::I64, vec![c(3)]);
        let content = [s("batch"), s("seq"), c(64)];
        let out = op
            .infer(&[
                Some(sym_fact(&sh, &content)),
                Some(const_fact(&one, &i64s(vec![-2]))),
                Some(const_fact(&one, &i64s(vec![i64::MAX]))),
            ])
            .unwrap();
        assert_eq!(out[0].sym, Some(vec![s("seq"), c(64)]));
    }

    #[test]
    fn split_uneven_and_num_outputs() {
        let op = build("Split", Attrs::new().with("axis", Attr::Int(-1)), 17);
        let x = f32s(vec![2, 5], (0..10).map(|v| v as f32).collect());
        let out = run(&op, &[&x, &i64s(vec![2, 3])]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[0., 1., 5., 6.]);
        assert_eq!(out[1].as_slice::<f32>().unwrap(), &[2., 3., 4., 7., 8., 9.]);
        assert!(op.eval(&[Some(&x), Some(&i64s(vec![2, 2]))]).is_err());
        assert!(op.eval(&[Some(&x)]).is_err());
        let op18 = build(
            "Split",
            Attrs::new()
                .with("axis", Attr::Int(1))
                .with("num_outputs", Attr::Int(3)),
            18,
        );
        let out = run(&op18, &[&x]);
        let shapes: Vec<&[usize]> = out.iter().map(|t| t.shape()).collect();
        assert_eq!(shapes, vec![&[2, 2][..], &[2, 2], &[2, 1]]);
        // Symbolic: split the last axis of [batch, seq, 192] in three.
        let t = ty(DType::F32, vec![s("batch"), s("seq"), c(192)]);
        let st = ty(DType::I64, vec![c(3)]);
        let sizes = i64s(vec![64, 64, 64]);
        let out = op
            .infer(&[Some(fact(&t)), Some(const_fact(&st, &sizes))])
            .unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(shape_to_string(&out[2].ty.shape), "[batch, seq, 64]");
        // Split of a shape value keeps the content.
        let sh = [s("batch"), s("seq"), c(64)];
        let two = ty(DType::I64, vec![c(2)]);
        let parts = i64s(vec![1, 2]);
        let op0 = build("Split", Attrs::new(), 17);
        let out = op0
            .infer(&[Some(sym_fact(&st, &sh)), Some(const_fact(&two, &parts))])
            .unwrap();
        assert_eq!(out[1].sym, Some(vec![s("seq"), c(64)]));
    }

    #[test]
    fn expand_and_tile() {
        let op = build("Expand", Attrs::new(), 17);
        let x = f32s(vec![3, 1], vec![1., 2., 3.]);
        let out = run(&op, &[&x, &i64s(vec![2, 1, 2])]);
        assert_eq!(out[0].shape(), &[2, 3, 2]);
        assert_eq!(
            &out[0].as_slice::<f32>().unwrap()[..6],
            &[1., 1., 2., 2., 3., 3.]
        );
        assert!(op.eval(&[Some(&x), Some(&i64s(vec![2, 2]))]).is_err());
        let t = ty(DType::F32, vec![c(1), c(1), s("seq"), s("seq")]);
        let st = ty(DType::I64, vec![c(4)]);
        let target = [s("batch"), c(1), s("seq"), s("seq")];
        let out = op
            .infer(&[Some(fact(&t)), Some(sym_fact(&st, &target))])
            .unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, 1, seq, seq]");
        // Expand of a scalar sym.
        let scalar = ty(DType::I64, vec![]);
        let seq = [s("seq")];
        let one = ty(DType::I64, vec![c(1)]);
        let three = i64s(vec![3]);
        let out = op
            .infer(&[
                Some(sym_fact(&scalar, &seq)),
                Some(const_fact(&one, &three)),
            ])
            .unwrap();
        assert_eq!(out[0].sym, Some(vec![s("seq"); 3]));

        let tile = build("Tile", Attrs::new(), 17);
        let x = f32s(vec![2, 2], vec![1., 2., 3., 4.]);
        let out = run(&tile, &[&x, &i64s(vec![1, 2])]);
        assert_eq!(out[0].shape(), &[2, 4]);
        assert_eq!(
            out[0].as_slice::<f32>().unwrap(),
            &[1., 2., 1., 2., 3., 4., 3., 4.]
        );
        let t = ty(DType::F32, vec![s("batch"), c(3)]);
        let two = ty(DType::I64, vec![c(2)]);
        let reps = i64s(vec![2, 1]);
        let out = tile
            .infer(&[Some(fact(&t)), Some(const_fact(&two, &reps))])
            .unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[2*batch, 3]");
    }

    #[test]
    fn range_eval_and_symbolic_length() {
        let op = build("Range", Attrs::new(), 17);
        let out = run(
            &op,
            &[
                &Tensor::scalar(10i64),
                &Tensor::scalar(0i64),
                &Tensor::scalar(-3i64),
            ],
        );
        assert_eq!(out[0].as_slice::<i64>().unwrap(), &[10, 7, 4, 1]);
        let out = run(
            &op,
            &[
                &Tensor::scalar(0f32),
                &Tensor::scalar(1f32),
                &Tensor::scalar(0.25f32),
            ],
        );
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[0., 0.25, 0.5, 0.75]);
        assert!(op
            .eval(&[
                Some(&Tensor::scalar(0i64)),
                Some(&Tensor::scalar(3i64)),
                Some(&Tensor::scalar(0i64)),
            ])
            .is_err());
        let scalar = ty(DType::I64, vec![]);
        let (zero, one, two) = (
            Tensor::scalar(0i64),
            Tensor::scalar(1i64),
            Tensor::scalar(2i64),
        );
        let seq = [s("seq")];
        let out = op
            .infer(&[
                Some(const_fact(&scalar, &zero)),
                Some(sym_fact(&scalar, &seq)),
                Some(const_fact(&scalar, &one)),
            ])
            .unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[seq]");
        let (past, total) = ([s("past")], [s("past") + s("seq")]);
        let out = op
            .infer(&[
                Some(sym_fact(&scalar, &past)),
                Some(sym_fact(&scalar, &total)),
                Some(const_fact(&scalar, &one)),
            ])
            .unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[seq]");
        let out = op
            .infer(&[
                Some(const_fact(&scalar, &zero)),
                Some(sym_fact(&scalar, &seq)),
                Some(const_fact(&scalar, &two)),
            ])
            .unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[(seq + 1)/2]");
        // An unknown limit is an error.
        let err = op
            .infer(&[
                Some(const_fact(&scalar, &zero)),
                Some(fact(&scalar)),
                Some(const_fact(&scalar, &one)),
            ])
            .unwrap_err();
        assert_eq!(err, OpError::NotConstant(1));
    }

    #[test]
    fn constant_of_shape_constant_and_flatten() {
        let op = build("ConstantOfShape", Attrs::new(), 17);
        let out = run(&op, &[&i64s(vec![2, 3])]);
        assert_eq!(out[0].dtype(), DType::F32);
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[0.; 6]);
        let ones = build(
            "ConstantOfShape",
            Attrs::new().with("value", Attr::Tensor(i64s(vec![1]))),
            17,
        );
        let st = ty(DType::I64, vec![c(2)]);
        let shape = [s("batch"), s("seq")];
        let out = ones.infer(&[Some(sym_fact(&st, &shape))]).unwrap();
        assert_eq!(out[0].ty, ty(DType::I64, vec![s("batch"), s("seq")]));
        let one = ty(DType::I64, vec![c(1)]);
        let three = i64s(vec![3]);
        let out = ones.infer(&[Some(const_fact(&one, &three))]).unwrap();
        assert_eq!(out[0].sym, Some(vec![c(1); 3]));
        let out = run(&ones, &[&three]);
        assert_eq!(out[0].as_slice::<i64>().unwrap(), &[1, 1, 1]);

        let k = build(
            "Constant",
            Attrs::new().with("value_ints", Attr::Ints(vec![0, -1, 8])),
            17,
        );
        let out = k.infer(&[]).unwrap();
        assert_eq!(out[0].ty, ty(DType::I64, vec![c(3)]));
        assert_eq!(out[0].sym, Some(vec![c(0), c(-1), c(8)]));
        assert_eq!(run(&k, &[])[0].as_slice::<i64>().unwrap(), &[0, -1, 8]);
        let kf = build(
            "Constant",
            Attrs::new().with("value_float", Attr::Float(0.5)),
            17,
        );
        assert_eq!(kf.infer(&[]).unwrap()[0].ty, ty(DType::F32, vec![]));
        assert!(registry()
            .build("", "Constant", 17, &Attrs::new(), "n")
            .is_err());

        let fl = build("Flatten", Attrs::new().with("axis", Attr::Int(2)), 17);
        let t = ty(DType::F32, vec![s("batch"), c(1), s("seq"), c(4)]);
        let out = fl.infer(&[Some(fact(&t))]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, 4*seq]");
        let x = f32s(vec![2, 3, 4], vec![0.; 24]);
        assert_eq!(run(&fl, &[&x])[0].shape(), &[6, 4]);
        let fl0 = build("Flatten", Attrs::new().with("axis", Attr::Int(0)), 17);
        assert_eq!(run(&fl0, &[&x])[0].shape(), &[1, 24]);
    }

    #[test]
    fn ops_move_every_dtype() {
        let op = build("Concat", Attrs::new().with("axis", Attr::Int(0)), 17);
        let h = Tensor::from_vec(vec![1], vec![half::f16::from_f32(1.5)]).unwrap();
        let out = run(&op, &[&h, &h]);
        assert_eq!(out[0].dtype(), DType::F16);
        assert_eq!(out[0].to_f64_vec().unwrap(), vec![1.5, 1.5]);
        let b = Tensor::from_vec(vec![2], vec![true, false]).unwrap();
        let out = run(&op, &[&b, &b]);
        assert_eq!(
            out[0].as_slice::<bool>().unwrap(),
            &[true, false, true, false]
        );
        let tt = tty(&b);
        assert_eq!(tt.dtype, DType::Bool);
    }
}

#[cfg(test)]
mod size_limits {
    use super::*;
    use crate::ir::Attrs;

    fn op(name: &str) -> std::sync::Arc<dyn Op> {
        crate::ops::OpRegistry::onnx()
            .build("", name, 18, &Attrs::new(), "n")
            .unwrap()
    }

    fn eval_err(name: &str, inputs: &[&Tensor]) -> String {
        let inputs: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op(name).eval(&inputs).unwrap_err().to_string()
    }

    /// Sizes that come from values are checked against the machine before anything is
    /// allocated (the limit is the physical memory, far below these).
    #[test]
    fn outputs_larger_than_the_machine_are_refused_before_allocating() {
        let limit = crate::tensor::max_tensor_bytes();
        let i64s = |v: Vec<i64>| Tensor::from_vec(vec![v.len()], v).unwrap();
        let scalar = |v: i64| Tensor::from_vec(vec![], vec![v]).unwrap();
        assert_eq!(
            eval_err("Range", &[&scalar(0), &scalar(1 << 60), &scalar(1)]),
            format!("Range would make 1152921504606846976 i64 elements, more than the {limit} bytes one tensor may take on this machine")
        );
        assert_eq!(
            eval_err("ConstantOfShape", &[&i64s(vec![1 << 30, 1 << 30])]),
            format!("ConstantOfShape would make 1152921504606846976 f32 elements, more than the {limit} bytes one tensor may take on this machine")
        );
        let x = Tensor::from_vec(vec![1, 1], vec![1.0f32]).unwrap();
        assert_eq!(
            eval_err("Expand", &[&x, &i64s(vec![1 << 40, 1 << 40])]),
            format!("Expand would make {} f32 elements, more than the {limit} bytes one tensor may take on this machine", usize::MAX)
        );
        assert_eq!(
            eval_err("Tile", &[&x, &i64s(vec![1 << 32, 1 << 32])]),
            format!("Tile would make {} f32 elements, more than the {limit} bytes one tensor may take on this machine", usize::MAX)
        );
    }
}
