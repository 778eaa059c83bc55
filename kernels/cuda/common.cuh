// Shared declarations for every PATCH CUDA source.
//
// Contract: the sources include no header at all (not even <cuda_fp16.h>), so that the same text
// compiles with nvcc (`-include common.cuh`) and with NVRTC at run time (the runtime prepends this
// file). Activations are f32, row-major and contiguous unless a kernel says otherwise; sizes are
// 64-bit; every kernel is `extern "C"` so its name is stable.

#pragma once

#define PATCH_MAX_DIMS 6

// A row-major iteration space `dims` (the output's shape) with the element strides of up to two
// operands read in it (0 on broadcast axes). Mirrors `patch_runtime::cuda::Bcast6` field for
// field; unused trailing entries are ignored.
struct Bcast6 {
    int ndim;
    int pad;
    long long dims[PATCH_MAX_DIMS];
    long long sa[PATCH_MAX_DIMS];
    long long sb[PATCH_MAX_DIMS];
};

// Offsets into operands a and b of the output element with linear index `i`.
__device__ __forceinline__ void bcast_offsets(const Bcast6& s, long long i, long long* oa,
                                              long long* ob) {
    long long a = 0, b = 0;
    for (int d = s.ndim - 1; d >= 0; --d) {
        long long idx = i % s.dims[d];
        i /= s.dims[d];
        a += idx * s.sa[d];
        b += idx * s.sb[d];
    }
    *oa = a;
    *ob = b;
}

// bf16 / f16 <-> f32 without the half headers.
__device__ __forceinline__ float bf16_lo(unsigned int pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int pair) {
    return __uint_as_float(pair & 0xffff0000u);
}
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float f16_lo(unsigned int pair) {
    return f16_to_f32((unsigned short)(pair & 0xffffu));
}
__device__ __forceinline__ float f16_hi(unsigned int pair) {
    return f16_to_f32((unsigned short)(pair >> 16));
}
// Two f32 -> one register of two 16-bit values, `lo` in the low half (round to nearest even).
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ unsigned int pack_f16x2(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
