//! `GET /v1/models` and `GET /v1/models/{model}`: the served models' cards, with their limits.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::models::ModelSlot;
use crate::state::AppState;

/// Every served model; 503 while none is ready yet (or when shutting down). A model still
/// loading, or that failed to, is listed with its `status` and without its limits.
pub(crate) async fn list_models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    if !state.models.iter().any(|s| state.readiness(s).is_ok()) {
        state.readiness(state.models.first())?;
    }
    let cards: Vec<Value> = state.models.iter().map(|s| model_card(&state, s)).collect();
    Ok(Json(json!({"object": "list", "data": cards})).into_response())
}

pub(crate) async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let slot = state.find_model(Some(&id))?;
    state.readiness(slot)?;
    Ok(Json(model_card(&state, slot)).into_response())
}

fn model_card(state: &AppState, slot: &ModelSlot) -> Value {
    let mut card = json!({
        "id": slot.name(),
        "object": "model",
        "created": state.started,
        "owned_by": "minserve",
        "aliases": slot.aliases(),
        "status": match state.readiness(slot) {
            Ok(()) => "ready",
            Err(_) if slot.model().is_none() && slot.load_error().is_none() => "loading",
            Err(_) => "unavailable",
        },
    });
    if let Some(model) = slot.model() {
        let limits = model.engine.limits();
        card["max_model_len"] = json!(model.max_model_len());
        card["max_num_seqs"] = json!(model.max_num_seqs);
        card["kv_cache_tokens"] = json!(limits.num_blocks * limits.block_size);
    }
    card
}
