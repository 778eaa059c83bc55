//! The PATCH runtime: a typed dataflow IR with symbolic shapes, its text form and verifier,
//! shape inference, an op registry and the reference CPU interpreter.

pub mod append;
pub mod atomic;
pub mod bundle;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dim;
pub mod dtype;
pub mod error;
pub mod infer;
pub mod interp;
pub mod ir;
pub mod llm;
pub mod memplan;
pub mod ops;
pub mod pool;
pub mod tensor;

pub use dim::{Dim, Shape};
pub use dtype::DType;
pub use error::{OpError, RuntimeError};
pub use ir::{Graph, InputRole, NodeId, OutputRole, TensorType, ValueId};
pub use tensor::{Element, Tensor};
