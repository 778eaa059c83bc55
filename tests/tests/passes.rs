//! The pass manager verifies after every pass; dead-code elimination keeps outputs equal.

use patch_passes::{dce::DeadCodeElimination, PassManager};
use patch_runtime::interp;
use patch_runtime::ops::OpRegistry;
use patch_tests::{fixture_dir, import_fixture, read_case, FIXTURES};

#[test]
fn dead_code_elimination_keeps_outputs_and_removes_dead_nodes() {
    let registry = OpRegistry::onnx();
    for name in FIXTURES {
        let mut graph = import_fixture(name);
        let before = graph.node_count();
        let case = read_case(&fixture_dir(name).join("cases/seq7"));
        let inputs: Vec<_> = case.inputs.iter().map(|(_, t)| t.clone()).collect();
        let want = interp::run(&graph, &inputs).unwrap();
        PassManager::new(&registry)
            .with_pass(DeadCodeElimination)
            .run(&mut graph)
            .unwrap();
        assert!(graph.node_count() <= before);
        let got = interp::run(&graph, &inputs).unwrap();
        for (a, b) in want.iter().zip(&got) {
            assert_eq!(a.bytes(), b.bytes(), "{name}: DCE changed an output");
        }
    }
}

#[test]
fn dead_nodes_are_removed() {
    let registry = OpRegistry::onnx();
    let mut graph = import_fixture("gpt2");
    let before = graph.node_count();
    // Make the first MatMul's output the only graph output: everything after it is dead.
    let first_matmul = graph
        .nodes()
        .find(|(_, n)| n.op_type == "MatMul")
        .map(|(_, n)| n.outputs[0])
        .unwrap();
    graph.set_outputs(vec![(first_matmul, patch_runtime::OutputRole::Other)]);
    let changed = PassManager::new(&registry)
        .with_pass(DeadCodeElimination)
        .run(&mut graph)
        .unwrap();
    assert_eq!(changed.changed(), ["dce"]);
    assert!(
        graph.node_count() < before / 2,
        "{} of {before} nodes left",
        graph.node_count()
    );
    let uses = graph.use_counts();
    for (_, node) in graph.nodes() {
        assert!(
            node.outputs.iter().any(|o| uses[o.0 as usize] > 0),
            "dead node `{}` survived",
            node.name
        );
    }
}
