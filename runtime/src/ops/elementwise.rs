//! Elementwise ops with multidirectional (numpy) broadcasting: arithmetic, comparisons,
//! logic, unary math, `Where`, `Cast`, `Identity`.

use std::sync::Arc;

use half::{bf16, f16};
use ndarray::{ArrayD, ArrayViewD, IxDyn, Zip};

use super::{arity, req, InputFact, Op, OpError, OpRegistry, OutputFact};
use crate::dim::{Dim, Shape};
use crate::dtype::DType;
use crate::ir::{Attrs, TensorType};
use crate::tensor::{Element, Tensor};

pub(super) fn gelu(attrs: &Attrs, _opset: i64) -> Result<Arc<dyn Op>, OpError> {
    let approximate = match attrs.string("approximate")?.unwrap_or("none") {
        "none" => false,
        "tanh" => true,
        other => {
            return Err(OpError::BadAttr {
                name: "approximate".into(),
                msg: format!("expected \"none\" or \"tanh\", found {other:?}"),
            })
        }
    };
    Ok(Arc::new(UnaryOp(if approximate {
        Unary::GeluTanh
    } else {
        Unary::Gelu
    })))
}

pub fn register(r: &mut OpRegistry) {
    for (name, op) in [
        ("Add", Binary::Add),
        ("Sub", Binary::Sub),
        ("Mul", Binary::Mul),
        ("Div", Binary::Div),
        ("Pow", Binary::Pow),
        ("Equal", Binary::Equal),
        ("Less", Binary::Less),
        ("LessOrEqual", Binary::LessOrEqual),
        ("Greater", Binary::Greater),
        ("GreaterOrEqual", Binary::GreaterOrEqual),
        ("And", Binary::And),
        ("Or", Binary::Or),
        ("Xor", Binary::Xor),
    ] {
        r.register("", name, 13, binary_builder(op));
    }
    r.register("", "Max", 13, |_, _| Ok(Arc::new(Variadic(Binary::Max))));
    r.register("", "Min", 13, |_, _| Ok(Arc::new(Variadic(Binary::Min))));
    r.register("", "Sum", 13, |_, _| Ok(Arc::new(Variadic(Binary::Add))));
    for (name, op) in [
        ("Sqrt", Unary::Sqrt),
        ("Reciprocal", Unary::Reciprocal),
        ("Neg", Unary::Neg),
        ("Exp", Unary::Exp),
        ("Log", Unary::Log),
        ("Tanh", Unary::Tanh),
        ("Erf", Unary::Erf),
        ("Sigmoid", Unary::Sigmoid),
        ("Cos", Unary::Cos),
        ("Sin", Unary::Sin),
        ("Abs", Unary::Abs),
        ("Relu", Unary::Relu),
        ("Floor", Unary::Floor),
        ("Ceil", Unary::Ceil),
        ("Softplus", Unary::Softplus),
        ("Not", Unary::Not),
        ("IsNaN", Unary::IsNaN),
    ] {
        r.register("", name, 13, unary_builder(op));
    }
    r.register("", "Mod", 13, |attrs, _| {
        // fmod = 1: C fmod (sign of the dividend); fmod = 0: sign of the divisor (ints only).
        let op = match attrs.int_or("fmod", 0)? {
            0 => Binary::Mod,
            1 => Binary::Fmod,
            other => {
                return Err(OpError::BadAttr {
                    name: "fmod".into(),
                    msg: format!("must be 0 or 1, found {other}"),
                })
            }
        };
        Ok(Arc::new(BinaryOp(op)))
    });
    r.register("", "IsInf", 13, |attrs, _| {
        let positive = attrs.int_or("detect_positive", 1)? != 0;
        let negative = attrs.int_or("detect_negative", 1)? != 0;
        Ok(Arc::new(UnaryOp(match (positive, negative) {
            (true, true) => Unary::IsInf,
            (true, false) => Unary::IsPosInf,
            (false, true) => Unary::IsNegInf,
            (false, false) => Unary::IsNoInf,
        })))
    });
    r.register("", "Where", 13, |_, _| Ok(Arc::new(Where)));
    r.register("", "Cast", 13, |attrs, _| {
        let code = attrs.req_int("to")?;
        let to = DType::from_onnx(code as i32).ok_or_else(|| OpError::BadAttr {
            name: "to".into(),
            msg: format!("unsupported element type code {code}"),
        })?;
        Ok(Arc::new(Cast { to: Some(to) }))
    });
    r.register("", "CastLike", 15, |_, _| Ok(Arc::new(Cast { to: None })));
    r.register("", "Identity", 13, |_, _| Ok(Arc::new(Identity)));
    r.register("", "Clip", 13, |_, _| Ok(Arc::new(Clip)));
    r.register("", "Gelu", 20, gelu);
    // The fusion pass's `patch.Gelu` is registered with the fused ops.
}

fn binary_builder(op: Binary) -> super::OpBuilder {
    macro_rules! b {
        ($($v:ident),*) => {
            match op {
                $(Binary::$v => |_: &Attrs, _| Ok(Arc::new(BinaryOp(Binary::$v)) as Arc<dyn Op>),)*
            }
        };
    }
    b!(
        Add,
        Sub,
        Mul,
        Div,
        Pow,
        Mod,
        Fmod,
        Max,
        Min,
        Equal,
        Less,
        LessOrEqual,
        Greater,
        GreaterOrEqual,
        And,
        Or,
        Xor
    )
}

fn unary_builder(op: Unary) -> super::OpBuilder {
    macro_rules! u {
        ($($v:ident),*) => {
            match op {
                $(Unary::$v => |_: &Attrs, _| Ok(Arc::new(UnaryOp(Unary::$v)) as Arc<dyn Op>),)*
            }
        };
    }
    u!(
        Sqrt, Reciprocal, Neg, Exp, Log, Tanh, Erf, Sigmoid, Cos, Sin, Abs, Relu, Floor, Ceil,
        Softplus, Gelu, GeluTanh, Not, IsNaN, IsInf, IsPosInf, IsNegInf, IsNoInf
    )
}

/// Broadcasts symbolic shapes numpy-style. Where two different symbolic dims meet, the first
/// is kept: exporters only broadcast equal sizes, and the interpreter checks the result.
pub fn broadcast_shapes(shapes: &[&Shape]) -> Result<Shape, OpError> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let one = Dim::constant(1);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let mut acc = one.clone();
        for s in shapes {
            let Some(d) = (s.len() + i).checked_sub(rank).map(|j| &s[j]) else {
                continue;
            };
            if *d == one || *d == acc {
                continue;
            }
            if acc == one {
                acc = d.clone();
            } else if let (Some(a), Some(b)) = (acc.as_const(), d.as_const()) {
                return Err(OpError::Shape(format!(
                    "cannot broadcast {a} against {b} at axis {i} of {}",
                    shapes
                        .iter()
                        .map(|s| crate::dim::shape_to_string(s))
                        .collect::<Vec<_>>()
                        .join(" and ")
                )));
            } else if d.is_const() {
                acc = d.clone();
            }
        }
        out.push(acc);
    }
    Ok(out)
}

/// Numpy broadcast of two concrete shapes.
pub(crate) fn broadcast_concrete(a: &[usize], b: &[usize]) -> Result<Vec<usize>, OpError> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let x = (a.len() + i).checked_sub(rank).map_or(1, |j| a[j]);
            let y = (b.len() + i).checked_sub(rank).map_or(1, |j| b[j]);
            match (x, y) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(OpError::Shape(format!(
                    "cannot broadcast {a:?} against {b:?}"
                ))),
            }
        })
        .collect()
}

/// Applies `f` to two broadcast tensors of element type `T`.
fn zip_map<T: Element, U: Element>(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(T, T) -> U,
) -> Result<Tensor, OpError> {
    let shape = broadcast_concrete(a.shape(), b.shape())?;
    let av = a.view::<T>().map_err(|e| OpError::Invalid(e.to_string()))?;
    let bv = b.view::<T>().map_err(|e| OpError::Invalid(e.to_string()))?;
    let av = av.broadcast(IxDyn(&shape)).expect("checked broadcast");
    let bv = bv.broadcast(IxDyn(&shape)).expect("checked broadcast");
    let out: ArrayD<U> = Zip::from(&av).and(&bv).map_collect(|&x, &y| f(x, y));
    Ok(Tensor::from_array(out))
}

fn map<T: Element, U: Element>(a: &Tensor, f: impl Fn(T) -> U) -> Result<Tensor, OpError> {
    let av: ArrayViewD<'_, T> = a.view::<T>().map_err(|e| OpError::Invalid(e.to_string()))?;
    Ok(Tensor::from_array(av.mapv(f)))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Mod,
    Fmod,
    Max,
    Min,
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
    Xor,
}

impl Binary {
    fn is_comparison(self) -> bool {
        matches!(
            self,
            Binary::Equal
                | Binary::Less
                | Binary::LessOrEqual
                | Binary::Greater
                | Binary::GreaterOrEqual
        )
    }

    fn is_logical(self) -> bool {
        matches!(self, Binary::And | Binary::Or | Binary::Xor)
    }

    /// The op on symbolic integers, where it can be decided.
    fn on_dims(self, a: &Dim, b: &Dim) -> Option<Dim> {
        let bool_dim = |v: bool| Some(Dim::constant(v as i64));
        match self {
            Binary::Add => Some(a.clone() + b.clone()),
            Binary::Sub => Some(a.clone() - b.clone()),
            Binary::Mul => Some(a.clone() * b.clone()),
            Binary::Div => match b.as_const() {
                // ONNX integer Div truncates; sizes are non-negative so it equals floor.
                Some(q) if q > 0 => Some(a.floor_div(q)),
                _ => None,
            },
            Binary::Max => match (a.try_min(b), a.clone() == b.clone()) {
                (_, true) => Some(a.clone()),
                (Some(m), _) => Some(if m == *a { b.clone() } else { a.clone() }),
                _ => None,
            },
            Binary::Min => a.try_min(b),
            Binary::Equal => {
                if a == b {
                    bool_dim(true)
                } else if let (Some(x), Some(y)) = (a.as_const(), b.as_const()) {
                    bool_dim(x == y)
                } else if (a.clone() - b.clone()).as_const().is_some() {
                    bool_dim(false)
                } else if b.as_const().is_some_and(|v| v < 0) && a.is_nonnegative() {
                    // A size is never negative, e.g. `Equal(shape, -1)` in reshape patterns.
                    bool_dim(false)
                } else if a.as_const().is_some_and(|v| v < 0) && b.is_nonnegative() {
                    bool_dim(false)
                } else {
                    None
                }
            }
            _ => {
                let (x, y) = (a.as_const()?, b.as_const()?);
                match self {
                    Binary::Less => bool_dim(x < y),
                    Binary::LessOrEqual => bool_dim(x <= y),
                    Binary::Greater => bool_dim(x > y),
                    Binary::GreaterOrEqual => bool_dim(x >= y),
                    Binary::And => bool_dim(x != 0 && y != 0),
                    Binary::Or => bool_dim(x != 0 || y != 0),
                    Binary::Xor => bool_dim((x != 0) != (y != 0)),
                    Binary::Mod if y != 0 => Some(Dim::constant(x.rem_euclid(y))),
                    Binary::Pow if y >= 0 => Some(Dim::constant(x.pow(y as u32))),
                    _ => None,
                }
            }
        }
    }
}

/// Arithmetic on one numeric element type.
trait Arith: Element + PartialOrd {
    fn arith(op: Binary, a: Self, b: Self) -> Result<Self, OpError>;
}

macro_rules! float_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            fn arith(op: Binary, a: $t, b: $t) -> Result<$t, OpError> {
                Ok(match op {
                    Binary::Add => a + b,
                    Binary::Sub => a - b,
                    Binary::Mul => a * b,
                    Binary::Div => a / b,
                    // x² is the RMSNorm hot path; powf(x, 2) is exactly x * x anyway.
                    Binary::Pow if b == 2.0 => a * a,
                    Binary::Pow => a.powf(b),
                    Binary::Mod | Binary::Fmod => a % b,
                    Binary::Max => if a.is_nan() || b.is_nan() { <$t>::NAN } else if a >= b { a } else { b },
                    Binary::Min => if a.is_nan() || b.is_nan() { <$t>::NAN } else if a <= b { a } else { b },
                    _ => unreachable!("not arithmetic"),
                })
            }
        }
    )*};
}
float_arith!(f32, f64);

macro_rules! int_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[allow(unused_comparisons)]
            fn arith(op: Binary, a: $t, b: $t) -> Result<$t, OpError> {
                Ok(match op {
                    Binary::Add => a.wrapping_add(b),
                    Binary::Sub => a.wrapping_sub(b),
                    Binary::Mul => a.wrapping_mul(b),
                    Binary::Div | Binary::Mod | Binary::Fmod if b == 0 => {
                        return Err(OpError::Invalid("integer division by zero".into()))
                    }
                    // ONNX integer Div truncates toward zero; Mod (fmod = 0) takes the sign of
                    // the divisor.
                    Binary::Div => a.wrapping_div(b),
                    Binary::Fmod => a.wrapping_rem(b),
                    Binary::Mod => {
                        let r = a.wrapping_rem(b);
                        if r != 0 && ((r < 0) != (b < 0)) { r + b } else { r }
                    }
                    Binary::Pow => (a as f64).powf(b as f64) as $t,
                    Binary::Max => a.max(b),
                    Binary::Min => a.min(b),
                    _ => unreachable!("not arithmetic"),
                })
            }
        }
    )*};
}
int_arith!(i8, i16, i32, i64, u8, u16, u32, u64);

fn arith_typed<T: Arith>(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor, OpError> {
    let err = std::cell::Cell::new(None);
    let out = zip_map::<T, T>(a, b, |x, y| {
        T::arith(op, x, y).unwrap_or_else(|e| {
            err.set(Some(e));
            T::default()
        })
    })?;
    match err.into_inner() {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn compare_typed<T: Element + PartialOrd>(
    op: Binary,
    a: &Tensor,
    b: &Tensor,
) -> Result<Tensor, OpError> {
    zip_map::<T, bool>(a, b, |x, y| match op {
        Binary::Equal => x == y,
        Binary::Less => x < y,
        Binary::LessOrEqual => x <= y,
        Binary::Greater => x > y,
        Binary::GreaterOrEqual => x >= y,
        _ => unreachable!("not a comparison"),
    })
}

/// f16 and bf16 compute through f32 and round back.
fn via_f32(a: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor, OpError>) -> Result<Tensor, OpError> {
    let dtype = a.dtype();
    let widened = cast(a, DType::F32)?;
    let out = f(&widened)?;
    if out.dtype() == DType::F32 {
        cast(&out, dtype)
    } else {
        Ok(out)
    }
}

#[derive(Debug)]
struct BinaryOp(Binary);

impl Op for BinaryOp {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, 2)?;
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        let op = self.0;
        if a.ty.dtype != b.ty.dtype && op != Binary::Pow {
            return Err(OpError::DType {
                index: 1,
                got: b.ty.dtype,
                expected: format!("{} like input 0", a.ty.dtype),
            });
        }
        if op.is_logical() && a.ty.dtype != DType::Bool {
            return Err(OpError::DType {
                index: 0,
                got: a.ty.dtype,
                expected: "bool".into(),
            });
        }
        let shape = broadcast_shapes(&[&a.ty.shape, &b.ty.shape])?;
        let dtype = if op.is_comparison() || op.is_logical() {
            DType::Bool
        } else {
            a.ty.dtype
        };
        let ty = TensorType::new(dtype, shape.clone());
        // Symbolic content: elementwise on dims, when both sides have it and shapes allow.
        if let (Some(sa), Some(sb)) = (a.sym, b.sym) {
            let n = sa.len().max(sb.len());
            let fits = |s: &[Dim]| s.len() == n || s.len() == 1;
            if shape.len() <= 1 && fits(sa) && fits(sb) {
                let pick = |s: &[Dim], i: usize| s[if s.len() == 1 { 0 } else { i }].clone();
                let dims: Option<Vec<Dim>> = (0..n)
                    .map(|i| op.on_dims(&pick(sa, i), &pick(sb, i)))
                    .collect();
                if let Some(dims) = dims {
                    return Ok(vec![OutputFact::with_sym(ty, dims)]);
                }
            }
        }
        Ok(vec![OutputFact::new(ty)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, 2)?;
        let (a, b) = (req(inputs, 0)?, req(inputs, 1)?);
        Ok(vec![binary(self.0, a, b)?])
    }
}

/// Evaluates a binary op on two tensors.
pub fn binary(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor, OpError> {
    if op == Binary::Pow && a.dtype() != b.dtype() {
        let b = cast(b, a.dtype())?;
        return binary(op, a, &b);
    }
    if a.dtype() != b.dtype() {
        return Err(OpError::DType {
            index: 1,
            got: b.dtype(),
            expected: a.dtype().to_string(),
        });
    }
    if op.is_logical() {
        return zip_map::<bool, bool>(a, b, |x, y| match op {
            Binary::And => x && y,
            Binary::Or => x || y,
            _ => x != y,
        });
    }
    if matches!(a.dtype(), DType::F16 | DType::BF16) {
        let wide_b = cast(b, DType::F32)?;
        return via_f32(a, |wa| binary(op, wa, &wide_b));
    }
    if a.dtype() == DType::F32 {
        if let Some(t) = f32_arith_fast(op, a, b) {
            return t;
        }
    }
    if op.is_comparison() {
        return numeric_dispatch!(a.dtype(), T => compare_typed::<T>(op, a, b),
        d => match d {
            DType::Bool => compare_typed::<bool>(op, a, b),
            _ => Err(OpError::DType { index: 0, got: d, expected: "a numeric type".into() }),
        });
    }
    numeric_dispatch!(a.dtype(), T => arith_typed::<T>(op, a, b),
        d => Err(OpError::DType { index: 0, got: d, expected: "a numeric type".into() }))
}

/// True when `small` broadcasts against `big` as a repeated trailing block: after its leading
/// ones, `small`'s shape equals the trailing dims of `big` (a row vector, a scalar).
fn is_trailing_block(small: &[usize], big: &[usize]) -> bool {
    let lead = small.iter().take_while(|&&d| d == 1).count();
    let core = &small[lead..];
    small.len() <= big.len() && big.ends_with(core)
}

/// f32 `+ - * /` on same-shape operands or a trailing block (bias rows, scalars): a flat loop
/// instead of the general broadcasting iterator. `None` when the shapes need the general path.
fn f32_arith_fast(op: Binary, a: &Tensor, b: &Tensor) -> Option<Result<Tensor, OpError>> {
    // One monomorphized loop per op: an indirect call per element would cost more than the
    // arithmetic.
    match op {
        Binary::Add => f32_zip_fast(a, b, |x, y| x + y),
        Binary::Sub => f32_zip_fast(a, b, |x, y| x - y),
        Binary::Mul => f32_zip_fast(a, b, |x, y| x * y),
        Binary::Div => f32_zip_fast(a, b, |x, y| x / y),
        _ => None,
    }
}

fn f32_zip_fast(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Copy,
) -> Option<Result<Tensor, OpError>> {
    let (sa, sb) = (a.shape(), b.shape());
    let (xa, xb) = (a.as_slice::<f32>().ok()?, b.as_slice::<f32>().ok()?);
    if xa.is_empty() || xb.is_empty() {
        return None;
    }
    // `row` repeats along the longer operand `long`; `row_first` says which side it was.
    let apply = |long: &[f32], row: &[f32], row_first: bool| -> Vec<f32> {
        if let [v] = row {
            return if row_first {
                long.iter().map(|&y| f(*v, y)).collect()
            } else {
                long.iter().map(|&x| f(x, *v)).collect()
            };
        }
        let mut out = vec![0f32; long.len()];
        for (o, l) in out
            .chunks_exact_mut(row.len())
            .zip(long.chunks_exact(row.len()))
        {
            if row_first {
                for ((d, &x), &y) in o.iter_mut().zip(row).zip(l) {
                    *d = f(x, y);
                }
            } else {
                for ((d, &x), &y) in o.iter_mut().zip(l).zip(row) {
                    *d = f(x, y);
                }
            }
        }
        out
    };
    let out: Vec<f32> = if sa == sb || (sa.len() >= sb.len() && is_trailing_block(sb, sa)) {
        apply(xa, xb, false)
    } else if sb.len() >= sa.len() && is_trailing_block(sa, sb) {
        apply(xb, xa, true)
    } else {
        return None;
    };
    let shape = if sa.len() >= sb.len() && out.len() == xa.len() {
        sa.to_vec()
    } else {
        sb.to_vec()
    };
    Some(Tensor::from_vec(shape, out).map_err(|e| OpError::Invalid(e.to_string())))
}

/// `Max`, `Min`, `Sum`: one or more inputs folded with a binary op.
#[derive(Debug)]
struct Variadic(Binary);

impl Op for Variadic {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, usize::MAX)?;
        let first = req(inputs, 0)?;
        let mut facts = vec![OutputFact::new(first.ty.clone())];
        if let Some(s) = first.sym {
            facts[0].sym = Some(s.to_vec());
        }
        for i in 1..inputs.len() {
            let b = req(inputs, i)?;
            let acc = facts.pop().expect("one fact");
            let a = InputFact {
                ty: &acc.ty,
                value: None,
                sym: acc.sym.as_deref(),
            };
            facts = BinaryOp(self.0).infer(&[Some(a), Some(b)])?;
        }
        Ok(facts)
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, usize::MAX)?;
        let mut acc = req(inputs, 0)?.clone();
        for i in 1..inputs.len() {
            acc = binary(self.0, &acc, req(inputs, i)?)?;
        }
        Ok(vec![acc])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    Sqrt,
    Reciprocal,
    Neg,
    Exp,
    Log,
    Tanh,
    Erf,
    Sigmoid,
    Cos,
    Sin,
    Abs,
    Relu,
    Floor,
    Ceil,
    Softplus,
    Gelu,
    GeluTanh,
    Not,
    IsNaN,
    IsInf,
    IsPosInf,
    IsNegInf,
    /// `IsInf` detecting neither sign: always false.
    IsNoInf,
}

/// Error function in f64: Maclaurin series below |x| = 2, Lentz's continued fraction for
/// erfc above; within a few ulps of libm's erf.
pub fn erf(x: f64) -> f64 {
    // erf(x) = sign(x) * (1 - erfc(|x|)); use a series for small |x|, continued fraction
    // via erfc for large.
    let ax = x.abs();
    let r = if ax < 2.0 {
        // Maclaurin series: erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = ax;
        let mut sum = ax;
        let x2 = ax * ax;
        // At |x| < 2 the terms fall below 1e-17 of the sum within 60 iterations.
        for n in 1..=60 {
            let n = n as f64;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // Continued fraction for erfc (Lentz), converges fast for x >= 2.
        let x2 = ax * ax;
        let mut f = ax;
        let mut c = ax;
        let mut d = 0.0;
        let tiny = 1e-300;
        for k in 1..200 {
            let an = k as f64 / 2.0;
            d = ax + an * d;
            d = if d.abs() < tiny { tiny } else { d };
            c = ax + an / c;
            c = if c.abs() < tiny { tiny } else { c };
            d = 1.0 / d;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        let erfc = (-x2).exp() / (f * std::f64::consts::PI.sqrt());
        1.0 - erfc
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

macro_rules! float_unary {
    ($t:ty, $op:expr, $x:expr) => {{
        let x: $t = $x;
        match $op {
            Unary::Sqrt => x.sqrt(),
            Unary::Reciprocal => 1.0 / x,
            Unary::Neg => -x,
            Unary::Exp => x.exp(),
            Unary::Log => x.ln(),
            Unary::Tanh => x.tanh(),
            Unary::Erf => erf(x as f64) as $t,
            Unary::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Unary::Cos => x.cos(),
            Unary::Sin => x.sin(),
            Unary::Abs => x.abs(),
            Unary::Relu => x.max(0.0),
            Unary::Floor => x.floor(),
            Unary::Ceil => x.ceil(),
            Unary::Softplus => (x as f64).exp().ln_1p() as $t,
            Unary::Gelu => {
                (0.5 * x as f64 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2))) as $t
            }
            Unary::GeluTanh => {
                let x = x as f64;
                let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                (0.5 * x * (1.0 + inner.tanh())) as $t
            }
            Unary::Not
            | Unary::IsNaN
            | Unary::IsInf
            | Unary::IsPosInf
            | Unary::IsNegInf
            | Unary::IsNoInf => unreachable!("not a float map"),
        }
    }};
}

/// Evaluates a unary op.
pub fn unary(op: Unary, a: &Tensor) -> Result<Tensor, OpError> {
    let d = a.dtype();
    match op {
        Unary::Not => {
            if d != DType::Bool {
                return Err(OpError::DType {
                    index: 0,
                    got: d,
                    expected: "bool".into(),
                });
            }
            map::<bool, bool>(a, |x| !x)
        }
        Unary::IsNaN | Unary::IsInf | Unary::IsPosInf | Unary::IsNegInf | Unary::IsNoInf => {
            if !d.is_float() {
                return Err(OpError::DType {
                    index: 0,
                    got: d,
                    expected: "a float type".into(),
                });
            }
            // Widening to f64 keeps NaN and both infinities.
            map::<f64, bool>(&cast(a, DType::F64)?, move |x| match op {
                Unary::IsNaN => x.is_nan(),
                Unary::IsInf => x.is_infinite(),
                Unary::IsPosInf => x == f64::INFINITY,
                Unary::IsNegInf => x == f64::NEG_INFINITY,
                _ => false,
            })
        }
        _ => match d {
            DType::F32 => map::<f32, f32>(a, |x| float_unary!(f32, op, x)),
            DType::F64 => map::<f64, f64>(a, |x| float_unary!(f64, op, x)),
            DType::F16 | DType::BF16 => via_f32(a, |w| unary(op, w)),
            DType::I64 | DType::I32 if !matches!(op, Unary::Neg | Unary::Abs | Unary::Relu) => {
                Err(OpError::DType {
                    index: 0,
                    got: d,
                    expected: "a float type".into(),
                })
            }
            DType::I64 => map::<i64, i64>(a, move |x| int_unary(op, x as i128) as i64),
            DType::I32 => map::<i32, i32>(a, move |x| int_unary(op, x as i128) as i32),
            _ => Err(OpError::DType {
                index: 0,
                got: d,
                expected: "a float type".into(),
            }),
        },
    }
}

/// Neg, Abs and Relu on integers (other unary ops are float-only in ONNX).
fn int_unary(op: Unary, x: i128) -> i128 {
    match op {
        Unary::Neg => -x,
        Unary::Abs => x.abs(),
        Unary::Relu => x.max(0),
        _ => x,
    }
}

#[derive(Debug)]
struct UnaryOp(Unary);

impl Op for UnaryOp {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let a = req(inputs, 0)?;
        let dtype = match self.0 {
            Unary::IsNaN | Unary::IsInf | Unary::IsPosInf | Unary::IsNegInf | Unary::IsNoInf => {
                DType::Bool
            }
            _ => a.ty.dtype,
        };
        let ty = TensorType::new(dtype, a.ty.shape.clone());
        if let (Some(s), Unary::Neg) = (a.sym, self.0) {
            return Ok(vec![OutputFact::with_sym(
                ty,
                s.iter().map(|d| -d.clone()).collect(),
            )]);
        }
        if let (Some(s), Unary::Not) = (a.sym, self.0) {
            let dims: Option<Vec<Dim>> = s
                .iter()
                .map(|d| d.as_const().map(|v| Dim::constant((v == 0) as i64)))
                .collect();
            if let Some(dims) = dims {
                return Ok(vec![OutputFact::with_sym(ty, dims)]);
            }
        }
        Ok(vec![OutputFact::new(ty)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 1)?;
        Ok(vec![unary(self.0, req(inputs, 0)?)?])
    }
}

/// `Where(cond, x, y)`.
#[derive(Debug)]
struct Where;

fn where_typed<T: Element>(c: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor, OpError> {
    let shape = broadcast_concrete(&broadcast_concrete(c.shape(), x.shape())?, y.shape())?;
    let e = |e: crate::RuntimeError| OpError::Invalid(e.to_string());
    let cv = c.view::<bool>().map_err(e)?;
    let xv = x.view::<T>().map_err(e)?;
    let yv = y.view::<T>().map_err(e)?;
    let sh = IxDyn(&shape);
    let out: ArrayD<T> = Zip::from(&cv.broadcast(sh.clone()).expect("checked"))
        .and(&xv.broadcast(sh.clone()).expect("checked"))
        .and(&yv.broadcast(sh).expect("checked"))
        .map_collect(|&c, &x, &y| if c { x } else { y });
    Ok(Tensor::from_array(out))
}

impl Op for Where {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 3, 3)?;
        let (c, x, y) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        if c.ty.dtype != DType::Bool {
            return Err(OpError::DType {
                index: 0,
                got: c.ty.dtype,
                expected: "bool".into(),
            });
        }
        if x.ty.dtype != y.ty.dtype {
            return Err(OpError::DType {
                index: 2,
                got: y.ty.dtype,
                expected: x.ty.dtype.to_string(),
            });
        }
        let shape = broadcast_shapes(&[&c.ty.shape, &x.ty.shape, &y.ty.shape])?;
        let ty = TensorType::new(x.ty.dtype, shape.clone());
        if let (Some(sc), Some(sx), Some(sy)) = (c.sym, x.sym, y.sym) {
            let n = sc.len().max(sx.len()).max(sy.len());
            let fits = |s: &[Dim]| s.len() == n || s.len() == 1;
            if shape.len() <= 1 && fits(sc) && fits(sx) && fits(sy) {
                let pick = |s: &[Dim], i: usize| s[if s.len() == 1 { 0 } else { i }].clone();
                let dims: Option<Vec<Dim>> = (0..n)
                    .map(|i| {
                        pick(sc, i)
                            .as_const()
                            .map(|c| if c != 0 { pick(sx, i) } else { pick(sy, i) })
                    })
                    .collect();
                if let Some(dims) = dims {
                    return Ok(vec![OutputFact::with_sym(ty, dims)]);
                }
            }
        }
        Ok(vec![OutputFact::new(ty)])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 3, 3)?;
        let (c, x, y) = (req(inputs, 0)?, req(inputs, 1)?, req(inputs, 2)?);
        let d = x.dtype();
        let out = numeric_dispatch!(d, T => where_typed::<T>(c, x, y), other => match other {
            DType::Bool => where_typed::<bool>(c, x, y),
            DType::F16 => where_typed::<f16>(c, x, y),
            DType::BF16 => where_typed::<bf16>(c, x, y),
            _ => unreachable!("all dtypes covered"),
        })?;
        Ok(vec![out])
    }
}

/// Converts a tensor to another element type (ONNX `Cast` semantics: float to int truncates,
/// anything to bool is `!= 0`).
pub fn cast(a: &Tensor, to: DType) -> Result<Tensor, OpError> {
    if a.dtype() == to {
        return Ok(a.clone());
    }
    let shape = a.shape().to_vec();
    let err = |e: crate::RuntimeError| OpError::Invalid(e.to_string());
    let make = |r: Result<Tensor, crate::RuntimeError>| r.map_err(err);
    // Go through f64 for floats and i64 for ints: exact for every value that fits.
    if a.dtype().is_float() {
        let v = a.to_f64_vec().map_err(err)?;
        return match to {
            DType::F32 => make(Tensor::from_vec(
                shape,
                v.iter().map(|&x| x as f32).collect(),
            )),
            DType::F64 => make(Tensor::from_vec(shape, v)),
            DType::F16 => make(Tensor::from_vec(
                shape,
                v.iter().map(|&x| f16::from_f64(x)).collect(),
            )),
            DType::BF16 => make(Tensor::from_vec(
                shape,
                v.iter().map(|&x| bf16::from_f64(x)).collect(),
            )),
            DType::Bool => make(Tensor::from_vec(
                shape,
                v.iter().map(|&x| x != 0.0).collect(),
            )),
            _ => cast_ints(shape, v.iter().map(|&x| x as i64).collect(), to),
        };
    }
    let v = a.to_i64_vec().map_err(err)?;
    match to {
        DType::F32 => make(Tensor::from_vec(
            shape,
            v.iter().map(|&x| x as f32).collect(),
        )),
        DType::F64 => make(Tensor::from_vec(
            shape,
            v.iter().map(|&x| x as f64).collect(),
        )),
        DType::F16 => make(Tensor::from_vec(
            shape,
            v.iter().map(|&x| f16::from_f64(x as f64)).collect(),
        )),
        DType::BF16 => make(Tensor::from_vec(
            shape,
            v.iter().map(|&x| bf16::from_f64(x as f64)).collect(),
        )),
        DType::Bool => make(Tensor::from_vec(shape, v.iter().map(|&x| x != 0).collect())),
        _ => cast_ints(shape, v, to),
    }
}

fn cast_ints(shape: Vec<usize>, v: Vec<i64>, to: DType) -> Result<Tensor, OpError> {
    let r = match to {
        DType::I64 => Tensor::from_vec(shape, v),
        DType::I32 => Tensor::from_vec(shape, v.into_iter().map(|x| x as i32).collect()),
        DType::I16 => Tensor::from_vec(shape, v.into_iter().map(|x| x as i16).collect()),
        DType::I8 => Tensor::from_vec(shape, v.into_iter().map(|x| x as i8).collect()),
        DType::U8 => Tensor::from_vec(shape, v.into_iter().map(|x| x as u8).collect()),
        DType::U16 => Tensor::from_vec(shape, v.into_iter().map(|x| x as u16).collect()),
        DType::U32 => Tensor::from_vec(shape, v.into_iter().map(|x| x as u32).collect()),
        DType::U64 => Tensor::from_vec(shape, v.into_iter().map(|x| x as u64).collect()),
        other => return Err(OpError::Invalid(format!("cannot cast integers to {other}"))),
    };
    r.map_err(|e| OpError::Invalid(e.to_string()))
}

/// `Cast` (target from the `to` attribute) and `CastLike` (target from input 1).
#[derive(Debug)]
struct Cast {
    to: Option<DType>,
}

impl Op for Cast {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        let a = req(inputs, 0)?;
        let to = match self.to {
            Some(t) => {
                arity(inputs, 1, 1)?;
                t
            }
            None => {
                arity(inputs, 2, 2)?;
                req(inputs, 1)?.ty.dtype
            }
        };
        let ty = TensorType::new(to, a.ty.shape.clone());
        let int_like = |d: DType| d.is_int() || d == DType::Bool;
        match a.sym {
            Some(s) if int_like(a.ty.dtype) && to.is_int() => {
                Ok(vec![OutputFact::with_sym(ty, s.to_vec())])
            }
            _ => Ok(vec![OutputFact::new(ty)]),
        }
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        let a = req(inputs, 0)?;
        let to = match self.to {
            Some(t) => t,
            None => req(inputs, 1)?.dtype(),
        };
        Ok(vec![cast(a, to)?])
    }
}

#[derive(Debug)]
struct Identity;

impl Op for Identity {
    fn view_of(&self) -> Option<usize> {
        Some(0)
    }

    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 1)?;
        let a = req(inputs, 0)?;
        Ok(vec![OutputFact {
            ty: a.ty.clone(),
            sym: a.sym.map(|s| s.to_vec()),
        }])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        Ok(vec![req(inputs, 0)?.clone()])
    }
}

/// `Clip(x, min?, max?)`.
#[derive(Debug)]
struct Clip;

impl Op for Clip {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 1, 3)?;
        Ok(vec![OutputFact::new(req(inputs, 0)?.ty.clone())])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 1, 3)?;
        let mut x = req(inputs, 0)?.clone();
        if let Some(lo) = super::opt(inputs, 1) {
            x = binary(Binary::Max, &x, lo)?;
        }
        if let Some(hi) = super::opt(inputs, 2) {
            x = binary(Binary::Min, &x, hi)?;
        }
        Ok(vec![x])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (-1.5, -0.966_105_146_475_310_7),
        ] {
            assert!(
                (erf(x) - want).abs() < 1e-14,
                "erf({x}) = {} != {want}",
                erf(x)
            );
        }
    }

    #[test]
    fn broadcasting_add_and_int_division() {
        let a = Tensor::from_vec(vec![2, 1], vec![1f32, 2.]).unwrap();
        let b = Tensor::from_vec(vec![3], vec![10f32, 20., 30.]).unwrap();
        let c = binary(Binary::Add, &a, &b).unwrap();
        assert_eq!(c.shape(), &[2, 3]);
        assert_eq!(
            c.as_slice::<f32>().unwrap(),
            &[11., 21., 31., 12., 22., 32.]
        );
        let x = Tensor::from_vec(vec![2], vec![-7i64, 7]).unwrap();
        let y = Tensor::scalar(2i64);
        assert_eq!(
            binary(Binary::Div, &x, &y)
                .unwrap()
                .as_slice::<i64>()
                .unwrap(),
            &[-3, 3]
        );
        assert_eq!(
            binary(Binary::Mod, &x, &y)
                .unwrap()
                .as_slice::<i64>()
                .unwrap(),
            &[1, 1]
        );
        assert!(binary(Binary::Div, &x, &Tensor::scalar(0i64)).is_err());
        let bad = Tensor::from_vec(vec![4], vec![0f32; 4]).unwrap();
        assert!(matches!(
            binary(Binary::Add, &b, &bad),
            Err(OpError::Shape(_))
        ));
    }

    #[test]
    fn symbolic_broadcast_prefers_known_sizes() {
        let s = vec![Dim::sym("batch"), Dim::constant(1), Dim::sym("seq")];
        let t = vec![Dim::constant(4), Dim::sym("seq")];
        let out = broadcast_shapes(&[&s, &t]).unwrap();
        assert_eq!(crate::dim::shape_to_string(&out), "[batch, 4, seq]");
    }

    #[test]
    fn cast_truncates_and_rounds_to_half() {
        let a = Tensor::from_vec(vec![3], vec![1.7f32, -1.7, 65504.0]).unwrap();
        assert_eq!(
            cast(&a, DType::I64).unwrap().as_slice::<i64>().unwrap(),
            &[1, -1, 65504]
        );
        let h = cast(&a, DType::F16).unwrap();
        assert_eq!(h.as_slice::<f16>().unwrap()[2], f16::from_f32(65504.0));
    }
}
