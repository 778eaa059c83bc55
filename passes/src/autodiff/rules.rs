//! One backward rule per op type (see [`super::GradRule`]). Each states the vector-Jacobian
//! product it builds; gradients with respect to inputs that never need one here (shapes,
//! indices, masks, rotary tables, packed weight bytes) are refused with an error naming the
//! node rather than silently dropped.

use patch_runtime::dim::Dim;
use patch_runtime::ir::{Attr, Attrs, Def, Node};
use patch_runtime::ops::hybrid::HybridMatMul;
use patch_runtime::RuntimeError;
use patch_runtime::{Tensor, ValueId};

use super::{rule_error, GradCtx, GradRules};

type Grads = Result<Vec<Option<ValueId>>, RuntimeError>;

pub fn register(r: &mut GradRules) {
    r.register("", "Add", add);
    r.register("", "Sub", sub);
    r.register("", "Mul", mul);
    r.register("", "Div", div);
    r.register("", "Neg", neg);
    r.register("", "Identity", reshape_back);
    r.register("", "Reshape", reshape_back);
    r.register("", "Flatten", reshape_back);
    r.register("", "Squeeze", reshape_back);
    r.register("", "Unsqueeze", reshape_back);
    r.register("", "Transpose", transpose);
    r.register("", "Concat", concat);
    r.register("", "Slice", slice);
    r.register("", "MatMul", matmul);
    r.register("", "Gemm", gemm);
    r.register("", "Gather", gather);
    r.register("patch", "KvAppend", concat);
    r.register("patch", "HybridMatMul", hybrid_matmul);
    r.register("patch", "RMSNorm", rms_norm);
    r.register("patch", "Silu", silu);
    r.register("patch", "SwiGLU", swiglu);
    r.register("patch", "GeGLU", geglu);
    r.register("patch", "Softcap", softcap);
    r.register("patch", "Rotary", rotary);
    r.register("patch", "Attention", attention);
    r.register("patch", "MseLoss", mse_loss);
    r.register("patch", "CrossEntropy", cross_entropy);
    r.register("patch", "KlDiv", kl_div);
}

fn input(node: &Node, i: usize) -> Result<ValueId, RuntimeError> {
    node.inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| rule_error(node, format!("input {i} is missing")))
}

fn out_grad(node: &Node, g: &[Option<ValueId>], i: usize) -> Result<ValueId, RuntimeError> {
    g.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| rule_error(node, format!("output {i} has no gradient")))
}

/// Refuses a gradient for input `i` (a table, a mask, an index).
fn refuse(ctx: &GradCtx<'_>, node: &Node, i: usize, what: &str) -> Result<(), RuntimeError> {
    if ctx.needs(i) {
        return Err(rule_error(
            node,
            format!("input {i} ({what}) is not differentiable here"),
        ));
    }
    Ok(())
}

/// Sums `g` (of the node's output shape) down to the shape of `x` under ONNX's
/// multidirectional broadcasting: over the leading axes `x` lacks and the axes where `x` has
/// a 1 that the output does not.
fn unbroadcast(
    ctx: &mut GradCtx<'_>,
    node: &Node,
    g: ValueId,
    x: ValueId,
) -> Result<ValueId, RuntimeError> {
    let out = ctx.graph.value(g).ty.shape.clone();
    let xs = ctx.graph.value(x).ty.shape.clone();
    if out == xs {
        return Ok(g);
    }
    if xs.len() > out.len() {
        return Err(rule_error(node, "an input has more axes than the output"));
    }
    let lead = out.len() - xs.len();
    let mut axes: Vec<i64> = (0..lead as i64).collect();
    for (a, d) in xs.iter().enumerate() {
        let o = &out[lead + a];
        if d.as_const() == Some(1) && o.as_const() != Some(1) {
            axes.push((lead + a) as i64);
        } else if d != o && d.as_const().is_some() && o.as_const().is_some() {
            return Err(rule_error(
                node,
                format!("cannot reduce a gradient of {out:?} to {xs:?}"),
            ));
        }
    }
    if axes.is_empty() {
        return Ok(g);
    }
    let axes = ctx.ints(&axes)?;
    let summed = ctx.op(
        "ReduceSum",
        Attrs::new().with("keepdims", Attr::Int(1)),
        &[g, axes],
    )?;
    reshape_like(ctx, summed, x)
}

/// `Reshape(v, Shape(like))`, with a constant shape when `like`'s is known.
fn reshape_like(ctx: &mut GradCtx<'_>, v: ValueId, like: ValueId) -> Result<ValueId, RuntimeError> {
    let shape = ctx.graph.value(like).ty.shape.clone();
    if ctx.graph.value(v).ty.shape == shape {
        return Ok(v);
    }
    let target = match shape
        .iter()
        .map(Dim::as_const)
        .collect::<Option<Vec<i64>>>()
    {
        Some(dims) => ctx.ints(&dims)?,
        None => ctx.op("Shape", Attrs::new(), &[like])?,
    };
    ctx.op("Reshape", Attrs::new(), &[v, target])
}

/// `d(a + b) = (g, g)`.
fn add(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let mut res = vec![None, None];
    for (i, r) in res.iter_mut().enumerate() {
        if ctx.needs(i) {
            *r = Some(unbroadcast(ctx, node, dy, input(node, i)?)?);
        }
    }
    Ok(res)
}

/// `d(a − b) = (g, −g)`.
fn sub(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let mut res = vec![None, None];
    if ctx.needs(0) {
        res[0] = Some(unbroadcast(ctx, node, dy, input(node, 0)?)?);
    }
    if ctx.needs(1) {
        let n = ctx.op("Neg", Attrs::new(), &[dy])?;
        res[1] = Some(unbroadcast(ctx, node, n, input(node, 1)?)?);
    }
    Ok(res)
}

/// `d(a · b) = (g · b, g · a)`.
fn mul(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let (a, b) = (input(node, 0)?, input(node, 1)?);
    let mut res = vec![None, None];
    if ctx.needs(0) {
        let p = ctx.op("Mul", Attrs::new(), &[dy, b])?;
        res[0] = Some(unbroadcast(ctx, node, p, a)?);
    }
    if ctx.needs(1) {
        let p = ctx.op("Mul", Attrs::new(), &[dy, a])?;
        res[1] = Some(unbroadcast(ctx, node, p, b)?);
    }
    Ok(res)
}

/// `d(a / b) = (g / b, −g · y / b)`.
fn div(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let (a, b) = (input(node, 0)?, input(node, 1)?);
    let mut res = vec![None, None];
    if ctx.needs(0) {
        let p = ctx.op("Div", Attrs::new(), &[dy, b])?;
        res[0] = Some(unbroadcast(ctx, node, p, a)?);
    }
    if ctx.needs(1) {
        let y = node.outputs[0];
        let p = ctx.op("Mul", Attrs::new(), &[dy, y])?;
        let q = ctx.op("Div", Attrs::new(), &[p, b])?;
        let n = ctx.op("Neg", Attrs::new(), &[q])?;
        res[1] = Some(unbroadcast(ctx, node, n, b)?);
    }
    Ok(res)
}

fn neg(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    Ok(vec![Some(ctx.op("Neg", Attrs::new(), &[dy])?)])
}

/// Views (Reshape, Flatten, Squeeze, Unsqueeze, Identity): the gradient reshaped back to the
/// data input's shape; the shape operands get none.
fn reshape_back(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    for i in 1..node.inputs.len() {
        refuse(ctx, node, i, "a shape or axes operand")?;
    }
    let dy = out_grad(node, g, 0)?;
    let mut res = vec![None; node.inputs.len()];
    res[0] = Some(reshape_like(ctx, dy, input(node, 0)?)?);
    Ok(res)
}

/// `Transpose(g, perm⁻¹)`.
fn transpose(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let rank = ctx.graph.value(dy).ty.rank();
    let perm: Vec<i64> = match node.attrs.get("perm") {
        Some(Attr::Ints(p)) => p.clone(),
        _ => (0..rank as i64).rev().collect(),
    };
    let mut inv = vec![0i64; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        let p = usize::try_from(p)
            .ok()
            .filter(|p| *p < inv.len())
            .ok_or_else(|| rule_error(node, "bad perm"))?;
        inv[p] = i as i64;
    }
    let t = ctx.op(
        "Transpose",
        Attrs::new().with("perm", Attr::Ints(inv)),
        &[dy],
    )?;
    Ok(vec![Some(t)])
}

/// Concat and `patch.KvAppend` (a two-input concat): each needed input gets its slice of `g`
/// along the axis, at offsets summed from the inputs' lengths (constants when known).
fn concat(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let rank = ctx.graph.value(dy).ty.rank() as i64;
    let axis = match node.attrs.get("axis") {
        Some(Attr::Int(a)) => *a,
        _ => return Err(rule_error(node, "needs an integer `axis`")),
    };
    let axis = if axis < 0 { axis + rank } else { axis };
    if !(0..rank).contains(&axis) {
        return Err(rule_error(node, "axis out of range"));
    }
    let axes = ctx.ints(&[axis])?;
    // The start offset as a value, and its constant when known.
    let mut start: (Option<i64>, Option<ValueId>) = (Some(0), None);
    let mut res = vec![None; node.inputs.len()];
    for (i, slot) in res.iter_mut().enumerate() {
        let x = input(node, i)?;
        let len_dim = ctx.graph.value(x).ty.shape[axis as usize].clone();
        let len = match len_dim.as_const() {
            Some(c) => (Some(c), None),
            None => (
                None,
                Some(
                    ctx.op(
                        "Shape",
                        Attrs::new()
                            .with("start", Attr::Int(axis))
                            .with("end", Attr::Int(axis + 1)),
                        &[x],
                    )?,
                ),
            ),
        };
        let as_value = |ctx: &mut GradCtx<'_>, v: (Option<i64>, Option<ValueId>)| match v {
            (Some(c), _) => ctx.ints(&[c]),
            (None, Some(id)) => Ok(id),
            (None, None) => unreachable!("an offset is a constant or a value"),
        };
        let end = match (start, len) {
            ((Some(a), _), (Some(b), _)) => (Some(a + b), None),
            _ => {
                let (s, l) = (as_value(ctx, start)?, as_value(ctx, len)?);
                (None, Some(ctx.op("Add", Attrs::new(), &[s, l])?))
            }
        };
        if ctx.needs(i) {
            let (s, e) = (as_value(ctx, start)?, as_value(ctx, end)?);
            *slot = Some(ctx.op("Slice", Attrs::new(), &[dy, s, e, axes])?);
        }
        start = end;
    }
    Ok(res)
}

/// `Slice(X, starts, ends, axes?, steps?)`: `dX = patch.SliceGrad(X, g, starts, ends, axes?,
/// steps?)`, zeros with `g` where the slice read (Phi-3's fused qkv and gate_up halves); the
/// index operands are not differentiable.
fn slice(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    for i in 1..node.inputs.len() {
        refuse(ctx, node, i, "a slice index")?;
    }
    let dy = out_grad(node, g, 0)?;
    let mut inputs = vec![Some(input(node, 0)?), Some(dy)];
    inputs.extend(node.inputs[1..].iter().copied());
    let d = ctx.node("patch", "SliceGrad", Attrs::new(), inputs, 1)?;
    let mut res = vec![None; node.inputs.len()];
    res[0] = Some(d[0]);
    Ok(res)
}

/// `Y = A · B`: `dA = g · Bᵀ`; `dB = Aᵀ · g` (for a 2-D `B` and batched `A`, the batch rows
/// flattened into one `Gemm` with `transA`).
fn matmul(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let (a, b) = (input(node, 0)?, input(node, 1)?);
    let (ra, rb) = (ctx.graph.value(a).ty.rank(), ctx.graph.value(b).ty.rank());
    if ra < 2 || rb < 2 {
        return Err(rule_error(
            node,
            "no gradient rule for a 1-D MatMul operand",
        ));
    }
    let swap = |r: usize| -> Vec<i64> {
        let mut p: Vec<i64> = (0..r as i64).collect();
        p.swap(r - 1, r - 2);
        p
    };
    let mut res = vec![None, None];
    if ctx.needs(0) {
        let bt = ctx.op(
            "Transpose",
            Attrs::new().with("perm", Attr::Ints(swap(rb))),
            &[b],
        )?;
        let p = ctx.op("MatMul", Attrs::new(), &[dy, bt])?;
        res[0] = Some(unbroadcast(ctx, node, p, a)?);
    }
    if ctx.needs(1) {
        if rb == 2 {
            let bs = ctx.graph.value(b).ty.shape.clone();
            let (k, n) = match (bs[0].as_const(), bs[1].as_const()) {
                (Some(k), Some(n)) => (k, n),
                _ => {
                    return Err(rule_error(
                        node,
                        "the gradient of a weight needs its dimensions known",
                    ))
                }
            };
            let (a2, g2) = if ra == 2 {
                (a, dy)
            } else {
                let sk = ctx.ints(&[-1, k])?;
                let sn = ctx.ints(&[-1, n])?;
                (
                    ctx.op("Reshape", Attrs::new(), &[a, sk])?,
                    ctx.op("Reshape", Attrs::new(), &[dy, sn])?,
                )
            };
            res[1] = Some(ctx.op("Gemm", Attrs::new().with("transA", Attr::Int(1)), &[a2, g2])?);
        } else {
            let at = ctx.op(
                "Transpose",
                Attrs::new().with("perm", Attr::Ints(swap(ra))),
                &[a],
            )?;
            let p = ctx.op("MatMul", Attrs::new(), &[at, dy])?;
            res[1] = Some(unbroadcast(ctx, node, p, b)?);
        }
    }
    Ok(res)
}

/// `Y = α·op(A)·op(B) + β·C` (2-D): the four transpose cases of `dA` and `dB` as Gemms, and
/// `dC = β·g` reduced to C's shape.
fn gemm(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let int = |n: &str| match node.attrs.get(n) {
        Some(Attr::Int(v)) => *v != 0,
        _ => false,
    };
    let float = |n: &str| match node.attrs.get(n) {
        Some(Attr::Float(v)) => *v,
        _ => 1.0,
    };
    let (ta, tb, alpha, beta) = (int("transA"), int("transB"), float("alpha"), float("beta"));
    let (a, b) = (input(node, 0)?, input(node, 1)?);
    let gemm_attrs = |t_a: bool, t_b: bool| {
        Attrs::new()
            .with("transA", Attr::Int(t_a as i64))
            .with("transB", Attr::Int(t_b as i64))
            .with("alpha", Attr::Float(alpha))
    };
    let mut res = vec![None; node.inputs.len()];
    if ctx.needs(0) {
        res[0] = Some(if !ta {
            ctx.op("Gemm", gemm_attrs(false, !tb), &[dy, b])?
        } else {
            ctx.op("Gemm", gemm_attrs(tb, true), &[b, dy])?
        });
    }
    if ctx.needs(1) {
        res[1] = Some(if !tb {
            ctx.op("Gemm", gemm_attrs(!ta, false), &[a, dy])?
        } else {
            ctx.op("Gemm", gemm_attrs(true, ta), &[dy, a])?
        });
    }
    if ctx.needs(2) {
        let c = input(node, 2)?;
        let scaled = if beta == 1.0 {
            dy
        } else {
            let s = ctx.constant(Tensor::scalar(beta))?;
            ctx.op("Mul", Attrs::new(), &[dy, s])?
        };
        res[2] = Some(unbroadcast(ctx, node, scaled, c)?);
    }
    Ok(res)
}

/// `Gather(Data, Indices)`: `patch.GatherGrad` scatters `g` back into Data's shape.
fn gather(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    refuse(ctx, node, 1, "indices")?;
    let dy = out_grad(node, g, 0)?;
    let axis = match node.attrs.get("axis") {
        Some(Attr::Int(a)) => *a,
        _ => 0,
    };
    let (data, idx) = (input(node, 0)?, input(node, 1)?);
    let d = ctx.node(
        "patch",
        "GatherGrad",
        Attrs::new().with("axis", Attr::Int(axis)),
        vec![Some(data), Some(idx), Some(dy)],
        1,
    )?;
    Ok(vec![Some(d[0]), None])
}

/// `patch.HybridMatMul(X, values, meta, bias?, residual?)`: `dX = g · Wᵀ` with the packed
/// weight unpacked once into a constant (the packed bytes themselves are not trainable: a
/// training graph reads its weights as plain MatMul inputs); `dbias` = g summed over rows,
/// `dresidual = g`.
fn hybrid_matmul(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    refuse(ctx, node, 1, "packed weight bytes")?;
    refuse(ctx, node, 2, "packed weight metadata")?;
    let dy = out_grad(node, g, 0)?;
    let mut res = vec![None; node.inputs.len()];
    if ctx.needs(0) {
        let konst = |i: usize| -> Result<Tensor, RuntimeError> {
            let v = input(node, i)?;
            match &ctx.graph.value(v).def {
                Def::Const(t) => Ok(t.clone()),
                _ => Err(rule_error(node, "the packed weight must be a constant")),
            }
        };
        let (values, meta) = (konst(1)?, konst(2)?);
        let op = HybridMatMul::from_attrs(&node.attrs)
            .map_err(|e| RuntimeError::at_node(&node.name, "patch.HybridMatMul", e))?;
        let w = op
            .weight(&values, &meta)
            .map_err(|e| RuntimeError::at_node(&node.name, "patch.HybridMatMul", e))?;
        let (k, n) = (w.k(), w.n());
        let dense = w.unpack_f32();
        // Wᵀ, row-major [n, k].
        let mut wt = vec![0f32; k * n];
        for r in 0..k {
            for c in 0..n {
                wt[c * k + r] = dense[r * n + c];
            }
        }
        let wt = ctx.constant(Tensor::from_vec(vec![n, k], wt)?)?;
        let p = ctx.op("MatMul", Attrs::new(), &[dy, wt])?;
        res[0] = Some(p);
    }
    if ctx.needs(3) {
        res[3] = Some(unbroadcast(ctx, node, dy, input(node, 3)?)?);
    }
    if ctx.needs(4) {
        res[4] = Some(dy);
    }
    Ok(res)
}

/// Copies the attributes named `keys` from the forward node.
fn attrs_of(node: &Node, keys: &[&str]) -> Attrs {
    let mut a = Attrs::new();
    for k in keys {
        if let Some(v) = node.attrs.get(k) {
            a = a.with(k, v.clone());
        }
    }
    a
}

/// `patch.RMSNorm(X, Scale?)` → `patch.RMSNormGrad(X, Scale?, g)` = `(dX, dScale)`.
fn rms_norm(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let scale = node.inputs.get(1).copied().flatten();
    let outs = ctx.node(
        "patch",
        "RMSNormGrad",
        attrs_of(node, &["epsilon", "axis"]),
        vec![Some(input(node, 0)?), scale, Some(dy)],
        2,
    )?;
    let mut res = vec![Some(outs[0])];
    if node.inputs.len() > 1 {
        res.push(Some(outs[1]));
    }
    Ok(res)
}

fn silu(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let d = ctx.node(
        "patch",
        "SiluGrad",
        Attrs::new(),
        vec![Some(input(node, 0)?), Some(dy)],
        1,
    )?;
    Ok(vec![Some(d[0])])
}

fn swiglu(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let d = ctx.node(
        "patch",
        "SwiGLUGrad",
        Attrs::new(),
        vec![Some(input(node, 0)?), Some(input(node, 1)?), Some(dy)],
        2,
    )?;
    Ok(vec![Some(d[0]), Some(d[1])])
}

fn geglu(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let d = ctx.node(
        "patch",
        "GeGLUGrad",
        Attrs::new(),
        vec![Some(input(node, 0)?), Some(input(node, 1)?), Some(dy)],
        2,
    )?;
    Ok(vec![Some(d[0]), Some(d[1])])
}

fn softcap(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dy = out_grad(node, g, 0)?;
    let d = ctx.node(
        "patch",
        "SoftcapGrad",
        attrs_of(node, &["cap"]),
        vec![Some(input(node, 0)?), Some(dy)],
        1,
    )?;
    Ok(vec![Some(d[0])])
}

/// `patch.Rotary(X, Cos, Sin)`: `patch.RotaryGrad(g, Cos, Sin)` (the transposed rotation);
/// the tables are constants of the positions.
fn rotary(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    refuse(ctx, node, 1, "the cosine table")?;
    refuse(ctx, node, 2, "the sine table")?;
    let dy = out_grad(node, g, 0)?;
    let d = ctx.node(
        "patch",
        "RotaryGrad",
        attrs_of(node, &["half", "axis"]),
        vec![Some(dy), Some(input(node, 1)?), Some(input(node, 2)?)],
        1,
    )?;
    Ok(vec![Some(d[0]), None, None])
}

/// `patch.Attention(Q, K, V, Mask?)` → `patch.AttentionGrad(Q, K, V, Mask?, g)` =
/// `(dQ, dK, dV)`, the probabilities recomputed (nothing of the forward kept but its inputs).
fn attention(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    refuse(ctx, node, 3, "the additive mask")?;
    let dy = out_grad(node, g, 0)?;
    let mask = node.inputs.get(3).copied().flatten();
    let d = ctx.node(
        "patch",
        "AttentionGrad",
        attrs_of(node, &["scale", "softcap", "layout"]),
        vec![
            Some(input(node, 0)?),
            Some(input(node, 1)?),
            Some(input(node, 2)?),
            mask,
            Some(dy),
        ],
        3,
    )?;
    let mut res = vec![Some(d[0]), Some(d[1]), Some(d[2])];
    if node.inputs.len() > 3 {
        res.push(None);
    }
    Ok(res)
}

/// `patch.MseLoss(Y, T)`: `dY = patch.MseLossGrad(Y, T, g)`, `dT = −dY`.
fn mse_loss(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    let dl = out_grad(node, g, 0)?;
    let (y, t) = (input(node, 0)?, input(node, 1)?);
    let d = ctx.node(
        "patch",
        "MseLossGrad",
        Attrs::new(),
        vec![Some(y), Some(t), Some(dl)],
        1,
    )?[0];
    let dt = if ctx.needs(1) {
        Some(ctx.op("Neg", Attrs::new(), &[d])?)
    } else {
        None
    };
    Ok(vec![Some(d), dt])
}

/// `patch.CrossEntropy(Logits, Labels)`: the logits' gradient; labels have none.
fn cross_entropy(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    refuse(ctx, node, 1, "labels")?;
    let dl = out_grad(node, g, 0)?;
    let d = ctx.node(
        "patch",
        "CrossEntropyGrad",
        attrs_of(node, &["ignore_index"]),
        vec![Some(input(node, 0)?), Some(input(node, 1)?), Some(dl)],
        1,
    )?;
    Ok(vec![Some(d[0]), None])
}

/// `patch.KlDiv(Logits, TeacherLogits)`: the student's gradient; the teacher is not trained.
fn kl_div(ctx: &mut GradCtx<'_>, node: &Node, g: &[Option<ValueId>]) -> Grads {
    refuse(ctx, node, 1, "teacher logits")?;
    let dl = out_grad(node, g, 0)?;
    let d = ctx.node(
        "patch",
        "KlDivGrad",
        attrs_of(node, &["temperature"]),
        vec![Some(input(node, 0)?), Some(input(node, 1)?), Some(dl)],
        1,
    )?;
    Ok(vec![Some(d[0]), None])
}
