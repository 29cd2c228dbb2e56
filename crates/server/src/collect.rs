//! A generation answered as one JSON body: every event is collected first, then the finished
//! choices are rendered together with the token counts.

use axum::response::Response;
use serde_json::Value;

use crate::choices::{ChoiceChange, Choices};
use crate::cpu_work::{json_response, serialize, CpuWork};
use crate::error::ApiError;
use crate::middleware::logged_by_handler;
use crate::submit::InFlightGeneration;

/// Waits until every choice of `generation` finished and answers them in one body, which
/// `render` makes of the choices and the prompt token count (on the CPU work threads when it
/// is large: about `bytes_per_token` per generated token).
pub(crate) async fn single_body_response(
    cpu_work: &CpuWork,
    mut generation: InFlightGeneration,
    bytes_per_token: usize,
    render: impl FnOnce(&Choices, usize) -> Value + Send + 'static,
) -> Result<Response, ApiError> {
    while !generation.choices().all_finished() {
        let change = generation.next_change().await?;
        if let ChoiceChange::Failed(message) = change {
            generation.failed();
            return Err(ApiError::internal(message));
        }
    }
    generation.finished();
    let size = generation.choices().completion_tokens() * bytes_per_token;
    let body = cpu_work
        .run(size, move || {
            serialize(&render(generation.choices(), generation.prompt_tokens()))
        })
        .await?;
    Ok(logged_by_handler(json_response(body)))
}
