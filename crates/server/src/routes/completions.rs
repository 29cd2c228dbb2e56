//! `POST /v1/completions`: one or several prompts, as text or token ids, continued.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;

use super::generation::generate;
use super::{body_size, model_request};
use crate::caller::Caller;
use crate::error::ApiError;
use crate::generation_api::GenerationApi;
use crate::params::GenerationParams;
use crate::prompt::completion_prompts;
use crate::state::AppState;
use crate::structured::compiled_grammar;

pub(crate) async fn completions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let shared = state.clone();
    let (model, params, prompts) = state
        .cpu_work
        .run(body_size(&body), move || {
            let (body, model) = model_request(body, &shared)?;
            let mut params =
                GenerationParams::parse(&body, GenerationApi::Completion, model.vocab_size())?;
            params.constraint = compiled_grammar(&body, GenerationApi::Completion, &model)?;
            let prompts = completion_prompts(&body, &model.tokenizer, model.vocab_size())?;
            Ok((model, params, prompts))
        })
        .await??;
    generate(&state, model, caller, params, prompts, arrival).await
}
