//! Dumps, for weight MatMuls of a model, the weight, its calibration Gram matrix and our
//! SparseGPT result at full 2:4, as `.npy` files, so that `benches/peers/sparsegpt_crosscheck.py`
//! can run a reference SparseGPT (llm-compressor's) on the same weight and statistics and
//! compare.
//!
//! ```text
//! cargo run --release --example sparsegpt_layers -- MODEL.onnx CALIB_CACHE OUT_DIR [FILTER...]
//! ```
//!
//! `CALIB_CACHE` is a `patchc compile --calib-cache` file made from `MODEL`; FILTER keeps the
//! weights whose node name contains any of the given strings (default: every weight).

use std::io::Write;
use std::path::{Path, PathBuf};

use patch_compiler::{calibrate, onnx};
use patch_kernels::{TileKind, TileMap, TileShape};
use patch_passes::cleanup_pipeline;
use patch_passes::masks::sparsegpt;
use patch_runtime::ops::OpRegistry;

/// A little-endian `.npy` (format 1.0) of `shape` with `descr` (`<f4`, `<f8`, `|u1`).
fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    // Magic (6) + version (2) + length (2) + header, padded with spaces to 64, newline last.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    f.write_all(data)?;
    f.flush()
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, cache, out, filters @ ..] = args.as_slice() else {
        return Err("usage: sparsegpt_layers MODEL.onnx CALIB_CACHE OUT_DIR [FILTER...]".into());
    };
    let registry = OpRegistry::onnx();
    let proto = onnx::load_model(Path::new(model)).map_err(|e| e.to_string())?;
    let mut graph =
        onnx::import_model(&proto, &registry, &Default::default()).map_err(|e| e.to_string())?;
    // Calibration sees the cleaned graph; its activation names are the cache's keys.
    cleanup_pipeline(&registry)
        .run(&mut graph)
        .map_err(|e| e.to_string())?;
    let calib = calibrate::read_cache(Path::new(cache), &graph)
        .ok_or_else(|| format!("{cache}: not a calibration cache of {model}"))?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let tile = TileShape::new(128, 128).map_err(|e| e.to_string())?;
    for t in calibrate::prunable(&graph) {
        if !filters.is_empty() && !filters.iter().any(|f| t.node.contains(f.as_str())) {
            continue;
        }
        let x = graph.node(t.node_id).inputs[0].ok_or("MatMul without an input")?;
        let gram = calib
            .grams
            .get(&x)
            .ok_or_else(|| format!("no statistics for `{}`", t.node))?;
        let w = t.oriented_weight(&graph).map_err(|e| e.to_string())?;
        let (kt, nt) = tile.grid(t.k, t.n);
        let map = TileMap::uniform(kt, nt, TileKind::Sparse24);
        let start = std::time::Instant::now();
        let (pruned, keep) = sparsegpt::prune(&w, t.k, t.n, gram, &map, tile, None)?;
        let secs = start.elapsed().as_secs_f64();
        let dir = out.join(t.node.trim_start_matches('/').replace('/', "."));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let io = |e: std::io::Error| e.to_string();
        write_npy(
            &dir.join("w.npy"),
            "<f4",
            &[t.k, t.n],
            bytemuck::cast_slice(&w),
        )
        .map_err(io)?;
        write_npy(
            &dir.join("h.npy"),
            "<f8",
            &[t.k, t.k],
            bytemuck::cast_slice(&gram.h),
        )
        .map_err(io)?;
        write_npy(
            &dir.join("ours.npy"),
            "<f4",
            &[t.k, t.n],
            bytemuck::cast_slice(&pruned),
        )
        .map_err(io)?;
        let keep: Vec<u8> = keep.iter().map(|&k| u8::from(k)).collect();
        write_npy(&dir.join("ours_keep.npy"), "|u1", &[t.k, t.n], &keep).map_err(io)?;
        println!(
            "{} [{} x {}]: {secs:.2} s -> {}",
            t.node,
            t.k,
            t.n,
            dir.display()
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sparsegpt_layers: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
