//! The operator's pages: `GET /health` (200 once the model is ready, 503 while it loads, after
//! it failed to load, after its engine failed, or once shutdown began) and `GET /metrics`
//! (Prometheus text, with the `vllm:` names routers read), and `GET /get_load` for routers
//! (`vllm_compat.rs`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;
use crate::vllm_compat;

pub(crate) async fn health(State(state): State<Arc<AppState>>) -> Response {
    if let Some(reason) = state.engine_failure() {
        return ApiError::engine_unavailable(&reason).into_response();
    }
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
    match state.load_error() {
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

pub(crate) async fn metrics_page(State(state): State<Arc<AppState>>) -> Response {
    let model = state.model();
    let stats = model.as_ref().map(|m| m.engine.stats());
    let mut page = state.metrics.render(stats);
    vllm_compat::render_metrics(
        &stats.unwrap_or_default(),
        &state.options.served_model_name,
        &mut page,
    );
    state.engine_watch.render(model.is_some(), &mut page);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        page,
    )
        .into_response()
}

/// `{"load": N}`: the requests the engine holds, 0 while the model loads.
pub(crate) async fn load(State(state): State<Arc<AppState>>) -> Response {
    let load = state
        .model()
        .map_or(0, |m| vllm_compat::load(&m.engine.stats()));
    axum::Json(serde_json::json!({ "load": load })).into_response()
}
