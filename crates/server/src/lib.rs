//! minserve's OpenAI-compatible HTTP API: axum on tokio, in front of the engine thread.
//!
//! ```text
//! socket -> middleware.rs (API key, JSON errors, CORS, log, in-flight count),
//!           body_limit.rs (the body read whole, within its limit)
//!        -> routes/chat.rs | routes/completions.rs | routes/responses.rs (responses/): read
//!             the body, on cpu_work.rs's threads
//!             json_body.rs (shape, types), params.rs (GenerationParams, limits.rs),
//!             prompt.rs (token ids)
//!        -> submit.rs: complete engine requests, validated once by the engine handle,
//!             admission.rs (429 when the queue is full), EngineHandle::add_request(request, sink)
//!        -> engine thread --RequestEvent--> tokio channel
//!        -> choices.rs (events -> choices, pure) -> render.rs (JSON)
//!        -> stream.rs (SSE chunks) | collect.rs (one JSON body); the Responses API renders
//!             its own objects and events (responses/)
//! ```
//!
//! `GET /dashboard` (routes/dashboard.rs) is a live view of an engine: a static page, and
//! server-sent events from the engine's live feed, fed only while someone watches.
//!
//! Each request's events come back over its own bounded channel, which the engine thread never
//! waits on (a client too slow to keep up is aborted, see `submit.rs`). When the client goes
//! away the response future or stream is dropped with the channel's receiver, the sink reports
//! itself closed, and the engine aborts the request before its next step.
//!
//! A failed engine thread is watched for (`supervision.rs`): `/health` turns 503, and the
//! engine is rebuilt or [`serve`] drains and returns the failure.
//!
//! The server knows no model files or tensors: it serves [`ServedModel`]s (an engine handle
//! and a tokenizer each) that the caller wired up, one per configured model (`models.rs`),
//! routed by the request's `model`. Each loads in the background: `GET /health` (and the
//! model's routes) answer 503 until [`ModelSlot::set_model`] is called.

mod admission;
mod body_limit;
mod caller;
mod choices;
mod collect;
pub mod config_text;
mod cpu_work;
mod error;
mod fields;
mod generation_api;
mod json_body;
mod limits;
mod metrics;
mod middleware;
mod models;
mod options;
mod params;
mod prompt;
mod python_call;
mod reasoning;
mod render;
mod responses;
mod routes;
mod state;
mod stream;
mod structured;
mod submit;
mod supervision;
mod telemetry;
mod tenants;
mod tool_format;
mod tools;
mod vllm_compat;

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use axum::handler::Handler;
use axum::http::{Method, Uri};
use axum::routing::{get, post, MethodRouter};
use axum::Router;

pub use caller::SESSION_HEADER;
pub use error::{ApiError, RequestFieldNames};
pub use metrics::Metrics;
pub use models::{ModelRegistry, ModelSlot, ModelSpec, ServedModel};
pub use options::{ServerOptions, ToolCallFormat};
pub use reasoning::ReasoningFormat;
pub use state::{spawn_load, spawn_load_model, AppState};
pub use tenants::{ApiKeys, Tenant, TenantLimits};

use routes::{
    chat, completions, dashboard, monitoring, openapi, responses as responses_api, tokenize,
};

/// The routes, without the outer layers (see [`app`]).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(monitoring::health))
        .route("/health/{model}", get(monitoring::health_of))
        .route("/metrics", get(monitoring::metrics_page))
        .route("/get_load", get(monitoring::load))
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/dashboard.js", get(dashboard::script))
        .route("/dashboard/dashboard.css", get(dashboard::style))
        .route("/dashboard/events", get(dashboard::events))
        .route("/openapi.json", get(openapi::openapi))
        .route("/v1/models", get(routes::models::list_models))
        .route("/v1/models/{model}", get(routes::models::get_model))
        .route("/v1/completions", json_post(completions::completions))
        .route("/v1/chat/completions", json_post(chat::chat_completions))
        .route(
            "/v1/chat/completions/render",
            json_post(tokenize::render_chat_request),
        )
        .route("/v1/responses", json_post(responses_api::responses))
        .route("/tokenize", json_post(tokenize::tokenize))
        .route("/detokenize", json_post(tokenize::detokenize))
        .fallback(|method: Method, uri: Uri| async move {
            ApiError::unknown_route(method.as_str(), uri.path())
        })
        .with_state(state)
}

/// A POST route whose body is JSON: any other content type is a 415 (see
/// `middleware::require_json_content_type`). Other methods still get 405.
fn json_post<H, T>(handler: H) -> MethodRouter<Arc<AppState>>
where
    H: Handler<T, Arc<AppState>>,
    T: 'static,
{
    post(handler).route_layer(axum::middleware::from_fn(
        middleware::require_json_content_type,
    ))
}

/// Wraps `routes` in the layers every route gets (see `middleware.rs`): API key, panic -> 500,
/// OpenAI errors for bare statuses, CORS when origins are allowed, the body read whole within
/// its limit (`body_limit.rs`), and the request log.
pub fn with_layers(routes: Router, state: Arc<AppState>) -> Router {
    let routes = routes
        .layer(axum::extract::DefaultBodyLimit::max(
            state.options.max_body_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require_api_key,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            middleware::panic_response,
        ))
        .layer(axum::middleware::from_fn(middleware::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            body_limit::read_body_within_limit,
        ));
    // Outside the API key check: a browser's preflight carries no credentials.
    let routes = match middleware::cors(&state.options.allowed_origins) {
        Some(cors) => routes.layer(cors),
        None => routes,
    };
    routes.layer(axum::middleware::from_fn_with_state(
        state,
        middleware::log_and_count_requests,
    ))
}

/// The whole application: [`router`] inside [`with_layers`].
pub fn app(state: Arc<AppState>) -> Router {
    with_layers(router(state.clone()), state)
}

/// Serves `app(state)` on `listener` until `shutdown` completes; then stops accepting, lets
/// in-flight requests finish for up to `shutdown_timeout`, ends those still running with an
/// error (an SSE error event, or a 503 for a response not started), and returns.
///
/// If the engine fails and cannot be rebuilt (see `supervision.rs`), it shuts down the same
/// way and returns the failure as an error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app(state.clone());
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let flag = state.clone();
    let (engine_failed_tx, mut engine_failed) = tokio::sync::oneshot::channel();
    // One supervisor per model; the first that gives up (a failed engine it cannot rebuild)
    // drains the whole server, so that its process supervisor starts a fresh one.
    let (gave_up_tx, mut gave_up) = tokio::sync::mpsc::channel::<String>(1);
    let mut supervisors = Vec::new();
    for slot in state.models.iter() {
        let slot = slot.clone();
        let gave_up_tx = gave_up_tx.clone();
        supervisors.push(tokio::spawn(async move {
            let installer = slot.clone();
            let reason = supervision::supervise(slot.engine_watch.clone(), move |model| {
                installer.set_model(model)
            })
            .await;
            let _ = gave_up_tx
                .send(format!("model {}: {reason}", slot.name()))
                .await;
        }));
    }
    drop(gave_up_tx);
    let supervisor = async move {
        match gave_up.recv().await {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    };
    let graceful = async move {
        tokio::select! {
            () = shutdown => {}
            reason = supervisor => {
                tracing::error!(
                    target: "minserve_server",
                    "the engine is down and will not be rebuilt; draining, then exiting"
                );
                let _ = engine_failed_tx.send(reason);
            }
        }
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
    tokio::pin!(server);
    let timeout = state.options.shutdown_timeout;
    let deadline = async move {
        let _ = rx.wait_for(|&stop| stop).await;
        tokio::time::sleep(timeout).await;
    };
    let result = tokio::select! {
        result = &mut server => result,
        _ = deadline => {
            tracing::warn!(
                target: "minserve_server",
                "shutdown timeout reached with {} requests still in flight; ending them with \
                 an error",
                state.inflight_requests()
            );
            state.cut_off_responses();
            // The cut responses end at once with their error; a client that does not read it
            // is not waited for long.
            tokio::time::timeout(CUT_OFF_GRACE, server)
                .await
                .unwrap_or(Ok(()))
        }
    };
    for supervisor in supervisors {
        supervisor.abort();
    }
    match engine_failed.try_recv() {
        Ok(reason) => Err(std::io::Error::other(reason)),
        Err(_) => result,
    }
}

/// How long responses cut off at the shutdown timeout get to send their error and end.
const CUT_OFF_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads the `--api-keys` file on every SIGHUP, for as long as the process runs: the new keys
/// replace the old ones at once, or, if the file does not read, the old ones stay and the
/// reason is logged.
pub fn reload_api_keys_on_sighup(state: Arc<AppState>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::warn!(target: "minserve_server", "cannot listen for SIGHUP: no key reloads");
            return;
        };
        while hangups.recv().await.is_some() {
            match state.reload_api_keys() {
                Ok(count) => {
                    tracing::info!(target: "minserve_server", "API keys reloaded: {count} keys")
                }
                Err(e) => tracing::error!(
                    target: "minserve_server",
                    "API keys not reloaded, the previous keys stay: {e}"
                ),
            }
        }
    });
    #[cfg(not(unix))]
    let _ = state;
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
