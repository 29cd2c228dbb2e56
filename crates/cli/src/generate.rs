//! `minserve generate`: one prompt, its text streamed to stdout and a line of figures to
//! stderr, on the same [`Engine`](minserve_core::Engine) as `serve` and `bench throughput`
//! (built by [`build_engine`]): the prompt is one request, the engine is stepped on this thread
//! until it has nothing left to do, and the request's events are printed after each step.
//!
//! The engine is sized for that one request: one sequence slot, and a step budget of the whole
//! prompt, so that the prompt is computed in one forward pass (the prefill figure is that
//! pass) and every later step decodes one token. The request is validated like any other,
//! once, by [`Engine::submit`](minserve_core::Engine::submit) (against the model's context and
//! the cache); only the advice in the message of a request that could never fit is this
//! command's.

use std::io::Write;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use minserve_core::sampling::SamplingParams;
use minserve_core::scheduler::SchedulerConfig;
use minserve_core::{EngineConfig, Request, RequestError, RequestEvent};
use minserve_model::{CacheOptions, DeviceOptions};
use minserve_tokenizer::ChatMessage;

use crate::engine_args::build_engine;

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
    let tokenizer = &loaded.tokenizer;
    let prompt_text = if args.chat {
        let template = tokenizer
            .chat_template()
            .context("--chat: the model has no chat template")?;
        template.render(&[ChatMessage::new("user", args.prompt.as_str())], true)?
    } else {
        args.prompt.clone()
    };
    // A chat template writes any BOS itself, as the server relies on too.
    let prompt = tokenizer.encode(&prompt_text, !args.chat)?;
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let eos_token_ids = tokenizer.eos_token_ids().to_vec();
    let max_model_len = loaded.model.config().max_position_embeddings;
    let cache = CacheOptions {
        memory_bytes: args.kv_cache_mib << 20,
        ..CacheOptions::default()
    };
    let device = DeviceOptions {
        device: args.weights.device()?,
        dtype: args.weights.dtype,
        gpu_memory_utilization: None,
        max_step_tokens: prompt.len(),
    };
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: prompt.len(),
            max_num_seqs: 1,
            ..SchedulerConfig::default()
        },
        // One request: no other prompt could share its prefix.
        prefix_caching: false,
        max_model_len,
    };
    let mut engine = build_engine(
        loaded.model,
        Arc::new(loaded.tokenizer),
        cache,
        device,
        config,
        0,
    )?;

    let mut request = Request::new(prompt.clone(), args.max_tokens);
    request.params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: Some(args.seed),
        ..SamplingParams::default()
    };
    let (events, received) = mpsc::channel();
    engine
        .submit(request, Box::new(events))
        .map_err(|e| match e {
            RequestError::NeverFits {
                needed,
                available,
                tokens,
            } => anyhow!(
                "{tokens} tokens need {needed} KV blocks but the cache has {available}; raise --kv-cache-mib"
            ),
            other => other.into(),
        })?;
    let mut printer = TextPrinter::new(std::io::stdout().lock(), eos_token_ids);
    let start = Instant::now();
    while engine.step() {
        for event in received.try_iter() {
            printer.print(event)?;
        }
    }
    let total = start.elapsed().as_secs_f64();
    let prefill = printer
        .first_token_at
        .map_or(0.0, |at| (at - start).as_secs_f64());
    let generated = printer.generated;
    let decode_steps = generated.saturating_sub(1).max(1);
    eprintln!(
        "prompt tokens: {}, generated tokens: {}, prefill: {:.1} tok/s, decode: {:.1} tok/s, peak RSS: {}",
        prompt.len(),
        generated,
        prompt.len() as f64 / prefill.max(1e-9),
        decode_steps as f64 / (total - prefill).max(1e-9),
        peak_rss_mib().map_or("unknown".into(), |m| format!("{m} MiB")),
    );
    Ok(())
}

/// Writes one request's text as its events arrive, and counts what the figures need.
struct TextPrinter<W: Write> {
    out: W,
    eos_token_ids: Vec<u32>,
    /// Tokens of the text: an EOS token ends it without being part of it.
    generated: usize,
    /// When the first token arrived: the end of the prefill.
    first_token_at: Option<Instant>,
}

impl<W: Write> TextPrinter<W> {
    fn new(out: W, eos_token_ids: Vec<u32>) -> Self {
        Self {
            out,
            eos_token_ids,
            generated: 0,
            first_token_at: None,
        }
    }

    /// Prints what `event` adds to the text (the engine never splits a UTF-8 character); the
    /// text ends with a newline. A request the engine failed is an error.
    fn print(&mut self, event: RequestEvent) -> anyhow::Result<()> {
        match event {
            RequestEvent::Scheduled { .. } => {}
            RequestEvent::Token { token, text, .. } => {
                self.first_token_at.get_or_insert_with(Instant::now);
                if !self.eos_token_ids.contains(&token) {
                    self.generated += 1;
                }
                write!(self.out, "{text}")?;
                self.out.flush()?;
            }
            RequestEvent::Finished { text, .. } => writeln!(self.out, "{text}")?,
            RequestEvent::Failed(message) => bail!(message),
        }
        Ok(())
    }
}

/// The process's peak resident memory (Linux `VmHWM`), to check the memory budget.
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use minserve_core::FinishReason;

    use super::*;

    fn token(token: u32, text: &str) -> RequestEvent {
        RequestEvent::Token {
            index: 0,
            token,
            text: text.into(),
            logprob: None,
            top_logprobs: Vec::new(),
        }
    }

    #[test]
    fn text_printer_prints_the_text_and_counts_eos_out() {
        let mut printer = TextPrinter::new(Vec::new(), vec![2]);
        printer
            .print(RequestEvent::Scheduled {
                at: Instant::now(),
                cached_tokens: 0,
            })
            .unwrap();
        assert_eq!(printer.first_token_at, None);
        for event in [
            token(10, " Par"),
            token(11, ""),
            token(12, "is."),
            token(2, ""),
            RequestEvent::Finished {
                index: 0,
                reason: FinishReason::Stop,
                text: "!".into(),
                completion_tokens: 4,
                stop_reason: None,
                accepted_prediction_tokens: 0,
            },
        ] {
            printer.print(event).unwrap();
        }
        assert_eq!(String::from_utf8(printer.out).unwrap(), " Paris.!\n");
        assert_eq!(printer.generated, 3);
        assert!(printer.first_token_at.is_some());
    }

    #[test]
    fn text_printer_fails_with_the_engines_message() {
        let mut printer = TextPrinter::new(Vec::new(), vec![2]);
        let error = printer
            .print(RequestEvent::Failed("model execution failed: boom".into()))
            .unwrap_err();
        assert_eq!(error.to_string(), "model execution failed: boom");
    }
}
