// f32 element-wise, normalization, softmax, rotary, attention, gather and copy kernels of the
// CUDA backend. Semantics mirror the CPU reference ops of `patch_runtime::ops` (named per
// kernel). Contracts: tensors are f32, row-major and contiguous unless said; element counts are
// 64-bit; "grid-stride" kernels take any grid with blockDim.x = 256; "row" kernels take one
// block per row (gridDim.x = rows) and any blockDim.x that is a multiple of 32 up to 1024.

// -inf without <math.h> (NVRTC sees no headers).
#define NEG_INF __int_as_float(0xff800000)

#define GRID_STRIDE(i, n)                                                          \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

// Sum of `v` over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(t);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < warps ? scratch[lane] : NEG_INF;
    return warp_max(t);
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

// patch.Gelu / Gelu(approximate = "tanh").
__device__ __forceinline__ float gelu_tanh_f(float x) {
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.f + tanhf(c * (x + 0.044715f * x * x * x)));
}

// Binary ops with ONNX broadcasting (Add, Sub, Mul, Div, Pow, Max, Min): y[i] = a OP b at the
// broadcast offsets of output element i. op: 0 add, 1 sub, 2 mul, 3 div, 4 pow, 5 max, 6 min.
// Grid-stride over n output elements.
extern "C" __global__ void patch_binary_f32(int op, const float* a, const float* b, float* y,
                                            long long n, Bcast6 s) {
    GRID_STRIDE(i, n) {
        long long oa, ob;
        if (s.ndim == 1) {
            oa = i * s.sa[0];
            ob = i * s.sb[0];
        } else {
            bcast_offsets(s, i, &oa, &ob);
        }
        const float u = a[oa], v = b[ob];
        float r;
        switch (op) {
            case 0: r = u + v; break;
            case 1: r = u - v; break;
            case 2: r = u * v; break;
            case 3: r = u / v; break;
            case 4: r = powf(u, v); break;
            case 5: r = fmaxf(u, v); break;
            default: r = fminf(u, v); break;
        }
        y[i] = r;
    }
}

// Unary ops. op: 0 neg, 1 sqrt, 2 exp, 3 log, 4 sigmoid, 5 tanh, 6 reciprocal, 7 sin, 8 cos,
// 9 abs, 10 relu, 11 erf, 12 silu, 13 gelu (tanh), 14 gelu (erf). Grid-stride over n.
extern "C" __global__ void patch_unary_f32(int op, const float* x, float* y, long long n) {
    GRID_STRIDE(i, n) {
        const float v = x[i];
        float r;
        switch (op) {
            case 0: r = -v; break;
            case 1: r = sqrtf(v); break;
            case 2: r = expf(v); break;
            case 3: r = logf(v); break;
            case 4: r = sigmoid_f(v); break;
            case 5: r = tanhf(v); break;
            case 6: r = 1.f / v; break;
            case 7: r = sinf(v); break;
            case 8: r = cosf(v); break;
            case 9: r = fabsf(v); break;
            case 10: r = fmaxf(v, 0.f); break;
            case 11: r = erff(v); break;
            case 12: r = v * sigmoid_f(v); break;
            case 13: r = gelu_tanh_f(v); break;
            default: r = 0.5f * v * (1.f + erff(v * 0.7071067811865476f)); break;
        }
        y[i] = r;
    }
}

// patch.SwiGLU: y = g · sigmoid(g) · u. Grid-stride over n.
extern "C" __global__ void patch_swiglu_f32(const float* g, const float* u, float* y,
                                            long long n) {
    GRID_STRIDE(i, n) {
        const float v = g[i];
        y[i] = v * sigmoid_f(v) * u[i];
    }
}

// patch.RMSNorm over the last axis: y = x / sqrt(mean(x²) + eps) · scale (scale may be NULL).
// Row kernel. The mean is accumulated in f32 per thread, then across the block.
extern "C" __global__ void patch_rms_norm_f32(const float* x, const float* scale, float* y,
                                              long long rows, int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + row * cols;
    float* yr = y + row * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        yr[c] = xr[c] * inv * (scale ? scale[c] : 1.f);
}

// LayerNormalization over the last axis: (x − mean) / sqrt(var + eps) · scale + bias, biased
// variance in two passes; scale and bias may be NULL. Row kernel.
extern "C" __global__ void patch_layer_norm_f32(const float* x, const float* scale,
                                                const float* bias, float* y, long long rows,
                                                int cols, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + row * cols;
    float* yr = y + row * cols;
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
    const float mean = block_sum(s, scratch) / (float)cols;
    float v = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = xr[c] - mean;
        v += d * d;
    }
    const float inv = rsqrtf(block_sum(v, scratch) / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float r = (xr[c] - mean) * inv;
        if (scale) r *= scale[c];
        if (bias) r += bias[c];
        yr[c] = r;
    }
}

// Softmax over the last axis (ONNX opset 13): exp(x − max) / Σ. A row that is all -inf has
// max = -inf and gives NaN, as the CPU op and ONNX Runtime do. Row kernel.
extern "C" __global__ void patch_softmax_f32(const float* x, float* y, long long rows,
                                             int cols) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + row * cols;
    float* yr = y + row * cols;
    float m = NEG_INF;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, xr[c]);
    m = block_max(m, scratch);
    float s = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float e = expf(xr[c] - m);
        yr[c] = e;
        s += e;
    }
    const float inv = 1.f / block_sum(s, scratch);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] *= inv;
}

// patch.Rotary: X [rows, 2·half]; row r reads its cos / sin row at the offsets
// bcast_offsets(lead, r) (lead.dims = X's leading dims, sa / sb = cos / sin strides there).
// y[j] = x[j]·c[j] − x[j+half]·s[j], y[j+half] = x[j+half]·c[j+half] + x[j]·s[j+half].
// Grid-stride over rows·half.
extern "C" __global__ void patch_rotary_f32(const float* x, const float* cos_t,
                                            const float* sin_t, float* y, long long rows,
                                            int half, Bcast6 lead) {
    GRID_STRIDE(i, rows * half) {
        const long long r = i / half;
        const int j = (int)(i % half);
        long long oc, os;
        bcast_offsets(lead, r, &oc, &os);
        const float* xr = x + r * 2 * half;
        const float* c = cos_t + oc;
        const float* s = sin_t + os;
        const float a = xr[j], b = xr[j + half];
        y[r * 2 * half + j] = a * c[j] - b * s[j];
        y[r * 2 * half + j + half] = b * c[j + half] + a * s[j + half];
    }
}

// patch.Attention: softmax(scale · q kᵀ + mask) v for one (batch, head, query row) per block:
// gridDim = (s, h, b), blockDim.x a multiple of 32 up to 1024 (128 expected), dynamic shared
// memory t · 4 bytes (the scores). Q [b, h, s, d], K and V [b, hk, t, d]; query head j reads KV
// head j / (h / hk). The mask (NULL for none) is additive, element (bi, hi, si, ti) at
// bi·mb + hi·mh + si·ms + ti·mt. A row whose scores are all -inf gives zeros (as the CPU op).
extern "C" __global__ void patch_attention_f32(const float* q, const float* k, const float* v,
                                               const float* mask, float* out, int b, int h,
                                               int hk, int s, int t, int d, long long mb,
                                               long long mh, long long ms, long long mt,
                                               float scale) {
    extern __shared__ float scores[];
    __shared__ float scratch[32];
    const int si = blockIdx.x, hi = blockIdx.y, bi = blockIdx.z;
    if (si >= s || hi >= h || bi >= b) return;
    const int kvh = hi / (h / hk);
    const float* qr = q + (((long long)bi * h + hi) * s + si) * d;
    const float* kb = k + ((long long)bi * hk + kvh) * (long long)t * d;
    const float* vb = v + ((long long)bi * hk + kvh) * (long long)t * d;
    float* orow = out + (((long long)bi * h + hi) * s + si) * d;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    // Scores: one warp per key, lanes split the dot product.
    for (int key = warp; key < t; key += warps) {
        const float mv = mask ? mask[bi * mb + hi * mh + si * ms + key * mt] : 0.f;
        float dot = 0.f;
        if (mv != NEG_INF) {
            const float* kr = kb + (long long)key * d;
            for (int c = lane; c < d; c += 32) dot += qr[c] * kr[c];
            dot = warp_sum(dot);
        }
        if (lane == 0) scores[key] = mv == NEG_INF ? NEG_INF : dot * scale + mv;
    }
    __syncthreads();
    float m = NEG_INF;
    for (int key = threadIdx.x; key < t; key += blockDim.x) m = fmaxf(m, scores[key]);
    m = block_max(m, scratch);
    if (m == NEG_INF) {
        for (int c = threadIdx.x; c < d; c += blockDim.x) orow[c] = 0.f;
        return;
    }
    float sum = 0.f;
    for (int key = threadIdx.x; key < t; key += blockDim.x) {
        const float e = expf(scores[key] - m);
        scores[key] = e;
        sum += e;
    }
    const float inv = 1.f / block_sum(sum, scratch);  // block_sum syncs: scores are complete
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.f;
        for (int key = 0; key < t; ++key) {
            const float p = scores[key];
            if (p != 0.f) acc += p * vb[(long long)key * d + c];
        }
        orow[c] = acc * inv;
    }
}

// Gather along axis 0 of a [rows, row_len] table (embeddings): y[i, :] = table[ids[i], :];
// ids are validated and non-negative (the host checks them). Grid-stride over n_ids·row_len.
extern "C" __global__ void patch_gather_rows_f32(const float* table, const long long* ids,
                                                 float* y, long long n_ids, long long row_len) {
    GRID_STRIDE(i, n_ids * row_len) {
        const long long r = i / row_len, c = i % row_len;
        y[i] = table[ids[r] * row_len + c];
    }
}

// y[i] = x[bcast_offsets(s, i).a] for i < n: Transpose, Expand, any strided read of 32-bit
// elements into a contiguous output. Grid-stride.
extern "C" __global__ void patch_strided_copy_b32(const unsigned int* x, unsigned int* y,
                                                  long long n, Bcast6 s) {
    GRID_STRIDE(i, n) {
        long long oa, ob;
        bcast_offsets(s, i, &oa, &ob);
        y[i] = x[oa];
    }
}

// One Concat input: x [outer, inner_x] into y [outer, inner_y] at column `offset`.
// Grid-stride over outer·inner_x.
extern "C" __global__ void patch_concat_copy_b32(const unsigned int* x, unsigned int* y,
                                                 long long outer, long long inner_x,
                                                 long long inner_y, long long offset) {
    GRID_STRIDE(i, outer * inner_x) {
        const long long o = i / inner_x, c = i % inner_x;
        y[o * inner_y + offset + c] = x[i];
    }
}
