//! `minserve eval`: measuring what a model (or a way of storing it) gets right.
//!
//! `eval perplexity` reads a text in strided windows ([`windows`]) through the model's own
//! paged forward pass ([`score`]) and reports the perplexity, `exp(mean -ln p(token))` over the
//! scored tokens; with `--reference` it reads the same windows with a second model (say, the
//! unquantized one) and reports how often the two models' top-1 guesses agree, the
//! teacher-forced agreement the quantization tables quote. `scripts/eval-text` fetches the text
//! the docs' figures are measured on.

mod score;
mod windows;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use minserve_model::{CacheOptions, DeviceOptions, KvDtype, Runner};
use serde::{Deserialize, Serialize};

use crate::model_source::WeightsArgs;
use score::{score_windows, StepLimits, TokenScore};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Perplexity of a model on a text file, read in strided windows.
    Perplexity(PerplexityArgs),
}

#[derive(Args)]
pub struct PerplexityArgs {
    /// Model: a GGUF file, a Hugging Face folder, a catalog alias or `synthetic:NAME[@FORMAT]`.
    #[arg(long, default_value_t = minserve_hub::default_model().to_string())]
    model: String,
    #[command(flatten)]
    weights: WeightsArgs,
    /// The text (UTF-8). `scripts/eval-text` fetches the one the docs use.
    #[arg(long)]
    text: PathBuf,
    /// Tokens the model reads per window (BOS included).
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Text tokens between window starts; each window scores the tokens no earlier window did.
    #[arg(long, default_value_t = 256)]
    stride: usize,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// A second model read on the same windows as it is stored: its file's own weight types
    /// (not --weights-format) and an f16 KV cache (not --kv-cache-dtype). Prints its
    /// perplexity and the share of scored places where both models' most likely token is the
    /// same.
    #[arg(long, conflicts_with = "reference_top1")]
    reference: Option<String>,
    /// Writes the model's most likely token at every scored place to FILE (JSON), for
    /// --reference-top1: a table of many formats reads the unquantized model once.
    #[arg(long)]
    write_top1: Option<PathBuf>,
    /// The reference's most likely tokens as --write-top1 wrote them, read instead of running
    /// a reference model; it must come from the same text, --context, --stride and
    /// --max-tokens.
    #[arg(long)]
    reference_top1: Option<PathBuf>,
    /// Number format of the cached keys and values (`f16`, `f32`, `q8`, `fp8`).
    #[arg(long, default_value = "f16")]
    kv_cache_dtype: KvDtype,
    /// Windows read side by side in one step.
    #[arg(long, default_value_t = 8)]
    windows_per_step: usize,
    /// Tokens per step at most, over all windows.
    #[arg(long, default_value_t = 1024)]
    max_num_batched_tokens: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The figures of one model on the text.
#[derive(Debug, Serialize)]
struct ModelResult {
    model: String,
    weights_format: Option<String>,
    kv_cache_dtype: String,
    perplexity: f64,
    mean_nll: f64,
    seconds: f64,
    scored_tokens_per_second: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    text: String,
    text_tokens: usize,
    scored_tokens: usize,
    windows: usize,
    context: usize,
    stride: usize,
    result: ModelResult,
    reference: Option<ModelResult>,
    /// Share of scored places where the model's top-1 token equals the reference's.
    top1_agreement: Option<f64>,
}

/// A model's most likely token at every scored place of a text (`--write-top1`), with what
/// fixes the places, so that a file of another reading is refused rather than compared.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct TopOneFile {
    model: String,
    text_tokens: usize,
    context: usize,
    stride: usize,
    /// A hash of the text's tokens: the same count of other tokens is another text.
    tokens_fingerprint: String,
    top1: Vec<u32>,
}

impl TopOneFile {
    fn fingerprint(tokens: &[u32]) -> String {
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let hash = tokens
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        format!("{hash:016x}")
    }

    /// The reference's top-1 tokens, if `path` was written for these places.
    fn read_matching(path: &std::path::Path, expected: &TopOneFile) -> anyhow::Result<Vec<u32>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--reference-top1: reading {}", path.display()))?;
        let file: TopOneFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "--reference-top1: {} is not a --write-top1 file",
                path.display()
            )
        })?;
        let fixed = |f: &TopOneFile| {
            (
                f.text_tokens,
                f.context,
                f.stride,
                f.tokens_fingerprint.clone(),
            )
        };
        anyhow::ensure!(
            fixed(&file) == fixed(expected) && file.top1.len() == expected.top1.len(),
            "--reference-top1 {} was written for {} tokens (fingerprint {}), --context {}, \
             --stride {} and {} scored places; this reading has {} tokens (fingerprint {}), \
             --context {}, --stride {} and {} places",
            path.display(),
            file.text_tokens,
            file.tokens_fingerprint,
            file.context,
            file.stride,
            file.top1.len(),
            expected.text_tokens,
            expected.tokens_fingerprint,
            expected.context,
            expected.stride,
            expected.top1.len()
        );
        Ok(file.top1)
    }
}

pub fn run(command: EvalCommand) -> anyhow::Result<()> {
    match command {
        EvalCommand::Perplexity(args) => perplexity(args),
    }
}

fn perplexity(args: PerplexityArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.text)
        .with_context(|| format!("reading {}", args.text.display()))?;
    let loaded = crate::model_source::load(&args.model, &args.weights)?;
    let tokenizer = &loaded.tokenizer;
    let mut tokens = tokenizer.encode(&text, false)?;
    if let Some(max) = args.max_tokens {
        tokens.truncate(max);
    }
    let bos = tokenizer
        .add_bos_token()
        .then(|| tokenizer.bos_token_id())
        .flatten();
    let max_positions = loaded.model.config().max_position_embeddings;
    anyhow::ensure!(
        args.context <= max_positions,
        "--context {} is longer than the model's context ({max_positions})",
        args.context
    );
    let windows = windows::plan(&tokens, bos, args.context, args.stride)?;
    let scored_tokens: usize = windows.iter().map(|w| w.targets().len()).sum();
    if !args.json {
        eprintln!(
            "{} tokens of {}; {} windows of {} (stride {}), {scored_tokens} tokens scored",
            tokens.len(),
            args.text.display(),
            windows.len(),
            args.context,
            args.stride
        );
    }

    let (result, scores) = evaluate(
        &args,
        &args.weights,
        args.kv_cache_dtype,
        &args.model,
        loaded,
        &windows,
    )?;
    let top1 = TopOneFile {
        model: args.model.clone(),
        text_tokens: tokens.len(),
        context: args.context,
        stride: args.stride,
        tokens_fingerprint: TopOneFile::fingerprint(&tokens),
        top1: scores.iter().map(|s| s.argmax).collect(),
    };
    if let Some(path) = &args.write_top1 {
        std::fs::write(path, serde_json::to_string(&top1)?)
            .with_context(|| format!("--write-top1: writing {}", path.display()))?;
    }
    let mut reference = None;
    let mut top1_agreement = None;
    if let Some(path) = &args.reference_top1 {
        let theirs = TopOneFile::read_matching(path, &top1)?;
        let agree = top1
            .top1
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a == b)
            .count();
        top1_agreement = Some(agree as f64 / theirs.len() as f64);
    }
    if let Some(name) = &args.reference {
        let as_stored = WeightsArgs {
            weights_format: None,
            ..args.weights.clone()
        };
        let other = crate::model_source::load(name, &as_stored)?;
        let same_tokens = other.tokenizer.encode(&text, false)?;
        anyhow::ensure!(
            same_tokens.starts_with(&tokens),
            "--reference {name} splits the text into other tokens: the two models cannot be compared place by place"
        );
        let (result, reference_scores) =
            evaluate(&args, &as_stored, KvDtype::F16, name, other, &windows)?;
        let agree = scores
            .iter()
            .zip(&reference_scores)
            .filter(|(a, b)| a.argmax == b.argmax)
            .count();
        top1_agreement = Some(agree as f64 / scores.len() as f64);
        reference = Some(result);
    }
    let report = Report {
        text: args.text.display().to_string(),
        text_tokens: tokens.len(),
        scored_tokens,
        windows: windows.len(),
        context: args.context,
        stride: args.stride,
        result,
        reference,
        top1_agreement,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Puts `loaded` (loaded as `weights` says) behind a runner with a `kv_dtype` cache and scores
/// `windows` with it.
fn evaluate(
    args: &PerplexityArgs,
    weights: &WeightsArgs,
    kv_dtype: KvDtype,
    name: &str,
    loaded: minserve_model::LoadedModel,
    windows: &[windows::Window],
) -> anyhow::Result<(ModelResult, Vec<TokenScore>)> {
    let vocab = loaded.model.config().vocab_size;
    let device = DeviceOptions {
        device: weights.device()?,
        dtype: weights.dtype,
        gpu_memory_utilization: None,
        max_step_tokens: args.max_num_batched_tokens,
    };
    // Room for the windows read side by side, with slack for block rounding.
    let per_token = kv_dtype.bytes_per_token(loaded.model.config());
    let cache = CacheOptions {
        memory_bytes: per_token * args.windows_per_step * (args.context + 32) * 5 / 4,
        dtype: kv_dtype,
        ..CacheOptions::default()
    };
    let mut runner = Runner::new(loaded.model, cache, device)?;
    let limits = StepLimits::new(
        args.max_num_batched_tokens,
        256 << 20,
        vocab,
        args.windows_per_step,
    );
    let started = Instant::now();
    let total = windows.len();
    let quiet = args.json;
    let scores = score_windows(&mut runner, windows, limits, |done| {
        if !quiet {
            eprint!("\r{name}: {done}/{total} windows");
        }
    })?;
    if !quiet {
        eprintln!();
    }
    let seconds = started.elapsed().as_secs_f64();
    let mean_nll = scores.iter().map(|s| s.nll).sum::<f64>() / scores.len() as f64;
    let result = ModelResult {
        model: name.to_string(),
        weights_format: weights.weights_format.map(|f| format!("{f:?}")),
        kv_cache_dtype: format!("{kv_dtype:?}").to_lowercase(),
        perplexity: mean_nll.exp(),
        mean_nll,
        seconds,
        scored_tokens_per_second: scores.len() as f64 / seconds,
    };
    Ok((result, scores))
}

fn print_report(report: &Report) {
    let line = |r: &ModelResult| {
        println!(
            "{} (weights {}, KV {}): perplexity {:.4} (mean NLL {:.4} nats), {:.1} s, {:.0} scored tokens/s",
            r.model,
            r.weights_format.as_deref().unwrap_or("as stored"),
            r.kv_cache_dtype,
            r.perplexity,
            r.mean_nll,
            r.seconds,
            r.scored_tokens_per_second
        )
    };
    line(&report.result);
    if let Some(reference) = &report.reference {
        line(reference);
    }
    if let Some(agreement) = report.top1_agreement {
        println!(
            "top-1 agreement with the reference: {:.2}% of {} places",
            100.0 * agreement,
            report.scored_tokens
        );
    }
}

#[cfg(test)]
mod tests;
