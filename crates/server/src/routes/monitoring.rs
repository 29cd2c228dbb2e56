//! The operator's pages: `GET /health` and `GET /metrics` (Prometheus text, every series
//! labelled with its `model`, with the `vllm:` names routers read), and `GET /get_load` for
//! routers (`vllm_compat.rs`).
//!
//! `/health` is 200 once every served model is ready, 503 while one loads, after one failed to
//! load, after one's engine failed, or once shutdown began; the body says so per model
//! (`{"status": ..., "models": {"name": "ready" | "loading" | error}}`).
//! `/health/{model}` and `/health?model=NAME` answer for one model alone (by name or alias),
//! so a load balancer can route to the models that are up.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map};

use crate::metrics::Exposition;
use crate::models::ModelSlot;
use crate::state::AppState;
use crate::vllm_compat;

pub(crate) async fn health(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(id) = query.get("model") {
        return model_health(&state, id);
    }
    if state.models.iter().count() == 1 {
        return model_health(&state, state.models.first().name());
    }
    let mut models = Map::new();
    let mut first_error = None;
    for slot in state.models.iter() {
        let status = match state.readiness(slot) {
            Ok(()) => json!("ready"),
            Err(e) => {
                let body = e.to_json()["error"].clone();
                first_error.get_or_insert(e);
                body
            }
        };
        models.insert(slot.name().to_string(), status);
    }
    let (code, status) = match first_error {
        None => (StatusCode::OK, "ok"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "degraded"),
    };
    (
        code,
        axum::Json(json!({"status": status, "models": models})),
    )
        .into_response()
}

pub(crate) async fn health_of(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Response {
    model_health(&state, &id)
}

/// 200 when the model `id` takes requests, else its 404 or 503.
fn model_health(state: &AppState, id: &str) -> Response {
    let ready = state
        .find_model(Some(id))
        .and_then(|slot| state.readiness(slot).map(|()| slot));
    match ready {
        Ok(slot) => (
            StatusCode::OK,
            axum::Json(json!({"status": "ok", "model": slot.name()})),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn metrics_page(State(state): State<Arc<AppState>>) -> Response {
    let mut page = Exposition::default();
    for slot in state.models.iter() {
        render_model(&mut page, slot);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        page.finish(),
    )
        .into_response()
}

/// `{"load": N}`: the requests the engines hold (one model's with `?model=NAME`), 0 for a
/// model still loading.
pub(crate) async fn load(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let of = |slot: &ModelSlot| {
        slot.model()
            .map_or(0, |m| vllm_compat::load(&m.engine.stats()))
    };
    let load = match query.get("model") {
        Some(id) => match state.find_model(Some(id)) {
            Ok(slot) => of(slot),
            Err(e) => return e.into_response(),
        },
        None => state.models.iter().map(|slot| of(slot)).sum(),
    };
    axum::Json(json!({ "load": load })).into_response()
}

fn render_model(page: &mut Exposition, slot: &ModelSlot) {
    let model = slot.model();
    let stats = model.as_ref().map(|m| m.engine.stats());
    slot.metrics.render(page, slot.name(), stats);
    vllm_compat::render_metrics(page, slot.name(), &stats.unwrap_or_default());
    slot.engine_watch.render(page, slot.name(), model.is_some());
}
