//! Indexing ops: `Gather`, `GatherElements`, `GatherND`, `ScatterND`, `Trilu`, `CumSum`,
//! `ArgMax`.
//!
//! Gathers and scatters only move elements, so they run on every dtype by moving unsigned
//! integers of the element width (see `shape::by_width`). `Gather` on a 1-D symbolic value
//! (the output of `Shape`) with constant indices propagates the symbolic content, which is how
//! `Shape → Gather(0)` yields `batch`.

use std::sync::Arc;

use half::{bf16, f16};
use ndarray::{ArrayD, Dimension, IxDyn};

use super::elementwise::{binary, Binary};
use super::shape::{as_bits, by_width, check_int, const_ints, ints_of, retype, rt, sym_of, view};
use super::{arity, norm_axis, opt, req, InputFact, Op, OpError, OpRegistry, OutputFact, Outputs};
use crate::dim::{shape_to_string, Dim, Shape};
use crate::dtype::DType;
use crate::ir::TensorType;
use crate::tensor::{Element, Tensor};

pub fn register(r: &mut OpRegistry) {
    r.register("", "Gather", 13, |attrs, _| {
        Ok(Arc::new(Gather {
            axis: attrs.int_or("axis", 0)?,
        }))
    });
    r.register("", "GatherElements", 13, |attrs, _| {
        Ok(Arc::new(GatherElements {
            axis: attrs.int_or("axis", 0)?,
        }))
    });
    r.register("", "GatherND", 13, |attrs, _| {
        let batch_dims = attrs.int_or("batch_dims", 0)?;
        if batch_dims < 0 {
            return Err(OpError::BadAttr {
                name: "batch_dims".into(),
                msg: format!("must be non-negative, found {batch_dims}"),
            });
        }
        Ok(Arc::new(GatherNd {
            batch_dims: batch_dims as usize,
        }))
    });
    r.register("", "ScatterND", 13, |attrs, _| {
        let reduction = match attrs.string("reduction")?.unwrap_or("none") {
            "none" => None,
            "add" => Some(Binary::Add),
            "mul" => Some(Binary::Mul),
            "max" => Some(Binary::Max),
            "min" => Some(Binary::Min),
            other => {
                return Err(OpError::BadAttr {
                    name: "reduction".into(),
                    msg: format!("expected none, add, mul, max or min, found {other:?}"),
                })
            }
        };
        Ok(Arc::new(ScatterNd { reduction }))
    });
    r.register("", "Trilu", 14, |attrs, _| {
        Ok(Arc::new(Trilu {
            upper: attrs.int_or("upper", 1)? != 0,
        }))
    });
    r.register("", "CumSum", 13, |attrs, _| {
        Ok(Arc::new(CumSum {
            exclusive: attrs.int_or("exclusive", 0)? != 0,
            reverse: attrs.int_or("reverse", 0)? != 0,
        }))
    });
    r.register("", "ArgMax", 13, |attrs, _| {
        Ok(Arc::new(ArgMax {
            axis: attrs.int_or("axis", 0)?,
            keepdims: attrs.int_or("keepdims", 1)? != 0,
            select_last_index: attrs.int_or("select_last_index", 0)? != 0,
        }))
    });
}

/// The elements of a symbolic 1-D value at constant (possibly negative) indices.
fn pick_sym(s: &[Dim], idx: &[i64]) -> Result<Vec<Dim>, OpError> {
    idx.iter()
        .map(|&i| norm_index(i, s.len(), 0).map(|j| s[j].clone()))
        .collect()
}

/// A possibly negative index normalized against an axis of size `d`.
fn norm_index(i: i64, d: usize, axis: usize) -> Result<usize, OpError> {
    let n = d as i64;
    let j = if i < 0 { i + n } else { i };
    if j < 0 || j >= n {
        return Err(OpError::Invalid(format!(
            "index {i} is out of bounds for axis {axis} of size {d}"
        )));
    }
    Ok(j as usize)
}

/// Checks constant indices against a constant axis size at inference time.
fn check_indices(f: &InputFact<'_>, d: &Dim, axis: usize) -> Result<(), OpError> {
    if let (Some(t), Some(n)) = (f.value, d.as_const()) {
        for i in ints_of(t, 1)? {
            norm_index(i, n as usize, axis)?;
        }
    }
    Ok(())
}

fn int_input(t: &Tensor, i: usize) -> Result<Vec<i64>, OpError> {
    if !t.dtype().is_int() {
        return Err(OpError::DType {
            index: i,
            got: t.dtype(),
            expected: "int32 or int64".into(),
        });
    }
    ints_of(t, i)
}

fn product(dims: &[usize]) -> usize {
    dims.iter().product()
}

// ---------------------------------------------------------------------------------------------
// Gather

#[derive(Debug)]
struct Gather {
    axis: i64,
}

fn gather_t<T: Element>(
    data: &Tensor,
    idx: &[usize],
    idx_shape: &[usize],
    axis: usize,
) -> Result<Tensor, OpError> {
    let src = data.as_slice::<T>().map_err(rt)?;
    let shape = data.shape();
    let outer = product(&shape[..axis]);
    let n = shape[axis];
    let inner = product(&shape[axis + 1..]);
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in idx {
            let base = (o * n + i) * inner;
            out.extend_from_slice(&src[base..base + inner]);
        }
    }
    let out_shape: Vec<usize> = shape[..axis]
        .iter()
        .chain(idx_shape)
        .chain(&shape[axis + 1..])
        .copied()
        .collect();
    Tensor::from_vec(out_shape, out).map_err(rt)
}

impl Op for Gather {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        let (data, indices) = (req(inputs, 0)?, req(inputs, 1)?);
        check_int(&indices, 1)?;
        let axis = norm_axis(self.axis, data.ty.rank())?;
        let shape: Shape = data.ty.shape[..axis]
            .iter()
            .chain(&indices.ty.shape)
            .chain(&data.ty.shape[axis + 1..])
            .cloned()
            .collect();
        check_indices(&indices, &data.ty.shape[axis], axis)?;
        let ty = TensorType::new(data.ty.dtype, shape);
        // Picking elements of a symbolic 1-D value with constant indices.
        if let (Some(s), 1, true) = (sym_of(&data), data.ty.rank(), indices.ty.rank() <= 1) {
            if let Ok(idx) = const_ints(&indices, 1) {
                return Ok(vec![OutputFact::with_sym(ty, pick_sym(&s, &idx)?)]);
            }
        }
        Ok(vec![OutputFact::new(ty)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let (data, indices) = (req(inputs, 0)?, req(inputs, 1)?);
        let axis = norm_axis(self.axis, data.rank())?;
        let d = data.shape()[axis];
        let idx = int_input(indices, 1)?
            .into_iter()
            .map(|i| norm_index(i, d, axis))
            .collect::<Result<Vec<_>, _>>()?;
        let bits = as_bits(data)?;
        let out = by_width!(data.dtype(), T => gather_t::<T>(&bits, &idx, indices.shape(), axis))?;
        Ok(vec![retype(out, data.dtype())?])
    }

    /// Rows of an `f32` table (an embedding lookup) are copied into the planned buffer;
    /// everything else is [`eval`](Self::eval).
    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        let (Some(data), Some(indices)) = (opt(inputs, 0), opt(inputs, 1)) else {
            return self.eval(inputs);
        };
        let rows_of_f32 = data.dtype() == DType::F32
            && inputs.len() == 2
            && matches!(norm_axis(self.axis, data.rank()), Ok(0));
        let row: usize = data.shape().iter().skip(1).product();
        let table = data.as_slice::<f32>();
        let (true, Ok(table), true) = (rows_of_f32, table, row > 0) else {
            return self.eval(inputs);
        };
        let d = data.shape()[0];
        let idx = int_input(indices, 1)?;
        let mut out = outputs.f32(0, idx.len() * row);
        for (o, &i) in out.chunks_exact_mut(row).zip(&idx) {
            let i = norm_index(i, d, 0)?;
            o.copy_from_slice(&table[i * row..(i + 1) * row]);
        }
        let shape = indices.shape().iter().chain(&data.shape()[1..]).copied();
        Ok(vec![out.into_tensor(shape.collect()).map_err(rt)?])
    }
}

// ---------------------------------------------------------------------------------------------
// GatherElements

#[derive(Debug)]
struct GatherElements {
    axis: i64,
}

fn gather_elements_t<T: Element>(
    data: &Tensor,
    idx: &ArrayD<i64>,
    axis: usize,
) -> Result<Tensor, OpError> {
    let v = view::<T>(data)?;
    let d = v.shape()[axis];
    let mut at = vec![0usize; v.ndim()];
    let mut out = Vec::with_capacity(idx.len());
    for (pos, &i) in idx.indexed_iter() {
        for (k, a) in at.iter_mut().enumerate() {
            *a = pos[k];
        }
        at[axis] = norm_index(i, d, axis)?;
        let x = v.get(at.as_slice()).ok_or_else(|| {
            OpError::Shape(format!(
                "GatherElements: index position {:?} is outside the data shape {:?}",
                pos.slice(),
                v.shape()
            ))
        })?;
        out.push(*x);
    }
    Tensor::from_vec(idx.shape().to_vec(), out).map_err(rt)
}

impl Op for GatherElements {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        let (data, indices) = (req(inputs, 0)?, req(inputs, 1)?);
        check_int(&indices, 1)?;
        let axis = norm_axis(self.axis, data.ty.rank())?;
        if indices.ty.rank() != data.ty.rank() {
            return Err(OpError::Shape(format!(
                "GatherElements: indices {} and data {} must have the same rank",
                indices.ty, data.ty
            )));
        }
        check_indices(&indices, &data.ty.shape[axis], axis)?;
        let ty = TensorType::new(data.ty.dtype, indices.ty.shape.clone());
        if let (Some(s), 1) = (sym_of(&data), data.ty.rank()) {
            if let Ok(idx) = const_ints(&indices, 1) {
                return Ok(vec![OutputFact::with_sym(ty, pick_sym(&s, &idx)?)]);
            }
        }
        Ok(vec![OutputFact::new(ty)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let (data, indices) = (req(inputs, 0)?, req(inputs, 1)?);
        let axis = norm_axis(self.axis, data.rank())?;
        if indices.rank() != data.rank() {
            return Err(OpError::Shape(format!(
                "GatherElements: indices {:?} and data {:?} must have the same rank",
                indices.shape(),
                data.shape()
            )));
        }
        let idx = ArrayD::from_shape_vec(IxDyn(indices.shape()), int_input(indices, 1)?)
            .expect("index count matches its shape");
        let bits = as_bits(data)?;
        let out = by_width!(data.dtype(), T => gather_elements_t::<T>(&bits, &idx, axis))?;
        Ok(vec![retype(out, data.dtype())?])
    }
}

// ---------------------------------------------------------------------------------------------
// GatherND, ScatterND

/// Flat element offsets of the index tuples of `GatherND`/`ScatterND`.
///
/// `data` is the data shape, `idx` the flattened indices whose last dim is `m`; with
/// `batch_dims = b`, tuple `j` belongs to batch `j / per_batch` and addresses dims
/// `b..b + m` of that batch. Returns one offset (in elements) per tuple.
fn tuple_offsets(
    data: &[usize],
    idx: &[i64],
    m: usize,
    b: usize,
    per_batch: usize,
) -> Result<Vec<usize>, OpError> {
    let batch_stride = product(&data[b..]);
    let strides: Vec<usize> = (0..m).map(|k| product(&data[b + k + 1..])).collect();
    if m == 0 {
        // Every tuple is empty and addresses its whole batch.
        return Ok((0..per_batch * product(&data[..b]))
            .map(|j| (j / per_batch) * batch_stride)
            .collect());
    }
    idx.chunks_exact(m)
        .enumerate()
        .map(|(j, tuple)| {
            let mut off = (j / per_batch.max(1)) * batch_stride;
            for (k, &i) in tuple.iter().enumerate() {
                off += norm_index(i, data[b + k], b + k)? * strides[k];
            }
            Ok(off)
        })
        .collect()
}

#[derive(Debug)]
struct GatherNd {
    batch_dims: usize,
}

impl GatherNd {
    /// `(m, output shape)` from the data and indices shapes.
    fn shapes(&self, data: &[Dim], indices: &[Dim]) -> Result<(usize, Shape), OpError> {
        let (r, q, b) = (data.len(), indices.len(), self.batch_dims);
        let fail = |msg: &str| {
            OpError::Shape(format!(
                "GatherND(batch_dims={b}) of data {} with indices {}: {msg}",
                shape_to_string(data),
                shape_to_string(indices)
            ))
        };
        if q < 1 || r < 1 || b >= q.min(r) {
            return Err(fail("batch_dims must be less than both ranks"));
        }
        let m = indices[q - 1]
            .as_const()
            .ok_or_else(|| fail("the last indices dim must be a constant"))?;
        if m < 0 || b + m as usize > r {
            return Err(fail("index tuples are longer than the data rank"));
        }
        for k in 0..b {
            if let (Some(x), Some(y)) = (data[k].as_const(), indices[k].as_const()) {
                if x != y {
                    return Err(fail("batch dims differ"));
                }
            }
        }
        let m = m as usize;
        let out = indices[..q - 1]
            .iter()
            .chain(&data[b + m..])
            .cloned()
            .collect();
        Ok((m, out))
    }
}

fn gather_nd_t<T: Element>(
    data: &Tensor,
    offsets: &[usize],
    slice: usize,
    out_shape: Vec<usize>,
) -> Result<Tensor, OpError> {
    let src = data.as_slice::<T>().map_err(rt)?;
    let mut out = Vec::with_capacity(offsets.len() * slice);
    for &o in offsets {
        out.extend_from_slice(&src[o..o + slice]);
    }
    Tensor::from_vec(out_shape, out).map_err(rt)
}

impl Op for GatherNd {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        let (data, indices) = (req(inputs, 0)?, req(inputs, 1)?);
        check_int(&indices, 1)?;
        let (_, shape) = self.shapes(&data.ty.shape, &indices.ty.shape)?;
        Ok(vec![OutputFact::new(TensorType::new(data.ty.dtype, shape))])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let (data, indices) = (req(inputs, 0)?, req(inputs, 1)?);
        let ds = crate::dim::shape_of(data.shape());
        let is = crate::dim::shape_of(indices.shape());
        let (m, out_shape) = self.shapes(&ds, &is)?;
        let b = self.batch_dims;
        if data.shape()[..b] != indices.shape()[..b] {
            return Err(OpError::Shape(format!(
                "GatherND: batch dims of data {:?} and indices {:?} differ",
                data.shape(),
                indices.shape()
            )));
        }
        let idx = int_input(indices, 1)?;
        let per_batch = product(&indices.shape()[b..indices.rank() - 1]);
        let offsets = tuple_offsets(data.shape(), &idx, m, b, per_batch)?;
        let slice = product(&data.shape()[b + m..]);
        let out_shape = super::shape::concrete(&out_shape)?;
        let bits = as_bits(data)?;
        let out =
            by_width!(data.dtype(), T => gather_nd_t::<T>(&bits, &offsets, slice, out_shape))?;
        Ok(vec![retype(out, data.dtype())?])
    }
}

/// `ScatterND`; with a reduction, updates combine with the data (and with each other, for
/// duplicate indices, in index order) through that binary op.
#[derive(Debug)]
struct ScatterNd {
    reduction: Option<Binary>,
}

/// Scatter with a reduction: each updated slice becomes `op(current, update)`, evaluated by
/// the elementwise kernel so that dtypes and rounding follow `Add`/`Mul`/`Max`/`Min`.
fn scatter_nd_reduce(
    op: Binary,
    data: &Tensor,
    offsets: &[usize],
    updates: &Tensor,
    slice: usize,
) -> Result<Tensor, OpError> {
    let flat = |t: &Tensor| t.reshaped(vec![t.len()]).map_err(rt);
    let mut out = as_bits(&flat(data)?)?;
    let ubits = as_bits(&flat(updates)?)?;
    for (j, &o) in offsets.iter().enumerate() {
        let current = by_width!(out.dtype(), T => slice_t::<T>(&out, o, slice))?;
        let update = by_width!(ubits.dtype(), T => slice_t::<T>(&ubits, j * slice, slice))?;
        let combined = binary(
            op,
            &retype(current, data.dtype())?,
            &retype(update, data.dtype())?,
        )?;
        let combined = as_bits(&combined)?;
        out = by_width!(out.dtype(), T => write_t::<T>(&out, o, &combined))?;
    }
    retype(out, data.dtype())?
        .reshaped(data.shape().to_vec())
        .map_err(rt)
}

fn slice_t<T: Element>(t: &Tensor, start: usize, len: usize) -> Result<Tensor, OpError> {
    let v = t.as_slice::<T>().map_err(rt)?;
    Tensor::from_vec(vec![len], v[start..start + len].to_vec()).map_err(rt)
}

fn write_t<T: Element>(t: &Tensor, start: usize, part: &Tensor) -> Result<Tensor, OpError> {
    let mut v = t.as_slice::<T>().map_err(rt)?.to_vec();
    let p = part.as_slice::<T>().map_err(rt)?;
    v[start..start + p.len()].copy_from_slice(p);
    Tensor::from_vec(vec![v.len()], v).map_err(rt)
}

fn scatter_nd_t<T: Element>(
    data: &Tensor,
    offsets: &[usize],
    updates: &Tensor,
    slice: usize,
) -> Result<Tensor, OpError> {
    let mut out = data.as_slice::<T>().map_err(rt)?.to_vec();
    let up = updates.as_slice::<T>().map_err(rt)?;
    for (j, &o) in offsets.iter().enumerate() {
        out[o..o + slice].copy_from_slice(&up[j * slice..(j + 1) * slice]);
    }
    Tensor::from_vec(data.shape().to_vec(), out).map_err(rt)
}

/// Expected shape of `ScatterND`'s updates: `indices[..q-1] ++ data[m..]`.
fn scatter_updates_shape(data: &[Dim], indices: &[Dim]) -> Result<(usize, Shape), OpError> {
    let fail = |msg: &str| {
        OpError::Shape(format!(
            "ScatterND into data {} with indices {}: {msg}",
            shape_to_string(data),
            shape_to_string(indices)
        ))
    };
    let q = indices.len();
    if q < 1 {
        return Err(fail("indices must have rank >= 1"));
    }
    let m = indices[q - 1]
        .as_const()
        .ok_or_else(|| fail("the last indices dim must be a constant"))?;
    if m < 0 || m as usize > data.len() {
        return Err(fail("index tuples are longer than the data rank"));
    }
    let m = m as usize;
    Ok((
        m,
        indices[..q - 1].iter().chain(&data[m..]).cloned().collect(),
    ))
}

impl Op for ScatterNd {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 3, 3)?;
        let (data, indices, updates) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        check_int(&indices, 1)?;
        if updates.ty.dtype != data.ty.dtype {
            return Err(OpError::DType {
                index: 2,
                got: updates.ty.dtype,
                expected: data.ty.dtype.to_string(),
            });
        }
        let (_, want) = scatter_updates_shape(&data.ty.shape, &indices.ty.shape)?;
        let mismatch = want.len() != updates.ty.rank()
            || want
                .iter()
                .zip(&updates.ty.shape)
                .any(|(a, b)| matches!((a.as_const(), b.as_const()), (Some(x), Some(y)) if x != y));
        if mismatch {
            return Err(OpError::Shape(format!(
                "ScatterND: updates are {} but must be {}",
                updates.ty,
                shape_to_string(&want)
            )));
        }
        Ok(vec![OutputFact::new(data.ty.clone())])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 3, 3)?;
        let (data, indices, updates) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        if updates.dtype() != data.dtype() {
            return Err(OpError::DType {
                index: 2,
                got: updates.dtype(),
                expected: data.dtype().to_string(),
            });
        }
        let ds = crate::dim::shape_of(data.shape());
        let (m, want) = scatter_updates_shape(&ds, &crate::dim::shape_of(indices.shape()))?;
        if super::shape::concrete(&want)? != updates.shape() {
            return Err(OpError::Shape(format!(
                "ScatterND: updates are {:?} but must be {}",
                updates.shape(),
                shape_to_string(&want)
            )));
        }
        let idx = int_input(indices, 1)?;
        let tuples = product(&indices.shape()[..indices.rank() - 1]);
        let offsets = tuple_offsets(data.shape(), &idx, m, 0, tuples)?;
        let slice = product(&data.shape()[m..]);
        if let Some(op) = self.reduction {
            return Ok(vec![scatter_nd_reduce(op, data, &offsets, updates, slice)?]);
        }
        let (bits, ubits) = (as_bits(data)?, as_bits(updates)?);
        let out = by_width!(data.dtype(), T => scatter_nd_t::<T>(&bits, &offsets, &ubits, slice))?;
        Ok(vec![retype(out, data.dtype())?])
    }
}

// ---------------------------------------------------------------------------------------------
// Trilu

#[derive(Debug)]
struct Trilu {
    upper: bool,
}

fn trilu_t<T: Element>(x: &Tensor, upper: bool, k: i64) -> Result<Tensor, OpError> {
    let src = x.as_slice::<T>().map_err(rt)?;
    let r = x.rank();
    let (n, m) = (x.shape()[r - 2] as i64, x.shape()[r - 1] as i64);
    let out: Vec<T> = src
        .iter()
        .enumerate()
        .map(|(p, &v)| {
            let p = p as i64;
            let (i, j) = ((p / m.max(1)) % n.max(1), p % m.max(1));
            let keep = if upper { j - i >= k } else { j - i <= k };
            if keep {
                v
            } else {
                T::default()
            }
        })
        .collect();
    Tensor::from_vec(x.shape().to_vec(), out).map_err(rt)
}

impl Op for Trilu {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 2)?;
        let x = req(inputs, 0)?;
        if x.ty.rank() < 2 {
            return Err(OpError::Shape(format!(
                "Trilu needs rank >= 2, got {}",
                x.ty
            )));
        }
        if let Some(k) = opt(inputs, 1) {
            check_int(&k, 1)?;
        }
        Ok(vec![OutputFact::new(x.ty.clone())])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 2)?;
        let x = req(inputs, 0)?;
        if x.rank() < 2 {
            return Err(OpError::Shape(format!(
                "Trilu needs rank >= 2, got shape {:?}",
                x.shape()
            )));
        }
        let k = match opt(inputs, 1) {
            Some(t) => match int_input(t, 1)?.as_slice() {
                [k] => *k,
                _ => {
                    return Err(OpError::Shape(format!(
                        "Trilu: k must be a scalar, has shape {:?}",
                        t.shape()
                    )))
                }
            },
            None => 0,
        };
        // Zero bits are zero (or false) in every dtype.
        let bits = as_bits(x)?;
        let out = by_width!(x.dtype(), T => trilu_t::<T>(&bits, self.upper, k))?;
        Ok(vec![retype(out, x.dtype())?])
    }
}

// ---------------------------------------------------------------------------------------------
// CumSum

/// Addition for running sums (wrapping on integers).
trait Accum: Element {
    fn acc(self, other: Self) -> Self;
}

macro_rules! accum_float {
    ($($t:ty),*) => {$(
        impl Accum for $t {
            fn acc(self, other: $t) -> $t { self + other }
        }
    )*};
}
accum_float!(f32, f64);

macro_rules! accum_int {
    ($($t:ty),*) => {$(
        impl Accum for $t {
            fn acc(self, other: $t) -> $t { self.wrapping_add(other) }
        }
    )*};
}
accum_int!(i8, i16, i32, i64, u8, u16, u32, u64);

impl Accum for f16 {
    fn acc(self, other: f16) -> f16 {
        f16::from_f32(self.to_f32() + other.to_f32())
    }
}

impl Accum for bf16 {
    fn acc(self, other: bf16) -> bf16 {
        bf16::from_f32(self.to_f32() + other.to_f32())
    }
}

#[derive(Debug)]
struct CumSum {
    exclusive: bool,
    reverse: bool,
}

fn cumsum_t<T: Accum>(
    x: &Tensor,
    axis: usize,
    exclusive: bool,
    reverse: bool,
) -> Result<Tensor, OpError> {
    let src = x.as_slice::<T>().map_err(rt)?;
    let shape = x.shape();
    let outer = product(&shape[..axis]);
    let n = shape[axis];
    let inner = product(&shape[axis + 1..]);
    let mut out = vec![T::default(); src.len()];
    for o in 0..outer {
        for i in 0..inner {
            let mut sum = T::default();
            for step in 0..n {
                let j = if reverse { n - 1 - step } else { step };
                let p = (o * n + j) * inner + i;
                if exclusive {
                    out[p] = sum;
                    sum = sum.acc(src[p]);
                } else {
                    sum = sum.acc(src[p]);
                    out[p] = sum;
                }
            }
        }
    }
    Tensor::from_vec(shape.to_vec(), out).map_err(rt)
}

impl Op for CumSum {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        let (x, axis) = (req(inputs, 0)?, req(inputs, 1)?);
        check_int(&axis, 1)?;
        if let Ok(a) = const_ints(&axis, 1) {
            match a.as_slice() {
                [a] => {
                    norm_axis(*a, x.ty.rank())?;
                }
                _ => {
                    return Err(OpError::Shape(format!(
                        "CumSum: axis must be a scalar, is {}",
                        axis.ty
                    )))
                }
            }
        }
        Ok(vec![OutputFact::new(x.ty.clone())])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let (x, a) = (req(inputs, 0)?, req(inputs, 1)?);
        let axis = match int_input(a, 1)?.as_slice() {
            [a] => norm_axis(*a, x.rank())?,
            _ => {
                return Err(OpError::Shape(format!(
                    "CumSum: axis must be a scalar, has shape {:?}",
                    a.shape()
                )))
            }
        };
        let out = numeric_or_half_dispatch!(x.dtype(),
            T => cumsum_t::<T>(x, axis, self.exclusive, self.reverse),
            d => Err(OpError::DType { index: 0, got: d, expected: "a numeric type".into() }))?;
        Ok(vec![out])
    }
}

// ---------------------------------------------------------------------------------------------
// ArgMax

#[derive(Debug)]
struct ArgMax {
    axis: i64,
    keepdims: bool,
    select_last_index: bool,
}

impl ArgMax {
    fn out_shape<D: Clone>(&self, shape: &[D], one: D) -> Result<(usize, Vec<D>), OpError> {
        let axis = norm_axis(self.axis, shape.len())?;
        let mut out = shape.to_vec();
        if self.keepdims {
            out[axis] = one;
        } else {
            out.remove(axis);
        }
        Ok((axis, out))
    }
}

/// `a > b` where NaN is greater than every number (NaN wins, like numpy).
#[allow(clippy::eq_op)]
fn greater<T: PartialOrd>(a: T, b: T) -> bool {
    let a_nan = a != a;
    let b_nan = b != b;
    (a_nan && !b_nan) || a > b
}

fn argmax_t<T: Element + PartialOrd>(
    x: &Tensor,
    axis: usize,
    last: bool,
    out_shape: Vec<usize>,
) -> Result<Tensor, OpError> {
    let src = x.as_slice::<T>().map_err(rt)?;
    let shape = x.shape();
    let outer = product(&shape[..axis]);
    let n = shape[axis];
    let inner = product(&shape[axis + 1..]);
    if n == 0 {
        return Err(OpError::Shape(format!(
            "ArgMax over an empty axis {axis} of {shape:?}"
        )));
    }
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| src[(o * n + j) * inner + i];
            let mut best = 0usize;
            for j in 1..n {
                let (v, b) = (at(j), at(best));
                if greater(v, b) || (last && v == b) {
                    best = j;
                }
            }
            out.push(best as i64);
        }
    }
    Tensor::from_vec(out_shape, out).map_err(rt)
}

impl Op for ArgMax {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        let (_, shape) = self.out_shape(&x.ty.shape, Dim::constant(1))?;
        Ok(vec![OutputFact::new(TensorType::new(DType::I64, shape))])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        let (axis, shape) = self.out_shape(x.shape(), 1)?;
        let last = self.select_last_index;
        let out = numeric_or_half_dispatch!(x.dtype(),
        T => argmax_t::<T>(x, axis, last, shape),
        d => match d {
            DType::Bool => argmax_t::<bool>(x, axis, last, shape),
            _ => unreachable!("every dtype is numeric or bool"),
        })?;
        Ok(vec![out])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Attr, Attrs};

    fn build(op: &str, attrs: Attrs) -> Arc<dyn Op> {
        let mut r = OpRegistry::empty();
        register(&mut r);
        r.build("", op, 18, &attrs, "n").expect("op builds")
    }

    fn run(op: &Arc<dyn Op>, inputs: &[&Tensor]) -> Result<Vec<Tensor>, OpError> {
        let args: Vec<Option<&Tensor>> = inputs.iter().map(|t| Some(*t)).collect();
        op.eval(&args)
    }

    fn f32s(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        Tensor::from_vec(shape, v).unwrap()
    }

    fn i64s(shape: Vec<usize>, v: Vec<i64>) -> Tensor {
        Tensor::from_vec(shape, v).unwrap()
    }

    fn s(name: &str) -> Dim {
        Dim::sym(name)
    }

    fn c(v: i64) -> Dim {
        Dim::constant(v)
    }

    fn fact(ty: &TensorType) -> InputFact<'_> {
        InputFact {
            ty,
            value: None,
            sym: None,
        }
    }

    #[test]
    fn gather_axis_and_negative_indices() {
        let op = build("Gather", Attrs::new().with("axis", Attr::Int(1)));
        let x = f32s(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let idx = i64s(vec![2], vec![-1, 0]);
        let out = run(&op, &[&x, &idx]).unwrap();
        assert_eq!(out[0].shape(), &[2, 2]);
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[3., 1., 6., 4.]);
        // embedding lookup: rows of a table by a [1, 2] index
        let emb = build("Gather", Attrs::new());
        let ids = Tensor::from_vec(vec![1, 2], vec![1i32, 0]).unwrap();
        let out = run(&emb, &[&x, &ids]).unwrap();
        assert_eq!(out[0].shape(), &[1, 2, 3]);
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[4., 5., 6., 1., 2., 3.]);
        let err = run(&op, &[&x, &i64s(vec![], vec![3])]).unwrap_err();
        assert!(err.to_string().contains("index 3"), "{err}");
        assert!(err.to_string().contains("size 3"), "{err}");
        // bool data
        let b = Tensor::from_vec(vec![3], vec![true, false, true]).unwrap();
        let out = run(&emb, &[&b, &i64s(vec![2], vec![1, 2])]).unwrap();
        assert_eq!(out[0].as_slice::<bool>().unwrap(), &[false, true]);
    }

    #[test]
    fn gather_of_shape_gives_symbols() {
        let op = build("Gather", Attrs::new());
        let sh = TensorType::new(DType::I64, vec![c(3)]);
        let content = [s("batch"), s("seq"), c(64)];
        let scalar = TensorType::new(DType::I64, vec![]);
        let one = Tensor::scalar(1i64);
        let out = op
            .infer(&[
                Some(InputFact {
                    ty: &sh,
                    value: None,
                    sym: Some(&content),
                }),
                Some(InputFact {
                    ty: &scalar,
                    value: Some(&one),
                    sym: None,
                }),
            ])
            .unwrap();
        assert_eq!(out[0].ty, TensorType::new(DType::I64, vec![]));
        assert_eq!(out[0].sym, Some(vec![s("seq")]));
        let pair_ty = TensorType::new(DType::I64, vec![c(2)]);
        let pair = i64s(vec![2], vec![0, -1]);
        let out = op
            .infer(&[
                Some(InputFact {
                    ty: &sh,
                    value: None,
                    sym: Some(&content),
                }),
                Some(InputFact {
                    ty: &pair_ty,
                    value: Some(&pair),
                    sym: None,
                }),
            ])
            .unwrap();
        assert_eq!(out[0].sym, Some(vec![s("batch"), c(64)]));
        // Out-of-range constant index is reported at inference time.
        let bad = Tensor::scalar(3i64);
        let err = op
            .infer(&[
                Some(InputFact {
                    ty: &sh,
                    value: None,
                    sym: Some(&content),
                }),
                Some(InputFact {
                    ty: &scalar,
                    value: Some(&bad),
                    sym: None,
                }),
            ])
            .unwrap_err();
        assert!(err.to_string().contains("out of bounds"), "{err}");
        // Embedding: [vocab, 64] by [batch, seq] ids.
        let table = TensorType::new(DType::F32, vec![c(100), c(64)]);
        let ids = TensorType::new(DType::I64, vec![s("batch"), s("seq")]);
        let out = op.infer(&[Some(fact(&table)), Some(fact(&ids))]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, seq, 64]");
    }

    #[test]
    fn gather_elements_and_gather_nd() {
        let ge = build("GatherElements", Attrs::new().with("axis", Attr::Int(-1)));
        let x = f32s(vec![2, 2], vec![1., 2., 3., 4.]);
        let idx = i64s(vec![2, 2], vec![0, 0, 1, -2]);
        let out = run(&ge, &[&x, &idx]).unwrap();
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[1., 1., 4., 3.]);
        assert!(run(&ge, &[&x, &i64s(vec![2, 1], vec![0, 2])]).is_err());

        let nd = build("GatherND", Attrs::new());
        let data = i64s(vec![2, 2, 2], (0..8).collect());
        let idx = i64s(vec![2, 2], vec![0, 1, 1, 0]);
        let out = run(&nd, &[&data, &idx]).unwrap();
        assert_eq!(out[0].shape(), &[2, 2]);
        assert_eq!(out[0].as_slice::<i64>().unwrap(), &[2, 3, 4, 5]);
        let idx = i64s(vec![2, 3], vec![0, 1, 1, 1, 0, -1]);
        let out = run(&nd, &[&data, &idx]).unwrap();
        assert_eq!(out[0].as_slice::<i64>().unwrap(), &[3, 5]);
        let nd1 = build("GatherND", Attrs::new().with("batch_dims", Attr::Int(1)));
        let idx = i64s(vec![2, 1], vec![1, 0]);
        let out = run(&nd1, &[&data, &idx]).unwrap();
        assert_eq!(out[0].shape(), &[2, 2]);
        assert_eq!(out[0].as_slice::<i64>().unwrap(), &[2, 3, 4, 5]);
        // Symbolic: last-token pick from [batch, seq, 64] with [batch, 2] indices.
        let dt = TensorType::new(DType::F32, vec![s("batch"), s("seq"), c(64)]);
        let it = TensorType::new(DType::I64, vec![s("batch"), c(2)]);
        let out = nd.infer(&[Some(fact(&dt)), Some(fact(&it))]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, 64]");
        let it = TensorType::new(DType::I64, vec![s("batch"), s("k")]);
        assert!(nd.infer(&[Some(fact(&dt)), Some(fact(&it))]).is_err());
    }

    #[test]
    fn scatter_nd_replaces_slices() {
        let op = build("ScatterND", Attrs::new());
        let data = f32s(vec![4], vec![1., 2., 3., 4.]);
        let idx = i64s(vec![2, 1], vec![3, -3]);
        let up = f32s(vec![2], vec![9., 10.]);
        let out = run(&op, &[&data, &idx, &up]).unwrap();
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[1., 10., 3., 9.]);
        let data = f32s(vec![2, 2], vec![0.; 4]);
        let idx = i64s(vec![1, 1], vec![1]);
        let up = f32s(vec![1, 2], vec![5., 6.]);
        let out = run(&op, &[&data, &idx, &up]).unwrap();
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[0., 0., 5., 6.]);
        let bad = f32s(vec![1, 3], vec![0.; 3]);
        assert!(run(&op, &[&data, &idx, &bad]).is_err());
        let mut r = OpRegistry::empty();
        register(&mut r);
        let attrs = Attrs::new().with("reduction", Attr::String("sum".into()));
        assert!(r.build("", "ScatterND", 18, &attrs, "n").is_err());
    }

    #[test]
    fn trilu_upper_lower_with_k() {
        let x = f32s(vec![3, 3], (1..=9).map(|v| v as f32).collect());
        let up = build("Trilu", Attrs::new());
        let out = run(&up, &[&x]).unwrap();
        assert_eq!(
            out[0].as_slice::<f32>().unwrap(),
            &[1., 2., 3., 0., 5., 6., 0., 0., 9.]
        );
        let out = run(&up, &[&x, &Tensor::scalar(1i64)]).unwrap();
        assert_eq!(
            out[0].as_slice::<f32>().unwrap(),
            &[0., 2., 3., 0., 0., 6., 0., 0., 0.]
        );
        let lo = build("Trilu", Attrs::new().with("upper", Attr::Int(0)));
        let out = run(&lo, &[&x, &Tensor::scalar(-1i64)]).unwrap();
        assert_eq!(
            out[0].as_slice::<f32>().unwrap(),
            &[0., 0., 0., 4., 0., 0., 7., 8., 0.]
        );
        // batched bool mask
        let b = Tensor::from_vec(vec![2, 2, 2], vec![true; 8]).unwrap();
        let out = run(&lo, &[&b]).unwrap();
        assert_eq!(
            out[0].as_slice::<bool>().unwrap(),
            &[true, false, true, true, true, false, true, true]
        );
    }

    #[test]
    fn cumsum_exclusive_reverse() {
        let x = f32s(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]);
        let axis = Tensor::scalar(-1i64);
        let op = build("CumSum", Attrs::new());
        let out = run(&op, &[&x, &axis]).unwrap();
        assert_eq!(
            out[0].as_slice::<f32>().unwrap(),
            &[1., 3., 6., 4., 9., 15.]
        );
        let ex = build("CumSum", Attrs::new().with("exclusive", Attr::Int(1)));
        let out = run(&ex, &[&x, &Tensor::scalar(0i32)]).unwrap();
        assert_eq!(out[0].as_slice::<f32>().unwrap(), &[0., 0., 0., 1., 2., 3.]);
        let rev = build(
            "CumSum",
            Attrs::new()
                .with("reverse", Attr::Int(1))
                .with("exclusive", Attr::Int(1)),
        );
        let ints = i64s(vec![4], vec![1, 1, 1, 1]);
        let out = run(&rev, &[&ints, &Tensor::scalar(0i64)]).unwrap();
        assert_eq!(out[0].as_slice::<i64>().unwrap(), &[3, 2, 1, 0]);
        assert!(run(&op, &[&x, &Tensor::scalar(2i64)]).is_err());
    }

    #[test]
    fn argmax_keepdims_and_last_index() {
        let x = f32s(vec![2, 3], vec![1., 5., 5., 7., 0., 7.]);
        let op = build("ArgMax", Attrs::new().with("axis", Attr::Int(1)));
        let out = run(&op, &[&x]).unwrap();
        assert_eq!(out[0].shape(), &[2, 1]);
        assert_eq!(out[0].as_slice::<i64>().unwrap(), &[1, 0]);
        let last = build(
            "ArgMax",
            Attrs::new()
                .with("axis", Attr::Int(-1))
                .with("keepdims", Attr::Int(0))
                .with("select_last_index", Attr::Int(1)),
        );
        let out = run(&last, &[&x]).unwrap();
        assert_eq!(out[0].shape(), &[2]);
        assert_eq!(out[0].as_slice::<i64>().unwrap(), &[2, 2]);
        let op0 = build("ArgMax", Attrs::new());
        let out = run(&op0, &[&x]).unwrap();
        assert_eq!(out[0].as_slice::<i64>().unwrap(), &[1, 0, 1]);
        let t = TensorType::new(DType::F32, vec![s("batch"), s("seq"), c(100)]);
        let out = last.infer(&[Some(fact(&t))]).unwrap();
        assert_eq!(
            out[0].ty,
            TensorType::new(DType::I64, vec![s("batch"), s("seq")])
        );
        let nan = f32s(vec![3], vec![1., f32::NAN, 2.]);
        assert_eq!(
            run(&op0, &[&nan]).unwrap()[0].as_slice::<i64>().unwrap(),
            &[1]
        );
    }
}
