//! vLLM's `POST /tokenize`, `POST /detokenize` and `POST /v1/chat/completions/render`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;
use serde_json::{json, Value};

use super::chat::tool_call_format;
use super::{body_size, model_request};
use crate::cpu_work::{json_response, serialize};
use crate::error::ApiError;
use crate::generation_api::GenerationApi;
use crate::json_body::{token_ids, wrong_type};
use crate::prompt::{chat_messages, chat_prompt, render_chat, ChatRendering};
use crate::state::AppState;
use crate::tools::tool_request;

/// `{"prompt": ..., "add_special_tokens": true}` or `{"messages": [...],
/// "add_generation_prompt": true}` -> the token ids and their strings.
pub(crate) async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    answer_on_cpu(state, body, tokenize_body).await
}

/// The serialized answer of [`tokenize`] (a 4 MB prompt makes a response of tens of MB).
fn tokenize_body(
    body: Result<Bytes, BytesRejection>,
    state: &AppState,
) -> Result<Vec<u8>, ApiError> {
    let (body, model) = model_request(body, state)?;
    let tokenizer = &model.tokenizer;
    let tokens = if body.get("messages").is_some() {
        let tools = tool_request(&body, GenerationApi::Chat, &model)?;
        let rendering = ChatRendering {
            tools: tools.as_ref(),
            format: tool_call_format(state, &model),
        };
        let text = render_chat(&body, chat_messages(&body)?, tokenizer, true, &rendering)?;
        let add_special = body.bool("add_special_tokens")?.unwrap_or(false);
        tokenizer.encode(&text, add_special)
    } else {
        let prompt = body.str("prompt")?.ok_or_else(|| {
            ApiError::invalid("prompt", "`prompt` (a string) or `messages` is required")
        })?;
        let add_special = body.bool("add_special_tokens")?.unwrap_or(true);
        tokenizer.encode(prompt, add_special)
    }
    .map_err(|e| ApiError::invalid("prompt", format!("could not tokenize: {e}")))?;
    let token_strs: Vec<Option<String>> =
        tokens.iter().map(|&t| tokenizer.id_to_token(t)).collect();
    Ok(serialize(&json!({
        "count": tokens.len(),
        "max_model_len": model.max_model_len(),
        "tokens": tokens,
        "token_strs": token_strs,
    })))
}

/// A chat request -> `{"token_ids": [...]}`, the prompt it would run, as vLLM's render route
/// answers. The vLLM router's `cache_aware` policy asks for it to match requests by tokens.
pub(crate) async fn render_chat_request(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    answer_on_cpu(state, body, render_chat_body).await
}

/// The serialized answer of [`render_chat_request`].
fn render_chat_body(
    body: Result<Bytes, BytesRejection>,
    state: &AppState,
) -> Result<Vec<u8>, ApiError> {
    let (body, model) = model_request(body, state)?;
    let tools = tool_request(&body, GenerationApi::Chat, &model)?;
    let rendering = ChatRendering {
        tools: tools.as_ref(),
        format: tool_call_format(state, &model),
    };
    let prompt = chat_prompt(&body, chat_messages(&body)?, &model.tokenizer, &rendering)?;
    Ok(serialize(&json!({"token_ids": prompt.tokens})))
}

/// `{"tokens": [ids]}` -> `{"prompt": text}`.
pub(crate) async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    answer_on_cpu(state, body, detokenize_body).await
}

/// A route's body as axum hands it over.
type RequestBody = Result<Bytes, BytesRejection>;

/// The serialized answer `answer` makes of `body`, made off the async workers when the body is
/// large (see `cpu_work.rs`).
async fn answer_on_cpu(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    answer: fn(RequestBody, &AppState) -> Result<Vec<u8>, ApiError>,
) -> Result<Response, ApiError> {
    let shared = state.clone();
    let body = state
        .cpu_work
        .run(body_size(&body), move || answer(body, &shared))
        .await??;
    Ok(json_response(body))
}

/// The serialized answer of [`detokenize`].
fn detokenize_body(
    body: Result<Bytes, BytesRejection>,
    state: &AppState,
) -> Result<Vec<u8>, ApiError> {
    let (body, model) = model_request(body, state)?;
    let tokens = match body.get("tokens") {
        Some(Value::Array(items)) => token_ids(items, "tokens", model.vocab_size())?,
        Some(other) => return Err(wrong_type("tokens", "an array of token ids", other)),
        None => return Err(ApiError::invalid("tokens", "`tokens` is required")),
    };
    let prompt = model
        .tokenizer
        .decode(&tokens, false)
        .map_err(|e| ApiError::invalid("tokens", format!("could not detokenize: {e}")))?;
    Ok(serialize(&json!({"prompt": prompt})))
}
