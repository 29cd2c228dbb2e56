//! minserve's OpenAI-compatible HTTP API: axum on tokio, in front of the engine thread.
//!
//! ```text
//! socket -> middleware.rs (API key, JSON errors, log, in-flight count)
//!        -> routes/chat.rs | routes/completions.rs: read the body
//!             json_body.rs (shape, types), params.rs (GenerationParams), prompt.rs (token ids)
//!        -> submit.rs: complete engine requests, validated once by the engine handle,
//!             admission.rs (429 when the queue is full), EngineHandle::add_request(request, sink)
//!        -> engine thread --RequestEvent--> tokio channel
//!        -> choices.rs (events -> choices, pure) -> render.rs (JSON)
//!        -> stream.rs (SSE chunks) | collect.rs (one JSON body)
//! ```
//!
//! Each request's events come back over its own unbounded channel. When the client goes away
//! the response future or stream is dropped with the channel's receiver, the sink reports
//! itself closed, and the engine aborts the request before its next step.
//!
//! The server knows no model files or tensors: it serves a [`ServedModel`] (an engine handle
//! and a tokenizer) that the caller wired up. It loads in the background: `GET /health` (and
//! every model route) answers 503 until [`AppState::set_model`] is called.

mod admission;
mod choices;
mod collect;
mod error;
mod json_body;
mod metrics;
mod middleware;
mod options;
mod params;
mod prompt;
mod render;
mod routes;
mod state;
mod stream;
mod submit;
mod telemetry;

use std::future::{Future, IntoFuture};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;

pub use error::{ApiError, RequestFieldNames};
pub use metrics::Metrics;
pub use options::ServerOptions;
pub use state::{spawn_load, AppState, ServedModel};

use routes::{chat, completions, models, monitoring, openapi, tokenize};

/// The routes, without the outer layers (see [`app`]).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(monitoring::health))
        .route("/metrics", get(monitoring::metrics_page))
        .route("/openapi.json", get(openapi::openapi))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{model}", get(models::get_model))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .fallback(|| async { ApiError::for_status(StatusCode::NOT_FOUND) })
        .with_state(state)
}

/// Wraps `routes` in the layers every route gets (see `middleware.rs`): body limit, API key,
/// panic -> 500, OpenAI errors for bare statuses, and the request log.
pub fn with_layers(routes: Router, state: Arc<AppState>) -> Router {
    routes
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
            state,
            middleware::log_and_count_requests,
        ))
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
