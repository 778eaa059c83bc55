//! Graph passes behind one [`Pass`] trait, and the [`PassManager`] that runs them and calls
//! the verifier after every pass, with the pass name in any error.

pub mod calibration;
pub mod dce;
pub mod hybrid;
pub mod masks;

use std::sync::Arc;

use patch_runtime::ops::OpRegistry;
use patch_runtime::{Graph, RuntimeError};

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

/// Runs passes in order, verifying the graph after each.
pub struct PassManager<'r> {
    registry: &'r OpRegistry,
    passes: Vec<Box<dyn Pass>>,
}

impl<'r> PassManager<'r> {
    pub fn new(registry: &'r OpRegistry) -> PassManager<'r> {
        PassManager {
            registry,
            passes: Vec::new(),
        }
    }

    pub fn with_pass(mut self, pass: impl Pass + 'static) -> Self {
        self.passes.push(Box::new(pass));
        self
    }

    /// Runs every pass once; returns the names of those that changed the graph.
    pub fn run(&self, graph: &mut Graph) -> Result<Vec<&'static str>, PassError> {
        let mut changed = Vec::new();
        for pass in &self.passes {
            let did = pass
                .run(graph, self.registry)
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
            if did {
                changed.push(pass.name());
            }
        }
        Ok(changed)
    }
}
