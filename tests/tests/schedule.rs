//! The `schedule` pass: a memory-aware node order. On a graph exported in a wasteful order it
//! interleaves the branches so that fewer activations are alive at once; on every fixture it
//! keeps the outputs bit for bit and never makes the memory plan's arena larger. The memory
//! plan of every optimized fixture is snapshot-tested (slot count and arena expression).

use patch_passes::fuse::{Fuse, FuseLimits};
use patch_passes::schedule::{figures, hint_bindings, MemorySchedule};
use patch_passes::{cleanup_pipeline, fusion_pipeline, layout_pipeline, schedule_pipeline, Pass};
use patch_runtime::ir::{Attr, Attrs};
use patch_runtime::memplan::MemoryPlan;
use patch_runtime::ops::OpRegistry;
use patch_runtime::{interp, DType, Dim, Graph, InputRole, OutputRole, Tensor, TensorType};
use patch_tests::{feed, fixture_dir, import_fixture, read_case, FIXTURES};

/// `x[n, 64]` → four `Neg(x)` branches, then a `ReduceMean` of each, then their sum: the
/// order a naive exporter writes (every branch first), which keeps the four `[n, 64]` values
/// alive at once.
fn fan_out() -> Graph {
    let registry = OpRegistry::onnx();
    let mut g = Graph::new("fan_out", 17);
    let shape = vec![Dim::sym("n"), Dim::constant(64)];
    let x = g
        .add_input("x", TensorType::new(DType::F32, shape), InputRole::Other)
        .unwrap();
    let node = |g: &mut Graph, op: &str, attrs: Attrs, inputs: &[_], name: &str| {
        let inputs = inputs.iter().map(|&v| Some(v)).collect();
        let out = g.add_node(
            &registry,
            name,
            "",
            op,
            attrs,
            inputs,
            vec![name.to_string()],
        );
        out.unwrap()[0]
    };
    let branches: Vec<_> = (0..4)
        .map(|i| node(&mut g, "Neg", Attrs::new(), &[x], &format!("big{i}")))
        .collect();
    let mean = || Attrs::new().with("axes", Attr::Ints(vec![1]));
    let means: Vec<_> = branches
        .iter()
        .enumerate()
        .map(|(i, &b)| node(&mut g, "ReduceMean", mean(), &[b], &format!("mean{i}")))
        .collect();
    let s01 = node(&mut g, "Add", Attrs::new(), &[means[0], means[1]], "s01");
    let s23 = node(&mut g, "Add", Attrs::new(), &[means[2], means[3]], "s23");
    let s = node(&mut g, "Add", Attrs::new(), &[s01, s23], "sum");
    g.set_outputs(vec![(s, OutputRole::Other)]);
    g
}

/// Fixture `name` after cleanup, fusion and the layout pipeline (what `patchc compile` runs
/// before `schedule`, without packing).
fn fused(name: &str) -> Graph {
    let registry = OpRegistry::onnx();
    let mut graph = import_fixture(name);
    cleanup_pipeline(&registry).run(&mut graph).unwrap();
    fusion_pipeline(&registry, Fuse::new(FuseLimits::default()))
        .run(&mut graph)
        .unwrap();
    layout_pipeline(&registry).run(&mut graph).unwrap();
    graph
}

#[test]
fn a_fan_out_exported_branch_by_branch_is_interleaved() {
    let registry = OpRegistry::onnx();
    let mut g = fan_out();
    let hint = hint_bindings(&g, 512);
    let before = figures(&g, &hint).unwrap();
    let x = Tensor::from_vec(vec![3, 64], (0..192).map(|i| i as f32 * 0.25).collect()).unwrap();
    let want = interp::run(&g, std::slice::from_ref(&x)).unwrap();
    assert!(MemorySchedule::default().run(&mut g, &registry).unwrap());
    let after = figures(&g, &hint).unwrap();
    println!("before {before:?}\nafter  {after:?}");
    let big = 512 * 64 * 4;
    // Four branches alive at once before; one at a time (plus the means) after.
    assert!(before.peak_live >= 4 * big, "{before:?}");
    assert!(after.peak_live < 2 * big, "{after:?}");
    assert!(after.arena < before.arena);
    let order: Vec<&str> = g.nodes().map(|(_, n)| n.name.as_str()).collect();
    assert_eq!(&order[..4], ["big0", "mean0", "big1", "mean1"]);
    let got = interp::run(&g, &[x]).unwrap();
    assert_eq!(
        got[0].as_slice::<f32>().unwrap(),
        want[0].as_slice::<f32>().unwrap()
    );
    // Run again, the order is already the pass's own: nothing changes.
    assert!(!MemorySchedule::default().run(&mut g, &registry).unwrap());
}

#[test]
fn every_fixture_keeps_its_outputs_and_never_grows_the_arena() {
    let registry = OpRegistry::onnx();
    let mut table = String::new();
    for name in FIXTURES {
        let mut graph = fused(name);
        let unscheduled = graph.clone();
        let outcome = schedule_pipeline(&registry).run(&mut graph).unwrap();
        let hint = hint_bindings(&graph, 512);
        let (before, after) = (
            figures(&unscheduled, &hint).unwrap(),
            figures(&graph, &hint).unwrap(),
        );
        assert!(
            (after.arena, after.peak_live) <= (before.arena, before.peak_live),
            "{name}: {before:?} -> {after:?}"
        );
        for case in ["seq7", "batch2_leftpad"] {
            let c = read_case(&fixture_dir(name).join("cases").join(case));
            let inputs = feed(&graph, &c);
            let want = interp::run(&unscheduled, &inputs).unwrap();
            let got = interp::run(&graph, &inputs).unwrap();
            for (a, b) in want.iter().zip(&got) {
                assert_eq!(a.bytes(), b.bytes(), "{name}/{case}: outputs differ");
            }
        }
        let plan = MemoryPlan::of_graph(&graph);
        table += &format!(
            "{name}: reordered {}, {} activations in {} slots\n  arena {} bytes\n  \
             unshared {} bytes\n  at 512: arena {} -> {}, peak live {} -> {}\n",
            !outcome.changed().is_empty(),
            plan.planned_values(),
            plan.slot_count(),
            plan.arena_bytes(),
            plan.unshared_bytes(),
            before.arena,
            after.arena,
            before.peak_live,
            after.peak_live,
        );
    }
    insta::assert_snapshot!("memory_plans", table);
}

/// Plans run with reused buffers give the same bytes as fresh allocations, call after call,
/// across calls of different lengths (the slots grow for the longer one).
#[test]
fn reused_buffers_give_the_outputs_of_fresh_ones() {
    let registry = OpRegistry::onnx();
    let name = "llama_optimum_with_past";
    let mut graph = fused(name);
    schedule_pipeline(&registry).run(&mut graph).unwrap();
    let mut fresh = interp::Plan::new(&graph).unwrap();
    fresh.set_memory_plan(false);
    let planned = interp::Plan::new(&graph).unwrap();
    for case in ["seq7", "batch2_leftpad", "seq7", "batch2_leftpad"] {
        let c = read_case(&fixture_dir(name).join("cases").join(case));
        let inputs = feed(&graph, &c);
        let want = fresh.run(&inputs).unwrap();
        let got = planned.run(&inputs).unwrap();
        for (a, b) in want.iter().zip(&got) {
            assert_eq!(a.bytes(), b.bytes(), "{case}");
        }
    }
    let stats = planned.slot_stats();
    println!("{stats:?}");
    assert!(stats.hits > 0);
}
