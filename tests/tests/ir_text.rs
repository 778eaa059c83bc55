//! The IR's text form reads back: for every fixture, imported and compiled (fused, packed,
//! scheduled), parsing the printed graph and printing it again gives the same text.

use patch_runtime::ops::OpRegistry;
use patch_runtime::Graph;
use patch_tests::{compile_fixture, import_fixture, FAMILY_FIXTURES, FIXTURES};

fn round_trip(what: &str, graph: &Graph, registry: &OpRegistry) {
    let text = graph.to_text();
    let parsed = Graph::parse_text(&text, registry)
        .unwrap_or_else(|e| panic!("{what}: the printed graph does not parse: {e}"));
    assert_eq!(parsed.to_text(), text, "{what}: print(parse(text)) differs");
    assert_eq!(parsed.node_count(), graph.node_count(), "{what}");
    parsed
        .verify(registry)
        .unwrap_or_else(|e| panic!("{what}: the parsed graph does not verify: {e}"));
}

#[test]
fn every_imported_fixture_reads_back() {
    let registry = OpRegistry::onnx();
    for name in FIXTURES.into_iter().chain(FAMILY_FIXTURES) {
        round_trip(
            &format!("{name} imported"),
            &import_fixture(name),
            &registry,
        );
    }
}

#[test]
fn compiled_graphs_read_back() {
    let registry = OpRegistry::onnx();
    for name in FIXTURES {
        let dir = tempfile::tempdir().unwrap();
        let bundle = compile_fixture(name, dir.path(), 64);
        let b = patch_runtime::bundle::load_bundle(&bundle, &registry, Default::default())
            .expect("load");
        round_trip(&format!("{name} compiled"), &b.contents.graph, &registry);
    }
}
