//! Normalizations over the trailing axes: `LayerNormalization` (opset 17) and
//! `RMSNormalization` (opset 23). The fusion passes' `patch.RMSNorm` lives in `fused.rs`.
//!
//! Both normalize each row `X[i, axis..]` (the input viewed as `[outer, inner]` with
//! `outer = prod(shape[..axis])`) with f64 statistics and f64 arithmetic, then round to the
//! output type. `Scale` and `B` broadcast unidirectionally to the normalized shape
//! `shape[axis..]`.

use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};

use super::elementwise::cast;
use super::linalg::check_unidirectional;
use super::{arity, norm_axis, opt, req, InputFact, Op, OpError, OpRegistry, OutputFact};
use crate::dim::{Dim, Shape};
use crate::dtype::DType;
use crate::ir::{Attrs, TensorType};
use crate::tensor::Tensor;

pub fn register(r: &mut OpRegistry) {
    r.register("", "LayerNormalization", 17, |attrs, _| {
        Ok(Arc::new(Norm::from_attrs(attrs, NormKind::Layer)?))
    });
    r.register("", "RMSNormalization", 23, |attrs, _| {
        Ok(Arc::new(Norm::from_attrs(attrs, NormKind::Rms)?))
    });
}

fn tensor_err(e: crate::RuntimeError) -> OpError {
    OpError::Invalid(e.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) * scale + bias`; outputs Y, Mean, InvStdDev.
    Layer,
    /// `x / sqrt(mean(x^2) + eps) * scale`; output Y.
    Rms,
}

/// `LayerNormalization(X, Scale, B?) -> (Y, Mean?, InvStdDev?)` or
/// `RMSNormalization(X, scale) -> Y`.
#[derive(Debug)]
pub struct Norm {
    pub kind: NormKind,
    pub axis: i64,
    pub epsilon: f32,
    /// Element type of Mean and InvStdDev (LayerNormalization's `stash_type`).
    pub stash: DType,
}

impl Norm {
    pub fn from_attrs(attrs: &Attrs, kind: NormKind) -> Result<Norm, OpError> {
        let code = attrs.int_or("stash_type", 1)?;
        let stash = DType::from_onnx(code as i32)
            .filter(|d| d.is_float())
            .ok_or_else(|| OpError::BadAttr {
                name: "stash_type".into(),
                msg: format!("{code} is not a float element type code"),
            })?;
        Ok(Norm {
            kind,
            axis: attrs.int_or("axis", -1)?,
            epsilon: attrs.float_or("epsilon", 1e-5)?,
            stash,
        })
    }

    fn op_type(&self) -> &'static str {
        match self.kind {
            NormKind::Layer => "LayerNormalization",
            NormKind::Rms => "RMSNormalization",
        }
    }

    fn max_inputs(&self) -> usize {
        match self.kind {
            NormKind::Layer => 3,
            NormKind::Rms => 2,
        }
    }

    fn check_float(&self, index: usize, d: DType) -> Result<(), OpError> {
        if d.is_float() {
            Ok(())
        } else {
            Err(OpError::DType {
                index,
                got: d,
                expected: format!("a float type for {}", self.op_type()),
            })
        }
    }

    /// Output type of Y: X's for LayerNormalization, the scale's for RMSNormalization
    /// (whose `V` may differ from `T`).
    fn y_dtype(&self, x: DType, scale: DType) -> Result<DType, OpError> {
        match self.kind {
            NormKind::Layer if scale != x => Err(OpError::DType {
                index: 1,
                got: scale,
                expected: format!("{x} like X"),
            }),
            NormKind::Layer => Ok(x),
            NormKind::Rms => Ok(scale),
        }
    }

    /// Shape of Mean and InvStdDev: `shape[..axis]` followed by ones.
    fn stat_shape<D: Clone>(shape: &[D], axis: usize, one: D) -> Vec<D> {
        shape
            .iter()
            .enumerate()
            .map(|(i, d)| if i < axis { d.clone() } else { one.clone() })
            .collect()
    }

    /// Evaluates on concrete tensors; returns Y and, for LayerNormalization, Mean and
    /// InvStdDev.
    pub fn run(
        &self,
        x: &Tensor,
        scale: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Vec<Tensor>, OpError> {
        self.check_float(0, x.dtype())?;
        self.check_float(1, scale.dtype())?;
        let y_dtype = self.y_dtype(x.dtype(), scale.dtype())?;
        if let Some(b) = bias {
            if b.dtype() != y_dtype {
                return Err(OpError::DType {
                    index: 2,
                    got: b.dtype(),
                    expected: format!("{y_dtype} like X"),
                });
            }
        }
        let axis = norm_axis(self.axis, x.rank())?;
        let shape = x.shape();
        let inner_shape = &shape[axis..];
        let inner: usize = inner_shape.iter().product();
        let outer: usize = shape[..axis].iter().product();
        let scale_v = broadcast_inner(scale, inner_shape, "Scale")?;
        let bias_v = bias
            .map(|b| broadcast_inner(b, inner_shape, "B"))
            .transpose()?;
        let xv = x.to_f64_vec().map_err(tensor_err)?;
        let eps = self.epsilon as f64;
        let mut y = vec![0f64; xv.len()];
        let mut means = Vec::with_capacity(outer);
        let mut inv_stds = Vec::with_capacity(outer);
        if inner > 0 {
            for (row, out) in xv.chunks_exact(inner).zip(y.chunks_exact_mut(inner)) {
                let n = inner as f64;
                let (mean, inv_std) = match self.kind {
                    NormKind::Layer => {
                        let mean = row.iter().sum::<f64>() / n;
                        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
                        (mean, 1.0 / (var + eps).sqrt())
                    }
                    NormKind::Rms => {
                        let ms = row.iter().map(|v| v * v).sum::<f64>() / n;
                        (0.0, 1.0 / (ms + eps).sqrt())
                    }
                };
                for (j, (o, &v)) in out.iter_mut().zip(row).enumerate() {
                    *o = (v - mean) * inv_std * scale_v[j] + bias_v.as_ref().map_or(0.0, |b| b[j]);
                }
                means.push(mean);
                inv_stds.push(inv_std);
            }
        } else {
            // No elements to normalize: statistics are undefined.
            means.resize(outer, f64::NAN);
            inv_stds.resize(outer, f64::NAN);
        }
        let make = |shape: Vec<usize>, v: Vec<f64>, to: DType| {
            cast(&Tensor::from_vec(shape, v).map_err(tensor_err)?, to)
        };
        let y = make(shape.to_vec(), y, y_dtype)?;
        if self.kind == NormKind::Rms {
            return Ok(vec![y]);
        }
        let stat = Self::stat_shape(shape, axis, 1);
        Ok(vec![
            y,
            make(stat.clone(), means, self.stash)?,
            make(stat, inv_stds, self.stash)?,
        ])
    }
}

/// `t` broadcast unidirectionally to the normalized shape, as f64 in row-major order.
fn broadcast_inner(t: &Tensor, inner_shape: &[usize], what: &str) -> Result<Vec<f64>, OpError> {
    let v = t.to_f64_vec().map_err(tensor_err)?;
    let a = ArrayD::from_shape_vec(IxDyn(t.shape()), v)
        .map_err(|e| OpError::Invalid(format!("{what}: {e}")))?;
    let b = a.broadcast(IxDyn(inner_shape)).ok_or_else(|| {
        OpError::Shape(format!(
            "{what} of shape {:?} does not broadcast to the normalized shape {inner_shape:?}",
            t.shape()
        ))
    })?;
    Ok(b.iter().copied().collect())
}

impl Op for Norm {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 2, self.max_inputs())?;
        let (x, scale) = (req(inputs, 0)?, req(inputs, 1)?);
        self.check_float(0, x.ty.dtype)?;
        self.check_float(1, scale.ty.dtype)?;
        let y_dtype = self.y_dtype(x.ty.dtype, scale.ty.dtype)?;
        let axis = norm_axis(self.axis, x.ty.rank())?;
        let inner: Shape = x.ty.shape[axis..].to_vec();
        let what = |name: &str| format!("{} {name}", self.op_type());
        check_unidirectional(&scale.ty.shape, &inner, &what("Scale"))?;
        if let Some(b) = opt(inputs, 2) {
            if b.ty.dtype != y_dtype {
                return Err(OpError::DType {
                    index: 2,
                    got: b.ty.dtype,
                    expected: format!("{y_dtype} like X"),
                });
            }
            check_unidirectional(&b.ty.shape, &inner, &what("B"))?;
        }
        let y = OutputFact::new(TensorType::new(y_dtype, x.ty.shape.clone()));
        if self.kind == NormKind::Rms {
            return Ok(vec![y]);
        }
        let stat = TensorType::new(
            self.stash,
            Self::stat_shape(&x.ty.shape, axis, Dim::constant(1)),
        );
        Ok(vec![
            y,
            OutputFact::new(stat.clone()),
            OutputFact::new(stat),
        ])
    }

    fn eval(&self, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, OpError> {
        arity(inputs, 2, self.max_inputs())?;
        self.run(req(inputs, 0)?, req(inputs, 1)?, opt(inputs, 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dim::shape_to_string;
    use crate::ir::Attr;
    use half::f16;

    fn fact(ty: &TensorType) -> InputFact<'_> {
        InputFact {
            ty,
            value: None,
            sym: None,
        }
    }

    fn layer(axis: i64, eps: f32) -> Norm {
        Norm::from_attrs(
            &Attrs::new()
                .with("axis", Attr::Int(axis))
                .with("epsilon", Attr::Float(eps)),
            NormKind::Layer,
        )
        .unwrap()
    }

    /// The input ONNX Runtime was run on: arange(24) as [2, 3, 4] with x[0, 0, 0] = 10,
    /// Scale = linspace(0.5, 2, 12) as [3, 4].
    fn ort_case() -> (Tensor, Tensor) {
        let mut v: Vec<f32> = (0..24).map(|i| i as f32).collect();
        v[0] = 10.0;
        let x = Tensor::from_vec(vec![2, 3, 4], v).unwrap();
        let s: Vec<f32> = (0..12)
            .map(|i| (0.5 + i as f64 * 1.5 / 11.0) as f32)
            .collect();
        (x, Tensor::from_vec(vec![3, 4], s).unwrap())
    }

    fn close(got: &[f32], want: &[f32], tol: f32) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn layer_norm_matches_onnx_runtime() {
        let (x, s) = ort_case();
        let b = Tensor::from_vec(vec![3, 4], vec![0.1f32; 12]).unwrap();
        let out = layer(1, 1e-3)
            .eval(&[Some(&x), Some(&s), Some(&b)])
            .unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].shape(), &[2, 3, 4]);
        close(
            &out[0].as_slice::<f32>().unwrap()[..5],
            &[
                0.668_769_06,
                -0.952_927_9,
                -0.938_826_2,
                -0.840_114_3,
                -0.656_791_9,
            ],
            1e-5,
        );
        assert_eq!(out[1].shape(), &[2, 1, 1]);
        assert_eq!(out[1].dtype(), DType::F32);
        close(
            out[1].as_slice::<f32>().unwrap(),
            &[6.333_333_5, 17.5],
            1e-5,
        );
        assert_eq!(out[2].shape(), &[2, 1, 1]);
        close(
            out[2].as_slice::<f32>().unwrap(),
            &[0.310_237_68, 0.289_670_56],
            1e-6,
        );
    }

    #[test]
    fn layer_norm_last_axis_matches_naive_with_broadcast_scale() {
        // [2, 3, 5] over the last axis, no bias, ragged values.
        let v: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.0).collect();
        let x = Tensor::from_vec(vec![2, 3, 5], v.clone()).unwrap();
        let s = Tensor::from_vec(vec![5], vec![1f32, 2., 0.5, -1., 3.]).unwrap();
        let op = Norm::from_attrs(&Attrs::new(), NormKind::Layer).unwrap();
        assert_eq!(op.axis, -1);
        assert_eq!(op.epsilon, 1e-5);
        let out = op.eval(&[Some(&x), Some(&s)]).unwrap();
        let y = out[0].as_slice::<f32>().unwrap();
        let sv = s.as_slice::<f32>().unwrap();
        for r in 0..6 {
            let row: Vec<f64> = v[r * 5..r * 5 + 5].iter().map(|&x| x as f64).collect();
            let mean = row.iter().sum::<f64>() / 5.0;
            let var = row.iter().map(|x| x * x).sum::<f64>() / 5.0 - mean * mean;
            for j in 0..5 {
                let want = (row[j] - mean) / (var + 1e-5).sqrt() * sv[j] as f64;
                assert!((y[r * 5 + j] as f64 - want).abs() < 1e-5);
            }
        }
        assert_eq!(out[1].shape(), &[2, 3, 1]);
        // Scale that does not broadcast to the normalized shape.
        let bad = Tensor::from_vec(vec![3], vec![1f32; 3]).unwrap();
        assert!(matches!(
            op.eval(&[Some(&x), Some(&bad)]),
            Err(OpError::Shape(_))
        ));
        // f16 in, f16 out; statistics in the stash type (f32).
        let xh = cast(&x, DType::F16).unwrap();
        let sh = cast(&s, DType::F16).unwrap();
        let out = op.eval(&[Some(&xh), Some(&sh)]).unwrap();
        assert_eq!(out[0].dtype(), DType::F16);
        assert_eq!(out[1].dtype(), DType::F32);
        let yh = out[0].as_slice::<f16>().unwrap();
        assert!((yh[3].to_f32() - y[3]).abs() < 1e-2);
    }

    #[test]
    fn layer_norm_infers_optional_outputs_symbolically() {
        let x = TensorType::new(
            DType::F32,
            vec![Dim::sym("batch"), Dim::sym("seq"), Dim::constant(768)],
        );
        let s = TensorType::new(DType::F32, vec![Dim::constant(768)]);
        let op = Norm::from_attrs(&Attrs::new(), NormKind::Layer).unwrap();
        let out = op
            .infer(&[Some(fact(&x)), Some(fact(&s)), Some(fact(&s))])
            .unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].ty, x);
        assert_eq!(shape_to_string(&out[1].ty.shape), "[batch, seq, 1]");
        assert_eq!(out[2].ty, out[1].ty);
        assert_eq!(out[1].ty.dtype, DType::F32);
        // Axis 1 keeps only the leading dim; stash_type f64 types the statistics.
        let op = Norm::from_attrs(
            &Attrs::new()
                .with("axis", Attr::Int(1))
                .with("stash_type", Attr::Int(11)),
            NormKind::Layer,
        )
        .unwrap();
        let s2 = TensorType::new(DType::F32, vec![Dim::sym("seq"), Dim::constant(768)]);
        let out = op.infer(&[Some(fact(&x)), Some(fact(&s2)), None]).unwrap();
        assert_eq!(shape_to_string(&out[1].ty.shape), "[batch, 1, 1]");
        assert_eq!(out[1].ty.dtype, DType::F64);
        // Mismatched scale, wrong dtype, bad axis, bad stash type.
        let bad = TensorType::new(DType::F32, vec![Dim::constant(512)]);
        let err = op.infer(&[Some(fact(&x)), Some(fact(&bad))]).unwrap_err();
        assert!(err.to_string().contains("[512]"), "{err}");
        let h = TensorType::new(DType::F16, vec![Dim::constant(768)]);
        assert!(matches!(
            op.infer(&[Some(fact(&x)), Some(fact(&h))]),
            Err(OpError::DType { index: 1, .. })
        ));
        assert!(layer(3, 1e-5)
            .infer(&[Some(fact(&x)), Some(fact(&s))])
            .is_err());
        assert!(Norm::from_attrs(
            &Attrs::new().with("stash_type", Attr::Int(7)),
            NormKind::Layer
        )
        .is_err());
        let i = TensorType::new(DType::I64, vec![Dim::constant(768)]);
        assert!(layer(-1, 1e-5)
            .infer(&[Some(fact(&i)), Some(fact(&i))])
            .is_err());
    }

    #[test]
    fn rms_norm_matches_onnx_runtime() {
        let mut r = OpRegistry::empty();
        register(&mut r);
        let attrs = Attrs::new()
            .with("axis", Attr::Int(1))
            .with("epsilon", Attr::Float(1e-3));
        assert!(r.build("", "RMSNormalization", 22, &attrs, "n").is_err());
        let (x, s) = ort_case();
        {
            let op = r.build("", "RMSNormalization", 23, &attrs, "n").unwrap();
            let out = op.eval(&[Some(&x), Some(&s)]).unwrap();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].shape(), &[2, 3, 4]);
            close(
                &out[0].as_slice::<f32>().unwrap()[..6],
                &[
                    0.703_590_6,
                    0.089_547_89,
                    0.217_473_45,
                    0.383_776_7,
                    0.588_457_6,
                    0.831_516_1,
                ],
                1e-6,
            );
            assert!(op.eval(&[Some(&x), Some(&s), Some(&s)]).is_err());
        }
        let op = r
            .build("", "RMSNormalization", 23, &Attrs::new(), "n")
            .unwrap();
        // Y takes the scale's type, which may differ from X's.
        let xt = TensorType::new(DType::F32, vec![Dim::sym("batch"), Dim::constant(64)]);
        let st = TensorType::new(DType::F16, vec![Dim::constant(64)]);
        let out = op.infer(&[Some(fact(&xt)), Some(fact(&st))]).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].ty, TensorType::new(DType::F16, xt.shape.clone()));
        let xv = Tensor::from_vec(vec![1, 2], vec![3f32, 4.]).unwrap();
        let sv = Tensor::from_vec(vec![2], vec![f16::from_f32(1.0), f16::from_f32(2.0)]).unwrap();
        let y = op.eval(&[Some(&xv), Some(&sv)]).unwrap();
        assert_eq!(y[0].dtype(), DType::F16);
        // rms = sqrt(12.5 + 1e-5)
        let rms = (12.5f64 + 1e-5).sqrt();
        let want = [3.0 / rms, 8.0 / rms];
        for (g, w) in y[0].to_f64_vec().unwrap().iter().zip(want) {
            assert!((g - w).abs() < 1e-3, "{g} vs {w}");
        }
    }

    #[test]
    fn empty_rows_do_not_panic() {
        let x = Tensor::zeros(DType::F32, vec![2, 0]);
        let s = Tensor::zeros(DType::F32, vec![0]);
        let out = layer(-1, 1e-5).eval(&[Some(&x), Some(&s)]).unwrap();
        assert_eq!(out[0].shape(), &[2, 0]);
        assert_eq!(out[1].shape(), &[2, 1]);
        let x = Tensor::zeros(DType::F32, vec![0, 4]);
        let s = Tensor::zeros(DType::F32, vec![4]);
        let out = layer(-1, 1e-5).eval(&[Some(&x), Some(&s)]).unwrap();
        assert_eq!(out[1].shape(), &[0, 1]);
    }
}
