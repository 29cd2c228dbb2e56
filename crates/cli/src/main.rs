//! `minserve`: a small, real LLM inference server.

mod bench;
mod engine_args;
mod eval;
mod export;
mod fetch;
mod generate;
mod kv_calc;
mod model_source;
mod quantize;
mod serve;
mod serve_config;
mod simulate;
mod trace;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "minserve",
    version,
    about = "A small, real LLM inference server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for one prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Benchmarks: offline throughput of the engine; load and sweeps against a server.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Download a model of the catalog (default: the default model); prints its local path.
    Fetch(fetch::FetchArgs),
    /// Measure a model: perplexity on a text, agreement with a reference model.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Export a GGUF model as a Hugging Face folder (safetensors, config.json, tokenizer).
    Export(export::ExportArgs),
    /// Quantize a GGUF model to a Hugging Face folder: RTN, GPTQ, AWQ or FP8, in the layouts
    /// of GPTQModel, AutoAWQ and compressed-tensors.
    Quantize(quantize::QuantizeArgs),
    /// Serve the OpenAI-compatible HTTP API (chat and text completions, streaming, metrics).
    Serve(serve::ServeArgs),
    /// The real scheduler without weights: step times from a cost model, on a virtual clock.
    #[command(subcommand)]
    Simulate(simulate::SimulateCommand),
    /// Read an engine trace (--trace-file): charts of each step, each request's timeline.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// KV cache size of a model: bytes per token and per sequence, blocks, for a batch.
    KvCalc(kv_calc::KvCalcArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The server logs one line per request by default.
    let default_filter = match cli.command {
        Command::Serve(_) => "warn,minserve_server=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Fetch(args) => fetch::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Eval(command) => eval::run(command),
        Command::Export(args) => export::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Simulate(command) => simulate::run(command),
        Command::Trace(command) => trace::run(command),
        Command::KvCalc(args) => kv_calc::run(args),
    }
}
