//! `POST /v1/responses`: the Responses API (see `responses/`), answered as one `response`
//! object or as its stream of events.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;

use super::chat::conversation;
use super::{body_size, model_request};
use crate::caller::Caller;
use crate::collect::single_body_response;
use crate::error::ApiError;
use crate::generation_api::GenerationApi;
use crate::responses::input::input_messages;
use crate::responses::object::ResponseShell;
use crate::responses::stream::sse_response;
use crate::state::AppState;
use crate::submit::{submit, Submission};

pub(crate) async fn responses(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let shared = state.clone();
    let (model, params, prompt, shell) = state
        .cpu_work
        .run(body_size(&body), move || {
            let (body, model) = model_request(body, &shared)?;
            let mut history = Vec::new();
            let (params, prompt) =
                conversation(&body, GenerationApi::Responses, &shared, &model, || {
                    let (messages, conversation) = input_messages(&body, &shared.responses)?;
                    history = conversation;
                    Ok(messages)
                })?;
            // OpenAI keeps a response unless told not to.
            let keep = body
                .bool("store")?
                .unwrap_or(true)
                .then(|| (shared.responses.clone(), history));
            let shell = ResponseShell::new(&body, model.slot.name(), &params, keep);
            Ok::<_, ApiError>((model, params, prompt, shell))
        })
        .await??;
    let prompts = [prompt];
    let generation = submit(
        &state,
        &model,
        Submission {
            params: &params,
            prompts: &prompts,
            samples_per_prompt: params.samples_per_prompt(prompts.len())?,
            arrival,
            caller,
        },
    )?;
    if params.delivery.stream {
        Ok(sse_response(shell, generation))
    } else {
        let finished = move |choices: &_, prompt_tokens| shell.finished(choices, prompt_tokens);
        single_body_response(&state.cpu_work, generation, 256, finished).await
    }
}
