//! `minserve generate`: one prompt, one sequence, streamed to stdout.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use minserve_core::detokenize::IncrementalDetokenizer;
use minserve_core::sampling::{sample, Rng, SamplingParams};
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::{CacheOptions, DeviceOptions, Runner};
use minserve_tokenizer::ChatMessage;

#[derive(Args)]
pub struct GenerateArgs {
    /// Model: a GGUF file, a Hugging Face folder, a catalog alias (`minserve fetch --list`),
    /// fetched on first use, or `synthetic:NAME[@FORMAT]` (random weights, byte tokenizer).
    #[arg(long, default_value_t = minserve_hub::default_model().to_string())]
    model: String,
    #[command(flatten)]
    weights: crate::model_source::WeightsArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler's random stream.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// KV cache size in MiB.
    #[arg(long, default_value_t = 256)]
    kv_cache_mib: usize,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let loaded = crate::model_source::load(&args.model, &args.weights)?;
    let tokenizer = loaded.tokenizer;
    let prompt_text = if args.chat {
        let template = tokenizer
            .chat_template()
            .context("--chat: the model has no chat template")?;
        template.render(&[ChatMessage::new("user", args.prompt.as_str())], true)?
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode(&prompt_text, true)?;
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let mut runner = Runner::new(
        loaded.model,
        CacheOptions {
            memory_bytes: args.kv_cache_mib << 20,
            ..CacheOptions::default()
        },
        DeviceOptions {
            device: args.weights.device()?,
            dtype: args.weights.dtype,
            gpu_memory_utilization: None,
            max_step_tokens: prompt.len(),
        },
    )?;
    let geometry = runner.cache_geometry();
    let max_len = prompt.len() + args.max_tokens;
    let blocks_needed = max_len.div_ceil(geometry.block_size);
    if blocks_needed > geometry.num_blocks {
        bail!(
            "{max_len} tokens need {blocks_needed} KV blocks but the cache has {}; raise --kv-cache-mib",
            geometry.num_blocks
        );
    }
    // One sequence owns the whole pool, so its block table is simply the first blocks.
    let block_table: Vec<u32> = (0..blocks_needed as u32).collect();
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: Some(args.seed),
        ..SamplingParams::default()
    };
    let mut rng = Rng::new(args.seed);
    let stop_ids = tokenizer.eos_token_ids().to_vec();

    let mut tokens = prompt.clone();
    let mut new_tokens: &[u32] = &prompt;
    let mut num_computed = 0;
    let mut generated: Vec<u32> = Vec::new();
    // Prints each token's text as it comes, never half a UTF-8 character.
    let mut detokenizer = IncrementalDetokenizer::new(&prompt);
    let mut stdout = std::io::stdout().lock();
    let start = Instant::now();
    let mut prefill_time = None;
    while generated.len() < args.max_tokens {
        let mut batch = StepBatch::new();
        batch.push_sequence(
            new_tokens,
            num_computed,
            &block_table,
            geometry.block_size,
            true,
        );
        let logits = runner.execute(&batch)?;
        num_computed += new_tokens.len();
        prefill_time.get_or_insert_with(|| start.elapsed());
        let next = sample(logits.row(0), &params, &mut rng);
        if stop_ids.contains(&next) {
            break;
        }
        generated.push(next);
        tokens.push(next);
        new_tokens = &tokens[tokens.len() - 1..];
        write!(stdout, "{}", detokenizer.push(next, &tokenizer))?;
        stdout.flush()?;
    }
    writeln!(stdout, "{}", detokenizer.finish(&tokenizer))?;
    let total = start.elapsed().as_secs_f64();
    let prefill = prefill_time.unwrap_or_default().as_secs_f64();
    let decode_steps = generated.len().saturating_sub(1).max(1);
    eprintln!(
        "prompt tokens: {}, generated tokens: {}, prefill: {:.1} tok/s, decode: {:.1} tok/s, peak RSS: {}",
        prompt.len(),
        generated.len(),
        prompt.len() as f64 / prefill.max(1e-9),
        decode_steps as f64 / (total - prefill).max(1e-9),
        peak_rss_mib().map_or("unknown".into(), |m| format!("{m} MiB")),
    );
    Ok(())
}

/// The process's peak resident memory (Linux `VmHWM`), to check the memory budget.
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
