//! minserve's OpenAI-compatible HTTP API: axum on tokio, in front of the engine thread.
//!
//! ```text
//! client ──HTTP──> axum handler: parse + validate, tokenize, admit (429 if the queue is full)
//!                    │ EngineHandle::add_request(request, ChannelSink)
//!                    ▼
//!                  engine thread ──RequestEvent──> tokio mpsc ──> JSON body or SSE stream
//! ```
//!
//! Each request's events come back over its own unbounded channel. When the client goes away
//! the response future or stream is dropped with the channel's receiver, the sink reports
//! itself closed, and the engine aborts the request before its next step.
//!
//! The model loads in the background: `GET /health` (and every model route) answers 503 until
//! [`AppState::set_model`] is called.

mod api;
mod error;
mod metrics;
mod openapi;
mod respond;

use std::future::{Future, IntoFuture};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use minserve_core::engine::{Engine, EngineConfig};
use minserve_core::engine_thread::EngineHandle;
use minserve_model::{load_model, CacheOptions, DeviceOptions, LoadedModel, Runner};
use minserve_tokenizer::Tokenizer;

pub use error::ApiError;
pub use metrics::Metrics;

/// Settings of the HTTP layer (the engine's come with the [`ServedModel`]).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The model id clients pass as `model` and `/v1/models` lists.
    pub served_model_name: String,
    /// When set, every route but `/health`, `/metrics` and `/openapi.json` needs
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most sequences that may wait for a slot in the running batch; beyond it requests get 429.
    pub max_queue: usize,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// After SIGINT / SIGTERM, how long in-flight requests may take to finish.
    pub shutdown_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            served_model_name: "default".into(),
            api_key: None,
            max_queue: 256,
            max_body_bytes: 4 << 20,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// The loaded model behind the API: the engine on its thread and the tokenizer.
pub struct ServedModel {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub max_model_len: usize,
    pub max_num_seqs: usize,
}

impl ServedModel {
    /// Starts the engine thread for an already loaded model.
    pub fn start(
        loaded: LoadedModel,
        cache: CacheOptions,
        device: DeviceOptions,
        config: EngineConfig,
        trace: Option<Box<dyn Write + Send>>,
    ) -> anyhow::Result<Self> {
        let tokenizer = Arc::new(loaded.tokenizer);
        let eos = tokenizer.eos_token_ids().to_vec();
        let runner = Runner::new(loaded.model, cache, device)?;
        let mut engine = Engine::new(runner, config, tokenizer.clone(), eos);
        if let Some(trace) = trace {
            engine.set_trace(trace);
        }
        let engine = EngineHandle::spawn(engine).context("starting the engine thread")?;
        Ok(Self {
            engine,
            tokenizer,
            max_model_len: config.max_model_len,
            max_num_seqs: config.scheduler.max_num_seqs,
        })
    }

    /// Loads a GGUF file or Hugging Face folder and starts the engine. `config` gets the model's
    /// context length as `max_model_len`.
    pub fn load(
        path: &Path,
        cache: CacheOptions,
        config: impl FnOnce(usize) -> EngineConfig,
        trace: Option<Box<dyn Write + Send>>,
    ) -> anyhow::Result<Self> {
        let loaded = load_model(path).with_context(|| format!("loading {}", path.display()))?;
        let config = config(loaded.model.config().max_position_embeddings);
        Self::start(loaded, cache, DeviceOptions::default(), config, trace)
    }

    /// Longest prompt plus generation that the engine could ever hold.
    pub fn max_total_tokens(&self) -> usize {
        let limits = self.engine.limits();
        self.max_model_len
            .min(limits.num_blocks * limits.block_size)
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub options: ServerOptions,
    model: OnceLock<Arc<ServedModel>>,
    load_error: Mutex<Option<String>>,
    shutting_down: AtomicBool,
    pub metrics: Metrics,
    /// Sequences admitted whose response has not ended yet (for the queue limit).
    inflight_seqs: AtomicUsize,
    /// Requests being answered (for logs and shutdown).
    inflight_requests: AtomicUsize,
    pub started: u64,
}

impl AppState {
    pub fn new(options: ServerOptions) -> Arc<Self> {
        Arc::new(Self {
            options,
            model: OnceLock::new(),
            load_error: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            metrics: Metrics::default(),
            inflight_seqs: AtomicUsize::new(0),
            inflight_requests: AtomicUsize::new(0),
            started: unix_time(),
        })
    }

    /// The model is ready: `/health` turns 200.
    pub fn set_model(&self, model: ServedModel) {
        let _ = self.model.set(Arc::new(model));
    }

    /// Loading failed: `/health` stays 503 and says why.
    pub fn set_load_error(&self, message: String) {
        *self.load_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
    }

    pub fn model(&self) -> Option<&Arc<ServedModel>> {
        self.model.get()
    }

    /// From now on every model route and `/health` answer 503; [`serve`] calls it when its
    /// shutdown signal fires, before it stops accepting connections.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Requests currently being answered.
    pub fn inflight_requests(&self) -> usize {
        self.inflight_requests.load(Ordering::SeqCst)
    }

    /// The model, or 503 while loading / shutting down.
    fn ready_model(&self) -> Result<Arc<ServedModel>, ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::shutting_down());
        }
        self.model.get().cloned().ok_or_else(ApiError::loading)
    }
}

/// Loads the model on a blocking thread and publishes it (or the error) to `state`. The
/// returned task yields the error message if loading failed.
pub fn spawn_load<F>(state: Arc<AppState>, load: F) -> tokio::task::JoinHandle<Result<(), String>>
where
    F: FnOnce() -> anyhow::Result<ServedModel> + Send + 'static,
{
    tokio::spawn(async move {
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(load)
            .await
            .map_err(|e| anyhow::anyhow!("the loading thread panicked: {e}"))
            .and_then(|r| r);
        match result {
            Ok(model) => {
                state.set_model(model);
                tracing::info!(
                    target: "minserve_server",
                    "model {} ready after {:.1} s",
                    state.options.served_model_name,
                    started.elapsed().as_secs_f64()
                );
                Ok(())
            }
            Err(e) => {
                let message = format!("{e:#}");
                state.set_load_error(message.clone());
                Err(message)
            }
        }
    })
}

/// The routes, without the outer layers (see [`app`]).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_page))
        .route("/openapi.json", get(openapi::openapi))
        .route("/v1/models", get(api::list_models))
        .route("/v1/models/{model}", get(api::get_model))
        .route("/v1/completions", post(api::completions))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/tokenize", post(api::tokenize))
        .route("/detokenize", post(api::detokenize))
        .fallback(|| async { ApiError::for_status(StatusCode::NOT_FOUND) })
        .with_state(state)
}

/// Wraps `routes` in the layers every route gets: body limit, API key, panic -> 500, OpenAI
/// errors for bare statuses, and the request log.
pub fn with_layers(routes: Router, state: Arc<AppState>) -> Router {
    routes
        .layer(axum::extract::DefaultBodyLimit::max(
            state.options.max_body_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |panic: Box<dyn std::any::Any + Send>| {
                let detail = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                tracing::error!(target: "minserve_server", "handler panicked: {detail}");
                ApiError::internal("Internal server error while handling this request.")
                    .into_response()
            },
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn_with_state(state, log_requests))
}

/// The whole application: [`router`] inside [`with_layers`].
pub fn app(state: Arc<AppState>) -> Router {
    with_layers(router(state.clone()), state)
}

/// Serves `app(state)` on `listener` until `shutdown` completes; then stops accepting, lets
/// in-flight requests finish for up to `shutdown_timeout`, and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app(state.clone());
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let flag = state.clone();
    let graceful = async move {
        shutdown.await;
        flag.begin_shutdown();
        tracing::info!(
            target: "minserve_server",
            "shutting down: waiting up to {:?} for {} in-flight requests",
            flag.options.shutdown_timeout,
            flag.inflight_requests()
        );
        let _ = tx.send(true);
    };
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(graceful)
        .into_future();
    let timeout = state.options.shutdown_timeout;
    let deadline = async move {
        let _ = rx.wait_for(|&stop| stop).await;
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        result = server => result,
        _ = deadline => {
            tracing::warn!(
                target: "minserve_server",
                "shutdown timeout reached with {} requests still in flight; dropping them",
                state.inflight_requests()
            );
            Ok(())
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.is_shutting_down() {
        return ApiError::shutting_down().into_response();
    }
    if state.model().is_some() {
        return (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ok"})),
        )
            .into_response();
    }
    match state
        .load_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        Some(message) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!("Loading the model failed: {message}"),
        )
        .code("model_load_failed")
        .into_response(),
        None => ApiError::loading().into_response(),
    }
}

async fn metrics_page(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.model().map(|m| m.engine.stats());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(stats),
    )
        .into_response()
}

/// Constant-time comparison, so the key cannot be guessed byte by byte from timings.
fn keys_match(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn auth(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.options.api_key {
        let open = matches!(
            request.uri().path(),
            "/health" | "/metrics" | "/openapi.json"
        );
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !open && !given.is_some_and(|g| keys_match(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// Turns error responses that are not already JSON (wrong method, unknown route, ...) into
/// OpenAI's error shape.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let (parts, _) = response.into_parts();
        let mut fresh = ApiError::for_status(status).into_response();
        for (name, value) in parts.headers.iter() {
            if name == header::ALLOW || name == header::RETRY_AFTER {
                fresh.headers_mut().insert(name.clone(), value.clone());
            }
        }
        return fresh;
    }
    response
}

/// Set by a handler whose response logs itself when it ends (generation requests, whose token
/// counts are known only then).
#[derive(Clone, Copy)]
pub(crate) struct LoggedByHandler;

/// Counts a request in [`AppState::inflight_requests`] for as long as it lives (also when its
/// client goes away and the handler's future is dropped half-way).
struct InFlight(Arc<AppState>);

impl InFlight {
    fn new(state: Arc<AppState>) -> Self {
        state.inflight_requests.fetch_add(1, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight_requests.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn log_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let in_flight = InFlight::new(state);
    let response = next.run(request).await;
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    // A stream is still being answered long after its handler returned: it counts until its
    // body ends or the client goes away.
    let response = if is_stream {
        response.map(|body| {
            Body::from_stream(body.into_data_stream().map(move |chunk| {
                let _counted = &in_flight;
                chunk
            }))
        })
    } else {
        drop(in_flight);
        response
    };
    if response.extensions().get::<LoggedByHandler>().is_none() {
        tracing::info!(
            target: "minserve_server",
            "{method} {path} {} latency_ms={:.1}",
            response.status().as_u16(),
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    response
}

pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
