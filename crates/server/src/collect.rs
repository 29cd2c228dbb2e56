//! A generation answered as one JSON body: every event is collected first, then the finished
//! choices are rendered together with the token counts.

use axum::response::Response;

use crate::choices::ChoiceChange;
use crate::cpu_work::{json_response, serialize, CpuWork};
use crate::error::ApiError;
use crate::middleware::logged_by_handler;
use crate::render::ResponseRenderer;
use crate::submit::InFlightGeneration;

/// Waits until every choice of `generation` finished and answers them in one body.
pub(crate) async fn single_body_response(
    cpu_work: &CpuWork,
    renderer: ResponseRenderer,
    mut generation: InFlightGeneration,
) -> Result<Response, ApiError> {
    while !generation.choices().all_finished() {
        let change = generation.next_change().await?;
        if let ChoiceChange::Failed(message) = change {
            generation.failed();
            return Err(ApiError::internal(message));
        }
    }
    generation.finished();
    // A guess at the body's size: tens of bytes per token, many more with logprobs.
    let bytes_per_token = if renderer.wants_logprobs() { 1024 } else { 64 };
    let size = generation.choices().completion_tokens() * bytes_per_token;
    let body = cpu_work
        .run(size, move || {
            serialize(&renderer.single_body(generation.choices(), generation.prompt_tokens()))
        })
        .await?;
    Ok(logged_by_handler(json_response(body)))
}
