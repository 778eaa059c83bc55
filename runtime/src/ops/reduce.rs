//! Reductions (`ReduceSum`, `ReduceMean`, `ReduceMax`, …) and `Softmax` / `LogSoftmax`.
//!
//! Reductions take their axes from an attribute before opset 18 (13 for `ReduceSum`) and from
//! an optional second input after; an empty axes list reduces every axis unless
//! `noop_with_empty_axes` is set, in which case the op is the identity. Floats accumulate in
//! f64, integers in wrapping i64. Edge cases follow ONNX Runtime: an empty reduction gives
//! 0 for sums and means, 1 for products, -inf / +inf for max / min; NaN propagates through
//! max and min (like numpy and the elementwise `Max`).

use std::sync::Arc;

use half::{bf16, f16};
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn};

use super::{
    arity, for_each_row, norm_axis, opt, req, InputFact, Op, OpError, OpRegistry, OutputFact,
};
use crate::dim::{Dim, Shape};
use crate::dtype::DType;
use crate::ir::{Attrs, TensorType};
use crate::tensor::{Element, Tensor};

pub fn register(r: &mut OpRegistry) {
    macro_rules! reductions {
        ($($name:literal => $kind:ident),* $(,)?) => {
            $(r.register("", $name, 13, |attrs, opset| {
                Ok(Arc::new(Reduce::build(Reduction::$kind, attrs, opset)?) as Arc<dyn Op>)
            });)*
        };
    }
    reductions!(
        "ReduceSum" => Sum,
        "ReduceMean" => Mean,
        "ReduceMax" => Max,
        "ReduceMin" => Min,
        "ReduceProd" => Prod,
        "ReduceL1" => L1,
        "ReduceL2" => L2,
        "ReduceSumSquare" => SumSquare,
        "ReduceLogSum" => LogSum,
        "ReduceLogSumExp" => LogSumExp,
    );
    r.register("", "Softmax", 13, |attrs, _| {
        Ok(Arc::new(Softmax {
            axis: attrs.int_or("axis", -1)?,
            log: false,
        }))
    });
    r.register("", "LogSoftmax", 13, |attrs, _| {
        Ok(Arc::new(Softmax {
            axis: attrs.int_or("axis", -1)?,
            log: true,
        }))
    });
}

fn tensor_err(e: crate::RuntimeError) -> OpError {
    OpError::Invalid(e.to_string())
}

/// What a reduction computes over each group of elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    SumSquare,
    LogSum,
    LogSumExp,
}

impl Reduction {
    pub fn op_type(self) -> &'static str {
        match self {
            Reduction::Sum => "ReduceSum",
            Reduction::Mean => "ReduceMean",
            Reduction::Max => "ReduceMax",
            Reduction::Min => "ReduceMin",
            Reduction::Prod => "ReduceProd",
            Reduction::L1 => "ReduceL1",
            Reduction::L2 => "ReduceL2",
            Reduction::SumSquare => "ReduceSumSquare",
            Reduction::LogSum => "ReduceLogSum",
            Reduction::LogSumExp => "ReduceLogSumExp",
        }
    }

    /// Reduces one group of floats (accumulated in f64).
    fn on_f64(self, v: &[f64]) -> f64 {
        let sum = |v: &[f64]| v.iter().sum::<f64>();
        let max = |v: &[f64]| {
            v.iter().fold(f64::NEG_INFINITY, |a, &x| {
                if a.is_nan() || x.is_nan() {
                    f64::NAN
                } else {
                    a.max(x)
                }
            })
        };
        match self {
            Reduction::Sum => sum(v),
            Reduction::Mean => {
                if v.is_empty() {
                    0.0
                } else {
                    sum(v) / v.len() as f64
                }
            }
            Reduction::Max => max(v),
            Reduction::Min => v.iter().fold(f64::INFINITY, |a, &x| {
                if a.is_nan() || x.is_nan() {
                    f64::NAN
                } else {
                    a.min(x)
                }
            }),
            Reduction::Prod => v.iter().product(),
            Reduction::L1 => v.iter().map(|x| x.abs()).sum(),
            Reduction::L2 => v.iter().map(|x| x * x).sum::<f64>().sqrt(),
            Reduction::SumSquare => v.iter().map(|x| x * x).sum(),
            Reduction::LogSum => sum(v).ln(),
            Reduction::LogSumExp => {
                let m = max(v);
                if m.is_infinite() {
                    // All -inf gives ln(0) = -inf; any +inf gives +inf.
                    m
                } else {
                    m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
                }
            }
        }
    }

    /// Reduces one group of integers with wrapping arithmetic; `(lo, hi)` are the bounds of
    /// the element type (the results of an empty max and min).
    fn on_i64(self, v: &[i64], (lo, hi): (i64, i64)) -> i64 {
        let sum = |v: &[i64]| v.iter().fold(0i64, |a, &x| a.wrapping_add(x));
        let sum_sq = |v: &[i64]| {
            v.iter()
                .fold(0i64, |a, &x| a.wrapping_add(x.wrapping_mul(x)))
        };
        match self {
            Reduction::Sum => sum(v),
            Reduction::Mean => {
                if v.is_empty() {
                    0
                } else {
                    sum(v).wrapping_div(v.len() as i64)
                }
            }
            Reduction::Max => v.iter().copied().max().unwrap_or(lo),
            Reduction::Min => v.iter().copied().min().unwrap_or(hi),
            Reduction::Prod => v.iter().fold(1i64, |a, &x| a.wrapping_mul(x)),
            Reduction::L1 => v
                .iter()
                .fold(0i64, |a, &x| a.wrapping_add(x.wrapping_abs())),
            Reduction::SumSquare => sum_sq(v),
            Reduction::L2 => (sum_sq(v) as f64).sqrt() as i64,
            Reduction::LogSum => (sum(v) as f64).ln() as i64,
            Reduction::LogSumExp => {
                let f: Vec<f64> = v.iter().map(|&x| x as f64).collect();
                Reduction::LogSumExp.on_f64(&f) as i64
            }
        }
    }

    /// The reduction of a vector of symbolic sizes, where it can be decided.
    fn on_dims(self, v: &[Dim]) -> Option<Dim> {
        match self {
            Reduction::Sum => Some(v.iter().cloned().fold(Dim::constant(0), |a, b| a + b)),
            Reduction::Prod => Some(v.iter().cloned().fold(Dim::constant(1), |a, b| a * b)),
            Reduction::Min => {
                let (first, rest) = v.split_first()?;
                rest.iter().try_fold(first.clone(), |a, b| a.try_min(b))
            }
            Reduction::Max => {
                let (first, rest) = v.split_first()?;
                rest.iter().try_fold(first.clone(), |a, b| {
                    let m = a.try_min(b)?;
                    Some(if m == a { b.clone() } else { a })
                })
            }
            _ => None,
        }
    }
}

/// Where a reduction's axes come from.
#[derive(Clone, Debug, PartialEq)]
enum AxesFrom {
    /// The `axes` attribute (before opset 18; 13 for `ReduceSum`); `None` when absent.
    Attr(Option<Vec<i64>>),
    /// The optional second input.
    Input,
}

#[derive(Debug)]
pub struct Reduce {
    kind: Reduction,
    keepdims: bool,
    noop_with_empty_axes: bool,
    axes: AxesFrom,
}

impl Reduce {
    /// Builds a reduction from its attributes at the given opset.
    pub fn build(kind: Reduction, attrs: &Attrs, opset: i64) -> Result<Reduce, OpError> {
        let axes_input = opset >= 18 || (kind == Reduction::Sum && opset >= 13);
        let axes = if axes_input {
            if attrs.get("axes").is_some() {
                return Err(OpError::BadAttr {
                    name: "axes".into(),
                    msg: format!(
                        "{} at opset {opset} takes axes as its second input, not an attribute",
                        kind.op_type()
                    ),
                });
            }
            AxesFrom::Input
        } else {
            AxesFrom::Attr(attrs.ints("axes")?.map(|a| a.to_vec()))
        };
        Ok(Reduce {
            kind,
            keepdims: attrs.int_or("keepdims", 1)? != 0,
            noop_with_empty_axes: attrs.int_or("noop_with_empty_axes", 0)? != 0,
            axes,
        })
    }

    fn check_arity<T>(&self, inputs: &[Option<T>]) -> Result<(), OpError> {
        match self.axes {
            AxesFrom::Attr(_) => arity(inputs, 1, 1),
            AxesFrom::Input => arity(inputs, 1, 2),
        }
    }

    fn check_dtype(&self, d: DType) -> Result<(), OpError> {
        match d {
            DType::Bool | DType::U64 => Err(OpError::DType {
                index: 0,
                got: d,
                expected: format!(
                    "{} supports float and integer types other than u64",
                    self.kind.op_type()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Which axes of a rank-`rank` input are reduced, from the axes list (`None` when the
    /// axes input is omitted); `None` when the op is the identity.
    fn reduced_mask(
        &self,
        rank: usize,
        axes: Option<&[i64]>,
    ) -> Result<Option<Vec<bool>>, OpError> {
        let axes = match &self.axes {
            AxesFrom::Attr(a) => a.as_deref(),
            AxesFrom::Input => axes,
        };
        let axes = axes.unwrap_or(&[]);
        if axes.is_empty() {
            if self.noop_with_empty_axes {
                return Ok(None);
            }
            return Ok(Some(vec![true; rank]));
        }
        let mut mask = vec![false; rank];
        for &a in axes {
            let i = norm_axis(a, rank)?;
            if mask[i] {
                return Err(OpError::Invalid(format!(
                    "{}: axis {a} is repeated in axes {axes:?}",
                    self.kind.op_type()
                )));
            }
            mask[i] = true;
        }
        Ok(Some(mask))
    }

    /// The output shape for an input shape and a reduced-axes mask.
    fn out_shape<D: Clone>(&self, shape: &[D], mask: &[bool], one: D) -> Vec<D> {
        shape
            .iter()
            .zip(mask)
            .filter_map(|(d, &r)| match (r, self.keepdims) {
                (false, _) => Some(d.clone()),
                (true, true) => Some(one.clone()),
                (true, false) => None,
            })
            .collect()
    }

    /// Evaluates on a tensor with concrete axes.
    pub fn reduce(&self, x: &Tensor, axes: Option<&[i64]>) -> Result<Tensor, OpError> {
        self.check_dtype(x.dtype())?;
        let Some(mask) = self.reduced_mask(x.rank(), axes)? else {
            return Ok(x.clone());
        };
        let shape = self.out_shape(x.shape(), &mask, 1);
        let kind = self.kind;
        macro_rules! floats {
            ($t:ty, $to:expr, $from:expr) => {{
                let v = reduce_groups(x.view::<$t>().map_err(tensor_err)?, &mask, $to, |g| {
                    kind.on_f64(g)
                });
                Tensor::from_vec(shape, v.into_iter().map($from).collect::<Vec<$t>>())
            }};
        }
        macro_rules! ints {
            ($t:ty) => {{
                let bounds = (<$t>::MIN as i64, <$t>::MAX as i64);
                let v = reduce_groups(
                    x.view::<$t>().map_err(tensor_err)?,
                    &mask,
                    |v| v as i64,
                    |g| kind.on_i64(g, bounds),
                );
                Tensor::from_vec(shape, v.into_iter().map(|v| v as $t).collect::<Vec<$t>>())
            }};
        }
        let out = match x.dtype() {
            DType::F32 => floats!(f32, |v| v as f64, |v| v as f32),
            DType::F64 => floats!(f64, |v| v, |v| v),
            DType::F16 => floats!(f16, |v: f16| v.to_f64(), f16::from_f64),
            DType::BF16 => floats!(bf16, |v: bf16| v.to_f64(), bf16::from_f64),
            DType::I64 => ints!(i64),
            DType::I32 => ints!(i32),
            DType::I16 => ints!(i16),
            DType::I8 => ints!(i8),
            DType::U8 => ints!(u8),
            DType::U16 => ints!(u16),
            DType::U32 => ints!(u32),
            d => {
                return Err(OpError::DType {
                    index: 0,
                    got: d,
                    expected: format!("a type {} supports", self.kind.op_type()),
                })
            }
        };
        out.map_err(tensor_err)
    }
}

/// Reduces `x` over the axes flagged in `mask`: the kept axes are moved first, so that each
/// output element is one contiguous run of the permuted view's iteration order.
fn reduce_groups<T: Element, A: Copy>(
    x: ArrayViewD<'_, T>,
    mask: &[bool],
    to: impl Fn(T) -> A,
    f: impl Fn(&[A]) -> A,
) -> Vec<A> {
    let shape = x.shape().to_vec();
    let rank = shape.len();
    let mut order: Vec<usize> = (0..rank).filter(|&i| !mask[i]).collect();
    order.extend((0..rank).filter(|&i| mask[i]));
    let group: usize = (0..rank).filter(|&i| mask[i]).map(|i| shape[i]).product();
    let outputs: usize = (0..rank).filter(|&i| !mask[i]).map(|i| shape[i]).product();
    if group == 0 {
        return (0..outputs).map(|_| f(&[])).collect();
    }
    let p = x.permuted_axes(IxDyn(&order));
    let mut out = Vec::with_capacity(outputs);
    let mut buf = Vec::with_capacity(group);
    for &v in p.iter() {
        buf.push(to(v));
        if buf.len() == group {
            out.push(f(&buf));
            buf.clear();
        }
    }
    out
}

/// Concrete axes from the optional axes input fact: its value, else its symbolic content.
fn axes_of_fact(f: Option<InputFact<'_>>) -> Result<Option<Vec<i64>>, OpError> {
    let Some(f) = f else { return Ok(None) };
    if !f.ty.dtype.is_int() {
        return Err(OpError::DType {
            index: 1,
            got: f.ty.dtype,
            expected: "i64 axes".into(),
        });
    }
    if let Some(v) = f.value {
        return v.to_i64_vec().map(Some).map_err(tensor_err);
    }
    if let Some(s) = f.sym {
        if let Some(v) = s.iter().map(|d| d.as_const()).collect::<Option<Vec<i64>>>() {
            return Ok(Some(v));
        }
    }
    Err(OpError::NotConstant(1))
}

impl Op for Reduce {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        self.check_arity(inputs)?;
        let x = req(inputs, 0)?;
        self.check_dtype(x.ty.dtype)?;
        let axes = match self.axes {
            AxesFrom::Attr(_) => None,
            AxesFrom::Input => axes_of_fact(opt(inputs, 1))?,
        };
        let Some(mask) = self.reduced_mask(x.ty.rank(), axes.as_deref())? else {
            return Ok(vec![OutputFact {
                ty: x.ty.clone(),
                sym: x.sym.map(|s| s.to_vec()),
            }]);
        };
        let shape: Shape = self.out_shape(&x.ty.shape, &mask, Dim::constant(1));
        let ty = TensorType::new(x.ty.dtype, shape);
        // Symbolic content: a 1-D size vector reduced to one size (e.g. ReduceProd(Shape)).
        if let (Some(s), true) = (x.sym, x.ty.rank() == 1 && mask[0]) {
            if let Some(d) = self.kind.on_dims(s) {
                return Ok(vec![OutputFact::with_sym(ty, vec![d])]);
            }
        }
        Ok(vec![OutputFact::new(ty)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        self.check_arity(inputs)?;
        let x = req(inputs, 0)?;
        let axes = match (&self.axes, opt(inputs, 1)) {
            (AxesFrom::Input, Some(a)) => Some(a.to_i64_vec().map_err(tensor_err)?),
            _ => None,
        };
        Ok(vec![self.reduce(x, axes.as_deref())?])
    }
}

/// `Softmax` / `LogSoftmax` (opset 13: normalized along one axis, default -1).
#[derive(Debug)]
pub struct Softmax {
    pub axis: i64,
    pub log: bool,
}

impl Softmax {
    fn op_type(&self) -> &'static str {
        if self.log {
            "LogSoftmax"
        } else {
            "Softmax"
        }
    }

    fn check_dtype(&self, d: DType) -> Result<(), OpError> {
        if d.is_float() {
            Ok(())
        } else {
            Err(OpError::DType {
                index: 0,
                got: d,
                expected: format!("a float type for {}", self.op_type()),
            })
        }
    }

    /// Evaluates on one tensor.
    pub fn softmax(&self, x: &Tensor) -> Result<Tensor, OpError> {
        self.check_dtype(x.dtype())?;
        let axis_index = norm_axis(self.axis, x.rank())?;
        if x.dtype() == DType::F32 && !self.log && axis_index + 1 == x.rank() {
            return softmax_rows_f32(x);
        }
        let axis = Axis(axis_index);
        let log = self.log;
        fn run<T: Element>(
            x: &Tensor,
            axis: Axis,
            log: bool,
            to: impl Fn(T) -> f64,
            from: impl Fn(f64) -> T,
        ) -> Result<Tensor, OpError> {
            let mut w: ArrayD<f64> = x.view::<T>().map_err(tensor_err)?.mapv(to);
            for lane in w.lanes_mut(axis) {
                softmax_lane(lane, log);
            }
            Ok(Tensor::from_array(w.mapv(from)))
        }
        match x.dtype() {
            DType::F32 => run::<f32>(x, axis, log, |v| v as f64, |v| v as f32),
            DType::F64 => run::<f64>(x, axis, log, |v| v, |v| v),
            DType::F16 => run::<f16>(x, axis, log, |v| v.to_f64(), f16::from_f64),
            DType::BF16 => run::<bf16>(x, axis, log, |v| v.to_f64(), bf16::from_f64),
            d => Err(OpError::DType {
                index: 0,
                got: d,
                expected: format!("a float type for {}", self.op_type()),
            }),
        }
    }
}

/// Softmax over the contiguous last axis of an f32 tensor, rows split over the kernels'
/// thread pool: one `exp` per element (in f32, of `x - max`), the sum accumulated in f64.
/// Matches the f64 lane path to a few ulps of f32.
fn softmax_rows_f32(x: &Tensor) -> Result<Tensor, OpError> {
    let src = x.as_slice::<f32>().map_err(tensor_err)?;
    let width = *x.shape().last().expect("rank ≥ 1");
    let mut out = vec![0f32; src.len()];
    if width == 0 || src.is_empty() {
        return Tensor::from_vec(x.shape().to_vec(), out).map_err(tensor_err);
    }
    for_each_row(&mut out, width, &|r, o| {
        let inp = &src[r * width..(r + 1) * width];
        let m = inp.iter().fold(f32::NEG_INFINITY, |a, &v| {
            if a.is_nan() || v.is_nan() {
                f32::NAN
            } else {
                a.max(v)
            }
        });
        let mut sum = 0f64;
        for (d, &v) in o.iter_mut().zip(inp) {
            let e = (v - m).exp();
            *d = e;
            sum += e as f64;
        }
        let inv = (1.0 / sum) as f32;
        for d in o.iter_mut() {
            *d *= inv;
        }
    });
    Tensor::from_vec(x.shape().to_vec(), out).map_err(tensor_err)
}

/// Numerically stable softmax of one lane in place: `exp(x - max) / sum`, or its log
/// `x - max - ln(sum)`. A lane that is all -inf has max -inf and gives NaN, like ONNX Runtime.
fn softmax_lane(mut lane: ndarray::ArrayViewMut1<'_, f64>, log: bool) {
    let m = lane.iter().fold(f64::NEG_INFINITY, |a, &x| {
        if a.is_nan() || x.is_nan() {
            f64::NAN
        } else {
            a.max(x)
        }
    });
    let sum: f64 = lane.iter().map(|&x| (x - m).exp()).sum();
    if log {
        let ls = sum.ln();
        lane.mapv_inplace(|x| x - m - ls);
    } else {
        lane.mapv_inplace(|x| (x - m).exp() / sum);
    }
}

impl Op for Softmax {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let x = req(inputs, 0)?;
        self.check_dtype(x.ty.dtype)?;
        norm_axis(self.axis, x.ty.rank())?;
        Ok(vec![OutputFact::new(x.ty.clone())])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 1)?;
        Ok(vec![self.softmax(req(inputs, 0)?)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dim::shape_to_string;
    use crate::ir::Attr;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn build(kind: Reduction, attrs: Attrs, opset: i64) -> Reduce {
        Reduce::build(kind, &attrs, opset).unwrap()
    }

    fn keep(v: i64) -> Attrs {
        Attrs::new().with("keepdims", Attr::Int(v))
    }

    fn fact(ty: &TensorType) -> InputFact<'_> {
        InputFact {
            ty,
            value: None,
            sym: None,
        }
    }

    fn bsh() -> TensorType {
        TensorType::new(
            DType::F32,
            vec![Dim::sym("batch"), Dim::sym("seq"), Dim::constant(768)],
        )
    }

    #[test]
    fn reduce_mean_infers_symbolic_shapes_from_attr_and_input() {
        let x = bsh();
        // Opset 17: axes attribute.
        let op = build(
            Reduction::Mean,
            Attrs::new().with("axes", Attr::Ints(vec![-1])),
            17,
        );
        let out = op.infer(&[Some(fact(&x))]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, seq, 1]");
        assert_eq!(out[0].ty.dtype, DType::F32);
        let op = build(
            Reduction::Mean,
            keep(0).with("axes", Attr::Ints(vec![-1, 0])),
            17,
        );
        let out = op.infer(&[Some(fact(&x))]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[seq]");
        // Opset 18: axes input, constant.
        let axes = Tensor::from_vec(vec![1], vec![-1i64]).unwrap();
        let aty = TensorType::new(DType::I64, vec![Dim::constant(1)]);
        let afact = InputFact {
            ty: &aty,
            value: Some(&axes),
            sym: None,
        };
        let op = build(Reduction::Mean, Attrs::new(), 18);
        let out = op.infer(&[Some(fact(&x)), Some(afact)]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, seq, 1]");
        // Symbolic content of the axes works as well as a value.
        let sym = [Dim::constant(1)];
        let sfact = InputFact {
            ty: &aty,
            value: None,
            sym: Some(&sym),
        };
        let op = build(Reduction::Mean, keep(0), 18);
        let out = op.infer(&[Some(fact(&x)), Some(sfact)]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, 768]");
        // Unknown axes cannot be inferred.
        assert_eq!(
            op.infer(&[Some(fact(&x)), Some(fact(&aty))]),
            Err(OpError::NotConstant(1))
        );
        // No axes: all axes, or the identity with noop_with_empty_axes.
        let out = op.infer(&[Some(fact(&x))]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[]");
        let noop = build(
            Reduction::Mean,
            Attrs::new().with("noop_with_empty_axes", Attr::Int(1)),
            18,
        );
        let out = noop.infer(&[Some(fact(&x))]).unwrap();
        assert_eq!(out[0].ty, x);
        // ReduceSum takes an axes input from opset 13.
        let sum = build(Reduction::Sum, Attrs::new(), 13);
        let out = sum.infer(&[Some(fact(&x)), Some(afact)]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[batch, seq, 1]");
        assert!(Reduce::build(
            Reduction::Sum,
            &Attrs::new().with("axes", Attr::Ints(vec![0])),
            13
        )
        .is_err());
        // Bad axes and dtypes.
        let bad = build(
            Reduction::Max,
            Attrs::new().with("axes", Attr::Ints(vec![3])),
            13,
        );
        assert!(bad.infer(&[Some(fact(&x))]).is_err());
        let dup = build(
            Reduction::Max,
            Attrs::new().with("axes", Attr::Ints(vec![2, -1])),
            13,
        );
        assert!(dup.infer(&[Some(fact(&x))]).is_err());
        let b = TensorType::new(DType::Bool, vec![Dim::constant(2)]);
        let err = op.infer(&[Some(fact(&b))]).unwrap_err();
        assert!(err.to_string().contains("ReduceMean"), "{err}");
    }

    #[test]
    fn reduce_prod_of_a_shape_keeps_symbolic_content() {
        let ty = TensorType::new(DType::I64, vec![Dim::constant(3)]);
        let s = [Dim::sym("batch"), Dim::sym("seq"), Dim::constant(64)];
        let f = InputFact {
            ty: &ty,
            value: None,
            sym: Some(&s),
        };
        let op = build(Reduction::Prod, keep(0), 13);
        let out = op.infer(&[Some(f)]).unwrap();
        assert_eq!(out[0].ty.rank(), 0);
        assert_eq!(
            out[0].sym.as_deref(),
            Some(&[Dim::sym("batch") * Dim::sym("seq") * Dim::constant(64)][..])
        );
        let op = build(Reduction::Sum, keep(1), 13);
        let out = op.infer(&[Some(f)]).unwrap();
        assert_eq!(shape_to_string(&out[0].ty.shape), "[1]");
        assert_eq!(
            out[0].sym.as_deref(),
            Some(&[Dim::sym("batch") + Dim::sym("seq") + Dim::constant(64)][..])
        );
        let op = build(Reduction::Max, keep(0), 17);
        let out = op.infer(&[Some(f)]).unwrap();
        assert_eq!(out[0].sym, None);
    }

    /// Independent reduction by explicit index arithmetic over every input element.
    fn naive(
        kind: Reduction,
        shape: &[usize],
        v: &[f64],
        axes: &[usize],
        keepdims: bool,
    ) -> (Vec<usize>, Vec<f64>) {
        let rank = shape.len();
        let out_full: Vec<usize> = (0..rank)
            .map(|i| if axes.contains(&i) { 1 } else { shape[i] })
            .collect();
        let n_out: usize = out_full.iter().product();
        let mut groups: Vec<Vec<f64>> = vec![Vec::new(); n_out];
        for (flat, &x) in v.iter().enumerate() {
            let mut r = flat;
            let mut idx = vec![0; rank];
            for d in (0..rank).rev() {
                idx[d] = r % shape[d];
                r /= shape[d];
            }
            let mut o = 0;
            for d in 0..rank {
                o = o * out_full[d] + if axes.contains(&d) { 0 } else { idx[d] };
            }
            groups[o].push(x);
        }
        let vals = groups
            .iter()
            .map(|g| match kind {
                Reduction::Sum => g.iter().sum(),
                Reduction::Mean => g.iter().sum::<f64>() / g.len() as f64,
                Reduction::Max => g.iter().cloned().fold(f64::MIN, f64::max),
                Reduction::Min => g.iter().cloned().fold(f64::MAX, f64::min),
                Reduction::Prod => g.iter().product(),
                Reduction::L1 => g.iter().map(|x| x.abs()).sum(),
                Reduction::L2 => g.iter().map(|x| x * x).sum::<f64>().sqrt(),
                Reduction::SumSquare => g.iter().map(|x| x * x).sum(),
                Reduction::LogSum => g.iter().sum::<f64>().ln(),
                Reduction::LogSumExp => g.iter().map(|x| x.exp()).sum::<f64>().ln(),
            })
            .collect();
        let shape = if keepdims {
            out_full
        } else {
            (0..rank)
                .filter(|i| !axes.contains(i))
                .map(|i| shape[i])
                .collect()
        };
        (shape, vals)
    }

    #[test]
    fn reductions_match_naive_on_ragged_shapes_and_axes() {
        let mut rng = StdRng::seed_from_u64(5);
        let kinds = [
            Reduction::Sum,
            Reduction::Mean,
            Reduction::Max,
            Reduction::Min,
            Reduction::Prod,
            Reduction::L1,
            Reduction::L2,
            Reduction::SumSquare,
            Reduction::LogSum,
            Reduction::LogSumExp,
        ];
        let cases: &[(&[usize], &[i64])] = &[
            (&[3, 5, 7], &[-1]),
            (&[3, 5, 7], &[0]),
            (&[3, 5, 7], &[1]),
            (&[3, 5, 7], &[0, 2]),
            (&[2, 3, 4, 5], &[1, 3]),
            (&[2, 3, 4, 5], &[3, 0, 2]),
            (&[1, 9], &[0]),
            (&[6], &[0]),
            (&[4, 1, 3], &[]),
        ];
        for &(shape, axes) in cases {
            let n: usize = shape.iter().product();
            // Positive values so that LogSum is defined.
            let v: Vec<f32> = (0..n).map(|_| rng.gen_range(0.1f32..2.0)).collect();
            let x = Tensor::from_vec(shape.to_vec(), v.clone()).unwrap();
            let vf: Vec<f64> = v.iter().map(|&x| x as f64).collect();
            let rank = shape.len();
            let all: Vec<usize> = (0..rank).collect();
            let ax: Vec<usize> = if axes.is_empty() {
                all
            } else {
                axes.iter().map(|&a| norm_axis(a, rank).unwrap()).collect()
            };
            for kind in kinds {
                for keepdims in [true, false] {
                    let op = build(
                        kind,
                        keep(keepdims as i64).with("axes", Attr::Ints(axes.to_vec())),
                        12,
                    );
                    let y = op.eval(&[Some(&x)]).unwrap().remove(0);
                    let (ws, wv) = naive(kind, shape, &vf, &ax, keepdims);
                    assert_eq!(y.shape(), &ws[..], "{kind:?} {shape:?} {axes:?}");
                    // The opset-18 form with an axes input agrees.
                    let op18 = build(kind, keep(keepdims as i64), 18);
                    let at = Tensor::from_vec(vec![axes.len()], axes.to_vec()).unwrap();
                    let y18 = op18.eval(&[Some(&x), Some(&at)]).unwrap().remove(0);
                    assert_eq!(y18.shape(), y.shape());
                    for (i, (g, w)) in y.as_slice::<f32>().unwrap().iter().zip(&wv).enumerate() {
                        let w = *w as f32;
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{kind:?} {shape:?} axes {axes:?} element {i}: {g} vs {w}"
                        );
                        assert_eq!(*g, y18.as_slice::<f32>().unwrap()[i]);
                    }
                }
            }
        }
    }

    #[test]
    fn reduce_edge_cases_follow_onnx_runtime() {
        let x = Tensor::from_vec(vec![2, 3], (0..6).map(|v| v as f32).collect()).unwrap();
        let empty_axes = Tensor::from_vec(vec![0], Vec::<i64>::new()).unwrap();
        // noop_with_empty_axes: identity with empty or omitted axes.
        let noop = build(
            Reduction::Mean,
            Attrs::new().with("noop_with_empty_axes", Attr::Int(1)),
            18,
        );
        for y in [
            noop.eval(&[Some(&x), Some(&empty_axes)]).unwrap(),
            noop.eval(&[Some(&x), None]).unwrap(),
            noop.eval(&[Some(&x)]).unwrap(),
        ] {
            assert_eq!(y[0].shape(), &[2, 3]);
            assert_eq!(
                y[0].as_slice::<f32>().unwrap(),
                x.as_slice::<f32>().unwrap()
            );
        }
        // Without it, empty axes reduce everything.
        let all = build(Reduction::Mean, Attrs::new(), 18);
        let y = all.eval(&[Some(&x), Some(&empty_axes)]).unwrap();
        assert_eq!(y[0].shape(), &[1, 1]);
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[2.5]);
        let y = build(Reduction::Mean, keep(0), 18)
            .eval(&[Some(&x)])
            .unwrap();
        assert_eq!(y[0].shape(), &[] as &[usize]);
        // Reductions over an empty axis.
        let e = Tensor::zeros(DType::F32, vec![2, 0]);
        let ax = Tensor::from_vec(vec![1], vec![1i64]).unwrap();
        for (kind, want) in [
            (Reduction::Max, f32::NEG_INFINITY),
            (Reduction::Min, f32::INFINITY),
            (Reduction::Sum, 0.0),
            (Reduction::Prod, 1.0),
            (Reduction::Mean, 0.0),
            (Reduction::L2, 0.0),
            (Reduction::SumSquare, 0.0),
        ] {
            let y = build(kind, keep(0), 18)
                .eval(&[Some(&e), Some(&ax)])
                .unwrap();
            assert_eq!(y[0].as_slice::<f32>().unwrap(), &[want, want], "{kind:?}");
        }
        // NaN propagates through max.
        let n = Tensor::from_vec(vec![2, 2], vec![1f32, f32::NAN, 3., 2.]).unwrap();
        let y = build(Reduction::Max, keep(0), 18)
            .eval(&[Some(&n), Some(&ax)])
            .unwrap();
        let y = y[0].as_slice::<f32>().unwrap();
        assert!(y[0].is_nan() && y[1] == 3.0, "{y:?}");
        // Bad axes at eval.
        let far = Tensor::from_vec(vec![1], vec![2i64]).unwrap();
        assert!(all.eval(&[Some(&x), Some(&far)]).is_err());
    }

    #[test]
    fn integer_and_half_reductions() {
        let x = Tensor::from_vec(vec![2, 3], vec![1i64, -2, 3, 4, 5, -6]).unwrap();
        let op = |k| build(k, keep(0).with("axes", Attr::Ints(vec![1])), 12);
        assert_eq!(
            op(Reduction::Sum).eval(&[Some(&x)]).unwrap()[0]
                .as_slice::<i64>()
                .unwrap(),
            &[2, 3]
        );
        assert_eq!(
            op(Reduction::Max).eval(&[Some(&x)]).unwrap()[0]
                .as_slice::<i64>()
                .unwrap(),
            &[3, 5]
        );
        assert_eq!(
            op(Reduction::Prod).eval(&[Some(&x)]).unwrap()[0]
                .as_slice::<i64>()
                .unwrap(),
            &[-6, -120]
        );
        assert_eq!(
            op(Reduction::Mean).eval(&[Some(&x)]).unwrap()[0]
                .as_slice::<i64>()
                .unwrap(),
            &[0, 1]
        );
        let x32 = Tensor::from_vec(vec![3], vec![i32::MAX, 1, 0]).unwrap();
        let y = op(Reduction::Min)
            .eval(&[Some(&Tensor::zeros(DType::I32, vec![2, 0]))])
            .unwrap();
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[i32::MAX, i32::MAX]);
        let all = build(Reduction::Sum, keep(0), 13);
        // Wrapping, not panicking.
        assert_eq!(
            all.eval(&[Some(&x32)]).unwrap()[0]
                .as_slice::<i32>()
                .unwrap(),
            &[i32::MIN]
        );
        let h =
            Tensor::from_vec(vec![4], [1.0, 2.0, 3.0, 4.5].map(f16::from_f64).to_vec()).unwrap();
        let y = build(Reduction::Mean, keep(1), 18)
            .eval(&[Some(&h)])
            .unwrap();
        assert_eq!(y[0].dtype(), DType::F16);
        assert_eq!(y[0].to_f64_vec().unwrap(), vec![2.625]);
        let b = Tensor::from_vec(vec![2], vec![true, false]).unwrap();
        assert!(matches!(
            all.eval(&[Some(&b)]),
            Err(OpError::DType {
                got: DType::Bool,
                ..
            })
        ));
    }

    #[test]
    fn reductions_through_the_registry() {
        let mut r = OpRegistry::empty();
        register(&mut r);
        let x = Tensor::from_vec(vec![2, 2], vec![1f32, 2., 3., 4.]).unwrap();
        let attrs = Attrs::new().with("axes", Attr::Ints(vec![0]));
        let op = r.build("", "ReduceSumSquare", 17, &attrs, "n").unwrap();
        let y = op.eval(&[Some(&x)]).unwrap();
        assert_eq!(y[0].shape(), &[1, 2]);
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[10., 20.]);
        let op = r.build("", "ReduceL2", 18, &Attrs::new(), "n").unwrap();
        let ax = Tensor::from_vec(vec![1], vec![1i64]).unwrap();
        let y = op.eval(&[Some(&x), Some(&ax)]).unwrap();
        let got = y[0].as_slice::<f32>().unwrap();
        assert!((got[0] - 5f32.sqrt()).abs() < 1e-6 && (got[1] - 5.0).abs() < 1e-6);
        // At opset 18 an axes attribute is a clear error.
        let err = r.build("", "ReduceMean", 18, &attrs, "n").unwrap_err();
        assert!(err.to_string().contains("second input"), "{err}");
        assert!(r.build("", "Softmax", 11, &Attrs::new(), "n").is_err());
    }

    fn softmax(x: &Tensor, axis: i64, log: bool) -> Tensor {
        Softmax { axis, log }.eval(&[Some(x)]).unwrap().remove(0)
    }

    #[test]
    fn softmax_matches_hand_values_and_masking() {
        let ninf = f32::NEG_INFINITY;
        let x = Tensor::from_vec(
            vec![5, 3],
            vec![
                ninf, ninf, ninf, // fully masked row: NaN, like ONNX Runtime
                1., 2., 3., //
                -3.4e38, -3.4e38, 0., //
                ninf, 0., ninf, //
                -3.4e38, -3.4e38, -3.4e38,
            ],
        )
        .unwrap();
        let y = softmax(&x, -1, false);
        let y = y.as_slice::<f32>().unwrap();
        assert!(y[..3].iter().all(|v| v.is_nan()), "{y:?}");
        // Values from ONNX Runtime 1.32 on the same input.
        let want = [
            0.090_030_57,
            0.244_728_48,
            0.665_240_94,
            0.,
            0.,
            1.,
            0.,
            1.,
            0.,
            1. / 3.,
            1. / 3.,
            1. / 3.,
        ];
        for (g, w) in y[3..].iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{g} vs {w}");
        }
        let l = softmax(&x, -1, true);
        let l = l.as_slice::<f32>().unwrap();
        assert!(l[..3].iter().all(|v| v.is_nan()));
        let want = [
            -2.407_606, -1.407_606, -0.407_606, -3.4e38, -3.4e38, 0., ninf, 0., ninf,
        ];
        for (g, w) in l[3..12].iter().zip(want) {
            assert!(g == &w || (g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert!((l[12] + 3f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn softmax_along_inner_axes_and_types() {
        // Axis 1 of [2, 3, 2]: normalize each column of each matrix.
        let v: Vec<f64> = (0..12).map(|i| (i as f64) * 0.37 - 2.0).collect();
        let x = Tensor::from_vec(vec![2, 3, 2], v.clone()).unwrap();
        for log in [false, true] {
            for axis in [1, -2] {
                let y = softmax(&x, axis, log);
                let y = y.as_slice::<f64>().unwrap();
                for b in 0..2 {
                    for c in 0..2 {
                        let idx = |r: usize| b * 6 + r * 2 + c;
                        let s: f64 = (0..3).map(|r| v[idx(r)].exp()).sum();
                        for r in 0..3 {
                            let want = if log {
                                v[idx(r)] - s.ln()
                            } else {
                                v[idx(r)].exp() / s
                            };
                            assert!((y[idx(r)] - want).abs() < 1e-12);
                        }
                    }
                }
            }
        }
        let h = crate::ops::elementwise::cast(&x, DType::BF16).unwrap();
        let y = softmax(&h, 0, false);
        assert_eq!(y.dtype(), DType::BF16);
        let sums: Vec<f64> = {
            let v = y.to_f64_vec().unwrap();
            (0..6).map(|i| v[i] + v[i + 6]).collect()
        };
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-2), "{sums:?}");
        let op = Softmax {
            axis: 3,
            log: false,
        };
        let ty = bsh();
        assert!(op.infer(&[Some(fact(&ty))]).is_err());
        let ok = Softmax {
            axis: -1,
            log: true,
        };
        assert_eq!(ok.infer(&[Some(fact(&ty))]).unwrap()[0].ty, ty);
        let ity = TensorType::new(DType::I64, vec![Dim::constant(3)]);
        assert!(ok.infer(&[Some(fact(&ity))]).is_err());
    }
}
