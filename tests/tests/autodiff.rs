//! Reverse-mode differentiation over the IR (`patch_passes::autodiff`): every backward rule
//! against central finite differences of the forward graph on random ragged inputs, and the
//! gradients of a whole fixture block and a whole fixture model against torch's autograd
//! (goldens by `models/make_grad_goldens.py`).

use std::collections::HashMap;

use patch_kernels::{pack, TileKind, TileMap, TileShape};
use patch_passes::autodiff::{differentiate, Differentiate, GradRules};
use patch_passes::blocks::{block_graph, find_blocks, BlockGraphSpec};
use patch_passes::hybrid::weight_matmuls;
use patch_passes::{cleanup_pipeline, fuse, fusion_pipeline};
use patch_runtime::dim::shape_of;
use patch_runtime::interp::Plan;
use patch_runtime::ir::{Attr, Attrs, InputRole, OutputRole, TensorType};
use patch_runtime::ops::hybrid::HybridMatMul;
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, Tensor, ValueId};
use patch_tests::{fixture_dir, import_fixture};
use rand::{Rng, SeedableRng};

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn random(r: &mut impl Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        shape.to_vec(),
        (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect(),
    )
    .unwrap()
}

/// A graph under construction: inputs with their values, then nodes.
struct Case {
    g: Graph,
    feeds: Vec<Tensor>,
    reg: OpRegistry,
}

impl Case {
    fn new() -> Case {
        Case {
            g: Graph::new("case", 18),
            feeds: Vec::new(),
            reg: OpRegistry::onnx(),
        }
    }

    fn input(&mut self, name: &str, t: Tensor) -> ValueId {
        let ty = TensorType::new(t.dtype(), shape_of(t.shape()));
        self.feeds.push(t);
        self.g.add_input(name, ty, InputRole::Other).unwrap()
    }

    fn constant(&mut self, name: &str, t: Tensor) -> ValueId {
        self.g.add_const(name, t).unwrap()
    }

    fn node(
        &mut self,
        domain: &str,
        op: &str,
        attrs: Attrs,
        inputs: &[Option<ValueId>],
        outs: usize,
    ) -> Vec<ValueId> {
        let name = format!("n{}", self.g.node_count());
        let names = (0..outs).map(|i| format!("{name}:{i}")).collect();
        self.g
            .add_node(&self.reg, name, domain, op, attrs, inputs.to_vec(), names)
            .unwrap()
    }

    fn op(&mut self, op: &str, attrs: Attrs, inputs: &[ValueId]) -> ValueId {
        let inputs: Vec<_> = inputs.iter().map(|v| Some(*v)).collect();
        self.node("", op, attrs, &inputs, 1)[0]
    }

    /// Checks the gradients of `mean((y − T)²)` (T random) with respect to the inputs named
    /// in `wrt` against central differences; `tol` is relative to each gradient's max-abs.
    fn check(mut self, y: ValueId, wrt: &[&str], eps: f32, tol: f64) {
        let mut r = rng(99);
        let shape: Vec<usize> = self
            .g
            .value(y)
            .ty
            .shape
            .iter()
            .map(|d| d.as_const().expect("concrete shapes") as usize)
            .collect();
        let t = self.constant("target", random(&mut r, &shape));
        let loss = self.node("patch", "MseLoss", Attrs::new(), &[Some(y), Some(t)], 1)[0];
        let loss_name = self.g.value(loss).name.clone();
        self.g.set_outputs(vec![(loss, OutputRole::Other)]);
        let forward = Plan::new(&self.g).unwrap();
        let mut back = self.g.clone();
        let wrt: Vec<String> = wrt.iter().map(|s| s.to_string()).collect();
        differentiate(
            &mut back,
            &self.reg,
            &GradRules::standard(),
            &loss_name,
            &wrt,
        )
        .unwrap();
        back.verify(&self.reg).unwrap();
        let out = Plan::new(&back).unwrap().run(&self.feeds).unwrap();
        let index_of = |name: &str| {
            self.g
                .inputs()
                .iter()
                .position(|(id, _)| self.g.value(*id).name == name)
                .unwrap()
        };
        let loss_at =
            |feeds: &[Tensor]| -> f64 { forward.run(feeds).unwrap()[0].to_f64_vec().unwrap()[0] };
        for (w, name) in wrt.iter().enumerate() {
            let grad = out[1 + w].as_slice::<f32>().unwrap().to_vec();
            let scale = grad.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            assert!(scale > 0.0, "{name}: the gradient is all zeros");
            let i = index_of(name);
            let n = self.feeds[i].len();
            let picks: Vec<usize> = if n <= 24 {
                (0..n).collect()
            } else {
                (0..24).map(|_| r.gen_range(0..n)).collect()
            };
            for e in picks {
                let mut feeds = self.feeds.clone();
                let base = feeds[i].as_slice::<f32>().unwrap().to_vec();
                let at = |d: f32| {
                    let mut v = base.clone();
                    v[e] += d;
                    Tensor::from_vec(feeds_shape(&self.feeds[i]), v).unwrap()
                };
                feeds[i] = at(eps);
                let up = loss_at(&feeds);
                feeds[i] = at(-eps);
                let down = loss_at(&feeds);
                let fd = (up - down) / (2.0 * eps as f64);
                let err = (fd - grad[e] as f64).abs();
                assert!(
                    err <= tol * scale,
                    "{name}[{e}]: gradient {} vs finite difference {fd} (|Δ| {err:.3e} > {tol} × {scale:.3e})",
                    grad[e]
                );
            }
        }
    }
}

fn feeds_shape(t: &Tensor) -> Vec<usize> {
    t.shape().to_vec()
}

const EPS: f32 = 1e-2;
const TOL: f64 = 2e-2;

#[test]
fn elementwise_rules_with_broadcasting() {
    let mut r = rng(1);
    let mut c = Case::new();
    let a = c.input("a", random(&mut r, &[3, 5]));
    let b = c.input("b", random(&mut r, &[5]));
    let d = c.input("d", random(&mut r, &[3, 1]));
    let e = Tensor::from_vec(
        vec![3, 5],
        (0..15).map(|i| 1.5 + (i % 4) as f32 * 0.25).collect(),
    )
    .unwrap();
    let e = c.input("e", e);
    let s = c.op("Add", Attrs::new(), &[a, b]);
    let m = c.op("Mul", Attrs::new(), &[s, d]);
    let q = c.op("Div", Attrs::new(), &[m, e]);
    let n = c.op("Neg", Attrs::new(), &[q]);
    let y = c.op("Sub", Attrs::new(), &[n, b]);
    c.check(y, &["a", "b", "d", "e"], EPS, TOL);
}

#[test]
fn view_transpose_and_concat_rules() {
    let mut r = rng(2);
    let mut c = Case::new();
    let a = c.input("a", random(&mut r, &[2, 3, 4]));
    let b = c.input("b", random(&mut r, &[2, 5, 4]));
    let shape = c.constant("shape", Tensor::from_vec(vec![2], vec![4i64, 6]).unwrap());
    let t = c.op(
        "Transpose",
        Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1])),
        &[a],
    );
    let v = c.op("Reshape", Attrs::new(), &[t, shape]);
    let back_shape = c_shape(&mut c, &[2, 4, 3]);
    let w = c.op("Reshape", Attrs::new(), &[v, back_shape]);
    let w = c.op(
        "Transpose",
        Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1])),
        &[w],
    );
    let y = c.op(
        "Concat",
        Attrs::new().with("axis", Attr::Int(1)),
        &[w, b, w],
    );
    let z = c.node(
        "patch",
        "KvAppend",
        Attrs::new().with("axis", Attr::Int(1)),
        &[Some(b), Some(y)],
        1,
    )[0];
    c.check(z, &["a", "b"], EPS, TOL);
}

fn c_shape(c: &mut Case, dims: &[i64]) -> ValueId {
    let name = format!("shape{}", c.g.value_count());
    c.constant(
        &name,
        Tensor::from_vec(vec![dims.len()], dims.to_vec()).unwrap(),
    )
}

#[test]
fn matmul_and_gemm_rules() {
    let mut r = rng(3);
    let mut c = Case::new();
    let x = c.input("x", random(&mut r, &[2, 3, 5]));
    let w = c.input("w", random(&mut r, &[5, 7]));
    let b = c.input("b", random(&mut r, &[2, 7, 3]));
    let y = c.op("MatMul", Attrs::new(), &[x, w]);
    let z = c.op("MatMul", Attrs::new(), &[y, b]);
    c.check(z, &["x", "w", "b"], EPS, TOL);
    for (ta, tb) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
        let mut c = Case::new();
        let a_shape = if ta == 1 { [5, 3] } else { [3, 5] };
        let b_shape = if tb == 1 { [4, 5] } else { [5, 4] };
        let a = c.input("a", random(&mut r, &a_shape));
        let b = c.input("b", random(&mut r, &b_shape));
        let cc = c.input("c", random(&mut r, &[4]));
        let attrs = Attrs::new()
            .with("transA", Attr::Int(ta))
            .with("transB", Attr::Int(tb))
            .with("alpha", Attr::Float(0.7))
            .with("beta", Attr::Float(1.3));
        let y = c.op("Gemm", attrs, &[a, b, cc]);
        c.check(y, &["a", "b", "c"], EPS, TOL);
    }
}

#[test]
fn gather_rule_scatters_repeated_rows() {
    let mut r = rng(4);
    let mut c = Case::new();
    let data = c.input("data", random(&mut r, &[7, 4]));
    let idx = c.constant(
        "idx",
        Tensor::from_vec(vec![2, 3], vec![1i64, 3, 1, 6, 0, 3]).unwrap(),
    );
    let y = c.op("Gather", Attrs::new(), &[data, idx]);
    c.check(y, &["data"], EPS, TOL);
}

#[test]
fn fused_block_op_rules() {
    let mut r = rng(5);
    // RMSNorm → SwiGLU / Silu over a ragged row width.
    let mut c = Case::new();
    let x = c.input("x", random(&mut r, &[2, 3, 10]));
    let s = c.input("scale", random(&mut r, &[10]));
    let u = c.input("u", random(&mut r, &[2, 3, 10]));
    let n = c.node(
        "patch",
        "RMSNorm",
        Attrs::new().with("epsilon", Attr::Float(1e-5)),
        &[Some(x), Some(s)],
        1,
    )[0];
    let g = c.node("patch", "SwiGLU", Attrs::new(), &[Some(n), Some(u)], 1)[0];
    let y = c.node("patch", "Silu", Attrs::new(), &[Some(g)], 1)[0];
    c.check(y, &["x", "scale", "u"], EPS, TOL);

    // Gemma's MLP and logit cap, fed through Phi-3's fused projection: one product sliced
    // into gate and up (a step-2 slice as well), GeGLU, then Softcap.
    let mut c = Case::new();
    let x = c.input("x", random(&mut r, &[2, 3, 20]));
    let ints = |c: &mut Case, name: &str, v: &[i64]| {
        c.constant(name, Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap())
    };
    let (axis, zero, mid, end, two) = (
        ints(&mut c, "axis", &[-1]),
        ints(&mut c, "zero", &[0]),
        ints(&mut c, "mid", &[10]),
        ints(&mut c, "end", &[20]),
        ints(&mut c, "two", &[2]),
    );
    let gate = c.op("Slice", Attrs::new(), &[x, zero, mid, axis]);
    let up = c.op("Slice", Attrs::new(), &[x, mid, end, axis]);
    let odd = c.op("Slice", Attrs::new(), &[x, mid, end, axis, two]);
    let gg = c.node("patch", "GeGLU", Attrs::new(), &[Some(gate), Some(up)], 1)[0];
    let y = c.node(
        "patch",
        "Softcap",
        Attrs::new().with("cap", Attr::Float(0.8)),
        &[Some(gg)],
        1,
    )[0];
    let z = c.op(
        "Concat",
        Attrs::new().with("axis", Attr::Int(-1)),
        &[y, odd],
    );
    c.check(z, &["x"], EPS, TOL);

    // Rotary, then grouped causal attention in both layouts.
    for layout in ["bhsd", "bshd"] {
        let (b, h, hk, s, d) = (1, 6, 2, 5, 6);
        let mut c = Case::new();
        let (qs, ks) = if layout == "bshd" {
            ([b, s, h, d], [b, s, hk, d])
        } else {
            ([b, h, s, d], [b, hk, s, d])
        };
        let q = c.input("q", random(&mut r, &qs));
        let k = c.input("k", random(&mut r, &ks));
        let v = c.input("v", random(&mut r, &ks));
        let table = |r: &mut rand::rngs::StdRng| {
            if layout == "bshd" {
                random(r, &[s, 1, d])
            } else {
                random(r, &[s, d])
            }
        };
        let cos = c.constant("cos", table(&mut r));
        let sin = c.constant("sin", table(&mut r));
        let mut mask = vec![0f32; s * s];
        for i in 0..s {
            for j in i + 1..s {
                mask[i * s + j] = f32::NEG_INFINITY;
            }
        }
        let mask = c.constant("mask", Tensor::from_vec(vec![s, s], mask).unwrap());
        let rot = Attrs::new().with("half", Attr::Int(d as i64 / 2));
        let qr = c.node(
            "patch",
            "Rotary",
            rot.clone(),
            &[Some(q), Some(cos), Some(sin)],
            1,
        )[0];
        let kr = c.node("patch", "Rotary", rot, &[Some(k), Some(cos), Some(sin)], 1)[0];
        let attrs = Attrs::new()
            .with("scale", Attr::Float(0.4))
            .with("layout", Attr::String(layout.into()));
        // Plain, and softcapped as Gemma 2's (a cap low enough to bend the scores).
        let capped = attrs.clone().with("softcap", Attr::Float(0.7));
        let plain = c.node(
            "patch",
            "Attention",
            attrs,
            &[Some(qr), Some(kr), Some(v), Some(mask)],
            1,
        )[0];
        let soft = c.node(
            "patch",
            "Attention",
            capped,
            &[Some(qr), Some(kr), Some(v), Some(mask)],
            1,
        )[0];
        let y = c.op("Add", Attrs::new(), &[plain, soft]);
        c.check(y, &["q", "k", "v"], EPS, TOL);
    }
}

#[test]
fn loss_rules() {
    let mut r = rng(6);
    let mut c = Case::new();
    let logits = c.input("logits", random(&mut r, &[2, 3, 7]));
    let labels = c.constant(
        "labels",
        Tensor::from_vec(vec![2, 3], vec![0i64, 6, -100, 3, 3, 1]).unwrap(),
    );
    let teacher = c.constant("teacher", random(&mut r, &[2, 3, 7]));
    let ce = c.node(
        "patch",
        "CrossEntropy",
        Attrs::new(),
        &[Some(logits), Some(labels)],
        1,
    )[0];
    let kl = c.node(
        "patch",
        "KlDiv",
        Attrs::new().with("temperature", Attr::Float(2.0)),
        &[Some(logits), Some(teacher)],
        1,
    )[0];
    let y = c.op("Add", Attrs::new(), &[ce, kl]);
    c.check(y, &["logits"], EPS, TOL);
}

#[test]
fn hybrid_matmul_rule_uses_the_packed_weight() {
    let mut r = rng(7);
    let (k, n) = (40, 24);
    let tile = TileShape::new(16, 8).unwrap();
    let (kt, nt) = tile.grid(k, n);
    let kinds: Vec<TileKind> = (0..kt * nt)
        .map(|i| {
            if i % 3 == 0 {
                TileKind::Dense
            } else {
                TileKind::Sparse24
            }
        })
        .collect();
    let map = TileMap::from_kinds(kt, nt, kinds).unwrap();
    let w: Vec<f32> = (0..k * n).map(|_| r.gen_range(-1.0..1.0)).collect();
    // Two of every four K-elements kept in the 2:4 tiles.
    let keep: Vec<bool> = (0..k * n)
        .map(|e| map.get(e / n / tile.k, e % n / tile.n) == TileKind::Dense || (e / n) % 4 < 2)
        .collect();
    let packed = pack(&w, k, n, tile, &map, Some(&keep)).unwrap();
    let (attrs, values, meta) = HybridMatMul::encode(&packed);
    let mut c = Case::new();
    let x = c.input("x", random(&mut r, &[2, 3, k]));
    let res = c.input("res", random(&mut r, &[2, 3, n]));
    let values = c.constant("values", values);
    let meta = c.constant("meta", meta);
    let y = c.node(
        "patch",
        "HybridMatMul",
        attrs,
        &[Some(x), Some(values), Some(meta), None, Some(res)],
        1,
    )[0];
    c.check(y, &["x", "res"], EPS, TOL);
}

#[test]
fn the_pass_names_its_outputs_and_refuses_what_it_cannot_differentiate() {
    let mut r = rng(8);
    let mut c = Case::new();
    let x = c.input("x", random(&mut r, &[3, 4]));
    let idx = c.input("idx", Tensor::from_vec(vec![2], vec![0i64, 2]).unwrap());
    let y = c.op("Gather", Attrs::new(), &[x, idx]);
    let t = c.constant("t", random(&mut r, &[2, 4]));
    let loss = c.node("patch", "MseLoss", Attrs::new(), &[Some(y), Some(t)], 1)[0];
    let name = c.g.value(loss).name.clone();
    c.g.set_outputs(vec![(loss, OutputRole::Other)]);
    let mut g = c.g.clone();
    let pass = Differentiate::new(name.clone(), vec!["x".into()]);
    use patch_passes::Pass;
    pass.run(&mut g, &c.reg).unwrap();
    assert!(g
        .outputs()
        .iter()
        .any(|(v, _)| g.value(*v).name == "grad/x"));
    // Integer indices have no gradient; an unknown value is named.
    let mut g = c.g.clone();
    let err = differentiate(
        &mut g,
        &c.reg,
        &GradRules::standard(),
        &name,
        &["idx".into()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("idx"), "{err}");
    let mut g = c.g.clone();
    let err = differentiate(
        &mut g,
        &c.reg,
        &GradRules::standard(),
        &name,
        &["nope".into()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    // The loss must depend on the value.
    let mut c2 = Case::new();
    let a = c2.input("a", random(&mut r, &[2]));
    let _b = c2.input("b", random(&mut r, &[2]));
    let t = c2.constant("t", random(&mut r, &[2]));
    let loss = c2.node("patch", "MseLoss", Attrs::new(), &[Some(a), Some(t)], 1)[0];
    let name = c2.g.value(loss).name.clone();
    let err = differentiate(
        &mut c2.g,
        &c2.reg,
        &GradRules::standard(),
        &name,
        &["b".into()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not depend"), "{err}");
}

// ---- against torch's autograd ----

struct Golden {
    dir: std::path::PathBuf,
    json: serde_json::Value,
}

impl Golden {
    fn load() -> Golden {
        let dir = fixture_dir("llama_optimum_with_past").join("grads");
        let json = serde_json::from_slice(&std::fs::read(dir.join("grads.json")).unwrap()).unwrap();
        Golden { dir, json }
    }

    fn tensor(&self, entry: &serde_json::Value) -> Tensor {
        let file = entry["file"].as_str().unwrap();
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let bytes = std::fs::read(self.dir.join(file)).unwrap();
        let v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        Tensor::from_vec(shape, v).unwrap()
    }
}

/// The fixture imported, cleaned and fused, as calibration sees it.
fn fused_fixture() -> Graph {
    let reg = OpRegistry::onnx();
    let mut g = import_fixture("llama_optimum_with_past");
    cleanup_pipeline(&reg).run(&mut g).unwrap();
    fusion_pipeline(&reg, fuse::Fuse::new(fuse::FuseLimits::default()))
        .run(&mut g)
        .unwrap();
    g
}

/// Graph inputs for `ids` (batch 1, no past).
fn model_feed(g: &Graph, ids: &[i64]) -> Vec<Tensor> {
    patch_passes::sensitivity::window_feeds(g, ids).unwrap()
}

fn ids_of(case: &serde_json::Value) -> Vec<i64> {
    let ids = &case["input_ids"];
    let row = ids.as_array().unwrap();
    let row = if row[0].is_array() {
        row[0].as_array().unwrap()
    } else {
        row
    };
    row.iter().map(|v| v.as_i64().unwrap()).collect()
}

/// `|a − b| ≤ tol · max|b|` over the whole tensor.
fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{name}: shape");
    let (g, w) = (
        got.as_slice::<f32>().unwrap(),
        want.as_slice::<f32>().unwrap(),
    );
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let worst = g
        .iter()
        .zip(w)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0f64, f64::max);
    eprintln!("{name}: max |Δ| {worst:.3e} (max |golden| {scale:.3e})");
    assert!(
        worst <= tol * scale.max(1e-12),
        "{name}: max |Δ| {worst:.3e} > {tol} × {scale:.3e}"
    );
}

#[test]
fn whole_model_loss_gradient_matches_torch() {
    let golden = Golden::load();
    let case = &golden.json["cases"]["model"];
    let reg = OpRegistry::onnx();
    let mut g = fused_fixture();
    let ids = ids_of(case);
    let logits = g
        .outputs()
        .iter()
        .find(|(_, r)| *r == OutputRole::Logits)
        .map(|(v, _)| *v)
        .unwrap();
    let mut labels: Vec<i64> = ids[1..].to_vec();
    labels.push(-100);
    let labels = g
        .add_const(
            "labels",
            Tensor::from_vec(vec![1, ids.len()], labels).unwrap(),
        )
        .unwrap();
    let loss = g
        .add_node(
            &reg,
            "loss",
            "patch",
            "CrossEntropy",
            Attrs::new(),
            vec![Some(logits), Some(labels)],
            vec!["loss".into()],
        )
        .unwrap()[0];
    g.set_outputs(vec![(loss, OutputRole::Other)]);
    let names: Vec<String> = case["grads"].as_object().unwrap().keys().cloned().collect();
    differentiate(&mut g, &reg, &GradRules::standard(), "loss", &names).unwrap();
    g.verify(&reg).unwrap();
    let out = Plan::new(&g).unwrap().run(&model_feed(&g, &ids)).unwrap();
    let want_loss = golden
        .tensor(&case["tensors"]["loss"])
        .to_f64_vec()
        .unwrap()[0];
    let got_loss = out[0].to_f64_vec().unwrap()[0];
    assert!(
        (got_loss - want_loss).abs() < 1e-5 * want_loss.abs(),
        "loss {got_loss} vs torch {want_loss}"
    );
    for (i, name) in names.iter().enumerate() {
        assert_close(
            name,
            &out[1 + i],
            &golden.tensor(&case["grads"][name]),
            1e-4,
        );
    }
}

#[test]
fn block_gradient_matches_torch() {
    let golden = Golden::load();
    let case = &golden.json["cases"]["block0"];
    let reg = OpRegistry::onnx();
    let ids = ids_of(case);
    // Side values (rotary tables, mask, past) and the block input from a run of the whole
    // model on the same ids.
    let (g, targets, blocks, side, x_seen, _) = fixture_blocks(&ids);
    assert_eq!(blocks.len(), 2, "the fixture has two decoder layers");
    let block = &blocks[0];
    let x = golden.tensor(&case["tensors"]["x"]);
    assert_close("block input (embedding)", &x_seen, &x, 1e-6);
    let spec = BlockGraphSpec {
        shape: x.shape(),
        side: &side,
        trainable: &block.targets,
        with_loss: false,
    };
    let mut bg = block_graph(&g, &reg, block, &targets, &spec).unwrap();
    let weights: Vec<Tensor> = block
        .targets
        .iter()
        .map(|&t| {
            Tensor::from_vec(
                vec![targets[t].k, targets[t].n],
                targets[t].oriented_weight(&g).unwrap(),
            )
            .unwrap()
        })
        .collect();
    let mut feeds = vec![x.clone()];
    feeds.extend(weights.iter().cloned());
    let y = Plan::new(&bg).unwrap().run(&feeds).unwrap().remove(0);
    assert_close(
        "block output",
        &y,
        &golden.tensor(&case["tensors"]["output"]),
        1e-5,
    );
    // L = Σ y·R as mean((y − T)²) with T = y − R·N/2 (so that ∂L/∂y = R).
    let r = golden.tensor(&case["tensors"]["R"]);
    let n = y.len() as f32;
    let t: Vec<f32> = y
        .as_slice::<f32>()
        .unwrap()
        .iter()
        .zip(r.as_slice::<f32>().unwrap())
        .map(|(a, b)| a - b * n / 2.0)
        .collect();
    let tv = bg
        .add_const("T", Tensor::from_vec(y.shape().to_vec(), t).unwrap())
        .unwrap();
    let yv = bg.value_by_name(patch_passes::blocks::OUTPUT).unwrap();
    let loss = bg
        .add_node(
            &reg,
            "loss",
            "patch",
            "MseLoss",
            Attrs::new(),
            vec![Some(yv), Some(tv)],
            vec!["loss".into()],
        )
        .unwrap()[0];
    bg.set_outputs(vec![(loss, OutputRole::Other)]);
    let mut wrt = vec![patch_passes::blocks::INPUT.to_string()];
    wrt.extend(case["grads"].as_object().unwrap().keys().cloned());
    differentiate(&mut bg, &reg, &GradRules::standard(), "loss", &wrt).unwrap();
    let out = Plan::new(&bg).unwrap().run(&feeds).unwrap();
    assert_close(
        "grad x",
        &out[1],
        &golden.tensor(&case["tensors"]["grad_x"]),
        1e-4,
    );
    for (i, name) in wrt.iter().enumerate().skip(1) {
        assert_close(
            name,
            &out[1 + i],
            &golden.tensor(&case["grads"][name]),
            1e-4,
        );
    }
}

// ---- block-wise learning on the fixture ----

/// The fused fixture, its prunable targets, blocks, and the side values, first-block input
/// and every block's output of a run on some ids.
type FixtureBlocks = (
    Graph,
    Vec<patch_passes::hybrid::WeightMatMul>,
    Vec<patch_passes::blocks::Block>,
    HashMap<ValueId, Tensor>,
    Tensor,
    Vec<Tensor>,
);

/// [`FixtureBlocks`] of a run on `ids`.
fn fixture_blocks(ids: &[i64]) -> FixtureBlocks {
    let g = fused_fixture();
    let targets: Vec<_> = weight_matmuls(&g)
        .into_iter()
        .filter(|t| t.rewritable && t.prunable)
        .collect();
    let blocks = find_blocks(&g, &targets).unwrap();
    let mut side: HashMap<ValueId, Tensor> = HashMap::new();
    let mut x = None;
    let mut outputs: Vec<Option<Tensor>> = vec![None; blocks.len()];
    Plan::new(&g)
        .unwrap()
        .run_observed(&model_feed(&g, ids), &mut |node, inputs| {
            for (v, t) in node.inputs.iter().zip(inputs) {
                if let (Some(v), Some(t)) = (v, t) {
                    if blocks.iter().any(|b| b.side.contains(v)) {
                        side.entry(*v).or_insert_with(|| (*t).clone());
                    }
                    if *v == blocks[0].input && x.is_none() {
                        x = Some((*t).clone());
                    }
                    for (b, block) in blocks.iter().enumerate() {
                        if *v == block.output && outputs[b].is_none() {
                            outputs[b] = Some((*t).clone());
                        }
                    }
                }
            }
        })
        .unwrap();
    let outputs = outputs.into_iter().map(|o| o.unwrap()).collect();
    (g, targets, blocks, side, x.unwrap(), outputs)
}

/// What [`learn_on_fixture`] returns: the learned weights, the outcomes, the tile maps used.
type Learned = (
    Vec<patch_passes::masks::blockwise::LearnedWeight>,
    Vec<patch_passes::masks::blockwise::BlockOutcome>,
    Vec<TileMap>,
    TileShape,
);

fn learn_on_fixture(
    windows: Vec<Tensor>,
    dense_outputs: Option<patch_passes::masks::blockwise::DenseOutputs>,
    steps: usize,
) -> Result<Learned, patch_passes::masks::blockwise::BlockwiseError> {
    use patch_passes::masks::blockwise::{learn, BlockwiseInput, BlockwiseOptions};
    let ids: Vec<i64> = (0..16).map(|i| (i * 37 + 5) % 500 + 3).collect();
    let (g, targets, blocks, side, _, _) = fixture_blocks(&ids);
    let reg = OpRegistry::onnx();
    let tile = TileShape::new(16, 16).unwrap();
    let weights: Vec<Vec<f32>> = targets
        .iter()
        .map(|t| t.oriented_weight(&g).unwrap())
        .collect();
    // Half the tiles 2:4.
    let maps: Vec<TileMap> = targets
        .iter()
        .map(|t| {
            let (kt, nt) = tile.grid(t.k, t.n);
            TileMap::spread(kt, nt, 0.5)
        })
        .collect();
    let out = learn(
        BlockwiseInput {
            graph: &g,
            registry: &reg,
            blocks: &blocks,
            targets: &targets,
            weights: &weights,
            maps: &maps,
            tile,
            windows,
            side: &side,
            dense_outputs,
            update_weights: true,
        },
        &BlockwiseOptions {
            steps,
            eval_windows: 2,
            check_every: 4,
            ..BlockwiseOptions::default()
        },
        &|_, _, _| {},
    )?;
    Ok((out.0, out.1, maps, tile))
}

fn fixture_windows(n: usize) -> Vec<Tensor> {
    fixture_stream(n).0
}

/// `n` windows' first-block inputs, and every block's output on them taken from the whole
/// model's run (as the calibration run captures them).
fn fixture_stream(n: usize) -> (Vec<Tensor>, patch_passes::masks::blockwise::DenseOutputs) {
    let mut windows = Vec::new();
    let mut dense = patch_passes::masks::blockwise::DenseOutputs::default();
    for w in 0..n {
        let ids: Vec<i64> = (0..16)
            .map(|i| (i * 37 + 11 * w as i64 + 5) % 500 + 3)
            .collect();
        let (_, _, _, _, x, outputs) = fixture_blocks(&ids);
        windows.push(x);
        for (b, y) in outputs.iter().enumerate() {
            dense.push(b, y).unwrap();
        }
    }
    (windows, dense)
}

#[test]
fn blockwise_learning_is_never_worse_than_its_prior_and_keeps_2_of_4() {
    let (learned, outcomes, maps, tile) = learn_on_fixture(fixture_windows(6), None, 12).unwrap();
    assert_eq!(outcomes.len(), 2);
    for o in &outcomes {
        assert!(o.prior_error.is_finite() && o.prior_error > 0.0, "{o:?}");
        assert!(
            o.error <= o.prior_error,
            "block {}: {} > prior {}",
            o.number,
            o.error,
            o.prior_error
        );
        assert_eq!(o.curve.len(), 12);
    }
    let g = fused_fixture();
    let targets: Vec<_> = weight_matmuls(&g)
        .into_iter()
        .filter(|t| t.rewritable && t.prunable)
        .collect();
    for ((l, t), map) in learned.iter().zip(&targets).zip(&maps) {
        for r in (0..t.k).step_by(4) {
            for c in 0..t.n {
                let kept = (0..4.min(t.k - r))
                    .filter(|q| l.keep[(r + q) * t.n + c])
                    .count();
                if map.get(r / tile.k, c / tile.n) == TileKind::Sparse24 && r + 4 <= t.k {
                    assert_eq!(kept, 2, "{} group ({r}, {c})", t.weight);
                } else if map.get(r / tile.k, c / tile.n) == TileKind::Dense {
                    assert_eq!(kept, 4.min(t.k - r));
                }
            }
        }
        for (w, k) in l.weights.iter().zip(&l.keep) {
            assert!(*k || *w == 0.0, "pruned weights are zero");
        }
    }
}

/// The dense block outputs captured from the whole model's run (kept in bf16) stand in for
/// the dense stream the learner would run itself: the same priors, objectives within the
/// bf16 rounding, the same masks but for a few near-ties.
#[test]
fn captured_dense_outputs_stand_in_for_the_dense_stream() {
    let (windows, dense) = fixture_stream(6);
    let (a, ao, _, _) = learn_on_fixture(windows.clone(), None, 12).unwrap();
    let (b, bo, _, _) = learn_on_fixture(windows.clone(), Some(dense.clone()), 12).unwrap();
    for (x, y) in ao.iter().zip(&bo) {
        let close = |p: f64, q: f64| (p - q).abs() <= 1e-2 * p.abs().max(1e-12);
        assert!(close(x.prior_error, y.prior_error), "{x:?} vs {y:?}");
        assert!(close(x.error, y.error), "{x:?} vs {y:?}");
    }
    let (same, total) = a.iter().zip(&b).fold((0usize, 0usize), |acc, (p, q)| {
        let s = p.keep.iter().zip(&q.keep).filter(|(u, v)| u == v).count();
        (acc.0 + s, acc.1 + p.keep.len())
    });
    assert!(
        same as f64 >= 0.99 * total as f64,
        "{same} of {total} mask elements equal"
    );
    // Outputs that do not cover every block and window are refused.
    let mut short = dense;
    short.blocks.pop();
    let err = learn_on_fixture(windows, Some(short), 4).unwrap_err();
    assert!(err.to_string().contains("captured dense outputs"), "{err}");
}

#[test]
fn blockwise_stops_on_a_non_finite_loss_naming_the_block() {
    let mut windows = fixture_windows(4);
    let mut bad = windows[3].as_slice::<f32>().unwrap().to_vec();
    bad[5] = f32::NAN;
    windows[3] = Tensor::from_vec(windows[3].shape().to_vec(), bad).unwrap();
    let err = learn_on_fixture(windows, None, 4).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("block 0") && msg.contains("not finite"),
        "{msg}"
    );
}

#[test]
fn blocks_that_cannot_be_identified_are_named() {
    let reg = OpRegistry::onnx();
    let mut g = import_fixture("gpt2");
    cleanup_pipeline(&reg).run(&mut g).unwrap();
    fusion_pipeline(&reg, fuse::Fuse::new(fuse::FuseLimits::default()))
        .run(&mut g)
        .unwrap();
    let targets: Vec<_> = weight_matmuls(&g)
        .into_iter()
        .filter(|t| t.rewritable && t.prunable)
        .collect();
    let err = find_blocks(&g, &targets).unwrap_err();
    assert!(err.contains("block") || err.contains("Gemm"), "{err}");
}

#[test]
fn loss_sensitivities_come_from_the_models_own_loss() {
    use patch_passes::sensitivity::{LossGradients, Sensitivity};
    let golden = Golden::load();
    let case = &golden.json["cases"]["model"];
    let reg = OpRegistry::onnx();
    let g = fused_fixture();
    let targets: Vec<_> = weight_matmuls(&g)
        .into_iter()
        .filter(|t| t.rewritable && t.prunable)
        .collect();
    assert!(!targets.is_empty());
    let gradients = LossGradients::new(&g, &reg, &targets).unwrap();
    let ids = ids_of(case);
    let mut acc = Sensitivity::default();
    gradients.observe(&ids, &mut acc).unwrap();
    gradients.observe(&ids, &mut acc).unwrap();
    let acc = acc.finish().unwrap();
    // The loss is torch's cross-entropy of the same tokens; two equal windows average to it.
    let want_loss = golden
        .tensor(&case["tensors"]["loss"])
        .to_f64_vec()
        .unwrap()[0];
    assert!(
        (acc.loss - want_loss).abs() < 1e-5 * want_loss.abs(),
        "loss {} vs torch {want_loss}",
        acc.loss
    );
    assert_eq!(acc.windows, 2);
    assert_eq!(acc.fisher.len(), targets.len());
    for (t, f) in targets.iter().zip(&acc.fisher) {
        assert_eq!(f.len(), t.n, "{}", t.weight);
        assert!(f.iter().all(|v| v.is_finite() && *v >= 0.0), "{}", t.weight);
        assert!(f.iter().any(|v| *v > 0.0), "{}: no sensitivity", t.weight);
    }
    // One token predicts nothing: refused, not divided by zero.
    let mut one = Sensitivity::default();
    assert!(gradients.observe(&ids[..1], &mut one).is_err());
}
