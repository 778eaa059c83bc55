//! Graph passes behind one [`Pass`] trait (one pass per file), and the [`PassManager`] that
//! runs a named pipeline of them once or to a fixpoint, calls the verifier after every pass
//! (the pass name in any error) and lets a caller observe the IR after any pass or stop there.

pub mod autodiff;
pub mod blocks;
pub mod calibration;
pub mod canonicalize;
pub mod cse;
pub mod dce;
pub mod epilogue;
pub mod fold;
pub mod fuse;
pub mod hybrid;
pub mod kv_layout;
pub mod masks;
pub mod schedule;
pub mod sensitivity;

use std::sync::Arc;

use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, RuntimeError};

/// A canonical text of a node's attributes that two nodes share only when their attributes are
/// equal (tensor attributes by a hash of their bytes, which `Display` abbreviates), without
/// spaces.
pub fn attrs_key(attrs: &patch_runtime::ir::Attrs) -> String {
    use std::hash::{Hash, Hasher};
    let parts: Vec<String> = attrs
        .0
        .iter()
        .map(|(k, v)| match v {
            patch_runtime::ir::Attr::Tensor(t) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                t.bytes().as_ref().hash(&mut h);
                format!(
                    "{k}=tensor<{}{:?}>#{:016x}",
                    t.dtype(),
                    t.shape(),
                    h.finish()
                )
            }
            other => format!("{k}={other}"),
        })
        .map(|s| s.split_whitespace().collect::<String>())
        .collect();
    parts.join(",")
}

/// A progress callback for long passes: `(done, total)`.
pub type Progress = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// Errors of running passes.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("pass `{pass}`: {source}")]
    Failed {
        pass: String,
        #[source]
        source: RuntimeError,
    },
    #[error("after pass `{pass}` the graph no longer verifies: {source}")]
    Verify {
        pass: String,
        #[source]
        source: RuntimeError,
    },
}

/// One graph transformation.
pub trait Pass {
    /// A stable name, used in errors and on the command line.
    fn name(&self) -> &'static str;

    /// Rewrites `graph` in place; returns whether anything changed.
    fn run(&self, graph: &mut Graph, registry: &OpRegistry) -> Result<bool, RuntimeError>;
}

/// The pipeline that simplifies an imported graph, to a fixpoint: constant folding,
/// canonicalization, common-subexpression elimination, dead-code elimination.
pub fn cleanup_pipeline(registry: &OpRegistry) -> PassManager<'_> {
    PassManager::new(registry)
        .named("cleanup")
        .with_pass(fold::ConstantFolding::default())
        .with_pass(canonicalize::Canonicalize)
        .with_pass(cse::CommonSubexpressions)
        .with_pass(dce::DeadCodeElimination)
        .to_fixpoint(8)
}

/// The fusion pipeline: e-graph fusion, residual adds folded into the hybrid MatMuls'
/// epilogues, then dead-code elimination of what they absorbed. `fuse` is passed in so the
/// caller keeps its report handle.
pub fn fusion_pipeline(registry: &OpRegistry, fuse: fuse::Fuse) -> PassManager<'_> {
    PassManager::new(registry)
        .named("fuse")
        .with_pass(fuse)
        .with_pass(epilogue::ResidualEpilogue)
        .with_pass(dce::DeadCodeElimination)
}

/// The layout pipeline, after fusion: head-layout transposes folded into the attention and
/// the KV cache re-laid out for in-place appends (see [`kv_layout`]), then dead-code
/// elimination. It changes the past/present tensors' layout, so it runs only for bundles.
pub fn layout_pipeline(registry: &OpRegistry) -> PassManager<'_> {
    PassManager::new(registry)
        .named("layout")
        .with_pass(kv_layout::KvLayout)
        .with_pass(dce::DeadCodeElimination)
}

/// The last pipeline: the node order that keeps the fewest activation bytes alive
/// ([`schedule::MemorySchedule`]).
pub fn schedule_pipeline(registry: &OpRegistry) -> PassManager<'_> {
    PassManager::new(registry)
        .named("schedule")
        .with_pass(schedule::MemorySchedule::default())
}

/// What one run of one pass did.
#[derive(Clone, Debug, PartialEq)]
pub struct PassRun {
    pub pipeline: &'static str,
    pub pass: &'static str,
    /// 1-based round of the pipeline.
    pub round: usize,
    pub changed: bool,
    pub nodes_before: usize,
    pub nodes_after: usize,
    pub seconds: f64,
}

/// What a pipeline did: every pass run in order, and how it ended.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineOutcome {
    pub runs: Vec<PassRun>,
    /// The pipeline ended early because of [`PassManager::stop_after`].
    pub stopped: bool,
}

impl PipelineOutcome {
    /// Rounds run (a round runs every pass once; the last may be cut by `stop_after`).
    pub fn rounds(&self) -> usize {
        self.runs.last().map_or(0, |r| r.round)
    }

    /// Whether the last round ran whole and changed nothing.
    pub fn reached_fixpoint(&self) -> bool {
        let last = self.rounds();
        !self.stopped
            && last > 0
            && self
                .runs
                .iter()
                .filter(|r| r.round == last)
                .all(|r| !r.changed)
    }

    /// Names of the passes that changed the graph, in order, each once.
    pub fn changed(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Vec::new();
        for r in self.runs.iter().filter(|r| r.changed) {
            if !names.contains(&r.pass) {
                names.push(r.pass);
            }
        }
        names
    }
}

/// Called after every pass run with the run and the graph it left.
pub type PassObserver<'o> = Box<dyn FnMut(&PassRun, &Graph) + 'o>;

/// A named pipeline of passes, run once or to a fixpoint, with the verifier after every pass
/// (its error names the pass), an observer for `--dump-after`, and `--stop-after`.
pub struct PassManager<'r> {
    registry: &'r OpRegistry,
    name: &'static str,
    passes: Vec<Box<dyn Pass>>,
    max_rounds: usize,
    observer: Option<PassObserver<'r>>,
    stop_after: Option<String>,
}

impl<'r> PassManager<'r> {
    /// An empty pipeline named "passes" that runs its passes once.
    pub fn new(registry: &'r OpRegistry) -> PassManager<'r> {
        PassManager {
            registry,
            name: "passes",
            passes: Vec::new(),
            max_rounds: 1,
            observer: None,
            stop_after: None,
        }
    }

    pub fn named(mut self, pipeline: &'static str) -> Self {
        self.name = pipeline;
        self
    }

    pub fn with_pass(mut self, pass: impl Pass + 'static) -> Self {
        self.passes.push(Box::new(pass));
        self
    }

    /// Repeats the whole pipeline until a round changes nothing, at most `max_rounds` times.
    pub fn to_fixpoint(mut self, max_rounds: usize) -> Self {
        self.max_rounds = max_rounds.max(1);
        self
    }

    pub fn observe(mut self, observer: PassObserver<'r>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Ends the pipeline right after the first run of the pass named `pass`.
    pub fn stop_after(mut self, pass: Option<String>) -> Self {
        self.stop_after = pass;
        self
    }

    /// Names of the passes in this pipeline.
    pub fn pass_names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    pub fn run(&mut self, graph: &mut Graph) -> Result<PipelineOutcome, PassError> {
        let mut outcome = PipelineOutcome::default();
        for round in 1..=self.max_rounds {
            let mut any = false;
            for pass in &self.passes {
                let nodes_before = graph.node_count();
                let t = std::time::Instant::now();
                let changed =
                    pass.run(graph, self.registry)
                        .map_err(|source| PassError::Failed {
                            pass: pass.name().into(),
                            source,
                        })?;
                graph
                    .verify(self.registry)
                    .map_err(|source| PassError::Verify {
                        pass: pass.name().into(),
                        source,
                    })?;
                let run = PassRun {
                    pipeline: self.name,
                    pass: pass.name(),
                    round,
                    changed,
                    nodes_before,
                    nodes_after: graph.node_count(),
                    seconds: t.elapsed().as_secs_f64(),
                };
                if let Some(observe) = self.observer.as_mut() {
                    observe(&run, graph);
                }
                outcome.runs.push(run);
                any |= changed;
                if self.stop_after.as_deref() == Some(pass.name()) {
                    outcome.stopped = true;
                    return Ok(outcome);
                }
            }
            if !any {
                return Ok(outcome);
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use patch_runtime::ir::{Attr, Attrs};
    use patch_runtime::ops::OpRegistry;
    use patch_runtime::{
        DType, Dim, Graph, InputRole, OutputRole, RuntimeError, Tensor, TensorType,
    };

    use super::{dce::DeadCodeElimination, Pass, PassError, PassManager};

    /// Reports a change on its first `n` runs, changing nothing in fact.
    struct Settles {
        left: AtomicUsize,
    }

    impl Pass for Settles {
        fn name(&self) -> &'static str {
            "settles"
        }
        fn run(&self, _: &mut Graph, _: &OpRegistry) -> Result<bool, RuntimeError> {
            let left = self.left.load(Ordering::Relaxed);
            self.left.store(left.saturating_sub(1), Ordering::Relaxed);
            Ok(left > 0)
        }
    }

    /// Removes every node, leaving the graph output undefined.
    struct Breaks;

    impl Pass for Breaks {
        fn name(&self) -> &'static str {
            "breaks"
        }
        fn run(&self, graph: &mut Graph, _: &OpRegistry) -> Result<bool, RuntimeError> {
            let ids: Vec<_> = graph.order().to_vec();
            for id in ids {
                graph.remove_node(id);
            }
            Ok(true)
        }
    }

    fn one_node_graph(r: &OpRegistry) -> Graph {
        let mut g = Graph::new("g", 18);
        let ty = TensorType::new(DType::F32, vec![Dim::constant(2)]);
        let x = g.add_input("x", ty, InputRole::Other).unwrap();
        let y = g
            .add_node(
                r,
                "n",
                "",
                "Neg",
                Attrs::new(),
                vec![Some(x)],
                vec!["y".into()],
            )
            .unwrap()[0];
        g.set_outputs(vec![(y, OutputRole::Other)]);
        g
    }

    #[test]
    fn pipelines_run_to_a_fixpoint_within_their_limit_and_stop_where_asked() {
        let r = OpRegistry::onnx();
        let settles = |n| Settles {
            left: AtomicUsize::new(n),
        };
        let mut g = one_node_graph(&r);
        let out = PassManager::new(&r)
            .with_pass(settles(2))
            .with_pass(DeadCodeElimination)
            .to_fixpoint(8)
            .run(&mut g)
            .unwrap();
        assert_eq!((out.rounds(), out.reached_fixpoint()), (3, true));
        assert_eq!(out.changed(), ["settles"]);

        let out = PassManager::new(&r)
            .with_pass(settles(5))
            .to_fixpoint(2)
            .run(&mut g)
            .unwrap();
        assert_eq!((out.rounds(), out.reached_fixpoint()), (2, false));

        let out = PassManager::new(&r)
            .with_pass(settles(5))
            .with_pass(DeadCodeElimination)
            .to_fixpoint(8)
            .stop_after(Some("settles".into()))
            .run(&mut g)
            .unwrap();
        assert!(out.stopped && !out.reached_fixpoint());
        assert_eq!(out.runs.len(), 1);

        let err = PassManager::new(&r)
            .named("test")
            .with_pass(Breaks)
            .run(&mut g)
            .unwrap_err();
        assert!(
            matches!(&err, PassError::Verify { pass, .. } if pass == "breaks"),
            "{err}"
        );
    }

    /// Tensor attributes that print alike (more than 8 elements are abbreviated) still key
    /// apart; equal ones key alike.
    #[test]
    fn attrs_key_tells_large_tensors_apart() {
        let t = |last: f32| {
            let mut v = vec![0f32; 16];
            v[15] = last;
            Attrs::new().with(
                "value",
                Attr::Tensor(Tensor::from_vec(vec![16], v).unwrap()),
            )
        };
        assert_eq!(super::attrs_key(&t(1.0)), super::attrs_key(&t(1.0)));
        assert_ne!(super::attrs_key(&t(1.0)), super::attrs_key(&t(2.0)));
        let with_list = Attrs::new().with("perm", Attr::Ints(vec![0, 2, 1, 3]));
        assert_eq!(super::attrs_key(&with_list), "perm=[0,2,1,3]");
    }
}
