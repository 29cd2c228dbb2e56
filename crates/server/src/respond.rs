//! From a parsed request to its response: submitting to the engine, turning the engine's
//! events into choices, and answering as one JSON body or as a stream of server-sent events.
//!
//! Chat and text completions differ only in the JSON around each choice ([`Kind`]); admission,
//! metrics, cancellation, usage and the event loop are one code path for both.

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use minserve_core::{
    EventSink, FinishReason, Request, RequestError, RequestEvent, RequestId, ValidatedRequest,
};
use minserve_tokenizer::Tokenizer;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::api::{Common, Prompt, MAX_SEQUENCES_PER_REQUEST};
use crate::error::ApiError;
use crate::{unix_time, AppState, LoggedByHandler, ServedModel};

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
    scheduled: bool,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    completion_tokens: usize,
    max_choice_tokens: usize,
    finished: bool,
    status: u16,
}

impl Guard {
    /// The first of the request's prompts left the engine's queue (the others of a multi-prompt
    /// completion count with it, as its time to first token does).
    fn scheduled(&mut self, at: Instant) {
        if !self.scheduled {
            self.scheduled = true;
            self.state
                .metrics
                .queue_time
                .observe(at.saturating_duration_since(self.arrival).as_secs_f64());
        }
    }

    fn first_token(&mut self) {
        if self.first_token.is_none() {
            let now = Instant::now();
            self.state
                .metrics
                .time_to_first_token
                .observe(now.duration_since(self.arrival).as_secs_f64());
            self.first_token = Some(now);
        }
    }

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

    /// The engine failed the request: nothing left to abort, and the log says 500.
    fn failed(&mut self) {
        self.finished = true;
        self.status = 500;
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

pub(crate) struct Submitted {
    rx: UnboundedReceiver<(usize, RequestEvent)>,
    guard: Guard,
}

/// Checks every prompt against the engine's limits, applies back-pressure (429), and hands
/// the prompts to the engine. `prompt_param` names the field the prompts came from.
pub(crate) fn submit(
    state: &Arc<AppState>,
    model: &Arc<ServedModel>,
    prompts: &[Prompt],
    common: &Common,
    prompt_param: &str,
    path: &'static str,
    arrival: Instant,
) -> Result<Submitted, ApiError> {
    let num_prompt_seqs = prompts.len() * common.request.n;
    if num_prompt_seqs > MAX_SEQUENCES_PER_REQUEST {
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompts times n = {} asks for {num_prompt_seqs} sequences; at most \
                 {MAX_SEQUENCES_PER_REQUEST} per request",
                prompts.len(),
                common.request.n
            ),
        ));
    }
    let new_guard = |num_seqs| Guard {
        state: state.clone(),
        model: model.clone(),
        ids: Vec::new(),
        num_seqs,
        path,
        arrival,
        scheduled: false,
        first_token: None,
        prompt_tokens: prompts.iter().map(|p| p.tokens.len()).sum(),
        completion_tokens: 0,
        max_choice_tokens: 0,
        finished: false,
        status: 200,
    };
    let (tx, rx) = unbounded_channel();
    if common.max_tokens == Some(0) {
        check_prompts_alone(model, prompts, prompt_param)?;
        // Nothing to generate: every choice ends at once, and the engine never sees it.
        for prompt in 0..prompts.len() {
            for index in 0..common.request.n {
                let finished = RequestEvent::Finished {
                    index,
                    reason: FinishReason::Length,
                    text: String::new(),
                    completion_tokens: 0,
                };
                let _ = tx.send((prompt, finished));
            }
        }
        return Ok(Submitted {
            rx,
            guard: new_guard(0),
        });
    }

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
                max_tokens,
                ..common.request.clone()
            }
        })
        .collect();
    let requests = requests
        .into_iter()
        .map(|r| {
            model.engine.validate(r).map_err(|e| {
                let mut err = ApiError::from_request_error(&e, prompt_param);
                if common.max_tokens.is_some() && matches!(e, RequestError::NeverFits { .. }) {
                    err.param = Some(common.max_tokens_param.to_string());
                }
                err
            })
        })
        .collect::<Result<Vec<ValidatedRequest>, ApiError>>()?;

    // Back-pressure: sequences beyond the running batch's capacity wait; too many -> 429.
    let num_seqs = num_prompt_seqs;
    let before = state.inflight_seqs.fetch_add(num_seqs, Ordering::SeqCst);
    // From here the guard gives the queue slots back, whatever happens.
    let mut guard = new_guard(num_seqs);
    let waiting = model
        .engine
        .stats()
        .num_waiting
        .max((before + num_seqs).saturating_sub(model.max_num_seqs));
    if waiting > state.options.max_queue {
        guard.finished = true; // nothing to abort
        guard.status = 429;
        state.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::queue_full(waiting, state.options.max_queue));
    }
    for (i, request) in requests.into_iter().enumerate() {
        let sink = ChannelSink {
            prompt: i,
            tx: tx.clone(),
        };
        guard
            .ids
            .push(model.engine.add_request(request, Box::new(sink)));
    }
    Ok(Submitted { rx, guard })
}

/// The limits that still apply when nothing is generated: the prompts must exist and fit the
/// context (the KV cache is never used, so its size does not matter).
fn check_prompts_alone(
    model: &ServedModel,
    prompts: &[Prompt],
    prompt_param: &str,
) -> Result<(), ApiError> {
    for p in prompts {
        let error = if p.tokens.is_empty() {
            RequestError::EmptyPrompt
        } else if p.tokens.len() > model.max_model_len {
            RequestError::TooLong {
                max_model_len: model.max_model_len,
                prompt_tokens: p.tokens.len(),
                max_tokens: 0,
            }
        } else {
            continue;
        };
        return Err(ApiError::from_request_error(&error, prompt_param));
    }
    Ok(())
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

/// What one event adds to the response.
enum Update {
    /// Nothing a client sees (scheduling, or a token whose text is still held back).
    Nothing,
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
            RequestEvent::Scheduled { at } => {
                guard.scheduled(at);
                Update::Nothing
            }
            RequestEvent::Token {
                index,
                token,
                text,
                logprob,
                top_logprobs,
            } => {
                let choice = prompt * self.n + index;
                guard.first_token();
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
                if text.is_empty() && logprob.is_none() {
                    return Update::Nothing;
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

// ---------------------------------------------------------------------------------------------
// Choices -> JSON

/// What the response is for, and what only it needs.
pub(crate) enum Kind {
    Chat,
    /// Text completions; `prompts` are echoed back when `common.echo` is set.
    Text {
        prompts: Vec<Prompt>,
    },
}

/// Everything that shapes a response, shared by the streaming and the single-body paths.
pub(crate) struct Responder {
    pub model: Arc<ServedModel>,
    pub common: Common,
    pub kind: Kind,
    id: String,
    created: u64,
    served_name: String,
}

impl Responder {
    pub fn new(state: &AppState, model: Arc<ServedModel>, common: Common, kind: Kind) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text { .. } => "cmpl",
        };
        Self {
            model,
            common,
            kind,
            id: response_id(prefix),
            created: unix_time(),
            served_name: state.options.served_model_name.clone(),
        }
    }

    fn num_prompts(&self) -> usize {
        match &self.kind {
            Kind::Chat => 1,
            Kind::Text { prompts } => prompts.len(),
        }
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.model.tokenizer
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (&self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text { .. }, _) => "text_completion",
        }
    }

    /// The response (or one chunk of it) around `choices`.
    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id, "object": self.object(chunk), "created": self.created,
            "model": self.served_name, "choices": choices,
        })
    }

    fn chunk(&self, choice: Value) -> Value {
        let mut c = self.envelope(true, vec![choice]);
        if self.common.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The prompt text that starts choice `choice` of a completion with `echo`.
    fn echo(&self, choice: usize) -> Option<String> {
        match &self.kind {
            Kind::Text { prompts } if self.common.echo => {
                let prompt = &prompts[choice / self.common.request.n];
                Some(match &prompt.text {
                    Some(text) => text.clone(),
                    None => self
                        .tokenizer()
                        .decode(&prompt.tokens, false)
                        .unwrap_or_default(),
                })
            }
            _ => None,
        }
    }

    /// The chunk each streamed choice starts with, if any: the assistant role, or the echo.
    fn opening(&self, choice: usize) -> Option<Value> {
        match &self.kind {
            Kind::Chat => Some(json!({
                "index": choice, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null,
            })),
            Kind::Text { .. } => self.echo(choice).map(|text| {
                json!({"index": choice, "text": text, "logprobs": null, "finish_reason": null})
            }),
        }
    }

    /// A streamed token. `offset` is where its text starts in the choice (for completions'
    /// `text_offset`), and moves past it.
    fn token(
        &self,
        choice: usize,
        text: String,
        logprob: Option<&TokenLogprob>,
        offset: &mut usize,
    ) -> Value {
        match &self.kind {
            Kind::Chat => {
                let logprobs = logprob
                    .map(|lp| json!({"content": [chat_logprob_entry(self.tokenizer(), lp)]}));
                json!({
                    "index": choice, "delta": {"content": text},
                    "logprobs": logprobs, "finish_reason": null,
                })
            }
            Kind::Text { .. } => {
                let logprobs = logprob.map(|lp| {
                    let v =
                        completion_logprobs(self.tokenizer(), std::slice::from_ref(lp), *offset);
                    *offset += token_text(self.tokenizer(), lp.token).len();
                    v
                });
                json!({"index": choice, "text": text, "logprobs": logprobs, "finish_reason": null})
            }
        }
    }

    /// The streamed end of a choice, with any text held back until then.
    fn finished(&self, choice: usize, text: String, reason: FinishReason) -> Value {
        match &self.kind {
            Kind::Chat => {
                let delta = if text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({
                    "index": choice, "delta": delta, "logprobs": null,
                    "finish_reason": reason.as_str(),
                })
            }
            Kind::Text { .. } => json!({
                "index": choice, "text": text, "logprobs": null,
                "finish_reason": reason.as_str(),
            }),
        }
    }

    /// A whole choice of a non-streaming response.
    fn whole(&self, choice: usize, c: &ChoiceState) -> Value {
        let wants_logprobs = self.common.request.params.logprobs.is_some();
        match &self.kind {
            Kind::Chat => json!({
                "index": choice,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": wants_logprobs.then(|| json!({
                    "content": c.logprobs.iter()
                        .map(|lp| chat_logprob_entry(self.tokenizer(), lp))
                        .collect::<Vec<_>>()
                })),
                "finish_reason": finish_json(c.finish),
            }),
            Kind::Text { .. } => json!({
                "index": choice,
                "text": self.echo(choice).unwrap_or_default() + &c.text,
                "logprobs": wants_logprobs
                    .then(|| completion_logprobs(self.tokenizer(), &c.logprobs, 0)),
                "finish_reason": finish_json(c.finish),
            }),
        }
    }
}

/// Answers `submitted` as `responder` says: a stream of server-sent events or one JSON body.
pub(crate) async fn respond(
    responder: Responder,
    submitted: Submitted,
) -> Result<Response, ApiError> {
    if responder.common.stream {
        Ok(stream(responder, submitted))
    } else {
        whole(responder, submitted).await
    }
}

fn engine_gone() -> ApiError {
    ApiError::internal("the engine stopped before the request finished")
}

async fn whole(r: Responder, mut submitted: Submitted) -> Result<Response, ApiError> {
    let mut choices = Choices::new(r.num_prompts(), r.common.request.n);
    let guard = &mut submitted.guard;
    while !choices.done() {
        let Some((prompt, event)) = submitted.rx.recv().await else {
            return Err(engine_gone());
        };
        if let Update::Failed(message) = choices.apply(prompt, event, guard) {
            guard.failed();
            return Err(ApiError::internal(message));
        }
    }
    guard.finish(&choices.reasons());
    let mut body = r.envelope(
        false,
        (choices.choices.iter().enumerate())
            .map(|(i, c)| r.whole(i, c))
            .collect(),
    );
    body["usage"] = usage(guard.prompt_tokens, choices.completion_tokens());
    Ok(with_log_marker(Json(body).into_response()))
}

fn sse(value: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(value.to_string()))
}

fn stream(r: Responder, submitted: Submitted) -> Response {
    let stream = async_stream::stream! {
        let Submitted { mut rx, mut guard } = submitted;
        let mut choices = Choices::new(r.num_prompts(), r.common.request.n);
        for i in 0..choices.choices.len() {
            if let Some(opening) = r.opening(i) {
                yield sse(&r.chunk(opening));
            }
        }
        let mut offsets = vec![0usize; choices.choices.len()];
        while !choices.done() {
            let Some((prompt, event)) = rx.recv().await else {
                yield sse(&engine_gone().to_json());
                break;
            };
            let choice = match choices.apply(prompt, event, &mut guard) {
                Update::Nothing => continue,
                Update::Token { choice, text, logprob } => {
                    r.token(choice, text, logprob.as_ref(), &mut offsets[choice])
                }
                Update::Finished { choice, text, reason } => r.finished(choice, text, reason),
                Update::Failed(message) => {
                    guard.failed();
                    yield sse(&ApiError::internal(message).to_json());
                    break;
                }
            };
            yield sse(&r.chunk(choice));
        }
        if choices.done() {
            guard.finish(&choices.reasons());
            if r.common.include_usage {
                let mut last = r.envelope(true, Vec::new());
                last["usage"] = usage(guard.prompt_tokens, choices.completion_tokens());
                yield sse(&last);
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    with_log_marker(Sse::new(stream).into_response())
}

// ---------------------------------------------------------------------------------------------
// JSON pieces

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

/// Completions' logprobs object for `generated`; `offset` is where the first token's text
/// starts in the choice's text.
fn completion_logprobs(
    tokenizer: &Tokenizer,
    generated: &[TokenLogprob],
    mut offset: usize,
) -> Value {
    let (mut tokens, mut token_logprobs, mut tops, mut offsets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
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
