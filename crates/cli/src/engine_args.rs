//! The engine as the commands run it: the flags that `serve` and `bench throughput` share
//! ([`EngineArgs`]), what they become (the model runner's [`CacheOptions`] and
//! [`DeviceOptions`], the engine's [`EngineConfig`], a step trace file), and
//! [`build_engine`], which puts a loaded model behind a runner and an engine for the commands
//! that step the engine on their own thread (`generate`, `bench throughput`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use minserve_core::draft_model::DraftModel;
use minserve_core::scheduler::{Batching, PreemptionMode, SchedulerConfig, SchedulingPolicy};
use minserve_core::speculative::{DraftMethod, Drafter, SpeculativeConfig};
use minserve_core::trace::TraceOptions;
use minserve_core::{Engine, EngineConfig, ModelExecutor};
use minserve_model::{CacheOptions, DeviceOptions, KvDtype, LlamaModel, Runner};
use minserve_tokenizer::Tokenizer;

use crate::model_source::WeightsArgs;

/// The scheduler's settings: shared by every command that runs the engine, and by
/// `simulate`, which runs the same scheduler without a model.
#[derive(Args, Clone)]
pub struct SchedulerArgs {
    /// Sequences per step at most.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Tokens per step at most (prompt chunks and decode tokens together).
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Turn automatic prefix caching off.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// `fcfs`, `priority` (lower value first), or `fair-share` (weighted fair queuing
    /// across the tenants of --api-keys: docs/tenants.md). Default: `fcfs`, or `fair-share`
    /// when `serve` has --api-keys.
    #[arg(long, value_parser = ["fcfs", "priority", "fair-share"])]
    pub scheduling_policy: Option<String>,
    /// `continuous` (waiting requests join the batch at every step), or `static` (a batch is
    /// formed only once the previous one has finished: the pre-Orca baseline).
    #[arg(long, default_value = "continuous", value_parser = ["continuous", "static"])]
    pub batching: String,
    /// When the head of the queue does not fit in the KV cache, admit up to this many later
    /// requests that do fit ahead of it (per head, so it is never starved); 0: off.
    #[arg(long, default_value_t = 0)]
    pub backfill: usize,
    /// A waiting request that does not fit preempts running requests of a lower priority
    /// (greater value) to make room. Implies --scheduling-policy priority.
    #[arg(long)]
    pub priority_preemption: bool,
    /// What a preempted sequence's KV cache becomes: `recompute` (dropped, computed again when
    /// it resumes) or `swap` (copied to a host pool of --swap-space-mib and back).
    #[arg(long, default_value = "recompute", value_parser = ["recompute", "swap"])]
    pub preemption_mode: String,
}

/// A memory size: a number with an optional unit. Binary units (`KiB`, `MiB`, `GiB`, `TiB`,
/// and the bare `K`, `M`, `G`, `T` as in `java -Xmx` or `docker --memory`) count in 1024s,
/// decimal ones (`KB`, `MB`, `GB`, `TB`) in 1000s, `B` is bytes; no unit means MiB, the unit
/// of --kv-cache-mib.
pub fn parse_memory(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` does not start with a number (e.g. 512MiB, 1GiB)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "k" | "kib" => 1024.0,
        "" | "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`; use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            ))
        }
    };
    let bytes = number * scale;
    if !(1.0..=usize::MAX as f64).contains(&bytes) {
        return Err(format!("`{text}` is not a usable memory size"));
    }
    Ok(bytes as usize)
}

/// A --scheduling-policy name.
pub fn parse_policy(name: &str) -> Result<SchedulingPolicy, String> {
    match name {
        "fcfs" => Ok(SchedulingPolicy::Fcfs),
        "priority" => Ok(SchedulingPolicy::Priority),
        "fair-share" => Ok(SchedulingPolicy::FairShare),
        other => Err(format!(
            "unknown scheduling policy `{other}`: fcfs, priority or fair-share"
        )),
    }
}

impl SchedulerArgs {
    /// The scheduler's budget and policy; `max_model_len` is the model's context length.
    pub fn engine_config(&self, max_model_len: usize) -> EngineConfig {
        EngineConfig {
            scheduler: SchedulerConfig {
                max_num_batched_tokens: self.max_num_batched_tokens,
                max_num_seqs: self.max_num_seqs,
                policy: if self.priority_preemption {
                    SchedulingPolicy::Priority
                } else {
                    self.scheduling_policy
                        .as_deref()
                        .map_or(Ok(SchedulingPolicy::Fcfs), parse_policy)
                        .expect("clap checked the policy name")
                },
                batching: match self.batching.as_str() {
                    "static" => Batching::Static,
                    _ => Batching::Continuous,
                },
                backfill: self.backfill,
                priority_preemption: self.priority_preemption,
                preemption_mode: self.preemption_mode(),
            },
            prefix_caching: !self.no_prefix_caching,
            max_model_len,
        }
    }

    pub fn preemption_mode(&self) -> PreemptionMode {
        match self.preemption_mode.as_str() {
            "swap" => PreemptionMode::Swap,
            _ => PreemptionMode::Recompute,
        }
    }
}

/// Engine settings shared by every command that runs the engine.
#[derive(Args, Clone)]
pub struct EngineArgs {
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// KV cache size in MiB [default: 1024 on the CPU; on a GPU the cache takes what
    /// --gpu-memory-utilization leaves].
    #[arg(long)]
    pub kv_cache_mib: Option<usize>,
    /// On a GPU, the fraction of its memory minserve may use in all (weights, activations,
    /// KV cache), as vLLM's option of the same name; ignored when a cache size is given.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Number format of the cached keys and values: `f16` (half the memory and bandwidth of
    /// `f32`), `f32`, `q8` (8 bits and a scale per token and KV head: about half of `f16`), or
    /// `fp8` (FP8 E4M3 and a scale per token and KV head: the size of `q8`; CPU only).
    #[arg(long, default_value = "f16")]
    pub kv_cache_dtype: KvDtype,
    /// Host memory for the KV cache of sequences preempted with --preemption-mode swap, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub swap_space_mib: usize,
    /// Write the engine trace (a JSON line per step and per request event; docs/trace.md) to
    /// this file.
    #[arg(long)]
    pub trace_file: Option<PathBuf>,
    /// Add every scheduled sequence's block tables to the trace's step records.
    #[arg(long, requires = "trace_file")]
    pub trace_blocks: bool,
    /// Speculative decoding: `ngram` drafts each decoding sequence's next tokens by prompt
    /// lookup (what followed the last few tokens where they occurred before in the prompt or
    /// output); `draft:MODEL` drafts them with a smaller model that shares the target's
    /// tokenizer (a GGUF file, a Hugging Face folder or a catalog name, loaded as its file
    /// stores it, on the same device). Drafts are verified in one step; greedy output is
    /// unchanged, sampling keeps its distribution (docs/speculative-decoding.md).
    #[arg(long, value_parser = parse_speculative)]
    pub speculative: Option<SpeculativeMethodArg>,
    /// The draft model's KV cache, in MiB, with --speculative draft:MODEL. Sequences that find
    /// it full decode without drafts until it has room.
    #[arg(long, default_value_t = 256, requires = "speculative")]
    pub draft_kv_cache_mib: usize,
    /// Draft tokens per sequence per step at most, with --speculative.
    #[arg(long, default_value_t = 4, requires = "speculative")]
    pub num_speculative_tokens: usize,
    /// No drafting in a step with more running sequences than this. Default: 4 with a draft
    /// model (its passes delay the whole batch), no limit with `ngram`.
    #[arg(long, requires = "speculative")]
    pub speculative_disable_by_batch_size: Option<usize>,
    /// Prompt lookup matches the sequence's last N tokens for N from --prompt-lookup-max down
    /// to this.
    #[arg(long, default_value_t = 2, requires = "speculative")]
    pub prompt_lookup_min: usize,
    /// The longest suffix prompt lookup tries to match.
    #[arg(long, default_value_t = 4, requires = "speculative")]
    pub prompt_lookup_max: usize,
}

/// A --speculative method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpeculativeMethodArg {
    Ngram,
    /// The draft model's `--model`-style name.
    Draft(String),
}

/// A --speculative value: `ngram` or `draft:MODEL`.
pub fn parse_speculative(text: &str) -> Result<SpeculativeMethodArg, String> {
    match text.split_once(':') {
        _ if text == "ngram" => Ok(SpeculativeMethodArg::Ngram),
        Some(("draft", model)) if !model.trim().is_empty() => {
            Ok(SpeculativeMethodArg::Draft(model.trim().to_string()))
        }
        Some(("draft", _)) => Err(
            "`draft:` needs a model: draft:MODEL, a GGUF file, a Hugging Face folder or a catalog \
             name whose tokenizer is the target's"
                .into(),
        ),
        _ => Err(format!(
            "unknown speculative method `{text}`: use `ngram` or `draft:MODEL`"
        )),
    }
}

/// Refuses a draft model whose token ids mean something else than the target's.
fn ensure_same_vocabulary(draft: &Tokenizer, target: &Tokenizer) -> anyhow::Result<()> {
    anyhow::ensure!(
        draft.vocab_size() == target.vocab_size(),
        "the draft model's tokenizer has {} tokens and the target's {}: a draft model must \
         share the target's tokenizer",
        draft.vocab_size(),
        target.vocab_size()
    );
    let differing =
        (0..draft.vocab_size() as u32).find(|&id| draft.id_to_token(id) != target.id_to_token(id));
    if let Some(id) = differing {
        anyhow::bail!(
            "token {id} is {:?} in the draft model's tokenizer and {:?} in the target's: a \
             draft model must share the target's tokenizer",
            draft.id_to_token(id),
            target.id_to_token(id)
        );
    }
    Ok(())
}

impl EngineArgs {
    /// The KV cache: 1 GiB unless --kv-cache-mib says otherwise (on a GPU without a size,
    /// [`device_options`](Self::device_options) lets the runner size it instead).
    pub fn cache_options(&self) -> CacheOptions {
        CacheOptions {
            block_size: self.scheduler.block_size,
            memory_bytes: self.kv_cache_mib.unwrap_or(1024) << 20,
            dtype: self.kv_cache_dtype,
        }
    }

    /// Host memory of the swap pool: none unless preemption swaps.
    pub fn swap_bytes(&self) -> usize {
        match self.scheduler.preemption_mode() {
            PreemptionMode::Swap => self.swap_space_mib << 20,
            PreemptionMode::Recompute => 0,
        }
    }

    /// What the trace records beyond the default.
    pub fn trace_options(&self) -> TraceOptions {
        TraceOptions {
            block_tables: self.trace_blocks,
        }
    }

    /// Where the model runs; `sized` says whether the command was given a cache size.
    pub fn device_options(
        &self,
        weights: &WeightsArgs,
        sized: bool,
    ) -> anyhow::Result<DeviceOptions> {
        Ok(DeviceOptions {
            device: weights.device()?,
            dtype: weights.dtype,
            gpu_memory_utilization: (!sized).then_some(self.gpu_memory_utilization),
            max_step_tokens: self.scheduler.max_num_batched_tokens,
        })
    }

    /// The scheduler's budget and policy; `max_model_len` is the model's context length.
    pub fn engine_config(&self, max_model_len: usize) -> EngineConfig {
        self.scheduler.engine_config(max_model_len)
    }

    /// Speculative decoding's settings, if --speculative is on.
    pub fn speculative_config(&self) -> anyhow::Result<Option<SpeculativeConfig>> {
        let Some(method) = &self.speculative else {
            return Ok(None);
        };
        anyhow::ensure!(
            self.num_speculative_tokens >= 1,
            "--num-speculative-tokens must be at least 1"
        );
        let config = match method {
            SpeculativeMethodArg::Draft(_) => {
                SpeculativeConfig::draft_model(self.num_speculative_tokens)
            }
            SpeculativeMethodArg::Ngram => {
                let (min_n, max_n) = (self.prompt_lookup_min, self.prompt_lookup_max);
                anyhow::ensure!(
                    (1..=max_n).contains(&min_n),
                    "--prompt-lookup-min ({min_n}) must be at least 1 and at most \
                     --prompt-lookup-max ({max_n})"
                );
                SpeculativeConfig {
                    method: DraftMethod::Ngram { min_n, max_n },
                    ..SpeculativeConfig::ngram(self.num_speculative_tokens)
                }
            }
        };
        Ok(Some(SpeculativeConfig {
            disable_by_batch_size: self
                .speculative_disable_by_batch_size
                .or(config.disable_by_batch_size),
            ..config
        }))
    }

    /// What these flags set on an engine once it is built: the trace and speculative
    /// decoding. A draft model is loaded here, on the target's `device`, and checked against
    /// the target's `tokenizer`.
    pub fn configure<E: ModelExecutor>(
        &self,
        engine: &mut Engine<E>,
        tokenizer: &Tokenizer,
        device: &DeviceOptions,
    ) -> anyhow::Result<()> {
        if let Some(trace) = self.trace_writer()? {
            engine.set_trace(trace, self.trace_options());
        }
        let Some(config) = self.speculative_config()? else {
            return Ok(());
        };
        match &self.speculative {
            Some(SpeculativeMethodArg::Draft(model)) => {
                let vocab_size = engine.limits().vocab_size;
                let drafter = self
                    .load_draft_model(model, tokenizer, vocab_size, device)
                    .with_context(|| format!("the draft model {model}"))?;
                engine.set_draft_model(config, drafter);
            }
            _ => engine.set_speculative(config),
        }
        Ok(())
    }

    /// The draft model behind its own runner and KV cache (--draft-kv-cache-mib).
    fn load_draft_model(
        &self,
        model: &str,
        target_tokenizer: &Tokenizer,
        target_vocab_size: usize,
        device: &DeviceOptions,
    ) -> anyhow::Result<Box<dyn Drafter>> {
        let weights = WeightsArgs {
            weights_format: None,
            lm_head_format: None,
            device: device.device,
            dtype: device.dtype,
        };
        let loaded = crate::model_source::load(model, &weights)?;
        ensure_same_vocabulary(&loaded.tokenizer, target_tokenizer)?;
        let max_len = loaded.model.config().max_position_embeddings;
        let cache = CacheOptions {
            block_size: self.scheduler.block_size,
            memory_bytes: self.draft_kv_cache_mib << 20,
            dtype: self.kv_cache_dtype,
        };
        let device = DeviceOptions {
            gpu_memory_utilization: None,
            max_step_tokens: DraftModel::<Runner>::MAX_STEP_TOKENS.max(self.scheduler.max_num_seqs),
            ..*device
        };
        let runner = Runner::new(loaded.model, cache, device)?;
        let drafter =
            DraftModel::new(runner, target_vocab_size, max_len).map_err(anyhow::Error::msg)?;
        Ok(Box::new(drafter))
    }

    /// The --trace-file to hand to [`Engine::set_trace`], created (truncated) now, if one was
    /// given.
    pub fn trace_writer(&self) -> anyhow::Result<Option<Box<dyn Write + Send>>> {
        let Some(file) = &self.trace_file else {
            return Ok(None);
        };
        let out =
            std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
        Ok(Some(Box::new(std::io::BufWriter::new(out))))
    }
}

/// A loaded model on its device, with its KV cache (and a host swap pool of `swap_bytes`),
/// driven by an engine configured by `config`; `tokenizer` (the model's, shared so that a server can tokenize with it too)
/// detokenizes the output and names the EOS ids.
pub fn build_engine(
    model: LlamaModel,
    tokenizer: Arc<Tokenizer>,
    cache: CacheOptions,
    device: DeviceOptions,
    config: EngineConfig,
    swap_bytes: usize,
) -> anyhow::Result<Engine<Runner>> {
    build_engine_with(
        model,
        tokenizer,
        cache,
        device,
        config,
        swap_bytes,
        |runner| runner,
    )
}

/// [`build_engine`] with the runner wrapped by `wrap` (`simulate calibrate` watches each
/// batch it runs).
pub fn build_engine_with<E: ModelExecutor>(
    model: LlamaModel,
    tokenizer: Arc<Tokenizer>,
    cache: CacheOptions,
    device: DeviceOptions,
    config: EngineConfig,
    swap_bytes: usize,
    wrap: impl FnOnce(Runner) -> E,
) -> anyhow::Result<Engine<E>> {
    let eos = tokenizer.eos_token_ids().to_vec();
    let mut runner = Runner::new(model, cache, device)?;
    runner.set_swap_space(swap_bytes)?;
    Ok(Engine::new(wrap(runner), config, tokenizer, eos))
}
