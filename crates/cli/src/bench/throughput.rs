//! `minserve bench throughput`: the offline throughput benchmark (like vLLM's
//! benchmark_throughput): seeded random prompts, all submitted at once, `ignore_eos`, timed
//! from the first step to the last token.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use minserve_core::live::LiveFeed;
use minserve_core::sampling::{Rng, SamplingParams};
use minserve_core::{EventSink, Request, RequestEvent};

use minserve_grammar::{Grammar, GrammarCompiler};
use minserve_model::step_profile::StepProfile;

use crate::engine_args::{build_engine, EngineArgs};

#[derive(Args)]
pub struct ThroughputArgs {
    /// Model: a path, a catalog alias, or `synthetic:NAME[@FORMAT]`.
    #[arg(long, default_value_t = minserve_hub::default_model().to_string())]
    model: String,
    #[command(flatten)]
    weights: crate::model_source::WeightsArgs,
    #[command(flatten)]
    shape: Shape,
    #[command(flatten)]
    engine: EngineArgs,
    /// Seed of the prompts and of sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Share of the requests (0 to 1) whose output must follow a JSON schema (a list of
    /// records, open-ended so that every request still runs `--output-len` tokens): the cost
    /// of structured outputs (docs/constrained-decoding.md).
    #[arg(long, default_value_t = 0.0)]
    json_schema_fraction: f64,
    /// Watch the engine as an open dashboard does (a thread reads the live feed ten times a
    /// second and serializes it to JSON): the cost of being watched (docs/dashboard.md).
    #[arg(long)]
    watch_live: bool,
    /// Time each phase of the forward pass (norms, activation quantization, each projection,
    /// RoPE, the KV write, attention, ...) and print where the run's time went.
    #[arg(long)]
    step_breakdown: bool,
}

/// A reader of the engine's live feed on a thread of its own, as the dashboard's events
/// stream reads it: every `PUSH_INTERVAL`, everything new, serialized.
struct LiveReader {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, usize)>,
}

impl LiveReader {
    const PUSH_INTERVAL: Duration = Duration::from_millis(100);

    fn start(feed: &Arc<LiveFeed>) -> Self {
        let mut watch = feed.watch();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut records, mut bytes) = (0, 0);
            loop {
                let done = stopped.load(Ordering::Relaxed);
                let update = watch.read();
                records += update.records.len() as u64;
                bytes += serde_json::to_vec(&update.records).map_or(0, |v| v.len());
                bytes += serde_json::to_vec(&update.block_map.as_deref()).map_or(0, |v| v.len());
                if done {
                    return (records, bytes);
                }
                std::thread::sleep(Self::PUSH_INTERVAL);
            }
        });
        Self { stop, thread }
    }

    /// Stops reading; returns the records read and the bytes they serialized to.
    fn finish(self) -> (u64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The schema of `--json-schema-fraction`: records with a name, a number and a flag, as many
/// as the output holds (it never completes, so `--output-len` tokens are drawn under it).
fn bench_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {"records": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 16},
                "value": {"type": "number"},
                "ok": {"type": "boolean"},
            },
            "required": ["name", "value", "ok"],
            "additionalProperties": false,
        }}},
        "required": ["records"],
    })
}

/// The requests of one run: `num_prompts` seeded random prompts of `prefix_len` shared and
/// `input_len` own tokens, each generating `output_len` tokens (EOS ignored). Also the
/// request flags of `simulate engine`.
#[derive(Args, Debug, Clone, Copy, serde::Serialize)]
pub struct Shape {
    #[arg(long, alias = "requests", default_value_t = 256)]
    pub num_prompts: usize,
    /// Prompt tokens per request (after the shared prefix, if any).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Generated tokens per request (EOS is ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Tokens of a prefix shared by every prompt, to exercise prefix caching.
    #[arg(long, default_value_t = 0)]
    pub prefix_len: usize,
}

impl Shape {
    /// Token ids are drawn from the upper three quarters of a vocabulary of `vocab`: real
    /// words, never special tokens. Each request samples with its own seed.
    pub fn requests(&self, vocab: u64, seed: u64) -> Vec<Request> {
        let mut rng = Rng::new(seed);
        let mut random_tokens = |n: usize| -> Vec<u32> {
            (0..n)
                .map(|_| (vocab / 4 + rng.next_u64() % (vocab - vocab / 4)) as u32)
                .collect()
        };
        let prefix = random_tokens(self.prefix_len);
        (0..self.num_prompts)
            .map(|i| {
                let mut prompt = prefix.clone();
                prompt.extend(random_tokens(self.input_len));
                let mut request = Request::new(prompt, self.output_len);
                request.ignore_eos = true;
                request.params = SamplingParams {
                    seed: Some(seed.wrapping_add(i as u64)),
                    ..SamplingParams::default()
                };
                request
            })
            .collect()
    }
}

/// `a / b`, or 0 when there is nothing to divide (a run without decode-only steps).
fn ratio_or_zero(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Counts generated tokens without keeping them.
pub struct CountingSink(pub Arc<AtomicUsize>);

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

pub fn run(args: ThroughputArgs) -> anyhow::Result<()> {
    let loaded = crate::model_source::load(&args.model, &args.weights)?;
    let max_model_len = loaded.model.config().max_position_embeddings;
    let vocab = loaded.model.config().vocab_size as u64;
    let device = args
        .engine
        .device_options(&args.weights, args.engine.kv_cache_mib.is_some())?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.json_schema_fraction),
        "--json-schema-fraction must be between 0 and 1"
    );
    let tokenizer = Arc::new(loaded.tokenizer);
    let grammar = match args.json_schema_fraction > 0.0 {
        true => {
            let compiler = GrammarCompiler::new(&tokenizer, vocab as usize)?;
            Some(compiler.compile(&Grammar::JsonSchema(bench_schema()))?)
        }
        false => None,
    };
    let mut engine = build_engine(
        loaded.model,
        tokenizer.clone(),
        args.engine.cache_options(),
        device,
        args.engine.engine_config(max_model_len),
        args.engine.swap_bytes(),
    )?;
    args.engine.configure(&mut engine, &tokenizer, &device)?;

    let generated = Arc::new(AtomicUsize::new(0));
    let shape = args.shape;
    let mut prompt_tokens = 0;
    for (i, mut request) in shape.requests(vocab, args.seed).into_iter().enumerate() {
        prompt_tokens += request.prompt.len();
        // Spread evenly: request i is constrained when the share so far is below the target.
        let constrained = ((i + 1) as f64 * args.json_schema_fraction).floor()
            > (i as f64 * args.json_schema_fraction).floor();
        if constrained {
            request.constraint = grammar.clone();
        }
        engine
            .submit(request, Box::new(CountingSink(generated.clone())))
            .map_err(|e| anyhow::anyhow!("request {i} rejected: {e}"))?;
    }

    let reader = args
        .watch_live
        .then(|| LiveReader::start(&engine.live_feed()));
    minserve_model::step_profile::enable(args.step_breakdown);
    let start = Instant::now();
    while engine.step() {}
    let elapsed = start.elapsed().as_secs_f64();
    minserve_model::step_profile::enable(false);
    let breakdown = args.step_breakdown.then(minserve_model::step_profile::take);
    let (live_records, live_bytes) = reader.map_or((0, 0), LiveReader::finish);
    let stats = engine.stats();
    let output_tokens = generated.load(Ordering::Relaxed);
    let decode_steps = stats.decode_steps as f64;
    let mean_decode_batch = ratio_or_zero(stats.decode_step_tokens as f64, decode_steps);
    let decode_step_ms = ratio_or_zero(stats.decode_step_seconds * 1e3, decode_steps);
    let decode_tokens_per_s =
        ratio_or_zero(stats.decode_step_tokens as f64, stats.decode_step_seconds);
    let report = serde_json::json!({
        "num_prompts": shape.num_prompts,
        "input_len": shape.input_len,
        "prefix_len": shape.prefix_len,
        "output_len": shape.output_len,
        "max_num_seqs": args.engine.scheduler.max_num_seqs,
        "max_num_batched_tokens": args.engine.scheduler.max_num_batched_tokens,
        "prefix_caching": !args.engine.scheduler.no_prefix_caching,
        "elapsed_s": elapsed,
        "requests_per_s": shape.num_prompts as f64 / elapsed,
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
        "json_schema_fraction": args.json_schema_fraction,
        "grammar_mask_s": stats.grammar_mask_seconds,
        "grammar_wait_s": stats.grammar_wait_seconds,
        "spec_draft_tokens": stats.spec_num_draft_tokens,
        "spec_accepted_tokens": stats.spec_num_accepted_tokens,
        "spec_draft_s": stats.spec_draft_seconds,
        "watch_live": args.watch_live,
        "live_records": live_records,
        "live_bytes": live_bytes,
        "step_breakdown": breakdown.as_ref().map(|b| breakdown_json(b, elapsed)),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "requests:          {} x ({} + {} prompt, {} output tokens)",
            shape.num_prompts, shape.prefix_len, shape.input_len, shape.output_len
        );
        println!(
            "elapsed:           {elapsed:.2} s over {} steps",
            stats.steps
        );
        println!(
            "requests/s:        {:.2}",
            shape.num_prompts as f64 / elapsed
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
        if args.watch_live {
            println!(
                "watched live:      {live_records} records read, {:.1} MiB of JSON",
                live_bytes as f64 / (1 << 20) as f64
            );
        }
        if let Some(breakdown) = &breakdown {
            print_breakdown(breakdown, elapsed);
        }
        if grammar.is_some() {
            println!(
                "grammar masks:     {:.3} s computed, {:.3} s of it waited for ({:.1}% of the run)",
                stats.grammar_mask_seconds,
                stats.grammar_wait_seconds,
                100.0 * stats.grammar_wait_seconds / elapsed
            );
        }
    }
    Ok(())
}

fn breakdown_json(profile: &StepProfile, elapsed: f64) -> serde_json::Value {
    let phases: serde_json::Map<String, serde_json::Value> = profile
        .seconds
        .iter()
        .map(|(phase, seconds)| (phase.name().to_string(), (*seconds).into()))
        .collect();
    serde_json::json!({
        "forward_passes": profile.steps,
        "phases_s": phases,
        "outside_forward_s": elapsed - profile.total_seconds(),
    })
}

/// The run's time by phase, largest first, with what the forward pass does not cover
/// (scheduling, sampling, the engine's bookkeeping) as its own line.
fn print_breakdown(profile: &StepProfile, elapsed: f64) {
    println!(
        "step breakdown:    {} forward passes, {:.2} s of the {elapsed:.2} s run",
        profile.steps,
        profile.total_seconds()
    );
    let mut lines: Vec<(&str, f64)> = profile
        .seconds
        .iter()
        .map(|(phase, seconds)| (phase.name(), *seconds))
        .collect();
    lines.push((
        "outside the forward pass",
        elapsed - profile.total_seconds(),
    ));
    lines.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("| phase | seconds | ms per pass | share of the run |");
    println!("| --- | --- | --- | --- |");
    let per_pass = |s: f64| 1e3 * s / profile.steps.max(1) as f64;
    for (name, seconds) in lines {
        println!(
            "| {name} | {seconds:.3} | {:.3} | {:.1}% |",
            per_pass(seconds),
            100.0 * seconds / elapsed
        );
    }
}
