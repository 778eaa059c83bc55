//! How much the language-model loss depends on each weight product's output: the diagonal of
//! the empirical Fisher of the loss with respect to every output channel of every prunable
//! MatMul, from gradients through the whole network.
//!
//! With the input statistics `H = E[x xᵀ]` of a product `y = x W`, the second-order model of
//! the loss change from a weight change `ΔW` is the Kronecker-factored one (K-FAC):
//! `ΔL ≈ ½ Σ_c F_c · ΔW[:, c]ᵀ H ΔW[:, c]`, `F_c = E[(∂L/∂y_c)²]`. The `F_c` computed here put
//! the reconstruction errors of every matrix in one unit, the loss, so a global tile
//! allocation can weigh a tile of one layer against a tile of another by its effect on the
//! model's output rather than by each matrix's own relative error.
//!
//! The loss is the mean next-token cross-entropy of a calibration window; its gradient with
//! respect to each product's output comes from the graph differentiated by
//! [`crate::autodiff`], so it is exact through attention, the norms and the LM head.

use patch_runtime::interp::Plan;
use patch_runtime::ir::{Attrs, InputRole, OutputRole};
use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, RuntimeError, Tensor, ValueId};

use crate::autodiff::{differentiate, GradRules};
use crate::hybrid::WeightMatMul;
use crate::Pass;

/// Name of the labels input the loss graph adds.
pub const LABELS: &str = "sensitivity/labels";

/// Output sensitivities accumulated over windows.
#[derive(Clone, Debug, Default)]
pub struct Sensitivity {
    /// Per target (in the order given to [`LossGradients::new`]), per output channel:
    /// `Σ_positions (∂L/∂y_c)²` summed over the windows, their mean after [`Sensitivity::finish`].
    pub fisher: Vec<Vec<f64>>,
    /// Mean cross-entropy over the windows, nats per token.
    pub loss: f64,
    pub windows: usize,
}

/// The model's graph with its cross-entropy loss and the gradients of that loss with respect
/// to every target's output, planned once and run per window.
pub struct LossGradients {
    plan: Plan,
    inputs: Vec<(ValueId, InputRole)>,
    labels: ValueId,
    graph: Graph,
    /// Output index of each target's gradient.
    grad_outputs: Vec<usize>,
    widths: Vec<usize>,
}

impl LossGradients {
    /// Builds the loss graph of `model` (a language model with a logits output) for
    /// `targets` (products of `model`). Fails when an op on the way from a target to the loss
    /// has no gradient rule: the error names it.
    pub fn new(
        model: &Graph,
        registry: &OpRegistry,
        targets: &[WeightMatMul],
    ) -> Result<LossGradients, RuntimeError> {
        let mut g = model.clone();
        let logits = g
            .outputs()
            .iter()
            .find(|(_, r)| *r == OutputRole::Logits)
            .map(|(v, _)| *v)
            .ok_or_else(|| RuntimeError::Verify("the model has no logits output".into()))?;
        let ids_ty = g
            .inputs()
            .iter()
            .find(|(_, r)| *r == InputRole::TokenIds)
            .map(|(v, _)| g.value(*v).ty.clone())
            .ok_or_else(|| RuntimeError::Verify("the model has no token-ids input".into()))?;
        let labels = g.add_input(LABELS, ids_ty, InputRole::Other)?;
        let loss = g.add_node(
            registry,
            "sensitivity/loss",
            "patch",
            "CrossEntropy",
            Attrs::new(),
            vec![Some(logits), Some(labels)],
            vec!["sensitivity/loss".into()],
        )?[0];
        g.set_outputs(vec![(loss, OutputRole::Other)]);
        let mut wrt = Vec::with_capacity(targets.len());
        let mut widths = Vec::with_capacity(targets.len());
        for t in targets {
            let out = g.node(t.node_id).outputs[0];
            wrt.push(g.value(out).name.clone());
            widths.push(t.n);
        }
        differentiate(
            &mut g,
            registry,
            &GradRules::standard(),
            "sensitivity/loss",
            &wrt,
        )?;
        crate::dce::DeadCodeElimination.run(&mut g, registry)?;
        g.verify(registry)?;
        let grad_outputs = (1..=targets.len()).collect();
        Ok(LossGradients {
            plan: Plan::new(&g)?,
            inputs: g.inputs().to_vec(),
            labels,
            graph: g,
            grad_outputs,
            widths,
        })
    }

    /// Graph inputs for one window of `ids`: the model's ([`window_feeds`]) and the labels,
    /// the next tokens with the last position ignored.
    fn feeds(&self, ids: &[i64]) -> Result<Vec<Tensor>, RuntimeError> {
        let mut feeds = window_feeds(&self.graph, ids)?;
        let mut labels = ids[1..].to_vec();
        labels.push(-100);
        let at = self
            .inputs
            .iter()
            .position(|&(id, _)| id == self.labels)
            .expect("the loss graph has its labels input");
        feeds[at] = Tensor::from_vec(vec![1, ids.len()], labels)?;
        Ok(feeds)
    }

    /// Runs one window and adds its squared output gradients to `acc`.
    pub fn observe(&self, ids: &[i64], acc: &mut Sensitivity) -> Result<(), RuntimeError> {
        if ids.len() < 2 {
            return Err(RuntimeError::Verify(
                "a sensitivity window needs at least 2 tokens".into(),
            ));
        }
        let out = self.plan.run(&self.feeds(ids)?)?;
        let loss = out[0].as_slice::<f32>()?[0] as f64;
        if !loss.is_finite() {
            return Err(RuntimeError::Verify(format!(
                "the model's loss on a calibration window is {loss}"
            )));
        }
        if acc.fisher.is_empty() {
            acc.fisher = self.widths.iter().map(|&n| vec![0.0; n]).collect();
        }
        for ((f, &o), &n) in acc
            .fisher
            .iter_mut()
            .zip(&self.grad_outputs)
            .zip(&self.widths)
        {
            let g = out[o].as_slice::<f32>()?;
            if g.len() % n != 0 {
                return Err(RuntimeError::Verify(format!(
                    "a gradient of {} values is not a multiple of its {n} channels",
                    g.len()
                )));
            }
            for row in g.chunks_exact(n) {
                for (fc, &v) in f.iter_mut().zip(row) {
                    *fc += (v as f64) * (v as f64);
                }
            }
        }
        // Running means keep the scale independent of the number of windows.
        let w = acc.windows as f64;
        acc.loss = (acc.loss * w + loss) / (w + 1.0);
        acc.windows += 1;
        Ok(())
    }
}

/// Inputs of a language-model graph for one window of `ids`, batch 1 and no past: token ids,
/// an all-ones attention mask, positions from 0, and every other input (past keys and values)
/// empty along its unknown dimensions.
pub fn window_feeds(graph: &Graph, ids: &[i64]) -> Result<Vec<Tensor>, RuntimeError> {
    let n = ids.len();
    graph
        .inputs()
        .iter()
        .map(|&(id, role)| {
            Ok(match role {
                InputRole::TokenIds => Tensor::from_vec(vec![1, n], ids.to_vec())?,
                InputRole::AttentionMask => Tensor::from_vec(vec![1, n], vec![1i64; n])?,
                InputRole::PositionIds => Tensor::from_vec(vec![1, n], (0..n as i64).collect())?,
                _ => {
                    let ty = &graph.value(id).ty;
                    let shape = ty
                        .shape
                        .iter()
                        .enumerate()
                        .map(|(i, d)| {
                            d.as_const()
                                .map_or(if i == 0 { 1 } else { 0 }, |c| c as usize)
                        })
                        .collect();
                    Tensor::zeros(ty.dtype, shape)
                }
            })
        })
        .collect()
}

impl Sensitivity {
    /// The sums of [`LossGradients::observe`] as means over the windows; fails on a
    /// non-finite value (naming the target index).
    pub fn finish(mut self) -> Result<Sensitivity, String> {
        let w = self.windows.max(1) as f64;
        for (i, f) in self.fisher.iter_mut().enumerate() {
            for v in f.iter_mut() {
                *v /= w;
                if !v.is_finite() {
                    return Err(format!("the sensitivity of target {i} is not finite"));
                }
            }
        }
        Ok(self)
    }
}
