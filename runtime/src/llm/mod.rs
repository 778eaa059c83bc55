//! Causal language models on top of a graph: the KV cache, the forward step, generation,
//! perplexity and benchmarking.
//!
//! A graph qualifies when its inputs carry the roles a generation loop can fill (token ids,
//! and optionally attention mask, position ids and past key/values per layer) and one output
//! is the logits `[batch, seq, vocab]`. With past inputs and present outputs (Optimum's
//! with-past layout) the cache is native: each step feeds only the new tokens. Without them
//! the model recomputes the whole prefix every step ([`LanguageModel::has_kv_cache`] says
//! which, so that callers can tell the user).

pub mod bench;
pub mod eval;
pub mod generate;
pub mod sampler;
pub mod text;

use std::collections::BTreeMap;

use crate::bundle::{BundleContents, Generation};
use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::interp::{Plan, PlanOptions};
use crate::ir::{Graph, InputRole, OutputRole};
use crate::tensor::Tensor;

pub use sampler::{Sampler, SamplingOptions};
pub use text::{ChatMessage, TextTokenizer};

/// Errors of running a language model, with what and where.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("the graph is not a causal LM this runtime can drive: {0}")]
    Layout(String),
    #[error("the prompt has {tokens} tokens and the model's context is {context}; shorten it")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("{0} tokens would exceed the model's context of {1}")]
    ContextFull(usize, usize),
    #[error("the bundle has no tokenizer; recompile it with `patchc compile --tokenizer tokenizer.json`")]
    NoTokenizer,
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("the bundle has no chat template (none was found beside the model at compile time)")]
    NoChatTemplate,
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("backend: {0}")]
    Backend(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The CPU kernels (SIMD, multi-threaded).
    #[default]
    Cpu,
    /// GPU `device` through the CUDA backend (cargo feature `cuda`).
    Cuda { device: usize },
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "cuda" => Ok(Backend::Cuda { device: 0 }),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(device)) => Ok(Backend::Cuda { device }),
                _ => Err(format!(
                    "unknown backend `{s}` (expected cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

/// Which graph inputs and outputs mean what (indices into the graph's input/output lists).
#[derive(Clone, Debug)]
struct IoLayout {
    ids: usize,
    mask: Option<usize>,
    positions: Option<usize>,
    /// Per layer: (past key input, past value input).
    past: Vec<(usize, usize)>,
    logits: usize,
    /// Per layer: (present key output, present value output).
    present: Vec<(usize, usize)>,
    /// Shape of one empty past tensor: `[1, heads, 0, head_dim]` or `[1, 0, heads, head_dim]`.
    past_shape: Vec<usize>,
    /// The positions' axis of past and present tensors (2 or 1).
    past_axis: usize,
}

/// Attention layers of a graph without a KV cache: its fused `patch.Attention` ops, or, when
/// it has none (unfused), its softmaxes over 4-D scores.
fn attention_layers(graph: &Graph) -> usize {
    let count =
        |pred: &dyn Fn(&crate::ir::Node) -> bool| graph.nodes().filter(|(_, n)| pred(n)).count();
    match count(&|n| n.domain == "patch" && n.op_type == "Attention") {
        0 => count(&|n| {
            n.domain.is_empty()
                && n.op_type == "Softmax"
                && graph.value(n.outputs[0]).ty.rank() == 4
        }),
        fused => fused,
    }
}

fn layout_of(graph: &Graph) -> Result<IoLayout, LlmError> {
    let bad = |m: String| LlmError::Layout(m);
    let mut ids = None;
    let mut mask = None;
    let mut positions = None;
    let mut past_k = BTreeMap::new();
    let mut past_v = BTreeMap::new();
    for (i, (id, role)) in graph.inputs().iter().enumerate() {
        match role {
            InputRole::TokenIds => ids = Some(i),
            InputRole::AttentionMask => mask = Some(i),
            InputRole::PositionIds => positions = Some(i),
            InputRole::PastKey(l) => {
                past_k.insert(*l, i);
            }
            InputRole::PastValue(l) => {
                past_v.insert(*l, i);
            }
            InputRole::Other => {
                return Err(bad(format!(
                    "input `{}` has no role a generation loop can fill (expected input_ids, \
                     attention_mask, position_ids, past_key_values.N.key/value)",
                    graph.value(*id).name
                )))
            }
        }
    }
    let ids = ids.ok_or_else(|| bad("no token-ids input (`input_ids`)".into()))?;
    let mut logits = None;
    let mut pres_k = BTreeMap::new();
    let mut pres_v = BTreeMap::new();
    for (i, (_, role)) in graph.outputs().iter().enumerate() {
        match role {
            OutputRole::Logits => logits = Some(i),
            OutputRole::PresentKey(l) => {
                pres_k.insert(*l, i);
            }
            OutputRole::PresentValue(l) => {
                pres_v.insert(*l, i);
            }
            OutputRole::Other => {}
        }
    }
    let logits = logits.ok_or_else(|| bad("no logits output (`logits`)".into()))?;
    let layers = past_k.len();
    let complete =
        |m: &BTreeMap<usize, usize>| m.len() == layers && m.keys().copied().eq(0..layers);
    if !(complete(&past_k) && complete(&past_v) && complete(&pres_k) && complete(&pres_v)) {
        return Err(bad(format!(
            "past/present inputs and outputs do not pair up: {} past keys, {} past values, \
             {} present keys, {} present values (layers must be numbered 0..L)",
            past_k.len(),
            past_v.len(),
            pres_k.len(),
            pres_v.len()
        )));
    }
    let past: Vec<_> = (0..layers).map(|l| (past_k[&l], past_v[&l])).collect();
    let present: Vec<_> = (0..layers).map(|l| (pres_k[&l], pres_v[&l])).collect();
    let (mut past_shape, mut past_axis) = (Vec::new(), 0);
    if let Some(&(k, _)) = past.first() {
        // `[batch, heads, past, head_dim]`: every dim but one symbolic sequence axis (and the
        // batch) must be a constant.
        let v = graph.value(graph.inputs()[k].0);
        if v.ty.dtype != DType::F32 {
            return Err(bad(format!(
                "past input `{}` is {}, expected f32",
                v.name, v.ty.dtype
            )));
        }
        let shape = &v.ty.shape;
        if shape.len() != 4 {
            return Err(bad(format!(
                "past input `{}` has rank {}, expected 4",
                v.name,
                shape.len()
            )));
        }
        // `[batch, heads, past, head_dim]` (as exported) or `[batch, past, heads, head_dim]`
        // (after the `kv-layout` pass): besides the batch, exactly one symbolic axis, the
        // positions.
        let symbolic: Vec<usize> = (1..4).filter(|&a| shape[a].as_const().is_none()).collect();
        let [axis] = symbolic[..] else {
            return Err(bad(format!(
                "past input `{}` {} needs exactly one symbolic axis besides the batch (the \
                 positions)",
                v.name, v.ty
            )));
        };
        past_axis = axis;
        past_shape = shape
            .iter()
            .enumerate()
            .map(|(a, d)| match a {
                0 => 1,
                a if a == axis => 0,
                _ => d.as_const().expect("checked above") as usize,
            })
            .collect();
    }
    Ok(IoLayout {
        ids,
        mask,
        positions,
        past,
        logits,
        present,
        past_shape,
        past_axis,
    })
}

/// The state of one sequence: the tokens seen so far and, for with-past graphs, the cached
/// keys and values of every layer.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    tokens: Vec<u32>,
    layers: Vec<(Tensor, Tensor)>,
    /// The same on the GPU when the model runs on the cuda backend (`layers` is then empty).
    #[cfg(feature = "cuda")]
    device_layers: Vec<(crate::cuda::Value, crate::cuda::Value)>,
}

impl KvCache {
    /// Number of tokens already processed.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Bytes every layer's keys and values can still grow by in place (the smallest over the
    /// layers; 0 when the cache is empty, head-major, or on the GPU).
    pub fn room_in_place(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|(k, v)| [k.append_room(), v.append_room()])
            .min()
            .unwrap_or(0)
    }
}

/// Logits of the last `rows` positions of a forward step, row-major `[rows, vocab]`: a view
/// of the graph's logits output (no copy; on the CPU its buffer returns to the memory plan when
/// this is dropped).
#[derive(Clone, Debug)]
pub struct Logits {
    pub rows: usize,
    pub vocab: usize,
    /// `[1, rows, vocab]` f32 (checked when made).
    values: Tensor,
}

impl Logits {
    /// Every kept row, row-major.
    pub fn data(&self) -> &[f32] {
        self.values
            .as_slice::<f32>()
            .expect("checked f32 and aligned when made")
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data()[r * self.vocab..(r + 1) * self.vocab]
    }
    pub fn last(&self) -> &[f32] {
        self.row(self.rows - 1)
    }
}

/// A compiled causal LM ready to run: the graph's execution plan, its I/O layout, generation
/// metadata and tokenizer.
pub struct LanguageModel {
    plan: Plan,
    backend: Backend,
    #[cfg(feature = "cuda")]
    cuda: Option<crate::cuda::CudaPlan>,
    layout: IoLayout,
    input_dtypes: Vec<DType>,
    pub generation: Generation,
    pub tokenizer: Option<TextTokenizer>,
    vocab: usize,
    /// See [`LanguageModel::layers`].
    layers: usize,
}

impl std::fmt::Debug for LanguageModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanguageModel")
            .field("layers", &self.layout.past.len())
            .field("vocab", &self.vocab)
            .field("kv_cache", &self.has_kv_cache())
            .finish()
    }
}

impl LanguageModel {
    /// Prepares a loaded bundle for generation.
    pub fn new(contents: BundleContents) -> Result<LanguageModel, LlmError> {
        let layout = layout_of(&contents.graph)?;
        let graph = &contents.graph;
        let logits_ty = &graph.value(graph.outputs()[layout.logits].0).ty;
        if logits_ty.dtype != DType::F32 {
            return Err(LlmError::Layout(format!(
                "logits are {}, expected f32",
                logits_ty.dtype
            )));
        }
        let vocab = logits_ty
            .shape
            .last()
            .and_then(|d| d.as_const())
            .ok_or_else(|| {
                LlmError::Layout(format!(
                    "the logits' last dim must be the vocabulary size, got {}",
                    logits_ty
                ))
            })? as usize;
        let input_dtypes: Vec<DType> = graph
            .inputs()
            .iter()
            .map(|(id, _)| graph.value(*id).ty.dtype)
            .collect();
        for i in [Some(layout.ids), layout.mask, layout.positions]
            .into_iter()
            .flatten()
        {
            if !matches!(input_dtypes[i], DType::I64 | DType::I32) {
                let v = graph.value(graph.inputs()[i].0);
                return Err(LlmError::Layout(format!(
                    "input `{}` is {}, expected int64 or int32",
                    v.name, v.ty.dtype
                )));
            }
        }
        let tokenizer = contents
            .tokenizer_json
            .as_ref()
            .map(|b| TextTokenizer::from_bytes(b))
            .transpose()?;
        let layers = if layout.past.is_empty() {
            attention_layers(graph)
        } else {
            layout.past.len()
        };
        Ok(LanguageModel {
            plan: Plan::new(&contents.graph)?,
            backend: Backend::Cpu,
            #[cfg(feature = "cuda")]
            cuda: None,
            layout,
            input_dtypes,
            generation: contents.generation,
            tokenizer,
            vocab,
            layers,
        })
    }

    /// Prepares a loaded bundle for generation on `backend`.
    pub fn with_backend(
        contents: BundleContents,
        backend: Backend,
    ) -> Result<LanguageModel, LlmError> {
        #[allow(unused_mut)]
        let mut model = LanguageModel::new(contents)?;
        match backend {
            Backend::Cpu => {}
            #[cfg(feature = "cuda")]
            Backend::Cuda { device } => {
                let backend_err = |e: crate::cuda::CudaError| LlmError::Backend(e.to_string());
                let dev = crate::cuda::CudaDevice::open(device).map_err(backend_err)?;
                model.cuda =
                    Some(crate::cuda::CudaPlan::new(dev, model.plan.graph()).map_err(backend_err)?);
                model.backend = backend;
            }
            #[cfg(not(feature = "cuda"))]
            Backend::Cuda { .. } => {
                return Err(LlmError::Backend(
                    "this build has no cuda backend (cargo feature `cuda` is off)".into(),
                ))
            }
        }
        Ok(model)
    }

    /// The backend forward steps run on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The backend in words: `cpu`, or the GPU's name and architecture.
    pub fn backend_name(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(plan) = &self.cuda {
            let dev = plan.device();
            let (major, minor) = dev.compute_capability();
            return format!("cuda ({}, sm_{major}{minor})", dev.name());
        }
        "cpu".to_string()
    }

    /// Turns per-op-type timing of every forward step on or off.
    pub fn set_profiling(&mut self, on: bool) {
        self.plan.set_profiling(on);
    }

    /// Time per op type since profiling was turned on, most expensive first.
    pub fn profile(&self) -> Vec<(String, crate::interp::OpTime)> {
        self.plan.profile()
    }

    /// Calls and seconds of whole forward passes through the graph since profiling was turned
    /// on (the ops and the interpreter between them).
    pub fn profile_runs(&self) -> crate::interp::OpTime {
        self.plan.profile_runs()
    }

    /// The activations' memory plan of the CPU graph.
    pub fn memory_plan(&self) -> &crate::memplan::MemoryPlan {
        self.plan.memory_plan()
    }

    /// Turns the memory plan's buffers on (the default) or off (every op allocates its
    /// outputs), on the CPU.
    pub fn set_memory_plan(&mut self, on: bool) {
        self.plan.set_memory_plan(on);
    }

    /// Sets what the CPU plan optimizes ([`PlanOptions`]; all on by default).
    pub fn set_plan_options(&mut self, options: PlanOptions) {
        self.plan.set_options(options);
    }

    /// How the memory plan's slots have served the forward passes so far.
    pub fn slot_stats(&self) -> crate::interp::SlotStats {
        self.plan.slot_stats()
    }

    /// Bytes of weights one decoded token reads: every constant operand of the weight products
    /// (`patch.HybridMatMul` values, metadata and bias; `MatMul`/`Gemm` constants), each read
    /// once per token. Row gathers (the embedding) read one row and are left out.
    pub fn weight_bytes_per_token(&self) -> usize {
        let graph = self.plan.graph();
        let mut seen = std::collections::HashSet::new();
        graph
            .nodes()
            .filter(|(_, n)| {
                matches!(
                    (n.domain.as_str(), n.op_type.as_str()),
                    ("patch", "HybridMatMul") | ("", "MatMul") | ("", "Gemm")
                )
            })
            .flat_map(|(_, n)| n.inputs.iter().flatten().copied())
            .filter(|v| seen.insert(*v))
            .filter_map(|v| graph.const_value(v))
            .map(|t| t.bytes().len())
            .sum()
    }

    /// True when the graph takes past keys/values (each step feeds only new tokens).
    pub fn has_kv_cache(&self) -> bool {
        !self.layout.past.is_empty()
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The number of attention layers: the KV cache's when there is one, else the attention
    /// ops of the graph (see [`attention_layers`]).
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// The longest sequence the model supports, when the bundle says.
    pub fn max_context(&self) -> Option<usize> {
        self.generation.max_context.map(|c| c as usize)
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer, LlmError> {
        self.tokenizer.as_ref().ok_or(LlmError::NoTokenizer)
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::default()
    }

    fn int_tensor(
        &self,
        input: usize,
        shape: Vec<usize>,
        values: Vec<i64>,
    ) -> Result<Tensor, LlmError> {
        Ok(match self.input_dtypes[input] {
            DType::I32 => Tensor::from_vec(shape, values.into_iter().map(|v| v as i32).collect())?,
            _ => Tensor::from_vec(shape, values)?,
        })
    }

    /// Feeds `tokens` after what `cache` holds and returns the logits of the last `keep`
    /// of them (`keep` ≤ `tokens.len()`; 1 for generation, all for perplexity).
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        keep: usize,
    ) -> Result<Logits, LlmError> {
        self.forward_observed(cache, tokens, keep, &mut |_, _| {})
    }

    /// [`forward`](Self::forward), with `observe(node, inputs)` called before every node
    /// (see [`Plan::run_observed`]).
    pub fn forward_observed(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        keep: usize,
        observe: &mut dyn FnMut(&crate::ir::Node, &[Option<&Tensor>]),
    ) -> Result<Logits, LlmError> {
        if tokens.is_empty() || keep == 0 || keep > tokens.len() {
            return Err(LlmError::Invalid(format!(
                "forward needs at least one token and 1 ≤ keep ≤ tokens ({keep} of {})",
                tokens.len()
            )));
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(LlmError::TokenOutOfRange {
                id,
                vocab: self.vocab,
            });
        }
        let total = cache.len() + tokens.len();
        if let Some(ctx) = self.max_context() {
            if total > ctx {
                return Err(LlmError::ContextFull(total, ctx));
            }
        }
        let native = self.has_kv_cache();
        // The tokens this call runs the graph on, and the position of the first.
        let (run, start): (Vec<u32>, usize) = if native {
            (tokens.to_vec(), cache.len())
        } else {
            let mut all = cache.tokens.clone();
            all.extend_from_slice(tokens);
            (all, 0)
        };
        let n = run.len();
        let l = &self.layout;
        let mut inputs: Vec<Option<Tensor>> = vec![None; self.input_dtypes.len()];
        inputs[l.ids] =
            Some(self.int_tensor(l.ids, vec![1, n], run.iter().map(|&t| t as i64).collect())?);
        if let Some(m) = l.mask {
            inputs[m] = Some(self.int_tensor(m, vec![1, start + n], vec![1; start + n])?);
        }
        if let Some(p) = l.positions {
            inputs[p] = Some(self.int_tensor(
                p,
                vec![1, n],
                (start..start + n).map(|v| v as i64).collect(),
            )?);
        }
        if native {
            for (layer, &(k, v)) in l.past.iter().enumerate() {
                let (pk, pv) = match cache.layers.get(layer) {
                    Some((pk, pv)) => (pk.clone(), pv.clone()),
                    None => (self.empty_past(total)?, self.empty_past(total)?),
                };
                inputs[k] = Some(pk);
                inputs[v] = Some(pv);
            }
        }
        let inputs: Vec<Tensor> = inputs
            .into_iter()
            .map(|t| t.expect("every input has a role"))
            .collect();
        #[cfg(feature = "cuda")]
        if let Some(plan) = &self.cuda {
            return self.forward_cuda(plan, cache, inputs, tokens, keep, total);
        }
        // Only the kept positions' logits are computed (the LM head on `keep` rows).
        let mut outputs = self.plan.run_last_positions(&inputs, observe, keep)?;
        let logits = std::mem::replace(&mut outputs[l.logits], Tensor::scalar(0f32));
        let kept = self.keep_logits(&logits, tokens.len(), keep)?;
        if native {
            self.store_present(&mut cache.layers, &outputs, Tensor::shape, total)?;
        }
        cache.tokens.extend_from_slice(tokens);
        Ok(kept)
    }

    /// The last `keep` rows of a `[1, rows, vocab]` (or `[rows, vocab]`) logits tensor, as a
    /// view of it.
    fn keep_logits(&self, logits: &Tensor, n: usize, keep: usize) -> Result<Logits, LlmError> {
        let shape = logits.shape();
        let rows = match shape {
            [1, r, v] if *v == self.vocab => *r,
            [r, v] if *v == self.vocab => *r,
            _ => {
                return Err(LlmError::Invalid(format!(
                    "logits came out as {shape:?}, expected [1, {n}, {}]",
                    self.vocab
                )))
            }
        };
        if rows < keep {
            return Err(LlmError::Invalid(format!(
                "the graph returns logits for {rows} positions, {keep} were asked for"
            )));
        }
        // f32 and aligned (`Logits::data` relies on it; a view of whole rows stays aligned).
        logits.as_slice::<f32>()?;
        let values = logits
            .reshaped(vec![1, rows, self.vocab])?
            .last_positions(keep)?;
        Ok(Logits {
            rows: keep,
            vocab: self.vocab,
            values,
        })
    }

    /// The past of an empty cache. In the seq-major layout (`[1, 0, heads, head_dim]`) its
    /// buffer has room for the whole context, so `patch.KvAppend` grows it in place every step
    /// (the room is zero-allocated: pages are touched only as tokens arrive). `tokens` is the
    /// first step's length, the room's floor when the bundle states no context.
    fn empty_past(&self, tokens: usize) -> Result<Tensor, LlmError> {
        let l = &self.layout;
        if l.past_axis != 1 {
            return Ok(Tensor::zeros(DType::F32, l.past_shape.clone()));
        }
        let row: usize = l.past_shape.iter().filter(|&&d| d != 0).product();
        let positions = self.max_context().unwrap_or(0).max(tokens.max(256));
        Ok(Tensor::with_append_capacity(
            DType::F32,
            l.past_shape.clone(),
            positions * row,
        )?)
    }

    /// Keeps a step's present keys and values (`outputs` in graph order) as the cache's
    /// `layers`, after checking that they hold all `total` positions.
    fn store_present<T: Clone>(
        &self,
        layers: &mut Vec<(T, T)>,
        outputs: &[T],
        shape: impl Fn(&T) -> &[usize],
        total: usize,
    ) -> Result<(), LlmError> {
        let l = &self.layout;
        if let Some(&(k, _)) = l.present.first() {
            let got = shape(&outputs[k]).get(l.past_axis).copied().unwrap_or(0);
            if got != total {
                return Err(LlmError::Invalid(format!(
                    "present keys hold {got} positions after {total} tokens"
                )));
            }
        }
        *layers = l
            .present
            .iter()
            .map(|&(k, v)| (outputs[k].clone(), outputs[v].clone()))
            .collect();
        Ok(())
    }

    /// A forward step on the cuda backend: the KV cache stays in GPU memory between steps and
    /// only the logits come back.
    #[cfg(feature = "cuda")]
    fn forward_cuda(
        &self,
        plan: &crate::cuda::CudaPlan,
        cache: &mut KvCache,
        inputs: Vec<Tensor>,
        tokens: &[u32],
        keep: usize,
        total: usize,
    ) -> Result<Logits, LlmError> {
        use crate::cuda::Value;
        let l = &self.layout;
        let backend_err = |e: crate::cuda::CudaError| LlmError::Backend(e.to_string());
        let mut values: Vec<Value> = inputs.into_iter().map(Value::Host).collect();
        for (layer, &(k, v)) in l.past.iter().enumerate() {
            if let Some((pk, pv)) = cache.device_layers.get(layer) {
                values[k] = pk.clone();
                values[v] = pv.clone();
            }
        }
        let mut outputs = plan.run(values).map_err(backend_err)?;
        let logits = std::mem::replace(&mut outputs[l.logits], Value::Host(Tensor::scalar(0f32)))
            .to_host(plan.device())
            .map_err(backend_err)?;
        let kept = self.keep_logits(&logits, tokens.len(), keep)?;
        if self.has_kv_cache() {
            self.store_present(&mut cache.device_layers, &outputs, Value::shape, total)?;
        }
        cache.tokens.extend_from_slice(tokens);
        Ok(kept)
    }
}
