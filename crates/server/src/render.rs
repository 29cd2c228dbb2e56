//! The JSON of a generation response: OpenAI's `chat.completion` / `text_completion` objects,
//! the chunks of a streamed one, logprobs and usage. (The Responses API has its own objects:
//! `responses/`.)
//!
//! Chat and text completions differ only here, in the JSON around each choice; everything
//! before (parameters, submission, choices) is one code path for both. Nothing here does I/O.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use minserve_core::request::{FinishReason, StopReason};
use minserve_tokenizer::Tokenizer;
use serde_json::{json, Map, Value};

use crate::choices::{Choice, Choices, TokenLogprob};
use crate::generation_api::GenerationApi;
use crate::params::{GenerationParams, ReasoningOutput};
use crate::prompt::Prompt;
use crate::reasoning::{self, ReasoningPiece, ReasoningSplitter};
use crate::state::unix_time;
use crate::tool_format::{gather, CallScanner, OutputPiece, Tool};

/// Renders the objects of one response; shared by the streaming and the single-body paths.
pub(crate) struct ResponseRenderer {
    api: GenerationApi,
    tokenizer: Arc<Tokenizer>,
    id: String,
    created: u64,
    served_model_name: String,
    samples_per_prompt: usize,
    include_usage: bool,
    wants_logprobs: bool,
    /// With completions' `echo`: the text each prompt's choices start with.
    echoes: Option<Vec<String>>,
    /// Chat with tools: the functions whose calls are read out of the output.
    tools: Option<Vec<Tool>>,
    /// Chat with a reasoning parser: the thinking split from the answer.
    reasoning: Option<ReasoningOutput>,
    /// Chat with a `prediction`: its length in tokens, for `usage.completion_tokens_details`.
    prediction_tokens: Option<usize>,
}

impl ResponseRenderer {
    pub fn new(
        served_model_name: String,
        tokenizer: Arc<Tokenizer>,
        params: &GenerationParams,
        prompts: &[Prompt],
        samples_per_prompt: usize,
    ) -> Self {
        let api = params.api;
        let prefix = match api {
            GenerationApi::Chat | GenerationApi::Responses => "chatcmpl",
            GenerationApi::Completion => "cmpl",
        };
        let echoes = params.echo.then(|| {
            prompts
                .iter()
                .map(|prompt| match &prompt.text {
                    Some(text) => text.clone(),
                    None => tokenizer.decode(&prompt.tokens, false).unwrap_or_default(),
                })
                .collect()
        });
        Self {
            api,
            id: response_id(prefix),
            created: unix_time(),
            served_model_name,
            samples_per_prompt,
            include_usage: params.delivery.include_usage,
            wants_logprobs: params.sampling.logprobs.is_some(),
            echoes,
            tokenizer,
            tools: params.tool_calls.clone(),
            reasoning: params.reasoning,
            prediction_tokens: (!params.prediction.is_empty()).then_some(params.prediction.len()),
        }
    }

    /// A reader of one choice's tool calls, when the request has tools to call.
    fn call_scanner(&self) -> Option<CallScanner> {
        self.tools.as_deref().map(CallScanner::new)
    }

    /// A reader of one streamed chat choice, when its output is more than content: thinking
    /// to split off, or tool calls to read out.
    pub fn choice_reader(&self) -> Option<ChoiceReader> {
        if self.reasoning.is_none() && self.tools.is_none() {
            return None;
        }
        Some(ChoiceReader {
            reasoning: self
                .reasoning
                .map(|r| (ReasoningSplitter::new(r.format), r.include)),
            scanner: self.call_scanner(),
            calls: 0,
        })
    }

    /// The streamed deltas of what `scanner` settled: content, or a call (its id and name
    /// first, then its arguments, as OpenAI streams them); `calls` counts the choice's calls.
    fn piece_deltas(
        &self,
        choice: usize,
        pieces: Vec<OutputPiece>,
        calls: &mut usize,
    ) -> Vec<Value> {
        let delta = |d: Value| chat_delta(choice, d);
        pieces
            .into_iter()
            .filter_map(|piece| match piece {
                OutputPiece::Content(text) => Some(delta(json!({"content": text}))),
                OutputPiece::CallStart(name) => {
                    *calls += 1;
                    Some(delta(json!({"tool_calls": [{
                        "index": *calls - 1, "id": tool_call_id(), "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }]})))
                }
                OutputPiece::CallArguments(text) => Some(delta(json!({"tool_calls": [{
                    "index": calls.saturating_sub(1), "function": {"arguments": text},
                }]}))),
                OutputPiece::CallEnd => None,
            })
            .collect()
    }

    pub fn wants_logprobs(&self) -> bool {
        self.wants_logprobs
    }

    pub fn include_usage(&self) -> bool {
        self.include_usage
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (GenerationApi::Chat | GenerationApi::Responses, false) => "chat.completion",
            (GenerationApi::Chat | GenerationApi::Responses, true) => "chat.completion.chunk",
            (GenerationApi::Completion, _) => "text_completion",
        }
    }

    /// The response object (or one chunk of it) around `choices`.
    fn response_object(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id, "object": self.object(chunk), "created": self.created,
            "model": self.served_model_name, "choices": choices,
        })
    }

    /// The whole response of a non-streaming request, once every choice finished.
    pub fn single_body(&self, choices: &Choices, prompt_tokens: usize) -> Value {
        let rendered = choices
            .iter()
            .enumerate()
            .map(|(i, c)| self.finished_choice(i, c))
            .collect();
        let mut body = self.response_object(false, rendered);
        body["usage"] = self.usage(prompt_tokens, choices);
        body
    }

    /// A stream chunk carrying one choice's delta.
    pub fn chunk(&self, delta: Value) -> Value {
        let mut c = self.response_object(true, vec![delta]);
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The last chunk of a stream with `include_usage`: no choices, the token counts.
    pub fn usage_chunk(&self, prompt_tokens: usize, choices: &Choices) -> Value {
        let mut last = self.response_object(true, Vec::new());
        last["usage"] = self.usage(prompt_tokens, choices);
        last
    }

    /// The token counts; with a prediction, how much of it the output used (OpenAI's
    /// `completion_tokens_details`).
    fn usage(&self, prompt_tokens: usize, choices: &Choices) -> Value {
        let completion_tokens = choices.completion_tokens();
        let mut usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": choices.cached_tokens()},
        });
        if let Some(predicted) = self.prediction_tokens {
            let (accepted, rejected) = choices.prediction_tokens(predicted);
            usage["completion_tokens_details"] = json!({
                "accepted_prediction_tokens": accepted,
                "rejected_prediction_tokens": rejected,
            });
        }
        usage
    }

    /// The prompt text that starts choice `choice` of a completion with `echo`.
    fn echo(&self, choice: usize) -> Option<&str> {
        let echoes = self.echoes.as_ref()?;
        Some(&echoes[choice / self.samples_per_prompt])
    }

    /// The delta each streamed choice starts with, if any: the assistant role, or the echo.
    pub fn opening_delta(&self, choice: usize) -> Option<Value> {
        match self.api {
            GenerationApi::Chat | GenerationApi::Responses => Some(json!({
                "index": choice, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null,
            })),
            GenerationApi::Completion => self.echo(choice).map(|text| {
                json!({"index": choice, "text": text, "logprobs": null, "finish_reason": null})
            }),
        }
    }

    /// A streamed token. `text_offset` is where its text starts in the choice (for
    /// completions' logprobs), and moves past it.
    pub fn token_delta(
        &self,
        choice: usize,
        text: String,
        logprob: Option<&TokenLogprob>,
        text_offset: &mut usize,
    ) -> Value {
        let tokenizer = &self.tokenizer;
        match self.api {
            GenerationApi::Chat | GenerationApi::Responses => {
                let logprobs =
                    logprob.map(|lp| json!({"content": [chat_logprob_entry(tokenizer, lp)]}));
                json!({
                    "index": choice, "delta": {"content": text},
                    "logprobs": logprobs, "finish_reason": null,
                })
            }
            GenerationApi::Completion => {
                let logprobs = logprob.map(|lp| {
                    let v = completion_logprobs(tokenizer, std::slice::from_ref(lp), *text_offset);
                    *text_offset += token_text(tokenizer, lp.token).len();
                    v
                });
                json!({"index": choice, "text": text, "logprobs": logprobs, "finish_reason": null})
            }
        }
    }

    /// The streamed end of a choice, with any text held back until then.
    pub fn finish_delta(&self, choice: usize, text: String, end: Finish) -> Value {
        let stop_reason = stop_reason_json(end.stop_reason);
        match self.api {
            GenerationApi::Completion => json!({
                "index": choice, "text": text, "logprobs": null,
                "finish_reason": end.reason.as_str(), "stop_reason": stop_reason,
            }),
            _ => {
                let delta = if text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({
                    "index": choice, "delta": delta, "logprobs": null,
                    "finish_reason": chat_finish_reason(end.reason, end.called),
                    "stop_reason": stop_reason,
                })
            }
        }
    }

    /// A finished choice of a non-streaming response.
    fn finished_choice(&self, choice: usize, c: &Choice) -> Value {
        let tokenizer = &self.tokenizer;
        match self.api {
            GenerationApi::Chat | GenerationApi::Responses => {
                let (message, called) = self.chat_message(&c.text);
                json!({
                    "index": choice,
                    "message": message,
                    "logprobs": self.wants_logprobs.then(|| json!({
                        "content": c.logprobs.iter()
                            .map(|lp| chat_logprob_entry(tokenizer, lp))
                            .collect::<Vec<_>>()
                    })),
                    "finish_reason": c.finish.map(|r| chat_finish_reason(r, called)),
                    "stop_reason": stop_reason_json(c.stop_reason.as_ref()),
                })
            }
            GenerationApi::Completion => json!({
                "index": choice,
                "text": self.echo(choice).unwrap_or_default().to_string() + &c.text,
                "logprobs": self.wants_logprobs
                    .then(|| completion_logprobs(tokenizer, &c.logprobs, 0)),
                "finish_reason": finish_reason_json(c.finish),
                "stop_reason": stop_reason_json(c.stop_reason.as_ref()),
            }),
        }
    }
}

/// One streamed chat choice's output as it comes: the thinking split off (with a reasoning
/// parser), then the answer read for tool calls (with tools).
pub(crate) struct ChoiceReader {
    /// The splitter, and whether the thinking is returned.
    reasoning: Option<(ReasoningSplitter, bool)>,
    scanner: Option<CallScanner>,
    /// Tool calls made so far.
    pub calls: usize,
}

impl ChoiceReader {
    /// The deltas of the next piece of output; `last`: the choice ends with it, so whatever
    /// was held back is settled too.
    pub fn read(
        &mut self,
        renderer: &ResponseRenderer,
        choice: usize,
        text: &str,
        last: bool,
    ) -> Vec<Value> {
        let pieces = match &mut self.reasoning {
            Some((splitter, _)) => {
                let mut pieces = splitter.push(text);
                if last {
                    pieces.extend(splitter.finish());
                }
                pieces
            }
            None => vec![ReasoningPiece::Content(text.to_string())],
        };
        let include_reasoning = self.reasoning.as_ref().is_some_and(|r| r.1);
        let mut deltas = Vec::new();
        for piece in pieces {
            match piece {
                ReasoningPiece::Reasoning(thought) if include_reasoning => {
                    deltas.push(chat_delta(choice, json!({"reasoning_content": thought})))
                }
                ReasoningPiece::Reasoning(_) => {}
                ReasoningPiece::Content(answer) => match &mut self.scanner {
                    Some(scanner) => {
                        let settled = scanner.push(&answer);
                        deltas.extend(renderer.piece_deltas(choice, settled, &mut self.calls));
                    }
                    None => deltas.push(chat_delta(choice, json!({"content": answer}))),
                },
            }
        }
        if let (true, Some(scanner)) = (last, &mut self.scanner) {
            let settled = scanner.finish();
            deltas.extend(renderer.piece_deltas(choice, settled, &mut self.calls));
        }
        deltas
    }
}

fn chat_delta(choice: usize, delta: Value) -> Value {
    json!({"index": choice, "delta": delta, "logprobs": null, "finish_reason": null})
}

impl ResponseRenderer {
    /// A finished chat choice's message: its thinking split off when a reasoning parser runs,
    /// its tool calls read out of the answer when the request has tools; and whether it has
    /// calls.
    fn chat_message(&self, text: &str) -> (Value, bool) {
        let Some(r) = &self.reasoning else {
            return self.answer_message(text);
        };
        let (thought, answer) = reasoning::split(r.format, text);
        let (mut message, called) = self.answer_message(&answer);
        if r.include {
            message["reasoning_content"] = json!(thought);
        }
        (message, called)
    }

    /// The message of an answer: its tool calls read out when the request has tools.
    fn answer_message(&self, text: &str) -> (Value, bool) {
        let Some(mut scanner) = self.call_scanner() else {
            return (json!({"role": "assistant", "content": text}), false);
        };
        let mut pieces = scanner.push(text);
        pieces.extend(scanner.finish());
        let (content, calls) = gather(pieces);
        if calls.is_empty() {
            return (json!({"role": "assistant", "content": content}), false);
        }
        let tool_calls: Vec<Value> = calls
            .into_iter()
            .map(|call| {
                json!({"id": tool_call_id(), "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}})
            })
            .collect();
        let content = (!content.is_empty()).then_some(content);
        let message = json!({"role": "assistant", "content": content, "tool_calls": tool_calls});
        (message, true)
    }
}

/// How a streamed choice ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Finish<'a> {
    pub reason: FinishReason,
    pub stop_reason: Option<&'a StopReason>,
    /// It made tool calls (chat's finish reason is then `tool_calls`).
    pub called: bool,
}

/// vLLM's `stop_reason`: the matched stop string, the stop token id, or null (EOS, a complete
/// grammar, the length limit).
fn stop_reason_json(reason: Option<&StopReason>) -> Value {
    match reason {
        None => Value::Null,
        Some(StopReason::String(s)) => json!(s),
        Some(StopReason::Token(id)) => json!(id),
    }
}

/// A chat choice's finish reason: `tool_calls` when it ended by calling tools.
fn chat_finish_reason(reason: FinishReason, called: bool) -> &'static str {
    match reason {
        FinishReason::Stop if called => "tool_calls",
        other => other.as_str(),
    }
}

/// A fresh id for a tool call, `call_` and 24 hex digits.
pub(crate) fn tool_call_id() -> String {
    format!("call_{}", &response_id("x")[2..26])
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

/// Chat's logprobs entry for one token: its text, logprob and bytes, and its alternatives.
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

/// A fresh, unguessable response id: `prefix-` and 32 hex digits.
pub(crate) fn response_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let a = hasher.finish();
    hasher.write_u64(a);
    format!("{prefix}-{a:016x}{:016x}", hasher.finish())
}

fn finish_reason_json(reason: Option<FinishReason>) -> Value {
    reason.map_or(Value::Null, |r| Value::String(r.as_str().into()))
}
