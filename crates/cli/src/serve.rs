//! `minserve serve`: the OpenAI-compatible HTTP API (see the `minserve-server` crate). This is
//! where model, engine and server meet: each model is loaded and put into an engine on its own
//! thread here, and the server only ever sees the engines' handles and the tokenizers.
//!
//! One `--model` serves one model as it always has. Several (`--model A --model B=NAME`), or a
//! `--config FILE` (`serve_config.rs`), serve several in one process: each its own engine and
//! KV pool (the KV memory split between them), loaded in the background each on its own.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use minserve_core::engine_thread::EngineHandle;
use minserve_core::EngineConfig;
use minserve_model::{CacheOptions, DeviceOptions, LoadedModel};
use minserve_server::{
    ApiKeys, AppState, ModelSpec, ReasoningFormat, ServedModel, ServerOptions, ToolCallFormat,
};

use crate::engine_args::{build_engine, parse_memory, EngineArgs};
use crate::serve_config;

#[derive(Args)]
pub struct ServeArgs {
    /// Model: a GGUF file, a Hugging Face folder, a catalog alias (fetched on first use), or
    /// `synthetic:NAME[@FORMAT]` (random weights, byte tokenizer). Repeat it to serve several
    /// models, each as `SOURCE[=NAME]` (NAME: the id clients send), sharing the KV cache
    /// memory equally. Default: the default model.
    #[arg(long = "model", value_name = "MODEL")]
    models: Vec<String>,
    /// Serve the models of this TOML file instead (each with its own engine flags, share of
    /// the KV cache memory and aliases; see docs/multi-model.md).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["models", "served_model_name"])]
    config: Option<std::path::PathBuf>,
    /// API keys of tenants, with their fair-share weights and limits (TOML; docs/tenants.md).
    /// Reloaded on SIGHUP. Makes `fair-share` the default --scheduling-policy.
    #[arg(long, value_name = "FILE")]
    api_keys: Option<std::path::PathBuf>,
    /// How long a conversation session's cached prefix is kept ahead of others' after its
    /// request ends, in seconds (requests name their session in the `x-session-id` header).
    #[arg(long, default_value_t = 600.0)]
    session_ttl: f64,
    #[command(flatten)]
    weights: crate::model_source::WeightsArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Model id clients send as `model` (default: the --model argument; for a GGUF file, its
    /// name without the directory and the `.gguf` extension).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on every route but /health, /metrics, /openapi.json.
    #[arg(long, env = "MINSERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// KV cache size: `512MiB`, `1GiB`, `1.5G`, `2GB`, or a plain number of MiB. Replaces
    /// --kv-cache-mib, which stays as the older spelling.
    #[arg(long, value_name = "SIZE", value_parser = parse_memory, conflicts_with = "kv_cache_mib")]
    kv_cache_memory: Option<usize>,
    /// Most sequences waiting for a slot in the running batch; more requests get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds in-flight requests may take to finish after SIGINT / SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Web origins whose pages may call the API from a browser (CORS), comma-separated
    /// (`https://app.example.com,http://localhost:3000`), or `*` for any. Default: none, and no
    /// CORS headers are sent.
    #[arg(long, value_delimiter = ',', value_parser = parse_origin)]
    allowed_origins: Vec<String>,
    /// How the model writes tool calls: `hermes` (`<tool_call>{...}</tool_call>`),
    /// `llama3_json` or `gemma` (tool_code). Default: read from the chat template.
    #[arg(long, value_parser = parse_tool_call_parser)]
    tool_call_parser: Option<ToolCallFormat>,
    /// Return reasoning models' thinking apart from their answer, in chat's
    /// `reasoning_content`: `qwen3` or `deepseek_r1` (`<think>...</think>`).
    #[arg(long, value_parser = ReasoningFormat::parse)]
    reasoning_parser: Option<ReasoningFormat>,
    /// When the engine thread fails, load the model again and carry on (the failure is
    /// counted in minserve_engine_restarts_total) instead of draining and exiting non-zero.
    /// A --trace-file starts over with the new engine.
    #[arg(long)]
    restart_engine: bool,
}

impl ServeArgs {
    /// The model id clients send: --served-model-name, else the --model argument, with a GGUF
    /// file named by its stem (`/models/llama-3.2-1b.Q4_K_M.gguf` is `llama-3.2-1b.Q4_K_M`)
    /// rather than by its whole path.
    fn served_model_name(&self) -> String {
        if let Some(name) = &self.served_model_name {
            return name.clone();
        }
        default_name(&self.single_model())
    }

    /// The model of a one-model server.
    fn single_model(&self) -> String {
        self.models
            .first()
            .cloned()
            .unwrap_or_else(|| minserve_hub::default_model().to_string())
    }

    fn cache_options(&self) -> CacheOptions {
        let mut options = self.engine.cache_options();
        if let Some(bytes) = self.kv_cache_memory {
            options.memory_bytes = bytes;
        }
        options
    }

    /// Every model to serve and, for several, the KV memory they share.
    fn plans(&self) -> anyhow::Result<Vec<ModelPlan>> {
        if let Some(path) = &self.config {
            let config = serve_config::load(path)?;
            let total = config
                .kv_cache_memory
                .unwrap_or(self.cache_options().memory_bytes);
            return config
                .models
                .into_iter()
                .map(|m| {
                    self.plan(
                        &m.source,
                        m.name,
                        m.aliases,
                        total,
                        m.kv_cache_share,
                        m.engine,
                    )
                })
                .collect();
        }
        if self.models.len() <= 1 {
            let name = Some(self.served_model_name());
            let total = self.cache_options().memory_bytes;
            let single = self.single_model();
            return Ok(vec![self.plan(
                &single,
                name,
                Vec::new(),
                total,
                1.0,
                Default::default(),
            )?]);
        }
        anyhow::ensure!(
            self.served_model_name.is_none(),
            "--served-model-name names one model; with several, write --model SOURCE=NAME"
        );
        let share = 1.0 / self.models.len() as f64;
        let total = self.cache_options().memory_bytes;
        self.models
            .iter()
            .map(|arg| {
                let (source, name) = match arg.split_once('=') {
                    Some((source, name)) if !name.is_empty() => (source, Some(name.to_string())),
                    _ => (arg.as_str(), None),
                };
                self.plan(source, name, Vec::new(), total, share, Default::default())
            })
            .collect()
    }

    /// One model's engine flags: the command line's, with what the model sets for itself.
    fn plan(
        &self,
        source: &str,
        name: Option<String>,
        aliases: Vec<String>,
        total_kv_bytes: usize,
        share: f64,
        overrides: serve_config::EngineOverrides,
    ) -> anyhow::Result<ModelPlan> {
        let mut engine = self.engine.clone();
        if let Some(n) = overrides.max_num_seqs {
            engine.scheduler.max_num_seqs = n;
        }
        if let Some(n) = overrides.max_num_batched_tokens {
            engine.scheduler.max_num_batched_tokens = n;
        }
        if let Some(dtype) = &overrides.kv_cache_dtype {
            engine.kv_cache_dtype = dtype.parse().map_err(anyhow::Error::msg)?;
        }
        if let Some(method) = &overrides.speculative {
            engine.speculative =
                Some(crate::engine_args::parse_speculative(method).map_err(anyhow::Error::msg)?);
        }
        if let Some(k) = overrides.num_speculative_tokens {
            engine.num_speculative_tokens = k;
        }
        if overrides.scheduling_policy.is_some() {
            engine.scheduler.scheduling_policy = overrides.scheduling_policy;
        } else if engine.scheduler.scheduling_policy.is_none() && self.api_keys.is_some() {
            engine.scheduler.scheduling_policy = Some("fair-share".into());
        }
        let mut cache = engine.cache_options();
        cache.memory_bytes = ((total_kv_bytes as f64 * share) as usize).max(1);
        Ok(ModelPlan {
            source: source.to_string(),
            spec: ModelSpec {
                name: name.unwrap_or_else(|| default_name(source)),
                aliases,
            },
            engine,
            cache,
        })
    }
}

/// The id a model is served under when none is given: its argument, with a GGUF file named by
/// its stem.
fn default_name(model: &str) -> String {
    let path = std::path::Path::new(model);
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    match path.file_stem().and_then(|s| s.to_str()) {
        Some(stem) if is_gguf && !stem.is_empty() => stem.to_string(),
        _ => model.to_string(),
    }
}

/// One model as this process serves it.
struct ModelPlan {
    source: String,
    spec: ModelSpec,
    engine: EngineArgs,
    cache: CacheOptions,
}

/// Refuses KV caches that together need more memory than the machine has available now (on
/// the CPU, where the pools live in host memory; Linux's `MemAvailable`).
fn check_kv_memory(plans: &[ModelPlan]) -> anyhow::Result<()> {
    let total: usize = plans.iter().map(|p| p.cache.memory_bytes).sum();
    let Some(available) = available_memory() else {
        return Ok(());
    };
    anyhow::ensure!(
        total <= available,
        "the KV caches of the {} models take {:.2} GiB together ({}), more than the {:.2} GiB of \
         memory available: lower kv_cache_memory (--kv-cache-memory) or serve fewer models",
        plans.len(),
        total as f64 / (1u64 << 30) as f64,
        plans
            .iter()
            .map(|p| format!("{}: {} MiB", p.spec.name, p.cache.memory_bytes >> 20))
            .collect::<Vec<_>>()
            .join(", "),
        available as f64 / (1u64 << 30) as f64,
    );
    Ok(())
}

/// Bytes of memory available for new allocations, when the system says.
fn available_memory() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

fn parse_tool_call_parser(name: &str) -> Result<ToolCallFormat, String> {
    ToolCallFormat::from_name(name).ok_or_else(|| {
        format!(
            "unknown tool call parser {name:?}; one of: {}",
            ToolCallFormat::NAMES.join(", ")
        )
    })
}

/// A web origin as browsers send it in `Origin` (`scheme://host[:port]`, no path), or `*`.
fn parse_origin(text: &str) -> Result<String, String> {
    let origin = text.trim();
    let valid = origin == "*"
        || origin.split_once("://").is_some_and(|(scheme, host)| {
            !scheme.is_empty()
                && !host.is_empty()
                && !host.contains('/')
                && origin.bytes().all(|b| b.is_ascii_graphic())
        });
    if !valid {
        return Err(format!(
            "`{text}` is not an origin: write it as scheme://host[:port] \
             (https://app.example.com), or `*` for any"
        ));
    }
    Ok(origin.to_string())
}

/// Wires a loaded model up for the server: the engine (built as every command builds it) on
/// its own thread; the server gets the engine's handle and the tokenizer.
fn start_engine(
    loaded: LoadedModel,
    cache: CacheOptions,
    device: DeviceOptions,
    config: EngineConfig,
    engine_args: &EngineArgs,
) -> anyhow::Result<ServedModel> {
    let tokenizer = Arc::new(loaded.tokenizer);
    let swap_bytes = engine_args.swap_bytes();
    let mut engine = build_engine(
        loaded.model,
        tokenizer.clone(),
        cache,
        device,
        config,
        swap_bytes,
    )?;
    engine_args.configure(&mut engine, &tokenizer, &device)?;
    Ok(ServedModel::new(
        EngineHandle::spawn(engine).context("starting the engine thread")?,
        tokenizer,
        config.scheduler.max_num_seqs,
    ))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("minserve-http")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(args))?;
    // Requests cut off by the shutdown timeout may still hold tasks; do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let plans = args.plans()?;
    let several = plans.len() > 1 || args.config.is_some();
    if several && !args.weights.device()?.is_gpu() {
        check_kv_memory(&plans)?;
    }
    let options = ServerOptions {
        served_model_name: plans[0].spec.name.clone(),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_queue: args.max_queue,
        max_body_bytes: args.max_body_bytes,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout.max(0.0)),
        allowed_origins: args.allowed_origins.clone(),
        tool_call_parser: args.tool_call_parser,
        reasoning_parser: args.reasoning_parser,
        session_ttl: Duration::from_secs_f64(args.session_ttl.max(0.0)),
        ..ServerOptions::default()
    };
    let api_keys = match &args.api_keys {
        Some(path) => Some(ApiKeys::load(path)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let names: Vec<&str> = plans.iter().map(|p| p.spec.name.as_str()).collect();
    eprintln!(
        "minserve: serving {} on http://{addr}/v1 (loading; /health turns 200 when ready)",
        names.join(", ")
    );
    let specs = plans.iter().map(|p| p.spec.clone()).collect();
    let state = AppState::with_models(options, specs).map_err(anyhow::Error::msg)?;
    if let Some(keys) = api_keys {
        state.set_api_keys(keys);
        minserve_server::reload_api_keys_on_sighup(state.clone());
    }

    let mut loads = Vec::new();
    for plan in plans {
        let slot = state
            .models
            .find(&plan.spec.name)
            .expect("every plan has its slot")
            .clone();
        let sized = args.kv_cache_memory.is_some() || args.engine.kv_cache_mib.is_some() || several;
        let device = plan.engine.device_options(&args.weights, sized)?;
        let weights = args.weights.clone();
        let ModelPlan {
            source,
            engine,
            cache,
            ..
        } = plan;
        let build = Arc::new(move || {
            let loaded = crate::model_source::load(&source, &weights)?;
            let config = engine.engine_config(loaded.model.config().max_position_embeddings);
            start_engine(loaded, cache, device, config, &engine)
        });
        if args.restart_engine {
            let rebuild = build.clone();
            state.set_engine_rebuild_of(&slot, move || rebuild());
        }
        let name = slot.name().to_string();
        loads.push((
            name,
            minserve_server::spawn_load_model(slot, move || build()),
        ));
    }
    let only_one = loads.len() == 1;
    tokio::spawn(async move {
        let mut failed = 0;
        let total = loads.len();
        for (name, loading) in loads {
            match loading.await {
                Ok(Ok(())) => eprintln!("minserve: model {name} ready"),
                Ok(Err(message)) => {
                    eprintln!("minserve: error: model {name}: {message}");
                    failed += 1;
                }
                Err(e) => {
                    eprintln!("minserve: error: loading the model {name}: {e}");
                    failed += 1;
                }
            }
        }
        // One model that cannot load leaves nothing to serve; of several, the others serve
        // and the failed one answers 503 with the reason.
        if only_one && failed == 1 || failed == total {
            std::process::exit(1);
        }
    });

    minserve_server::serve(listener, state, minserve_server::shutdown_signal()).await?;
    eprintln!("minserve: shut down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};
    use minserve_model::KvDtype;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).map(|c| c.serve)
    }

    #[test]
    fn a_gguf_file_is_served_under_its_stem() {
        let name = |args: &[&str]| parse(args).unwrap().served_model_name();
        assert_eq!(
            name(&["--model", "/models/q/llama-3.2-1b.Q4_K_M.gguf"]),
            "llama-3.2-1b.Q4_K_M"
        );
        assert_eq!(name(&["--model", "relative/Tiny.GGUF"]), "Tiny");
        assert_eq!(name(&["--model", "smollm2-135m"]), "smollm2-135m");
        assert_eq!(name(&["--model", "/models/hf-folder"]), "/models/hf-folder");
        assert_eq!(
            name(&["--model", "/m/x.gguf", "--served-model-name", "mine"]),
            "mine"
        );
    }

    #[test]
    fn the_engine_is_restarted_only_when_asked() {
        assert!(!parse(&[]).unwrap().restart_engine);
        assert!(parse(&["--restart-engine"]).unwrap().restart_engine);
    }

    #[test]
    fn allowed_origins_are_origins_or_a_star() {
        let origins = |args: &[&str]| parse(args).map(|a| a.allowed_origins);
        assert_eq!(origins(&[]).unwrap(), Vec::<String>::new());
        assert_eq!(
            origins(&[
                "--allowed-origins",
                "https://a.example,http://localhost:3000"
            ])
            .unwrap(),
            ["https://a.example", "http://localhost:3000"]
        );
        assert_eq!(origins(&["--allowed-origins", "*"]).unwrap(), ["*"]);
        for bad in ["a.example", "https://a.example/path", "https://", "://x"] {
            assert!(origins(&["--allowed-origins", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_sizes() {
        let mib = 1 << 20;
        for (text, bytes) in [
            ("512", 512 * mib),
            ("512MiB", 512 * mib),
            ("512mib", 512 * mib),
            ("512M", 512 * mib),
            ("1GiB", 1024 * mib),
            ("1.5G", 1536 * mib),
            ("2 GiB", 2048 * mib),
            ("2GB", 2_000_000_000),
            ("750MB", 750_000_000),
            ("64KiB", 64 << 10),
            ("4096B", 4096),
        ] {
            assert_eq!(parse_memory(text), Ok(bytes), "{text}");
        }
        for bad in ["", "GiB", "1.2.3GiB", "12 parsecs", "0", "0.1B", "-5MiB"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kv_cache_memory_sets_the_pool_and_kv_cache_mib_still_works() {
        let default = parse(&[]).unwrap().cache_options().memory_bytes;
        let sized = parse(&["--kv-cache-memory", "1GiB"]).unwrap();
        assert_eq!(sized.cache_options().memory_bytes, 1 << 30);
        let plain = parse(&["--kv-cache-memory", "96"]).unwrap();
        assert_eq!(plain.cache_options().memory_bytes, 96 << 20);
        let old = parse(&["--kv-cache-mib", "96"]).unwrap();
        assert_eq!(old.cache_options().memory_bytes, 96 << 20);
        assert_ne!(default, 96 << 20);
        let both = parse(&["--kv-cache-mib", "96", "--kv-cache-memory", "1GiB"]);
        assert!(both.is_err());
        let error = parse(&["--kv-cache-memory", "lots"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("lots"), "{error}");
    }

    #[test]
    fn kv_cache_dtype_defaults_to_f16_and_takes_f32_q8_and_fp8() {
        assert_eq!(parse(&[]).unwrap().cache_options().dtype, KvDtype::F16);
        for (text, dtype) in [
            ("f16", KvDtype::F16),
            ("f32", KvDtype::F32),
            ("q8", KvDtype::Q8),
            ("fp8", KvDtype::Fp8),
        ] {
            let args = parse(&["--kv-cache-dtype", text]).unwrap();
            assert_eq!(args.cache_options().dtype, dtype, "{text}");
        }
        let error = parse(&["--kv-cache-dtype", "q4"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("q8") && error.contains("fp8"), "{error}");
    }

    #[test]
    fn several_models_split_the_kv_memory_and_take_their_names() {
        let args = parse(&[
            "--model",
            "synthetic:tiny=one",
            "--model",
            "/m/llama.Q4_0.gguf",
            "--kv-cache-memory",
            "1GiB",
        ])
        .unwrap();
        let plans = args.plans().unwrap();
        let names: Vec<&str> = plans.iter().map(|p| p.spec.name.as_str()).collect();
        assert_eq!(names, ["one", "llama.Q4_0"]);
        assert_eq!(plans[0].source, "synthetic:tiny");
        assert!(plans.iter().all(|p| p.cache.memory_bytes == 512 << 20));
        // One --model is served as before, with the whole pool.
        let single = parse(&["--model", "m", "--served-model-name", "mine"]).unwrap();
        let plans = single.plans().unwrap();
        assert_eq!(plans[0].spec.name, "mine");
        assert_eq!(
            plans[0].cache.memory_bytes,
            single.cache_options().memory_bytes
        );
        // --served-model-name names one model only.
        let both = parse(&["--model", "a", "--model", "b", "--served-model-name", "x"]).unwrap();
        assert!(both.plans().is_err());
    }

    #[test]
    fn api_keys_make_fair_share_the_default_policy() {
        let policy = |args: &[&str]| {
            let plans = parse(args).unwrap().plans().unwrap();
            plans[0].engine.scheduler.scheduling_policy.clone()
        };
        assert_eq!(policy(&[]), None);
        assert_eq!(
            policy(&["--api-keys", "k.toml"]).as_deref(),
            Some("fair-share")
        );
        let explicit = ["--api-keys", "k.toml", "--scheduling-policy", "priority"];
        assert_eq!(policy(&explicit).as_deref(), Some("priority"));
    }

    /// Every flag issue 4 names for `minserve serve`.
    #[test]
    fn serve_has_the_documented_flags() {
        let command = Cli::command();
        let flags: Vec<&str> = command
            .get_arguments()
            .filter_map(|a| a.get_long())
            .collect();
        for flag in [
            "model",
            "host",
            "port",
            "served-model-name",
            "api-key",
            "max-num-seqs",
            "max-num-batched-tokens",
            "kv-cache-memory",
            "max-queue",
            "max-body-bytes",
            "shutdown-timeout",
        ] {
            assert!(flags.contains(&flag), "--{flag} missing from {flags:?}");
        }
        let api_key = command
            .get_arguments()
            .find(|a| a.get_long() == Some("api-key"))
            .unwrap();
        assert_eq!(
            api_key.get_env(),
            Some(std::ffi::OsStr::new("MINSERVE_API_KEY"))
        );
    }
}
