//! `patch.HybridMatMul`: `Y[..., N] = X[..., K] · W (+ bias)` over a packed hybrid
//! dense / 2:4 weight (see `patch_kernels::format`), run by the CPU kernels.
//!
//! The node carries the packed weight as two constant inputs, exactly the bytes the packer
//! produced, so a loaded bundle hands the kernels slices of its memory map:
//!
//! | input | type | content |
//! |---|---|---|
//! | 0 `X` | f32 `[..., K]` | activations |
//! | 1 `values` | u8 `[bytes]` | [`PackedWeight::values`] |
//! | 2 `meta` | u32 `[words]` | [`PackedWeight::meta`] (empty when every tile is dense) |
//! | 3 `bias` (optional) | f32 `[N]` | added to every row |
//! | 4 `residual` (optional) | f32, the output's shape | added to the output (a folded residual `Add`) |
//!
//! Attributes: `k`, `n`, `tile` (`[tile_k, tile_n]`), `weight_dtype` (`f32`, `bf16`, `f16`),
//! `tile_kinds` (row-major over the tile grid: 0 dense, 1 2:4).

use std::sync::{Arc, Mutex};

use patch_kernels::format::SharedBytes;
use patch_kernels::{
    CpuKernels, GroupProduct, PackedWeight, TileKind, TileMap, TileShape, WeightDtype,
};

use super::{arity, opt, req, InputFact, Op, OpError, OpRegistry, OutputFact, Outputs};
use crate::dim::Dim;
use crate::dtype::DType;
use crate::ir::{Attr, Attrs, TensorType};
use crate::pool::OutBuf;
use crate::tensor::Tensor;

pub const DOMAIN: &str = "patch";
pub const OP_TYPE: &str = "HybridMatMul";

pub fn register(r: &mut OpRegistry) {
    r.register(DOMAIN, OP_TYPE, 1, |attrs, _| {
        Ok(Arc::new(HybridMatMul::from_attrs(attrs)?))
    });
}

pub fn dtype_name(d: WeightDtype) -> &'static str {
    match d {
        WeightDtype::F32 => "f32",
        WeightDtype::Bf16 => "bf16",
        WeightDtype::F16 => "f16",
    }
}

pub fn dtype_from_name(s: &str) -> Option<WeightDtype> {
    match s {
        "f32" => Some(WeightDtype::F32),
        "bf16" => Some(WeightDtype::Bf16),
        "f16" => Some(WeightDtype::F16),
        _ => None,
    }
}

/// The packed weight's description (everything but its bytes).
#[derive(Debug)]
pub struct HybridMatMul {
    pub k: usize,
    pub n: usize,
    pub tile: TileShape,
    pub dtype: WeightDtype,
    pub map: TileMap,
    /// The weight built over the bytes last seen, keyed by their address and length: the
    /// inputs are constants, so this is built once per loaded graph.
    cache: Mutex<Option<(usize, usize, Arc<PackedWeight>)>>,
}

impl HybridMatMul {
    pub fn from_attrs(attrs: &Attrs) -> Result<HybridMatMul, OpError> {
        let bad = |name: &str, msg: String| OpError::BadAttr {
            name: name.into(),
            msg,
        };
        let dim = |name: &str| -> Result<usize, OpError> {
            let v = attrs.req_int(name)?;
            usize::try_from(v).map_err(|_| bad(name, format!("{v} is negative")))
        };
        let (k, n) = (dim("k")?, dim("n")?);
        let tile = match attrs.ints("tile")? {
            Some(&[tk, tn]) if tk > 0 && tn > 0 => {
                TileShape::new(tk as usize, tn as usize).map_err(|e| bad("tile", e.to_string()))?
            }
            Some(other) => {
                return Err(bad(
                    "tile",
                    format!("expected [tile_k, tile_n], got {other:?}"),
                ))
            }
            None => return Err(OpError::MissingAttr("tile".into())),
        };
        let dtype_attr = attrs
            .string("weight_dtype")?
            .ok_or_else(|| OpError::MissingAttr("weight_dtype".into()))?;
        let dtype = dtype_from_name(dtype_attr).ok_or_else(|| {
            bad(
                "weight_dtype",
                format!("`{dtype_attr}` is not f32, bf16 or f16"),
            )
        })?;
        let (kt, nt) = tile.grid(k, n);
        let codes = attrs
            .ints("tile_kinds")?
            .ok_or_else(|| OpError::MissingAttr("tile_kinds".into()))?;
        let kinds = codes
            .iter()
            .map(|&c| match c {
                0 => Ok(TileKind::Dense),
                1 => Ok(TileKind::Sparse24),
                _ => Err(bad(
                    "tile_kinds",
                    format!("{c} is neither 0 (dense) nor 1 (2:4)"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let map =
            TileMap::from_kinds(kt, nt, kinds).map_err(|e| bad("tile_kinds", e.to_string()))?;
        Ok(HybridMatMul {
            k,
            n,
            tile,
            dtype,
            map,
            cache: Mutex::new(None),
        })
    }

    /// The node attributes and constant inputs (`values`, `meta`) that describe `w`.
    pub fn encode(w: &PackedWeight) -> (Attrs, Tensor, Tensor) {
        let map = w.tile_map();
        let kinds = map
            .kinds()
            .iter()
            .map(|k| match k {
                TileKind::Dense => 0,
                TileKind::Sparse24 => 1,
            })
            .collect();
        let attrs = Attrs::new()
            .with("k", Attr::Int(w.k() as i64))
            .with("n", Attr::Int(w.n() as i64))
            .with(
                "tile",
                Attr::Ints(vec![w.tile_shape().k as i64, w.tile_shape().n as i64]),
            )
            .with("weight_dtype", Attr::String(dtype_name(w.dtype()).into()))
            .with("tile_kinds", Attr::Ints(kinds));
        let values = w.values().to_vec();
        let meta = w.meta().to_vec();
        let values = Tensor::from_vec(vec![values.len()], values).expect("1-D volume");
        let meta = Tensor::from_vec(vec![meta.len()], meta).expect("1-D volume");
        (attrs, values, meta)
    }

    /// The packed weight over the given constant inputs (cached by address).
    pub fn weight(&self, values: &Tensor, meta: &Tensor) -> Result<Arc<PackedWeight>, OpError> {
        let key = (values.bytes().as_ptr() as usize, values.bytes().len());
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((p, l, w)) = cache.as_ref() {
            if (*p, *l) == key {
                return Ok(w.clone());
            }
        }
        let shared = |t: &Tensor| -> SharedBytes { Arc::new(t.bytes().clone()) };
        let w = PackedWeight::from_parts(
            self.k,
            self.n,
            self.tile,
            self.dtype,
            self.map.clone(),
            shared(values),
            shared(&meta.to_aligned()),
        )
        .map_err(|e| OpError::Invalid(format!("packed weight: {e}")))?;
        let w = Arc::new(w);
        *cache = Some((key.0, key.1, w.clone()));
        Ok(w)
    }
}

impl Op for HybridMatMul {
    fn infer(&self, inputs: &[Option<InputFact<'_>>]) -> Result<Vec<OutputFact>, OpError> {
        arity(inputs, 3, 5)?;
        let x = req(inputs, 0)?;
        let expect = |index: usize, got: DType, want: DType| {
            if got == want {
                Ok(())
            } else {
                Err(OpError::DType {
                    index,
                    got,
                    expected: want.to_string(),
                })
            }
        };
        expect(0, x.ty.dtype, DType::F32)?;
        expect(1, req(inputs, 1)?.ty.dtype, DType::U8)?;
        expect(2, req(inputs, 2)?.ty.dtype, DType::U32)?;
        if let Some(b) = opt(inputs, 3) {
            expect(3, b.ty.dtype, DType::F32)?;
            if b.ty.shape.len() != 1 || b.ty.shape[0] != Dim::from(self.n as i64) {
                return Err(OpError::Shape(format!(
                    "bias must be [{}], got {}",
                    self.n,
                    crate::dim::shape_to_string(&b.ty.shape)
                )));
            }
        }
        let shape = &x.ty.shape;
        match shape.last() {
            Some(d) if d.as_const() == Some(self.k as i64) => {}
            Some(d) if d.as_const().is_none() => {
                return Err(OpError::Shape(format!(
                    "X's last dim must be K = {}, got the symbolic `{d}`",
                    self.k
                )))
            }
            _ => {
                return Err(OpError::Shape(format!(
                    "X must be [..., {}], got {}",
                    self.k,
                    crate::dim::shape_to_string(shape)
                )))
            }
        }
        let mut out = shape.clone();
        *out.last_mut().expect("rank ≥ 1") = Dim::from(self.n as i64);
        if let Some(r) = opt(inputs, 4) {
            expect(4, r.ty.dtype, DType::F32)?;
            if r.ty.shape != out {
                return Err(OpError::Shape(format!(
                    "residual must have the output's shape {}, got {}",
                    crate::dim::shape_to_string(&out),
                    crate::dim::shape_to_string(&r.ty.shape)
                )));
            }
        }
        Ok(vec![OutputFact::new(TensorType::new(DType::F32, out))])
    }

    fn eval_into(
        &self,
        inputs: &[Option<&Tensor>],
        outputs: &Outputs<'_>,
    ) -> Result<Vec<Tensor>, OpError> {
        HybridMatMul::eval_group(&[(self, inputs, *outputs)])
    }
}

impl HybridMatMul {
    /// Evaluates sibling products that read the same X (`inputs[0]` of every member is the
    /// same tensor: Q/K/V, gate/up) in one kernel dispatch, which pads and rounds X once and
    /// splits all their column panels across the threads together. One output per member,
    /// written into the buffer its [`Outputs`] gives.
    pub fn eval_group(
        members: &[(&HybridMatMul, &[Option<&Tensor>], Outputs<'_>)],
    ) -> Result<Vec<Tensor>, OpError> {
        let invalid = |e: crate::RuntimeError| OpError::Invalid(e.to_string());
        let Some(&(_, first, _)) = members.first() else {
            return Ok(Vec::new());
        };
        let x = req(first, 0)?;
        let shape = x.shape();
        let m: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        let mut weights = Vec::with_capacity(members.len());
        let mut biases = Vec::with_capacity(members.len());
        for &(op, inputs, _) in members {
            arity(inputs, 3, 5)?;
            if !std::ptr::eq(req(inputs, 0)?, x) {
                return Err(OpError::Invalid(
                    "grouped products must read the same X".into(),
                ));
            }
            if shape.last() != Some(&op.k) {
                return Err(OpError::Shape(format!(
                    "X must be [..., {}], got {shape:?}",
                    op.k
                )));
            }
            weights.push(op.weight(req(inputs, 1)?, req(inputs, 2)?)?);
            biases.push(
                opt(inputs, 3)
                    .map(|b| b.as_slice::<f32>())
                    .transpose()
                    .map_err(invalid)?,
            );
        }
        let mut ys: Vec<OutBuf> = members
            .iter()
            .map(|(op, _, outputs)| outputs.f32(0, m * op.n))
            .collect();
        let kernels = CpuKernels::global().map_err(|e| OpError::Invalid(e.to_string()))?;
        let mut products: Vec<GroupProduct<'_>> = weights
            .iter()
            .zip(&biases)
            .zip(ys.iter_mut())
            .map(|((w, &bias), y)| GroupProduct { w, bias, y })
            .collect();
        kernels
            .matmul_group(m, x.as_slice::<f32>().map_err(invalid)?, &mut products)
            .map_err(|e| OpError::Invalid(e.to_string()))?;
        drop(products);
        let mut outs = Vec::with_capacity(members.len());
        for ((op, inputs, _), mut y) in members.iter().zip(ys) {
            let mut out_shape = shape.to_vec();
            *out_shape.last_mut().expect("rank ≥ 1") = op.n;
            if let Some(r) = opt(inputs, 4) {
                if r.shape() != out_shape.as_slice() {
                    return Err(OpError::Shape(format!(
                        "residual {:?} must have the output's shape {out_shape:?}",
                        r.shape()
                    )));
                }
                for (a, b) in y.iter_mut().zip(r.as_slice::<f32>().map_err(invalid)?) {
                    *a += b;
                }
            }
            outs.push(y.into_tensor(out_shape).map_err(invalid)?);
        }
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patch_kernels::format::{magnitude_24_mask, pack};
    use patch_kernels::reference::gemm_f32;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn run(op: &HybridMatMul, x: &Tensor, values: &Tensor, meta: &Tensor) -> Tensor {
        let out = op.eval(&[Some(x), Some(values), Some(meta)]).unwrap();
        out.into_iter().next().unwrap()
    }

    #[test]
    fn matches_the_reference_gemm_on_a_ragged_mixed_weight() {
        let mut rng = StdRng::seed_from_u64(7);
        let (k, n) = (70, 45);
        let w: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let tile = TileShape::new(32, 16).unwrap();
        let (kt, nt) = tile.grid(k, n);
        let map = TileMap::spread(kt, nt, 0.5);
        let mask = magnitude_24_mask(&w, k, n, tile, &map).unwrap();
        let packed = pack(&w, k, n, tile, &map, Some(&mask)).unwrap();
        let (attrs, values, meta) = HybridMatMul::encode(&packed);
        let op = HybridMatMul::from_attrs(&attrs).unwrap();
        let pruned = packed.unpack_f32();
        for m in [1, 3, 17] {
            let xs: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let x = Tensor::from_vec(vec![1, m, k], xs.clone()).unwrap();
            let y = run(&op, &x, &values, &meta);
            assert_eq!(y.shape(), &[1, m, n]);
            let mut want = vec![0f32; m * n];
            gemm_f32(m, k, n, &xs, &pruned, None, &mut want);
            let got = y.as_slice::<f32>().unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "m = {m}: max abs error {err}");
        }
    }

    #[test]
    fn a_residual_is_added_to_the_output() {
        let (k, n) = (8, 4);
        let w: Vec<f32> = (0..k * n).map(|i| i as f32 / 10.0).collect();
        let tile = TileShape::new(8, 4).unwrap();
        let packed = pack(
            &w,
            k,
            n,
            tile,
            &TileMap::uniform(1, 1, TileKind::Dense),
            None,
        )
        .unwrap();
        let (attrs, values, meta) = HybridMatMul::encode(&packed);
        let op = HybridMatMul::from_attrs(&attrs).unwrap();
        let x = Tensor::from_vec(vec![2, k], (0..2 * k).map(|i| i as f32).collect()).unwrap();
        let r =
            Tensor::from_vec(vec![2, n], vec![0.5f32, -1.0, 2.0, 7.0, 1.0, 1.0, 1.0, 1.0]).unwrap();
        let plain = run(&op, &x, &values, &meta);
        let with = op
            .eval(&[Some(&x), Some(&values), Some(&meta), None, Some(&r)])
            .unwrap()
            .remove(0);
        let (p, w2, rr) = (
            plain.as_slice::<f32>().unwrap(),
            with.as_slice::<f32>().unwrap(),
            r.as_slice::<f32>().unwrap(),
        );
        for i in 0..2 * n {
            assert_eq!(w2[i], p[i] + rr[i]);
        }
        let wrong = Tensor::from_vec(vec![1, n], vec![0f32; n]).unwrap();
        let err = op
            .eval(&[Some(&x), Some(&values), Some(&meta), None, Some(&wrong)])
            .unwrap_err();
        assert!(err.to_string().contains("residual"), "{err}");
    }

    #[test]
    fn rejects_bytes_that_do_not_fit_the_attributes() {
        let w = vec![1f32; 8 * 8];
        let tile = TileShape::new(8, 8).unwrap();
        let packed = pack(
            &w,
            8,
            8,
            tile,
            &TileMap::uniform(1, 1, TileKind::Dense),
            None,
        )
        .unwrap();
        let (attrs, values, meta) = HybridMatMul::encode(&packed);
        let op = HybridMatMul::from_attrs(&attrs).unwrap();
        let short = Tensor::from_vec(vec![10], vec![0u8; 10]).unwrap();
        let x = Tensor::from_vec(vec![1, 8], vec![1f32; 8]).unwrap();
        let err = op.eval(&[Some(&x), Some(&short), Some(&meta)]).unwrap_err();
        assert!(err.to_string().contains("value bytes"), "{err}");
        let wrong_k = Tensor::from_vec(vec![1, 7], vec![1f32; 7]).unwrap();
        let err = op
            .eval(&[Some(&wrong_k), Some(&values), Some(&meta)])
            .unwrap_err();
        assert!(err.to_string().contains("[..., 8]"), "{err}");
        let bad = attrs
            .clone()
            .with("weight_dtype", Attr::String("int4".into()));
        assert!(HybridMatMul::from_attrs(&bad)
            .unwrap_err()
            .to_string()
            .contains("int4"));
    }
}
