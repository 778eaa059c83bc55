//! `patchc`: inspect ONNX models and compile them into PATCH bundles.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use patch_compiler::{inspect, onnx, pipeline};
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
    },
    /// List the ops the importer and interpreter support.
    ListOps,
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
        } => {
            let options = pipeline::CompileOptions {
                model,
                output: output.clone(),
                tokenizer,
                sparsity,
            };
            let report = pipeline::compile(&options, &registry)?;
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
