//! Replays, through the bodies the fuzz targets run (`patch_tests::fuzz`), every input a
//! fuzzer found a fault with (`tests/fuzz/<target>/`, one file per finding, named after what
//! it broke) and the seed inputs the fuzz script starts from: each must end without a panic.
//! The tokenizer target needs SmolLM2 (`models/smollm2-135m/prepare.sh`) and is skipped,
//! saying so, without it (failed with `PATCH_REQUIRE_MODELS=1`).

use std::path::Path;

use patch_tests::{fuzz, repo_root, smollm2_model};

/// Runs every file under `dir/<target>/`; returns how many ran.
fn replay(dir: &Path, tokenizer: bool) -> usize {
    let mut replayed = 0;
    for target in fuzz::TARGETS {
        if target == "tokenizer" && !tokenizer {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(dir.join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.map(|e| e.expect("entry").path()).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).expect("read an input");
            let outcome = std::panic::catch_unwind(|| fuzz::run(target, &data));
            assert!(outcome.is_ok(), "{target}: {} panics", path.display());
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn every_fuzz_finding_stays_fixed() {
    let tokenizer = smollm2_model().is_some();
    let replayed = replay(&repo_root().join("tests/fuzz"), tokenizer);
    assert!(
        replayed >= usize::from(tokenizer),
        "no finding was replayed"
    );
}

#[test]
fn the_seed_inputs_are_written_and_run_clean() {
    let dir = tempfile::tempdir().unwrap();
    let written = fuzz::write_seeds(dir.path()).expect("write the seeds");
    let tokenizer = smollm2_model().is_some();
    let replayed = replay(dir.path(), tokenizer);
    assert_eq!(replayed, written - if tokenizer { 0 } else { 5 });
    // The tiny bundles are language models that generate.
    for name in ["tiny-dense-f32", "tiny-dense-f16", "tiny-sparse50-bf16"] {
        let model = patch_tests::load_model(&dir.path().join(format!("bundle_load/{name}.patch")));
        let mut cache = model.new_cache();
        let logits = model
            .forward(&mut cache, &[3, 5, 7], 1)
            .expect("a forward step");
        assert_eq!(logits.data().len(), 64, "{name}");
        assert!(logits.data().iter().all(|v| v.is_finite()), "{name}");
    }
}
