//! Every registered ONNX op, one by one, against ONNX Runtime.
//!
//! `models/make_op_goldens.py` writes one tiny single-node model per case under
//! `models/fixtures/ops/<case>/` with its inputs and the outputs ONNX Runtime computed. Here each
//! case is imported, run through the reference interpreter and compared with ORT: same output
//! count, dtypes and shapes; floats within a per-dtype tolerance with NaNs in the same places;
//! integers and bools exact. All failing cases are collected and reported together.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use patch_compiler::onnx;
use patch_runtime::ops::OpRegistry;
use patch_runtime::{interp, DType, Tensor};
use patch_tests::{read_tensor, repo_root};

/// Tolerance on floating-point outputs: `|got - want| <= abs + rel * |want|`.
#[derive(Clone, Copy, Debug)]
struct Tolerance {
    abs: f64,
    rel: f64,
}

/// f32: both sides compute in f32; the slack covers different but equally valid evaluation
/// orders and libm implementations (exp, erf, tanh, ...), a few ulps.
const F32_TOLERANCE: Tolerance = Tolerance {
    abs: 1e-5,
    rel: 1e-5,
};

/// f16 has a 10-bit mantissa (one ulp is ~9.8e-4 relative). ORT computes some f16 kernels in
/// f32 and rounds once, others round per step; allow about one ulp either way.
const F16_TOLERANCE: Tolerance = Tolerance {
    abs: 1e-3,
    rel: 1e-3,
};

/// bf16 has a 7-bit mantissa (one ulp is ~7.8e-3 relative); same reasoning as f16.
const BF16_TOLERANCE: Tolerance = Tolerance {
    abs: 1e-2,
    rel: 1e-2,
};

const F64_TOLERANCE: Tolerance = Tolerance {
    abs: 1e-12,
    rel: 1e-12,
};

/// Default-domain ops that have no golden case, each with the reason. Only ops ONNX Runtime
/// cannot run belong here; anything else needs a case in `models/make_op_goldens.py`.
const NO_GOLDEN: &[(&str, &str)] = &[];

fn ops_dir() -> PathBuf {
    repo_root().join("models/fixtures/ops")
}

/// Every case directory (one holding a `model.onnx`), sorted by name.
fn case_dirs() -> Vec<PathBuf> {
    let dir = ops_dir();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run models/make_fixtures.sh)", dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no cases under {}", dir.display());
    dirs
}

/// `<prefix>_0.pb`, `<prefix>_1.pb`, ... until the first missing index (possibly none: ops
/// such as Constant or Range over initializers take no graph input).
fn read_indexed(dir: &Path, prefix: &str) -> Vec<(String, Tensor)> {
    (0..)
        .map(|i| dir.join(format!("{prefix}_{i}.pb")))
        .take_while(|p| p.exists())
        .map(|p| read_tensor(&p))
        .collect()
}

fn tolerance(dtype: DType) -> Option<Tolerance> {
    match dtype {
        DType::F32 => Some(F32_TOLERANCE),
        DType::F16 => Some(F16_TOLERANCE),
        DType::BF16 => Some(BF16_TOLERANCE),
        DType::F64 => Some(F64_TOLERANCE),
        _ => None,
    }
}

/// Compares one output with ORT's; `Err` says how it differs.
fn compare(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.dtype() != want.dtype() {
        return Err(format!(
            "dtype {} != expected {}",
            got.dtype(),
            want.dtype()
        ));
    }
    if got.shape() != want.shape() {
        return Err(format!(
            "shape {:?} != expected {:?}",
            got.shape(),
            want.shape()
        ));
    }
    let mut bad = Vec::new();
    let mut count = 0usize;
    match tolerance(want.dtype()) {
        Some(tol) => {
            let g = got.to_f64_vec().map_err(|e| e.to_string())?;
            let w = want.to_f64_vec().map_err(|e| e.to_string())?;
            for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
                let ok = if b.is_nan() || a.is_nan() {
                    a.is_nan() && b.is_nan()
                } else if b.is_infinite() || a.is_infinite() {
                    a == b
                } else {
                    (a - b).abs() <= tol.abs + tol.rel * b.abs()
                };
                if !ok {
                    count += 1;
                    if bad.len() < 6 {
                        bad.push(format!("[{i}] got {a:e} want {b:e}"));
                    }
                }
            }
            if count > 0 {
                let worst = g
                    .iter()
                    .zip(&w)
                    .filter(|(a, b)| a.is_finite() && b.is_finite())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                return Err(format!(
                    "{count}/{} elements outside {tol:?} (max finite abs err {worst:e}): {}",
                    w.len(),
                    bad.join(", ")
                ));
            }
        }
        None => {
            let g = got.to_i64_vec().map_err(|e| e.to_string())?;
            let w = want.to_i64_vec().map_err(|e| e.to_string())?;
            for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                if a != b {
                    count += 1;
                    if bad.len() < 6 {
                        bad.push(format!("[{i}] got {a} want {b}"));
                    }
                }
            }
            if count > 0 {
                return Err(format!(
                    "{count}/{} elements differ: {}",
                    w.len(),
                    bad.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// Imports, runs and checks one case; `Err` lists every problem found.
fn check_case(dir: &Path) -> Result<(), String> {
    let path = dir.join("model.onnx");
    let model = onnx::load_model(&path).map_err(|e| format!("load: {e}"))?;
    let graph = onnx::import_model(&model, &OpRegistry::onnx(), &Default::default())
        .map_err(|e| format!("import: {e}"))?;
    let inputs = read_indexed(dir, "input");
    let outputs = read_indexed(dir, "output");
    if outputs.is_empty() {
        return Err("no output_*.pb".into());
    }
    if inputs.len() != graph.inputs().len() {
        return Err(format!(
            "{} input files for {} graph inputs",
            inputs.len(),
            graph.inputs().len()
        ));
    }
    for ((name, _), (id, _)) in inputs.iter().zip(graph.inputs()) {
        let graph_name = &graph.value(*id).name;
        if name != graph_name {
            return Err(format!(
                "input order: file has {name}, graph has {graph_name}"
            ));
        }
    }
    let feeds: Vec<Tensor> = inputs.into_iter().map(|(_, t)| t).collect();
    let got = interp::run(&graph, &feeds).map_err(|e| format!("run: {e}"))?;
    if got.len() != outputs.len() {
        return Err(format!("{} outputs, ORT has {}", got.len(), outputs.len()));
    }
    let errors: Vec<String> = outputs
        .iter()
        .zip(&got)
        .filter_map(|((name, want), got)| compare(got, want).err().map(|e| format!("{name}: {e}")))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

#[test]
fn every_op_golden_matches_onnx_runtime() {
    let dirs = case_dirs();
    let mut failures = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        // A panicking op must not hide the cases after it.
        let result = catch_unwind(AssertUnwindSafe(|| check_case(dir))).unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Err(format!("panicked: {msg}"))
        });
        match result {
            Ok(()) => println!("ok   {name}"),
            Err(reason) => {
                println!("FAIL {name}: {reason}");
                failures.push(format!("{name}: {reason}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} op golden cases differ from ONNX Runtime:\n  {}",
        failures.len(),
        dirs.len(),
        failures.join("\n  ")
    );
}

#[test]
fn every_registered_onnx_op_has_a_golden() {
    let mut covered = BTreeSet::new();
    for dir in case_dirs() {
        let path = dir.join("model.onnx");
        let model = onnx::load_model(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let graph = model.proto.graph.as_ref().expect("graph");
        for node in &graph.node {
            if matches!(node.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
                covered.insert(node.op_type.clone().unwrap_or_default());
            }
        }
    }
    let allowed: BTreeSet<&str> = NO_GOLDEN.iter().map(|(op, _)| *op).collect();
    let missing: Vec<String> = OpRegistry::onnx()
        .list()
        .into_iter()
        .filter(|(domain, _, _)| domain.is_empty() || domain == "ai.onnx")
        .map(|(_, op, _)| op)
        .filter(|op| !covered.contains(op) && !allowed.contains(op.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "registered ONNX ops without a golden case in models/fixtures/ops (add one to \
         models/make_op_goldens.py): {missing:?}"
    );
    let stale: Vec<&str> = allowed
        .iter()
        .copied()
        .filter(|op| covered.contains(*op))
        .collect();
    assert!(
        stale.is_empty(),
        "ops on the NO_GOLDEN allow-list now have a golden; remove them from it: {stale:?}"
    );
}
