//! The typed dataflow IR.
//!
//! A [`Graph`] owns values (graph inputs, constants and node outputs) and nodes. Every value
//! has a [`TensorType`] (dtype and symbolic shape) and, for small integer tensors such as
//! shapes, possibly a symbolic content (`sym`) that shape inference propagates. Nodes are kept
//! in a topological order; every node is built through the op registry from its
//! `(domain, op_type, attrs)`, so the attributes are the single source of truth for what it
//! does and the text form can print them.

pub mod attr;
pub mod parser;
mod printer;
mod verify;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

pub use attr::{Attr, Attrs};

use crate::dim::{shape_to_string, Shape};
use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::infer;
use crate::ops::{Op, OpRegistry};
use crate::tensor::Tensor;

/// Constants up to this size are copied when misaligned (see [`Graph::add_const`]).
const SMALL_CONST_BYTES: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// Element type and symbolic shape of a value.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, shape_to_string(&self.shape))
    }
}

impl fmt::Debug for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a graph input means to a generation loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputRole {
    TokenIds,
    AttentionMask,
    PositionIds,
    PastKey(usize),
    PastValue(usize),
    Other,
}

/// What a graph output means to a generation loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutputRole {
    Logits,
    PresentKey(usize),
    PresentValue(usize),
    Other,
}

impl InputRole {
    /// The role conventionally meant by an exported input's name (Hugging Face / Optimum).
    pub fn from_name(name: &str) -> InputRole {
        if let Some(layer) = layer_suffix(name, &["past_key_values.", "past_key_values_"], "key") {
            return InputRole::PastKey(layer);
        }
        if let Some(layer) = layer_suffix(name, &["past_key_values.", "past_key_values_"], "value")
        {
            return InputRole::PastValue(layer);
        }
        match name {
            "input_ids" => InputRole::TokenIds,
            "attention_mask" => InputRole::AttentionMask,
            "position_ids" => InputRole::PositionIds,
            _ => InputRole::Other,
        }
    }

    /// Inverse of [`InputRole::label`].
    pub fn from_label(label: &str) -> Option<InputRole> {
        Some(match label {
            "ids" => InputRole::TokenIds,
            "mask" => InputRole::AttentionMask,
            "positions" => InputRole::PositionIds,
            "other" => InputRole::Other,
            _ => {
                let (kind, layer) = label.split_once('.')?;
                let layer = layer.parse().ok()?;
                match kind {
                    "past_key" => InputRole::PastKey(layer),
                    "past_value" => InputRole::PastValue(layer),
                    _ => return None,
                }
            }
        })
    }

    pub fn label(self) -> String {
        match self {
            InputRole::TokenIds => "ids".into(),
            InputRole::AttentionMask => "mask".into(),
            InputRole::PositionIds => "positions".into(),
            InputRole::PastKey(l) => format!("past_key.{l}"),
            InputRole::PastValue(l) => format!("past_value.{l}"),
            InputRole::Other => "other".into(),
        }
    }
}

impl OutputRole {
    pub fn from_name(name: &str) -> OutputRole {
        if let Some(layer) = layer_suffix(name, &["present.", "present_"], "key") {
            return OutputRole::PresentKey(layer);
        }
        if let Some(layer) = layer_suffix(name, &["present.", "present_"], "value") {
            return OutputRole::PresentValue(layer);
        }
        match name {
            "logits" => OutputRole::Logits,
            _ => OutputRole::Other,
        }
    }

    /// Inverse of [`OutputRole::label`].
    pub fn from_label(label: &str) -> Option<OutputRole> {
        Some(match label {
            "logits" => OutputRole::Logits,
            "other" => OutputRole::Other,
            _ => {
                let (kind, layer) = label.split_once('.')?;
                let layer = layer.parse().ok()?;
                match kind {
                    "present_key" => OutputRole::PresentKey(layer),
                    "present_value" => OutputRole::PresentValue(layer),
                    _ => return None,
                }
            }
        })
    }

    pub fn label(self) -> String {
        match self {
            OutputRole::Logits => "logits".into(),
            OutputRole::PresentKey(l) => format!("present_key.{l}"),
            OutputRole::PresentValue(l) => format!("present_value.{l}"),
            OutputRole::Other => "other".into(),
        }
    }
}

/// Parses `<prefix><layer>.<kind>` (or `_<kind>`), e.g. `past_key_values.3.key`.
fn layer_suffix(name: &str, prefixes: &[&str], kind: &str) -> Option<usize> {
    prefixes.iter().find_map(|p| {
        let rest = name.strip_prefix(p)?;
        let (layer, tail) = rest.split_once(['.', '_'])?;
        (tail == kind).then(|| layer.parse().ok())?
    })
}

/// Where a value comes from.
#[derive(Clone, Debug)]
pub enum Def {
    /// The i-th graph input.
    Input(usize),
    /// A constant tensor (an initializer or a folded value).
    Const(Tensor),
    /// Output `index` of a node.
    Node(NodeId, usize),
    /// A constant that nothing uses any more, detached so it is neither stored nor printed;
    /// its id stays valid (ids are arena indices) but it is no longer defined.
    Detached,
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub ty: TensorType,
    /// Symbolic content of a small integer tensor (a shape, an index), row-major.
    pub sym: Option<Vec<crate::Dim>>,
    pub def: Def,
}

#[derive(Clone)]
pub struct Node {
    pub name: String,
    pub domain: String,
    pub op_type: String,
    pub attrs: Attrs,
    pub op: Arc<dyn Op>,
    /// `None` marks an omitted optional input.
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<ValueId>,
}

impl Node {
    /// The op type, qualified by its domain outside the default one (`patch.Attention`).
    pub fn qualified_op_type(&self) -> String {
        if self.domain.is_empty() {
            self.op_type.clone()
        } else {
            format!("{}.{}", self.domain, self.op_type)
        }
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Node({} {})", self.op_type, self.name)
    }
}

/// A typed dataflow graph (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    /// Default-domain opset the graph was imported at.
    pub opset: i64,
    values: Vec<Value>,
    nodes: Vec<Option<Node>>,
    /// Node ids in topological order (removed nodes are dropped from it).
    order: Vec<NodeId>,
    inputs: Vec<(ValueId, InputRole)>,
    outputs: Vec<(ValueId, OutputRole)>,
    by_name: HashMap<String, ValueId>,
}

impl Graph {
    pub fn new(name: impl Into<String>, opset: i64) -> Graph {
        Graph {
            name: name.into(),
            opset,
            ..Graph::default()
        }
    }

    fn push_value(&mut self, value: Value) -> Result<ValueId, RuntimeError> {
        if self.by_name.contains_key(&value.name) {
            return Err(RuntimeError::Redefined(value.name));
        }
        let id = ValueId(self.values.len() as u32);
        self.by_name.insert(value.name.clone(), id);
        self.values.push(value);
        Ok(id)
    }

    pub fn add_input(
        &mut self,
        name: impl Into<String>,
        ty: TensorType,
        role: InputRole,
    ) -> Result<ValueId, RuntimeError> {
        let index = self.inputs.len();
        let id = self.push_value(Value {
            name: name.into(),
            ty,
            sym: None,
            def: Def::Input(index),
        })?;
        self.inputs.push((id, role));
        Ok(id)
    }

    /// Adds a constant. Small misaligned constants are aligned here (shape operands, read
    /// often); large ones stay borrowed and are aligned at use.
    pub fn add_const(
        &mut self,
        name: impl Into<String>,
        t: Tensor,
    ) -> Result<ValueId, RuntimeError> {
        let t = if t.bytes().len() <= SMALL_CONST_BYTES {
            t.to_aligned()
        } else {
            t
        };
        let ty = TensorType::new(t.dtype(), crate::dim::shape_of(t.shape()));
        let sym = infer::sym_of_const(&t);
        self.push_value(Value {
            name: name.into(),
            ty,
            sym,
            def: Def::Const(t),
        })
    }

    /// Adds a node after all existing ones, building its op through `registry` and inferring
    /// its output types. Inputs must already be defined, which keeps the order topological.
    #[allow(clippy::too_many_arguments)]
    pub fn add_node(
        &mut self,
        registry: &OpRegistry,
        name: impl Into<String>,
        domain: &str,
        op_type: &str,
        attrs: Attrs,
        inputs: Vec<Option<ValueId>>,
        output_names: Vec<String>,
    ) -> Result<Vec<ValueId>, RuntimeError> {
        let name = name.into();
        let opset = if domain.is_empty() || domain == "ai.onnx" {
            self.opset
        } else {
            1
        };
        let op = registry.build(domain, op_type, opset, &attrs, &name)?;
        for v in inputs.iter().flatten() {
            if v.0 as usize >= self.values.len() {
                return Err(RuntimeError::Undefined(format!("#{}", v.0)));
            }
        }
        let inferred = infer::infer_node(self, &name, op_type, op.as_ref(), &inputs)?;
        if inferred.len() < output_names.len() {
            return Err(RuntimeError::at_node(
                &name,
                op_type,
                crate::OpError::Invalid(format!(
                    "the node declares {} outputs but the op produces {}",
                    output_names.len(),
                    inferred.len()
                )),
            ));
        }
        let id = NodeId(self.nodes.len() as u32);
        let mut outputs = Vec::with_capacity(output_names.len());
        for (index, (out_name, fact)) in output_names.into_iter().zip(inferred).enumerate() {
            outputs.push(self.push_value(Value {
                name: out_name,
                ty: fact.ty,
                sym: fact.sym,
                def: Def::Node(id, index),
            })?);
        }
        self.nodes.push(Some(Node {
            name,
            domain: domain.to_string(),
            op_type: op_type.to_string(),
            attrs,
            op,
            inputs,
            outputs: outputs.clone(),
        }));
        self.order.push(id);
        Ok(outputs)
    }

    /// [`add_node`](Self::add_node), placed in the order right before node `before` instead of
    /// last. Its inputs must be defined before `before`.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_node_before(
        &mut self,
        registry: &OpRegistry,
        before: NodeId,
        name: impl Into<String>,
        domain: &str,
        op_type: &str,
        attrs: Attrs,
        inputs: Vec<Option<ValueId>>,
        output_names: Vec<String>,
    ) -> Result<Vec<ValueId>, RuntimeError> {
        let at = self
            .order
            .iter()
            .position(|&n| n == before)
            .ok_or_else(|| RuntimeError::Verify(format!("node #{} is not live", before.0)))?;
        let outputs =
            self.add_node(registry, name, domain, op_type, attrs, inputs, output_names)?;
        let id = self.order.pop().expect("add_node appended it");
        self.order.insert(at, id);
        Ok(outputs)
    }

    /// Replaces the node order by `order`, which must hold every live node once, each after
    /// the producers of its inputs (the graph is unchanged otherwise).
    pub fn set_order(&mut self, order: Vec<NodeId>) -> Result<(), RuntimeError> {
        let bad = |msg: String| Err(RuntimeError::Verify(format!("new node order: {msg}")));
        if order.len() != self.order.len() {
            return bad(format!("{} nodes for {}", order.len(), self.order.len()));
        }
        let mut placed = vec![false; self.nodes.len()];
        for &id in &order {
            let Some(Some(node)) = self.nodes.get(id.0 as usize) else {
                return bad(format!("node #{} is not live", id.0));
            };
            if std::mem::replace(&mut placed[id.0 as usize], true) {
                return bad(format!("node `{}` appears twice", node.name));
            }
            for input in node.inputs.iter().flatten() {
                if let Def::Node(p, _) = self.values[input.0 as usize].def {
                    if !placed[p.0 as usize] {
                        return bad(format!(
                            "node `{}` reads `{}` before it is computed",
                            node.name, self.values[input.0 as usize].name
                        ));
                    }
                }
            }
        }
        self.order = order;
        Ok(())
    }

    /// Gives value `id` a new name, which no other value may have.
    pub fn rename_value(
        &mut self,
        id: ValueId,
        name: impl Into<String>,
    ) -> Result<(), RuntimeError> {
        let name = name.into();
        if self.by_name.contains_key(&name) {
            return Err(RuntimeError::Redefined(name));
        }
        let old = std::mem::replace(&mut self.values[id.0 as usize].name, name.clone());
        self.by_name.remove(&old);
        self.by_name.insert(name, id);
        Ok(())
    }

    pub fn set_outputs(&mut self, outputs: Vec<(ValueId, OutputRole)>) {
        self.outputs = outputs;
    }

    pub fn inputs(&self) -> &[(ValueId, InputRole)] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[(ValueId, OutputRole)] {
        &self.outputs
    }

    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.0 as usize]
    }

    pub fn value_mut(&mut self, id: ValueId) -> &mut Value {
        &mut self.values[id.0 as usize]
    }

    pub fn value_count(&self) -> usize {
        self.values.len()
    }

    pub fn value_by_name(&self, name: &str) -> Option<ValueId> {
        self.by_name.get(name).copied()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes[id.0 as usize]
            .as_ref()
            .expect("node was removed")
    }

    /// Node ids in topological order.
    pub fn order(&self) -> &[NodeId] {
        &self.order
    }

    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.order.iter().map(|&id| (id, self.node(id)))
    }

    pub fn node_count(&self) -> usize {
        self.order.len()
    }

    /// The constant tensor of a value, if it is one.
    pub fn const_value(&self, id: ValueId) -> Option<&Tensor> {
        match &self.value(id).def {
            Def::Const(t) => Some(t),
            _ => None,
        }
    }

    /// All constants with their ids, in definition order.
    pub fn consts(&self) -> impl Iterator<Item = (ValueId, &Tensor)> {
        self.values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match &v.def {
                Def::Const(t) => Some((ValueId(i as u32), t)),
                _ => None,
            })
    }

    /// Number of uses of each value by live nodes and graph outputs.
    pub fn use_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.values.len()];
        for (_, node) in self.nodes() {
            for v in node.inputs.iter().flatten() {
                counts[v.0 as usize] += 1;
            }
        }
        for (v, _) in &self.outputs {
            counts[v.0 as usize] += 1;
        }
        counts
    }

    /// Replaces node `id`'s op and inputs, keeping its name, position and outputs. The new op
    /// must infer the same output types, so that no user of the outputs is affected. Inputs
    /// that are not constants or graph inputs must be defined before the node.
    #[allow(clippy::too_many_arguments)]
    pub fn replace_node(
        &mut self,
        registry: &OpRegistry,
        id: NodeId,
        domain: &str,
        op_type: &str,
        attrs: Attrs,
        inputs: Vec<Option<ValueId>>,
    ) -> Result<(), RuntimeError> {
        let node = self.node(id);
        let name = node.name.clone();
        let opset = if domain.is_empty() || domain == "ai.onnx" {
            self.opset
        } else {
            1
        };
        let op = registry.build(domain, op_type, opset, &attrs, &name)?;
        let inferred = infer::infer_node(self, &name, op_type, op.as_ref(), &inputs)?;
        let outputs = self.node(id).outputs.clone();
        if inferred.len() < outputs.len() {
            return Err(RuntimeError::Verify(format!(
                "replacing node `{name}` with {op_type}: it produces {} outputs, the node has {}",
                inferred.len(),
                outputs.len()
            )));
        }
        for (out, fact) in outputs.iter().zip(&inferred) {
            let v = self.value(*out);
            if v.ty != fact.ty {
                return Err(RuntimeError::Verify(format!(
                    "replacing node `{name}` with {op_type}: output `{}` was {} and would be {}",
                    v.name, v.ty, fact.ty
                )));
            }
        }
        let node = self.nodes[id.0 as usize]
            .as_mut()
            .expect("node was removed");
        node.domain = domain.to_string();
        node.op_type = op_type.to_string();
        node.attrs = attrs;
        node.op = op;
        node.inputs = inputs;
        Ok(())
    }

    /// Replaces node `id` by constants: its output `i` becomes `values[i]`, which must have the
    /// output's recorded type; the node is removed. Used by constant folding.
    pub fn fold_node(&mut self, id: NodeId, values: Vec<Tensor>) -> Result<(), RuntimeError> {
        let node = self.node(id);
        let name = node.name.clone();
        let outputs = node.outputs.clone();
        if values.len() != outputs.len() {
            return Err(RuntimeError::Verify(format!(
                "folding node `{name}`: {} values for {} outputs",
                values.len(),
                outputs.len()
            )));
        }
        for (out, t) in outputs.iter().zip(&values) {
            let ty = &self.value(*out).ty;
            let same_shape = ty.shape.len() == t.rank()
                && ty
                    .shape
                    .iter()
                    .zip(t.shape())
                    .all(|(d, &n)| d.as_const() == Some(n as i64));
            if ty.dtype != t.dtype() || !same_shape {
                return Err(RuntimeError::Verify(format!(
                    "folding node `{name}`: output `{}` is {ty} but the folded value is {}{:?}",
                    self.value(*out).name,
                    t.dtype(),
                    t.shape()
                )));
            }
        }
        for (out, t) in outputs.into_iter().zip(values) {
            let t = if t.bytes().len() <= SMALL_CONST_BYTES {
                t.to_aligned()
            } else {
                t
            };
            let v = self.value_mut(out);
            v.sym = infer::sym_of_const(&t);
            v.def = Def::Const(t);
        }
        self.remove_node(id);
        Ok(())
    }

    /// Makes every node input and graph output that reads `old` read `new` instead; returns
    /// how many uses moved. `new` must be defined before every user of `old` (a graph input,
    /// a constant, or a value computed before `old`'s producer).
    pub fn replace_uses(&mut self, old: ValueId, new: ValueId) -> usize {
        let mut moved = 0;
        for node in self.nodes.iter_mut().flatten() {
            for input in node.inputs.iter_mut().flatten() {
                if *input == old {
                    *input = new;
                    moved += 1;
                }
            }
        }
        for (out, _) in self.outputs.iter_mut() {
            if *out == old {
                *out = new;
                moved += 1;
            }
        }
        moved
    }

    /// Detaches every constant that no node and no graph output uses (see [`Def::Detached`]);
    /// returns how many.
    pub fn detach_unused_consts(&mut self) -> usize {
        let uses = self.use_counts();
        let mut detached = 0;
        for (i, v) in self.values.iter_mut().enumerate() {
            if uses[i] == 0 && matches!(v.def, Def::Const(_)) {
                v.def = Def::Detached;
                v.sym = None;
                self.by_name.remove(&v.name);
                detached += 1;
            }
        }
        detached
    }

    /// Removes a node whose outputs are unused. Its output values stay in the arena, unused.
    pub fn remove_node(&mut self, id: NodeId) {
        self.nodes[id.0 as usize] = None;
        self.order.retain(|&n| n != id);
    }

    /// The stable text form (see [`printer`]).
    pub fn to_text(&self) -> String {
        printer::print(self)
    }

    /// Reads the text form back (see [`parser`]): the structure, types and small constants
    /// of the printed graph, its large constants as zeros.
    pub fn parse_text(text: &str, registry: &OpRegistry) -> Result<Graph, parser::ParseError> {
        parser::parse(text, registry)
    }

    /// Checks the graph's invariants (see [`verify`]), naming the first violation.
    pub fn verify(&self, registry: &OpRegistry) -> Result<(), RuntimeError> {
        verify::verify(self, registry)
    }

    /// Number of scalar elements in constants (the parameter count of a model).
    pub fn const_elements(&self) -> usize {
        self.consts().map(|(_, t)| t.len()).sum()
    }

    /// The model's parameters: the elements of its constants, with each packed hybrid weight
    /// (`patch.HybridMatMul`'s value bytes and metadata words) counted as the `k × n` matrix
    /// it stands for, once however many nodes read it.
    pub fn parameter_count(&self) -> usize {
        let mut packed = std::collections::BTreeSet::new();
        let mut matrices = 0usize;
        for (_, node) in self.nodes() {
            if node.domain != crate::ops::hybrid::DOMAIN
                || node.op_type != crate::ops::hybrid::OP_TYPE
            {
                continue;
            }
            let Some(Some(values)) = node.inputs.get(1) else {
                continue;
            };
            if packed.insert(*values) {
                let dim = |name: &str| node.attrs.int(name).ok().flatten().unwrap_or(0).max(0);
                matrices += (dim("k") * dim("n")) as usize;
            }
            if let Some(Some(meta)) = node.inputs.get(2) {
                packed.insert(*meta);
            }
        }
        let rest: usize = self
            .consts()
            .filter(|(id, _)| !packed.contains(id))
            .map(|(_, t)| t.len())
            .sum();
        rest + matrices
    }
}
