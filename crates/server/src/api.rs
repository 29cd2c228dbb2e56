//! The OpenAI routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, plus vLLM's
//! `/tokenize` and `/detokenize`.

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use minserve_core::engine::{EventSink, FinishReason, Request, RequestEvent, RequestId};
use minserve_core::sampling::{SamplingParams, MAX_LOGPROBS};
use minserve_tokenizer::{ChatMessage, Tokenizer};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::{first_word, ApiError};
use crate::{unix_time, AppState, LoggedByHandler, ServedModel};

/// Most samples one request may ask for (`n` times the number of prompts).
const MAX_SEQUENCES_PER_REQUEST: usize = 128;

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
struct Common {
    max_tokens: Option<usize>,
    max_tokens_param: &'static str,
    params: SamplingParams,
    n: usize,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    min_tokens: usize,
    priority: i32,
    stream: bool,
    include_usage: bool,
    echo: bool,
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
    if let Some(x) = max_tokens {
        if x < 1 {
            return Err(ApiError::invalid(
                max_tokens_param,
                format!("`{max_tokens_param}` must be at least 1, got {x}"),
            ));
        }
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
    Ok(Common {
        max_tokens: max_tokens.map(|x| x as usize),
        max_tokens_param,
        params,
        n: n as usize,
        stop,
        stop_token_ids,
        ignore_eos: fields.bool("ignore_eos")?.unwrap_or(false),
        min_tokens,
        priority,
        stream,
        include_usage,
        echo: if chat {
            false
        } else {
            fields.bool("echo")?.unwrap_or(false)
        },
    })
}

/// A prompt as the client gave it: its tokens, and its text when it came as text.
struct Prompt {
    tokens: Vec<u32>,
    text: Option<String>,
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
// Submitting to the engine

/// Forwards one prompt's events to the response; `is_closed` turns true once the response (and
/// with it the receiver) is dropped, which makes the engine abort the request.
struct ChannelSink {
    prompt: usize,
    tx: UnboundedSender<(usize, RequestEvent)>,
}

impl EventSink for ChannelSink {
    fn send(&self, event: RequestEvent) -> bool {
        self.tx.send((self.prompt, event)).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Lives as long as the response: on drop it aborts what is still running in the engine,
/// releases the queue slots, records metrics and writes the request's log line.
struct Guard {
    state: Arc<AppState>,
    model: Arc<ServedModel>,
    ids: Vec<RequestId>,
    num_seqs: usize,
    path: &'static str,
    arrival: Instant,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    completion_tokens: usize,
    max_choice_tokens: usize,
    finished: bool,
    status: u16,
}

impl Guard {
    fn finish(&mut self, reasons: &[Option<FinishReason>]) {
        if self.finished {
            return;
        }
        self.finished = true;
        let m = &self.state.metrics;
        let e2e = self.arrival.elapsed().as_secs_f64();
        m.e2e_latency.observe(e2e);
        if let Some(first) = self.first_token {
            let ttft = first.duration_since(self.arrival).as_secs_f64();
            if self.max_choice_tokens > 1 {
                m.time_per_output_token
                    .observe((e2e - ttft) / (self.max_choice_tokens - 1) as f64);
            }
        }
        for reason in reasons.iter().flatten() {
            match reason {
                FinishReason::Stop => m.success_stop.fetch_add(1, Ordering::Relaxed),
                FinishReason::Length => m.success_length.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.finished {
            for &id in &self.ids {
                self.model.engine.abort(id);
            }
            self.state.metrics.aborted.fetch_add(1, Ordering::Relaxed);
        }
        self.state
            .inflight_seqs
            .fetch_sub(self.num_seqs, Ordering::SeqCst);
        tracing::info!(
            target: "minserve_server",
            "POST {} {} prompt_tokens={} completion_tokens={} latency_ms={:.1}{}",
            self.path,
            self.status,
            self.prompt_tokens,
            self.completion_tokens,
            self.arrival.elapsed().as_secs_f64() * 1e3,
            if self.finished { "" } else { " cancelled" },
        );
    }
}

struct Submitted {
    rx: UnboundedReceiver<(usize, RequestEvent)>,
    guard: Guard,
}

fn submit(
    state: &Arc<AppState>,
    model: &Arc<ServedModel>,
    prompts: &[Prompt],
    common: &Common,
    prompt_param: &str,
    path: &'static str,
    arrival: Instant,
) -> Result<Submitted, ApiError> {
    let max_total = model.max_total_tokens();
    let requests: Vec<Request> = prompts
        .iter()
        .map(|p| {
            // Without max_tokens, generate up to the end of the context (as vLLM does).
            let max_tokens = common
                .max_tokens
                .unwrap_or_else(|| max_total.saturating_sub(p.tokens.len()).max(1));
            Request {
                prompt: p.tokens.clone(),
                params: common.params.clone(),
                max_tokens,
                min_tokens: common.min_tokens,
                stop: common.stop.clone(),
                stop_token_ids: common.stop_token_ids.clone(),
                ignore_eos: common.ignore_eos,
                n: common.n,
                priority: common.priority,
            }
        })
        .collect();
    let num_seqs = requests.len() * common.n;
    if num_seqs > MAX_SEQUENCES_PER_REQUEST {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts times n = {} asks for {num_seqs} sequences; at most \
                 {MAX_SEQUENCES_PER_REQUEST} per request",
                requests.len(),
                common.n
            ),
        ));
    }
    let limits = model.engine.limits();
    for r in &requests {
        limits.check(r).map_err(|e| {
            let mut err = ApiError::from_request_error(&e, prompt_param);
            if matches!(e, minserve_core::engine::RequestError::InvalidParams(_)) {
                return err;
            }
            if common.max_tokens.is_some()
                && matches!(e, minserve_core::engine::RequestError::NeverFits { .. })
            {
                err.param = Some(common.max_tokens_param.to_string());
            }
            err
        })?;
    }

    // Back-pressure: sequences beyond the running batch's capacity wait; too many -> 429.
    let before = state.inflight_seqs.fetch_add(num_seqs, Ordering::SeqCst);
    let waiting = model
        .engine
        .stats()
        .num_waiting
        .max((before + num_seqs).saturating_sub(model.max_num_seqs));
    let mut guard = Guard {
        state: state.clone(),
        model: model.clone(),
        ids: Vec::new(),
        num_seqs,
        path,
        arrival,
        first_token: None,
        prompt_tokens: prompts.iter().map(|p| p.tokens.len()).sum(),
        completion_tokens: 0,
        max_choice_tokens: 0,
        finished: false,
        status: 200,
    };
    if waiting > state.options.max_queue {
        guard.finished = true; // nothing to abort
        guard.status = 429;
        state.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::queue_full(waiting, state.options.max_queue));
    }
    let (tx, rx) = unbounded_channel();
    for (i, request) in requests.into_iter().enumerate() {
        let sink = ChannelSink {
            prompt: i,
            tx: tx.clone(),
        };
        match model.engine.add_request(request, Box::new(sink)) {
            Ok(id) => guard.ids.push(id),
            Err(e) => {
                guard.status = 400;
                return Err(ApiError::from_request_error(&e, prompt_param));
            }
        }
    }
    state
        .metrics
        .queue_time
        .observe(arrival.elapsed().as_secs_f64());
    Ok(Submitted { rx, guard })
}

// ---------------------------------------------------------------------------------------------
// Events -> choices

#[derive(Clone)]
struct TokenLogprob {
    token: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

#[derive(Default)]
struct ChoiceState {
    text: String,
    tokens: usize,
    finish: Option<FinishReason>,
    logprobs: Vec<TokenLogprob>,
}

/// What one event adds to a choice.
enum Update {
    Token {
        choice: usize,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        choice: usize,
        text: String,
        reason: FinishReason,
    },
    Failed(String),
}

struct Choices {
    n: usize,
    choices: Vec<ChoiceState>,
}

impl Choices {
    fn new(num_prompts: usize, n: usize) -> Self {
        Self {
            n,
            choices: (0..num_prompts * n)
                .map(|_| ChoiceState::default())
                .collect(),
        }
    }

    fn done(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens).sum()
    }

    fn reasons(&self) -> Vec<Option<FinishReason>> {
        self.choices.iter().map(|c| c.finish).collect()
    }

    /// Applies an event to the choices and to the guard's counters.
    fn apply(&mut self, prompt: usize, event: RequestEvent, guard: &mut Guard) -> Update {
        match event {
            RequestEvent::Token {
                index,
                token,
                text,
                logprob,
                top_logprobs,
            } => {
                let choice = prompt * self.n + index;
                guard.first_token.get_or_insert_with(|| {
                    let now = Instant::now();
                    guard
                        .state
                        .metrics
                        .time_to_first_token
                        .observe(now.duration_since(guard.arrival).as_secs_f64());
                    now
                });
                guard.completion_tokens += 1;
                let Some(c) = self.choices.get_mut(choice) else {
                    return Update::Failed(format!("event for unknown choice {choice}"));
                };
                c.tokens += 1;
                guard.max_choice_tokens = guard.max_choice_tokens.max(c.tokens);
                c.text.push_str(&text);
                let logprob = logprob.map(|logprob| TokenLogprob {
                    token,
                    logprob,
                    top: top_logprobs,
                });
                if let Some(lp) = &logprob {
                    c.logprobs.push(lp.clone());
                }
                Update::Token {
                    choice,
                    text,
                    logprob,
                }
            }
            RequestEvent::Finished {
                index,
                reason,
                text,
                ..
            } => {
                let choice = prompt * self.n + index;
                let Some(c) = self.choices.get_mut(choice) else {
                    return Update::Failed(format!("event for unknown choice {choice}"));
                };
                c.text.push_str(&text);
                c.finish = Some(reason);
                Update::Finished {
                    choice,
                    text,
                    reason,
                }
            }
            RequestEvent::Failed(message) => Update::Failed(message),
        }
    }
}

/// `-inf` has no JSON spelling; vLLM reports it as -9999.
fn json_logprob(x: f32) -> f64 {
    if x.is_finite() {
        x as f64
    } else {
        -9999.0
    }
}

fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

fn chat_logprob_entry(tokenizer: &Tokenizer, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let text = token_text(tokenizer, id);
        json!({"token": text, "logprob": json_logprob(logprob), "bytes": text.as_bytes()})
    };
    let mut value = entry(lp.token, lp.logprob);
    value["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
    value
}

/// Completions' logprobs object. `prompt` (echo) adds the prompt's tokens with null logprobs;
/// `offset` is where the first token's text starts.
fn completion_logprobs(
    tokenizer: &Tokenizer,
    prompt: &[u32],
    generated: &[TokenLogprob],
    mut offset: usize,
) -> Value {
    let (mut tokens, mut token_logprobs, mut tops, mut offsets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &id in prompt {
        let text = token_text(tokenizer, id);
        offsets.push(offset);
        offset += text.len();
        tokens.push(Value::String(text));
        token_logprobs.push(Value::Null);
        tops.push(Value::Null);
    }
    for lp in generated {
        let text = token_text(tokenizer, lp.token);
        offsets.push(offset);
        offset += text.len();
        tokens.push(Value::String(text));
        token_logprobs.push(json!(json_logprob(lp.logprob)));
        let top: Map<String, Value> = lp
            .top
            .iter()
            .map(|&(id, l)| (token_text(tokenizer, id), json!(json_logprob(l))))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn response_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let a = hasher.finish();
    hasher.write_u64(a);
    format!("{prefix}-{a:016x}{:016x}", hasher.finish())
}

fn finish_json(reason: Option<FinishReason>) -> Value {
    reason.map_or(Value::Null, |r| Value::String(r.as_str().into()))
}

fn with_log_marker(mut response: Response) -> Response {
    response.extensions_mut().insert(LoggedByHandler);
    response
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
    let arrival = Instant::now();
    let fields = Fields::parse(body, &state)?;
    check_model(&fields, &state)?;
    let model = state.ready_model()?;
    let common = parse_common(&fields, &model, false)?;
    if fields.get("suffix").is_some() {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    let prompts = parse_prompts(&fields, &model)?;
    let submitted = submit(
        &state,
        &model,
        &prompts,
        &common,
        "prompt",
        "/v1/completions",
        arrival,
    )?;
    let meta = Meta {
        id: response_id("cmpl"),
        created: unix_time(),
        model: state.options.served_model_name.clone(),
    };
    if common.stream {
        Ok(stream_completions(model, prompts, common, submitted, meta))
    } else {
        complete_completions(model, prompts, common, submitted, meta).await
    }
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let fields = Fields::parse(body, &state)?;
    check_model(&fields, &state)?;
    let model = state.ready_model()?;
    let common = parse_common(&fields, &model, true)?;
    let messages = parse_messages(&fields)?;
    let template = model.tokenizer.chat_template().ok_or_else(|| {
        ApiError::bad_request("This model has no chat template; use /v1/completions.")
    })?;
    let text = template.render(&messages, true).map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("could not apply the chat template: {e}"),
        )
    })?;
    let tokens = model.tokenizer.encode(&text, false).map_err(|e| {
        ApiError::invalid("messages", format!("could not tokenize the messages: {e}"))
    })?;
    let prompts = vec![Prompt {
        tokens,
        text: Some(text),
    }];
    let submitted = submit(
        &state,
        &model,
        &prompts,
        &common,
        "messages",
        "/v1/chat/completions",
        arrival,
    )?;
    let meta = Meta {
        id: response_id("chatcmpl"),
        created: unix_time(),
        model: state.options.served_model_name.clone(),
    };
    if common.stream {
        Ok(stream_chat(model, common, submitted, meta))
    } else {
        complete_chat(model, common, submitted, meta).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
}

/// Waits for every choice to finish (non-streaming).
async fn collect(submitted: &mut Submitted, choices: &mut Choices) -> Result<(), ApiError> {
    while !choices.done() {
        let Some((prompt, event)) = submitted.rx.recv().await else {
            return Err(ApiError::internal(
                "the engine stopped before the request finished",
            ));
        };
        if let Update::Failed(message) = choices.apply(prompt, event, &mut submitted.guard) {
            submitted.guard.finished = true;
            submitted.guard.status = 500;
            return Err(ApiError::internal(message));
        }
    }
    submitted.guard.finish(&choices.reasons());
    Ok(())
}

async fn complete_chat(
    model: Arc<ServedModel>,
    common: Common,
    mut submitted: Submitted,
    meta: Meta,
) -> Result<Response, ApiError> {
    let mut choices = Choices::new(1, common.n);
    collect(&mut submitted, &mut choices).await?;
    let tokenizer = &model.tokenizer;
    let body = json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices.choices.iter().enumerate().map(|(i, c)| json!({
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": common.params.logprobs.map(|_| json!({
                "content": c.logprobs.iter().map(|lp| chat_logprob_entry(tokenizer, lp)).collect::<Vec<_>>()
            })),
            "finish_reason": finish_json(c.finish),
        })).collect::<Vec<_>>(),
        "usage": usage(submitted.guard.prompt_tokens, choices.completion_tokens()),
    });
    Ok(with_log_marker(Json(body).into_response()))
}

async fn complete_completions(
    model: Arc<ServedModel>,
    prompts: Vec<Prompt>,
    common: Common,
    mut submitted: Submitted,
    meta: Meta,
) -> Result<Response, ApiError> {
    let mut choices = Choices::new(prompts.len(), common.n);
    collect(&mut submitted, &mut choices).await?;
    let tokenizer = &model.tokenizer;
    let out: Vec<Value> = choices
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let prompt = &prompts[i / common.n];
            let echo = if common.echo {
                echo_text(tokenizer, prompt)
            } else {
                String::new()
            };
            let logprobs = common.params.logprobs.map(|_| {
                let echoed: &[u32] = if common.echo { &prompt.tokens } else { &[] };
                completion_logprobs(tokenizer, echoed, &c.logprobs, 0)
            });
            json!({
                "index": i,
                "text": echo + &c.text,
                "logprobs": logprobs,
                "finish_reason": finish_json(c.finish),
            })
        })
        .collect();
    let body = json!({
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": out,
        "usage": usage(submitted.guard.prompt_tokens, choices.completion_tokens()),
    });
    Ok(with_log_marker(Json(body).into_response()))
}

fn echo_text(tokenizer: &Tokenizer, prompt: &Prompt) -> String {
    match &prompt.text {
        Some(text) => text.clone(),
        None => tokenizer.decode(&prompt.tokens, false).unwrap_or_default(),
    }
}

fn sse(value: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(value.to_string()))
}

fn sse_response<S>(stream: S) -> Response
where
    S: futures_util::Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    with_log_marker(Sse::new(stream).into_response())
}

fn stream_chat(
    model: Arc<ServedModel>,
    common: Common,
    submitted: Submitted,
    meta: Meta,
) -> Response {
    let stream = async_stream::stream! {
        let Submitted { mut rx, mut guard } = submitted;
        let mut choices = Choices::new(1, common.n);
        let chunk = |choice: Value| {
            let mut c = json!({
                "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                "model": meta.model, "choices": [choice],
            });
            if common.include_usage {
                c["usage"] = Value::Null;
            }
            c
        };
        for i in 0..common.n {
            yield sse(&chunk(json!({
                "index": i, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null,
            })));
        }
        while !choices.done() {
            let Some((prompt, event)) = rx.recv().await else {
                yield sse(&ApiError::internal("the engine stopped before the request finished").to_json());
                break;
            };
            match choices.apply(prompt, event, &mut guard) {
                Update::Token { choice, text, logprob } => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    let logprobs = logprob.map(|lp| json!({"content": [chat_logprob_entry(&model.tokenizer, &lp)]}));
                    yield sse(&chunk(json!({
                        "index": choice, "delta": {"content": text},
                        "logprobs": logprobs, "finish_reason": null,
                    })));
                }
                Update::Finished { choice, text, reason } => {
                    let delta = if text.is_empty() { json!({}) } else { json!({"content": text}) };
                    yield sse(&chunk(json!({
                        "index": choice, "delta": delta, "logprobs": null,
                        "finish_reason": reason.as_str(),
                    })));
                }
                Update::Failed(message) => {
                    guard.finished = true;
                    guard.status = 500;
                    yield sse(&ApiError::internal(message).to_json());
                    break;
                }
            }
        }
        if choices.done() {
            guard.finish(&choices.reasons());
            if common.include_usage {
                yield sse(&json!({
                    "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                    "model": meta.model, "choices": [],
                    "usage": usage(guard.prompt_tokens, choices.completion_tokens()),
                }));
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    sse_response(stream)
}

fn stream_completions(
    model: Arc<ServedModel>,
    prompts: Vec<Prompt>,
    common: Common,
    submitted: Submitted,
    meta: Meta,
) -> Response {
    let stream = async_stream::stream! {
        let Submitted { mut rx, mut guard } = submitted;
        let tokenizer = model.tokenizer.clone();
        let mut choices = Choices::new(prompts.len(), common.n);
        let chunk = |choice: Value| {
            let mut c = json!({
                "id": meta.id, "object": "text_completion", "created": meta.created,
                "model": meta.model, "choices": [choice],
            });
            if common.include_usage {
                c["usage"] = Value::Null;
            }
            c
        };
        // Text offsets of each choice's next token (for logprobs).
        let mut offsets = vec![0usize; choices.choices.len()];
        if common.echo {
            for i in 0..choices.choices.len() {
                let prompt = &prompts[i / common.n];
                let text = echo_text(&tokenizer, prompt);
                let logprobs = common.params.logprobs.map(|_| completion_logprobs(&tokenizer, &prompt.tokens, &[], 0));
                offsets[i] = prompt.tokens.iter().map(|&t| token_text(&tokenizer, t).len()).sum();
                yield sse(&chunk(json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": null})));
            }
        }
        while !choices.done() {
            let Some((prompt, event)) = rx.recv().await else {
                yield sse(&ApiError::internal("the engine stopped before the request finished").to_json());
                break;
            };
            match choices.apply(prompt, event, &mut guard) {
                Update::Token { choice, text, logprob } => {
                    if text.is_empty() && logprob.is_none() {
                        continue;
                    }
                    let logprobs = logprob.map(|lp| {
                        let v = completion_logprobs(&tokenizer, &[], std::slice::from_ref(&lp), offsets[choice]);
                        offsets[choice] += token_text(&tokenizer, lp.token).len();
                        v
                    });
                    yield sse(&chunk(json!({"index": choice, "text": text, "logprobs": logprobs, "finish_reason": null})));
                }
                Update::Finished { choice, text, reason } => {
                    yield sse(&chunk(json!({"index": choice, "text": text, "logprobs": null, "finish_reason": reason.as_str()})));
                }
                Update::Failed(message) => {
                    guard.finished = true;
                    guard.status = 500;
                    yield sse(&ApiError::internal(message).to_json());
                    break;
                }
            }
        }
        if choices.done() {
            guard.finish(&choices.reasons());
            if common.include_usage {
                yield sse(&json!({
                    "id": meta.id, "object": "text_completion", "created": meta.created,
                    "model": meta.model, "choices": [],
                    "usage": usage(guard.prompt_tokens, choices.completion_tokens()),
                }));
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    sse_response(stream)
}

/// vLLM's `/tokenize`: `{"prompt": ..., "add_special_tokens": true}` or `{"messages": [...],
/// "add_generation_prompt": true}`.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let fields = Fields::parse(body, &state)?;
    check_model(&fields, &state)?;
    let model = state.ready_model()?;
    let tokens = if fields.get("messages").is_some() {
        let messages = parse_messages(&fields)?;
        let template = model
            .tokenizer
            .chat_template()
            .ok_or_else(|| ApiError::bad_request("This model has no chat template."))?;
        let add_generation_prompt = fields.bool("add_generation_prompt")?.unwrap_or(true);
        let text = template
            .render(&messages, add_generation_prompt)
            .map_err(|e| {
                ApiError::invalid(
                    "messages",
                    format!("could not apply the chat template: {e}"),
                )
            })?;
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
    let fields = Fields::parse(body, &state)?;
    check_model(&fields, &state)?;
    let model = state.ready_model()?;
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
