//! The families users run beyond LLaMA (Qwen3, Mistral, Gemma 2 and 3, Phi-3), exported by
//! current torch: the interpreter matches ONNX Runtime on every case, and the optimized graph
//! matches both.

use std::collections::BTreeMap;

use patch_passes::fuse::unfused::{decode_path, unfused_in_decode_path};
use patch_passes::fuse::{Fuse, FuseLimits, FuseReport};
use patch_passes::{cleanup_pipeline, fusion_pipeline};
use patch_runtime::ir::Def;
use patch_runtime::ops::OpRegistry;
use patch_runtime::Graph;
use patch_tests::{check_against_ort, import_fixture, FAMILY_FIXTURES, FIXTURES};

fn optimize(graph: &mut Graph) -> FuseReport {
    let registry = OpRegistry::onnx();
    cleanup_pipeline(&registry).run(graph).unwrap();
    let fuse = Fuse::new(FuseLimits::default());
    let report = fuse.report_handle();
    fusion_pipeline(&registry, fuse).run(graph).unwrap();
    let report = report.lock().unwrap().clone();
    report
}

#[test]
fn every_family_matches_onnx_runtime_imported_and_optimized() {
    for name in FAMILY_FIXTURES {
        let plain = import_fixture(name);
        check_against_ort(name, &plain, "imported");
        let mut fused = plain;
        let report = optimize(&mut fused);
        println!(
            "{name}: fused {:?} skipped {:?}",
            report.fused, report.skipped
        );
        check_against_ort(name, &fused, "optimized");
    }
}

/// The fused ops of each family (2 layers): norms (Qwen3 adds q/k norms: 4 per layer; Gemma 2
/// four per block, Gemma 3 six), the gated MLP (SwiGLU, or GeGLU for Gemma), attention, two
/// rotary embeddings per layer, and Gemma 2's final logit softcapping.
#[test]
fn every_family_fuses_its_norms_attention_rotary_and_gated_mlp() {
    // Per family (the fixture name's first word), whatever the exporter: counts of these ops.
    const OPS: [&str; 6] = [
        "RMSNorm",
        "SwiGLU",
        "GeGLU",
        "Attention",
        "Rotary",
        "Softcap",
    ];
    let want: [(&str, [usize; 6]); 7] = [
        ("gpt2", [0, 0, 0, 2, 0, 0]),
        ("llama", [5, 2, 0, 2, 4, 0]),
        ("qwen3", [9, 2, 0, 2, 4, 0]),
        ("mistral", [5, 2, 0, 2, 4, 0]),
        ("gemma2", [9, 0, 2, 2, 4, 1]),
        ("gemma3", [13, 0, 2, 2, 4, 0]),
        ("phi3", [5, 2, 0, 2, 4, 0]),
    ];
    for name in FAMILY_FIXTURES {
        let family = name.split('_').next().unwrap();
        let ops = want
            .iter()
            .find(|(f, _)| *f == family)
            .unwrap_or_else(|| panic!("{name}: no expectation"))
            .1;
        let mut graph = import_fixture(name);
        let report = optimize(&mut graph);
        for (op, n) in OPS.into_iter().zip(ops) {
            let found = graph
                .nodes()
                .filter(|(_, node)| node.domain == "patch" && node.op_type == op)
                .count();
            assert_eq!(found, n, "{name}: patch.{op} (report {report:?})");
        }
        assert!(report.skipped.is_empty(), "{name}: {report:?}");
        assert_eq!(report.stop_reason, "Saturated", "{name}");
        // Gemma 2's softcapping is inside its attention.
        let capped = graph
            .nodes()
            .filter(|(_, n)| n.op_type == "Attention" && n.attrs.get("softcap").is_some())
            .count();
        assert_eq!(
            capped,
            if name == "gemma2_dynamo" { 2 } else { 0 },
            "{name}"
        );
    }
}

/// No fixture's blocks leave compute unfused in the decode path: every norm, activation,
/// softmax and score scaling is inside a fused op. The one op left anywhere is Gemma's
/// embedding scale (`embed · sqrt(hidden)`, one multiply per token before the first block;
/// folding it into the table would need a second copy of the tied embedding).
#[test]
fn no_fixture_leaves_compute_unfused_in_its_blocks() {
    for name in FIXTURES.iter().chain(&FAMILY_FIXTURES) {
        let mut graph = import_fixture(name);
        optimize(&mut graph);
        let left = unfused_in_decode_path(&graph);
        println!("{name}: left unfused {left:?}");
        if name.starts_with("gemma") {
            assert_eq!(left, BTreeMap::from([("Mul".to_string(), 1)]), "{name}");
            let path = decode_path(&graph);
            let scale = path
                .iter()
                .map(|&n| graph.node(n))
                .find(|n| n.op_type == "Mul")
                .unwrap();
            let reads_embedding = scale.inputs.iter().flatten().any(|&v| {
                matches!(graph.value(v).def, Def::Node(p, _) if graph.node(p).op_type == "Gather")
            });
            assert!(
                reads_embedding,
                "{name}: the Mul left is not the embedding scale"
            );
        } else {
            assert!(left.is_empty(), "{name}: {left:?}");
        }
    }
}
