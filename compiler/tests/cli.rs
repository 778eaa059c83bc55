//! The `patchc` command line, run as a user would.

use std::path::PathBuf;
use std::process::Command;

fn patchc(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_patchc"))
        .args(args)
        .output()
        .expect("patchc runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture(name: &str) -> String {
    let p: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "models",
        "fixtures",
        name,
        "model.onnx",
    ]
    .iter()
    .collect();
    p.to_string_lossy().into_owned()
}

#[test]
fn inspect_summarizes_every_fixture() {
    for (name, matmuls) in [
        ("llama_dynamo_op18", 15),
        ("llama_torchscript_op17", 15),
        ("llama_optimum_with_past", 15),
        ("gpt2", 9),
        ("qwen2", 15),
    ] {
        let (ok, out, err) = patchc(&["inspect", &fixture(name)]);
        assert!(ok, "{name}: {err}");
        assert!(out.contains("ops ("), "{name}: no op histogram\n{out}");
        assert!(
            out.contains(&format!("weight matmuls ({matmuls},")),
            "{name}: expected {matmuls} weight matmuls\n{out}"
        );
        assert!(out.contains("parameters: "), "{name}\n{out}");
    }
}

#[test]
fn inspect_ir_prints_the_text_form() {
    let (ok, out, err) = patchc(&["inspect", "--ir", &fixture("qwen2")]);
    assert!(ok, "{err}");
    assert!(out.starts_with("graph "), "{out}");
    assert!(
        out.contains("input %input_ids: i64[batch, sequence]  # ids"),
        "{out}"
    );
    assert!(out.contains("= MatMul("), "{out}");
}

#[test]
fn list_ops_lists_the_registry() {
    let (ok, out, _) = patchc(&["list-ops"]);
    assert!(ok);
    for op in [
        "MatMul",
        "LayerNormalization",
        "GatherND",
        "Trilu",
        "CumSum",
    ] {
        assert!(
            out.lines().any(|l| l.split_whitespace().nth(1) == Some(op)),
            "{op} missing\n{out}"
        );
    }
}

#[test]
fn errors_are_one_clear_line_and_a_failure_status() {
    let (ok, _, err) = patchc(&["inspect", "/nonexistent/model.onnx"]);
    assert!(!ok);
    assert!(
        err.starts_with("error: cannot read `/nonexistent/model.onnx`"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn compile_writes_a_loadable_bundle_and_rejects_bad_sparsity() {
    let dir = std::env::temp_dir().join(format!("patchc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("gpt2.patch");
    let out_s = out.to_string_lossy().into_owned();
    let (ok, _, err) = patchc(&["compile", &fixture("gpt2"), "-o", &out_s]);
    assert!(ok, "{err}");
    assert!(
        err.contains("compiled") && err.contains("weight matmuls"),
        "{err}"
    );

    let bundle = patch_runtime::bundle::load_bundle(
        &out,
        &patch_runtime::ops::OpRegistry::onnx(),
        Default::default(),
    )
    .unwrap();
    assert!(bundle
        .contents
        .compile_report_json
        .contains("\"sparsity\":0.0"));
    assert!(bundle.contents.graph.node_count() > 100);

    for bad in ["0.6", "-0.1", "NaN"] {
        let flag = format!("--sparsity={bad}");
        let (ok, _, err) = patchc(&["compile", &fixture("gpt2"), "-o", &out_s, &flag]);
        assert!(!ok && err.contains("within [0, 0.5]"), "{bad}: {err}");
    }
    let (ok, _, err) = patchc(&[
        "compile",
        &fixture("gpt2"),
        "-o",
        &out_s,
        "--sparsity",
        "0.4",
    ]);
    assert!(!ok && err.contains("calibration"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
