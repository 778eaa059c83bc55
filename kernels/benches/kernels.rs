//! Criterion benchmarks of the CPU kernels on a few SmolLM2 / LLaMA-7B shapes.
//!
//! `cargo bench -p patch-kernels --bench kernels` (not run in CI). For the full table with
//! bandwidth, GFLOP/s and hybrid-over-dense ratios use the `kernel-bench` binary.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use patch_kernels::{
    bf16, magnitude_24_mask, pack, CpuKernels, PackedWeight, SimdPath, TileMap, TileShape,
};

fn weights(k: usize, n: usize, sparse_fraction: f64) -> PackedWeight {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let w: Vec<bf16> = (0..k * n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        })
        .collect();
    let tile = TileShape::default();
    let (kt, nt) = tile.grid(k, n);
    let map = TileMap::spread(kt, nt, sparse_fraction);
    let mask = magnitude_24_mask(&w, k, n, tile, &map).expect("mask");
    pack(&w, k, n, tile, &map, Some(&mask)).expect("pack")
}

fn bench(c: &mut Criterion) {
    let kernels = CpuKernels::new(SimdPath::detect(), 1).expect("kernels");
    let mut group = c.benchmark_group("bf16");
    for &(k, n) in &[(576usize, 1536usize), (4096, 4096)] {
        for &m in &[1usize, 128] {
            for &(label, frac) in &[("dense", 0.0), ("hybrid50", 1.0)] {
                let w = weights(k, n, frac);
                let x = vec![0.5f32; m * k];
                let mut y = vec![0f32; m * n];
                group.throughput(Throughput::Bytes(w.packed_bytes() as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("{label}/m{m}"), format!("{k}x{n}")),
                    &w,
                    |b, w| {
                        b.iter(|| {
                            kernels
                                .matmul(m, black_box(&x), w, None, &mut y)
                                .expect("matmul")
                        })
                    },
                );
            }
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
