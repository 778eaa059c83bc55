//! The `kv-layout` pass: attention read seq-major with the head-layout transposes folded in,
//! and the KV cache re-laid out as `[b, t, hk, d]` and grown by `patch.KvAppend`. Outputs stay
//! within 1e-4 of ONNX Runtime on every fixture and case (past inputs fed, and presents
//! compared, in the new layout), the rewritten with-past graph is snapshot-tested, and a layer
//! whose transposes have another reader is left alone.

use patch_passes::fuse::{Fuse, FuseLimits};
use patch_passes::{cleanup_pipeline, fusion_pipeline, layout_pipeline};
use patch_runtime::ir::{Attr, Attrs};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{interp, DType, Dim, Graph, InputRole, OutputRole, Tensor, TensorType};
use patch_tests::{
    argmax_last, feed, fixture_dir, import_fixture, max_abs_diff, read_case, swap_axes_12, CASES,
    FAMILY_FIXTURES, FIXTURES,
};

const TOLERANCE: f32 = 1e-4;

/// Cleanup, fusion, then the layout pipeline (what `patchc compile` runs, without packing).
fn optimize(graph: &mut Graph) -> bool {
    let registry = OpRegistry::onnx();
    cleanup_pipeline(&registry).run(graph).unwrap();
    fusion_pipeline(&registry, Fuse::new(FuseLimits::default()))
        .run(graph)
        .unwrap();
    let outcome = layout_pipeline(&registry).run(graph).unwrap();
    outcome.changed().contains(&"kv-layout")
}

fn count(graph: &Graph, op_type: &str) -> usize {
    graph.nodes().filter(|(_, n)| n.op_type == op_type).count()
}

#[test]
fn seq_major_attention_keeps_every_fixture_within_1e_4_of_onnx_runtime() {
    for name in FIXTURES.iter().chain(&FAMILY_FIXTURES) {
        let mut graph = import_fixture(name);
        let changed = optimize(&mut graph);
        let attentions = count(&graph, "Attention");
        let seq_major = graph
            .nodes()
            .filter(|(_, n)| {
                n.op_type == "Attention" && n.attrs.string("layout").ok().flatten() == Some("bshd")
            })
            .count();
        println!("{name}: {seq_major} of {attentions} attentions seq-major");
        // Every layout is rewritten whole.
        assert!(changed, "{name}");
        assert!(attentions > 0, "{name}");
        assert_eq!(seq_major, attentions, "{name}");
        let with_past = graph
            .inputs()
            .iter()
            .any(|(_, r)| matches!(r, InputRole::PastKey(_)));
        if with_past {
            assert_eq!(count(&graph, "KvAppend"), 2 * attentions, "{name}");
            let concats_4d = graph
                .nodes()
                .filter(|(_, n)| n.op_type == "Concat")
                .filter(|(_, n)| graph.value(n.outputs[0]).ty.rank() == 4)
                .count();
            assert_eq!(concats_4d, 0, "{name}: a cache concat survived");
        }
        // No head-layout transpose is left on the attention path: the only 4-D ones are the
        // rotary tables' (one pair, or Gemma 3's local and global pairs), computed once per
        // forward pass and read by rotations only.
        let transposes: Vec<_> = graph
            .nodes()
            .filter(|(_, n)| n.op_type == "Transpose")
            .filter(|(_, n)| graph.value(n.outputs[0]).ty.rank() == 4)
            .map(|(_, n)| n.outputs[0])
            .collect();
        println!(
            "{name}: {} 4-D transposes left (rotary tables)",
            transposes.len()
        );
        for t in transposes {
            let readers: Vec<_> = graph
                .nodes()
                .filter(|(_, n)| n.inputs.contains(&Some(t)))
                .map(|(_, n)| n.op_type.clone())
                .collect();
            assert!(
                !readers.is_empty() && readers.iter().all(|op| op == "Rotary"),
                "{name}: a 4-D transpose read by {readers:?} is left"
            );
        }
        for case in CASES {
            let golden = read_case(&fixture_dir(name).join("cases").join(case));
            let inputs = feed(&graph, &golden);
            let got = interp::run(&graph, &inputs)
                .unwrap_or_else(|e| panic!("{name}/{case}: rewritten graph fails: {e}"));
            for ((role, (out_name, ort)), g) in graph
                .outputs()
                .iter()
                .map(|(_, r)| r)
                .zip(&golden.outputs)
                .zip(&got)
            {
                let g = match role {
                    OutputRole::PresentKey(_) | OutputRole::PresentValue(_) => swap_axes_12(g),
                    _ => g.clone(),
                };
                let err = max_abs_diff(&g, ort);
                assert!(err <= TOLERANCE, "{name}/{case}/{out_name}: {err} from ORT");
                if out_name == "logits" {
                    assert_eq!(argmax_last(&g), argmax_last(ort), "{name}/{case}");
                }
            }
        }
    }
}

/// The with-past LLaMA after every pass: the attention of a block reads like the model's code
/// (project, reshape to heads, rotate, append to the cache, attend, reshape back).
#[test]
fn kv_layout_snapshot() {
    let mut graph = import_fixture("llama_optimum_with_past");
    assert!(optimize(&mut graph));
    insta::assert_snapshot!("kv_layout_llama_optimum_with_past", graph.to_text());
}

fn f32_input(g: &mut Graph, name: &str, dims: &[&str]) -> patch_runtime::ValueId {
    let shape = dims
        .iter()
        .map(|d| match d.parse::<i64>() {
            Ok(c) => Dim::constant(c),
            Err(_) => Dim::sym(d),
        })
        .collect();
    g.add_input(
        name,
        TensorType::new(DType::F32, shape),
        InputRole::from_name(name),
    )
    .unwrap()
}

/// `Transpose(Attention(Transpose(q), Transpose(k), Transpose(v)))` over `[1, s, h, d]`
/// inputs; with `leak`, the head-major Q is also a graph output.
fn small_attention(leak: bool) -> Graph {
    let r = OpRegistry::onnx();
    let mut g = Graph::new("attention", 18);
    let q = f32_input(&mut g, "q", &["1", "s", "4", "8"]);
    let k = f32_input(&mut g, "k", &["1", "s", "2", "8"]);
    let v = f32_input(&mut g, "v", &["1", "s", "2", "8"]);
    let perm = Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1, 3]));
    let heads = |g: &mut Graph, x, name: &str| {
        g.add_node(
            &r,
            name,
            "",
            "Transpose",
            perm.clone(),
            vec![Some(x)],
            vec![name.into()],
        )
        .unwrap()[0]
    };
    let (qt, kt, vt) = (
        heads(&mut g, q, "qt"),
        heads(&mut g, k, "kt"),
        heads(&mut g, v, "vt"),
    );
    let a = g
        .add_node(
            &r,
            "attn",
            "patch",
            "Attention",
            Attrs::new().with("scale", Attr::Float(0.35)),
            vec![Some(qt), Some(kt), Some(vt)],
            vec!["attn".into()],
        )
        .unwrap()[0];
    let y = heads(&mut g, a, "y");
    let mut outputs = vec![(y, OutputRole::Other)];
    if leak {
        outputs.push((qt, OutputRole::Other));
    }
    g.set_outputs(outputs);
    g.verify(&r).unwrap();
    g
}

#[test]
fn the_rewrite_is_exact_and_leaves_shared_transposes_alone() {
    let r = OpRegistry::onnx();
    let inputs: Vec<Tensor> = [(4usize, 11u32), (2, 12), (2, 13)]
        .iter()
        .map(|&(h, seed)| {
            let n = 5 * h * 8;
            let data = (0..n)
                .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            Tensor::from_vec(vec![1, 5, h, 8], data).unwrap()
        })
        .collect();
    let plain = small_attention(false);
    let mut rewritten = plain.clone();
    assert!(layout_pipeline(&r)
        .run(&mut rewritten)
        .unwrap()
        .changed()
        .contains(&"kv-layout"));
    assert_eq!(count(&rewritten, "Transpose"), 0);
    let (want, got) = (
        interp::run(&plain, &inputs).unwrap(),
        interp::run(&rewritten, &inputs).unwrap(),
    );
    assert_eq!(
        want[0].as_slice::<f32>().unwrap(),
        got[0].as_slice::<f32>().unwrap()
    );
    // The head-major Q is read by someone else (a graph output): no match, nothing changes.
    let leaky = small_attention(true);
    let mut untouched = leaky.clone();
    let outcome = layout_pipeline(&r).run(&mut untouched).unwrap();
    assert!(outcome.changed().is_empty(), "{:?}", outcome.changed());
    assert_eq!(untouched.to_text(), leaky.to_text());
}
