//! ONNX protobuf types (generated from the vendored `onnx.proto`, IR version 14 schema),
//! loading with memory-mapped and external data, import into the IR and export back.

pub mod export;
pub mod import;
pub mod load;

/// Types generated from `proto/onnx.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use import::{import_model, ImportOptions};
pub use load::{load_model, tensor_from_proto, LoadError, OnnxModel};
