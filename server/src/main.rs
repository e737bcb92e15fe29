//! `moeserve`: DeepSeek-V3/R1-class MoE inference.

mod bench;
mod cli_eval_quant;
mod cli_generate;
mod cli_logits;
mod cli_plan;
mod cli_synth;
mod engine_args;
mod http;
mod source;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "moeserve", version, about = "Inference server for DeepSeek-V3/R1-class Mixture-of-Experts models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text (streamed to stdout) or token ids from a prompt.
    Generate(cli_generate::Args),
    /// Write float32 logits (and MTP logits) of a token sequence to a safetensors file.
    Logits(cli_logits::Args),
    /// Write a random-weight checkpoint in the official DeepSeek layout.
    Synth(cli_synth::Args),
    /// Measure prefill and decode throughput and peak memory.
    Bench(bench::Args),
    /// Quality of an in-situ quantization against the checkpoint's format: KL divergence, top-1
    /// agreement, perplexity, resident bytes.
    EvalQuant(cli_eval_quant::Args),
    /// Capacity planning: bytes per rank for weights, latent KV and reserves, and which TP/EP
    /// layouts hold the model on the given GPUs (or a CPU host's RAM).
    Plan(cli_plan::Args),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(http::Args),
}

fn main() {
    pin_thread_count();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cli_generate::run(a),
        Command::Logits(a) => cli_logits::run(a),
        Command::Synth(a) => cli_synth::run(a),
        Command::Bench(a) => bench::run(a),
        Command::EvalQuant(a) => cli_eval_quant::run(a),
        Command::Plan(a) => cli_plan::run(a),
        Command::Serve(a) => http::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// candle looks up its thread count on every CPU op and, unless `RAYON_NUM_THREADS` is set,
/// counts the physical cores by reading /proc/cpuinfo each time (tens of microseconds, dozens
/// of times per decode step). Set it once, before any thread starts, to the size rayon's pool
/// takes anyway.
///
/// candle 0.11 also runs its large elementwise ops on a pool of its own (`candle-bp-N` threads,
/// `CANDLE_NUM_THREADS - 1` of them) beside rayon's, which the kernels use: while a step's glue
/// ran such an op, its worker competed for the cores with the kernels' threads, and between ops
/// it spun (perf, bench-small q4_K prefill: 1.6 % of all samples on that thread, most of them its
/// spin). With `CANDLE_NUM_THREADS=1` that pool has no workers and its ops run on the calling
/// thread, so the process keeps one thread per core (bench-small q4_K, 3 interleaved rounds
/// against `CANDLE_NUM_THREADS=2`: prefill pp128 1016–1046 tok/s against 880–1007, decode the
/// same). Either variable set by the user is kept.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
