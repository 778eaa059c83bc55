//! The CUDA backend.
//!
//! Runs everywhere:
//! * every LLaMA-layout fixture, compiled hybrid and fused, places its whole forward pass on
//!   the device (no value produced there is read back by a host op; GPT-2's unfused attention
//!   still crosses at its QKV Split and softmax NaN guard);
//! * NVRTC compiles every kernel source for every architecture CI targets (needs libnvrtc;
//!   skipped with a message without it, unless `PATCH_REQUIRE_NVRTC=1`);
//! * without a CUDA driver, opening the backend is a clear error, not a panic.
//!
//! Runs only where a GPU is (skipped with a message otherwise, unless `PATCH_REQUIRE_GPU=1`):
//! every device kernel against the CPU reference ops on random inputs with ragged shapes, the
//! hybrid products for every weight dtype and both kernel paths (GEMV and tensor cores), and
//! every fixture's outputs against the CPU interpreter.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use patch_compiler::pipeline::{self, CompileOptions};
use patch_kernels::reference::uniform_values as randoms;
use patch_kernels::{magnitude_24_mask, pack, TileMap, TileShape, WeightDtype};
use patch_runtime::bundle::{self, LoadOptions};
use patch_runtime::cuda::{
    compile_cubin, driver_available, nvrtc_available, placement, CudaDevice, CudaError, CudaPlan,
    Placement, Value,
};
use patch_runtime::ir::{Attr, Attrs};
use patch_runtime::llm::{Backend, LanguageModel, LlmError};
use patch_runtime::ops::hybrid::HybridMatMul;
use patch_runtime::ops::OpRegistry;
use patch_runtime::{interp, DType, Graph, InputRole, OutputRole, Tensor, TensorType};
use patch_tests::{
    fixture_dir, max_abs_diff, read_case, smollm2_model, stage_fixture, CASES, FIXTURES,
};

fn require(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// The GPU, or `None` (with the reason on stderr) where there is none.
fn gpu() -> Option<Arc<CudaDevice>> {
    if !driver_available() {
        let msg = "skipped: no CUDA driver on this machine (the GPU tests run where one is)";
        assert!(!require("PATCH_REQUIRE_GPU"), "{msg} (PATCH_REQUIRE_GPU=1)");
        eprintln!("{msg}");
        return None;
    }
    match CudaDevice::open(0) {
        Ok(dev) => Some(dev),
        Err(e @ (CudaError::NoGpu(_) | CudaError::NoDevice { .. })) => {
            assert!(!require("PATCH_REQUIRE_GPU"), "{e} (PATCH_REQUIRE_GPU=1)");
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("a GPU is present but the backend does not open: {e}"),
    }
}

/// Compiles fixture `name` with `sparsity` of 16×16 tiles in `weights` (fused) into a bundle
/// in `dir`; returns its graph and path.
fn compile_fixture(
    name: &str,
    dir: &Path,
    sparsity: f64,
    weights: WeightDtype,
) -> (Graph, PathBuf) {
    let model = stage_fixture(name, dir);
    let out = dir.join(format!("{name}-{sparsity}-{weights}.patch"));
    let mut opts = CompileOptions::new(model, out.clone());
    opts.sparsity = sparsity;
    opts.weights = weights;
    opts.tile = TileShape::new(16, 16).unwrap();
    opts.calib.method = patch_passes::masks::Method::Magnitude;
    pipeline::compile(&opts, &OpRegistry::onnx()).unwrap();
    let graph = bundle::load_bundle(&out, &OpRegistry::onnx(), LoadOptions::default())
        .unwrap()
        .contents
        .graph;
    (graph, out)
}

#[test]
fn every_fixture_runs_its_forward_pass_on_the_device() {
    for name in FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let (graph, _) = compile_fixture(name, dir.path(), 0.3, WeightDtype::Bf16);
        let (places, back) = placement(&graph);
        let mut on_device = 0;
        for ((_, node), p) in graph.nodes().zip(&places) {
            let heavy = matches!(
                node.op_type.as_str(),
                "HybridMatMul"
                    | "MatMul"
                    | "RMSNorm"
                    | "LayerNormalization"
                    | "Attention"
                    | "Rotary"
                    | "SwiGLU"
                    | "Gelu"
                    | "Softmax"
            );
            if heavy {
                assert_eq!(
                    *p,
                    Placement::Device,
                    "{name}: node `{}` ({}) must run on the device",
                    node.name,
                    node.op_type
                );
            }
            on_device += usize::from(*p == Placement::Device);
        }
        println!(
            "{name:<26} {on_device} of {} nodes on the device, {} device-to-host crossings",
            places.len(),
            back.len()
        );
        // GPT-2's attention is not fused: its QKV Split and the Where(IsNaN) guard after the
        // softmax have no device kernel yet, and are the only crossings allowed.
        let allowed: &[&str] = if name == "gpt2" {
            &["Split", "IsNaN", "Where"]
        } else {
            &[]
        };
        let unexpected: Vec<_> = back
            .iter()
            .filter(|c| !allowed.contains(&c.op.as_str()))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{name}: these host ops read device values every step: {unexpected:#?}"
        );
    }
}

#[test]
fn nvrtc_compiles_every_kernel_for_every_architecture() {
    if !nvrtc_available() {
        let msg = "skipped: libnvrtc is not on the library path (CI installs \
                   nvidia-cuda-nvrtc-cu12 and sets LD_LIBRARY_PATH)";
        assert!(
            !require("PATCH_REQUIRE_NVRTC"),
            "{msg} (PATCH_REQUIRE_NVRTC=1)"
        );
        eprintln!("{msg}");
        return;
    }
    for (file, source) in patch_kernels::cuda::SOURCES {
        for arch in patch_kernels::cuda::ARCHS {
            let cubin = compile_cubin(file, source, arch)
                .unwrap_or_else(|e| panic!("{file} for {arch}: {e}"));
            assert_eq!(&cubin[..4], b"\x7fELF", "{file} for {arch}: not a cubin");
            println!("{file:<10} {arch}: {} bytes of SASS", cubin.len());
        }
    }
    // A compile error comes back with the file, the architecture and NVRTC's log.
    let err = compile_cubin(
        "broken.cu",
        "extern \"C\" __global__ void k() { nope; }",
        "sm_80",
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("broken.cu") && msg.contains("sm_80") && msg.contains("nope"),
        "{msg}"
    );
}

#[test]
fn without_a_driver_the_backend_fails_cleanly() {
    if driver_available() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    let err = CudaDevice::open(0).unwrap_err();
    assert!(matches!(err, CudaError::NoDriver), "{err}");
    assert!(err.to_string().contains("--backend cpu"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let (_, out) = compile_fixture("llama_optimum_with_past", dir.path(), 0.0, WeightDtype::F32);
    let loaded = bundle::load_bundle(&out, &OpRegistry::onnx(), LoadOptions::default()).unwrap();
    match LanguageModel::with_backend(loaded.contents, Backend::Cuda { device: 0 }) {
        Err(LlmError::Backend(msg)) => assert!(msg.contains("no CUDA driver"), "{msg}"),
        other => panic!("expected a backend error, got {other:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// On a GPU
// ------------------------------------------------------------------------------------------

fn run_both(dev: &Arc<CudaDevice>, graph: &Graph, inputs: &[Tensor]) -> (Vec<Tensor>, Vec<Tensor>) {
    let want = interp::run(graph, inputs).unwrap();
    let plan = CudaPlan::new(dev.clone(), graph).unwrap();
    let got = plan
        .run(inputs.iter().cloned().map(Value::Host).collect())
        .unwrap()
        .iter()
        .map(|v| v.to_host(dev).unwrap())
        .collect();
    (want, got)
}

#[test]
fn hybrid_products_match_the_cpu_for_every_dtype_shape_and_path() {
    let Some(dev) = gpu() else { return };
    let registry = OpRegistry::onnx();
    // (k, n, tile): ragged edges in both directions, tiles not multiples of the warp shapes.
    let shapes = [
        (200, 72, (64, 48)),
        (64, 32, (32, 16)),
        (576, 192, (128, 128)),
        (100, 40, (36, 24)),
    ];
    for (k, n, (tk, tn)) in shapes {
        let tile = TileShape::new(tk, tn).unwrap();
        let (kt, nt) = tile.grid(k, n);
        for dtype in WeightDtype::ALL {
            let w = randoms(k * n, (k * 31 + n) as u64);
            let map = TileMap::spread(kt, nt, 0.5);
            let keep = magnitude_24_mask(&w, k, n, tile, &map).unwrap();
            let packed = match dtype {
                WeightDtype::F32 => pack(&w, k, n, tile, &map, Some(&keep)),
                WeightDtype::Bf16 => {
                    let v: Vec<_> = w
                        .iter()
                        .map(|&x| patch_kernels::bf16::from_f32(x))
                        .collect();
                    pack(&v, k, n, tile, &map, Some(&keep))
                }
                WeightDtype::F16 => {
                    let v: Vec<_> = w.iter().map(|&x| patch_kernels::f16::from_f32(x)).collect();
                    pack(&v, k, n, tile, &map, Some(&keep))
                }
            }
            .unwrap();
            let dense = packed.unpack_f32();
            for m in [1, 3, 8, 9, 33, 70] {
                let mut g = Graph::new("hybrid", 18);
                let x = g
                    .add_input(
                        "x",
                        TensorType::new(DType::F32, patch_runtime::dim::shape_of(&[m, k])),
                        InputRole::Other,
                    )
                    .unwrap();
                let (attrs, values, meta) = HybridMatMul::encode(&packed);
                let v = g.add_const("values", values).unwrap();
                let mt = g.add_const("meta", meta).unwrap();
                let b = g
                    .add_const("bias", Tensor::from_vec(vec![n], randoms(n, 7)).unwrap())
                    .unwrap();
                let y = g
                    .add_node(
                        &registry,
                        "mm",
                        "patch",
                        "HybridMatMul",
                        attrs,
                        vec![Some(x), Some(v), Some(mt), Some(b)],
                        vec!["y".into()],
                    )
                    .unwrap();
                g.set_outputs(vec![(y[0], OutputRole::Other)]);
                let xs = randoms(m * k, m as u64);
                let input = Tensor::from_vec(vec![m, k], xs.clone()).unwrap();
                let (want, got) = run_both(&dev, &g, &[input]);
                let (want, got) = (
                    want[0].as_slice::<f32>().unwrap(),
                    got[0].as_slice::<f32>().unwrap(),
                );
                // Bound: f32 rounding, plus activations rounded to 16 bits on the tensor-core
                // path (relative 2^-8 for bf16 per product).
                let rel = if dtype == WeightDtype::F32 {
                    1e-5
                } else {
                    1.0 / 64.0
                };
                for r in 0..m {
                    for c in 0..n {
                        let mag: f32 = (0..k)
                            .map(|i| (xs[r * k + i] * dense[i * n + c]).abs())
                            .sum();
                        let d = (want[r * n + c] - got[r * n + c]).abs();
                        assert!(
                            d <= rel * mag + 1e-5,
                            "{dtype} k={k} n={n} tile={tk}x{tn} m={m}: y[{r},{c}] cpu {} gpu {} (bound {})",
                            want[r * n + c],
                            got[r * n + c],
                            rel * mag
                        );
                    }
                }
            }
        }
    }
}

/// One node over random f32 inputs of the given shapes (plus constant `extra` inputs).
fn single_node(
    op: (&str, &str),
    attrs: Attrs,
    shapes: &[&[usize]],
    seed: u64,
) -> (Graph, Vec<Tensor>) {
    let registry = OpRegistry::onnx();
    let mut g = Graph::new(op.1, 18);
    let mut ids = Vec::new();
    let mut inputs = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let ty = TensorType::new(DType::F32, patch_runtime::dim::shape_of(s));
        ids.push(Some(
            g.add_input(format!("in{i}"), ty, InputRole::Other).unwrap(),
        ));
        let n: usize = s.iter().product();
        inputs.push(Tensor::from_vec(s.to_vec(), randoms(n, seed + i as u64)).unwrap());
    }
    let out = g
        .add_node(&registry, "n", op.0, op.1, attrs, ids, vec!["y".into()])
        .unwrap();
    g.set_outputs(vec![(out[0], OutputRole::Other)]);
    (g, inputs)
}

#[test]
fn device_ops_match_the_reference_ops() {
    let Some(dev) = gpu() else { return };
    let int = |v: i64| Attr::Int(v);
    let cases: Vec<(&str, &str, Attrs, Vec<Vec<usize>>)> = vec![
        ("", "Add", Attrs::new(), vec![vec![2, 3, 5], vec![3, 1]]),
        ("", "Sub", Attrs::new(), vec![vec![7, 33], vec![33]]),
        ("", "Mul", Attrs::new(), vec![vec![1, 4, 1], vec![2, 1, 9]]),
        ("", "Div", Attrs::new(), vec![vec![5, 6], vec![5, 6]]),
        ("", "Max", Attrs::new(), vec![vec![3, 70], vec![1, 70]]),
        ("", "Neg", Attrs::new(), vec![vec![1000]]),
        ("", "Exp", Attrs::new(), vec![vec![3, 257]]),
        ("", "Sigmoid", Attrs::new(), vec![vec![300]]),
        ("", "Tanh", Attrs::new(), vec![vec![300]]),
        ("", "Sin", Attrs::new(), vec![vec![2, 64]]),
        ("", "Cos", Attrs::new(), vec![vec![2, 64]]),
        ("", "Erf", Attrs::new(), vec![vec![99]]),
        ("patch", "Silu", Attrs::new(), vec![vec![4, 130]]),
        ("patch", "Gelu", Attrs::new(), vec![vec![4, 130]]),
        (
            "patch",
            "SwiGLU",
            Attrs::new(),
            vec![vec![3, 1, 1536], vec![3, 1, 1536]],
        ),
        (
            "",
            "Softmax",
            Attrs::new().with("axis", int(-1)),
            vec![vec![3, 5, 77]],
        ),
        (
            "patch",
            "RMSNorm",
            Attrs::new().with("epsilon", Attr::Float(1e-5)),
            vec![vec![2, 7, 576], vec![576]],
        ),
        ("patch", "RMSNorm", Attrs::new(), vec![vec![3, 20]]),
        (
            "",
            "LayerNormalization",
            Attrs::new().with("axis", int(-1)),
            vec![vec![5, 768], vec![768], vec![768]],
        ),
        (
            "patch",
            "Rotary",
            Attrs::new().with("half", int(32)),
            vec![vec![1, 9, 5, 64], vec![1, 1, 5, 64], vec![1, 1, 5, 64]],
        ),
        (
            "patch",
            "Rotary",
            Attrs::new().with("half", int(4)),
            vec![vec![2, 3, 8], vec![3, 8], vec![3, 8]],
        ),
        (
            "patch",
            "Attention",
            Attrs::new().with("scale", Attr::Float(0.125)),
            vec![vec![1, 9, 1, 64], vec![1, 3, 11, 64], vec![1, 3, 11, 64]],
        ),
        (
            "patch",
            "Attention",
            Attrs::new().with("scale", Attr::Float(0.3)),
            vec![
                vec![2, 4, 7, 16],
                vec![2, 4, 7, 16],
                vec![2, 4, 7, 16],
                vec![1, 1, 7, 7],
            ],
        ),
        (
            "",
            "MatMul",
            Attrs::new(),
            vec![vec![2, 5, 33], vec![33, 17]],
        ),
        (
            "",
            "MatMul",
            Attrs::new(),
            vec![vec![3, 40, 70], vec![3, 70, 9]],
        ),
        (
            "",
            "Transpose",
            Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1, 3])),
            vec![vec![2, 3, 5, 7]],
        ),
        (
            "",
            "Concat",
            Attrs::new().with("axis", int(2)),
            vec![vec![1, 3, 4, 8], vec![1, 3, 1, 8]],
        ),
    ];
    for (domain, op, attrs, shapes) in cases {
        let shapes: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
        let (g, inputs) = single_node((domain, op), attrs, &shapes, 11);
        let (want, got) = run_both(&dev, &g, &inputs);
        let d = max_abs_diff(&got[0], &want[0]);
        println!("{op:<20} {shapes:?}: max |gpu - cpu| = {d:.2e}");
        assert!(
            d <= 2e-5 * (1.0 + max_abs(&want[0])),
            "{op} {shapes:?}: {d}"
        );
        assert_eq!(got[0].shape(), want[0].shape(), "{op}");
    }
}

#[test]
fn gather_and_expand_match_the_reference_ops() {
    let Some(dev) = gpu() else { return };
    let registry = OpRegistry::onnx();
    let shape = |d: &[usize]| patch_runtime::dim::shape_of(d);
    // Embedding lookup with a negative index, and a broadcast copy.
    let mut g = Graph::new("gather_expand", 18);
    let table = g
        .add_input(
            "table",
            TensorType::new(DType::F32, shape(&[50, 24])),
            InputRole::Other,
        )
        .unwrap();
    let ids = g
        .add_const(
            "ids",
            Tensor::from_vec(vec![2, 3], vec![0i64, 7, 49, -1, 3, 3]).unwrap(),
        )
        .unwrap();
    let rows = g
        .add_node(
            &registry,
            "gather",
            "",
            "Gather",
            Attrs::new().with("axis", Attr::Int(0)),
            vec![Some(table), Some(ids)],
            vec!["rows".into()],
        )
        .unwrap();
    let x = g
        .add_input(
            "x",
            TensorType::new(DType::F32, shape(&[3, 1])),
            InputRole::Other,
        )
        .unwrap();
    let to = g
        .add_const("to", Tensor::from_vec(vec![3], vec![2i64, 3, 4]).unwrap())
        .unwrap();
    let wide = g
        .add_node(
            &registry,
            "expand",
            "",
            "Expand",
            Attrs::new(),
            vec![Some(x), Some(to)],
            vec!["wide".into()],
        )
        .unwrap();
    g.set_outputs(vec![
        (rows[0], OutputRole::Other),
        (wide[0], OutputRole::Other),
    ]);
    let inputs = [
        Tensor::from_vec(vec![50, 24], randoms(50 * 24, 1)).unwrap(),
        Tensor::from_vec(vec![3, 1], randoms(3, 2)).unwrap(),
    ];
    let (want, got) = run_both(&dev, &g, &inputs);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(w.shape(), g.shape());
        assert_eq!(max_abs_diff(g, w), 0.0, "copies are exact");
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.as_slice::<f32>()
        .unwrap()
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
}

#[test]
fn every_fixture_matches_the_cpu_on_the_device() {
    let Some(dev) = gpu() else { return };
    for name in FIXTURES {
        for (sparsity, weights) in [
            (0.0, WeightDtype::F32),
            (0.4, WeightDtype::Bf16),
            (0.5, WeightDtype::F16),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (graph, _) = compile_fixture(name, dir.path(), sparsity, weights);
            for case in CASES {
                let golden = read_case(&fixture_dir(name).join("cases").join(case));
                let inputs: Vec<Tensor> = golden.inputs.iter().map(|(_, t)| t.clone()).collect();
                let (want, got) = run_both(&dev, &graph, &inputs);
                for (w, g) in want.iter().zip(&got) {
                    let d = max_abs_diff(g, w);
                    let tol = if weights == WeightDtype::F32 {
                        1e-4
                    } else {
                        2e-2
                    } * (1.0 + max_abs(w));
                    println!("{name:<26} {case:<15} {weights} {sparsity}: {d:.2e}");
                    assert!(d <= tol, "{name}/{case} {weights} {sparsity}: {d} > {tol}");
                }
            }
        }
    }
}

/// SmolLM2 generates the same greedy tokens on the GPU as on the CPU, with logits within the
/// tolerance of bf16 weights, through the whole `LanguageModel` path (prefill, then decode
/// steps with the KV cache kept on the device).
#[test]
fn smollm2_on_the_gpu_matches_the_cpu() {
    let Some(_dev) = gpu() else { return };
    let Some(model) = smollm2_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.patch");
    for (sparsity, label) in [(0.0, "dense"), (0.5, "all 2:4")] {
        let mut opts = CompileOptions::new(model.clone(), out.clone());
        opts.weights = WeightDtype::Bf16;
        opts.sparsity = sparsity;
        opts.calib.method = patch_passes::masks::Method::Magnitude;
        pipeline::compile(&opts, &OpRegistry::onnx()).unwrap();
        let load = |backend| {
            let b = bundle::load_bundle(&out, &OpRegistry::onnx(), LoadOptions::default()).unwrap();
            LanguageModel::with_backend(b.contents, backend).unwrap()
        };
        let (cpu, gpu) = (load(Backend::Cpu), load(Backend::Cuda { device: 0 }));
        // 40 prompt tokens: the prefill runs the tensor-core path, decode the GEMV path.
        let prompt: Vec<u32> = (0..40).map(|i| 100 + 37 * i).collect();
        let (mut cc, mut gc) = (cpu.new_cache(), gpu.new_cache());
        let mut lc = cpu.forward(&mut cc, &prompt, prompt.len()).unwrap();
        let mut lg = gpu.forward(&mut gc, &prompt, prompt.len()).unwrap();
        for step in 0..8 {
            let (a, b) = (lc.last(), lg.last());
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            println!("smollm2 {label} step {step}: max |gpu - cpu| logit {d:.3e} (max |logit| {scale:.1})");
            assert!(d <= 2e-2 * scale, "{label} step {step}: {d}");
            let (ta, tb) = (argmax(a), argmax(b));
            assert_eq!(ta, tb, "{label} step {step}: greedy tokens differ");
            lc = cpu.forward(&mut cc, &[ta], 1).unwrap();
            lg = gpu.forward(&mut gc, &[tb], 1).unwrap();
        }
    }
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

/// The real model, compiled as `patchc compile --weights f32` does (fused, dense f32), keeps its
/// forward pass on the device too. Needs the prepared SmolLM2 (skipped with a message without
/// it, unless `PATCH_REQUIRE_MODELS=1`).
#[test]
fn smollm2_runs_its_forward_pass_on_the_device() {
    let Some(model) = smollm2_model() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.patch");
    let mut opts = CompileOptions::new(model, out.clone());
    opts.weights = WeightDtype::Bf16;
    pipeline::compile(&opts, &OpRegistry::onnx()).unwrap();
    let graph = bundle::load_bundle(&out, &OpRegistry::onnx(), LoadOptions::default())
        .unwrap()
        .contents
        .graph;
    let (places, back) = placement(&graph);
    let device = places.iter().filter(|p| **p == Placement::Device).count();
    println!(
        "smollm2: {device} of {} nodes on the device, {} crossings",
        places.len(),
        back.len()
    );
    assert!(back.is_empty(), "{back:#?}");
    for ((_, n), p) in graph.nodes().zip(&places) {
        if matches!(
            n.op_type.as_str(),
            "HybridMatMul" | "MatMul" | "Attention" | "RMSNorm"
        ) {
            assert_eq!(*p, Placement::Device, "`{}` ({})", n.name, n.op_type);
        }
    }
}
