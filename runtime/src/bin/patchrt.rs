//! `patchrt`: load and inspect PATCH bundles.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use patch_runtime::bundle::{self, LoadOptions};
use patch_runtime::ops::OpRegistry;

#[derive(Parser)]
#[command(
    name = "patchrt",
    version,
    about = "PATCH runtime: run compiled hybrid sparse LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what a bundle holds: graph, tensors, tokenizer, generation metadata, report.
    Inspect {
        bundle: PathBuf,
        /// Also print the graph's IR text.
        #[arg(long)]
        ir: bool,
    },
}

fn run(cli: Cli) -> Result<(), String> {
    let registry = OpRegistry::onnx();
    match cli.command {
        Command::Inspect { bundle: path, ir } => {
            let b = bundle::load_bundle(&path, &registry, LoadOptions::default())
                .map_err(|e| e.to_string())?;
            let c = &b.contents;
            let g = &c.graph;
            println!(
                "bundle {} ({} bytes, format v{})",
                path.display(),
                b.file_len,
                bundle::FORMAT_VERSION
            );
            for (k, v) in &c.metadata {
                println!("  {k}: {v}");
            }
            println!(
                "graph {:?}: opset {}, {} nodes, {} constants, {} parameters",
                g.name,
                g.opset,
                g.node_count(),
                g.consts().count(),
                g.const_elements()
            );
            for (id, role) in g.inputs() {
                println!(
                    "  input  {:<28} {:<30} {}",
                    g.value(*id).name,
                    g.value(*id).ty.to_string(),
                    role.label()
                );
            }
            for (id, role) in g.outputs() {
                println!(
                    "  output {:<28} {:<30} {}",
                    g.value(*id).name,
                    g.value(*id).ty.to_string(),
                    role.label()
                );
            }
            match &c.tokenizer_json {
                Some(t) => println!("tokenizer: {} bytes of tokenizer.json", t.len()),
                None => println!("tokenizer: none"),
            }
            let gen = &c.generation;
            println!(
                "generation: eos {:?}, bos {:?}, max context {:?}, chat template {}",
                gen.eos_token_ids,
                gen.bos_token_id,
                gen.max_context,
                if gen.chat_template.is_some() {
                    "yes"
                } else {
                    "no"
                }
            );
            println!("compile report: {}", c.compile_report_json);
            if ir {
                print!("{}", g.to_text());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
