//! `POST /v1/chat/completions`: the conversation in `messages`, rendered with the model's chat
//! template, completed by the assistant.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;

use minserve_tokenizer::ChatMessage;

use super::generation::generate;
use super::{body_size, model_request};
use crate::caller::Caller;
use crate::error::ApiError;
use crate::generation_api::GenerationApi;
use crate::json_body::JsonBody;
use crate::models::ServedModel;
use crate::params::{GenerationParams, ReasoningOutput};
use crate::prompt::{chat_messages, chat_prompt, prediction_tokens, ChatRendering, Prompt};
use crate::state::AppState;
use crate::structured::{compile, compiled_grammar};
use crate::tool_format::ToolCallFormat;
use crate::tools::tool_request;

pub(crate) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let shared = state.clone();
    let (model, params, prompt) = state
        .cpu_work
        .run(body_size(&body), move || {
            let (body, model) = model_request(body, &shared)?;
            let (params, prompt) =
                conversation(&body, GenerationApi::Chat, &shared, &model, || {
                    chat_messages(&body)
                })?;
            Ok::<_, ApiError>((model, params, prompt))
        })
        .await??;
    generate(&state, model, caller, params, vec![prompt], arrival).await
}

/// What a conversation request (chat, or the Responses API) asks for: its parameters, with the
/// grammar of its output format or forced tool call and the tools whose calls are read out of
/// the output, and its messages rendered into the prompt.
pub(super) fn conversation(
    body: &JsonBody,
    api: GenerationApi,
    state: &AppState,
    model: &ServedModel,
    messages: impl FnOnce() -> Result<Vec<ChatMessage>, ApiError>,
) -> Result<(GenerationParams, Prompt), ApiError> {
    let mut params = GenerationParams::parse(body, api, model.vocab_size())?;
    let tools = tool_request(body, api, model)?;
    let format = tool_call_format(state, model);
    params.constraint = compiled_grammar(body, api, model)?;
    if let Some(grammar) = tools.as_ref().and_then(|t| t.forced_call_grammar(format)) {
        if params.constraint.is_some() {
            return Err(ApiError::invalid(
                "tool_choice",
                "a forced tool call and a response format cannot both shape the output",
            ));
        }
        params.constraint = Some(compile(&grammar, "tool_choice", model)?);
    }
    params.tool_calls = tools
        .as_ref()
        .filter(|t| t.parses_calls())
        .map(|t| t.tools.clone());
    if params.tool_calls.is_some() && params.delivery.stream && params.sampling.logprobs.is_some() {
        return Err(ApiError::invalid(
            "logprobs",
            "`logprobs` cannot be streamed together with tool calls (the deltas of a call carry \
             no log probabilities); send it without `stream`, or without tools",
        ));
    }
    params.reasoning = reasoning_output(body, api, state)?;
    if params.reasoning.is_some() && params.delivery.stream && params.sampling.logprobs.is_some() {
        return Err(ApiError::invalid(
            "logprobs",
            "`logprobs` cannot be streamed while a reasoning parser splits the thinking from the \
             answer (a token's text may straddle both); send it without `stream`, or with \
             `separate_reasoning: false`",
        ));
    }
    if api == GenerationApi::Chat {
        params.prediction = prediction_tokens(body, &model.tokenizer)?;
    }
    let rendering = ChatRendering {
        tools: tools.as_ref(),
        format,
    };
    let prompt = chat_prompt(body, messages()?, &model.tokenizer, &rendering)?;
    Ok((params, prompt))
}

/// Chat with `--reasoning-parser`: how its thinking is returned. SGLang's `separate_reasoning:
/// false` keeps it in `content`; vLLM's `include_reasoning: false` drops it.
fn reasoning_output(
    body: &JsonBody,
    api: GenerationApi,
    state: &AppState,
) -> Result<Option<ReasoningOutput>, ApiError> {
    let separate = body.bool("separate_reasoning")?.unwrap_or(true);
    let include = body.bool("include_reasoning")?.unwrap_or(true);
    let format = match state.options.reasoning_parser {
        Some(format) if api == GenerationApi::Chat && separate => format,
        _ => return Ok(None),
    };
    Ok(Some(ReasoningOutput { format, include }))
}

/// How the served model writes tool calls: `--tool-call-parser`, or what its chat template
/// teaches.
pub(super) fn tool_call_format(state: &AppState, model: &ServedModel) -> ToolCallFormat {
    state.options.tool_call_parser.unwrap_or_else(|| {
        model
            .tokenizer
            .chat_template()
            .map_or(ToolCallFormat::Hermes, ToolCallFormat::for_template)
    })
}
