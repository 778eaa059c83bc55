//! Ops and the op registry.
//!
//! Each ONNX op type has one implementation of [`Op`], built from the node's attributes by a
//! builder registered in [`OpRegistry`]. An op does two things: infer its output types from
//! its input facts (dtype, symbolic shape, constant value or symbolic content), and evaluate
//! on concrete tensors (the reference interpreter). Ops live in one file per family.

/// Runs `$body` with `$t` bound to the Rust type of `$dtype` for every integer type, f32 and
/// f64; any other dtype (f16, bf16, bool) goes to `$fallback` with `$other` bound to it.
macro_rules! numeric_dispatch {
    ($dtype:expr, $t:ident => $body:expr, $other:ident => $fallback:expr) => {
        match $dtype {
            $crate::dtype::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::dtype::DType::F64 => {
                type $t = f64;
                $body
            }
            $crate::dtype::DType::I64 => {
                type $t = i64;
                $body
            }
            $crate::dtype::DType::I32 => {
                type $t = i32;
                $body
            }
            $crate::dtype::DType::I16 => {
                type $t = i16;
                $body
            }
            $crate::dtype::DType::I8 => {
                type $t = i8;
                $body
            }
            $crate::dtype::DType::U8 => {
                type $t = u8;
                $body
            }
            $crate::dtype::DType::U16 => {
                type $t = u16;
                $body
            }
            $crate::dtype::DType::U32 => {
                type $t = u32;
                $body
            }
            $crate::dtype::DType::U64 => {
                type $t = u64;
                $body
            }
            $other => $fallback,
        }
    };
}

/// Like `numeric_dispatch!`, with f16 and bf16 dispatched too.
macro_rules! numeric_or_half_dispatch {
    ($dtype:expr, $t:ident => $body:expr, $other:ident => $fallback:expr) => {
        match $dtype {
            $crate::dtype::DType::F16 => {
                type $t = half::f16;
                $body
            }
            $crate::dtype::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            dtype => numeric_dispatch!(dtype, $t => $body, $other => $fallback),
        }
    };
}

pub mod elementwise;
pub mod fused;
pub mod grad;
pub mod hybrid;
pub mod indexing;
pub mod linalg;
pub mod loss;
pub mod norm;
pub mod reduce;
pub mod shape;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::dim::Dim;
use crate::error::{OpError, RuntimeError};
use crate::ir::{Attrs, TensorType};
pub use crate::pool::Outputs;
use crate::tensor::Tensor;

/// What inference knows about one input value.
#[derive(Clone, Copy, Debug)]
pub struct InputFact<'a> {
    pub ty: &'a TensorType,
    /// The value, when it is a compile-time constant.
    pub value: Option<&'a Tensor>,
    /// Symbolic content of a small integer tensor (row-major), e.g. the output of `Shape`.
    pub sym: Option<&'a [Dim]>,
}

/// What inference derives for one output.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputFact {
    pub ty: TensorType,
    pub sym: Option<Vec<Dim>>,
}

impl OutputFact {
    pub fn new(ty: TensorType) -> OutputFact {
        OutputFact { ty, sym: None }
    }

    pub fn with_sym(ty: TensorType, sym: Vec<Dim>) -> OutputFact {
        OutputFact { ty, sym: Some(sym) }
    }
}

/// One op implementation (see the module docs).
pub trait Op: fmt::Debug + Send + Sync {
    /// Infers output types. `inputs[i]` is `None` for an omitted optional input.
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError>;

    /// Evaluates on concrete tensors. `inputs[i]` is `None` for an omitted optional input.
    ///
    /// An op implements this or [`eval_into`](Self::eval_into) (each defaults to the other):
    /// ops that write their outputs into the memory plan's buffers implement `eval_into`.
    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        self.eval_into(inputs, &Outputs::none())
    }

    /// [`eval`](Self::eval), writing `f32` outputs into the buffers of the executor's memory
    /// plan ([`Outputs::f32`]).
    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        let _ = outputs;
        self.eval(inputs)
    }

    /// The input whose bytes the outputs may share instead of owning their own (a reshape,
    /// an in-place append): the memory plan keeps that input alive as long as the outputs.
    fn view_of(&self) -> Option<usize> {
        None
    }
}

/// Returns input `i`, or an error naming it when it is missing.
pub fn req<T: Copy>(inputs: &[Option<T>], i: usize) -> Result<T, OpError> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or(OpError::MissingInput(i))
}

/// Returns optional input `i`.
pub fn opt<T: Copy>(inputs: &[Option<T>], i: usize) -> Option<T> {
    inputs.get(i).copied().flatten()
}

/// Checks the number of inputs is in `min..=max`.
pub fn arity<T>(inputs: &[Option<T>], min: usize, max: usize) -> Result<(), OpError> {
    let n = inputs.len();
    if n < min || n > max {
        let expected = if min == max {
            min.to_string()
        } else {
            format!("{min} to {max}")
        };
        return Err(OpError::Arity { expected, got: n });
    }
    Ok(())
}

/// Normalizes a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, OpError> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        return Err(OpError::Invalid(format!(
            "axis {axis} is out of range for rank {rank}"
        )));
    }
    Ok(a as usize)
}

/// Builds an op from its attributes at a given opset of its domain.
/// Elements from which [`for_each_row`] splits rows over the kernels' thread pool.
const PARALLEL_MIN: usize = 1 << 15;

/// Runs `row(index, out_row)` for every `width`-wide row of `out`, on the kernels' pool when
/// `out` is large. `row` must depend only on its arguments (rows are independent).
pub(crate) fn for_each_row(
    out: &mut [f32],
    width: usize,
    row: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let parallel = out.len() >= PARALLEL_MIN;
    for_each_row_split(out, width, parallel, row)
}

/// [`for_each_row`], on the pool whenever `parallel` (for callers whose work per row is
/// much larger than its width).
pub(crate) fn for_each_row_split(
    out: &mut [f32],
    width: usize,
    parallel: bool,
    row: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let rows = out.len().checked_div(width).unwrap_or(0);
    let pool = patch_kernels::CpuKernels::global()
        .ok()
        .filter(|p| p.threads() > 1 && parallel && rows > 1);
    let Some(pool) = pool else {
        for (r, o) in out.chunks_exact_mut(width.max(1)).enumerate() {
            row(r, o);
        }
        return;
    };
    let parts = pool.threads();
    let chunks: Vec<std::sync::Mutex<&mut [f32]>> = {
        let mut rest: &mut [f32] = out;
        let mut v = Vec::with_capacity(parts);
        for t in 0..parts {
            let take = (rows * (t + 1) / parts - rows * t / parts) * width;
            let (head, tail) = rest.split_at_mut(take);
            v.push(std::sync::Mutex::new(head));
            rest = tail;
        }
        v
    };
    pool.run_on_threads(&|t| {
        let r0 = rows * t / parts;
        let mut dst = chunks[t].lock().unwrap_or_else(|e| e.into_inner());
        for (k, o) in dst.chunks_exact_mut(width).enumerate() {
            row(r0 + k, o);
        }
    });
}

/// One part of [`for_each_part_balanced`]'s output: its index and its elements.
type Part<'a> = (usize, &'a mut [f32]);

/// Runs `span(index, part)` for consecutive parts of `out` (lengths `lens`, summing to at
/// most `out.len()`) on the kernels' pool, each thread taking a run of consecutive parts of
/// about equal total `costs` (for work whose cost per part differs, as causal attention's row
/// blocks do). Parts are independent.
pub(crate) fn for_each_part_balanced(
    out: &mut [f32],
    lens: &[usize],
    costs: &[f64],
    span: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    debug_assert_eq!(lens.len(), costs.len());
    let mut parts: Vec<Part<'_>> = Vec::with_capacity(lens.len());
    let mut rest: &mut [f32] = out;
    for (i, &len) in lens.iter().enumerate() {
        let (head, tail) = rest.split_at_mut(len);
        parts.push((i, head));
        rest = tail;
    }
    let pool = patch_kernels::CpuKernels::global()
        .ok()
        .filter(|p| p.threads() > 1 && parts.len() > 1);
    let Some(pool) = pool else {
        for (i, o) in parts {
            span(i, o);
        }
        return;
    };
    let threads = pool.threads();
    let total: f64 = costs.iter().sum();
    // Thread t takes the parts whose cost midpoint falls in its share [t, t + 1) · total / threads.
    let mut groups: Vec<Vec<Part<'_>>> = (0..threads).map(|_| Vec::new()).collect();
    let mut before = 0.0;
    for (i, o) in parts {
        let mid = before + costs[i] / 2.0;
        before += costs[i];
        let t = ((mid / total.max(f64::MIN_POSITIVE)) * threads as f64) as usize;
        groups[t.min(threads - 1)].push((i, o));
    }
    let groups: Vec<std::sync::Mutex<Vec<Part<'_>>>> =
        groups.into_iter().map(std::sync::Mutex::new).collect();
    pool.run_on_threads(&|t| {
        let mut mine = groups[t].lock().unwrap_or_else(|e| e.into_inner());
        for (i, o) in mine.iter_mut() {
            span(*i, o);
        }
    });
}

pub type OpBuilder = fn(&Attrs, i64) -> Result<Arc<dyn Op>, OpError>;

#[derive(Clone, Copy)]
struct Registration {
    builder: OpBuilder,
    /// Oldest opset this implementation follows; older models are rejected.
    since: i64,
}

/// Op implementations by `(domain, op_type)`.
#[derive(Clone, Default)]
pub struct OpRegistry {
    ops: BTreeMap<(String, String), Registration>,
}

impl OpRegistry {
    /// An empty registry.
    pub fn empty() -> OpRegistry {
        OpRegistry::default()
    }

    /// Every op this crate implements, for ONNX opsets 13 and later.
    pub fn onnx() -> OpRegistry {
        let mut r = OpRegistry::empty();
        elementwise::register(&mut r);
        fused::register(&mut r);
        grad::register(&mut r);
        hybrid::register(&mut r);
        linalg::register(&mut r);
        loss::register(&mut r);
        norm::register(&mut r);
        reduce::register(&mut r);
        shape::register(&mut r);
        indexing::register(&mut r);
        r
    }

    /// Registers `builder` for `op_type` in `domain` ("" is the ONNX default domain).
    pub fn register(&mut self, domain: &str, op_type: &str, since: i64, builder: OpBuilder) {
        self.ops.insert(
            (canonical_domain(domain).to_string(), op_type.to_string()),
            Registration { builder, since },
        );
    }

    pub fn contains(&self, domain: &str, op_type: &str) -> bool {
        self.ops
            .contains_key(&(canonical_domain(domain).to_string(), op_type.to_string()))
    }

    /// `(domain, op_type, since_opset)` of every registered op, sorted.
    pub fn list(&self) -> Vec<(String, String, i64)> {
        self.ops
            .iter()
            .map(|((d, o), r)| (d.clone(), o.clone(), r.since))
            .collect()
    }

    /// Builds the op for a node, with errors that name the node.
    pub fn build(
        &self,
        domain: &str,
        op_type: &str,
        opset: i64,
        attrs: &Attrs,
        node: &str,
    ) -> Result<Arc<dyn Op>, RuntimeError> {
        let key = (canonical_domain(domain).to_string(), op_type.to_string());
        let unsupported = || RuntimeError::UnsupportedOp {
            op_type: op_type.to_string(),
            domain: if key.0.is_empty() {
                "ai.onnx".into()
            } else {
                domain.to_string()
            },
            opset,
            node: node.to_string(),
        };
        let reg = self.ops.get(&key).ok_or_else(unsupported)?;
        if opset < reg.since {
            return Err(unsupported());
        }
        (reg.builder)(attrs, opset).map_err(|e| RuntimeError::at_node(node, op_type, e))
    }
}

fn canonical_domain(domain: &str) -> &str {
    if domain == "ai.onnx" {
        ""
    } else {
        domain
    }
}
