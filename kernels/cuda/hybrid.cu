// Hybrid dense / 2:4 weight products `Y[M, N] = X[M, K] · W[K, N] (+ bias)` on the packed format
// of `patch_kernels::format` (read it first: this file consumes those bytes as they are, with no
// second packing). X and Y are f32 row-major; W is a list of tiles in tile-column-major order,
// each described by one `TileDesc` (uploaded by the runtime from `PackedWeight::tiles()`).
//
// * `patch_hybrid_mma_{bf16,f16}`: tensor cores, for M > 8. Computes Yᵀ = Wᵀ · Xᵀ so that the
//   sparse operand is A = Wᵀ (rows = output columns n, reduction k), as `mma.sp` requires. One
//   warp owns 16 output columns of one tile column and 32 tokens; it walks the tile column's
//   tiles down K, issuing `mma.sp::ordered_metadata.m16n8k32` on 2:4 tiles and `mma.m16n8k16` on
//   dense tiles, both into the same f32 accumulators. X is rounded to the weight dtype on load.
// * `patch_hybrid_gemv_{f32,bf16,f16}` + `patch_hybrid_reduce`: CUDA cores, for decode (any M,
//   in groups of up to 8 tokens per grid.z). One block per (32 output columns, tile row); the
//   partial sums of every tile row are written to `partials[k_tiles][M][N]` and summed in a fixed
//   order by `patch_hybrid_reduce` (deterministic, no atomics), which also adds the bias.
// Both paths add the optional bias `[N]` and residual `[M, N]` (a folded residual `Add`) as they
// write Y.
// * `patch_matmul_f32`: plain batched f32 GEMM for the MatMuls that stay dense (LM head).

// One tile, mirroring `patch_runtime::cuda::TileDesc`. Offsets are in elements of the weight
// dtype (values) and in 32-bit words (metadata).
struct TileDesc {
    int kind;  // 0 dense, 1 2:4
    int k0;    // first global K row
    int kh;    // rows covered
    int kpad;  // kh rounded up to 4
    int n0;    // first global output column
    int nw;    // columns covered
    long long val;
    long long meta;
};

// Metadata word for a row that does not exist (past the tile's columns): every group "0, 1".
#define PATCH_META_NOTHING 0x44444444u

// ---------------------------------------------------------------------------------------------
// Tensor-core path
// ---------------------------------------------------------------------------------------------

#define MMA_TOKENS 32  // tokens per warp: four m16n8 accumulators

template <bool BF16>
__device__ __forceinline__ unsigned int pack_x2(float lo, float hi) {
    return BF16 ? pack_bf16x2(lo, hi) : pack_f16x2(lo, hi);
}

template <bool BF16>
__device__ __forceinline__ void mma_dense(float* d, const unsigned int* a, const unsigned int* b) {
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// Sparsity selector 0: lanes with (lane % 4) == 0 give the metadata of row groupID, lanes with
// (lane % 4) == 1 that of row groupID + 8 (m16n8k32, 16-bit types).
template <bool BF16>
__device__ __forceinline__ void mma_sparse(float* d, const unsigned int* a, const unsigned int* b,
                                           unsigned int e) {
    if (BF16) {
        asm volatile(
            "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
              "r"(b[3]), "r"(e));
    } else {
        asm volatile(
            "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
              "r"(b[3]), "r"(e));
    }
}

// Two consecutive-k activations of one token as one B register; zero outside the tile's rows
// (`kl` is tile-local, so the zero padding of the weights never meets a neighbour's activation).
template <bool BF16>
__device__ __forceinline__ unsigned int load_x2(const float* xrow, int k0, int kl, int kh,
                                                bool token_ok) {
    if (!token_ok) return 0u;
    float lo = kl < kh ? xrow[k0 + kl] : 0.f;
    float hi = kl + 1 < kh ? xrow[k0 + kl + 1] : 0.f;
    return pack_x2<BF16>(lo, hi);
}

// Launch: blockDim = (128), gridDim = (ceil(col_blocks / 4), ceil(M / 32)), where col_blocks =
// n_tiles * ceil(tile_n / 16): warp w of block x owns column block 4x + w, i.e. tile column
// cb / per_col and its 16 columns starting at (cb % per_col) * 16.
template <bool BF16>
__device__ void hybrid_mma(const float* __restrict__ x, const unsigned int* __restrict__ vals,
                           const unsigned int* __restrict__ meta,
                           const TileDesc* __restrict__ tiles, const float* __restrict__ bias,
                           const float* __restrict__ residual, float* __restrict__ y, int m, int k,
                           int n, int k_tiles, int n_tiles, int tile_n) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int per_col = (tile_n + 15) / 16;
    const long long cb = (long long)blockIdx.x * 4 + warp;
    if (cb >= (long long)n_tiles * per_col) return;
    const int tj = (int)(cb / per_col);
    const int c_base = (int)(cb % per_col) * 16;
    const int g = lane >> 2;  // groupID
    const int t = lane & 3;   // thread in group
    const int tok0 = blockIdx.y * MMA_TOKENS;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    // This lane supplies B columns (tokens) tok0 + 8j + g.
    const float* xrow[4];
    bool tok_ok[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int tok = tok0 + 8 * j + g;
        tok_ok[j] = tok < m;
        xrow[j] = x + (long long)(tok_ok[j] ? tok : 0) * k;
    }

    for (int ti = 0; ti < k_tiles; ++ti) {
        const TileDesc td = tiles[(long long)tj * k_tiles + ti];
        if (c_base >= td.nw) continue;  // ragged last tile column
        const int r0 = c_base + g, r1 = c_base + g + 8;  // A rows = tile-local columns
        const bool r0_ok = r0 < td.nw, r1_ok = r1 < td.nw;
        const unsigned int* tv = vals + td.val / 2;  // 16-bit elements -> pair words
        if (td.kind == 0) {
            const int pairs = td.kpad / 2;
            for (int kk = 0; kk < td.kpad; kk += 16) {
                const int p0 = kk / 2 + t, p1 = kk / 2 + t + 4;
                unsigned int a[4];
                a[0] = (r0_ok && p0 < pairs) ? tv[(long long)p0 * td.nw + r0] : 0u;
                a[1] = (r1_ok && p0 < pairs) ? tv[(long long)p0 * td.nw + r1] : 0u;
                a[2] = (r0_ok && p1 < pairs) ? tv[(long long)p1 * td.nw + r0] : 0u;
                a[3] = (r1_ok && p1 < pairs) ? tv[(long long)p1 * td.nw + r1] : 0u;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    unsigned int b[2];
                    b[0] = load_x2<BF16>(xrow[j], td.k0, kk + 2 * t, td.kh, tok_ok[j]);
                    b[1] = load_x2<BF16>(xrow[j], td.k0, kk + 2 * t + 8, td.kh, tok_ok[j]);
                    mma_dense<BF16>(acc[j], a, b);
                }
            }
        } else {
            const int groups = td.kpad / 4;
            const unsigned int* tm = meta + td.meta;
            for (int w = 0; w * 8 < groups; ++w) {
                const int q0 = 8 * w + t, q1 = 8 * w + t + 4;
                unsigned int a[4];
                a[0] = (r0_ok && q0 < groups) ? tv[(long long)q0 * td.nw + r0] : 0u;
                a[1] = (r1_ok && q0 < groups) ? tv[(long long)q0 * td.nw + r1] : 0u;
                a[2] = (r0_ok && q1 < groups) ? tv[(long long)q1 * td.nw + r0] : 0u;
                a[3] = (r1_ok && q1 < groups) ? tv[(long long)q1 * td.nw + r1] : 0u;
                const int er = (t & 1) ? r1 : r0;
                const unsigned int e =
                    (er < td.nw) ? tm[(long long)w * td.nw + er] : PATCH_META_NOTHING;
                const int kk = 32 * w;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    unsigned int b[4];
#pragma unroll
                    for (int r = 0; r < 4; ++r)
                        b[r] = load_x2<BF16>(xrow[j], td.k0, kk + 8 * r + 2 * t, td.kh, tok_ok[j]);
                    mma_sparse<BF16>(acc[j], a, b, e);
                }
            }
        }
    }

    // C fragment: c0, c1 at (row g, cols 2t, 2t+1); c2, c3 at (row g + 8, same cols).
    const int n_first = tj * tile_n + c_base;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int col = n_first + g + (q >= 2 ? 8 : 0);
            const int tok = tok0 + 8 * j + 2 * t + (q & 1);
            if (tok < m && col < n && c_base + g + (q >= 2 ? 8 : 0) < tile_n) {
                const long long at = (long long)tok * n + col;
                const float b = bias ? bias[col] : 0.f;
                const float r = residual ? residual[at] : 0.f;
                y[at] = acc[j][q] + b + r;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
    patch_hybrid_mma_bf16(const float* x, const unsigned int* vals, const unsigned int* meta,
                          const TileDesc* tiles, const float* bias, const float* residual,
                          float* y, int m, int k, int n, int k_tiles, int n_tiles, int tile_n) {
    hybrid_mma<true>(x, vals, meta, tiles, bias, residual, y, m, k, n, k_tiles, n_tiles, tile_n);
}

extern "C" __global__ void __launch_bounds__(128)
    patch_hybrid_mma_f16(const float* x, const unsigned int* vals, const unsigned int* meta,
                         const TileDesc* tiles, const float* bias, const float* residual,
                         float* y, int m, int k, int n, int k_tiles, int n_tiles, int tile_n) {
    hybrid_mma<false>(x, vals, meta, tiles, bias, residual, y, m, k, n, k_tiles, n_tiles, tile_n);
}

// ---------------------------------------------------------------------------------------------
// CUDA-core path (decode, and every M for f32 weights)
// ---------------------------------------------------------------------------------------------

#define GEMV_COLS 32   // blockDim.x: consecutive output columns, so weight loads coalesce
#define GEMV_SLICES 8  // blockDim.y: K slices reduced in shared memory
#define GEMV_TOKENS 8  // tokens per blockIdx.z

// Element pair (k = 2p, 2p + 1) of the dense layout, or slots (0, 1) of a 2:4 group, as f32.
// DT: 0 f32, 1 bf16, 2 f16.
template <int DT>
__device__ __forceinline__ void load_pair(const void* vals, long long elem, float* lo,
                                          float* hi) {
    if (DT == 0) {
        const float2 v = *(const float2*)((const float*)vals + elem);
        *lo = v.x;
        *hi = v.y;
    } else {
        const unsigned int v = ((const unsigned int*)vals)[elem / 2];
        *lo = DT == 1 ? bf16_lo(v) : f16_lo(v);
        *hi = DT == 1 ? bf16_hi(v) : f16_hi(v);
    }
}

// Launch: blockDim = (32, 8), gridDim = (n_tiles * ceil(tile_n / 32), k_tiles, ceil(M / 8)).
// Writes partials[ti][tok][col] for its tile row ti, its 32 columns and its 8 tokens.
template <int DT>
__device__ void hybrid_gemv(const float* __restrict__ x, const void* __restrict__ vals,
                            const unsigned int* __restrict__ meta,
                            const TileDesc* __restrict__ tiles, float* __restrict__ partials,
                            int m, int k, int n, int k_tiles, int tile_n) {
    __shared__ float red[GEMV_SLICES][GEMV_TOKENS][GEMV_COLS];
    const int per_col = (tile_n + GEMV_COLS - 1) / GEMV_COLS;
    const int tj = blockIdx.x / per_col;
    const int c = (blockIdx.x % per_col) * GEMV_COLS + threadIdx.x;  // tile-local column
    const int ti = blockIdx.y;
    const int tok0 = blockIdx.z * GEMV_TOKENS;
    const int toks = min(GEMV_TOKENS, m - tok0);
    const TileDesc td = tiles[(long long)tj * k_tiles + ti];
    const bool col_ok = c < td.nw;

    float acc[GEMV_TOKENS];
#pragma unroll
    for (int j = 0; j < GEMV_TOKENS; ++j) acc[j] = 0.f;

    if (col_ok) {
        const float* xb = x + (long long)tok0 * k + td.k0;
        if (td.kind == 0) {
            for (int p = threadIdx.y; p < td.kpad / 2; p += GEMV_SLICES) {
                float w0, w1;
                load_pair<DT>(vals, td.val + ((long long)p * td.nw + c) * 2, &w0, &w1);
                const int kl = 2 * p;
                const bool ok1 = kl + 1 < td.kh;
#pragma unroll
                for (int j = 0; j < GEMV_TOKENS; ++j) {
                    if (j < toks && kl < td.kh) {
                        const float* xr = xb + (long long)j * k;
                        acc[j] += w0 * xr[kl] + (ok1 ? w1 * xr[kl + 1] : 0.f);
                    }
                }
            }
        } else {
            for (int q = threadIdx.y; q < td.kpad / 4; q += GEMV_SLICES) {
                float w0, w1;
                load_pair<DT>(vals, td.val + ((long long)q * td.nw + c) * 2, &w0, &w1);
                const unsigned int e = meta[td.meta + (long long)(q / 8) * td.nw + c];
                const unsigned int nib = (e >> (4 * (q % 8))) & 0xfu;
                const int k_a = 4 * q + (int)(nib & 3u), k_b = 4 * q + (int)(nib >> 2);
                const bool ok_a = k_a < td.kh, ok_b = k_b < td.kh;
#pragma unroll
                for (int j = 0; j < GEMV_TOKENS; ++j) {
                    if (j < toks) {
                        const float* xr = xb + (long long)j * k;
                        acc[j] += (ok_a ? w0 * xr[k_a] : 0.f) + (ok_b ? w1 * xr[k_b] : 0.f);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < GEMV_TOKENS; ++j) red[threadIdx.y][j][threadIdx.x] = acc[j];
    __syncthreads();
    // Slice y sums token y over the slices, in a fixed order.
    const int j = threadIdx.y;
    if (col_ok && j < toks) {
        float s = 0.f;
#pragma unroll
        for (int sl = 0; sl < GEMV_SLICES; ++sl) s += red[sl][j][threadIdx.x];
        partials[((long long)ti * m + tok0 + j) * n + td.n0 + c] = s;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    patch_hybrid_gemv_f32(const float* x, const float* vals, const unsigned int* meta,
                          const TileDesc* tiles, float* partials, int m, int k, int n,
                          int k_tiles, int tile_n) {
    hybrid_gemv<0>(x, vals, meta, tiles, partials, m, k, n, k_tiles, tile_n);
}

extern "C" __global__ void __launch_bounds__(256)
    patch_hybrid_gemv_bf16(const float* x, const unsigned int* vals, const unsigned int* meta,
                           const TileDesc* tiles, float* partials, int m, int k, int n,
                           int k_tiles, int tile_n) {
    hybrid_gemv<1>(x, vals, meta, tiles, partials, m, k, n, k_tiles, tile_n);
}

extern "C" __global__ void __launch_bounds__(256)
    patch_hybrid_gemv_f16(const float* x, const unsigned int* vals, const unsigned int* meta,
                          const TileDesc* tiles, float* partials, int m, int k, int n,
                          int k_tiles, int tile_n) {
    hybrid_gemv<2>(x, vals, meta, tiles, partials, m, k, n, k_tiles, tile_n);
}

// y[tok][col] = Σ_ti partials[ti][tok][col] (ti ascending) + bias[col] + residual[tok][col]
// (bias and residual may be NULL). Grid-stride, any launch.
extern "C" __global__ void patch_hybrid_reduce(const float* partials, const float* bias,
                                               const float* residual, float* y, int k_tiles,
                                               long long mn, int n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < mn;
         i += (long long)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int ti = 0; ti < k_tiles; ++ti) s += partials[(long long)ti * mn + i];
        if (bias) s += bias[i % n];
        if (residual) s += residual[i];
        y[i] = s;
    }
}

// ---------------------------------------------------------------------------------------------
// Dense f32 GEMM
// ---------------------------------------------------------------------------------------------

#define MM_TILE 32
#define MM_ROWS 4  // outputs per thread along m

// Y[bt] = A[bt] · B[bt] for bt < batch, A [m, k] at a + bt·sa, B [k, n] at b + bt·sb (sb = 0
// shares one weight), Y [m, n] contiguous. Launch: blockDim = (32, 8), gridDim = (ceil(n / 32),
// ceil(m / 32), batch). Shared-memory tiles of 32×32; each thread computes 4 rows of one column.
extern "C" __global__ void __launch_bounds__(256)
    patch_matmul_f32(const float* __restrict__ a, const float* __restrict__ b,
                     float* __restrict__ y, int m, int k, int n, long long sa, long long sb) {
    __shared__ float as[MM_TILE][MM_TILE + 1];
    __shared__ float bs[MM_TILE][MM_TILE + 1];
    const long long bt = blockIdx.z;
    const float* ab = a + bt * sa;
    const float* bb = b + bt * sb;
    float* yb = y + bt * (long long)m * n;
    const int col = blockIdx.x * MM_TILE + threadIdx.x;
    const int row0 = blockIdx.y * MM_TILE + threadIdx.y * MM_ROWS;
    float acc[MM_ROWS] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < k; k0 += MM_TILE) {
#pragma unroll
        for (int r = 0; r < MM_ROWS; ++r) {
            const int ar = blockIdx.y * MM_TILE + threadIdx.y * MM_ROWS + r;
            const int ak = k0 + threadIdx.x;
            as[threadIdx.y * MM_ROWS + r][threadIdx.x] =
                (ar < m && ak < k) ? ab[(long long)ar * k + ak] : 0.f;
            const int bk = k0 + threadIdx.y * MM_ROWS + r;
            bs[threadIdx.y * MM_ROWS + r][threadIdx.x] =
                (bk < k && col < n) ? bb[(long long)bk * n + col] : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < MM_TILE; ++kk) {
            const float bv = bs[kk][threadIdx.x];
#pragma unroll
            for (int r = 0; r < MM_ROWS; ++r) acc[r] += as[threadIdx.y * MM_ROWS + r][kk] * bv;
        }
        __syncthreads();
    }
    if (col < n) {
#pragma unroll
        for (int r = 0; r < MM_ROWS; ++r)
            if (row0 + r < m) yb[(long long)(row0 + r) * n + col] = acc[r];
    }
}
