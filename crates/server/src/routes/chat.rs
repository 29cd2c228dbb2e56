//! `POST /v1/chat/completions`: the conversation in `messages`, rendered with the model's chat
//! template, completed by the assistant.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;

use super::generation::generate;
use super::{body_size, model_request};
use crate::error::ApiError;
use crate::params::{GenerationApi, GenerationParams};
use crate::prompt::chat_prompt;
use crate::state::AppState;

pub(crate) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let shared = state.clone();
    let (model, params, prompt) = state
        .cpu_work
        .run(body_size(&body), move || {
            let (body, model) = model_request(body, &shared)?;
            let params = GenerationParams::parse(&body, GenerationApi::Chat, model.vocab_size())?;
            let prompt = chat_prompt(&body, &model.tokenizer)?;
            Ok::<_, ApiError>((model, params, prompt))
        })
        .await??;
    generate(&state, model, params, vec![prompt], arrival).await
}
