//! The calibration stage of `patchc compile --sparsity S`: run the imported model on
//! calibration text, collect the Gram matrix of every prunable MatMul's input, compute the
//! hybrid masks with the chosen method, and describe the result (report rows, tile-map
//! picture).

use std::collections::HashMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use patch_kernels::{TileKind, TileShape};
use patch_passes::blocks::{find_blocks, Block};
use patch_passes::calibration::Calibration;
use patch_passes::hybrid::{WeightMask, WeightMatMul};
use patch_passes::masks::blockwise::{
    self, BlockOutcome, BlockwiseInput, BlockwiseOptions, DenseOutputs,
};
use patch_passes::masks::{
    self, patch::PatchOptions, Allocation, LayerMask, MaskOptions, MaskTarget, Method,
};
use patch_passes::sensitivity::{LossGradients, Sensitivity};
use patch_passes::{fuse, fusion_pipeline};
use patch_runtime::bundle::{BundleContents, Generation};
use patch_runtime::llm::LanguageModel;
use patch_runtime::ops::OpRegistry;
use patch_runtime::Graph;
use patch_runtime::{Tensor, ValueId};

use crate::report::LayerReport;

/// How to calibrate.
#[derive(Clone, Debug)]
pub struct CalibOptions {
    pub method: Method,
    /// Calibration text; default: the project's Brown calibration split when present.
    pub text: Option<PathBuf>,
    pub samples: usize,
    pub seq: usize,
    pub seed: u64,
    pub update_weights: bool,
    pub patch: PatchOptions,
    /// File to reuse the calibration statistics from (when it was made from the same model,
    /// text, samples and length) or to save them to.
    pub cache: Option<PathBuf>,
    /// Sequential block-wise learning after the global allocation (`None`: matrix by matrix).
    pub blockwise: Option<BlockwiseOptions>,
    /// How `--method patch` shares the budget between matrices.
    pub allocation: Allocation,
    /// Calibration windows whose loss gradients give the sensitivities of the `loss` and
    /// `uniform-blocks` allocations.
    pub sensitivity_windows: usize,
}

impl Default for CalibOptions {
    fn default() -> Self {
        CalibOptions {
            method: Method::Patch,
            text: None,
            samples: 64,
            seq: 512,
            seed: 0,
            update_weights: false,
            patch: PatchOptions::default(),
            cache: None,
            blockwise: Some(BlockwiseOptions::default()),
            allocation: Allocation::Loss,
            sensitivity_windows: 16,
        }
    }
}

const CACHE_MAGIC: &[u8; 8] = b"PATCHCAL";

/// The loss sensitivities of a calibration cache: per weight name, per output channel.
#[derive(Clone, Debug, Default)]
struct CachedSensitivity {
    windows: usize,
    loss: f64,
    by_weight: HashMap<String, Vec<f64>>,
}

/// Writes the Gram matrices (by activation name) and the sensitivities under `key`.
fn save_cache(
    path: &Path,
    key: &str,
    graph: &Graph,
    calib: &Calibration,
    sensitivity: Option<&CachedSensitivity>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    buf.extend_from_slice(CACHE_MAGIC);
    buf.extend_from_slice(&(key.len() as u64).to_le_bytes());
    buf.extend_from_slice(key.as_bytes());
    let mut grams: Vec<_> = calib.grams.iter().collect();
    grams.sort_by_key(|(id, _)| **id);
    buf.extend_from_slice(&(grams.len() as u64).to_le_bytes());
    for (id, g) in grams {
        let name = &graph.value(*id).name;
        buf.extend_from_slice(&(name.len() as u64).to_le_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&(g.k as u64).to_le_bytes());
        buf.extend_from_slice(&(g.rows as u64).to_le_bytes());
        for v in &g.h {
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
    let empty = CachedSensitivity::default();
    let sens = sensitivity.unwrap_or(&empty);
    buf.extend_from_slice(&(sens.windows as u64).to_le_bytes());
    buf.extend_from_slice(&sens.loss.to_le_bytes());
    let mut entries: Vec<_> = sens.by_weight.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    buf.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (name, f) in entries {
        buf.extend_from_slice(&(name.len() as u64).to_le_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&(f.len() as u64).to_le_bytes());
        for v in f {
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
    patch_runtime::atomic::write_atomically(path, &[&buf])
}

/// Reads the statistics of a calibration cache whatever its key (for tools that inspect or
/// cross-check them; compiles use the key-checked read). `None` if it is missing, unreadable
/// or names values `graph` does not have.
pub fn read_cache(path: &Path, graph: &Graph) -> Option<Calibration> {
    load_cache(path, None, graph).ok().flatten().map(|c| c.0)
}

/// Reads a cache written by [`save_cache`] if its key is `key` (any key for `None`):
/// `Ok(None)` when there is no file, `Err(why)` when it cannot be used (another key, a
/// malformed or truncated file, values `graph` does not have, non-finite statistics). A
/// cache that is not used is recomputed, never trusted.
fn load_cache(
    path: &Path,
    key: Option<&str>,
    graph: &Graph,
) -> Result<Option<(Calibration, CachedSensitivity)>, String> {
    let b = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot be read ({e})")),
    };
    let mut at = 0usize;
    let truncated = || "is truncated or malformed".to_string();
    let mut take = |n: usize| -> Result<&[u8], String> {
        let s = at
            .checked_add(n)
            .and_then(|end| b.get(at..end))
            .ok_or_else(truncated)?;
        at += n;
        Ok(s)
    };
    if take(8).ok() != Some(&CACHE_MAGIC[..]) {
        return Err("is not a calibration cache (no PATCHCAL header)".into());
    }
    let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes")) as usize;
    let klen = u64_of(take(8)?);
    let stored = take(klen)?;
    if key.is_some_and(|key| stored != key.as_bytes()) {
        return Err(format!(
            "was made from other inputs ({})",
            String::from_utf8_lossy(stored)
        ));
    }
    let count = u64_of(take(8)?);
    let mut calib = Calibration::default();
    for _ in 0..count {
        let nlen = u64_of(take(8)?);
        let name = std::str::from_utf8(take(nlen)?)
            .map_err(|_| truncated())?
            .to_string();
        let k = u64_of(take(8)?);
        let rows = u64_of(take(8)?);
        let bytes = k
            .checked_mul(k)
            .and_then(|e| e.checked_mul(8))
            .ok_or_else(truncated)?;
        let h: Vec<f64> = take(bytes)?
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if h.iter().any(|v| !v.is_finite()) {
            return Err(format!(
                "holds a non-finite value in the statistics of `{name}`"
            ));
        }
        let id = graph.value_by_name(&name).ok_or_else(|| {
            format!("names the activation `{name}`, which the model does not have")
        })?;
        calib
            .grams
            .insert(id, patch_passes::calibration::Gram { k, h, rows });
    }
    let f64_of = |s: &[u8]| f64::from_le_bytes(s.try_into().expect("8 bytes"));
    let mut sens = CachedSensitivity {
        windows: u64_of(take(8)?),
        loss: f64_of(take(8)?),
        by_weight: HashMap::new(),
    };
    if !sens.loss.is_finite() {
        return Err("holds a non-finite dense loss".into());
    }
    for _ in 0..u64_of(take(8)?) {
        let nlen = u64_of(take(8)?);
        let name = std::str::from_utf8(take(nlen)?)
            .map_err(|_| truncated())?
            .to_string();
        let n = u64_of(take(8)?);
        let f: Vec<f64> = take(n.checked_mul(8).ok_or_else(truncated)?)?
            .chunks_exact(8)
            .map(f64_of)
            .collect();
        if f.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(format!(
                "holds a negative or non-finite sensitivity of `{name}`"
            ));
        }
        sens.by_weight.insert(name, f);
    }
    if at != b.len() {
        return Err(format!("has {} bytes past its end", b.len() - at));
    }
    Ok(Some((calib, sens)))
}

/// Checks cached statistics against the MatMuls they are for: every target's input has a
/// Gram matrix as wide as the target's K, accumulated over at least one row, and every
/// cached sensitivity has one entry per output channel of its weight.
fn check_cached(
    calib: &Calibration,
    sens: &CachedSensitivity,
    graph: &Graph,
    targets: &[WeightMatMul],
) -> Result<(), String> {
    for t in targets {
        let Some(x) = graph.node(t.node_id).inputs[0] else {
            continue;
        };
        let name = &graph.value(x).name;
        let g = calib
            .grams
            .get(&x)
            .ok_or_else(|| format!("has no statistics for `{name}`, the input of `{}`", t.node))?;
        if g.k != t.k || g.h.len() != t.k * t.k {
            return Err(format!(
                "holds a {}-wide Gram matrix for `{name}`, where `{}` multiplies a {}-wide input",
                g.k, t.node, t.k
            ));
        }
        if g.rows == 0 {
            return Err(format!("holds statistics of no rows for `{name}`"));
        }
        if let Some(f) = sens.by_weight.get(&t.weight) {
            if f.len() != t.n {
                return Err(format!(
                    "holds {} sensitivities for `{}`, which has {} output channels",
                    f.len(),
                    t.weight,
                    t.n
                ));
            }
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    #[error("no prunable weight MatMul in the model (every MatMul/Gemm with a constant 2-D f32 weight that has no vocabulary-sized dimension is prunable)")]
    NothingToPrune,
    #[error("--method {0} needs calibration text: pass --calib FILE (the default, models/brown/build/calib.txt, was not found; `bash models/brown/prepare.sh` makes it)")]
    NoText(Method),
    #[error("--method {0} needs the model's tokenizer to read calibration text: put tokenizer.json beside the model or pass --tokenizer")]
    NoTokenizer(Method),
    #[error("cannot read calibration text `{path}`: {msg}")]
    Read { path: PathBuf, msg: String },
    #[error("calibration text `{path}` has {have} tokens; {samples} samples of {seq} need {need} (lower --calib-samples or --calib-seq)")]
    TooShort {
        path: PathBuf,
        have: usize,
        need: usize,
        samples: usize,
        seq: usize,
    },
    #[error("--calib-samples and --calib-seq must be at least 1 and 2")]
    BadSize,
    #[error("--joint-steps learns the 2:4 patterns of --method patch; --method {0} has no learned patterns (drop --joint-steps or use --method patch)")]
    JointNeedsPatch(Method),
    #[error("calibration run: {0}")]
    Run(String),
    #[error("--allocation {0} needs the loss sensitivity, and the model's loss cannot be differentiated: {1} (use --allocation relative)")]
    Sensitivity(Allocation, String),
    #[error("--allocation {0} needs at least one --sensitivity-windows window")]
    NoSensitivityWindows(Allocation),
    #[error("cannot write the calibration cache `{path}`: {msg}")]
    CacheWrite { path: PathBuf, msg: String },
    #[error(transparent)]
    Mask(#[from] masks::MaskError),
    #[error("block-wise calibration: {0}")]
    Blockwise(#[from] blockwise::BlockwiseError),
}

/// The project's calibration split, looked for from the current directory and from the
/// model's directory upwards.
fn default_text(model: &Path) -> Option<PathBuf> {
    let rel = Path::new("models/brown/build/calib.txt");
    let mut roots = vec![std::env::current_dir().ok()?];
    let mut dir = model.canonicalize().ok()?.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        roots.push(d.clone());
        dir = d.parent().map(Path::to_path_buf);
    }
    roots.into_iter().map(|r| r.join(rel)).find(|p| p.is_file())
}

/// The prunable targets of `graph`.
pub fn prunable(graph: &Graph) -> Vec<WeightMatMul> {
    patch_passes::hybrid::weight_matmuls(graph)
        .into_iter()
        .filter(|t| t.rewritable && t.prunable)
        .collect()
}

/// What calibration produced.
pub struct Calibrated {
    pub masks: HashMap<String, WeightMask>,
    pub layers: Vec<LayerReport>,
    pub tile_maps: Vec<(String, patch_kernels::TileMap)>,
    pub achieved: f64,
    pub phase_seconds: Vec<(&'static str, f64)>,
    pub calib_tokens: usize,
    /// Per block, when block-wise learning ran.
    pub blocks: Vec<BlockOutcome>,
    /// Why block-wise learning did not run although it was asked for.
    pub blockwise_fallback: Option<String>,
    /// Why the calibration cache that was given could not be used (it was recomputed and
    /// written again), completing "the calibration cache `PATH` ...".
    pub cache_rejected: Option<String>,
    /// The allocation `patch` used (None when no tiles were chosen: another method, or 50%).
    pub allocation: Option<Allocation>,
    /// Why the asked-for allocation was replaced by `relative`.
    pub allocation_fallback: Option<String>,
    /// Windows and mean cross-entropy (nats/token) of the dense model where the loss
    /// sensitivities came from.
    pub sensitivity: Option<(usize, f64)>,
    /// Per transformer block (as found by dataflow): its weights' sparsity.
    pub block_sparsity: Vec<(u64, f64)>,
    /// Per entry of `tile_maps`: pruned weights and all weights.
    pub tile_sizes: Vec<(usize, usize)>,
}

/// The graph calibration runs: `graph` fused (the interpreter runs fused ops several times
/// faster, and block-wise learning differentiates the fused block). Its prunable MatMuls keep
/// their weights' names.
fn calibration_graph(graph: &Graph, registry: &OpRegistry) -> Result<Graph, CalibError> {
    let mut fused = graph.clone();
    fusion_pipeline(registry, fuse::Fuse::new(fuse::FuseLimits::default()))
        .run(&mut fused)
        .map_err(|e| CalibError::Run(e.to_string()))?;
    Ok(fused)
}

/// The most memory the calibration run may keep for the dense model's block outputs (in
/// bf16); past it, block-wise learning runs the dense stream again instead.
const DENSE_OUTPUTS_BUDGET: usize = 4 << 30;

/// What the calibration run captures for block-wise learning: the first block's input for
/// every window, the side values (rotary tables, mask, empty past) of the first window and,
/// within [`DENSE_OUTPUTS_BUDGET`], every block's dense output for every window.
struct Capture {
    wanted_x: ValueId,
    side: Vec<ValueId>,
    windows: Vec<Tensor>,
    side_values: HashMap<ValueId, Tensor>,
    /// Block `i`'s output value at `i`; empty when the outputs are not kept.
    outputs: Vec<ValueId>,
    dense_outputs: DenseOutputs,
    error: Option<String>,
}

impl Capture {
    fn observe(
        &mut self,
        node: &patch_runtime::ir::Node,
        inputs: &[Option<&Tensor>],
        window: usize,
    ) {
        for (v, t) in node.inputs.iter().zip(inputs) {
            let (Some(v), Some(t)) = (v, t) else { continue };
            if let Some(b) = self.outputs.iter().position(|o| o == v) {
                let have = self.dense_outputs.blocks.get(b).map_or(0, Vec::len);
                if have == window {
                    if let Err(e) = self.dense_outputs.push(b, t) {
                        self.error.get_or_insert(e);
                    }
                }
            }
            if *v == self.wanted_x && self.windows.len() == window {
                self.windows.push((*t).clone());
            } else if window == 0 && self.side.contains(v) && !self.side_values.contains_key(v) {
                self.side_values.insert(*v, (*t).clone());
            }
        }
    }
}

/// What block-wise learning starts from: the first block's input per window, the side
/// values, and the dense block outputs when they were kept.
type CapturedStream = (Vec<Tensor>, HashMap<ValueId, Tensor>, Option<DenseOutputs>);

/// Runs calibration and mask selection for `graph` at `sparsity`.
#[allow(clippy::too_many_arguments)]
pub fn calibrate(
    graph: &Graph,
    model_path: &Path,
    tokenizer_json: Option<&Bytes>,
    generation: &Generation,
    sparsity: f64,
    tile: TileShape,
    options: &CalibOptions,
    progress: &dyn Fn(&str, usize, usize),
) -> Result<Calibrated, CalibError> {
    let targets = prunable(graph);
    if targets.is_empty() {
        return Err(CalibError::NothingToPrune);
    }
    if options.samples == 0 || options.seq < 2 {
        return Err(CalibError::BadSize);
    }
    let method = options.method;
    if options.patch.joint.steps > 0 && method != Method::Patch {
        return Err(CalibError::JointNeedsPatch(method));
    }
    let registry = OpRegistry::onnx();
    let mut phase_seconds = Vec::new();
    let mut calib = Calibration::default();
    let mut calib_tokens = 0;
    let mut blockwise_fallback = None;
    let mut cache_rejected = None;
    let mut allocation_fallback = None;
    let mut sensitivity: Option<CachedSensitivity> = None;
    let mut block_by_weight: HashMap<String, u64> = HashMap::new();
    let chooses_tiles = method == Method::Patch && sparsity < 0.5;
    if chooses_tiles && options.allocation.needs_sensitivity() && options.sensitivity_windows == 0 {
        return Err(CalibError::NoSensitivityWindows(options.allocation));
    }
    // Block-wise learning needs the statistics pass to capture the stream.
    let mut blockwise_plan: Option<(Graph, Vec<WeightMatMul>, Vec<Block>)> = None;
    let mut blockwise_stream: Option<CapturedStream> = None;
    if method.needs_calibration() || options.update_weights {
        // Everything that can fail cheaply is checked before the long run.
        let tok_json = tokenizer_json.ok_or(CalibError::NoTokenizer(method))?;
        let path = options
            .text
            .clone()
            .or_else(|| default_text(model_path))
            .ok_or(CalibError::NoText(method))?;
        let text = std::fs::read_to_string(&path).map_err(|e| CalibError::Read {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let t0 = std::time::Instant::now();
        let fused = calibration_graph(graph, &registry)?;
        let fused_targets = prunable(&fused);
        // Block-wise learning refines --method patch; the other methods stay matrix-wise.
        if method == Method::Patch {
            match find_blocks(&fused, &fused_targets) {
                Ok(blocks) => {
                    for b in &blocks {
                        for &i in &b.targets {
                            block_by_weight.insert(fused_targets[i].weight.clone(), b.number);
                        }
                    }
                    if options.blockwise.is_some() {
                        blockwise_plan = Some((fused.clone(), fused_targets.clone(), blocks));
                    }
                }
                Err(why) if options.blockwise.is_some() => blockwise_fallback = Some(why),
                Err(_) => {}
            }
        }
        // The fused graph's activation entering each weight, by weight name.
        let fused_input: HashMap<&str, ValueId> = fused_targets
            .iter()
            .filter_map(|t| Some((t.weight.as_str(), fused.node(t.node_id).inputs[0]?)))
            .collect();
        let meta = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let key = format!(
            "v3 fused model={} ({} bytes) text={} ({} bytes) samples={} seq={} targets={}",
            model_path.display(),
            meta(model_path),
            path.display(),
            meta(&path),
            options.samples,
            options.seq,
            targets.len()
        );
        let cached = match options.cache.as_deref() {
            Some(c) => load_cache(c, Some(&key), &fused).and_then(|loaded| match loaded {
                Some((calib, sens)) => check_cached(&calib, &sens, &fused, &fused_targets)
                    .map(|()| Some((calib, sens))),
                None => Ok(None),
            }),
            None => Ok(None),
        };
        let cached = cached.unwrap_or_else(|why| {
            cache_rejected = Some(why);
            None
        });
        let model = LanguageModel::new(BundleContents {
            graph: fused.clone(),
            tokenizer_json: Some(tok_json.clone()),
            generation: generation.clone(),
            ..Default::default()
        })
        .map_err(|e| CalibError::Run(e.to_string()))?;
        let ids = model
            .tokenizer()
            .and_then(|t| t.encode(&text))
            .map_err(|e| CalibError::Run(e.to_string()))?;
        let need = options.samples * options.seq;
        if ids.len() < need {
            return Err(CalibError::TooShort {
                path,
                have: ids.len(),
                need,
                samples: options.samples,
                seq: options.seq,
            });
        }
        let widths: HashMap<String, usize> = fused_targets
            .iter()
            .map(|t| (t.node.clone(), t.k))
            .collect();
        let span = ids.len() - options.seq;
        let mut cached_sensitivity = None;
        if let Some((c, sens)) = cached {
            calib = c;
            cached_sensitivity = Some(sens);
        }
        let mut capture = blockwise_plan.as_ref().map(|(g, _, blocks)| {
            let elements: usize = g
                .value(blocks[0].input)
                .ty
                .shape
                .iter()
                .skip(2)
                .map(|d| d.as_const().map_or(0, |v| v.max(0) as usize))
                .product::<usize>()
                * options.seq;
            let keep = elements > 0
                && DenseOutputs::bytes(blocks.len(), options.samples, elements)
                    <= DENSE_OUTPUTS_BUDGET;
            Capture {
                wanted_x: blocks[0].input,
                side: blocks.iter().flat_map(|b| b.side.iter().copied()).collect(),
                windows: Vec::new(),
                side_values: HashMap::new(),
                outputs: if keep {
                    blocks.iter().map(|b| b.output).collect()
                } else {
                    Vec::new()
                },
                dense_outputs: DenseOutputs::default(),
                error: None,
            }
        });
        let need_grams = calib.grams.is_empty();
        let todo = if need_grams || capture.is_some() {
            options.samples
        } else {
            0
        };
        for i in 0..todo {
            progress("calibrate", i, options.samples);
            // Samples spread evenly over the text.
            let start = span * i / options.samples.max(1);
            let sample = &ids[start..start + options.seq];
            let mut cache = model.new_cache();
            let mut grams = need_grams.then(|| calib.observe(&widths));
            let mut observe = |node: &patch_runtime::ir::Node, inputs: &[Option<&Tensor>]| {
                if let Some(g) = grams.as_mut() {
                    g(node, inputs);
                }
                if let Some(c) = capture.as_mut() {
                    c.observe(node, inputs, i);
                }
            };
            model
                .forward_observed(&mut cache, sample, 1, &mut observe)
                .map_err(|e| CalibError::Run(e.to_string()))?;
        }
        progress("calibrate", options.samples, options.samples);
        let mut sensitivity_seconds = 0.0;
        let mut new_sensitivity = false;
        if chooses_tiles && options.allocation.needs_sensitivity() {
            let windows = options.sensitivity_windows.min(options.samples);
            let complete = |c: &CachedSensitivity| {
                c.windows == windows
                    && fused_targets
                        .iter()
                        .all(|t| c.by_weight.get(&t.weight).is_some_and(|f| f.len() == t.n))
            };
            match cached_sensitivity.filter(complete) {
                Some(c) => sensitivity = Some(c),
                None => {
                    let t1 = std::time::Instant::now();
                    match LossGradients::new(&fused, &registry, &fused_targets) {
                        Err(e) if options.allocation == Allocation::Loss => {
                            allocation_fallback =
                                Some(format!("the model's loss cannot be differentiated: {e}"));
                        }
                        Err(e) => {
                            return Err(CalibError::Sensitivity(options.allocation, e.to_string()))
                        }
                        Ok(gradients) => {
                            let mut acc = Sensitivity::default();
                            for w in 0..windows {
                                progress("loss sensitivity", w, windows);
                                let start = span * w / windows;
                                let window: Vec<i64> = ids[start..start + options.seq]
                                    .iter()
                                    .map(|&v| v as i64)
                                    .collect();
                                gradients.observe(&window, &mut acc).map_err(|e| {
                                    CalibError::Run(format!("loss sensitivity, window {w}: {e}"))
                                })?;
                            }
                            progress("loss sensitivity", windows, windows);
                            let acc = acc.finish().map_err(CalibError::Run)?;
                            sensitivity = Some(CachedSensitivity {
                                windows,
                                loss: acc.loss,
                                by_weight: fused_targets
                                    .iter()
                                    .zip(acc.fisher)
                                    .map(|(t, f)| (t.weight.clone(), f))
                                    .collect(),
                            });
                            new_sensitivity = true;
                            sensitivity_seconds = t1.elapsed().as_secs_f64();
                        }
                    }
                }
            }
        }
        if let (Some(c), true) = (&options.cache, need_grams || new_sensitivity) {
            save_cache(c, &key, &fused, &calib, sensitivity.as_ref()).map_err(|e| {
                CalibError::CacheWrite {
                    path: c.clone(),
                    msg: e.to_string(),
                }
            })?;
        }
        // Key the statistics by the activations of `graph`, which the masks are computed on.
        let mut remapped = Calibration::default();
        for t in &targets {
            let (Some(&fx), Some(x)) = (
                fused_input.get(t.weight.as_str()),
                graph.node(t.node_id).inputs[0],
            ) else {
                continue;
            };
            if let Some(g) = calib.grams.get(&fx) {
                remapped.grams.entry(x).or_insert_with(|| g.clone());
            }
        }
        calib = remapped;
        if let Some(c) = capture {
            if c.windows.len() != options.samples {
                return Err(CalibError::Run(format!(
                    "captured {} of {} windows of the first block's input",
                    c.windows.len(),
                    options.samples
                )));
            }
            if let Some(e) = c.error {
                return Err(CalibError::Run(format!(
                    "capturing the dense block outputs: {e}"
                )));
            }
            let dense = (!c.outputs.is_empty()).then_some(c.dense_outputs);
            blockwise_stream = Some((c.windows, c.side_values, dense));
        }
        calib_tokens = options.samples * options.seq;
        phase_seconds.push((
            "calibrate",
            t0.elapsed().as_secs_f64() - sensitivity_seconds,
        ));
        if new_sensitivity {
            phase_seconds.push(("sensitivity", sensitivity_seconds));
        }
    }
    let allocation = chooses_tiles.then(|| {
        if !options.allocation.needs_sensitivity() || sensitivity.is_some() {
            options.allocation
        } else {
            Allocation::Relative
        }
    });

    let t0 = std::time::Instant::now();
    let inputs: Vec<_> = targets
        .iter()
        .map(|t| graph.node(t.node_id).inputs[0].expect("MatMul has an input"))
        .collect();
    let mask_targets: Vec<MaskTarget<'_>> = targets
        .iter()
        .zip(&inputs)
        .map(|(t, x)| {
            Ok(MaskTarget {
                name: t.weight.clone(),
                k: t.k,
                n: t.n,
                w: t.oriented_weight(graph)?,
                gram: calib.grams.get(x),
                fisher: sensitivity
                    .as_ref()
                    .and_then(|s| s.by_weight.get(&t.weight))
                    .map(Vec::as_slice),
                block: block_by_weight.get(&t.weight).copied(),
            })
        })
        .collect::<Result<_, patch_runtime::RuntimeError>>()
        .map_err(|e| CalibError::Run(e.to_string()))?;
    let mask_options = MaskOptions {
        method,
        sparsity,
        tile,
        seed: options.seed,
        // Block-wise learning takes only the tile maps of the global allocation and makes its
        // own weight update.
        update_weights: options.update_weights && blockwise_stream.is_none(),
        patch: options.patch.clone(),
        allocation: allocation.unwrap_or(Allocation::Relative),
    };
    let mut result: Vec<LayerMask> = masks::compute_masks(&mask_targets, &mask_options, progress)?;
    phase_seconds.push(("masks", t0.elapsed().as_secs_f64()));

    let mut block_outcomes = Vec::new();
    if let (Some((fused, fused_targets, blocks)), Some((windows, side, dense_outputs)), Some(bw)) =
        (&blockwise_plan, blockwise_stream, &options.blockwise)
    {
        let t0 = std::time::Instant::now();
        // The global allocation's tile maps, in the fused graph's target order.
        let by_weight: HashMap<&str, usize> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.weight.as_str(), i))
            .collect();
        let mut order = Vec::with_capacity(fused_targets.len());
        for t in fused_targets {
            order.push(*by_weight.get(t.weight.as_str()).ok_or_else(|| {
                CalibError::Run(format!("`{}` is prunable only after fusion", t.weight))
            })?);
        }
        let weights: Vec<Vec<f32>> = order.iter().map(|&i| mask_targets[i].w.clone()).collect();
        let maps: Vec<patch_kernels::TileMap> =
            order.iter().map(|&i| result[i].map.clone()).collect();
        let total = blocks.len();
        let (learned, outcomes) = blockwise::learn(
            BlockwiseInput {
                graph: fused,
                registry: &registry,
                blocks,
                targets: fused_targets,
                weights: &weights,
                maps: &maps,
                tile,
                windows,
                side: &side,
                dense_outputs,
                update_weights: options.update_weights,
            },
            bw,
            &|done, _, message| progress(&format!("learn blocks ({message})"), done, total),
        )?;
        for (l, &i) in learned.into_iter().zip(&order) {
            let m = &mut result[i];
            m.pruned = l.keep.iter().filter(|k| !**k).count();
            m.keep = l.keep;
            m.error = mask_targets[i].gram.map(|g| {
                masks::reconstruction_error(&mask_targets[i].w, &l.weights, g, targets[i].n)
            });
            m.weights = options.update_weights.then_some(l.weights);
        }
        block_outcomes = outcomes;
        phase_seconds.push(("blockwise", t0.elapsed().as_secs_f64()));
    }

    let total: usize = targets.iter().map(|t| t.k * t.n).sum();
    let pruned: usize = result.iter().map(|m| m.pruned).sum();
    let mut layers = Vec::new();
    let mut masks_by_weight = HashMap::new();
    let mut tile_maps = Vec::new();
    let mut tile_sizes = Vec::new();
    let mut per_block: std::collections::BTreeMap<u64, (usize, usize)> = Default::default();
    for (t, m) in targets.iter().zip(result) {
        if let Some(&b) = block_by_weight.get(&t.weight) {
            let e = per_block.entry(b).or_default();
            e.0 += m.pruned;
            e.1 += t.k * t.n;
        }
        tile_sizes.push((m.pruned, t.k * t.n));
        let sparse = m
            .map
            .kinds()
            .iter()
            .filter(|k| **k == TileKind::Sparse24)
            .count();
        layers.push(LayerReport {
            node: t.node.clone(),
            weight: t.weight.clone(),
            k: t.k,
            n: t.n,
            sparsity: m.pruned as f64 / (t.k * t.n) as f64,
            dense_tiles: m.map.kinds().len() - sparse,
            sparse_tiles: sparse,
            reconstruction_error: m.error,
            joint_prior_error: m.joint.map(|j| j.0),
            joint_learned_error: m.joint.map(|j| j.1),
        });
        tile_maps.push((t.node.clone(), m.map.clone()));
        masks_by_weight.insert(
            t.weight.clone(),
            WeightMask {
                map: m.map,
                keep: m.keep,
                weights: m.weights,
            },
        );
    }
    Ok(Calibrated {
        masks: masks_by_weight,
        layers,
        tile_maps,
        achieved: pruned as f64 / total as f64,
        phase_seconds,
        calib_tokens,
        blocks: block_outcomes,
        blockwise_fallback,
        cache_rejected,
        allocation,
        allocation_fallback,
        sensitivity: sensitivity.map(|s| (s.windows, s.loss)),
        block_sparsity: per_block
            .into_iter()
            .map(|(b, (p, all))| (b, p as f64 / all.max(1) as f64))
            .collect(),
        tile_sizes,
    })
}

/// The per-layer table printed after a sparse compile.
pub fn layer_table(layers: &[LayerReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<48} {:>6} {:>6} {:>9} {:>6} {:>6} {:>11}",
        "layer (node)", "K", "N", "sparsity", "dense", "2:4", "rel. error"
    );
    for l in layers {
        let err = l
            .reconstruction_error
            .map_or("-".to_string(), |e| format!("{e:.3e}"));
        // The last 48 characters of long names (the distinguishing part).
        let chars = l.node.chars().count();
        let name: String = l.node.chars().skip(chars.saturating_sub(48)).collect();
        let _ = writeln!(
            s,
            "{:<48} {:>6} {:>6} {:>8.1}% {:>6} {:>6} {:>11}",
            name,
            l.k,
            l.n,
            100.0 * l.sparsity,
            l.dense_tiles,
            l.sparse_tiles,
            err
        );
    }
    s
}

/// `text` escaped for SVG.
fn svg_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The opening of an SVG picture: white background, a title and a one-line legend.
fn svg_header(width: f64, height: f64, font: u32, title: &str, legend: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="{font}">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="4" y="14" font-size="11">{}</text>"##,
        svg_escape(title)
    );
    let _ = writeln!(s, r##"<text x="4" y="28">{}</text>"##, svg_escape(legend));
    s
}

/// An SVG of block-wise learning: per block, the held-out objective of the prior and of the
/// result (bars, log scale), and each block's training curve relative to its first step.
pub fn blockwise_svg(blocks: &[BlockOutcome], title: &str) -> String {
    let (w, h, pad) = (760.0f64, 260.0f64, 40.0f64);
    let total_h = 2.0 * h + 3.0 * pad;
    let mut s = svg_header(
        w,
        total_h,
        10,
        title,
        "held-out block error mean((y-T)^2)/mean(T^2), log scale: grey prior (OBS), blue learned",
    );
    let errors: Vec<f64> = blocks
        .iter()
        .flat_map(|b| [b.prior_error, b.error])
        .filter(|e| *e > 0.0 && e.is_finite())
        .collect();
    let lo = errors
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .log10()
        .floor();
    let hi = errors.iter().copied().fold(0.0, f64::max).log10().ceil();
    let span = (hi - lo).max(1.0);
    let y_of = |e: f64| pad + h - (e.max(1e-300).log10() - lo) / span * h;
    let bw = (w - 2.0 * pad) / blocks.len().max(1) as f64;
    for (i, b) in blocks.iter().enumerate() {
        let x = pad + i as f64 * bw;
        for (j, (e, fill)) in [(b.prior_error, "#aaaaaa"), (b.error, "#1f4e79")]
            .iter()
            .enumerate()
        {
            let y = y_of(*e);
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{fill}"/>"##,
                x + j as f64 * bw * 0.4,
                bw * 0.4,
                (pad + h - y).max(0.0)
            );
        }
        if i % 5 == 0 {
            let _ = writeln!(
                s,
                r##"<text x="{x:.1}" y="{}">{}</text>"##,
                pad + h + 12.0,
                b.number
            );
        }
    }
    let _ = writeln!(s, r##"<text x="4" y="{}">1e{lo}</text>"##, pad + h);
    let _ = writeln!(s, r##"<text x="4" y="{}">1e{hi}</text>"##, pad + 8.0);
    // Training curves, each relative to its first step.
    let top = 2.0 * pad + h;
    let _ = writeln!(
        s,
        r##"<text x="4" y="{}">training loss per step / first step (one line per block, darker = later block)</text>"##,
        top + 6.0
    );
    let ratios: Vec<Vec<f64>> = blocks
        .iter()
        .map(|b| {
            let first = b.curve.first().copied().unwrap_or(1.0).max(1e-300);
            b.curve.iter().map(|c| c / first).collect()
        })
        .collect();
    let ymax = ratios
        .iter()
        .flatten()
        .copied()
        .fold(1.0, f64::max)
        .min(4.0);
    for (i, r) in ratios.iter().enumerate() {
        if r.len() < 2 {
            continue;
        }
        let shade = 200 - (160 * i / blocks.len().max(1)) as i64;
        let points: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(k, v)| {
                let x = pad + k as f64 / (r.len() - 1) as f64 * (w - 2.0 * pad);
                let y = top + pad * 0.5 + h - v.min(ymax) / ymax * h;
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="rgb({shade},{shade},255)" stroke-width="1" points="{}"/>"##,
            points.join(" ")
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A layer name with its tile map.
type NamedMap = (String, patch_kernels::TileMap);

/// The transformer block a node belongs to: the first number in its name (`layers.12` → 12).
fn block_of(name: &str) -> Option<u64> {
    let start = name.find(|c: char| c.is_ascii_digit())?;
    let digits: String = name[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The short name of a weight in its block (`q_proj` from `/model/layers.0/self_attn/q_proj/MatMul`).
fn short_name(name: &str) -> &str {
    let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty()).collect();
    match parts.as_slice() {
        [.., last] if last.starts_with("MatMul") || last.starts_with("Gemm") => parts
            .get(parts.len().wrapping_sub(2))
            .copied()
            .unwrap_or(name),
        [.., last] => last,
        [] => name,
    }
}

/// An SVG of every layer's tile map: one row per transformer block (consecutive layers whose
/// names carry the same first number), its weights side by side, each drawn with K down and
/// N across; dark cells stayed dense, light cells are 2:4. `sizes[i]` (pruned, all weights of
/// `maps[i]`) gives each row's sparsity, printed under its label.
pub fn tile_map_svg(maps: &[NamedMap], sizes: &[(usize, usize)], title: &str) -> String {
    const DENSE: &str = "#1f4e79";
    const SPARSE: &str = "#bdd7ee";
    // Monospace advance at font size 9 (0.6 em), so that labels never overlap.
    let text_w = |t: &str, size: f64| t.chars().count() as f64 * size * 0.6;
    let cell = 6.0;
    let gap = 12.0;
    let label_w = text_w("100.0% sparse", 9.0) + 10.0;
    // (block, its maps with their (pruned, all weights), the block's (pruned, all)).
    type Row<'a> = (
        Option<u64>,
        Vec<(&'a NamedMap, (usize, usize))>,
        (usize, usize),
    );
    let mut rows: Vec<Row<'_>> = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        let b = block_of(&m.0);
        let size = sizes.get(i).copied().unwrap_or((0, 0));
        match rows.last_mut() {
            Some((rb, v, total)) if *rb == b && b.is_some() => {
                v.push((m, size));
                total.0 += size.0;
                total.1 += size.1;
            }
            _ => rows.push((b, vec![(m, size)], size)),
        }
    }
    // Column `c` of every row is as wide as the widest of its maps and labels.
    let columns = rows.iter().map(|(_, v, _)| v.len()).max().unwrap_or(0);
    let col_w: Vec<f64> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|(_, v, _)| v.get(c))
                .map(|((name, m), _)| {
                    (m.n_tiles() as f64 * cell).max(text_w(short_name(name), 9.0))
                })
                .fold(text_w("100%", 8.0), f64::max)
                + gap
        })
        .collect();
    let col_x: Vec<f64> = col_w
        .iter()
        .scan(label_w, |x, w| {
            let at = *x;
            *x += w;
            Some(at)
        })
        .collect();
    // A map's rows of tiles, then a line for its sparsity.
    let row_h = |v: &[(&NamedMap, (usize, usize))]| -> f64 {
        v.iter()
            .map(|((_, m), _)| m.k_tiles() as f64 * cell)
            .fold(text_w("x", 9.0) * 2.5, f64::max)
            + 22.0
    };
    let (title_lines, subtitle) = match title.split_once(": ") {
        Some((model, rest)) => (vec![model.to_string()], rest.to_string()),
        None => (Vec::new(), title.to_string()),
    };
    let legend = "dense tile    2:4 tile    one row per block, K down, N across";
    let grid_w = label_w + col_w.iter().sum::<f64>();
    let width = [
        grid_w,
        title_lines
            .iter()
            .map(|t| text_w(t, 11.0))
            .fold(0.0, f64::max),
        text_w(&subtitle, 11.0),
        text_w(legend, 9.0) + 30.0,
    ]
    .into_iter()
    .fold(0.0, f64::max)
        + 12.0;
    let header = 70.0;
    let height = header + rows.iter().map(|(_, v, _)| row_h(v)).sum::<f64>() + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="monospace" font-size="9">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let mut y = 14.0;
    for line in title_lines.iter().chain(std::iter::once(&subtitle)) {
        let _ = writeln!(
            s,
            r##"<text x="6" y="{y}" font-size="11">{}</text>"##,
            svg_escape(line)
        );
        y += 14.0;
    }
    // The legend: a swatch of each kind before its name.
    let _ = writeln!(
        s,
        r##"<rect x="6" y="{}" width="8" height="8" fill="{DENSE}"/><text x="18" y="{}">dense tile</text>"##,
        y - 7.0,
        y
    );
    let sparse_x = 18.0 + text_w("dense tile    ", 9.0);
    let _ = writeln!(
        s,
        r##"<rect x="{sparse_x:.1}" y="{}" width="8" height="8" fill="{SPARSE}"/><text x="{:.1}" y="{}">2:4 tile</text>"##,
        y - 7.0,
        sparse_x + 12.0,
        y
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{y}">one row per block, K down, N across</text>"##,
        sparse_x + 12.0 + text_w("2:4 tile    ", 9.0)
    );
    if let Some((_, first, _)) = rows.first() {
        for (c, ((name, _), _)) in first.iter().enumerate() {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{}">{}</text>"##,
                col_x[c],
                header - 6.0,
                svg_escape(short_name(name))
            );
        }
    }
    let mut y = header;
    for (b, v, (pruned, all)) in &rows {
        let label = match b {
            Some(b) => format!("block {b}"),
            None => svg_escape(short_name(&v[0].0 .0)),
        };
        let _ = writeln!(s, r##"<text x="6" y="{}">{label}</text>"##, y + 8.0);
        if *all > 0 {
            let _ = writeln!(
                s,
                r##"<text x="6" y="{}">{:.1}% sparse</text>"##,
                y + 19.0,
                100.0 * *pruned as f64 / *all as f64
            );
        }
        for (c, ((_, m), (mp, ma))) in v.iter().enumerate() {
            let x = col_x[c];
            for i in 0..m.k_tiles() {
                for j in 0..m.n_tiles() {
                    let fill = if m.get(i, j) == TileKind::Dense {
                        DENSE
                    } else {
                        SPARSE
                    };
                    let _ = writeln!(
                        s,
                        r##"<rect x="{:.1}" y="{}" width="{}" height="{}" fill="{fill}"/>"##,
                        x + j as f64 * cell,
                        y + i as f64 * cell,
                        cell - 1.0,
                        cell - 1.0
                    );
                }
            }
            if *ma > 0 {
                let _ = writeln!(
                    s,
                    r##"<text x="{x:.1}" y="{}" font-size="8" fill="#555">{:.0}%</text>"##,
                    y + m.k_tiles() as f64 * cell + 9.0,
                    100.0 * *mp as f64 / *ma as f64
                );
            }
        }
        y += row_h(v);
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_groups_layers_by_block() {
        let m = patch_kernels::TileMap::uniform(2, 3, TileKind::Dense);
        let maps = vec![
            (
                "/model/layers.0/self_attn/q_proj/MatMul".to_string(),
                m.clone(),
            ),
            (
                "/model/layers.0/mlp/down_proj/MatMul".to_string(),
                m.clone(),
            ),
            ("/model/layers.1/self_attn/q_proj/MatMul".to_string(), m),
        ];
        let title = "/some/long/path/to/a/model/directory/model_with_past.onnx: patch at sparsity 0.4 (achieved 0.3980), 128x128 tiles";
        let svg = tile_map_svg(&maps, &[(10, 40), (30, 40), (0, 40)], title);
        assert!(svg.contains("block 0") && svg.contains("block 1") && svg.contains(">q_proj<"));
        assert!(svg.contains(">50.0% sparse<") && svg.contains(">0.0% sparse<"));
        // Every matrix's own sparsity under its map.
        assert!(svg.contains(">25%<") && svg.contains(">75%<") && svg.contains(">0%<"));
        // Background, two legend swatches, 3 maps of 2 x 3 tiles.
        assert_eq!(svg.matches("<rect").count(), 1 + 2 + 3 * 6);
        // The title is split after the model and the picture is wide enough for each line at
        // 6.6 px per character (monospace at 11 px), so nothing is clipped.
        let width: f64 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|w| w.split('"').next())
            .and_then(|w| w.parse().ok())
            .unwrap();
        assert!(svg.contains(">patch at sparsity 0.4 (achieved 0.3980), 128x128 tiles<"));
        assert!(
            width >= 6.6 * "/some/long/path/to/a/model/directory/model_with_past.onnx".len() as f64
        );
        // Column labels do not overlap: each starts after the previous one ends.
        let label_x = |label: &str| -> f64 {
            let at = svg.find(&format!(">{label}<")).unwrap();
            let tag = &svg[svg[..at].rfind("<text").unwrap()..at];
            tag.split("x=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(label_x("down_proj") >= label_x("q_proj") + 5.4 * "q_proj".len() as f64);
        assert_eq!(block_of("/model/layers.12/mlp"), Some(12));
    }
}
