//! `patchc`: inspect ONNX models and compile them into PATCH bundles.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use patch_compiler::{inspect, onnx, pipeline};
use patch_kernels::{TileShape, WeightDtype};
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

#[derive(Subcommand)]
enum Command {
    /// Summarize an ONNX model: op histogram, weight MatMuls, parameter count.
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
        #[arg(long, default_value_t = 0.0)]
        sparsity: f64,
        /// Element type of the packed weights: f32, bf16 or f16 (activations stay f32).
        #[arg(long, default_value = "f32", value_parser = parse_weights)]
        weights: WeightDtype,
        /// Tile shape KxN of the hybrid format (K a multiple of 4).
        #[arg(long, default_value = "128x128", value_parser = parse_tile)]
        tile: TileShape,
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
            }
        }
        Command::Compile {
            model,
            output,
            tokenizer,
            sparsity,
            weights,
            tile,
        } => {
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
            let options = pipeline::CompileOptions {
                tokenizer,
                sparsity,
                weights,
                tile,
                progress: Some(std::sync::Arc::new(move |phase: &str, done, total| {
                    shown.set_message(phase.to_string());
                    shown.set_length(total as u64);
                    shown.set_position(done as u64);
                })),
                ..pipeline::CompileOptions::new(model, output.clone())
            };
            let report = pipeline::compile(&options, &registry);
            bar.finish_and_clear();
            let report = report?;
            let r = &report.json;
            eprintln!(
                "compiled {} nodes ({} imported), {} parameters, {} weight matmuls -> {}",
                r["nodes"]["final"],
                r["nodes"]["imported"],
                r["parameters"],
                r["weight_matmuls"],
                output.display()
            );
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
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
