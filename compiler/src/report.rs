//! The compile report: what one `patchc compile` did, written into the bundle as JSON (see
//! `patchrt inspect`) and read back with [`Report::from_json`]. Field names are the JSON keys;
//! new fields are added with defaults so that bundles written earlier still read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The report of a compilation that wrote a bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The ONNX model compiled.
    pub source: String,
    /// The global sparsity asked for.
    pub sparsity: f64,
    /// Element type of the packed weights (`f32`, `bf16`, `f16`).
    pub weights: String,
    /// Tile shape `[k, n]`.
    pub tile: [usize; 2],
    pub nodes: NodeCounts,
    /// Every pass run, in order.
    pub passes: Vec<PassReport>,
    /// `None` with `--no-fuse`.
    pub fusion: Option<FusionReport>,
    pub memory: MemoryReport,
    /// Elements of the imported model's constants.
    pub parameters: usize,
    pub weight_matmuls: usize,
    /// Weight MatMuls rewritten to `patch.HybridMatMul`, and the weights they hold.
    pub hybrid_matmuls: usize,
    pub hybrid_parameters: usize,
    /// Weight MatMuls left as they were (shapes the tile does not fit).
    pub plain_matmuls: Vec<MatMulShape>,
    /// Rewritten but kept dense (the LM head, embeddings tied to it).
    pub dense_only_matmuls: Vec<MatMulShape>,
    /// The tokenizer stored, if any.
    pub tokenizer: Option<String>,
    /// `None` at sparsity 0.
    pub sparse: Option<SparseReport>,
    /// Wall seconds per phase (import, cleanup, calibration phases, pack, fuse, write, ...).
    pub phase_seconds: BTreeMap<String, f64>,
}

impl Report {
    /// The report stored in a bundle (`BundleContents::compile_report_json`).
    pub fn from_json(json: &str) -> Result<Report, serde_json::Error> {
        serde_json::from_str(json)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report serializes")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeCounts {
    pub imported: usize,
    pub after_cleanup: usize,
    pub after_pack: usize,
    #[serde(rename = "final")]
    pub final_: usize,
}

/// One run of one pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PassReport {
    pub pipeline: String,
    pub pass: String,
    /// 1-based round of its pipeline.
    pub round: usize,
    pub changed: bool,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub seconds: f64,
}

impl From<&patch_passes::PassRun> for PassReport {
    fn from(r: &patch_passes::PassRun) -> PassReport {
        PassReport {
            pipeline: r.pipeline.to_string(),
            pass: r.pass.to_string(),
            round: r.round,
            changed: r.changed,
            nodes_before: r.nodes_before,
            nodes_after: r.nodes_after,
            seconds: r.seconds,
        }
    }
}

/// A count per op type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpCount {
    pub op: String,
    pub count: usize,
}

/// A count per reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub reason: String,
    pub count: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusionReport {
    /// Nodes replaced, by fused op type.
    pub fused: Vec<OpCount>,
    /// Matches not applied, by reason.
    pub skipped: Vec<ReasonCount>,
    pub runner: FusionRunner,
    /// Ops of the decode path that no rule fused (each runs on its own on every token).
    #[serde(default)]
    pub unfused_decode_ops: Vec<OpCount>,
}

/// How the e-graph runner ended, and its limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusionRunner {
    /// `Saturated` when every rule was applied everywhere it could be.
    pub stop_reason: String,
    pub iterations: usize,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub limits: FusionLimits,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FusionLimits {
    pub iterations: usize,
    pub nodes: usize,
    pub seconds: f64,
}

/// The activations' memory plan, as the runtime makes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    pub activations: usize,
    pub slots: usize,
    /// The arena's size in bytes, an expression of the symbolic dims.
    pub arena_bytes: String,
    /// Every activation in its own buffer, for comparison.
    pub unshared_bytes: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatMulShape {
    pub node: String,
    pub k: usize,
    pub n: usize,
}

/// What calibration and mask selection did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SparseReport {
    pub method: String,
    pub target_sparsity: f64,
    pub achieved_sparsity: f64,
    pub calibration_tokens: usize,
    pub calibration_samples: usize,
    pub calibration_seq: usize,
    pub seed: u64,
    pub update_weights: bool,
    pub patch_steps: usize,
    pub joint_steps: usize,
    /// The tile-map picture written beside the bundle.
    pub tile_map_svg: String,
    /// The block-wise learning picture, when block-wise learning ran.
    pub blockwise_svg: Option<String>,
    /// Per transformer block, when block-wise learning ran.
    pub blockwise: Vec<BlockReport>,
    /// Why block-wise learning did not run although it was asked for.
    pub blockwise_fallback: Option<String>,
    /// Why the calibration cache given could not be used (completes "the calibration cache
    /// `PATH` ..."); it was recomputed and written again.
    pub cache_rejected: Option<String>,
    /// The budget allocation used (`loss`, `relative`, `uniform-blocks`).
    pub allocation: Option<String>,
    /// Why the asked-for allocation was replaced by `relative`.
    pub allocation_fallback: Option<String>,
    pub sensitivity: Option<SensitivityReport>,
    /// Per transformer block: its weights' sparsity.
    pub block_sparsity: Vec<BlockSparsity>,
    /// Per weight matrix.
    pub layers: Vec<LayerReport>,
}

/// One transformer block's learning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockReport {
    pub block: u64,
    /// Relative held-out block error of the prior and of the result.
    pub prior_error: f64,
    pub error: f64,
    /// Whether the learned masks/weights replaced the prior.
    pub learned: bool,
    pub seconds: f64,
    pub phase_seconds: BlockPhases,
    /// Training loss per step.
    pub curve: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockPhases {
    pub statistics: f64,
    pub prior: f64,
    pub learn: f64,
    pub advance: f64,
}

/// The dense model's loss on the windows the sensitivities came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SensitivityReport {
    pub windows: usize,
    /// Mean cross-entropy, nats per token.
    pub dense_loss: f64,
    pub dense_perplexity: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockSparsity {
    pub block: u64,
    pub sparsity: f64,
}

/// One weight matrix's mask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    pub node: String,
    pub weight: String,
    pub k: usize,
    pub n: usize,
    pub sparsity: f64,
    pub dense_tiles: usize,
    pub sparse_tiles: usize,
    /// Relative output error on the calibration statistics, where they exist.
    pub reconstruction_error: Option<f64>,
    /// PATCH-Joint's layer error before and after learning the 2:4 patterns.
    pub joint_prior_error: Option<f64>,
    pub joint_learned_error: Option<f64>,
}
