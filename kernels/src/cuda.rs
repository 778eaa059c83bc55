//! The CUDA kernels' sources and the host-side description of a packed weight they read.
//!
//! The `.cu` files live in `kernels/cuda/`; this module only carries their text (the runtime
//! compiles it with NVRTC for the device it finds, CI compiles it with nvcc for every
//! [`ARCHS`] entry) and builds the per-tile descriptors ([`TileDesc`]) the hybrid kernels walk.
//! Nothing here needs CUDA to build or run.

use bytemuck::{Pod, Zeroable};

use crate::format::{PackedWeight, TileKind};

/// Declarations shared by every source; prepended to each one before compiling.
pub const COMMON: &str = include_str!("../cuda/common.cuh");
/// Hybrid dense / 2:4 products (tensor-core `mma.sp` + `mma`, CUDA-core GEMV) and dense GEMM.
pub const HYBRID: &str = include_str!("../cuda/hybrid.cu");
/// Element-wise, normalization, rotary, attention, gather and copy kernels (f32).
pub const OPS: &str = include_str!("../cuda/ops.cu");

/// Every source as `(file name, text)`.
pub const SOURCES: [(&str, &str); 2] = [("hybrid.cu", HYBRID), ("ops.cu", OPS)];

/// Every kernel the runtime launches, as `(source file, extern "C" name)`.
pub const KERNELS: [(&str, &str); 18] = [
    ("hybrid.cu", "patch_hybrid_mma_bf16"),
    ("hybrid.cu", "patch_hybrid_mma_f16"),
    ("hybrid.cu", "patch_hybrid_gemv_f32"),
    ("hybrid.cu", "patch_hybrid_gemv_bf16"),
    ("hybrid.cu", "patch_hybrid_gemv_f16"),
    ("hybrid.cu", "patch_hybrid_reduce"),
    ("hybrid.cu", "patch_matmul_f32"),
    ("ops.cu", "patch_binary_f32"),
    ("ops.cu", "patch_unary_f32"),
    ("ops.cu", "patch_swiglu_f32"),
    ("ops.cu", "patch_rms_norm_f32"),
    ("ops.cu", "patch_layer_norm_f32"),
    ("ops.cu", "patch_softmax_f32"),
    ("ops.cu", "patch_rotary_f32"),
    ("ops.cu", "patch_attention_f32"),
    ("ops.cu", "patch_gather_rows_f32"),
    ("ops.cu", "patch_strided_copy_b32"),
    ("ops.cu", "patch_concat_copy_b32"),
];

/// The architectures CI compiles for: `mma.sp` needs sm_80 or newer.
pub const ARCHS: [&str; 4] = ["sm_80", "sm_86", "sm_89", "sm_90"];

/// Lowest compute capability the kernels run on (sparse tensor cores).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// One compilation unit: [`COMMON`] followed by `source`, as NVRTC must see it (the sources
/// include no header, so this text is self-contained).
pub fn translation_unit(source: &str) -> String {
    let mut s = String::with_capacity(COMMON.len() + source.len() + 1);
    s.push_str(COMMON);
    s.push('\n');
    s.push_str(source);
    s
}

/// One tile as the kernels read it (`struct TileDesc` in `hybrid.cu`, field for field).
/// Offsets are in elements of the weight dtype (`val`) and in 32-bit words (`meta`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TileDesc {
    /// 0 dense, 1 2:4.
    pub kind: i32,
    pub k0: i32,
    pub kh: i32,
    pub kpad: i32,
    pub n0: i32,
    pub nw: i32,
    pub val: i64,
    pub meta: i64,
}

/// Descriptors of every tile of `w` in tile-column-major order (the storage order), which is
/// how the kernels index them: tile `(i, j)` at `j * k_tiles + i`.
pub fn tile_descs(w: &PackedWeight) -> Vec<TileDesc> {
    let size = w.dtype().size();
    let (kt, nt) = (w.tile_map().k_tiles(), w.tile_map().n_tiles());
    let mut descs = Vec::with_capacity(kt * nt);
    for j in 0..nt {
        for i in 0..kt {
            let t = w.tile(i, j);
            descs.push(TileDesc {
                kind: match t.kind {
                    TileKind::Dense => 0,
                    TileKind::Sparse24 => 1,
                },
                k0: t.k0 as i32,
                kh: t.kh as i32,
                kpad: t.kpad as i32,
                n0: t.n0 as i32,
                nw: t.nw as i32,
                val: (t.val_offset / size) as i64,
                meta: t.meta_offset as i64,
            });
        }
    }
    descs
}
