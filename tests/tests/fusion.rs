//! Graph optimization: the cleanup pipeline (constant folding, canonicalization, DCE) and
//! e-graph fusion keep every fixture's outputs within 1e-4 of the unoptimized graph and of
//! ONNX Runtime, recognize the norms and gated activations of every LLaMA-family layout, and
//! leave near-misses alone.

use std::fmt::Write as _;

use patch_passes::fuse::{Fuse, FuseLimits, FuseReport};
use patch_passes::{cleanup_pipeline, fusion_pipeline, PassRun};
use patch_runtime::ir::Attrs;
use patch_runtime::ops::OpRegistry;
use patch_runtime::{interp, DType, Dim, Graph, InputRole, OutputRole, Tensor, TensorType};
use patch_tests::{
    argmax_last, fixture_dir, import_fixture, max_abs_diff, read_case, CASES, FIXTURES,
};

const TOLERANCE: f32 = 1e-4;

/// Runs cleanup and fusion; returns the pass runs and the fusion report.
fn optimize(graph: &mut Graph) -> (Vec<PassRun>, FuseReport) {
    let registry = OpRegistry::onnx();
    let mut runs = cleanup_pipeline(&registry).run(graph).unwrap().runs;
    let fuse = Fuse::new(FuseLimits::default());
    let report = fuse.report_handle();
    runs.extend(fusion_pipeline(&registry, fuse).run(graph).unwrap().runs);
    let report = report.lock().unwrap().clone();
    (runs, report)
}

fn count(graph: &Graph, op_type: &str) -> usize {
    graph.nodes().filter(|(_, n)| n.op_type == op_type).count()
}

#[test]
fn optimized_fixtures_match_unoptimized_and_onnx_runtime() {
    for name in FIXTURES {
        let plain = import_fixture(name);
        let mut fused = plain.clone();
        optimize(&mut fused);
        for case in CASES {
            let golden = read_case(&fixture_dir(name).join("cases").join(case));
            let inputs: Vec<_> = golden.inputs.iter().map(|(_, t)| t.clone()).collect();
            let want = interp::run(&plain, &inputs).unwrap();
            let got = interp::run(&fused, &inputs)
                .unwrap_or_else(|e| panic!("{name}/{case}: optimized graph fails: {e}"));
            for (((out_name, ort), w), g) in golden.outputs.iter().zip(&want).zip(&got) {
                let vs_plain = max_abs_diff(g, w);
                let vs_ort = max_abs_diff(g, ort);
                println!("{name:<26} {case:<15} {out_name:<18} vs unfused {vs_plain:.2e}  vs ORT {vs_ort:.2e}");
                assert!(
                    vs_plain <= TOLERANCE,
                    "{name}/{case}/{out_name}: {vs_plain} from unfused"
                );
                assert!(
                    vs_ort <= TOLERANCE,
                    "{name}/{case}/{out_name}: {vs_ort} from ORT"
                );
                if out_name == "logits" {
                    assert_eq!(argmax_last(g), argmax_last(ort), "{name}/{case}: argmax");
                }
            }
        }
    }
}

/// Every LLaMA-family layout (2 layers): 2 norms per layer plus the final one, one gated MLP,
/// one attention and two rotary embeddings (q, k) per layer, and nothing of the unfused forms
/// left. GPT-2 (native LayerNormalization, no rotary, no gated MLP) has its two attentions
/// (keys transposed in one step, split by canonicalization) and two tanh-GELUs fused.
#[test]
fn fusion_recognizes_every_exporter_layout() {
    for name in FIXTURES {
        let mut graph = import_fixture(name);
        let (_, report) = optimize(&mut graph);
        let found = (
            count(&graph, "RMSNorm"),
            count(&graph, "SwiGLU"),
            count(&graph, "Attention"),
            count(&graph, "Rotary"),
        );
        println!("{name}: {found:?} (RMSNorm, SwiGLU, Attention, Rotary), report {report:?}");
        if name == "gpt2" {
            assert_eq!(found, (0, 0, 2, 0), "{name}");
            assert_eq!(count(&graph, "Gelu"), 2, "{name}: {report:?}");
            assert_eq!(count(&graph, "Tanh"), 0, "{name}");
            continue;
        }
        assert_eq!(found, (5, 2, 2, 4), "{name}: {report:?}");
        assert!(report.skipped.is_empty(), "{name}: {report:?}");
        for gone in ["Sigmoid", "ReduceMean", "Softmax", "IsNaN", "Neg"] {
            assert_eq!(count(&graph, gone), 0, "{name}: a {gone} survived");
        }
        // Grouped KV heads are read in place: no repeat_kv expansion (a 5-D Expand) is left.
        let expands_5d = graph
            .nodes()
            .filter(|(_, n)| n.op_type == "Expand" && graph.value(n.outputs[0]).ty.rank() == 5)
            .count();
        assert_eq!(expands_5d, 0, "{name}: the KV expansion survived");
        assert_eq!(report.stop_reason, "Saturated", "{name}");
    }
}

/// The stable text of what each pass did to each fixture (node counts per run) and the
/// fused IR of the Optimum with-past LLaMA, which should read like the model's code.
#[test]
fn pass_snapshots() {
    let mut table = String::new();
    for name in FIXTURES {
        let mut graph = import_fixture(name);
        let before = graph.node_count();
        let (runs, report) = optimize(&mut graph);
        writeln!(table, "{name}: {before} nodes imported").unwrap();
        for r in runs {
            writeln!(
                table,
                "  {}/{} round {}: {} -> {}{}",
                r.pipeline,
                r.pass,
                r.round,
                r.nodes_before,
                r.nodes_after,
                if r.changed { "" } else { " (no change)" }
            )
            .unwrap();
        }
        writeln!(
            table,
            "  fused {:?}, skipped {:?}",
            report.fused, report.skipped
        )
        .unwrap();
        if name == "llama_optimum_with_past" {
            insta::assert_snapshot!("optimized_llama_optimum_with_past", graph.to_text());
        }
    }
    insta::assert_snapshot!("pass_node_counts", table);
}

fn f32_input(g: &mut Graph, name: &str, dims: &[&str]) -> patch_runtime::ValueId {
    let shape = dims
        .iter()
        .map(|d| d.parse::<i64>().map_or(Dim::sym(d), Dim::constant))
        .collect();
    g.add_input(name, TensorType::new(DType::F32, shape), InputRole::Other)
        .unwrap()
}

/// Near-misses the rules must not fuse: a sigmoid gate on another tensor, a mean over the
/// wrong axis, a mean of cubes, and a real SiLU whose sigmoid is also used elsewhere.
#[test]
fn near_misses_are_left_alone() {
    let r = OpRegistry::onnx();
    let mut g = Graph::new("near_misses", 18);
    let x = f32_input(&mut g, "x", &["batch", "8"]);
    let y = f32_input(&mut g, "y", &["batch", "8"]);
    let node =
        |g: &mut Graph, op: &str, attrs: Attrs, ins: Vec<patch_runtime::ValueId>, out: &str| {
            g.add_node(
                &r,
                out,
                "",
                op,
                attrs,
                ins.into_iter().map(Some).collect(),
                vec![out.into()],
            )
            .unwrap()[0]
        };
    let konst = |g: &mut Graph, name: &str, t: Tensor| g.add_const(name, t).unwrap();
    // Mul(x, Sigmoid(y)): not SiLU.
    let sy = node(&mut g, "Sigmoid", Attrs::new(), vec![y], "sy");
    let gate = node(&mut g, "Mul", Attrs::new(), vec![x, sy], "gate");
    // RMSNorm-like over axis 0.
    let two = konst(&mut g, "two", Tensor::scalar(2.0f32));
    let three = konst(&mut g, "three", Tensor::scalar(3.0f32));
    let axis0 = konst(
        &mut g,
        "axis0",
        Tensor::from_vec(vec![1], vec![0i64]).unwrap(),
    );
    let last = konst(
        &mut g,
        "last",
        Tensor::from_vec(vec![1], vec![-1i64]).unwrap(),
    );
    let eps = konst(&mut g, "eps", Tensor::scalar(1e-5f32));
    let one = konst(&mut g, "one", Tensor::scalar(1.0f32));
    let keep = Attrs::new().with("keepdims", patch_runtime::ir::Attr::Int(1));
    let norm_like =
        |g: &mut Graph, exp: patch_runtime::ValueId, axes: patch_runtime::ValueId, tag: &str| {
            let p = node(g, "Pow", Attrs::new(), vec![x, exp], &format!("{tag}_pow"));
            let m = node(
                g,
                "ReduceMean",
                keep.clone(),
                vec![p, axes],
                &format!("{tag}_mean"),
            );
            let a = node(g, "Add", Attrs::new(), vec![m, eps], &format!("{tag}_add"));
            let s = node(g, "Sqrt", Attrs::new(), vec![a], &format!("{tag}_sqrt"));
            let d = node(g, "Div", Attrs::new(), vec![one, s], &format!("{tag}_inv"));
            node(g, "Mul", Attrs::new(), vec![x, d], &format!("{tag}_out"))
        };
    let wrong_axis = norm_like(&mut g, two, axis0, "axis0");
    let cubes = norm_like(&mut g, three, last, "cubes");
    // SiLU whose sigmoid is also a graph output: fusing would compute the sigmoid twice.
    let sx = node(&mut g, "Sigmoid", Attrs::new(), vec![x], "sx");
    let silu = node(&mut g, "Mul", Attrs::new(), vec![x, sx], "silu");
    g.set_outputs(
        [gate, wrong_axis, cubes, silu, sx]
            .into_iter()
            .map(|v| (v, OutputRole::Other))
            .collect(),
    );
    let before = g.to_text();
    let (_, report) = optimize(&mut g);
    assert!(
        g.nodes().all(|(_, n)| n.domain != "patch"),
        "a near-miss was fused:\n{}",
        g.to_text()
    );
    assert_eq!(before, g.to_text(), "the graph changed");
    assert_eq!(
        report.skipped,
        vec![("an absorbed value is used elsewhere".to_string(), 1)]
    );
}
