//! `patchrt`: run, evaluate, benchmark and inspect PATCH bundles.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use patch_kernels::CpuKernels;
use patch_runtime::bundle::{self, LoadOptions};
use patch_runtime::interp::PlanOptions;
use patch_runtime::llm::text::render_chat;
use patch_runtime::llm::{
    bench, eval, Backend, ChatMessage, LanguageModel, LlmError, SamplingOptions,
};
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

/// Options every command that runs the model shares.
#[derive(Args)]
struct RunOpts {
    /// The bundle (`patchc compile ... -o model.patch`).
    bundle: PathBuf,
    /// Worker threads for the kernels (default: every CPU this process may use; more are cut
    /// to that).
    #[arg(long, env = patch_kernels::dispatch::THREADS_ENV)]
    threads: Option<usize>,
    /// SIMD path of the CPU kernels: scalar, avx2, avx512, avx512bf16 or amx (default: the
    /// best this CPU has).
    #[arg(long, env = patch_kernels::dispatch::PATH_ENV, value_parser = parse_kernel_path, hide_short_help = true)]
    kernel_path: Option<patch_kernels::SimdPath>,
    /// Skip the checksum of the whole file at load (faster start on large bundles).
    #[arg(long)]
    no_verify: bool,
    /// Print the time spent per op type on stderr at the end (cpu backend).
    #[arg(long)]
    profile: bool,
    /// Where to run: cpu, or cuda[:N] (GPU N; needs an NVIDIA GPU of compute capability 8.0+,
    /// its driver, and NVRTC on the library path).
    #[arg(long, default_value = "cpu")]
    backend: Backend,
    /// Measuring aids: turn off the static memory plan (every op allocates its outputs).
    #[arg(long, hide_short_help = true)]
    no_memory_plan: bool,
    /// Measuring aids: dispatch sibling products (Q/K/V, gate/up) one by one.
    #[arg(long, hide_short_help = true)]
    no_sibling_groups: bool,
    /// Measuring aids: compute every prompt row's logits, as the graph says, instead of the
    /// rows the generation keeps.
    #[arg(long, hide_short_help = true)]
    all_logit_rows: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout (tokens/s on stderr).
    Run {
        #[command(flatten)]
        opts: RunOpts,
        /// The prompt.
        #[arg(long, short)]
        prompt: String,
        /// Wrap the prompt in the model's chat template as a user message.
        #[arg(long)]
        chat: bool,
        /// System message for --chat (default: the template's own).
        #[arg(long, requires = "chat")]
        system: Option<String>,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// 0 = greedy; otherwise sample with this temperature.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Sample only among the k most likely tokens (0 = all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sample only from the smallest set of tokens whose probability reaches p.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed of the sampler (a given seed always gives the same text).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Perplexity of a text file: non-overlapping windows of --seq tokens, no BOS.
    Eval {
        #[command(flatten)]
        opts: RunOpts,
        /// UTF-8 text to evaluate.
        #[arg(long)]
        text: PathBuf,
        /// Window length in tokens.
        #[arg(long, default_value_t = 512)]
        seq: usize,
        /// Use only the first N tokens of the text (default: all).
        #[arg(long)]
        tokens: Option<usize>,
        /// Also print one line per window with its summed NLL.
        #[arg(long)]
        per_window: bool,
    },
    /// Prefill and decode throughput: a table of medians and spreads over repeats.
    Bench {
        #[command(flatten)]
        opts: RunOpts,
        /// Timed repeats of every row (after one warm-up).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Prompt lengths of the prefill rows.
        #[arg(long, value_delimiter = ',', default_value = "128,512")]
        prefill: Vec<usize>,
        /// Context before the timed decode steps.
        #[arg(long, default_value_t = 128)]
        decode_context: usize,
        /// Single-token steps timed per decode repeat.
        #[arg(long, default_value_t = 32)]
        decode_steps: usize,
    },
    /// Print what a bundle holds: graph, tensors, tokenizer, generation metadata, report.
    Inspect {
        bundle: PathBuf,
        /// Also print the graph's IR text.
        #[arg(long)]
        ir: bool,
    },
}

fn parse_kernel_path(s: &str) -> Result<patch_kernels::SimdPath, String> {
    patch_kernels::SimdPath::parse_supported(s).map_err(|e| e.to_string())
}

/// Sets up the process's CPU kernels from `--threads` and `--kernel-path`.
fn init_kernels(
    threads: Option<usize>,
    path: Option<patch_kernels::SimdPath>,
) -> Result<(), String> {
    let (_, note) = CpuKernels::init_global_requested(threads, path).map_err(|e| match e {
        patch_kernels::KernelError::BadThreads(_) => "--threads must be at least 1".to_string(),
        e => e.to_string(),
    })?;
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    Ok(())
}

fn load_model(opts: &RunOpts, registry: &OpRegistry) -> Result<LanguageModel, String> {
    init_kernels(opts.threads, opts.kernel_path)?;
    let t = Instant::now();
    let b = bundle::load_bundle(
        &opts.bundle,
        registry,
        LoadOptions {
            verify_checksum: !opts.no_verify,
        },
    )
    .map_err(|e| e.to_string())?;
    let mut model = LanguageModel::with_backend(b.contents, opts.backend)
        .map_err(|e| format!("{}: {e}", opts.bundle.display()))?;
    model.set_plan_options(PlanOptions {
        memory_plan: !opts.no_memory_plan,
        sibling_groups: !opts.no_sibling_groups,
        cut_logit_rows: !opts.all_logit_rows,
    });
    model.set_profiling(opts.profile);
    eprintln!(
        "loaded {} in {:.2} s on {} ({} layers, vocab {}, {})",
        opts.bundle.display(),
        t.elapsed().as_secs_f64(),
        model.backend_name(),
        model.layers(),
        model.vocab(),
        if model.has_kv_cache() {
            "KV cache"
        } else {
            "no KV cache"
        }
    );
    Ok(model)
}

fn print_profile(model: &LanguageModel) {
    let rows = model.profile();
    if rows.is_empty() {
        return;
    }
    let total: f64 = rows.iter().map(|(_, t)| t.seconds).sum();
    eprintln!("time per op type ({total:.3} s in ops):");
    eprintln!(
        "  {:<24} {:>9} {:>10} {:>7}",
        "op", "calls", "seconds", "share"
    );
    let matmul: f64 = rows
        .iter()
        .filter(|(op, _)| matches!(op.as_str(), "patch.HybridMatMul" | "MatMul" | "Gemm"))
        .map(|(_, t)| t.seconds)
        .sum();
    for (op, t) in rows {
        eprintln!(
            "  {op:<24} {:>9} {:>10.4} {:>6.1}%",
            t.calls,
            t.seconds,
            100.0 * t.seconds / total
        );
    }
    eprintln!(
        "ops other than MatMul/Gemm/HybridMatMul: {:.1}% of the time in ops",
        100.0 * (total - matmul) / total.max(f64::MIN_POSITIVE)
    );
    let runs = model.profile_runs();
    if runs.seconds > 0.0 {
        let share = |s: f64| 100.0 * s / runs.seconds;
        eprintln!(
            "{} forward passes, {:.3} s: outside the MatMuls {:.1}% (other ops {:.1}%, the \
             interpreter between ops {:.1}%)",
            runs.calls,
            runs.seconds,
            share(runs.seconds - matmul),
            share(total - matmul),
            share(runs.seconds - total),
        );
    }
    print_memory(model);
}

/// The memory plan of the activations and how its slots served the runs (on the CPU).
fn print_memory(model: &LanguageModel) {
    if model.backend() != Backend::Cpu {
        return;
    }
    let (plan, stats) = (model.memory_plan(), model.slot_stats());
    eprintln!(
        "memory plan: {} activations in {} slots, arena {} bytes (each in its own buffer: {}); \
         slots now hold {:.1} MB; {} outputs written into a slot, {} allocated (slot in use, \
         or grown for a larger call)",
        plan.planned_values(),
        stats.slots,
        plan.arena_bytes(),
        plan.unshared_bytes(),
        stats.idle_bytes as f64 / 1e6,
        stats.hits,
        stats.misses,
    );
}

fn kernels_line() -> String {
    match CpuKernels::global() {
        Ok(k) => format!("{} threads, {:?} kernels", k.threads(), k.path()),
        Err(e) => e.to_string(),
    }
}

fn progress(total: u64, what: &str) -> ProgressBar {
    // Hidden automatically when stderr is not a terminal.
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn read_text(path: &Path) -> Result<String, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "`{}` is not UTF-8 (first bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn generate(
    model: &LanguageModel,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
    max_tokens: usize,
    sampling: SamplingOptions,
) -> Result<(), LlmError> {
    let tok = model.tokenizer()?;
    let text = if chat {
        let template = model
            .generation
            .chat_template
            .as_deref()
            .ok_or(LlmError::NoChatTemplate)?;
        let name = |id: Option<i64>| id.and_then(|i| tok.token(i as u32)).unwrap_or_default();
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(ChatMessage::system(s));
        }
        messages.push(ChatMessage::user(prompt));
        render_chat(
            template,
            &messages,
            &name(model.generation.bos_token_id),
            &name(model.generation.eos_token_ids.first().copied()),
        )?
    } else {
        prompt.to_string()
    };
    // A rendered chat template writes its own special tokens.
    let ids = if chat {
        tok.encode(&text)?
    } else {
        model.encode_prompt(&text)?
    };
    model.check_prompt(&ids)?;
    if !model.has_kv_cache() {
        eprintln!(
            "note: this graph has no past key/value inputs, so every step recomputes the whole \
             prefix; compile the with-past export (e.g. Optimum's) for fast generation"
        );
    }
    let mut out = std::io::stdout().lock();
    let (_, g) = model.stream(&ids, max_tokens, sampling, &mut |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    let (prefill_s, decode_s, generated, stop) = (g.prefill_s, g.decode_s, g.tokens.len(), g.stop);
    eprintln!(
        "prompt: {} tokens in {:.2} s ({:.1} tokens/s); generated {} tokens in {:.2} s ({:.1} tokens/s), stopped at {stop}; {}",
        ids.len(),
        prefill_s,
        ids.len() as f64 / prefill_s,
        generated,
        decode_s,
        generated as f64 / decode_s.max(1e-9),
        kernels_line()
    );
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    let registry = OpRegistry::onnx();
    match cli.command {
        Command::Run {
            opts,
            prompt,
            chat,
            system,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
        } => {
            let sampling = SamplingOptions {
                temperature,
                top_k,
                top_p,
                seed,
            };
            sampling.validate()?;
            let model = load_model(&opts, &registry)?;
            generate(
                &model,
                &prompt,
                chat,
                system.as_deref(),
                max_tokens,
                sampling,
            )
            .map_err(|e| e.to_string())?;
            print_profile(&model);
        }
        Command::Eval {
            opts,
            text,
            seq,
            tokens,
            per_window,
        } => {
            let model = load_model(&opts, &registry)?;
            let tok = model.tokenizer().map_err(|e| e.to_string())?;
            let t = Instant::now();
            let mut ids = tok.encode(&read_text(&text)?).map_err(|e| e.to_string())?;
            eprintln!(
                "tokenized {} into {} tokens in {:.2} s",
                text.display(),
                ids.len(),
                t.elapsed().as_secs_f64()
            );
            if let Some(n) = tokens {
                ids.truncate(n);
            }
            let bar = progress((ids.len() / seq.max(1)) as u64, "windows");
            let t = Instant::now();
            let p = eval::perplexity(&model, &ids, seq, |done, _| bar.set_position(done as u64))
                .map_err(|e| e.to_string())?;
            bar.finish_and_clear();
            let secs = t.elapsed().as_secs_f64();
            if per_window {
                for (i, nll) in p.window_nll.iter().enumerate() {
                    println!("window {i:>5}  nll_sum {nll:.4}");
                }
            }
            println!(
                "perplexity {:.4}  (mean NLL {:.6} nats; {} windows of {} tokens, {} predictions, {} tokens used)",
                p.perplexity(),
                p.mean_nll(),
                p.windows(),
                seq,
                p.predicted,
                p.tokens_used()
            );
            eprintln!(
                "{:.1} s, {:.0} tokens/s; {}",
                secs,
                p.tokens_used() as f64 / secs,
                kernels_line()
            );
            print_profile(&model);
        }
        Command::Bench {
            opts,
            repeats,
            prefill,
            decode_context,
            decode_steps,
        } => {
            let model = load_model(&opts, &registry)?;
            println!("bundle: {}", opts.bundle.display());
            println!("{}; repeats {repeats} (+1 warm-up); decode: {decode_steps} steps after a {decode_context}-token prefill", kernels_line());
            if !model.has_kv_cache() {
                println!(
                    "note: no KV cache in this graph; decode recomputes the prefix every step"
                );
            }
            println!("| row | median tokens/s | spread | runs |");
            println!("|---|---|---|---|");
            let options = bench::BenchOptions {
                prefill,
                decode_context,
                decode_steps,
                repeats,
            };
            let mut probe = bench::BandwidthProbe::default();
            let on_cpu = model.backend() == Backend::Cpu;
            let rows = bench::run(&model, &options, on_cpu.then_some(&mut probe), |row| {
                let runs: Vec<String> =
                    row.tokens_per_s.iter().map(|v| format!("{v:.1}")).collect();
                println!(
                    "| {} | {:.1} | ±{:.1}% | {} |",
                    row.name,
                    row.median(),
                    row.spread_pct(),
                    runs.join(" ")
                );
            })
            .map_err(|e| e.to_string())?;
            if let (Some(decode), false) = (rows.last(), probe.gb_per_s.is_empty()) {
                let (bytes, gbs) = (model.weight_bytes_per_token() as f64, probe.median());
                let bound = gbs * 1e9 / bytes;
                println!(
                    "\n{}: {:.1} tokens/s × {:.1} MB of weights per token = {:.1} GB/s; read \
                     bandwidth in this run {gbs:.1} GB/s (median of {} probes between the \
                     repeats) → bound {bound:.1} tokens/s; decode at {:.0}% of it",
                    decode.name,
                    decode.median(),
                    bytes / 1e6,
                    decode.median() * bytes / 1e9,
                    probe.gb_per_s.len(),
                    100.0 * decode.median() / bound
                );
            }
            print_profile(&model);
            if model.profile().is_empty() {
                print_memory(&model);
            }
        }
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
                g.parameter_count()
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
                "generation: eos {:?}, bos {:?} ({}), max context {:?}, chat template {}",
                gen.eos_token_ids,
                gen.bos_token_id,
                match gen.add_bos_token {
                    Some(true) => "prompts start with it",
                    Some(false) => "never added",
                    None => "as the tokenizer's post-processor adds it",
                },
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
