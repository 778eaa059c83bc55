//! Prints one Markdown table: dense vs hybrid (dense + 2:4 tiles) GEMV/GEMM on SmolLM2 and
//! LLaMA-7B shapes, with the read bandwidth and FMA peak measured in the same run.
//!
//! ```text
//! cargo run --release -p patch-kernels --bin kernel-bench -- \
//!     [--shapes smol|llama|all|KxN,..] [--m 1,16,128,512] [--threads 1,2] \
//!     [--dtypes f32,bf16,f16] [--sparsity 0,25,35,45,50] [--reps 9] [--path avx512bf16] \
//!     [--gemv tuned|registers|streamed]
//! ```
//!
//! Every variant of one (shape, dtype, M, threads) cell is timed interleaved with the dense
//! baseline, rep by rep, on weights rotated through enough copies to exceed the L3 cache (so
//! every call streams from DRAM, as a decode step over a whole model does); the speed-up is
//! the median of the per-rep paired ratios.

use std::time::{Duration, Instant};

use patch_kernels::{
    bandwidth, bf16, f16, magnitude_24_mask, pack, CpuKernels, GemvPolicy, PackedWeight, SimdPath,
    TileMap, TileShape, WeightDtype, WeightElement,
};

struct Args {
    shapes: Vec<(usize, usize)>,
    ms: Vec<usize>,
    threads: Vec<usize>,
    dtypes: Vec<WeightDtype>,
    sparsity: Vec<u32>,
    reps: usize,
    path: SimdPath,
    gemv: GemvPolicy,
}

const SMOL: [(usize, usize); 4] = [(576, 576), (576, 192), (576, 1536), (1536, 576)];
const LLAMA: [(usize, usize); 3] = [(4096, 4096), (4096, 11008), (11008, 4096)];

fn list<T>(s: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    s.split(',').filter(|p| !p.is_empty()).map(f).collect()
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        shapes: SMOL.iter().chain(LLAMA.iter()).copied().collect(),
        ms: vec![1, 16, 128, 512],
        threads: vec![1, 2],
        dtypes: vec![WeightDtype::F32, WeightDtype::Bf16],
        sparsity: vec![0, 25, 35, 45, 50],
        reps: 9,
        path: SimdPath::detect(),
        gemv: GemvPolicy::Tuned,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let val = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |s: &str| s.parse::<usize>().map_err(|e| format!("{s}: {e}"));
        match flag.as_str() {
            "--shapes" => {
                a.shapes = match val.as_str() {
                    "smol" => SMOL.to_vec(),
                    "llama" => LLAMA.to_vec(),
                    "all" => SMOL.iter().chain(LLAMA.iter()).copied().collect(),
                    _ => list(val, |s| {
                        let (k, n) = s.split_once('x').ok_or(format!("{s}: expected KxN"))?;
                        Ok((num(k)?, num(n)?))
                    })?,
                }
            }
            "--m" => a.ms = list(val, num)?,
            "--threads" => a.threads = list(val, num)?,
            "--reps" => a.reps = num(val)?.max(3),
            "--sparsity" => {
                a.sparsity = list(val, |s| s.parse::<u32>().map_err(|e| e.to_string()))?
            }
            "--path" => {
                a.path = val
                    .parse()
                    .map_err(|e: patch_kernels::KernelError| e.to_string())?
            }
            "--gemv" => {
                a.gemv = val
                    .parse()
                    .map_err(|e: patch_kernels::KernelError| e.to_string())?
            }
            "--dtypes" => {
                a.dtypes = list(val, |s| match s {
                    "f32" => Ok(WeightDtype::F32),
                    "bf16" => Ok(WeightDtype::Bf16),
                    "f16" => Ok(WeightDtype::F16),
                    _ => Err(format!("unknown dtype {s}")),
                })?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if !a.sparsity.contains(&0) {
        a.sparsity.insert(0, 0);
    }
    Ok(a)
}

/// Deterministic uniform(-0.5, 0.5) values.
fn values(len: usize, seed: u64) -> impl Iterator<Item = f32> {
    let mut s = seed | 1;
    (0..len).map(move |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    })
}

fn pack_as<T: WeightElement>(k: usize, n: usize, sparse_tiles: f64) -> PackedWeight {
    let w: Vec<T> = values(k * n, 42).map(T::from_f32).collect();
    let tile = TileShape::default();
    let (kt, nt) = tile.grid(k, n);
    let map = TileMap::spread(kt, nt, sparse_tiles);
    let mask = magnitude_24_mask(&w, k, n, tile, &map).expect("mask");
    pack(&w, k, n, tile, &map, Some(&mask)).expect("pack")
}

fn packed(dtype: WeightDtype, k: usize, n: usize, sparsity_pct: u32) -> PackedWeight {
    // Global sparsity s needs a fraction 2s of the tiles in 2:4.
    let frac = (2.0 * sparsity_pct as f64 / 100.0).min(1.0);
    match dtype {
        WeightDtype::F32 => pack_as::<f32>(k, n, frac),
        WeightDtype::Bf16 => pack_as::<bf16>(k, n, frac),
        WeightDtype::F16 => pack_as::<f16>(k, n, frac),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Single-core f32 FMA peak in GFLOP/s (AVX-512 or AVX2 FMA, 12 independent chains).
fn fma_peak() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        fn run512(iters: u64) -> f32 {
            let mut acc = [_mm512_set1_ps(1.0); 12];
            let a = _mm512_set1_ps(0.999_999);
            let b = _mm512_set1_ps(1e-7);
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, a, b);
                }
            }
            acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
        }
        if is_x86_feature_detected!("avx512f") {
            // Short samples (≈ 1 ms), median of many: robust to preemption.
            let iters = 100_000u64;
            let mut s: Vec<f64> = (0..41)
                .map(|_| {
                    let t0 = Instant::now();
                    // SAFETY: avx512f was detected just above.
                    std::hint::black_box(unsafe { run512(iters) });
                    (iters * 12 * 16 * 2) as f64 / t0.elapsed().as_secs_f64() / 1e9
                })
                .collect();
            return median(&mut s);
        }
    }
    f64::NAN
}

struct Variant {
    sparsity: u32,
    copies: Vec<PackedWeight>,
    bytes: usize,
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kernel-bench: {e}");
            std::process::exit(2);
        }
    };
    // 256 MiB: eight times the L3 cache.
    let buf: Vec<f32> = vec![1.0; bandwidth::PROBE_ELEMENTS];
    let kernels: Vec<(usize, CpuKernels)> = args
        .threads
        .iter()
        .map(|&t| {
            (
                t,
                CpuKernels::new(args.path, t)
                    .expect("kernels")
                    .with_gemv(args.gemv),
            )
        })
        .collect();
    let bw: Vec<(usize, f64)> = kernels
        .iter()
        .map(|(t, kern)| {
            let mut next = 0;
            let mut s: Vec<f64> = (0..31)
                .map(|_| bandwidth::read_window(&buf, kern, &mut next))
                .collect();
            (*t, median(&mut s))
        })
        .collect();
    let peak = fma_peak();
    println!(
        "# kernel-bench: path {}, GEMV {} ({:?} CPU), reps {}, machine: {} threads available",
        args.path,
        args.gemv,
        patch_kernels::cpu_vendor(),
        args.reps,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for (t, b) in &bw {
        println!("read bandwidth at the start ({t} thread(s), 16 MiB windows of a 256 MiB array): {b:.1} GB/s");
    }
    println!("f32 FMA peak (1 core, measured): {peak:.0} GFLOP/s");
    println!();
    println!("% BW: kernel GB/s over the read bandwidth sampled rep by rep in the same cell.");
    println!("| shape KxN | dtype | M | thr | variant | median µs | spread | GB/s | % BW | GFLOP/s | % peak | speed-up | ideal | % ideal |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &(k, n) in &args.shapes {
        for &dtype in &args.dtypes {
            let target = 256usize << 20;
            let variants: Vec<Variant> = args
                .sparsity
                .iter()
                .map(|&s| {
                    let w = packed(dtype, k, n, s);
                    let copies_n = target.div_ceil(w.packed_bytes()).clamp(1, 512);
                    Variant {
                        sparsity: s,
                        bytes: w.packed_bytes(),
                        copies: vec![w; copies_n],
                    }
                })
                .collect();
            for &m in &args.ms {
                let x: Vec<f32> = values(m * k, 7).collect();
                let mut y = vec![0f32; m * n];
                for (t, kern) in &kernels {
                    // Timed samples: at least ~2 ms each.
                    let mut rot = 0usize;
                    let mut one = |v: &Variant, calls: usize, rot: &mut usize| -> f64 {
                        let t0 = Instant::now();
                        for _ in 0..calls {
                            let w = &v.copies[*rot % v.copies.len()];
                            *rot += 1;
                            kern.matmul(m, &x, w, None, &mut y).expect("matmul");
                        }
                        t0.elapsed().as_secs_f64() / calls as f64
                    };
                    let probe = one(&variants[0], 1, &mut rot);
                    let calls = ((Duration::from_millis(2).as_secs_f64() / probe).ceil() as usize)
                        .clamp(1, 10_000);
                    let reps = if probe > 0.2 { 3 } else { args.reps };
                    let mut times = vec![Vec::new(); variants.len()];
                    let mut bw_cell = Vec::new();
                    let mut bw_next = 0;
                    let mut ratios = vec![Vec::new(); variants.len()];
                    for _ in 0..reps {
                        for _ in 0..3 {
                            bw_cell.push(bandwidth::read_window(&buf, kern, &mut bw_next));
                        }
                        let base = one(&variants[0], calls, &mut rot);
                        times[0].push(base);
                        for (i, v) in variants.iter().enumerate().skip(1) {
                            let tv = one(v, calls, &mut rot);
                            times[i].push(tv);
                            ratios[i].push(base / tv);
                        }
                    }
                    // Bandwidth sampled rep by rep next to the kernel timings.
                    let bw_t = median(&mut bw_cell);
                    for (i, v) in variants.iter().enumerate() {
                        let mut ts = times[i].clone();
                        let med = median(&mut ts);
                        let spread = (ts[ts.len() - 1] - ts[0]) / med * 100.0;
                        let bytes = v.bytes + 4 * (m * k + m * n);
                        let gbs = bytes as f64 / med / 1e9;
                        let gflops = 2.0 * (m * k * n) as f64 / med / 1e9;
                        let label = if v.sparsity == 0 {
                            "dense".to_string()
                        } else {
                            format!("hybrid {}%", v.sparsity)
                        };
                        let (sp, ideal, pct) = if i == 0 {
                            ("1.00".to_string(), "1.00".to_string(), "-".to_string())
                        } else {
                            let r = median(&mut ratios[i].clone());
                            let ideal =
                                (variants[0].bytes + 4 * (m * k + m * n)) as f64 / bytes as f64;
                            (
                                format!("{r:.2}"),
                                format!("{ideal:.2}"),
                                format!("{:.0}%", r / ideal * 100.0),
                            )
                        };
                        println!(
                            "| {k}x{n} | {dtype} | {m} | {t} | {label} | {:.1} | ±{:.0}% | {gbs:.1} | {:.0}% | {gflops:.1} | {:.0}% | {sp} | {ideal} | {pct} |",
                            med * 1e6,
                            spread / 2.0,
                            gbs / bw_t * 100.0,
                            gflops / (peak * *t as f64) * 100.0,
                        );
                    }
                }
            }
        }
    }
    println!();
    for (t, kern) in &kernels {
        let mut next = 0;
        let mut s: Vec<f64> = (0..31)
            .map(|_| bandwidth::read_window(&buf, kern, &mut next))
            .collect();
        println!(
            "read bandwidth at the end ({t} thread(s)): {:.1} GB/s",
            median(&mut s)
        );
    }
}
