//! The compile pipeline behind `patchc compile`: ONNX → IR → passes → `.patch` bundle.
//!
//! Stages: import; the `cleanup` pipeline (constant folding, canonicalization, DCE, to a
//! fixpoint); calibration and masks when `--sparsity > 0`; the `pack` pipeline (hybrid MatMul
//! rewrite, DCE); the `fuse` pipeline (e-graph fusion, DCE); then one bundle with the
//! tokenizer, generation metadata and the compile report. `--dump-after PASS` writes the IR
//! after every run of that pass beside the output; `--stop-after PASS` ends there without a
//! bundle.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use patch_kernels::{TileShape, WeightDtype};
use patch_passes::fuse::{Fuse, FuseLimits};
use patch_passes::hybrid::{weight_matmuls, HybridMatMulRewrite};
use patch_passes::{
    cleanup_pipeline, dce::DeadCodeElimination, fusion_pipeline, layout_pipeline,
    schedule_pipeline, PassError, PassManager, PassObserver, PassRun, PipelineOutcome,
};
use patch_runtime::bundle::{self, BundleContents, BundleError, Generation};
use patch_runtime::ops::OpRegistry;
use serde_json::Value;

use crate::calibrate::{self, CalibError, CalibOptions};
use crate::onnx::{self, import::ImportError, LoadError};
use crate::report::{
    BlockPhases, BlockReport, BlockSparsity, FusionLimits, FusionReport, FusionRunner, MatMulShape,
    MemoryReport, NodeCounts, OpCount, PassReport, ReasonCount, Report, SensitivityReport,
    SparseReport,
};

/// Reports `(phase, done, total)` while compiling (for a progress bar).
pub type PhaseProgress = Arc<dyn Fn(&str, usize, usize) + Send + Sync>;

/// What to compile and how.
#[derive(Clone)]
pub struct CompileOptions {
    pub model: PathBuf,
    pub output: PathBuf,
    /// `tokenizer.json`; when `None`, one beside the model is used if present.
    pub tokenizer: Option<PathBuf>,
    /// Target global sparsity in [0, 0.5].
    pub sparsity: f64,
    /// Element type the packed weights are stored in.
    pub weights: WeightDtype,
    /// Tile shape of the hybrid format.
    pub tile: TileShape,
    /// Calibration and mask method (used when `sparsity > 0`).
    pub calib: CalibOptions,
    /// Run the fusion pipeline (on by default; off to compare).
    pub fuse: bool,
    /// Pass names after which to write the IR (`all` for every pass).
    pub dump_after: Vec<String>,
    /// Stop after the first run of this pass, writing no bundle.
    pub stop_after: Option<String>,
    pub progress: Option<PhaseProgress>,
}

/// Names of the passes `compile` runs, in order (for `--dump-after` / `--stop-after`).
pub const PASS_NAMES: [&str; 9] = [
    "fold-constants",
    "canonicalize",
    "cse",
    "dce",
    "hybrid-matmul",
    "fuse",
    "epilogue",
    "kv-layout",
    "schedule",
];

impl std::fmt::Debug for CompileOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompileOptions")
            .field("model", &self.model)
            .field("output", &self.output)
            .field("tokenizer", &self.tokenizer)
            .field("sparsity", &self.sparsity)
            .field("weights", &self.weights)
            .field("tile", &self.tile)
            .field("calib", &self.calib)
            .field("fuse", &self.fuse)
            .field("dump_after", &self.dump_after)
            .field("stop_after", &self.stop_after)
            .finish()
    }
}

impl CompileOptions {
    /// Dense f32 weights in 128x128 tiles.
    pub fn new(model: PathBuf, output: PathBuf) -> CompileOptions {
        CompileOptions {
            model,
            output,
            tokenizer: None,
            sparsity: 0.0,
            weights: WeightDtype::F32,
            tile: TileShape::new(128, 128).expect("128x128 is a valid tile"),
            calib: CalibOptions::default(),
            fuse: true,
            dump_after: Vec::new(),
            stop_after: None,
            progress: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("--sparsity must be within [0, 0.5] (0 = dense, 0.5 = every tile 2:4), got {0}")]
    SparsityRange(f64),
    #[error("unknown pass `{0}` (passes: {passes}, or `all` for --dump-after)", passes = PASS_NAMES.join(", "))]
    UnknownPass(String),
    /// A tokenizer that cannot be read, or that the model cannot embed.
    #[error("tokenizer `{path}`: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    /// Token metadata found beside the model that the graph cannot honour.
    #[error("generation metadata in `{dir}`: {msg}")]
    Generation { dir: PathBuf, msg: String },
    #[error(transparent)]
    Calib(#[from] CalibError),
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("importing `{path}`: {source}")]
    Import {
        path: PathBuf,
        #[source]
        source: Box<ImportError>,
    },
    #[error(transparent)]
    Pass(#[from] Box<PassError>),
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// What one compilation did.
#[derive(Clone, Debug)]
pub struct CompileReport {
    /// The report written into the bundle; `None` when `--stop-after` ended the compilation.
    pub bundle: Option<Report>,
    /// Every pass run, in order (also in `bundle`).
    pub passes: Vec<PassReport>,
    /// The pass `--stop-after` ended at (no bundle was written).
    pub stopped_after: Option<String>,
    /// IR files written by `--dump-after`.
    pub dumps: Vec<PathBuf>,
}

/// The activations' memory plan of the compiled graph (in node order, as the runtime makes
/// it): values planned, slots, and the arena's size in bytes as an expression of the symbolic
/// dims, against every activation in its own buffer.
fn memory_report(graph: &patch_runtime::Graph) -> MemoryReport {
    use patch_runtime::memplan::MemoryPlan;
    let plan = MemoryPlan::of_graph(graph);
    MemoryReport {
        activations: plan.planned_values(),
        slots: plan.slot_count(),
        arena_bytes: plan.arena_bytes().to_string(),
        unshared_bytes: plan.unshared_bytes().to_string(),
    }
}

fn pass_reports(runs: &[PassRun]) -> Vec<PassReport> {
    runs.iter().map(PassReport::from).collect()
}

/// Writes the IR after the passes named in `dump_after` to `<output>.<NN>.<pipeline>.<pass>.ir`.
struct Dumper<'a> {
    output: &'a Path,
    wanted: &'a [String],
    written: Vec<PathBuf>,
    error: Option<CompileError>,
}

impl Dumper<'_> {
    fn after(&mut self, run: &PassRun, graph: &patch_runtime::Graph) {
        let all = self.wanted.iter().any(|w| w == "all");
        if self.error.is_some() || !(all || self.wanted.iter().any(|w| w == run.pass)) {
            return;
        }
        let mut name = self.output.as_os_str().to_owned();
        name.push(format!(
            ".{:02}.{}.{}.ir",
            self.written.len(),
            run.pipeline,
            run.pass
        ));
        let path = PathBuf::from(name);
        let text = graph.to_text();
        match patch_runtime::atomic::write_atomically(&path, &[text.as_bytes()]) {
            Ok(()) => self.written.push(path),
            Err(source) => self.error = Some(CompileError::Write { path, source }),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CompileError> {
    std::fs::read(path).map_err(|source| CompileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Generation metadata from a `generation.json` or Hugging Face `generation_config.json` /
/// `tokenizer_config.json` / `config.json` / `chat_template.jinja` beside the model, whichever
/// exist.
fn generation_metadata(dir: &Path) -> Result<Generation, CompileError> {
    let mut gen = Generation::default();
    let ids = |v: &Value| -> Vec<i64> {
        match v {
            Value::Number(n) => n.as_i64().into_iter().collect(),
            Value::Array(a) => a.iter().filter_map(Value::as_i64).collect(),
            _ => Vec::new(),
        }
    };
    for name in [
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "generation.json",
    ] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let v: Value =
            serde_json::from_slice(&read(&path)?).map_err(|source| CompileError::Json {
                path: path.clone(),
                source,
            })?;
        if let Some(e) = v.get("eos_token_id").or_else(|| v.get("eos_token_ids")) {
            let found = ids(e);
            if !found.is_empty() {
                gen.eos_token_ids = found;
            }
        }
        if let Some(b) = v.get("bos_token_id").and_then(Value::as_i64) {
            gen.bos_token_id = Some(b);
        }
        if let Some(add) = v.get("add_bos_token").and_then(Value::as_bool) {
            gen.add_bos_token = Some(add);
        }
        if let Some(t) = v.get("chat_template").and_then(Value::as_str) {
            gen.chat_template = Some(t.to_string());
        }
        for key in [
            "max_position_embeddings",
            "n_positions",
            "context_length",
            "max_context",
        ] {
            if let Some(n) = v.get(key).and_then(Value::as_u64) {
                gen.max_context = Some(n);
            }
        }
    }
    // transformers 5 saves the chat template as its own file; it wins over a JSON copy, as
    // it does when transformers loads the directory.
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let text = String::from_utf8(read(&jinja)?).map_err(|e| CompileError::Read {
            path: jinja.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        gen.chat_template = Some(text);
    }
    Ok(gen)
}

/// A tokenizer.json the runtime can load, with no more tokens than the model has ids (fewer is
/// common: vocabularies are padded).
fn check_tokenizer(json: &[u8], vocab: Option<usize>) -> Result<(), String> {
    use patch_runtime::llm::LlmError;
    let tok = patch_runtime::llm::text::TextTokenizer::from_bytes(json).map_err(|e| match e {
        LlmError::Tokenizer(msg) => msg,
        other => other.to_string(),
    })?;
    match vocab {
        Some(v) if tok.vocab_size() > v => Err(format!(
            "it has {} tokens but the model's logits have {v}: the tokenizer belongs to another model",
            tok.vocab_size()
        )),
        _ => Ok(()),
    }
}

/// The token ids of `gen` against the model's vocabulary (when the graph states it), and a
/// BOS asked for by `add_bos_token` that has an id.
fn check_generation(gen: &Generation, vocab: Option<usize>) -> Result<(), String> {
    let ids = gen
        .eos_token_ids
        .iter()
        .map(|&id| ("eos_token_id", id))
        .chain(gen.bos_token_id.map(|id| ("bos_token_id", id)));
    for (key, id) in ids {
        let outside = id < 0 || vocab.is_some_and(|v| id as u64 >= v as u64);
        if outside {
            let range = vocab.map_or("non-negative".to_string(), |v| format!("within 0..{v}"));
            return Err(format!(
                "{key} {id} is not a token of the model (ids are {range})"
            ));
        }
    }
    if gen.add_bos_token == Some(true) && gen.bos_token_id.is_none() {
        return Err(
            "add_bos_token is true but no bos_token_id is given (set it in config.json or \
             generation_config.json)"
                .into(),
        );
    }
    Ok(())
}

/// Compiles `options.model` into `options.output`.
pub fn compile(
    options: &CompileOptions,
    registry: &OpRegistry,
) -> Result<CompileReport, CompileError> {
    let s = options.sparsity;
    if !(0.0..=0.5).contains(&s) || s.is_nan() {
        return Err(CompileError::SparsityRange(s));
    }
    for name in options.dump_after.iter().chain(&options.stop_after) {
        let dump_all = name == "all" && options.stop_after.as_deref() != Some("all");
        if !PASS_NAMES.contains(&name.as_str()) && !dump_all {
            return Err(CompileError::UnknownPass(name.clone()));
        }
    }
    // The output location is checked before the long work (the bundle is written last).
    if options.stop_after.is_none() {
        patch_runtime::atomic::check_target(&options.output).map_err(|source| {
            CompileError::Write {
                path: options.output.clone(),
                source,
            }
        })?;
    }
    let report_phase = |phase: &str, done: usize, total: usize| {
        if let Some(p) = &options.progress {
            p(phase, done, total);
        }
    };
    let mut phases = BTreeMap::new();
    let t = Instant::now();
    report_phase("import", 0, 1);
    let model = onnx::load_model(&options.model)?;
    let mut graph =
        onnx::import_model(&model, registry, &Default::default()).map_err(|source| {
            CompileError::Import {
                path: options.model.clone(),
                source: Box::new(source),
            }
        })?;
    phases.insert("import", t.elapsed().as_secs_f64());
    let nodes_imported = graph.node_count();
    let parameters = graph.const_elements();

    let dir = options
        .model
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let tokenizer_path = options
        .tokenizer
        .clone()
        .or_else(|| Some(dir.join("tokenizer.json")).filter(|p| p.exists()));
    let tokenizer_json = tokenizer_path
        .as_deref()
        .map(read)
        .transpose()?
        .map(Bytes::from);
    if let (Some(path), Some(json)) = (&tokenizer_path, &tokenizer_json) {
        check_tokenizer(json, patch_passes::hybrid::vocab_size(&graph)).map_err(|msg| {
            CompileError::Tokenizer {
                path: path.clone(),
                msg,
            }
        })?;
    }
    let generation = generation_metadata(&dir)?;
    check_generation(&generation, patch_passes::hybrid::vocab_size(&graph)).map_err(|msg| {
        CompileError::Generation {
            dir: dir.clone(),
            msg,
        }
    })?;

    let dumper = std::cell::RefCell::new(Dumper {
        output: &options.output,
        wanted: &options.dump_after,
        written: Vec::new(),
        error: None,
    });
    let observe =
        || -> PassObserver<'_> { Box::new(|run, graph| dumper.borrow_mut().after(run, graph)) };
    let mut runs: Vec<PassRun> = Vec::new();
    // Runs one pipeline; `Some(report)` when --stop-after ended it (or a dump failed).
    let mut stage = |manager: PassManager<'_>,
                     graph: &mut patch_runtime::Graph|
     -> Result<Option<CompileReport>, CompileError> {
        let outcome: PipelineOutcome = manager
            .observe(observe())
            .stop_after(options.stop_after.clone())
            .run(graph)
            .map_err(Box::new)?;
        runs.extend(outcome.runs.iter().cloned());
        if let Some(e) = dumper.borrow_mut().error.take() {
            return Err(e);
        }
        Ok(outcome.stopped.then(|| CompileReport {
            bundle: None,
            passes: pass_reports(&runs),
            stopped_after: options.stop_after.clone(),
            dumps: dumper.borrow().written.clone(),
        }))
    };

    let t = Instant::now();
    report_phase("optimize", 0, 1);
    if let Some(stopped) = stage(cleanup_pipeline(registry), &mut graph)? {
        return Ok(stopped);
    }
    phases.insert("cleanup", t.elapsed().as_secs_f64());
    let nodes_cleaned = graph.node_count();
    let targets = weight_matmuls(&graph);
    let mut sparse_report = None;
    let mut masks = HashMap::new();
    if s > 0.0 {
        let c = calibrate::calibrate(
            &graph,
            &options.model,
            tokenizer_json.as_ref(),
            &generation,
            s,
            options.tile,
            &options.calib,
            &report_phase,
        )?;
        for (phase, secs) in &c.phase_seconds {
            phases.insert(phase, *secs);
        }
        let svg_path = options.output.with_extension("tiles.svg");
        let title = format!(
            "{}: {} at sparsity {s} (achieved {:.4}), {}x{} tiles",
            options.model.display(),
            options.calib.method,
            c.achieved,
            options.tile.k,
            options.tile.n
        );
        let svg = calibrate::tile_map_svg(&c.tile_maps, &c.tile_sizes, &title);
        patch_runtime::atomic::write_atomically(&svg_path, &[svg.as_bytes()]).map_err(
            |source| CompileError::Write {
                path: svg_path.clone(),
                source,
            },
        )?;
        let blocks_svg =
            (!c.blocks.is_empty()).then(|| options.output.with_extension("blocks.svg"));
        if let Some(path) = &blocks_svg {
            let svg = calibrate::blockwise_svg(
                &c.blocks,
                &format!(
                    "{}: block-wise learning at sparsity {s}",
                    options.model.display()
                ),
            );
            patch_runtime::atomic::write_atomically(path, &[svg.as_bytes()]).map_err(|source| {
                CompileError::Write {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        sparse_report = Some(SparseReport {
            method: options.calib.method.name().to_string(),
            target_sparsity: s,
            achieved_sparsity: c.achieved,
            calibration_tokens: c.calib_tokens,
            calibration_samples: options.calib.samples,
            calibration_seq: options.calib.seq,
            seed: options.calib.seed,
            update_weights: options.calib.update_weights,
            patch_steps: options.calib.patch.steps,
            joint_steps: options.calib.patch.joint.steps,
            tile_map_svg: svg_path.display().to_string(),
            blockwise_svg: blocks_svg.map(|p| p.display().to_string()),
            blockwise: c
                .blocks
                .iter()
                .map(|b| BlockReport {
                    block: b.number,
                    prior_error: b.prior_error,
                    error: b.error,
                    learned: b.learned,
                    seconds: b.seconds,
                    phase_seconds: BlockPhases {
                        statistics: b.phases[0],
                        prior: b.phases[1],
                        learn: b.phases[2],
                        advance: b.phases[3],
                    },
                    curve: b.curve.clone(),
                })
                .collect(),
            blockwise_fallback: c.blockwise_fallback,
            cache_rejected: c.cache_rejected,
            allocation: c.allocation.map(|a| a.name().to_string()),
            allocation_fallback: c.allocation_fallback,
            sensitivity: c.sensitivity.map(|(windows, loss)| SensitivityReport {
                windows,
                dense_loss: loss,
                dense_perplexity: loss.exp(),
            }),
            block_sparsity: c
                .block_sparsity
                .iter()
                .map(|&(block, sparsity)| BlockSparsity { block, sparsity })
                .collect(),
            layers: c.layers,
        });
        masks = c.masks;
    }
    let t = Instant::now();
    let pack = PassManager::new(registry)
        .named("pack")
        .with_pass(HybridMatMulRewrite {
            masks,
            progress: options.progress.clone().map(|p| -> patch_passes::Progress {
                Arc::new(move |done, total| p("pack weights", done, total))
            }),
            ..HybridMatMulRewrite::dense(options.tile, options.weights)
        })
        .with_pass(DeadCodeElimination);
    if let Some(stopped) = stage(pack, &mut graph)? {
        return Ok(stopped);
    }
    phases.insert("pack", t.elapsed().as_secs_f64());
    let nodes_packed = graph.node_count();

    let mut fusion_report = None;
    if options.fuse {
        let t = Instant::now();
        report_phase("fuse", 0, 1);
        let fuse = Fuse::new(FuseLimits::default());
        let handle = fuse.report_handle();
        if let Some(stopped) = stage(fusion_pipeline(registry, fuse), &mut graph)? {
            return Ok(stopped);
        }
        let r = handle.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let limits = FuseLimits::default();
        fusion_report = Some(FusionReport {
            fused: r
                .fused
                .iter()
                .map(|(op, count)| OpCount {
                    op: op.clone(),
                    count: *count,
                })
                .collect(),
            skipped: r
                .skipped
                .iter()
                .map(|(reason, count)| ReasonCount {
                    reason: reason.clone(),
                    count: *count,
                })
                .collect(),
            runner: FusionRunner {
                stop_reason: r.stop_reason.clone(),
                iterations: r.iterations,
                egraph_nodes: r.egraph_nodes,
                egraph_classes: r.egraph_classes,
                limits: FusionLimits {
                    iterations: limits.iterations,
                    nodes: limits.nodes,
                    seconds: limits.time.as_secs_f64(),
                },
            },
            unfused_decode_ops: Vec::new(),
        });
        phases.insert("fuse", t.elapsed().as_secs_f64());
        let t = Instant::now();
        if let Some(stopped) = stage(layout_pipeline(registry), &mut graph)? {
            return Ok(stopped);
        }
        phases.insert("layout", t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    if let Some(stopped) = stage(schedule_pipeline(registry), &mut graph)? {
        return Ok(stopped);
    }
    phases.insert("schedule", t.elapsed().as_secs_f64());
    if let Some(fusion) = &mut fusion_report {
        fusion.unfused_decode_ops = patch_passes::fuse::unfused::unfused_in_decode_path(&graph)
            .iter()
            .map(|(op, count)| OpCount {
                op: op.to_string(),
                count: *count,
            })
            .collect();
    }
    let memory = memory_report(&graph);
    let dumps = dumper.borrow().written.clone();

    let rewritten: Vec<_> = targets.iter().filter(|t| t.rewritable).collect();
    let kept: Vec<_> = targets.iter().filter(|t| !t.rewritable).collect();
    let shape = |t: &&patch_passes::hybrid::WeightMatMul| MatMulShape {
        node: t.node.clone(),
        k: t.k,
        n: t.n,
    };
    let mut report = Report {
        source: options.model.display().to_string(),
        sparsity: s,
        weights: patch_runtime::ops::hybrid::dtype_name(options.weights).to_string(),
        tile: [options.tile.k, options.tile.n],
        nodes: NodeCounts {
            imported: nodes_imported,
            after_cleanup: nodes_cleaned,
            after_pack: nodes_packed,
            final_: graph.node_count(),
        },
        passes: pass_reports(&runs),
        fusion: fusion_report,
        memory,
        parameters,
        weight_matmuls: targets.len(),
        hybrid_matmuls: rewritten.len(),
        hybrid_parameters: rewritten.iter().map(|t| t.k * t.n).sum::<usize>(),
        plain_matmuls: kept.iter().map(shape).collect(),
        dense_only_matmuls: rewritten
            .iter()
            .filter(|t| !t.prunable)
            .map(shape)
            .collect(),
        tokenizer: tokenizer_path.as_ref().map(|p| p.display().to_string()),
        sparse: sparse_report,
        phase_seconds: phases
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    let metadata = BTreeMap::from([
        ("source".to_string(), options.model.display().to_string()),
        (
            "compiler".to_string(),
            format!("patchc {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    let t = Instant::now();
    report_phase("write", 0, 1);
    bundle::write_bundle(
        &options.output,
        &BundleContents {
            graph,
            tokenizer_json,
            generation,
            compile_report_json: report.to_json(),
            metadata,
        },
    )?;
    report
        .phase_seconds
        .insert("write".into(), t.elapsed().as_secs_f64());
    Ok(CompileReport {
        passes: report.passes.clone(),
        bundle: Some(report),
        stopped_after: None,
        dumps,
    })
}
