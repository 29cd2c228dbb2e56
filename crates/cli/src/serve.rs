//! `minserve serve`: the OpenAI-compatible HTTP API (see the `minserve-server` crate). This is
//! where model, engine and server meet: the model is loaded and put into an engine on its own
//! thread here, and the server only ever sees the engine's handle and the tokenizer.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use minserve_core::engine_thread::EngineHandle;
use minserve_core::EngineConfig;
use minserve_model::{CacheOptions, DeviceOptions, LoadedModel};
use minserve_server::{AppState, ServedModel, ServerOptions, ToolCallFormat};

use crate::engine_args::{build_engine, EngineArgs};

#[derive(Args)]
pub struct ServeArgs {
    /// Model: a GGUF file, a Hugging Face folder, a catalog alias (fetched on first use), or
    /// `synthetic:NAME[@FORMAT]` (random weights, byte tokenizer).
    #[arg(long, default_value_t = minserve_hub::default_model().to_string())]
    model: String,
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
    /// How the model writes tool calls: `hermes` (`<tool_call>{...}</tool_call>`) or
    /// `llama3_json`. Default: read from the chat template (docs/tool-calling.md).
    #[arg(long, value_parser = parse_tool_call_parser)]
    tool_call_parser: Option<ToolCallFormat>,
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
        let path = std::path::Path::new(&self.model);
        let is_gguf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        match path.file_stem().and_then(|s| s.to_str()) {
            Some(stem) if is_gguf && !stem.is_empty() => stem.to_string(),
            _ => self.model.clone(),
        }
    }

    fn cache_options(&self) -> CacheOptions {
        let mut options = self.engine.cache_options();
        if let Some(bytes) = self.kv_cache_memory {
            options.memory_bytes = bytes;
        }
        options
    }
}

/// A memory size: a number with an optional unit. Binary units (`KiB`, `MiB`, `GiB`, `TiB`,
/// and the bare `K`, `M`, `G`, `T` as in `java -Xmx` or `docker --memory`) count in 1024s,
/// decimal ones (`KB`, `MB`, `GB`, `TB`) in 1000s, `B` is bytes; no unit means MiB, the unit
/// of --kv-cache-mib.
fn parse_memory(text: &str) -> Result<usize, String> {
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
    if let Some(trace) = engine_args.trace_writer()? {
        engine.set_trace(trace, engine_args.trace_options());
    }
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
    let options = ServerOptions {
        served_model_name: args.served_model_name(),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_queue: args.max_queue,
        max_body_bytes: args.max_body_bytes,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout.max(0.0)),
        allowed_origins: args.allowed_origins.clone(),
        tool_call_parser: args.tool_call_parser,
        ..ServerOptions::default()
    };
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    eprintln!(
        "minserve: serving {} on http://{addr}/v1 (loading the model; /health turns 200 when ready)",
        options.served_model_name
    );
    let state: Arc<AppState> = AppState::new(options);

    let model = args.model.clone();
    let weights = args.weights.clone();
    let engine = args.engine.clone();
    let cache = args.cache_options();
    let sized = args.kv_cache_memory.is_some() || args.engine.kv_cache_mib.is_some();
    let device = args.engine.device_options(&args.weights, sized)?;
    let build = Arc::new(move || {
        let loaded = crate::model_source::load(&model, &weights)?;
        let config = engine.engine_config(loaded.model.config().max_position_embeddings);
        start_engine(loaded, cache, device, config, &engine)
    });
    if args.restart_engine {
        let rebuild = build.clone();
        state.set_engine_rebuild(move || rebuild());
    }
    let loading = minserve_server::spawn_load(state.clone(), move || build());
    tokio::spawn(async move {
        match loading.await {
            Ok(Ok(())) => eprintln!("minserve: model ready"),
            Ok(Err(message)) => {
                eprintln!("minserve: error: {message}");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("minserve: error: loading the model: {e}");
                std::process::exit(1);
            }
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
    fn kv_cache_dtype_defaults_to_f16_and_takes_f32_and_q8() {
        assert_eq!(parse(&[]).unwrap().cache_options().dtype, KvDtype::F16);
        for (text, dtype) in [
            ("f16", KvDtype::F16),
            ("f32", KvDtype::F32),
            ("q8", KvDtype::Q8),
        ] {
            let args = parse(&["--kv-cache-dtype", text]).unwrap();
            assert_eq!(args.cache_options().dtype, dtype, "{text}");
        }
        let error = parse(&["--kv-cache-dtype", "q4"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("q8"), "{error}");
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
