//! `patchc`: inspect ONNX models and compile them into PATCH bundles.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use patch_compiler::calibrate::{layer_table, CalibOptions};
use patch_compiler::{inspect, onnx, pipeline};
use patch_kernels::{TileShape, WeightDtype};
use patch_passes::masks::blockwise::BlockwiseOptions;
use patch_passes::masks::{joint::JointOptions, patch::PatchOptions, Allocation, Method};
use patch_runtime::ops::OpRegistry;

#[derive(Parser)]
#[command(
    name = "patchc",
    version,
    about = "PATCH compiler: hybrid dense / 2:4 sparse LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Built once per process from the command line; boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Summarize an ONNX model: op histogram, weight MatMuls, parameter count, and what
    /// fusion forms and leaves unfused in the decode path.
    Inspect {
        /// The ONNX model (external data is found beside it).
        model: PathBuf,
        /// Print the imported IR in its text form instead of the summary.
        #[arg(long)]
        ir: bool,
    },
    /// Compile an ONNX model into a `.patch` bundle.
    Compile {
        /// The ONNX model (external data is found beside it).
        model: PathBuf,
        /// Where to write the bundle (written atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// The Hugging Face tokenizer.json (default: the one beside the model, if any).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Global sparsity in [0, 0.5]: the fraction of prunable weights set to zero.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        sparsity: f64,
        /// Element type of the packed weights: bf16, f16 or f32 (activations stay f32). bf16,
        /// the default, is the fastest at equal quality on every CPU measured (AVX2, AVX-512,
        /// AMX): half the bytes of f32 per decode step, and bf16 dot products for prompts where
        /// the CPU has them (SmolLM2 on 16,384 Brown tokens: perplexity 39.1180, f32 39.1165);
        /// f32 keeps the model's weights exactly.
        #[arg(long, default_value = "bf16", value_parser = parse_weights)]
        weights: WeightDtype,
        /// Tile shape KxN of the hybrid format (K a multiple of 4).
        #[arg(long, default_value = "128x128", value_parser = parse_tile)]
        tile: TileShape,
        /// Mask method when --sparsity > 0: patch (learned tiles), wanda, sparsegpt, magnitude.
        #[arg(long, default_value = "patch")]
        method: Method,
        /// Calibration text (default: models/brown/build/calib.txt when present).
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Calibration samples (windows spread evenly over the text).
        #[arg(long, default_value_t = 64)]
        calib_samples: usize,
        /// Tokens per calibration sample.
        #[arg(long, default_value_t = 512)]
        calib_seq: usize,
        /// Seed of the learned method's noise (a seed always gives the same bundle).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Update the kept weights once the mask is chosen (SparseGPT-style, and learned
        /// through the blocks): the default of --method patch and sparsegpt; this flag turns
        /// it on for wanda and magnitude.
        #[arg(long)]
        update_weights: bool,
        /// Keep the original values of the kept weights (masks only) with --method patch.
        #[arg(long, conflicts_with = "update_weights")]
        keep_weights: bool,
        /// Reuse calibration statistics from this file when it matches the model, text,
        /// samples and length; otherwise compute and save them there.
        #[arg(long)]
        calib_cache: Option<PathBuf>,
        /// Optimizer steps of the patch method.
        #[arg(long, default_value_t = 2000)]
        patch_steps: usize,
        /// PATCH-Joint: Adam steps per layer that learn the 2:4 patterns inside 2:4 tiles
        /// (0: PATCH-Tile, patterns frozen from the one-shot method).
        #[arg(long, default_value_t = 0)]
        joint_steps: usize,
        /// Learn masks block by block instead of matrix by matrix: Adam steps per transformer
        /// block (0: only the sequential prior, SparseGPT on the pruned model's statistics).
        #[arg(long, default_value_t = 64)]
        blockwise_steps: usize,
        /// Keep the matrix-wise masks of --method patch (no sequential block-wise stage).
        #[arg(long)]
        matrix_wise: bool,
        /// How --method patch shares the global budget between matrices: `loss` (by the
        /// estimated change of the model's loss, from gradients through the whole network),
        /// `relative` (by each matrix's own relative output error), `uniform-blocks` (as
        /// `loss`, every block at the global sparsity).
        #[arg(long, default_value = "loss")]
        allocation: Allocation,
        /// Calibration windows whose loss gradients give the `loss` allocation's sensitivities.
        #[arg(long, default_value_t = 16)]
        sensitivity_windows: usize,
        /// Skip the fusion pipeline (to compare fused and unfused bundles).
        #[arg(long)]
        no_fuse: bool,
        /// Worker threads of calibration's CPU kernels (default: every CPU this process may
        /// use; more are cut to that).
        #[arg(long, env = patch_kernels::dispatch::THREADS_ENV)]
        threads: Option<usize>,
        /// SIMD path of the CPU kernels: scalar, avx2, avx512, avx512bf16 or amx (default:
        /// the best this CPU has).
        #[arg(long, env = patch_kernels::dispatch::PATH_ENV, value_parser = parse_kernel_path, hide_short_help = true)]
        kernel_path: Option<patch_kernels::SimdPath>,
        /// Write the IR after every run of PASS to `<output>.<NN>.<pipeline>.<pass>.ir`
        /// (repeatable or comma-separated; `all` for every pass). Passes: fold-constants,
        /// canonicalize, cse, dce, hybrid-matmul, fuse.
        #[arg(long, value_name = "PASS", value_delimiter = ',')]
        dump_after: Vec<String>,
        /// Stop after the first run of PASS (no bundle is written); with --dump-after, to see
        /// the IR at one stage.
        #[arg(long, value_name = "PASS")]
        stop_after: Option<String>,
    },
    /// List the ops the importer and interpreter support.
    ListOps,
}

fn parse_weights(s: &str) -> Result<WeightDtype, String> {
    patch_runtime::ops::hybrid::dtype_from_name(s)
        .ok_or_else(|| format!("`{s}` is not one of f32, bf16, f16"))
}

fn parse_tile(s: &str) -> Result<TileShape, String> {
    let (k, n) = s
        .split_once('x')
        .ok_or_else(|| format!("`{s}` is not of the form KxN (e.g. 128x128)"))?;
    let parse = |v: &str| {
        v.parse::<usize>()
            .map_err(|_| format!("`{v}` in `{s}` is not a size"))
    };
    TileShape::new(parse(k)?, parse(n)?).map_err(|e| e.to_string())
}

fn parse_kernel_path(s: &str) -> Result<patch_kernels::SimdPath, String> {
    patch_kernels::SimdPath::parse_supported(s).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let registry = OpRegistry::onnx();
    match cli.command {
        Command::Inspect { model, ir } => {
            let loaded = onnx::load_model(&model)?;
            let graph = onnx::import_model(&loaded, &registry, &Default::default())
                .with_context(|| format!("importing `{}`", model.display()))?;
            if ir {
                print!("{}", graph.to_text());
            } else {
                print!("{}", inspect::summary(&graph));
                print!(
                    "{}",
                    inspect::fusion_summary(&graph, &registry)
                        .context("running the fusion pipeline on the imported graph")?
                );
            }
        }
        Command::Compile {
            model,
            output,
            tokenizer,
            sparsity,
            weights,
            tile,
            method,
            calib,
            calib_samples,
            calib_seq,
            seed,
            update_weights,
            keep_weights,
            patch_steps,
            joint_steps,
            blockwise_steps,
            matrix_wise,
            allocation,
            sensitivity_windows,
            calib_cache,
            no_fuse,
            threads,
            kernel_path,
            dump_after,
            stop_after,
        } => {
            if threads == Some(0) {
                anyhow::bail!("--threads must be at least 1");
            }
            let (_, note) = patch_kernels::CpuKernels::init_global_requested(threads, kernel_path)?;
            if let Some(note) = note {
                eprintln!("note: {note}");
            }
            // An interrupt (Ctrl-C, SIGTERM, SIGHUP) ends the compile without leaving a partial
            // bundle, cache or picture: outputs are written atomically, and the ones in
            // progress are removed here.
            ctrlc::set_handler(|| {
                patch_runtime::atomic::discard_in_flight();
                eprintln!("\ninterrupted: no partial output left; existing files are unchanged");
                std::process::exit(130);
            })
            .context("installing the interrupt handler")?;
            // Hidden automatically when stderr is not a terminal.
            let bar = indicatif::ProgressBar::new(1);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>14} [{bar:40}] {pos}/{len} ({elapsed})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            let shown = bar.clone();
            // Without a terminal, progress goes to stderr as plain lines.
            let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
            let last_line = std::sync::Mutex::new((String::new(), std::time::Instant::now()));
            let calib_cache_path = calib_cache.clone();
            let options = pipeline::CompileOptions {
                tokenizer,
                sparsity,
                weights,
                tile,
                calib: CalibOptions {
                    method,
                    text: calib,
                    samples: calib_samples,
                    seq: calib_seq,
                    seed,
                    update_weights: update_weights || (method == Method::Patch && !keep_weights),
                    cache: calib_cache,
                    patch: PatchOptions {
                        steps: patch_steps,
                        joint: JointOptions {
                            steps: joint_steps,
                            ..JointOptions::default()
                        },
                        ..PatchOptions::default()
                    },
                    blockwise: (!matrix_wise).then(|| BlockwiseOptions {
                        steps: blockwise_steps,
                        seed,
                        ..BlockwiseOptions::default()
                    }),
                    allocation,
                    sensitivity_windows,
                },
                fuse: !no_fuse,
                dump_after,
                stop_after,
                progress: Some(std::sync::Arc::new(move |phase: &str, done, total| {
                    shown.set_message(phase.to_string());
                    shown.set_length(total as u64);
                    shown.set_position(done as u64);
                    if plain {
                        plain_progress(&last_line, phase, done, total);
                    }
                })),
                ..pipeline::CompileOptions::new(model, output.clone())
            };
            let report = pipeline::compile(&options, &registry);
            bar.finish_and_clear();
            let report = report?;
            for path in &report.dumps {
                eprintln!("IR written to {}", path.display());
            }
            if let Some(pass) = &report.stopped_after {
                eprintln!("stopped after pass `{pass}` (--stop-after); no bundle written");
                return Ok(());
            }
            let Some(r) = &report.bundle else {
                return Ok(());
            };
            eprintln!(
                "compiled {} nodes ({} imported), {} parameters, {} weight matmuls -> {}",
                r.nodes.final_,
                r.nodes.imported,
                r.parameters,
                r.weight_matmuls,
                output.display()
            );
            if let Some(sp) = &r.sparse {
                eprint!("{}", layer_table(&sp.layers));
                eprintln!(
                    "method {}: sparsity {:.4} (target {}), tile map picture: {}",
                    sp.method, sp.achieved_sparsity, sp.target_sparsity, sp.tile_map_svg
                );
                let blocks = &sp.blockwise;
                if !blocks.is_empty() {
                    let n = blocks.len() as f64;
                    let prior: f64 = blocks.iter().map(|b| b.prior_error).sum();
                    let learned: f64 = blocks.iter().map(|b| b.error).sum();
                    eprintln!(
                        "block-wise learning: {} blocks, mean held-out block error {:.4} (prior) -> {:.4}; picture: {}",
                        blocks.len(),
                        prior / n,
                        learned / n,
                        sp.blockwise_svg.as_deref().unwrap_or("-")
                    );
                }
                if let (Some(why), Some(path)) = (&sp.cache_rejected, calib_cache_path.as_deref()) {
                    eprintln!(
                        "note: the calibration cache `{}` {why}; it was recomputed and written again",
                        path.display()
                    );
                }
                if let Some(why) = &sp.blockwise_fallback {
                    eprintln!("block-wise learning not run, matrix-wise masks kept: {why}");
                }
                if let Some(a) = &sp.allocation {
                    let per_block: Vec<String> = sp
                        .block_sparsity
                        .iter()
                        .map(|b| format!("{}:{:.0}%", b.block, 100.0 * b.sparsity))
                        .collect();
                    eprintln!("allocation {a}; sparsity per block {}", per_block.join(" "));
                }
                if let Some(why) = &sp.allocation_fallback {
                    eprintln!("the loss allocation was not used, relative errors instead: {why}");
                }
            }
            if let Some(f) = &r.fusion {
                let fused: Vec<String> = f
                    .fused
                    .iter()
                    .map(|o| format!("{} ×{}", o.op, o.count))
                    .collect();
                eprintln!(
                    "fusion: {} (e-graph {} nodes, {} iterations, {}); nodes {} imported -> {} cleaned -> {} final",
                    fused.join(", "),
                    f.runner.egraph_nodes,
                    f.runner.iterations,
                    f.runner.stop_reason,
                    r.nodes.imported,
                    r.nodes.after_cleanup,
                    r.nodes.final_,
                );
                let unfused: Vec<String> = f
                    .unfused_decode_ops
                    .iter()
                    .map(|o| format!("{} ×{}", o.op, o.count))
                    .collect();
                if unfused.is_empty() {
                    eprintln!("fusion: nothing left unfused in the decode path");
                } else {
                    eprintln!(
                        "fusion: left unfused in the decode path (each runs as its own op on every token): {}",
                        unfused.join(", ")
                    );
                }
            }
            let phases: Vec<String> = r
                .phase_seconds
                .iter()
                .map(|(phase, secs)| format!("{phase} {secs:.2}"))
                .collect();
            eprintln!("phase seconds: {}", phases.join(", "));
        }
        Command::ListOps => {
            println!("{:<12} {:<24} since opset", "domain", "op");
            for (domain, op, since) in registry.list() {
                let domain = if domain.is_empty() {
                    "ai.onnx"
                } else {
                    &domain
                };
                println!("{domain:<12} {op:<24} {since}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", patch_runtime::error::chain_message(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Prints `phase: done/total` when the phase changes, when it completes, and at most every
/// 10 seconds otherwise.
fn plain_progress(
    last: &std::sync::Mutex<(String, std::time::Instant)>,
    phase: &str,
    done: usize,
    total: usize,
) {
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    if last.0 != phase || done == total || last.1.elapsed().as_secs() >= 10 {
        eprintln!("{phase}: {done}/{total}");
        *last = (phase.to_string(), std::time::Instant::now());
    }
}
