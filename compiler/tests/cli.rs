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
    // A model folder instead of the model file is named as such, with the fix.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy().into_owned();
    for args in [
        vec!["inspect", d.as_str()],
        vec!["compile", d.as_str(), "-o", "/tmp/never-written.patch"],
    ] {
        let (ok, _, err) = patchc(&args);
        assert!(!ok);
        let want = format!(
            "error: `{d}` is a directory; give the model file in it (for example `{d}/model.onnx`)"
        );
        assert!(err.contains(&want), "{err}");
        assert_eq!(err.matches("error:").count(), 1, "{err}");
    }
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
    let report = patch_compiler::report::Report::from_json(&bundle.contents.compile_report_json)
        .expect("the stored report reads back");
    assert_eq!(report.sparsity, 0.0);
    assert_eq!(report.sparse, None);
    assert_eq!(report.nodes.final_, bundle.contents.graph.node_count());
    // The whole model, fused: GPT-2's two attentions are single ops.
    let graph = &bundle.contents.graph;
    assert!(graph.node_count() > 50, "{}", graph.node_count());
    let attention = graph
        .nodes()
        .filter(|(_, n)| n.op_type == "Attention")
        .count();
    assert_eq!(attention, 2);

    for bad in ["0.6", "-0.1", "NaN"] {
        let flag = format!("--sparsity={bad}");
        let (ok, _, err) = patchc(&["compile", &fixture("gpt2"), "-o", &out_s, &flag]);
        assert!(!ok && err.contains("within [0, 0.5]"), "{bad}: {err}");
        // Written as two arguments, a negative value is a value too, not an unknown flag.
        let (ok, _, err) = patchc(&["compile", &fixture("gpt2"), "-o", &out_s, "--sparsity", bad]);
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

#[test]
fn dump_after_and_stop_after_show_the_ir_without_a_bundle() {
    let dir = std::env::temp_dir().join(format!("patchc-dump-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("llama.patch");
    let out_s = out.to_string_lossy().into_owned();
    let model = fixture("llama_optimum_with_past");
    let (ok, _, err) = patchc(&[
        "compile",
        &model,
        "-o",
        &out_s,
        "--dump-after",
        "cse,fuse",
        "--stop-after",
        "fuse",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("stopped after pass `fuse`"), "{err}");
    assert!(!out.exists(), "--stop-after wrote a bundle");
    let mut dumps: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dumps.sort();
    assert!(
        dumps.iter().any(|d| d.ends_with(".cleanup.cse.ir")),
        "{dumps:?}"
    );
    let fused = dumps
        .iter()
        .find(|d| d.ends_with(".fuse.fuse.ir"))
        .expect("a fuse dump");
    let text = std::fs::read_to_string(dir.join(fused)).unwrap();
    assert!(text.starts_with("graph "), "{text}");
    assert!(text.contains("patch.RMSNorm(") && text.contains("patch.Attention("));
    for line in err.lines().filter(|l| l.starts_with("IR written to")) {
        assert!(
            std::path::Path::new(&line["IR written to ".len()..]).exists(),
            "{line}"
        );
    }

    let (ok, _, err) = patchc(&["compile", &model, "-o", &out_s, "--stop-after", "fusion"]);
    assert!(!ok, "an unknown pass must fail");
    assert!(
        err.contains("unknown pass `fusion`") && err.contains("fold-constants, canonicalize, cse"),
        "{err}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes a WordLevel `tokenizer.json` over `w0 .. w511` for the fixtures' 512-token vocabulary.
fn write_word_tokenizer(path: &std::path::Path) {
    let vocab: Vec<String> = (0..512).map(|i| format!("\"w{i}\": {i}")).collect();
    let json = format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null,
        "decoder": null, "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "w0"}}}}"#,
        vocab.join(", ")
    );
    std::fs::write(path, json).unwrap();
}

/// `patchrt`, built by the same `cargo test` run next to `patchc` (another package's binary).
fn patchrt(args: &[&str]) -> (bool, String, String) {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_patchc")).with_file_name("patchrt");
    assert!(
        exe.exists(),
        "{} not found: run the workspace's tests (`cargo test --workspace`) so that it is built",
        exe.display()
    );
    let out = Command::new(exe).args(args).output().expect("patchrt runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_compiled_fixture_runs_evaluates_and_benchmarks_through_patchrt() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(fixture("llama_optimum_with_past"), d.join("model.onnx")).unwrap();
    write_word_tokenizer(&d.join("tokenizer.json"));
    std::fs::write(
        d.join("generation.json"),
        r#"{"eos_token_id": 511, "max_context": 24,
            "chat_template": "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"}"#,
    )
    .unwrap();
    let bundle = d.join("m.patch");
    let b = bundle.to_string_lossy().into_owned();
    let model = d.join("model.onnx").to_string_lossy().into_owned();
    let (ok, _, err) = patchc(&["compile", &model, "-o", &b, "--weights", "bf16"]);
    assert!(ok, "{err}");

    let (ok, out, err) = patchrt(&["run", &b, "--prompt", "w5 w17 w3", "--max-tokens", "6"]);
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty(), "no text generated: {err}");
    assert!(
        err.contains("tokens/s") && err.contains("KV cache"),
        "{err}"
    );

    let sampled = |seed: &str| {
        let (ok, out, err) = patchrt(&[
            "run",
            &b,
            "--prompt",
            "w5 w17",
            "--max-tokens",
            "8",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
        ]);
        assert!(ok, "{err}");
        out
    };
    assert_eq!(sampled("7"), sampled("7"), "a seed fixes the sample");

    let (ok, _, err) = patchrt(&["run", &b, "--chat", "--prompt", "w9", "--max-tokens", "2"]);
    assert!(ok, "{err}");

    let long = vec!["w4"; 30].join(" ");
    let (ok, _, err) = patchrt(&["run", &b, "--prompt", &long]);
    assert!(
        !ok && err.contains("30 tokens") && err.contains("context is 24"),
        "{err}"
    );
    let (ok, _, err) = patchrt(&["run", &b, "--prompt", "w1", "--top-p", "0"]);
    assert!(!ok && err.contains("--top-p"), "{err}");

    let text = d.join("text.txt");
    let words: Vec<String> = (0..40).map(|i| format!("w{}", (i * 37) % 500)).collect();
    std::fs::write(&text, words.join(" ")).unwrap();
    let t = text.to_string_lossy().into_owned();
    let (ok, out, err) = patchrt(&["eval", &b, "--text", &t, "--seq", "16"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("perplexity") && out.contains("2 windows of 16"),
        "{out}"
    );

    let (ok, out, err) = patchrt(&[
        "bench",
        &b,
        "--threads",
        "1",
        "--repeats",
        "2",
        "--prefill",
        "8,16",
        "--decode-context",
        "8",
        "--decode-steps",
        "3",
    ]);
    assert!(ok, "{err}");
    for row in ["| prefill8 |", "| prefill16 |", "| decode8 |"] {
        assert!(out.contains(row), "{row} missing: {out}");
    }
    let (ok, _, err) = patchrt(&["bench", &b, "--prefill", "64"]);
    assert!(!ok && err.contains("context of 24"), "{err}");

    // The cuda backend where there is no GPU: one clear line, no panic. An unknown backend
    // is refused by the argument parser.
    if !patch_runtime::cuda::driver_available() {
        let (ok, _, err) = patchrt(&["run", &b, "--prompt", "w5", "--backend", "cuda"]);
        assert!(
            !ok && err.contains("no CUDA driver") && err.contains("--backend cpu"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, _, err) = patchrt(&["run", &b, "--prompt", "w5", "--backend", "tpu"]);
    assert!(!ok && err.contains("unknown backend `tpu`"), "{err}");
}

#[test]
fn a_sparse_compile_prints_its_layers_and_draws_the_tile_maps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(fixture("llama_optimum_with_past"), d.join("model.onnx")).unwrap();
    write_word_tokenizer(&d.join("tokenizer.json"));
    let words: Vec<String> = (0..200).map(|i| format!("w{}", (i * 13) % 500)).collect();
    let calib = d.join("calib.txt");
    std::fs::write(&calib, words.join(" ")).unwrap();
    let model = d.join("model.onnx").to_string_lossy().into_owned();
    let out = d.join("s.patch");
    let o = out.to_string_lossy().into_owned();
    let c = calib.to_string_lossy().into_owned();
    let args = |method: &str, tile: &str, samples: &str| -> Vec<String> {
        [
            "compile",
            &model,
            "-o",
            &o,
            "--sparsity",
            "0.3",
            "--calib",
            &c,
            "--calib-seq",
            "32",
            "--calib-samples",
            samples,
            "--tile",
            tile,
            "--method",
            method,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: Vec<String>| patchc(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, _, err) = run(args("wanda", "16x16", "4"));
    assert!(ok, "{err}");
    assert!(
        err.contains("rel. error") && err.contains("method wanda"),
        "{err}"
    );
    assert!(out.with_extension("tiles.svg").exists());
    let svg = std::fs::read_to_string(out.with_extension("tiles.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("q_proj"), "{svg}");

    let (ok, _, err) = run(args("obs", "16x16", "4"));
    assert!(!ok && err.contains("unknown method `obs`"), "{err}");
    let (ok, _, err) = run(args("wanda", "6x8", "4"));
    assert!(
        !ok && err.contains("6x8") && err.contains("multiple of 4"),
        "{err}"
    );
    let (ok, _, err) = run(args("wanda", "16x16", "100"));
    assert!(!ok && err.contains("need 3200"), "{err}");
}

/// An interrupted compile (SIGINT, SIGTERM) exits 130 and leaves no partial output: the
/// previous bundle at the output path is unchanged and no temporary file remains. The output
/// location is checked before any work.
#[cfg(unix)]
#[test]
fn an_interrupted_compile_leaves_no_partial_output() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(fixture("llama_optimum_with_past"), d.join("model.onnx")).unwrap();
    write_word_tokenizer(&d.join("tokenizer.json"));
    let words: Vec<String> = (0..400).map(|i| format!("w{}", (i * 13) % 500)).collect();
    std::fs::write(d.join("calib.txt"), words.join(" ")).unwrap();
    let model = d.join("model.onnx").to_string_lossy().into_owned();
    let out = d.join("s.patch");
    std::fs::write(&out, b"the previous bundle").unwrap();
    let listing = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = listing();
    for signal in ["INT", "TERM"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_patchc"))
            .args(["compile", &model, "-o"])
            .arg(&out)
            .args(["--sparsity", "0.4", "--calib"])
            .arg(d.join("calib.txt"))
            .args([
                "--calib-seq",
                "32",
                "--calib-samples",
                "8",
                "--tile",
                "16x16",
            ])
            // Enough block-wise steps that the compile is still learning when interrupted.
            .args(["--blockwise-steps", "100000000"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("patchc starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let line = line.unwrap_or_default();
                if line.contains("learn blocks") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let learning = rx.recv_timeout(std::time::Duration::from_secs(300));
        // The shell's built-in `kill` (no procps needed).
        let killed = Command::new("sh")
            .args(["-c", &format!("kill -{signal} {}", child.id())])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        let err = reader.join().unwrap();
        assert!(
            learning.is_ok(),
            "the compile never reached learning:\n{err}"
        );
        assert!(killed.success());
        assert_eq!(status.code(), Some(130), "SIG{signal}:\n{err}");
        assert!(err.contains("interrupted: no partial output left"), "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), b"the previous bundle");
        assert_eq!(listing(), before, "SIG{signal} left files behind");
    }

    // Output locations that cannot be written fail at once, before calibration.
    let missing = d.join("no/such/dir/s.patch").to_string_lossy().into_owned();
    let here = d.to_string_lossy().into_owned();
    for (target, says) in [(&missing, "does not exist"), (&here, "is a directory")] {
        let (ok, _, err) = patchc(&[
            "compile",
            &model,
            "-o",
            target,
            "--sparsity",
            "0.4",
            "--calib",
            &d.join("calib.txt").to_string_lossy(),
            "--calib-seq",
            "32",
            "--calib-samples",
            "8",
        ]);
        assert!(!ok && err.contains(says), "{err}");
        assert!(
            !err.contains("calibrate"),
            "checked only after calibration: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}
