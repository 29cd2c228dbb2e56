//! `minserve bench throughput`: the offline throughput benchmark (like vLLM's
//! benchmark_throughput): seeded random prompts, all submitted at once, `ignore_eos`, timed
//! from the first step to the last token.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use minserve_core::sampling::{Rng, SamplingParams};
use minserve_core::scheduler::{SchedulerConfig, SchedulingPolicy};
use minserve_core::{Engine, EngineConfig, EventSink, Request, RequestEvent};
use minserve_model::{CacheOptions, DeviceOptions, KvDtype, Runner};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Offline throughput: N random prompts submitted at once to the engine.
    Throughput(ThroughputArgs),
    /// Streaming load against any OpenAI-compatible server: TTFT, TPOT, ITL, throughput.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// `bench serve` at rising concurrency: a markdown table, JSON and a chart.
    Sweep(crate::bench_sweep::SweepArgs),
}

#[derive(Args)]
pub struct ThroughputArgs {
    /// Model: a path, a catalog alias, or `synthetic:NAME[@FORMAT]`.
    #[arg(long, default_value_t = minserve_hub::default_model().to_string())]
    model: String,
    #[command(flatten)]
    weights: crate::model_source::WeightsArgs,
    #[arg(long, default_value_t = 256)]
    num_prompts: usize,
    /// Prompt tokens per request (after the shared prefix, if any).
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Generated tokens per request (EOS is ignored).
    #[arg(long, default_value_t = 128)]
    output_len: usize,
    /// Tokens of a prefix shared by every prompt, to exercise prefix caching.
    #[arg(long, default_value_t = 0)]
    prefix_len: usize,
    #[command(flatten)]
    engine: EngineArgs,
    /// Seed of the prompts and of sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Engine settings shared by every command that runs the engine.
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Sequences per step at most.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Tokens per step at most (prompt chunks and decode tokens together).
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// KV cache size in MiB [default: 1024 on the CPU; on a GPU the cache takes what
    /// --gpu-memory-utilization leaves].
    #[arg(long)]
    pub kv_cache_mib: Option<usize>,
    /// On a GPU, the fraction of its memory minserve may use in all (weights, activations,
    /// KV cache), as vLLM's option of the same name; ignored when a cache size is given.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Number format of the cached keys and values: `f16` (half the memory and bandwidth of
    /// `f32`), `f32`, or `q8` (8 bits and a scale per token and KV head: about half of `f16`).
    #[arg(long, default_value = "f16")]
    pub kv_cache_dtype: KvDtype,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Turn automatic prefix caching off.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// `fcfs`, or `priority` (lower value first).
    #[arg(long, default_value = "fcfs", value_parser = ["fcfs", "priority"])]
    pub scheduling_policy: String,
    /// Write one JSON line per engine step to this file.
    #[arg(long)]
    pub trace_file: Option<PathBuf>,
}

impl EngineArgs {
    pub fn cache_options(&self) -> CacheOptions {
        CacheOptions {
            block_size: self.block_size,
            memory_bytes: self.kv_cache_mib.unwrap_or(1024) << 20,
            dtype: self.kv_cache_dtype,
        }
    }

    /// Where the model runs; `sized` says whether the command was given a cache size.
    pub fn device_options(
        &self,
        weights: &crate::model_source::WeightsArgs,
        sized: bool,
    ) -> anyhow::Result<DeviceOptions> {
        Ok(DeviceOptions {
            device: weights.device()?,
            dtype: weights.dtype,
            gpu_memory_utilization: (!sized).then_some(self.gpu_memory_utilization),
            max_step_tokens: self.max_num_batched_tokens,
        })
    }

    pub fn engine_config(&self, max_model_len: usize) -> EngineConfig {
        EngineConfig {
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
                policy: match self.scheduling_policy.as_str() {
                    "priority" => SchedulingPolicy::Priority,
                    _ => SchedulingPolicy::Fcfs,
                },
            },
            prefix_caching: !self.no_prefix_caching,
            max_model_len,
        }
    }
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Throughput(args) => throughput(args),
        BenchCommand::Serve(args) => crate::bench_serve::run(args),
        BenchCommand::Sweep(args) => crate::bench_sweep::run(args),
    }
}

/// `a / b`, or 0 when there is nothing to divide (a run without decode-only steps).
fn per(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Counts generated tokens without keeping them.
struct CountingSink(Arc<AtomicUsize>);

impl EventSink for CountingSink {
    fn send(&self, event: RequestEvent) -> bool {
        if let RequestEvent::Token { .. } = event {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
    fn is_closed(&self) -> bool {
        false
    }
}

fn throughput(args: ThroughputArgs) -> anyhow::Result<()> {
    let loaded = crate::model_source::load(&args.model, &args.weights)?;
    let max_model_len = loaded.model.config().max_position_embeddings;
    let vocab = loaded.model.config().vocab_size as u64;
    let eos = loaded.tokenizer.eos_token_ids().to_vec();
    let device = args
        .engine
        .device_options(&args.weights, args.engine.kv_cache_mib.is_some())?;
    let runner = Runner::new(loaded.model, args.engine.cache_options(), device)?;
    let mut engine = Engine::new(
        runner,
        args.engine.engine_config(max_model_len),
        Arc::new(loaded.tokenizer),
        eos,
    );
    if let Some(file) = &args.engine.trace_file {
        let out =
            std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
        engine.set_trace(Box::new(std::io::BufWriter::new(out)));
    }

    // Token ids from the upper part of the vocabulary: real words, never special tokens.
    let mut rng = Rng::new(args.seed);
    let mut random_tokens = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (vocab / 4 + rng.next_u64() % (vocab - vocab / 4)) as u32)
            .collect()
    };
    let prefix = random_tokens(args.prefix_len);
    let generated = Arc::new(AtomicUsize::new(0));
    let mut prompt_tokens = 0;
    for i in 0..args.num_prompts {
        let mut prompt = prefix.clone();
        prompt.extend(random_tokens(args.input_len));
        prompt_tokens += prompt.len();
        let mut request = Request::new(prompt, args.output_len);
        request.ignore_eos = true;
        request.params = SamplingParams {
            seed: Some(args.seed.wrapping_add(i as u64)),
            ..SamplingParams::default()
        };
        engine
            .submit(request, Box::new(CountingSink(generated.clone())))
            .map_err(|e| anyhow::anyhow!("request {i} rejected: {e}"))?;
    }

    let start = Instant::now();
    while engine.step() {}
    let elapsed = start.elapsed().as_secs_f64();
    let stats = engine.stats();
    let output_tokens = generated.load(Ordering::Relaxed);
    let decode_steps = stats.decode_steps as f64;
    let mean_decode_batch = per(stats.decode_step_tokens as f64, decode_steps);
    let decode_step_ms = per(stats.decode_step_seconds * 1e3, decode_steps);
    let decode_tokens_per_s = per(stats.decode_step_tokens as f64, stats.decode_step_seconds);
    let report = serde_json::json!({
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "prefix_len": args.prefix_len,
        "output_len": args.output_len,
        "max_num_seqs": args.engine.max_num_seqs,
        "max_num_batched_tokens": args.engine.max_num_batched_tokens,
        "prefix_caching": !args.engine.no_prefix_caching,
        "elapsed_s": elapsed,
        "requests_per_s": args.num_prompts as f64 / elapsed,
        "output_tokens_per_s": output_tokens as f64 / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) as f64 / elapsed,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "prefix_cache_hit_tokens": stats.prefix_hit_tokens,
        "prefix_cache_queried_tokens": stats.prefix_queried_tokens,
        "peak_kv_usage": stats.peak_kv_usage,
        "num_preemptions": stats.num_preemptions,
        "steps": stats.steps,
        "decode_steps": stats.decode_steps,
        "mean_decode_batch": mean_decode_batch,
        "decode_step_ms": decode_step_ms,
        "decode_tokens_per_s": decode_tokens_per_s,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "requests:          {} x ({} + {} prompt, {} output tokens)",
            args.num_prompts, args.prefix_len, args.input_len, args.output_len
        );
        println!(
            "elapsed:           {elapsed:.2} s over {} steps",
            stats.steps
        );
        println!(
            "requests/s:        {:.2}",
            args.num_prompts as f64 / elapsed
        );
        println!("output tokens/s:   {:.1}", output_tokens as f64 / elapsed);
        println!(
            "total tokens/s:    {:.1}",
            (prompt_tokens + output_tokens) as f64 / elapsed
        );
        println!(
            "prefix cache hits: {} of {prompt_tokens} prompt tokens",
            stats.prefix_hit_tokens
        );
        println!(
            "decode-only steps: {} of mean batch {mean_decode_batch:.1}, {decode_step_ms:.2} ms \
             each: {decode_tokens_per_s:.1} tokens/s",
            stats.decode_steps,
        );
        println!("peak KV usage:     {:.1}%", stats.peak_kv_usage * 100.0);
        println!("preemptions:       {}", stats.num_preemptions);
    }
    Ok(())
}
