//! Tile formats, packing and CPU kernels for hybrid dense / 2:4 sparse weights.
//!
//! * [`format`]: the one packed format ([`pack`], [`PackedWeight::unpack`]) shared by every
//!   backend — dense tiles and 2:4 tiles with `mma.sp`-style metadata, f32/bf16/f16.
//! * [`CpuKernels`]: `Y = X · W (+ bias)` for any M (GEMV to GEMM), multi-threaded over
//!   output column panels, with the SIMD path ([`SimdPath`]) chosen at run time.
//!
//! Every optimized kernel in this crate has a plain scalar twin (the [`SimdPath::Scalar`]
//! path, and [`reference`]) and tests that they agree on random inputs, ragged shapes
//! included.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
pub mod bandwidth;
mod cpu;
pub mod cuda;
pub mod dispatch;
pub mod format;
pub mod pool;
pub mod reference;
mod scalar;
pub mod simd;
#[cfg(target_arch = "x86_64")]
mod tiles;

pub use cpu::{matmul, CpuKernels, GroupProduct};
pub use dispatch::{cpu_vendor, CpuVendor, GemvPolicy, SimdPath};
pub use format::{
    magnitude_24_mask, pack, PackError, PackedWeight, TileInfo, TileKind, TileMap, TileShape,
    WeightDtype, WeightElement,
};
pub use half::{bf16, f16};

/// Errors from running a kernel.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    #[error("unknown kernel path {0:?} (expected scalar, avx2, avx512, avx512bf16 or amx)")]
    UnknownPath(String),
    #[error("unknown GEMV policy {0:?} (expected tuned, registers or streamed)")]
    UnknownGemvPolicy(String),
    #[error("kernel path {0} is not supported by this CPU")]
    UnsupportedPath(SimdPath),
    #[error("the process-wide kernels already run on {path} with {threads} threads")]
    GlobalInUse { path: SimdPath, threads: usize },
    #[error("bad thread count {0:?} (expected a positive integer)")]
    BadThreads(String),
    #[error("matmul [{m}, {k}] x [{k}, {n}]: {what} has {got} elements, expected {expected}")]
    Shape {
        what: &'static str,
        expected: usize,
        got: usize,
        m: usize,
        k: usize,
        n: usize,
    },
}
