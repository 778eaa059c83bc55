//! Shape and type inference over the graph.
//!
//! For each node the driver gathers its input facts, asks the op to infer its outputs, and
//! folds small integer computations (shape arithmetic) by evaluating the op on known values,
//! so that `Shape → Gather → Concat → Reshape` chains resolve to symbolic shapes.

use crate::dim::Dim;
use crate::dtype::DType;
use crate::error::{OpError, RuntimeError};
use crate::ir::{Def, Graph, ValueId};
use crate::ops::{InputFact, Op, OutputFact};
use crate::tensor::Tensor;

/// Integer and bool tensors up to this many elements carry their symbolic content.
pub const MAX_SYM_ELEMENTS: usize = 64;

/// The symbolic content of a small integer or bool constant.
pub fn sym_of_const(t: &Tensor) -> Option<Vec<Dim>> {
    let small = t.len() <= MAX_SYM_ELEMENTS && t.rank() <= 1;
    if !small || !(t.dtype().is_int() || t.dtype() == DType::Bool) {
        return None;
    }
    t.to_i64_vec()
        .ok()
        .map(|v| v.into_iter().map(Dim::constant).collect())
}

/// A concrete tensor for a fully constant symbolic content of the given type.
pub fn tensor_of_sym(dtype: DType, shape: &[Dim], sym: &[Dim]) -> Option<Tensor> {
    let values: Option<Vec<i64>> = sym.iter().map(|d| d.as_const()).collect();
    let values = values?;
    let shape: Option<Vec<usize>> = shape
        .iter()
        .map(|d| d.as_const().map(|v| v as usize))
        .collect();
    let shape = shape?;
    let t = match dtype {
        DType::I64 => Tensor::from_vec(shape, values),
        DType::I32 => Tensor::from_vec(shape, values.into_iter().map(|v| v as i32).collect()),
        DType::Bool => Tensor::from_vec(shape, values.into_iter().map(|v| v != 0).collect()),
        _ => return None,
    };
    t.ok()
}

/// Infers the outputs of a node whose inputs are already in `graph`.
pub fn infer_node(
    graph: &Graph,
    node_name: &str,
    op_type: &str,
    op: &dyn Op,
    inputs: &[Option<ValueId>],
) -> Result<Vec<OutputFact>, RuntimeError> {
    // Values rebuilt from constant syms live here so that facts can borrow them.
    let rebuilt: Vec<Option<Tensor>> = inputs
        .iter()
        .map(|v| {
            let v = graph.value((*v)?);
            match (&v.def, &v.sym) {
                (Def::Const(_), _) => None,
                (_, Some(sym)) => tensor_of_sym(v.ty.dtype, &v.ty.shape, sym),
                _ => None,
            }
        })
        .collect();
    let facts: Vec<Option<InputFact<'_>>> = inputs
        .iter()
        .zip(&rebuilt)
        .map(|(v, re)| {
            let id = (*v)?;
            let value = graph.value(id);
            Some(InputFact {
                ty: &value.ty,
                value: graph.const_value(id).or(re.as_ref()),
                sym: value.sym.as_deref(),
            })
        })
        .collect();
    let at = |e: OpError| RuntimeError::at_node(node_name, op_type, e);
    let mut outs = op.infer(&facts).map_err(at)?;

    // Fold small integer computations whose inputs are all known.
    let all_known = facts
        .iter()
        .flatten()
        .all(|f| f.value.is_some_and(|t| t.len() <= MAX_SYM_ELEMENTS));
    let wants_sym = outs.iter().any(|o| {
        o.sym.is_none() && (o.ty.dtype.is_int() || o.ty.dtype == DType::Bool) && o.ty.rank() <= 1
    });
    if all_known && wants_sym && !facts.is_empty() {
        let values: Vec<Option<&Tensor>> = facts.iter().map(|f| f.and_then(|f| f.value)).collect();
        let results = op.eval(&values).map_err(at)?;
        for (o, t) in outs.iter_mut().zip(&results) {
            if o.sym.is_none() {
                o.sym = sym_of_const(t);
            }
        }
    }
    Ok(outs)
}
