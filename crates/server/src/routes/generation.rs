//! What chat and text completions share once their prompts are read: submit to the engine,
//! then answer as a stream or as one body.

use std::sync::Arc;
use std::time::Instant;

use axum::response::Response;

use crate::caller::Caller;
use crate::collect::single_body_response;
use crate::error::ApiError;
use crate::params::GenerationParams;
use crate::prompt::Prompt;
use crate::render::ResponseRenderer;
use crate::state::{AppState, ReadyModel};
use crate::stream::sse_response;
use crate::submit::{submit, Submission};

/// Submits `prompts` with `params` and answers with their completion.
pub(super) async fn generate(
    state: &Arc<AppState>,
    model: ReadyModel,
    caller: Caller,
    params: GenerationParams,
    prompts: Vec<Prompt>,
    arrival: Instant,
) -> Result<Response, ApiError> {
    let samples_per_prompt = params.samples_per_prompt(prompts.len())?;
    let generation = submit(
        state,
        &model,
        Submission {
            params: &params,
            prompts: &prompts,
            samples_per_prompt,
            arrival,
            caller,
        },
    )?;
    let renderer = ResponseRenderer::new(
        model.slot.name().to_string(),
        model.tokenizer.clone(),
        &params,
        &prompts,
        samples_per_prompt,
    );
    if params.delivery.stream {
        Ok(sse_response(renderer, generation))
    } else {
        // A guess at the body's size: tens of bytes per token, many more with logprobs.
        let bytes_per_token = if renderer.wants_logprobs() { 1024 } else { 64 };
        single_body_response(
            &state.cpu_work,
            generation,
            bytes_per_token,
            move |choices, prompt_tokens| renderer.single_body(choices, prompt_tokens),
        )
        .await
    }
}
