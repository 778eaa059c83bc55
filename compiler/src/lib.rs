//! The PATCH compiler: ONNX import and export, the compile pipeline and the `patchc` CLI.

pub mod calibrate;
pub mod inspect;
pub mod onnx;
pub mod pipeline;
pub mod report;
