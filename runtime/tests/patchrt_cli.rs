//! `patchrt inspect` on a bundle written through the library, and its errors.

use std::process::Command;

use patch_runtime::bundle::{self, BundleContents};
use patch_runtime::dim::Dim;
use patch_runtime::ir::{Attrs, Graph, InputRole, OutputRole, TensorType};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{DType, Tensor};

fn tiny_bundle(path: &std::path::Path) {
    let registry = OpRegistry::onnx();
    let mut g = Graph::new("tiny", 18);
    let x = g
        .add_input(
            "x",
            TensorType::new(DType::F32, vec![Dim::sym("batch"), Dim::constant(4)]),
            InputRole::Other,
        )
        .unwrap();
    let w = g
        .add_const("w", Tensor::from_vec(vec![4, 3], vec![0.5f32; 12]).unwrap())
        .unwrap();
    let y = g
        .add_node(
            &registry,
            "mm",
            "",
            "MatMul",
            Attrs::new(),
            vec![Some(x), Some(w)],
            vec!["y".into()],
        )
        .unwrap();
    g.set_outputs(vec![(y[0], OutputRole::Logits)]);
    bundle::write_bundle(
        path,
        &BundleContents {
            graph: g,
            ..Default::default()
        },
    )
    .unwrap();
}

fn patchrt(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_patchrt"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn inspect_prints_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.patch");
    tiny_bundle(&path);
    let p = path.to_string_lossy();
    let (ok, out, err) = patchrt(&["inspect", "--ir", &p]);
    assert!(ok, "{err}");
    assert!(
        out.contains("graph \"tiny\": opset 18, 1 nodes, 1 constants, 12 parameters"),
        "{out}"
    );
    assert!(out.contains("input  x"), "{out}");
    assert!(out.contains("%y: f32[batch, 3] = MatMul(%x, %w)"), "{out}");
}

#[test]
fn inspect_rejects_corrupt_bundles_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.patch");
    tiny_bundle(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let (ok, _, err) = patchrt(&["inspect", &path.to_string_lossy()]);
    assert!(!ok);
    assert!(
        err.starts_with("error: ") && err.contains("checksum"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_thread_count_above_the_cpus_is_capped_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.patch");
    tiny_bundle(&path);
    let cpus = std::thread::available_parallelism().unwrap().get();
    // The tiny graph is no language model, so the command fails after the note.
    let (_, _, err) = patchrt(&["bench", &path.to_string_lossy(), "--threads", "100000"]);
    assert!(
        err.contains(&format!(
            "note: --threads 100000 is more than the {cpus} CPUs this process may use; using {cpus}"
        )),
        "{err}"
    );
}
