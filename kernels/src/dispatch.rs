//! Run-time choice of the SIMD path.
//!
//! Kernels are compiled for every path with `#[target_feature(enable = ...)]`; which one runs
//! is decided when a [`crate::CpuKernels`] is built: the detected one (`is_x86_feature_detected!`)
//! unless the caller names one ([`crate::CpuKernels::new`]; the CLIs take `--kernel-path`, or
//! [`PATH_ENV`]). The library itself reads no environment variable. No RUSTFLAGS are needed.

use std::fmt;
use std::str::FromStr;

use crate::KernelError;

/// Environment variable the CLIs read as the default of `--kernel-path` (the library does not).
pub const PATH_ENV: &str = "PATCH_KERNEL_PATH";
/// Environment variable the CLIs read as the default of `--threads` (the library does not).
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

/// How one-row products (decode) keep their accumulators. Both strategies compute the same
/// sums in the same order per output; they differ only in speed, which depends on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemvPolicy {
    /// The strategy measured fastest for the CPU's vendor, path and tile kind
    /// ([`GemvPolicy::streams`]).
    Tuned,
    /// Accumulators in registers, a few vectors of columns per pass over the tile.
    Registers,
    /// Accumulators in an L1 array, the tile read front to back once.
    Streamed,
}

impl GemvPolicy {
    pub const ALL: [GemvPolicy; 3] = [
        GemvPolicy::Tuned,
        GemvPolicy::Registers,
        GemvPolicy::Streamed,
    ];

    /// Whether a one-row product on `path` over a tile of `dtype` (2:4 when `sparse`)
    /// streams its accumulators through L1. `Tuned` follows kernel-bench at M = 1
    /// (docs/KERNELS.md): on Intel (Sapphire Rapids) streaming is 10-20% faster on dense
    /// bf16 / f16 tiles with AVX-512 and on every tile with AVX2; on AMD (Zen 4), where a
    /// 512-bit store takes two cycles, registers are 2-2.5x faster on dense AVX-512 tiles
    /// and equal or faster on 2:4 ones, and with AVX2 registers win on dense tiles and
    /// streaming on 2:4 ones.
    pub fn streams(self, path: SimdPath, dtype: crate::WeightDtype, sparse: bool) -> bool {
        match self {
            GemvPolicy::Registers => false,
            GemvPolicy::Streamed => true,
            GemvPolicy::Tuned => {
                let intel = cpu_vendor() == CpuVendor::Intel;
                match path {
                    SimdPath::Scalar => false,
                    SimdPath::Avx2 => intel || sparse,
                    SimdPath::Avx512 | SimdPath::Avx512Bf16 | SimdPath::Amx => {
                        intel && !sparse && dtype != crate::WeightDtype::F32
                    }
                }
            }
        }
    }
}

impl fmt::Display for GemvPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GemvPolicy::Tuned => "tuned",
            GemvPolicy::Registers => "registers",
            GemvPolicy::Streamed => "streamed",
        })
    }
}

impl FromStr for GemvPolicy {
    type Err = KernelError;
    fn from_str(s: &str) -> Result<Self, KernelError> {
        GemvPolicy::ALL
            .into_iter()
            .find(|p| p.to_string() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| KernelError::UnknownGemvPolicy(s.to_string()))
    }
}

/// The CPU maker, from CPUID leaf 0 (the kernels' tuning differs between them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuVendor {
    Intel,
    Amd,
    Other,
}

/// This CPU's maker (`Other` off x86), read once (CPUID traps to the hypervisor in a VM).
pub fn cpu_vendor() -> CpuVendor {
    static VENDOR: std::sync::OnceLock<CpuVendor> = std::sync::OnceLock::new();
    *VENDOR.get_or_init(read_cpu_vendor)
}

fn read_cpu_vendor() -> CpuVendor {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID leaf 0 exists on every x86-64 CPU.
        let id = std::arch::x86_64::__cpuid(0);
        let mut name = [0u8; 12];
        for (i, r) in [id.ebx, id.edx, id.ecx].into_iter().enumerate() {
            name[4 * i..4 * i + 4].copy_from_slice(&r.to_le_bytes());
        }
        match &name {
            b"GenuineIntel" => CpuVendor::Intel,
            b"AuthenticAMD" => CpuVendor::Amd,
            _ => CpuVendor::Other,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    CpuVendor::Other
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

    /// The path named `name`, if this CPU has it (a `--kernel-path` value).
    pub fn parse_supported(name: &str) -> Result<SimdPath, KernelError> {
        let p: SimdPath = name.parse()?;
        if !p.is_supported() {
            return Err(KernelError::UnsupportedPath(p));
        }
        Ok(p)
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

/// The thread count to use for `requested` threads (a `--threads` value; `None`: every CPU):
/// never more than [`available_cpus`] (spinning workers on a shared core only slow the others
/// down).
pub fn resolve_threads(requested: Option<usize>) -> Result<usize, KernelError> {
    match requested {
        None => Ok(available_cpus()),
        Some(0) => Err(KernelError::BadThreads("0".into())),
        Some(n) => Ok(n.min(available_cpus())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WeightDtype;

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

    #[test]
    fn gemv_policies_parse_and_resolve() {
        for p in GemvPolicy::ALL {
            assert_eq!(p.to_string().parse::<GemvPolicy>().unwrap(), p);
        }
        assert!(matches!(
            "fast".parse::<GemvPolicy>(),
            Err(KernelError::UnknownGemvPolicy(_))
        ));
        let dtypes = [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16];
        for path in SimdPath::ALL {
            for dtype in dtypes {
                for sparse in [false, true] {
                    assert!(GemvPolicy::Streamed.streams(path, dtype, sparse));
                    assert!(!GemvPolicy::Registers.streams(path, dtype, sparse));
                }
            }
        }
        // The scalar path has one strategy; f32 and 2:4 AVX-512 tiles stay in registers on
        // every vendor.
        assert!(!GemvPolicy::Tuned.streams(SimdPath::Scalar, WeightDtype::Bf16, false));
        assert!(!GemvPolicy::Tuned.streams(SimdPath::Avx512, WeightDtype::F32, false));
        assert!(!GemvPolicy::Tuned.streams(SimdPath::Avx512, WeightDtype::Bf16, true));
        assert!(GemvPolicy::Tuned.streams(SimdPath::Avx2, WeightDtype::Bf16, true));
        let intel = cpu_vendor() == CpuVendor::Intel;
        assert_eq!(
            GemvPolicy::Tuned.streams(SimdPath::Avx512, WeightDtype::Bf16, false),
            intel
        );
    }
}
