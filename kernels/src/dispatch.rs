//! Run-time choice of the SIMD path.
//!
//! Kernels are compiled for every path with `#[target_feature(enable = ...)]`; which one runs
//! is decided when a [`crate::CpuKernels`] is built, from `is_x86_feature_detected!`, or forced
//! with the `PATCH_KERNEL_PATH` environment variable (`scalar`, `avx2`, `avx512`, `avx512bf16`) or
//! [`crate::CpuKernels::new`]. No RUSTFLAGS are needed.

use std::fmt;
use std::str::FromStr;

use crate::KernelError;

/// Environment variable that forces a path.
pub const PATH_ENV: &str = "PATCH_KERNEL_PATH";
/// Environment variable that sets the default thread count.
pub const THREADS_ENV: &str = "PATCH_THREADS";

/// An instruction-set path. Every SIMD path has the scalar path as its twin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimdPath {
    /// Portable scalar code: the twin every SIMD kernel is tested against.
    Scalar,
    /// AVX2 + FMA + F16C, 8 output columns per vector.
    Avx2,
    /// AVX-512 F/BW/VL/DQ, 16 output columns per vector.
    Avx512,
    /// [`SimdPath::Avx512`] plus AVX512-BF16: GEMMs on bf16 weights with at least
    /// [`BF16_DOT_MIN_ROWS`] rows round X to bf16 and use `vdpbf16ps` (two products per
    /// lane, f32 accumulation); everything else runs exactly as on `Avx512`.
    Avx512Bf16,
    /// [`SimdPath::Avx512Bf16`] plus AMX-BF16: those same bf16 GEMMs run on the tile
    /// registers (`tdpbf16ps`, 16 x 16 outputs per instruction), 2:4 tiles expanded to dense
    /// first; everything else runs exactly as on `Avx512Bf16`.
    Amx,
}

/// Rows from which the [`SimdPath::Avx512Bf16`] path rounds X to bf16. Below it the product
/// is bound by reading the weight, so f32 activations cost nothing and stay exact.
pub const BF16_DOT_MIN_ROWS: usize = 16;

impl SimdPath {
    pub const ALL: [SimdPath; 5] = [
        SimdPath::Scalar,
        SimdPath::Avx2,
        SimdPath::Avx512,
        SimdPath::Avx512Bf16,
        SimdPath::Amx,
    ];

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            SimdPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512Bf16 => {
                SimdPath::Avx512.is_supported() && is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            SimdPath::Amx => SimdPath::Avx512Bf16.is_supported() && crate::amx::supported(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best path this CPU supports.
    pub fn detect() -> SimdPath {
        [
            SimdPath::Amx,
            SimdPath::Avx512Bf16,
            SimdPath::Avx512,
            SimdPath::Avx2,
        ]
        .into_iter()
        .find(|p| p.is_supported())
        .unwrap_or(SimdPath::Scalar)
    }

    /// Every path this CPU supports, scalar first.
    pub fn available() -> Vec<SimdPath> {
        SimdPath::ALL
            .into_iter()
            .filter(|p| p.is_supported())
            .collect()
    }

    /// The path named by `PATCH_KERNEL_PATH`, or the detected one when unset.
    pub fn from_env() -> Result<SimdPath, KernelError> {
        match std::env::var(PATH_ENV) {
            Ok(s) if !s.trim().is_empty() => {
                let p: SimdPath = s.parse()?;
                if !p.is_supported() {
                    return Err(KernelError::UnsupportedPath(p));
                }
                Ok(p)
            }
            _ => Ok(SimdPath::detect()),
        }
    }

    /// Output columns one vector register holds (the column granularity of the kernel).
    pub(crate) fn lanes(self) -> usize {
        match self {
            SimdPath::Scalar => 1,
            SimdPath::Avx2 => 8,
            SimdPath::Avx512 | SimdPath::Avx512Bf16 | SimdPath::Amx => 16,
        }
    }

    /// Whether a product of `m` rows on `dtype` weights rounds X to bf16 on this path (the
    /// scalar twin of such a product is the scalar path on the rounded X).
    pub fn rounds_activations(self, m: usize, dtype: crate::WeightDtype) -> bool {
        matches!(self, SimdPath::Avx512Bf16 | SimdPath::Amx)
            && dtype == crate::WeightDtype::Bf16
            && m >= BF16_DOT_MIN_ROWS
    }
}

impl fmt::Display for SimdPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SimdPath::Scalar => "scalar",
            SimdPath::Avx2 => "avx2",
            SimdPath::Avx512 => "avx512",
            SimdPath::Avx512Bf16 => "avx512bf16",
            SimdPath::Amx => "amx",
        })
    }
}

impl FromStr for SimdPath {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(SimdPath::Scalar),
            "avx2" => Ok(SimdPath::Avx2),
            "avx512" | "avx-512" => Ok(SimdPath::Avx512),
            "avx512bf16" | "avx512-bf16" | "avx-512-bf16" => Ok(SimdPath::Avx512Bf16),
            "amx" | "amx-bf16" | "amxbf16" => Ok(SimdPath::Amx),
            _ => Err(KernelError::UnknownPath(s.to_string())),
        }
    }
}

/// The CPUs this process may run on (its affinity mask and cgroup quota included).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Default thread count: `PATCH_THREADS`, else the available parallelism; never more than
/// [`available_cpus`] (spinning workers on a shared core only slow the others down).
pub fn threads_from_env() -> Result<usize, KernelError> {
    match std::env::var(THREADS_ENV) {
        Ok(s) if !s.trim().is_empty() => match s.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n.min(available_cpus())),
            _ => Err(KernelError::BadThreads(s)),
        },
        _ => Ok(available_cpus()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_paths() {
        assert_eq!("AVX512".parse::<SimdPath>().unwrap(), SimdPath::Avx512);
        assert_eq!("scalar".parse::<SimdPath>().unwrap(), SimdPath::Scalar);
        assert!(matches!(
            "neon".parse::<SimdPath>(),
            Err(KernelError::UnknownPath(_))
        ));
        assert!(SimdPath::available().contains(&SimdPath::Scalar));
        assert!(SimdPath::detect().is_supported());
    }
}
