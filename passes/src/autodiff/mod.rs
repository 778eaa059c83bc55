//! Reverse-mode differentiation as a graph-to-graph pass.
//!
//! [`Differentiate`] appends to a graph the nodes that compute the gradient of a scalar loss
//! value with respect to chosen values (graph inputs: mask-scaled weights, master weights,
//! activations), and adds each gradient as a graph output named `grad/<value>`. The backward
//! nodes are ordinary registry ops (`MatMul`, `Gemm`, `patch.AttentionGrad`, ...), so the
//! existing executor, memory plan and kernels run forward and backward alike, and the result
//! prints, verifies and snapshots like any graph.
//!
//! Each op type has one backward rule in [`rules`], looked up by `(domain, op_type)` in a
//! [`GradRules`] registry (the counterpart of the op registry). A rule receives the gradients
//! of the node's outputs and returns those of the inputs that need one; the pass sums the
//! contributions of values read by several nodes. Only values on a path from a `wrt` value to
//! the loss are differentiated, so constants, masks and the rotary tables need no rule.

pub mod rules;

use std::collections::{BTreeMap, HashMap, HashSet};

use patch_runtime::ir::{Attrs, Node, OutputRole};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{DType, Graph, NodeId, OpError, RuntimeError, Tensor, ValueId};

use crate::Pass;

/// A backward rule: given the node and the gradients of its outputs (`None`: the output does
/// not reach the loss), returns one entry per node input, `Some` for every input whose
/// `needs[i]` is set.
pub type GradRule =
    fn(&mut GradCtx<'_>, &Node, &[Option<ValueId>]) -> Result<Vec<Option<ValueId>>, RuntimeError>;

/// Backward rules by `(domain, op_type)` (`""` is the ONNX default domain).
#[derive(Clone, Default)]
pub struct GradRules {
    rules: BTreeMap<(String, String), GradRule>,
}

impl GradRules {
    /// Every rule this crate has (see [`rules`]).
    pub fn standard() -> GradRules {
        let mut r = GradRules::default();
        rules::register(&mut r);
        r
    }

    pub fn register(&mut self, domain: &str, op_type: &str, rule: GradRule) {
        self.rules
            .insert((domain.to_string(), op_type.to_string()), rule);
    }

    pub fn get(&self, domain: &str, op_type: &str) -> Option<GradRule> {
        let domain = if domain == "ai.onnx" { "" } else { domain };
        self.rules
            .get(&(domain.to_string(), op_type.to_string()))
            .copied()
    }

    /// `(domain, op_type)` of every rule, sorted.
    pub fn list(&self) -> Vec<(String, String)> {
        self.rules.keys().cloned().collect()
    }
}

/// What a rule builds its nodes with: the graph being extended and the op registry, plus
/// which inputs of the current node need a gradient.
pub struct GradCtx<'a> {
    pub graph: &'a mut Graph,
    pub registry: &'a OpRegistry,
    /// `needs[i]`: input `i` of the node being differentiated lies on a path from a `wrt`
    /// value (its gradient is wanted).
    pub needs: Vec<bool>,
    /// Prefix of the names of the nodes built for the current node.
    prefix: String,
    counter: usize,
}

impl GradCtx<'_> {
    fn fresh(&mut self, what: &str) -> String {
        self.counter += 1;
        let mut name = format!("{}/{what}{}", self.prefix, self.counter);
        while self.graph.value_by_name(&name).is_some() {
            self.counter += 1;
            name = format!("{}/{what}{}", self.prefix, self.counter);
        }
        name
    }

    /// Adds a node with `outputs` outputs and returns them.
    pub fn node(
        &mut self,
        domain: &str,
        op_type: &str,
        attrs: Attrs,
        inputs: Vec<Option<ValueId>>,
        outputs: usize,
    ) -> Result<Vec<ValueId>, RuntimeError> {
        let name = self.fresh(op_type);
        let outs = (0..outputs).map(|i| format!("{name}:{i}")).collect();
        self.graph
            .add_node(self.registry, name, domain, op_type, attrs, inputs, outs)
    }

    /// Adds a one-output default-domain node.
    pub fn op(
        &mut self,
        op_type: &str,
        attrs: Attrs,
        inputs: &[ValueId],
    ) -> Result<ValueId, RuntimeError> {
        let inputs = inputs.iter().map(|v| Some(*v)).collect();
        Ok(self.node("", op_type, attrs, inputs, 1)?[0])
    }

    /// A constant.
    pub fn constant(&mut self, t: Tensor) -> Result<ValueId, RuntimeError> {
        let name = self.fresh("const");
        self.graph.add_const(name, t)
    }

    /// A 1-D i64 constant.
    pub fn ints(&mut self, v: &[i64]) -> Result<ValueId, RuntimeError> {
        self.constant(Tensor::from_vec(vec![v.len()], v.to_vec())?)
    }

    pub fn needs(&self, i: usize) -> bool {
        self.needs.get(i).copied().unwrap_or(false)
    }
}

/// Errors of a rule, naming the node.
pub fn rule_error(node: &Node, msg: impl Into<String>) -> RuntimeError {
    RuntimeError::at_node(
        &node.name,
        &node.qualified_op_type(),
        OpError::Invalid(msg.into()),
    )
}

/// The pass: gradients of `loss` with respect to `wrt` (value names), as graph outputs
/// `grad/<name>` (role `Other`) after the existing outputs.
#[derive(Clone, Debug)]
pub struct Differentiate {
    pub loss: String,
    pub wrt: Vec<String>,
}

impl Differentiate {
    pub fn new(loss: impl Into<String>, wrt: Vec<String>) -> Differentiate {
        Differentiate {
            loss: loss.into(),
            wrt,
        }
    }

    /// The name of the output that holds the gradient of `value`.
    pub fn grad_name(value: &str) -> String {
        format!("grad/{value}")
    }
}

impl Pass for Differentiate {
    fn name(&self) -> &'static str {
        "differentiate"
    }

    fn run(&self, graph: &mut Graph, registry: &OpRegistry) -> Result<bool, RuntimeError> {
        differentiate(
            graph,
            registry,
            &GradRules::standard(),
            &self.loss,
            &self.wrt,
        )?;
        Ok(true)
    }
}

/// Appends the backward graph (see the module docs); returns the gradient value of each
/// `wrt` name, in order.
pub fn differentiate(
    graph: &mut Graph,
    registry: &OpRegistry,
    rules: &GradRules,
    loss: &str,
    wrt: &[String],
) -> Result<Vec<ValueId>, RuntimeError> {
    let loss_id = graph
        .value_by_name(loss)
        .ok_or_else(|| RuntimeError::Undefined(loss.to_string()))?;
    let loss_ty = graph.value(loss_id).ty.clone();
    if loss_ty.dtype != DType::F32 || loss_ty.shape.iter().any(|d| d.as_const() != Some(1)) {
        return Err(RuntimeError::Verify(format!(
            "differentiate: the loss `{loss}` must be an f32 scalar, it is {loss_ty}"
        )));
    }
    let mut wrt_ids = Vec::with_capacity(wrt.len());
    for name in wrt {
        let id = graph
            .value_by_name(name)
            .ok_or_else(|| RuntimeError::Undefined(name.clone()))?;
        if graph.value(id).ty.dtype != DType::F32 {
            return Err(RuntimeError::Verify(format!(
                "differentiate: `{name}` is {}, only f32 values have gradients",
                graph.value(id).ty
            )));
        }
        wrt_ids.push(id);
    }
    let order: Vec<NodeId> = graph.order().to_vec();

    // Values that depend on a wrt value (forward) and reach the loss (backward). Only f32
    // values carry a gradient: a shape or an index computed from a wrt value does not (so a
    // mask built from `Shape(x)` is a constant of the differentiation).
    let mut depends: HashSet<ValueId> = wrt_ids.iter().copied().collect();
    for &n in &order {
        let node = graph.node(n);
        if node.inputs.iter().flatten().any(|v| depends.contains(v)) {
            let floats: Vec<ValueId> = node
                .outputs
                .iter()
                .copied()
                .filter(|&o| graph.value(o).ty.dtype == DType::F32)
                .collect();
            depends.extend(floats);
        }
    }
    let mut reaches: HashSet<ValueId> = HashSet::from([loss_id]);
    for &n in order.iter().rev() {
        let node = graph.node(n);
        if node.outputs.iter().any(|v| reaches.contains(v)) {
            reaches.extend(node.inputs.iter().flatten().copied());
        }
    }
    let active = |v: &ValueId| depends.contains(v) && reaches.contains(v);
    for (name, id) in wrt.iter().zip(&wrt_ids) {
        if !reaches.contains(id) {
            return Err(RuntimeError::Verify(format!(
                "differentiate: the loss `{loss}` does not depend on `{name}`"
            )));
        }
    }

    let seed = graph.add_const(
        format!("grad/{loss}/seed"),
        Tensor::from_vec(
            loss_ty
                .shape
                .iter()
                .map(|d| d.as_const().unwrap_or(1) as usize)
                .collect(),
            vec![1f32],
        )?,
    )?;
    // Gradient contributions per value, summed lazily.
    let mut grads: HashMap<ValueId, Vec<ValueId>> = HashMap::from([(loss_id, vec![seed])]);
    let mut sum_counter = 0usize;
    let mut total = |graph: &mut Graph,
                     grads: &mut HashMap<ValueId, Vec<ValueId>>,
                     v: ValueId|
     -> Result<Option<ValueId>, RuntimeError> {
        let Some(parts) = grads.remove(&v) else {
            return Ok(None);
        };
        let mut acc = parts[0];
        for &p in &parts[1..] {
            sum_counter += 1;
            let name = format!("grad/{}/sum{sum_counter}", graph.value(v).name);
            acc = graph.add_node(
                registry,
                name.clone(),
                "",
                "Add",
                Attrs::new(),
                vec![Some(acc), Some(p)],
                vec![name],
            )?[0];
        }
        grads.insert(v, vec![acc]);
        Ok(Some(acc))
    };

    for &n in order.iter().rev() {
        let node = graph.node(n).clone();
        if !node.outputs.iter().any(active) {
            continue;
        }
        let needs: Vec<bool> = node
            .inputs
            .iter()
            .map(|v| v.is_some_and(|v| active(&v)))
            .collect();
        if !needs.iter().any(|b| *b) {
            continue;
        }
        let mut out_grads = Vec::with_capacity(node.outputs.len());
        for &o in &node.outputs {
            out_grads.push(if active(&o) {
                total(graph, &mut grads, o)?
            } else {
                None
            });
        }
        if out_grads.iter().all(Option::is_none) {
            continue;
        }
        let rule = rules
            .get(&node.domain, &node.op_type)
            .ok_or_else(|| rule_error(&node, "no gradient rule for this op type"))?;
        let mut ctx = GradCtx {
            graph,
            registry,
            needs: needs.clone(),
            prefix: format!("grad/{}", node.name),
            counter: 0,
        };
        let in_grads = rule(&mut ctx, &node, &out_grads)?;
        for (i, need) in needs.iter().enumerate() {
            if !need {
                continue;
            }
            let g = in_grads.get(i).copied().flatten().ok_or_else(|| {
                rule_error(&node, format!("the rule gave no gradient for input {i}"))
            })?;
            let v = node.inputs[i].expect("needed inputs are present");
            grads.entry(v).or_default().push(g);
        }
    }

    let mut outputs: Vec<(ValueId, OutputRole)> = graph.outputs().to_vec();
    let mut result = Vec::with_capacity(wrt_ids.len());
    for (name, &id) in wrt.iter().zip(&wrt_ids) {
        let g = total(graph, &mut grads, id)?.ok_or_else(|| {
            RuntimeError::Verify(format!("differentiate: no gradient reached `{name}`"))
        })?;
        // The gradient output carries its own name: an Identity when `g` is shared or named
        // otherwise.
        let out_name = Differentiate::grad_name(name);
        let out = graph.add_node(
            registry,
            out_name.clone(),
            "",
            "Identity",
            Attrs::new(),
            vec![Some(g)],
            vec![out_name],
        )?[0];
        outputs.push((out, OutputRole::Other));
        result.push(out);
    }
    graph.set_outputs(outputs);
    Ok(result)
}
