//! A generation answered as one JSON body: every event is collected first, then the finished
//! choices are rendered together with the token counts.

use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::choices::ChoiceChange;
use crate::error::ApiError;
use crate::middleware::logged_by_handler;
use crate::render::ResponseRenderer;
use crate::submit::InFlightGeneration;

/// Waits until every choice of `generation` finished and answers them in one body.
pub(crate) async fn single_body_response(
    renderer: ResponseRenderer,
    mut generation: InFlightGeneration,
) -> Result<Response, ApiError> {
    while !generation.choices().all_finished() {
        let Some(change) = generation.next_change().await else {
            return Err(ApiError::engine_gone());
        };
        if let ChoiceChange::Failed(message) = change {
            generation.failed();
            return Err(ApiError::internal(message));
        }
    }
    generation.finished();
    let body = renderer.single_body(generation.choices(), generation.prompt_tokens());
    Ok(logged_by_handler(Json(body).into_response()))
}
