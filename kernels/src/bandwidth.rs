//! A STREAM-like read-bandwidth probe on the kernels' own thread pool: what memory-bound
//! kernels are measured against (`kernel-bench`, `patchrt bench`).

use std::time::Instant;

use crate::CpuKernels;

/// Elements of the probe buffer [`read_window`] rotates through (256 MiB of f32).
pub const PROBE_ELEMENTS: usize = 64 << 20;

/// Sums `c` with wide vector loads (AVX-512 when present) and many independent accumulators.
fn sum_chunk(c: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        #[inline(never)]
        unsafe fn sum512(c: &[f32]) -> f32 {
            let n = c.len() / 128 * 128;
            let p = c.as_ptr();
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
            );
            let (mut a4, mut a5, mut a6, mut a7) = (
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
            );
            let mut i = 0;
            while i < n {
                a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p.add(i)));
                a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p.add(i + 16)));
                a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p.add(i + 32)));
                a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p.add(i + 48)));
                a4 = _mm512_add_ps(a4, _mm512_loadu_ps(p.add(i + 64)));
                a5 = _mm512_add_ps(a5, _mm512_loadu_ps(p.add(i + 80)));
                a6 = _mm512_add_ps(a6, _mm512_loadu_ps(p.add(i + 96)));
                a7 = _mm512_add_ps(a7, _mm512_loadu_ps(p.add(i + 112)));
                i += 128;
            }
            let s = _mm512_add_ps(
                _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)),
            );
            let mut tail = 0f32;
            for v in &c[n..] {
                tail += v;
            }
            _mm512_reduce_add_ps(s) + tail
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: avx512f was detected just above; `sum512` reads only inside `c`.
            return unsafe { sum512(c) };
        }
    }
    let mut acc = [0f32; 32];
    for blk in c.chunks_exact(32) {
        for (a, v) in acc.iter_mut().zip(blk) {
            *a += v;
        }
    }
    acc.iter().sum()
}

/// One STREAM-like read-bandwidth sample over the next 16 MiB window of `buf` (GB/s).
///
/// Windows rotate through the 256 MiB buffer, so each is cold (last read 240 MiB ago); a
/// sample lasts about as long as one kernel sample (≈ 0.5–2 ms), so on a shared machine both
/// see the same odds of being preempted and the median compares like with like.
pub fn read_window(buf: &[f32], kernels: &CpuKernels, next: &mut usize) -> f64 {
    let win = 4 << 20;
    let nwin = buf.len() / win;
    let w = &buf[(*next % nwin) * win..(*next % nwin + 1) * win];
    *next += 1;
    read(w, kernels)
}

/// Read bandwidth of one pass over `buf` split over the threads of `kernels`' pool, the same
/// workers (already running) that the kernels use (GB/s).
pub fn read(buf: &[f32], kernels: &CpuKernels) -> f64 {
    let threads = kernels.threads();
    let chunk = buf.len().div_ceil(threads);
    let sums: Vec<std::sync::Mutex<f32>> = (0..threads).map(|_| 0f32.into()).collect();
    let t0 = Instant::now();
    kernels.run_on_threads(&|t| {
        let c = &buf[(t * chunk).min(buf.len())..((t + 1) * chunk).min(buf.len())];
        *sums[t].lock().expect("sum") = sum_chunk(c);
    });
    let secs = t0.elapsed().as_secs_f64();
    std::hint::black_box(sums);
    (buf.len() * 4) as f64 / secs / 1e9
}
