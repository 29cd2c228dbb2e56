//! `GET /v1/models` and `GET /v1/models/{model}`: the served model's card.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::state::{AppState, ServedModel};

pub(crate) async fn list_models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let model = state.ready_model()?;
    Ok(Json(json!({"object": "list", "data": [model_card(&state, &model)]})).into_response())
}

pub(crate) async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let model = state.ready_model()?;
    if id != state.options.served_model_name {
        return Err(ApiError::model_not_found(&id));
    }
    Ok(Json(model_card(&state, &model)).into_response())
}

fn model_card(state: &AppState, model: &ServedModel) -> Value {
    json!({
        "id": state.options.served_model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "minserve",
        "max_model_len": model.max_model_len(),
    })
}
