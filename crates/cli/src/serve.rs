//! `minserve serve`: the OpenAI-compatible HTTP API (see the `minserve-server` crate).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use minserve_server::{AppState, ServedModel, ServerOptions};

use crate::bench::EngineArgs;

#[derive(Args)]
pub struct ServeArgs {
    /// Model: a GGUF file, a Hugging Face folder, a catalog alias (fetched on first use), or
    /// `synthetic:NAME[@FORMAT]` (random weights, byte tokenizer).
    #[arg(long, default_value_t = minserve_hub::default_model().to_string())]
    model: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Model id clients send as `model` (default: the --model argument).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on every route but /health, /metrics, /openapi.json.
    #[arg(long, env = "MINSERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Most sequences waiting for a slot in the running batch; more requests get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds in-flight requests may take to finish after SIGINT / SIGTERM.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
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
        served_model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| args.model.clone()),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_queue: args.max_queue,
        max_body_bytes: args.max_body_bytes,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout.max(0.0)),
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
    let engine = args.engine.clone();
    let loading = minserve_server::spawn_load(state.clone(), move || {
        let loaded = crate::model_source::load(&model)?;
        let trace = match &engine.trace_file {
            Some(file) => {
                let out = std::fs::File::create(file)
                    .with_context(|| format!("creating {}", file.display()))?;
                Some(Box::new(std::io::BufWriter::new(out)) as Box<dyn std::io::Write + Send>)
            }
            None => None,
        };
        let config = engine.engine_config(loaded.model.config().max_position_embeddings);
        ServedModel::start(loaded, engine.cache_options(), config, trace)
    });
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
