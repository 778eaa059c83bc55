//! The CUDA executor: a graph run node by node with f32 activations resident on the GPU.
//!
//! Placement is static ([`placement`]): a node runs on the device when it has a kernel there
//! and its data is f32 (the hybrid and dense MatMuls, the fused ops, element-wise math, norms,
//! softmax, gather, concat, transpose, expand); views (Reshape, Squeeze, ...) of a device value
//! stay on the device without a copy. Everything else — the integer shape arithmetic the
//! exporters leave — runs on the host through the reference ops. A value crosses the bus only
//! when a host op reads a device value or the other way round; [`placement`] lists those
//! crossings, so that a model whose forward pass does not stay on the device is visible.
//!
//! Output shapes of device ops come from the ops' own shape inference run on concrete input
//! shapes, so the device path and the reference interpreter cannot disagree on them.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{CudaDevice, CudaError};
use crate::dim::shape_of;
use crate::dtype::DType;
use crate::ir::{Graph, Node, TensorType, ValueId};
use crate::ops::fused::broadcast_strides;
use crate::ops::hybrid::HybridMatMul;
use crate::ops::InputFact;
use crate::tensor::Tensor;
use patch_kernels::cuda::tile_descs;
use patch_kernels::{PackedWeight, WeightDtype};

/// Most axes a strided kernel takes (`PATCH_MAX_DIMS` in `common.cuh`).
const MAX_DIMS: usize = 6;
/// Dynamic shared memory the attention kernel may use: one f32 score per key.
const ATTENTION_SMEM_LIMIT: usize = 48 * 1024;
/// Up to this many rows a hybrid product runs on the CUDA-core GEMV kernel.
const GEMV_MAX_ROWS: usize = 8;

/// `struct Bcast6` of `common.cuh`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Bcast6 {
    ndim: i32,
    pad: i32,
    dims: [i64; MAX_DIMS],
    sa: [i64; MAX_DIMS],
    sb: [i64; MAX_DIMS],
}

// SAFETY: plain `repr(C)` data with the layout of the C struct (int, int, 3 × long long[6]).
unsafe impl DeviceRepr for Bcast6 {}

impl Bcast6 {
    fn new(dims: &[usize], sa: &[usize], sb: &[usize]) -> Result<Bcast6, String> {
        if dims.len() > MAX_DIMS {
            return Err(format!(
                "rank {} is above the {MAX_DIMS} axes the CUDA kernels take",
                dims.len()
            ));
        }
        let mut s = Bcast6 {
            ndim: dims.len().max(1) as i32,
            dims: [1; MAX_DIMS],
            ..Bcast6::default()
        };
        for (a, &d) in dims.iter().enumerate() {
            s.dims[a] = d as i64;
            s.sa[a] = sa.get(a).copied().unwrap_or(0) as i64;
            s.sb[a] = sb.get(a).copied().unwrap_or(0) as i64;
        }
        Ok(s)
    }
}

/// An f32 tensor in GPU memory. Cloning shares the buffer (views are free).
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    buf: Arc<CudaSlice<f32>>,
    shape: Vec<usize>,
}

impl DeviceTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the tensor back to the host.
    pub fn to_host(&self, dev: &CudaDevice) -> Result<Tensor, CudaError> {
        let mut v = dev.stream().clone_dtoh(&*self.buf)?;
        v.truncate(self.len());
        Ok(Tensor::from_vec(self.shape.clone(), v)?)
    }

    /// Copies an f32 host tensor to the device.
    pub fn upload(dev: &CudaDevice, t: &Tensor) -> Result<DeviceTensor, CudaError> {
        let data = t.as_slice::<f32>()?;
        let buf = if data.is_empty() {
            dev.stream().alloc_zeros::<f32>(1)?
        } else {
            dev.stream().clone_htod(data)?
        };
        Ok(DeviceTensor {
            buf: Arc::new(buf),
            shape: t.shape().to_vec(),
        })
    }
}

/// A value of a run: on the host or on the device.
#[derive(Clone, Debug)]
pub enum Value {
    Host(Tensor),
    Device(DeviceTensor),
}

impl Value {
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::Host(t) => t.shape(),
            Value::Device(d) => d.shape(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Value::Host(t) => t.dtype(),
            Value::Device(_) => DType::F32,
        }
    }

    /// The value on the host (a copy back for device values).
    pub fn to_host(&self, dev: &CudaDevice) -> Result<Tensor, CudaError> {
        match self {
            Value::Host(t) => Ok(t.clone()),
            Value::Device(d) => d.to_host(dev),
        }
    }
}

/// Where a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Device,
    Host,
}

/// What a device node does.
#[derive(Clone, Debug)]
enum Kind {
    Hybrid,
    MatMul,
    Binary(i32),
    Unary(i32),
    SwiGlu,
    RmsNorm {
        eps: f32,
    },
    LayerNorm {
        eps: f32,
    },
    Softmax,
    Rotary {
        half: usize,
    },
    Attention {
        scale: f32,
        /// `layout = "bshd"`: run as the head-major kernel between axis-swapping copies.
        seq_major: bool,
    },
    Gather,
    Concat,
    Transpose {
        perm: Option<Vec<i64>>,
    },
    Expand,
    /// Same elements, new shape: Reshape, Flatten, Squeeze, Unsqueeze, Identity.
    View,
}

impl Kind {
    /// Cheap element-wise and layout ops: they run where their data is, so that the small
    /// f32 arithmetic the exporters do on host-side data (positions, masks) stays on the host
    /// and only its result is uploaded, once, to the op that needs it.
    fn is_light(&self) -> bool {
        matches!(
            self,
            Kind::Binary(_)
                | Kind::Unary(_)
                | Kind::Expand
                | Kind::View
                | Kind::Concat
                | Kind::Transpose { .. }
        )
    }

    /// Inputs the kernel reads from device memory (the others are host-side shape data).
    fn device_inputs(&self, arity: usize) -> Vec<usize> {
        match self {
            Kind::Hybrid => vec![0, 3, 4],
            Kind::Gather
            | Kind::Expand
            | Kind::View
            | Kind::Unary(_)
            | Kind::Softmax
            | Kind::Transpose { .. } => vec![0],
            _ => (0..arity).collect(),
        }
    }
}

fn binary_code(op: &str) -> Option<i32> {
    Some(match op {
        "Add" => 0,
        "Sub" => 1,
        "Mul" => 2,
        "Div" => 3,
        "Pow" => 4,
        "Max" => 5,
        "Min" => 6,
        _ => return None,
    })
}

fn unary_code(domain: &str, op: &str, node: &Node) -> Option<i32> {
    Some(match (domain, op) {
        ("", "Neg") => 0,
        ("", "Sqrt") => 1,
        ("", "Exp") => 2,
        ("", "Log") => 3,
        ("", "Sigmoid") => 4,
        ("", "Tanh") => 5,
        ("", "Reciprocal") => 6,
        ("", "Sin") => 7,
        ("", "Cos") => 8,
        ("", "Abs") => 9,
        ("", "Relu") => 10,
        ("", "Erf") => 11,
        ("patch", "Silu") => 12,
        ("patch", "Gelu") => 13,
        ("", "Gelu") => match node.attrs.string("approximate").ok().flatten() {
            Some("tanh") => 13,
            _ => 14,
        },
        _ => return None,
    })
}

/// Normalizes `axis` against `rank`; `None` when out of range.
fn norm_axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

/// The device kind of `node`, or `None` when it runs on the host.
fn device_kind(graph: &Graph, node: &Node) -> Option<Kind> {
    let ty = |i: usize| -> Option<&TensorType> {
        node.inputs
            .get(i)
            .copied()
            .flatten()
            .map(|id| &graph.value(id).ty)
    };
    let f32_in = |i: usize| ty(i).is_some_and(|t| t.dtype == DType::F32);
    let all_f32 = node
        .inputs
        .iter()
        .flatten()
        .all(|&id| graph.value(id).ty.dtype == DType::F32)
        && node
            .outputs
            .iter()
            .all(|&id| graph.value(id).ty.dtype == DType::F32);
    let last_axis = |attr: &str, default: i64| {
        let rank = ty(0).map(|t| t.rank()).unwrap_or(0);
        let axis = node.attrs.int_or(attr, default).ok()?;
        (norm_axis(axis, rank)? + 1 == rank).then_some(())
    };
    let (domain, op) = (node.domain.as_str(), node.op_type.as_str());
    match (domain, op) {
        ("patch", "HybridMatMul") => f32_in(0).then_some(Kind::Hybrid),
        ("", "MatMul") if all_f32 => {
            let (a, b) = (ty(0)?.rank(), ty(1)?.rank());
            (a >= 2 && (b == 2 || a == b)).then_some(Kind::MatMul)
        }
        ("", op) if binary_code(op).is_some() && all_f32 && node.inputs.len() == 2 => {
            binary_code(op).map(Kind::Binary)
        }
        ("patch", "SwiGLU") if all_f32 => Some(Kind::SwiGlu),
        ("patch", "RMSNorm") if all_f32 => {
            last_axis("axis", -1)?;
            Some(Kind::RmsNorm {
                eps: node.attrs.float_or("epsilon", 1e-5).ok()?,
            })
        }
        ("", "LayerNormalization") if all_f32 && node.outputs.len() == 1 => {
            last_axis("axis", -1)?;
            Some(Kind::LayerNorm {
                eps: node.attrs.float_or("epsilon", 1e-5).ok()?,
            })
        }
        ("", "Softmax") if all_f32 => {
            // Before opset 13 the default axis is 1 (and the input is read as 2-D there).
            last_axis("axis", if graph.opset < 13 { 1 } else { -1 })?;
            Some(Kind::Softmax)
        }
        ("patch", "Rotary") if all_f32 => Some(Kind::Rotary {
            half: usize::try_from(node.attrs.req_int("half").ok()?).ok()?,
        }),
        // Softcapped attention (Gemma 2) has no device kernel yet: it runs on the host.
        ("patch", "Attention") if all_f32 && node.attrs.get("softcap").is_none() => {
            Some(Kind::Attention {
                scale: node.attrs.float("scale").ok()??,
                seq_major: match node.attrs.string("layout").ok()? {
                    None | Some("bhsd") => false,
                    Some("bshd") => true,
                    Some(_) => return None,
                },
            })
        }
        // The cache grows by a copy on the device (no in-place append there yet).
        ("patch", "KvAppend") if all_f32 => Some(Kind::Concat),
        ("", "Gather") => {
            let axis = node.attrs.int_or("axis", 0).ok()?;
            (f32_in(0) && ty(0)?.rank() == 2 && axis == 0).then_some(Kind::Gather)
        }
        ("", "Concat") if all_f32 => Some(Kind::Concat),
        ("", "Transpose") if all_f32 => Some(Kind::Transpose {
            perm: node.attrs.ints("perm").ok()?.map(|p| p.to_vec()),
        }),
        ("", "Expand") if f32_in(0) => Some(Kind::Expand),
        ("", "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" | "Identity") if f32_in(0) => {
            Some(Kind::View)
        }
        (d, o) => unary_code(d, o, node).filter(|_| all_f32).map(Kind::Unary),
    }
}

/// A value that crosses from device to host in every forward pass: `value` lives on the
/// device (a device node made it, or it is an f32 graph input such as the KV cache) and the
/// host side of node `node` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crossing {
    pub node: String,
    pub op: String,
    pub value: String,
    pub ty: String,
}

/// Where each node of `graph` runs on the cuda backend, in node order, and every
/// device-to-host crossing that implies per forward pass. Found statically (f32 graph inputs,
/// such as the KV cache, live on the device; light ops follow their data; constants never
/// count), with the rule [`CudaPlan::run`] applies. Needs no GPU: this is how tests check, on
/// any machine, that a model's forward pass stays on the device.
pub fn placement(graph: &Graph) -> (Vec<Placement>, Vec<Crossing>) {
    let mut on_device = vec![false; graph.value_count()];
    for (id, _) in graph.inputs() {
        on_device[id.0 as usize] = graph.value(*id).ty.dtype == DType::F32;
    }
    let mut places = Vec::with_capacity(graph.node_count());
    let mut crossings = Vec::new();
    for (_, node) in graph.nodes() {
        let kind = device_kind(graph, node);
        let device = kind.as_ref().is_some_and(|k| {
            !k.is_light()
                || k.device_inputs(node.inputs.len()).iter().any(|&i| {
                    node.inputs
                        .get(i)
                        .copied()
                        .flatten()
                        .is_some_and(|id| on_device[id.0 as usize])
                })
        });
        let dev_in = match &kind {
            Some(k) if device => k.device_inputs(node.inputs.len()),
            // Shape and Size read only the shape, which the host always knows.
            _ if is_shape_query(node) => vec![0],
            _ => Vec::new(),
        };
        for (i, slot) in node.inputs.iter().enumerate() {
            if let Some(id) = slot {
                if !dev_in.contains(&i) && on_device[id.0 as usize] {
                    let v = graph.value(*id);
                    crossings.push(Crossing {
                        node: node.name.clone(),
                        op: node.op_type.clone(),
                        value: v.name.clone(),
                        ty: v.ty.to_string(),
                    });
                }
            }
        }
        for &o in &node.outputs {
            on_device[o.0 as usize] = device;
        }
        places.push(if device {
            Placement::Device
        } else {
            Placement::Host
        });
    }
    (places, crossings)
}

/// `Shape` and `Size`: host ops that need only their input's shape.
fn is_shape_query(node: &Node) -> bool {
    node.domain.is_empty() && matches!(node.op_type.as_str(), "Shape" | "Size")
}

/// The result of a shape query on a value of shape `dims` (ONNX `Shape` with its `start`/`end`
/// attributes, clamped as the spec says; `Size`).
fn shape_query(node: &Node, dims: &[usize]) -> Result<Tensor, CudaError> {
    let r = dims.len() as i64;
    if node.op_type == "Size" {
        return Ok(Tensor::scalar(dims.iter().product::<usize>() as i64));
    }
    let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
    let attr = |name: &str, default: i64| {
        node.attrs
            .int_or(name, default)
            .map_err(|e| crate::RuntimeError::at_node(&node.name, &node.op_type, e))
    };
    let (start, end) = (clamp(attr("start", 0)?), clamp(attr("end", r)?));
    let v: Vec<i64> = dims[start..end.max(start)]
        .iter()
        .map(|&d| d as i64)
        .collect();
    Ok(Tensor::from_vec(vec![v.len()], v)?)
}

/// A packed hybrid weight in device memory, ready for `Y = X · W (+ bias)`.
pub struct DeviceHybrid {
    values: CudaSlice<u8>,
    meta: CudaSlice<u32>,
    tiles: CudaSlice<u8>,
    dtype: WeightDtype,
    k: usize,
    n: usize,
    k_tiles: usize,
    n_tiles: usize,
    tile_n: usize,
}

/// A graph prepared for the GPU: constants uploaded once (packed weights included), each
/// node's placement decided.
pub struct CudaPlan {
    dev: Arc<CudaDevice>,
    graph: Graph,
    kinds: Vec<Option<Kind>>,
    host_consts: Vec<Option<Tensor>>,
    device_consts: Vec<Option<DeviceTensor>>,
    weights: Vec<Option<DeviceHybrid>>,
    /// Per node in order: values to drop after it runs.
    frees: Vec<Vec<usize>>,
}

impl std::fmt::Debug for CudaPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaPlan({:?}, {} nodes)", self.dev, self.kinds.len())
    }
}

fn node_err(node: &Node, msg: impl std::fmt::Display) -> CudaError {
    CudaError::Node {
        node: node.name.clone(),
        op: node.op_type.clone(),
        msg: msg.to_string(),
    }
}

/// A 1-D launch over `n` elements for the grid-stride kernels.
fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of 256 threads per row.
fn grid_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaPlan {
    /// Prepares `graph` for `dev`: uploads the packed weights and every f32 constant a
    /// device node reads.
    pub fn new(dev: Arc<CudaDevice>, graph: &Graph) -> Result<CudaPlan, CudaError> {
        let nodes: Vec<&Node> = graph.nodes().map(|(_, n)| n).collect();
        let kinds: Vec<Option<Kind>> = nodes.iter().map(|n| device_kind(graph, n)).collect();
        let mut host_consts = vec![None; graph.value_count()];
        for (id, t) in graph.consts() {
            host_consts[id.0 as usize] = Some(t.to_aligned());
        }
        let mut device_consts: Vec<Option<DeviceTensor>> = vec![None; graph.value_count()];
        let mut weights: Vec<Option<DeviceHybrid>> = Vec::with_capacity(nodes.len());
        for (node, kind) in nodes.iter().zip(&kinds) {
            let mut weight = None;
            if let Some(kind) = kind {
                if matches!(kind, Kind::Hybrid) {
                    weight = Some(upload_weight(&dev, node, &host_consts)?);
                }
                for i in kind.device_inputs(node.inputs.len()) {
                    let Some(Some(id)) = node.inputs.get(i) else {
                        continue;
                    };
                    let slot = id.0 as usize;
                    if let (Some(t), None) = (&host_consts[slot], &device_consts[slot]) {
                        if t.dtype() == DType::F32 {
                            device_consts[slot] = Some(DeviceTensor::upload(&dev, t)?);
                        }
                    }
                }
            }
            weights.push(weight);
        }
        let frees = crate::interp::frees_after_last_use(graph, |v| host_consts[v].is_some());
        dev.synchronize()?;
        Ok(CudaPlan {
            dev,
            graph: graph.clone(),
            kinds,
            host_consts,
            device_consts,
            weights,
            frees,
        })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the graph. Inputs and outputs are in graph order; outputs a device node produced
    /// stay on the device (feed them back as inputs, e.g. the KV cache, without a copy).
    pub fn run(&self, inputs: Vec<Value>) -> Result<Vec<Value>, CudaError> {
        let graph = &self.graph;
        if inputs.len() != graph.inputs().len() {
            return Err(crate::RuntimeError::Input {
                name: graph.name.clone(),
                msg: format!(
                    "the graph takes {} inputs but {} were given",
                    graph.inputs().len(),
                    inputs.len()
                ),
            }
            .into());
        }
        let mut env: Vec<Option<Value>> = vec![None; graph.value_count()];
        for ((id, _), v) in graph.inputs().iter().zip(inputs) {
            let want = graph.value(*id);
            if v.dtype() != want.ty.dtype || v.shape().len() != want.ty.rank() {
                return Err(crate::RuntimeError::Input {
                    name: want.name.clone(),
                    msg: format!("expected {}, got {} {:?}", want.ty, v.dtype(), v.shape()),
                }
                .into());
            }
            env[id.0 as usize] = Some(v);
        }
        for (pos, (_, node)) in graph.nodes().enumerate() {
            let outputs = match &self.kinds[pos] {
                None if is_shape_query(node) => match node.inputs.first() {
                    Some(Some(id)) => match &env[id.0 as usize] {
                        Some(Value::Device(d)) => vec![Value::Host(shape_query(node, d.shape())?)],
                        _ => self.run_host(node, &env)?,
                    },
                    _ => self.run_host(node, &env)?,
                },
                Some(kind) if kind.is_light() && !self.reads_device_data(kind, node, &env) => {
                    self.run_host(node, &env)?
                }
                Some(kind) => self.run_device(pos, kind, node, &env)?,
                None => self.run_host(node, &env)?,
            };
            for (out, v) in node.outputs.iter().zip(outputs) {
                env[out.0 as usize] = Some(v);
            }
            for &v in &self.frees[pos] {
                env[v] = None;
            }
        }
        graph
            .outputs()
            .iter()
            .map(|(id, _)| {
                let i = id.0 as usize;
                env[i]
                    .clone()
                    .or_else(|| self.host_consts[i].clone().map(Value::Host))
                    .ok_or_else(|| {
                        crate::RuntimeError::Undefined(graph.value(*id).name.clone()).into()
                    })
            })
            .collect()
    }

    /// Whether any data input of `node` is a device value of this run (constants do not count:
    /// a light op on host data and constants stays on the host).
    fn reads_device_data(&self, kind: &Kind, node: &Node, env: &[Option<Value>]) -> bool {
        kind.device_inputs(node.inputs.len()).iter().any(|&i| {
            node.inputs
                .get(i)
                .copied()
                .flatten()
                .is_some_and(|id| matches!(env[id.0 as usize], Some(Value::Device(_))))
        })
    }

    fn host_input(&self, env: &[Option<Value>], id: ValueId) -> Result<Tensor, CudaError> {
        let i = id.0 as usize;
        if let Some(t) = &self.host_consts[i] {
            return Ok(t.clone());
        }
        match &env[i] {
            Some(Value::Host(t)) => Ok(t.clone()),
            Some(Value::Device(d)) => d.to_host(&self.dev),
            None => Err(crate::RuntimeError::Undefined(self.graph.value(id).name.clone()).into()),
        }
    }

    fn device_input(&self, env: &[Option<Value>], id: ValueId) -> Result<DeviceTensor, CudaError> {
        let i = id.0 as usize;
        if let Some(d) = &self.device_consts[i] {
            return Ok(d.clone());
        }
        match (&env[i], &self.host_consts[i]) {
            (Some(Value::Device(d)), _) => Ok(d.clone()),
            (Some(Value::Host(t)), _) | (None, Some(t)) => DeviceTensor::upload(&self.dev, t),
            (None, None) => {
                Err(crate::RuntimeError::Undefined(self.graph.value(id).name.clone()).into())
            }
        }
    }

    /// Runs `node` through its reference op on the host.
    fn run_host(&self, node: &Node, env: &[Option<Value>]) -> Result<Vec<Value>, CudaError> {
        let mut owned: Vec<Option<Tensor>> = Vec::with_capacity(node.inputs.len());
        for slot in &node.inputs {
            owned.push(match slot {
                Some(id) => Some(self.host_input(env, *id)?),
                None => None,
            });
        }
        let refs: Vec<Option<&Tensor>> = owned.iter().map(|t| t.as_ref()).collect();
        let out = node
            .op
            .eval(&refs)
            .map_err(|e| crate::RuntimeError::at_node(&node.name, &node.op_type, e))?;
        Ok(out.into_iter().map(Value::Host).collect())
    }

    /// Concrete output shapes of `node` from its shape inference over concrete inputs.
    fn output_shapes(
        &self,
        node: &Node,
        ins: &[Option<Value>],
    ) -> Result<Vec<Vec<usize>>, CudaError> {
        let types: Vec<Option<TensorType>> = ins
            .iter()
            .map(|v| {
                v.as_ref()
                    .map(|v| TensorType::new(v.dtype(), shape_of(v.shape())))
            })
            .collect();
        let facts: Vec<Option<InputFact<'_>>> = ins
            .iter()
            .zip(&types)
            .map(|(v, ty)| {
                ty.as_ref().map(|ty| InputFact {
                    ty,
                    value: match v {
                        Some(Value::Host(t)) => Some(t),
                        _ => None,
                    },
                    sym: None,
                })
            })
            .collect();
        let outs = node
            .op
            .infer(&facts)
            .map_err(|e| crate::RuntimeError::at_node(&node.name, &node.op_type, e))?;
        outs.iter()
            .map(|o| {
                o.ty.shape
                    .iter()
                    .map(|d| d.as_const().map(|v| v as usize))
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| node_err(node, format!("output shape {} is not concrete", o.ty)))
            })
            .collect()
    }

    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>, CudaError> {
        // SAFETY: every kernel below writes each element of its output before anything reads it.
        Ok(unsafe { self.dev.stream().alloc::<f32>(n.max(1)) }?)
    }

    fn run_device(
        &self,
        pos: usize,
        kind: &Kind,
        node: &Node,
        env: &[Option<Value>],
    ) -> Result<Vec<Value>, CudaError> {
        let on_device = kind.device_inputs(node.inputs.len());
        let mut ins: Vec<Option<Value>> = Vec::with_capacity(node.inputs.len());
        for (i, slot) in node.inputs.iter().enumerate() {
            ins.push(match slot {
                None => None,
                Some(id) if on_device.contains(&i) => {
                    Some(Value::Device(self.device_input(env, *id)?))
                }
                Some(id) => Some(Value::Host(self.host_input(env, *id)?)),
            });
        }
        let shapes = self.output_shapes(node, &ins)?;
        let out_shape = shapes
            .first()
            .cloned()
            .ok_or_else(|| node_err(node, "the op has no output"))?;
        let dev = |i: usize| -> Result<&DeviceTensor, CudaError> {
            match ins.get(i) {
                Some(Some(Value::Device(d))) => Ok(d),
                _ => Err(node_err(node, format!("input {i} is missing"))),
            }
        };
        let host = |i: usize| -> Result<&Tensor, CudaError> {
            match ins.get(i) {
                Some(Some(Value::Host(t))) => Ok(t),
                _ => Err(node_err(node, format!("input {i} is missing"))),
            }
        };
        let n_out: usize = out_shape.iter().product();
        let stream = self.dev.stream();
        let f = |name: &str| self.dev.function(name);
        let bad = |msg: String| node_err(node, msg);
        let result = match kind {
            Kind::View => {
                let x = dev(0)?;
                DeviceTensor {
                    buf: x.buf.clone(),
                    shape: out_shape,
                }
            }
            Kind::Hybrid => {
                let w = self.weights[pos]
                    .as_ref()
                    .ok_or_else(|| bad("packed weight not uploaded".into()))?;
                let x = dev(0)?;
                let device_in = |i: usize| match ins.get(i) {
                    Some(Some(Value::Device(t))) => Some(t),
                    _ => None,
                };
                let (bias, residual) = (device_in(3), device_in(4));
                if residual.is_some_and(|r| r.shape != out_shape) {
                    return Err(bad(format!(
                        "residual does not have the output's shape {out_shape:?}"
                    )));
                }
                let m = x.len() / w.k.max(1);
                let mut y = self.alloc(n_out)?;
                w.launch(&self.dev, x, bias, residual, &mut y, m)
                    .map_err(|e| bad(e.to_string()))?;
                DeviceTensor {
                    buf: Arc::new(y),
                    shape: out_shape,
                }
            }
            Kind::MatMul => {
                let (a, b) = (dev(0)?, dev(1)?);
                let (ar, br) = (a.shape.len(), b.shape.len());
                let (m, k, n) = (a.shape[ar - 2], a.shape[ar - 1], b.shape[br - 1]);
                let batch: usize = a.shape[..ar - 2].iter().product();
                let sb = if br == 2 {
                    0
                } else if b.shape[..br - 2] == a.shape[..ar - 2] {
                    (k * n) as i64
                } else {
                    return Err(bad(format!(
                        "batched MatMul {:?} x {:?} needs equal batch dims on the device",
                        a.shape, b.shape
                    )));
                };
                let mut y = self.alloc(n_out)?;
                let (mi, ki, ni, sa) = (m as i32, k as i32, n as i32, (m * k) as i64);
                let cfg = LaunchConfig {
                    grid_dim: (n.div_ceil(32) as u32, m.div_ceil(32) as u32, batch as u32),
                    block_dim: (32, 8, 1),
                    shared_mem_bytes: 0,
                };
                let func = f("patch_matmul_f32")?;
                let mut l = stream.launch_builder(func);
                l.arg(&*a.buf).arg(&*b.buf).arg(&mut y);
                l.arg(&mi).arg(&ki).arg(&ni).arg(&sa).arg(&sb);
                // SAFETY: argument list matches `patch_matmul_f32`; buffers hold batch·m·k,
                // k·n (or batch·k·n) and batch·m·n elements.
                unsafe { l.launch(cfg) }?;
                DeviceTensor {
                    buf: Arc::new(y),
                    shape: out_shape,
                }
            }
            Kind::Binary(code) => {
                let (a, b) = (dev(0)?, dev(1)?);
                let sa = broadcast_strides(&a.shape, &out_shape).map_err(bad)?;
                let sb = broadcast_strides(&b.shape, &out_shape).map_err(bad)?;
                let s = Bcast6::new(&out_shape, &sa, &sb).map_err(bad)?;
                let mut y = self.alloc(n_out)?;
                let n64 = n_out as i64;
                let func = f("patch_binary_f32")?;
                let mut l = stream.launch_builder(func);
                l.arg(code)
                    .arg(&*a.buf)
                    .arg(&*b.buf)
                    .arg(&mut y)
                    .arg(&n64)
                    .arg(&s);
                // SAFETY: matches `patch_binary_f32`; strides index inside a and b by
                // construction of `broadcast_strides`.
                unsafe { l.launch(grid_1d(n_out)) }?;
                DeviceTensor {
                    buf: Arc::new(y),
                    shape: out_shape,
                }
            }
            Kind::Unary(code) => {
                let x = dev(0)?;
                let mut y = self.alloc(n_out)?;
                let n64 = n_out as i64;
                let func = f("patch_unary_f32")?;
                let mut l = stream.launch_builder(func);
                l.arg(code).arg(&*x.buf).arg(&mut y).arg(&n64);
                // SAFETY: matches `patch_unary_f32`; x and y hold n elements.
                unsafe { l.launch(grid_1d(n_out)) }?;
                DeviceTensor {
                    buf: Arc::new(y),
                    shape: out_shape,
                }
            }
            Kind::SwiGlu => {
                let (g, u) = (dev(0)?, dev(1)?);
                if g.shape != u.shape {
                    return Err(bad(format!("G {:?} and U {:?} differ", g.shape, u.shape)));
                }
                let mut y = self.alloc(n_out)?;
                let n64 = n_out as i64;
                let func = f("patch_swiglu_f32")?;
                let mut l = stream.launch_builder(func);
                l.arg(&*g.buf).arg(&*u.buf).arg(&mut y).arg(&n64);
                // SAFETY: matches `patch_swiglu_f32`; all three hold n elements.
                unsafe { l.launch(grid_1d(n_out)) }?;
                DeviceTensor {
                    buf: Arc::new(y),
                    shape: out_shape,
                }
            }
            Kind::RmsNorm { eps } | Kind::LayerNorm { eps } => {
                let x = dev(0)?;
                let cols = *x.shape.last().unwrap_or(&1);
                let rows = x.len() / cols.max(1);
                let per_col = |i: usize| -> Result<Option<&DeviceTensor>, CudaError> {
                    match ins.get(i) {
                        Some(Some(Value::Device(t))) if t.len() == cols => Ok(Some(t)),
                        Some(Some(v)) => Err(bad(format!(
                            "input {i} {:?} must hold one value per column ({cols})",
                            v.shape()
                        ))),
                        _ => Ok(None),
                    }
                };
                let (scale, bias) = (per_col(1)?, per_col(2)?);
                let mut y = self.alloc(n_out)?;
                let (rows64, cols32) = (rows as i64, cols as i32);
                let null = 0u64;
                let rms = matches!(kind, Kind::RmsNorm { .. });
                let func = f(if rms {
                    "patch_rms_norm_f32"
                } else {
                    "patch_layer_norm_f32"
                })?;
                let mut l = stream.launch_builder(func);
                l.arg(&*x.buf);
                match scale {
                    Some(s) => l.arg(&*s.buf),
                    None => l.arg(&null),
                };
                if !rms {
                    match bias {
                        Some(b) => l.arg(&*b.buf),
                        None => l.arg(&null),
                    };
                }
                l.arg(&mut y).arg(&rows64).arg(&cols32).arg(eps);
                // SAFETY: matches the norm kernels; x and y hold rows·cols, scale/bias cols
                // elements or null.
                unsafe { l.launch(grid_rows(rows)) }?;
                DeviceTensor {
                    buf: Arc::new(y),
                    shape: out_shape,
                }
            }
            Kind::Softmax => {
                let x = dev(0)?;
                let cols = *x.shape.last().unwrap_or(&1);
                let rows = x.len() / cols.max(1);
                let mut y = self.alloc(n_out)?;
                let (rows64, cols32) = (rows as i64, cols as i32);
                let func = f("patch_softmax_f32")?;
                let mut l = stream.launch_builder(func);
                l.arg(&*x.buf).arg(&mut y).arg(&rows64).arg(&cols32);
                // SAFETY: matches `patch_softmax_f32`.
                unsafe { l.launch(grid_rows(rows)) }?;
                DeviceTensor {
                    buf: Arc::new(y),
                    shape: out_shape,
                }
            }
            Kind::Rotary { half } => {
                let (x, c, s) = (dev(0)?, dev(1)?, dev(2)?);
                let r = x.shape.len();
                if r == 0 || x.shape[r - 1] != 2 * half {
                    return Err(bad(format!(
                        "X {:?} needs a last axis of {}",
                        x.shape,
                        2 * half
                    )));
                }
                let table = |t: &DeviceTensor| -> Result<Vec<usize>, CudaError> {
                    if t.shape.last() != Some(&(2 * half)) {
                        return Err(bad(format!(
                            "Cos/Sin {:?} must end in {}",
                            t.shape,
                            2 * half
                        )));
                    }
                    broadcast_strides(&t.shape, &x.shape).map_err(bad)
                };
                let (cs, ss) = (table(c)?, table(s)?);
                let lead =
                    Bcast6::new(&x.shape[..r - 1], &cs[..r - 1], &ss[..r - 1]).map_err(bad)?;
                let rows = (x.len() / (2 * half)) as i64;
                let half32 = *half as i32;
                let mut y = self.alloc(n_out)?;
                let func = f("patch_rotary_f32")?;
                let mut l = stream.launch_builder(func);
                l.arg(&*x.buf).arg(&*c.buf).arg(&*s.buf).arg(&mut y);
                l.arg(&rows).arg(&half32).arg(&lead);
                // SAFETY: matches `patch_rotary_f32`; table offsets stay inside the tables by
                // construction of `broadcast_strides`.
                unsafe { l.launch(grid_1d(rows as usize * half)) }?;
                DeviceTensor {
                    buf: Arc::new(y),
                    shape: out_shape,
                }
            }
            Kind::Attention { scale, seq_major } => {
                let (q, k, v) = (dev(0)?, dev(1)?, dev(2)?);
                // Seq-major operands are swapped to head-major copies for the kernel.
                let swapped = if *seq_major {
                    let swap =
                        |x: &DeviceTensor| self.swap_axes_12(x).map_err(|e| bad(e.to_string()));
                    Some((swap(q)?, swap(k)?, swap(v)?))
                } else {
                    None
                };
                let (q, k, v) = match &swapped {
                    Some((q, k, v)) => (q, k, v),
                    None => (q, k, v),
                };
                let head_major_shape = if *seq_major {
                    let o = &out_shape;
                    vec![o[0], o[2], o[1], o[3]]
                } else {
                    out_shape.clone()
                };
                let (&[b, h, s, d], &[kb, hk, t, kd]) = (q.shape.as_slice(), k.shape.as_slice())
                else {
                    return Err(bad(format!(
                        "Q {:?} and K {:?} must be [b, h, s, d] and [b, hk, t, d]",
                        q.shape, k.shape
                    )));
                };
                if kb != b || kd != d || hk == 0 || h % hk != 0 || v.shape != k.shape {
                    return Err(bad(format!(
                        "Q {:?}, K {:?}, V {:?} do not fit grouped attention",
                        q.shape, k.shape, v.shape
                    )));
                }
                if t * 4 > ATTENTION_SMEM_LIMIT {
                    return Err(bad(format!(
                        "{t} keys need {} bytes of shared memory; the kernel takes at most {ATTENTION_SMEM_LIMIT}",
                        t * 4
                    )));
                }
                let mask = match ins.get(3) {
                    Some(Some(Value::Device(m))) => Some(m),
                    _ => None,
                };
                let mstr = match mask {
                    Some(m) => broadcast_strides(&m.shape, &[b, h, s, t]).map_err(bad)?,
                    None => vec![0; 4],
                };
                let mut y = self.alloc(n_out)?;
                let dims = [b as i32, h as i32, hk as i32, s as i32, t as i32, d as i32];
                let ms: Vec<i64> = mstr.iter().map(|&v| v as i64).collect();
                let null = 0u64;
                let func = f("patch_attention_f32")?;
                let mut l = stream.launch_builder(func);
                l.arg(&*q.buf).arg(&*k.buf).arg(&*v.buf);
                match mask {
                    Some(m) => l.arg(&*m.buf),
                    None => l.arg(&null),
                };
                l.arg(&mut y);
                for dim in &dims {
                    l.arg(dim);
                }
                for st in &ms {
                    l.arg(st);
                }
                l.arg(scale);
                let cfg = LaunchConfig {
                    grid_dim: (s as u32, h as u32, b as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: (t * 4) as u32,
                };
                // SAFETY: matches `patch_attention_f32`; shapes checked above, the mask
                // strides come from `broadcast_strides` against [b, h, s, t].
                unsafe { l.launch(cfg) }?;
                let y = DeviceTensor {
                    buf: Arc::new(y),
                    shape: head_major_shape,
                };
                if *seq_major {
                    self.swap_axes_12(&y).map_err(|e| bad(e.to_string()))?
                } else {
                    y
                }
            }
            Kind::Gather => {
                let table = dev(0)?;
                let (rows, row_len) = (table.shape[0], table.shape[1]);
                let idx = host(1)?.to_i64_vec()?;
                let mut ids = Vec::with_capacity(idx.len());
                for &i in &idx {
                    let j = if i < 0 { i + rows as i64 } else { i };
                    if !(0..rows as i64).contains(&j) {
                        return Err(bad(format!("index {i} is out of range for {rows} rows")));
                    }
                    ids.push(j);
                }
                if ids.is_empty() {
                    ids.push(0);
                }
                let ids_dev = stream.clone_htod(&ids)?;
                let mut y = self.alloc(n_out)?;
                let (n_ids, rl) = (idx.len() as i64, row_len as i64);
                let func = f("patch_gather_rows_f32")?;
                let mut l = stream.launch_builder(func);
                l.arg(&*table.buf)
                    .arg(&ids_dev)
                    .arg(&mut y)
                    .arg(&n_ids)
                    .arg(&rl);
                // SAFETY: matches `patch_gather_rows_f32`; ids were range-checked above.
                unsafe { l.launch(grid_1d(n_out)) }?;
                DeviceTensor {
                    buf: Arc::new(y),
                    shape: out_shape,
                }
            }
            Kind::Concat => {
                let r = out_shape.len();
                let axis = node
                    .attrs
                    .req_int("axis")
                    .ok()
                    .and_then(|a| norm_axis(a, r))
                    .ok_or_else(|| bad("Concat axis out of range".into()))?;
                let outer: usize = out_shape[..axis].iter().product();
                let inner_y: usize = out_shape[axis..].iter().product();
                let mut y = self.alloc(n_out)?;
                let mut offset = 0usize;
                for i in 0..node.inputs.len() {
                    let x = dev(i)?;
                    let inner_x: usize = x.shape[axis.min(x.shape.len())..].iter().product();
                    if x.is_empty() {
                        continue;
                    }
                    let args = [outer as i64, inner_x as i64, inner_y as i64, offset as i64];
                    let func = f("patch_concat_copy_b32")?;
                    let mut l = stream.launch_builder(func);
                    l.arg(&*x.buf).arg(&mut y);
                    for a in &args {
                        l.arg(a);
                    }
                    // SAFETY: matches `patch_concat_copy_b32`; offset + inner_x ≤ inner_y.
                    unsafe { l.launch(grid_1d(outer * inner_x)) }?;
                    offset += inner_x;
                }
                DeviceTensor {
                    buf: Arc::new(y),
                    shape: out_shape,
                }
            }
            Kind::Transpose { perm } => {
                let x = dev(0)?;
                let r = x.shape.len();
                let perm: Vec<usize> = match perm {
                    Some(p) => p
                        .iter()
                        .map(|&a| norm_axis(a, r))
                        .collect::<Option<_>>()
                        .ok_or_else(|| bad(format!("bad perm {p:?}")))?,
                    None => (0..r).rev().collect(),
                };
                let mut strides = vec![0usize; r];
                let mut acc = 1;
                for a in (0..r).rev() {
                    strides[a] = acc;
                    acc *= x.shape[a];
                }
                let sa: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
                self.strided_copy(x, &out_shape, &sa)
                    .map_err(|e| bad(e.to_string()))?
            }
            Kind::Expand => {
                let x = dev(0)?;
                let sa = broadcast_strides(&x.shape, &out_shape).map_err(bad)?;
                self.strided_copy(x, &out_shape, &sa)
                    .map_err(|e| bad(e.to_string()))?
            }
        };
        // Every device kind has exactly one output (see `device_kind`).
        Ok(vec![Value::Device(result)])
    }

    /// `[a, b, c, d]` → `[a, c, b, d]` (a copy).
    fn swap_axes_12(&self, x: &DeviceTensor) -> Result<DeviceTensor, CudaError> {
        let &[a, b, c, d] = x.shape.as_slice() else {
            return Err(CudaError::Driver(format!(
                "an axis swap needs rank 4, got {:?}",
                x.shape
            )));
        };
        self.strided_copy(x, &[a, c, b, d], &[b * c * d, d, c * d, 1])
    }

    /// `y[i] = x[Σ idx·sa]` over the row-major space `shape`.
    fn strided_copy(
        &self,
        x: &DeviceTensor,
        shape: &[usize],
        sa: &[usize],
    ) -> Result<DeviceTensor, CudaError> {
        let n: usize = shape.iter().product();
        let s = Bcast6::new(shape, sa, &[]).map_err(CudaError::Driver)?;
        let mut y = self.alloc(n)?;
        let n64 = n as i64;
        let func = self.dev.function("patch_strided_copy_b32")?;
        let mut l = self.dev.stream().launch_builder(func);
        l.arg(&*x.buf).arg(&mut y).arg(&n64).arg(&s);
        // SAFETY: matches `patch_strided_copy_b32`; offsets stay inside x by construction.
        unsafe { l.launch(grid_1d(n)) }?;
        Ok(DeviceTensor {
            buf: Arc::new(y),
            shape: shape.to_vec(),
        })
    }
}

impl DeviceHybrid {
    /// Uploads a packed weight: its values and metadata as they are, plus one descriptor per
    /// tile.
    pub fn upload(dev: &CudaDevice, w: &PackedWeight) -> Result<DeviceHybrid, CudaError> {
        let stream = dev.stream();
        let descs = tile_descs(w);
        let values = stream.clone_htod(w.values())?;
        let meta = if w.meta().is_empty() {
            stream.alloc_zeros::<u32>(1)?
        } else {
            stream.clone_htod(w.meta())?
        };
        let tiles = stream.clone_htod(bytemuck::cast_slice::<_, u8>(&descs))?;
        Ok(DeviceHybrid {
            values,
            meta,
            tiles,
            dtype: w.dtype(),
            k: w.k(),
            n: w.n(),
            k_tiles: w.tile_map().k_tiles(),
            n_tiles: w.tile_map().n_tiles(),
            tile_n: w.tile_shape().n,
        })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// `x · W (+ bias)` for `x` of `m · k` elements, as a new `[m, n]` device tensor.
    pub fn matmul(
        &self,
        dev: &CudaDevice,
        x: &DeviceTensor,
        bias: Option<&DeviceTensor>,
    ) -> Result<DeviceTensor, CudaError> {
        let m = x.len() / self.k.max(1);
        if m * self.k != x.len() {
            return Err(CudaError::Driver(format!(
                "hybrid product: X {:?} is not a whole number of rows of {}",
                x.shape, self.k
            )));
        }
        // SAFETY: `launch` writes every element of y.
        let mut y = unsafe { dev.stream().alloc::<f32>((m * self.n).max(1)) }?;
        self.launch(dev, x, bias, None, &mut y, m)?;
        Ok(DeviceTensor {
            buf: Arc::new(y),
            shape: vec![m, self.n],
        })
    }

    /// `y[m, n] = x[m, k] · W (+ bias) (+ residual)`: tensor cores from 9 rows on 16-bit weights, the
    /// CUDA-core GEMV kernel (plus the fixed-order reduction) otherwise.
    pub fn launch(
        &self,
        dev: &CudaDevice,
        x: &DeviceTensor,
        bias: Option<&DeviceTensor>,
        residual: Option<&DeviceTensor>,
        y: &mut CudaSlice<f32>,
        m: usize,
    ) -> Result<(), CudaError> {
        let w = self;
        let stream = dev.stream();
        let null = 0u64;
        let (m32, k32, n32) = (m as i32, w.k as i32, w.n as i32);
        let (kt, nt, tn) = (w.k_tiles as i32, w.n_tiles as i32, w.tile_n as i32);
        if m > GEMV_MAX_ROWS && w.dtype != WeightDtype::F32 {
            let col_blocks = w.n_tiles * w.tile_n.div_ceil(16);
            let name = match w.dtype {
                WeightDtype::Bf16 => "patch_hybrid_mma_bf16",
                _ => "patch_hybrid_mma_f16",
            };
            let func = dev.function(name)?;
            let mut l = stream.launch_builder(func);
            l.arg(&*x.buf).arg(&w.values).arg(&w.meta).arg(&w.tiles);
            for t in [bias, residual] {
                match t {
                    Some(t) => l.arg(&*t.buf),
                    None => l.arg(&null),
                };
            }
            l.arg(y)
                .arg(&m32)
                .arg(&k32)
                .arg(&n32)
                .arg(&kt)
                .arg(&nt)
                .arg(&tn);
            let cfg = LaunchConfig {
                grid_dim: (col_blocks.div_ceil(4) as u32, m.div_ceil(32) as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `patch_hybrid_mma_*`; the tile descriptors were built from the
            // same packed weight whose values and metadata were uploaded.
            unsafe { l.launch(cfg) }?;
            return Ok(());
        }
        // SAFETY: the GEMV kernel writes every partial (see below) before the reduction reads it.
        let mut partials = unsafe { stream.alloc::<f32>((w.k_tiles * m * w.n).max(1)) }?;
        let name = match w.dtype {
            WeightDtype::F32 => "patch_hybrid_gemv_f32",
            WeightDtype::Bf16 => "patch_hybrid_gemv_bf16",
            WeightDtype::F16 => "patch_hybrid_gemv_f16",
        };
        let func = dev.function(name)?;
        let mut l = stream.launch_builder(func);
        l.arg(&*x.buf)
            .arg(&w.values)
            .arg(&w.meta)
            .arg(&w.tiles)
            .arg(&mut partials);
        l.arg(&m32).arg(&k32).arg(&n32).arg(&kt).arg(&tn);
        let cfg = LaunchConfig {
            grid_dim: (
                (w.n_tiles * w.tile_n.div_ceil(32)) as u32,
                w.k_tiles as u32,
                m.div_ceil(8) as u32,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `patch_hybrid_gemv_*`; partials holds k_tiles·m·n floats, every one
        // written (each (tile row, token, column) by exactly one thread).
        unsafe { l.launch(cfg) }?;
        let mn = (m * w.n) as i64;
        let func = dev.function("patch_hybrid_reduce")?;
        let mut l = stream.launch_builder(func);
        l.arg(&partials);
        for t in [bias, residual] {
            match t {
                Some(t) => l.arg(&*t.buf),
                None => l.arg(&null),
            };
        }
        l.arg(y).arg(&kt).arg(&mn).arg(&n32);
        // SAFETY: matches `patch_hybrid_reduce`.
        unsafe { l.launch(grid_1d(m * w.n)) }?;
        Ok(())
    }
}

/// Uploads the packed weight of a `patch.HybridMatMul` node (inputs 1 and 2 are constants).
fn upload_weight(
    dev: &CudaDevice,
    node: &Node,
    consts: &[Option<Tensor>],
) -> Result<DeviceHybrid, CudaError> {
    let konst = |i: usize| {
        node.inputs
            .get(i)
            .copied()
            .flatten()
            .and_then(|id| consts[id.0 as usize].as_ref())
            .ok_or_else(|| node_err(node, format!("input {i} (packed weight) is not a constant")))
    };
    let op = HybridMatMul::from_attrs(&node.attrs)
        .map_err(|e| crate::RuntimeError::at_node(&node.name, &node.op_type, e))?;
    let w = op
        .weight(konst(1)?, konst(2)?)
        .map_err(|e| crate::RuntimeError::at_node(&node.name, &node.op_type, e))?;
    DeviceHybrid::upload(dev, &w)
}
