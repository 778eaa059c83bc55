//! `cuda-bench`: hybrid dense / 2:4 products on the GPU, dense versus hybrid at each sparsity,
//! side by side in one run. Prints one row per (shape, rows, sparsity): median time, the
//! throughput (GB/s of weights for decode, TFLOP/s of the dense-equivalent work for prefill)
//! and the speed-up over the dense weight of the same shape.
//!
//! ```text
//! cargo run --release --bin cuda-bench -- [--dtype bf16|f16] [--reps 50] [--device 0]
//! ```

use std::time::Instant;

use patch_kernels::reference::uniform_values as randoms;
use patch_kernels::{
    bf16, f16, magnitude_24_mask, pack, PackedWeight, TileMap, TileShape, WeightDtype,
};
use patch_runtime::cuda::{CudaDevice, DeviceHybrid, DeviceTensor};
use patch_runtime::Tensor;

/// (name, K, N): SmolLM2-135M's projections and a 7B-class MLP.
const SHAPES: [(&str, usize, usize); 5] = [
    ("smollm2 q/o 576x576", 576, 576),
    ("smollm2 up 576x1536", 576, 1536),
    ("smollm2 down 1536x576", 1536, 576),
    ("7b qkvo 4096x4096", 4096, 4096),
    ("7b up 4096x11008", 4096, 11008),
];
const SPARSITIES: [f64; 4] = [0.0, 0.25, 0.4, 0.5];
const ROWS: [usize; 3] = [1, 16, 512];

fn packed(k: usize, n: usize, sparsity: f64, dtype: WeightDtype) -> Result<PackedWeight, String> {
    let tile = TileShape::new(128, 128).map_err(|e| e.to_string())?;
    let (kt, nt) = tile.grid(k, n);
    // A 2:4 tile prunes half its weights: a global sparsity s needs 2s of the tiles sparse.
    let map = TileMap::spread(kt, nt, (2.0 * sparsity).min(1.0));
    let w = randoms(k * n, (k * 7 + n) as u64);
    let keep = magnitude_24_mask(&w, k, n, tile, &map).map_err(|e| e.to_string())?;
    let r = match dtype {
        WeightDtype::Bf16 => {
            let v: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
            pack(&v, k, n, tile, &map, Some(&keep))
        }
        WeightDtype::F16 => {
            let v: Vec<f16> = w.iter().map(|&x| f16::from_f32(x)).collect();
            pack(&v, k, n, tile, &map, Some(&keep))
        }
        WeightDtype::F32 => pack(&w, k, n, tile, &map, Some(&keep)),
    };
    r.map_err(|e| e.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run() -> Result<(), String> {
    let mut dtype = WeightDtype::Bf16;
    let (mut reps, mut device) = (50usize, 0usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--dtype" => {
                dtype = match value()?.as_str() {
                    "bf16" => WeightDtype::Bf16,
                    "f16" => WeightDtype::F16,
                    "f32" => WeightDtype::F32,
                    other => return Err(format!("unknown dtype {other}")),
                }
            }
            "--reps" => reps = value()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--device" => device = value()?.parse().map_err(|e| format!("--device: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let dev = CudaDevice::open(device).map_err(|e| e.to_string())?;
    let (major, minor) = dev.compute_capability();
    println!(
        "device: {} (sm_{major}{minor}), weights {dtype}, 128x128 tiles, median of {reps} runs of 10 launches",
        dev.name()
    );
    println!(
        "{:<24} {:>5} {:>8} {:>10} {:>12} {:>9}",
        "shape", "rows", "sparsity", "µs", "throughput", "speed-up"
    );
    for (name, k, n) in SHAPES {
        for m in ROWS {
            let x = Tensor::from_vec(vec![m, k], randoms(m * k, 3)).map_err(|e| e.to_string())?;
            let x = DeviceTensor::upload(&dev, &x).map_err(|e| e.to_string())?;
            let mut dense_us = 0.0;
            for s in SPARSITIES {
                let w = packed(k, n, s, dtype)?;
                let bytes = w.packed_bytes() as f64;
                let dw = DeviceHybrid::upload(&dev, &w).map_err(|e| e.to_string())?;
                let launch = || {
                    dw.matmul(&dev, &x, None)
                        .map(drop)
                        .map_err(|e| e.to_string())
                };
                for _ in 0..5 {
                    launch()?;
                }
                dev.synchronize().map_err(|e| e.to_string())?;
                let mut times = Vec::with_capacity(reps);
                for _ in 0..reps {
                    let t = Instant::now();
                    for _ in 0..10 {
                        launch()?;
                    }
                    dev.synchronize().map_err(|e| e.to_string())?;
                    times.push(t.elapsed().as_secs_f64() * 1e6 / 10.0);
                }
                let us = median(times);
                if s == 0.0 {
                    dense_us = us;
                }
                let throughput = if m == 1 {
                    format!("{:.0} GB/s", bytes / us / 1e3)
                } else {
                    format!("{:.1} TFLOP/s", 2.0 * (m * k * n) as f64 / us / 1e6)
                };
                println!(
                    "{name:<24} {m:>5} {:>7.0}% {us:>10.1} {throughput:>12} {:>8.2}x",
                    s * 100.0,
                    dense_us / us
                );
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cuda-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
