//! The OpenAI routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, plus vLLM's
//! `/tokenize` and `/detokenize`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use minserve_core::sampling::{SamplingParams, MAX_LOGPROBS};
use minserve_core::Request;
use minserve_tokenizer::ChatMessage;
use serde_json::{json, Map, Value};

use crate::error::{first_word, ApiError};
use crate::respond::{respond, submit, Kind, Responder};
use crate::{AppState, ServedModel};

/// Most samples one request may ask for (`n` times the number of prompts).
pub(crate) const MAX_SEQUENCES_PER_REQUEST: usize = 128;

// ---------------------------------------------------------------------------------------------
// Request bodies

/// A JSON object body with typed getters whose errors name the parameter. `null` counts as
/// absent, as the OpenAI SDKs send it for unset fields in some versions.
struct Fields(Map<String, Value>);

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(name: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        name,
        format!("`{name}` must be {expected}, got {}", kind(got)),
    )
}

impl Fields {
    fn parse(body: Result<Bytes, BytesRejection>, state: &AppState) -> Result<Self, ApiError> {
        let bytes = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!(
                        "The request body is larger than the limit of {} bytes.",
                        state.options.max_body_bytes
                    ),
                )
                .code("request_too_large")
            } else {
                ApiError::bad_request(format!("Could not read the request body: {rejection}"))
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(format!("Malformed JSON in the request body: {e}"))
        })?;
        match value {
            Value::Object(map) => Ok(Self(map)),
            other => Err(ApiError::bad_request(format!(
                "The request body must be a JSON object, got {}",
                kind(&other)
            ))),
        }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn f32(&self, name: &str) -> Result<Option<f32>, ApiError> {
        self.get(name)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| wrong_type(name, "a number", v))
            })
            .transpose()
    }

    fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| as_int(v).ok_or_else(|| wrong_type(name, "an integer", v)))
            .transpose()
    }

    /// A non-negative integer.
    fn count(&self, name: &str) -> Result<Option<usize>, ApiError> {
        match self.int(name)? {
            Some(x) if x < 0 => Err(ApiError::invalid(
                name,
                format!("`{name}` must be at least 0, got {x}"),
            )),
            x => Ok(x.map(|x| x as usize)),
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.get(name)
            .map(|v| v.as_bool().ok_or_else(|| wrong_type(name, "a boolean", v)))
            .transpose()
    }

    fn str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        self.get(name)
            .map(|v| v.as_str().ok_or_else(|| wrong_type(name, "a string", v)))
            .transpose()
    }
}

/// An integer, also when written as `3.0`.
fn as_int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|x| x.fract() == 0.0 && x.abs() < 9e15)
            .map(|x| x as i64)
    })
}

fn token_id(v: &Value, name: &str, vocab_size: usize) -> Result<u32, ApiError> {
    let id = as_int(v).ok_or_else(|| wrong_type(name, "an array of token ids (integers)", v))?;
    if id < 0 || id as u64 >= vocab_size as u64 {
        return Err(ApiError::invalid(
            name,
            format!("token id {id} in `{name}` is outside the vocabulary of {vocab_size}"),
        ));
    }
    Ok(id as u32)
}

/// What chat and text completions share.
pub(crate) struct Common {
    /// The engine request of every prompt, but for its `prompt` and `max_tokens`, which
    /// depend on the prompt.
    pub request: Request,
    /// As the client asked; `None` runs to the end of the context.
    pub max_tokens: Option<usize>,
    pub max_tokens_param: &'static str,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
}

fn check_model(fields: &Fields, state: &AppState) -> Result<(), ApiError> {
    if let Some(model) = fields.str("model")? {
        if model != state.options.served_model_name {
            return Err(ApiError::model_not_found(model));
        }
    }
    Ok(())
}

fn parse_common(fields: &Fields, model: &ServedModel, chat: bool) -> Result<Common, ApiError> {
    let vocab_size = model.engine.limits().vocab_size;
    let (max_tokens, max_tokens_param) = match fields.int("max_completion_tokens")? {
        Some(x) if chat => (Some(x), "max_completion_tokens"),
        _ => (fields.int("max_tokens")?, "max_tokens"),
    };
    let echo = !chat && fields.bool("echo")?.unwrap_or(false);
    match max_tokens {
        // As in OpenAI's legacy API and vLLM: the prompt alone, nothing generated.
        Some(0) if echo => {}
        Some(x) if x < 1 => {
            let hint = if chat {
                ""
            } else {
                " (0 is allowed with `echo`, to get the prompt back alone)"
            };
            return Err(ApiError::invalid(
                max_tokens_param,
                format!("`{max_tokens_param}` must be at least 1, got {x}{hint}"),
            ));
        }
        _ => {}
    }
    let n = fields.int("n")?.unwrap_or(1);
    if n < 1 || n as usize > MAX_SEQUENCES_PER_REQUEST {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be between 1 and {MAX_SEQUENCES_PER_REQUEST}, got {n}"),
        ));
    }
    let top_k = match fields.int("top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be -1 (off) or at least 1, got {k}"),
            ))
        }
    };
    let seed = match fields.get("seed") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|x| x as u64))
                .ok_or_else(|| wrong_type("seed", "an integer", v))?,
        ),
    };
    let mut logit_bias = Vec::new();
    if let Some(v) = fields.get("logit_bias") {
        let map = v
            .as_object()
            .ok_or_else(|| wrong_type("logit_bias", "an object of token id -> bias", v))?;
        for (key, bias) in map {
            let id: u32 = key.trim().parse().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` keys must be token ids, got {key:?}"),
                )
            })?;
            if id as usize >= vocab_size {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!(
                        "token id {id} in `logit_bias` is outside the vocabulary of {vocab_size}"
                    ),
                ));
            }
            let bias = bias
                .as_f64()
                .ok_or_else(|| wrong_type("logit_bias", "an object of numbers", bias))?;
            logit_bias.push((id, bias as f32));
        }
    }
    let logprobs = if chat {
        let top = fields.count("top_logprobs")?;
        match (fields.bool("logprobs")?.unwrap_or(false), top) {
            (true, top) => Some(top.unwrap_or(0)),
            (false, Some(t)) if t > 0 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "`logprobs` must be true when `top_logprobs` is used",
                ))
            }
            (false, _) => None,
        }
    } else {
        fields.count("logprobs")?
    };
    if echo && logprobs.is_some() {
        // OpenAI would give the prompt's tokens their log probabilities, which needs logits at
        // every prompt position; the model runner computes them for the last one only.
        return Err(ApiError::invalid(
            "logprobs",
            "`echo` together with `logprobs` is not supported: minserve does not compute the \
             log probabilities of prompt tokens. Drop one of the two.",
        ));
    }
    if let Some(k) = logprobs {
        if k > MAX_LOGPROBS {
            let name = if chat { "top_logprobs" } else { "logprobs" };
            return Err(ApiError::invalid(
                name,
                format!("`{name}` must be at most {MAX_LOGPROBS}, got {k}"),
            ));
        }
    }
    let params = SamplingParams {
        temperature: fields.f32("temperature")?.unwrap_or(1.0),
        top_p: fields.f32("top_p")?.unwrap_or(1.0),
        top_k,
        min_p: fields.f32("min_p")?.unwrap_or(0.0),
        repetition_penalty: fields.f32("repetition_penalty")?.unwrap_or(1.0),
        presence_penalty: fields.f32("presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: fields.f32("frequency_penalty")?.unwrap_or(0.0),
        logit_bias,
        logprobs,
        seed,
    };
    params
        .validate()
        .map_err(|m| ApiError::invalid(&first_word(&m), m))?;

    let stop = match fields.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(String::from)
                    .ok_or_else(|| wrong_type("stop", "a string or an array of strings", s))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(wrong_type("stop", "a string or an array of strings", other)),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "`stop` strings must not be empty",
        ));
    }
    let stop_token_ids = match fields.get("stop_token_ids") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| token_id(v, "stop_token_ids", vocab_size))
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(wrong_type("stop_token_ids", "an array of token ids", other)),
    };
    let min_tokens = fields.count("min_tokens")?.unwrap_or(0);
    if let Some(max) = max_tokens {
        if min_tokens as i64 > max {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("`min_tokens` ({min_tokens}) must not exceed `{max_tokens_param}` ({max})"),
            ));
        }
    }
    let priority = fields.int("priority")?.unwrap_or(0);
    let priority = i32::try_from(priority).map_err(|_| {
        ApiError::invalid(
            "priority",
            format!("`priority` is out of range: {priority}"),
        )
    })?;
    fields.str("user")?; // accepted and ignored, but must be a string
    let stream = fields.bool("stream")?.unwrap_or(false);
    let include_usage = match fields.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(wrong_type(
                    "stream_options.include_usage",
                    "a boolean",
                    other,
                ))
            }
        },
        Some(other) => return Err(wrong_type("stream_options", "an object", other)),
    };
    let request = Request {
        prompt: Vec::new(),
        params,
        max_tokens: 0,
        min_tokens,
        stop,
        stop_token_ids,
        ignore_eos: fields.bool("ignore_eos")?.unwrap_or(false),
        n: n as usize,
        priority,
    };
    Ok(Common {
        request,
        max_tokens: max_tokens.map(|x| x as usize),
        max_tokens_param,
        stream,
        include_usage,
        echo,
    })
}

/// A prompt as the client gave it: its tokens, and its text when it came as text.
pub(crate) struct Prompt {
    pub tokens: Vec<u32>,
    pub text: Option<String>,
}

fn parse_prompts(fields: &Fields, model: &ServedModel) -> Result<Vec<Prompt>, ApiError> {
    let vocab_size = model.engine.limits().vocab_size;
    let encode = |text: &str| -> Result<Prompt, ApiError> {
        let tokens = model.tokenizer.encode(text, true).map_err(|e| {
            ApiError::invalid("prompt", format!("could not tokenize the prompt: {e}"))
        })?;
        Ok(Prompt {
            tokens,
            text: Some(text.to_string()),
        })
    };
    let ids = |items: &[Value]| -> Result<Prompt, ApiError> {
        Ok(Prompt {
            tokens: items
                .iter()
                .map(|v| token_id(v, "prompt", vocab_size))
                .collect::<Result<_, _>>()?,
            text: None,
        })
    };
    let expected =
        "a string, an array of strings, an array of token ids or an array of arrays of token ids";
    let prompts = match fields.get("prompt") {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(s)) => vec![encode(s)?],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid("prompt", "`prompt` must not be empty"))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| wrong_type("prompt", expected, v))
                        .and_then(encode)
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![ids(items)?],
            Value::Array(_) => items
                .iter()
                .map(|v| match v {
                    Value::Array(inner) => ids(inner),
                    other => Err(wrong_type("prompt", expected, other)),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(wrong_type("prompt", expected, other)),
        },
        Some(other) => return Err(wrong_type("prompt", expected, other)),
    };
    Ok(prompts)
}

fn parse_messages(fields: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match fields.get("messages") {
        None => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(wrong_type("messages", "an array of messages", other)),
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let obj = m
                .as_object()
                .ok_or_else(|| wrong_type(&param, "an object", m))?;
            let role = match obj.get("role") {
                Some(Value::String(r)) if !r.is_empty() => r.clone(),
                Some(other) => return Err(wrong_type(&format!("{param}.role"), "a string", other)),
                None => {
                    return Err(ApiError::invalid(
                        &format!("{param}.role"),
                        format!("`{param}.role` is required"),
                    ))
                }
            };
            let content = match obj.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut texts = Vec::new();
                    for part in parts {
                        match (part.get("type").and_then(Value::as_str), part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                            _ => return Err(ApiError::invalid(
                                &format!("{param}.content"),
                                "only text content parts ({\"type\": \"text\", \"text\": ...}) \
                                     are supported",
                            )),
                        }
                    }
                    texts.join("\n")
                }
                Some(other) => {
                    return Err(wrong_type(
                        &format!("{param}.content"),
                        "a string or an array of text parts",
                        other,
                    ))
                }
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Handlers

pub async fn list_models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let model = state.ready_model()?;
    Ok(Json(json!({"object": "list", "data": [model_card(&state, &model)]})).into_response())
}

pub async fn get_model(
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
        "max_model_len": model.max_model_len,
    })
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(state, body, false).await
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(state, body, true).await
}

/// Both generation routes; they differ in where the prompt comes from and in the response's
/// shape.
async fn generate(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    chat: bool,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let (fields, model) = open(body, &state)?;
    let common = parse_common(&fields, &model, chat)?;
    let (prompts, prompt_param, path) = if chat {
        let prompt = chat_prompt(&fields, &model)?;
        (vec![prompt], "messages", "/v1/chat/completions")
    } else {
        if fields.get("suffix").is_some() {
            return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
        }
        (parse_prompts(&fields, &model)?, "prompt", "/v1/completions")
    };
    let submitted = submit(
        &state,
        &model,
        &prompts,
        &common,
        prompt_param,
        path,
        arrival,
    )?;
    let kind = if chat {
        Kind::Chat
    } else {
        Kind::Text { prompts }
    };
    respond(Responder::new(&state, model, common, kind), submitted).await
}

/// The body of a model route as an object, checked against the served model, and the model,
/// or the error to answer (400, 404, 503).
fn open(
    body: Result<Bytes, BytesRejection>,
    state: &AppState,
) -> Result<(Fields, Arc<ServedModel>), ApiError> {
    let fields = Fields::parse(body, state)?;
    check_model(&fields, state)?;
    Ok((fields, state.ready_model()?))
}

/// The conversation in `messages`, rendered with the model's chat template.
fn render_chat(
    fields: &Fields,
    model: &ServedModel,
    add_generation_prompt: bool,
) -> Result<String, ApiError> {
    let messages = parse_messages(fields)?;
    let template = model.tokenizer.chat_template().ok_or_else(|| {
        ApiError::bad_request(
            "This model has no chat template: send a `prompt` to /v1/completions instead.",
        )
    })?;
    template
        .render(&messages, add_generation_prompt)
        .map_err(|e| {
            ApiError::invalid(
                "messages",
                format!("could not apply the chat template: {e}"),
            )
        })
}

/// The conversation in `messages`, rendered and tokenized, ready for the assistant's turn.
fn chat_prompt(fields: &Fields, model: &ServedModel) -> Result<Prompt, ApiError> {
    let text = render_chat(fields, model, true)?;
    // The template writes any BOS itself.
    let tokens = model.tokenizer.encode(&text, false).map_err(|e| {
        ApiError::invalid("messages", format!("could not tokenize the messages: {e}"))
    })?;
    Ok(Prompt {
        tokens,
        text: Some(text),
    })
}

/// vLLM's `/tokenize`: `{"prompt": ..., "add_special_tokens": true}` or `{"messages": [...],
/// "add_generation_prompt": true}`.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (fields, model) = open(body, &state)?;
    let tokens = if fields.get("messages").is_some() {
        let add_generation_prompt = fields.bool("add_generation_prompt")?.unwrap_or(true);
        let text = render_chat(&fields, &model, add_generation_prompt)?;
        let add_special = fields.bool("add_special_tokens")?.unwrap_or(false);
        model.tokenizer.encode(&text, add_special)
    } else {
        let prompt = fields.str("prompt")?.ok_or_else(|| {
            ApiError::invalid("prompt", "`prompt` (a string) or `messages` is required")
        })?;
        let add_special = fields.bool("add_special_tokens")?.unwrap_or(true);
        model.tokenizer.encode(prompt, add_special)
    }
    .map_err(|e| ApiError::invalid("prompt", format!("could not tokenize: {e}")))?;
    let token_strs: Vec<Option<String>> = tokens
        .iter()
        .map(|&t| model.tokenizer.id_to_token(t))
        .collect();
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": model.max_model_len,
        "tokens": tokens,
        "token_strs": token_strs,
    }))
    .into_response())
}

/// vLLM's `/detokenize`: `{"tokens": [ids]}` -> `{"prompt": text}`.
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (fields, model) = open(body, &state)?;
    let vocab_size = model.engine.limits().vocab_size;
    let tokens: Vec<u32> = match fields.get("tokens") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| token_id(v, "tokens", vocab_size))
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(wrong_type("tokens", "an array of token ids", other)),
        None => return Err(ApiError::invalid("tokens", "`tokens` is required")),
    };
    let prompt = model
        .tokenizer
        .decode(&tokens, false)
        .map_err(|e| ApiError::invalid("tokens", format!("could not detokenize: {e}")))?;
    Ok(Json(json!({"prompt": prompt})).into_response())
}
