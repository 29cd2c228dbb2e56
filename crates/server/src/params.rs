//! The OpenAI parameters of a chat or text completion, everything but the prompt: read from
//! the JSON body, checked for shape, type and the API's own ranges, and turned into complete
//! engine [`Request`]s once the prompts are known.
//!
//! Each concern has its own parser (length, sampling, stop conditions, streaming); each error
//! names the parameter the client sent. What depends on the engine (the prompt against the
//! context and the KV cache, the sampling ranges the engine accepts) is not checked here: the
//! engine handle validates each request once (see `submit.rs`).

use std::sync::Arc;

use minserve_core::constraint::ConstraintFactory;
use minserve_core::request::Request;
use minserve_core::sampling::SamplingParams;
use serde_json::Value;

use crate::error::{ApiError, RequestFieldNames};
use crate::fields::refuse_unsupported;
use crate::generation_api::GenerationApi;
use crate::json_body::{token_ids, wrong_type, JsonBody};
use crate::limits::{
    at_most, MAX_LOGIT_BIAS_ENTRIES, MAX_SEQUENCES_PER_REQUEST, MAX_STOP_STRINGS,
    MAX_STOP_STRING_BYTES, MAX_STOP_TOKEN_IDS,
};
use crate::prompt::Prompt;
use crate::reasoning::ReasoningFormat;
use crate::tool_format::Tool;

/// How many tokens to generate, as the client asked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxTokens {
    /// `None` runs to the end of the context. `Some(0)` (completions with `echo` only) generates
    /// nothing and answers the prompt alone.
    pub asked: Option<usize>,
    /// The field it came from: `max_tokens`, or chat's `max_completion_tokens`.
    pub param: &'static str,
}

/// What ends a sequence besides its length.
#[derive(Debug, Clone)]
pub(crate) struct StopConditions {
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// EOS and stop ids are suppressed until this many tokens are generated.
    pub min_tokens: usize,
    pub ignore_eos: bool,
}

/// How the response is delivered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamOptions {
    /// Server-sent events instead of one JSON body.
    pub stream: bool,
    /// A last chunk with the token counts (`stream_options.include_usage`).
    pub include_usage: bool,
}

/// The parameters of one chat or text completion request, but for its prompts.
pub(crate) struct GenerationParams {
    pub api: GenerationApi,
    pub max_tokens: MaxTokens,
    /// `n` as sent; [`GenerationParams::samples_per_prompt`] checks it once the number of
    /// prompts is known.
    n: i64,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    pub priority: i32,
    pub delivery: StreamOptions,
    /// Completions: start each choice with its prompt.
    pub echo: bool,
    /// The grammar the output follows (`structured.rs`), set once it is compiled.
    pub constraint: Option<Arc<dyn ConstraintFactory>>,
    /// Chat with tools: the functions whose calls are read out of the output.
    pub tool_calls: Option<Vec<Tool>>,
    /// Chat with a reasoning parser: the thinking is split from the answer.
    pub reasoning: Option<ReasoningOutput>,
    /// Chat's `prediction` (predicted outputs), tokenized; set by the chat route.
    pub prediction: Vec<u32>,
}

/// How a chat response returns a reasoning model's thinking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReasoningOutput {
    pub format: ReasoningFormat,
    /// vLLM's `include_reasoning`: false drops the thinking, leaving only the answer.
    pub include: bool,
}

impl GenerationParams {
    /// Reads every generation parameter of `body`; `vocab_size` bounds the token ids in
    /// `logit_bias` and `stop_token_ids`.
    pub fn parse(body: &JsonBody, api: GenerationApi, vocab_size: usize) -> Result<Self, ApiError> {
        refuse_unsupported(body, api)?;
        let echo = api == GenerationApi::Completion && body.bool("echo")?.unwrap_or(false);
        let max_tokens = max_tokens(body, api, echo)?;
        let n = body.int("n")?.unwrap_or(1);
        let sampling = sampling(body, api, echo, vocab_size)?;
        let stop = stop_conditions(body, max_tokens, vocab_size)?;
        let priority = priority(body)?;
        body.str("user")?; // no effect (see fields.rs), but OpenAI wants a string
        let delivery = stream_options(body, api)?;
        Ok(Self {
            api,
            max_tokens,
            n,
            sampling,
            stop,
            priority,
            delivery,
            echo,
            constraint: None,
            tool_calls: None,
            reasoning: None,
            prediction: Vec::new(),
        })
    }

    /// The `n` samples of each prompt, checked against [`MAX_SEQUENCES_PER_REQUEST`] with the
    /// number of prompts: the one place the request's sequence count is limited.
    pub fn samples_per_prompt(&self, num_prompts: usize) -> Result<usize, ApiError> {
        let n = self.n;
        if n < 1 || n as usize > MAX_SEQUENCES_PER_REQUEST {
            return Err(ApiError::invalid(
                "n",
                format!("`n` must be between 1 and {MAX_SEQUENCES_PER_REQUEST}, got {n}"),
            ));
        }
        let sequences = num_prompts * n as usize;
        if sequences > MAX_SEQUENCES_PER_REQUEST {
            return Err(ApiError::invalid(
                "n",
                format!(
                    "{num_prompts} prompts times n = {n} asks for {sequences} sequences; at most \
                     {MAX_SEQUENCES_PER_REQUEST} per request"
                ),
            ));
        }
        Ok(n as usize)
    }

    /// The complete engine request for `prompt` with `n` samples. Without `max_tokens` it
    /// generates up to the end of what the engine can hold, `max_total_tokens` (as vLLM does).
    pub fn engine_request(&self, prompt: &Prompt, n: usize, max_total_tokens: usize) -> Request {
        let max_tokens = self
            .max_tokens
            .asked
            .unwrap_or_else(|| max_total_tokens.saturating_sub(prompt.tokens.len()).max(1));
        Request {
            prompt: prompt.tokens.clone(),
            params: self.sampling.clone(),
            max_tokens,
            min_tokens: self.stop.min_tokens,
            stop: self.stop.stop.clone(),
            stop_token_ids: self.stop.stop_token_ids.clone(),
            ignore_eos: self.stop.ignore_eos,
            n,
            priority: self.priority,
            constraint: self.constraint.clone(),
            // The caller's, set by `submit.rs`.
            tenant: None,
            session: None,
            prediction: self.prediction.clone(),
        }
    }

    /// What this request calls the fields an engine rejection can be about.
    pub fn field_names(&self) -> RequestFieldNames {
        RequestFieldNames {
            prompt: self.api.prompt_param(),
            max_tokens: self.max_tokens.param,
            logprobs: self.api.logprobs_param(),
        }
    }

    /// Nothing to generate: the prompt alone is the answer (completions' `echo` with
    /// `max_tokens` 0, as in OpenAI's legacy API and vLLM).
    pub fn echoes_prompt_only(&self) -> bool {
        self.max_tokens.asked == Some(0)
    }
}

/// `max_tokens` (chat: `max_completion_tokens` first; the Responses API:
/// `max_output_tokens`): at least 1, or 0 with `echo`.
fn max_tokens(body: &JsonBody, api: GenerationApi, echo: bool) -> Result<MaxTokens, ApiError> {
    let (asked, param) = match api {
        GenerationApi::Chat => match body.int("max_completion_tokens")? {
            Some(x) => (Some(x), "max_completion_tokens"),
            None => (body.int("max_tokens")?, "max_tokens"),
        },
        GenerationApi::Completion => (body.int("max_tokens")?, "max_tokens"),
        GenerationApi::Responses => (body.int("max_output_tokens")?, "max_output_tokens"),
    };
    match asked {
        Some(0) if echo => {}
        Some(x) if x < 1 => {
            let hint = if api == GenerationApi::Completion {
                " (0 is allowed with `echo`, to get the prompt back alone)"
            } else {
                ""
            };
            return Err(ApiError::invalid(
                param,
                format!("`{param}` must be at least 1, got {x}{hint}"),
            ));
        }
        _ => {}
    }
    Ok(MaxTokens {
        asked: asked.map(|x| x as usize),
        param,
    })
}

/// How tokens are drawn: temperature and the truncations, penalties, bias, seed, logprobs.
/// Their ranges are the engine's to check (see the module doc).
fn sampling(
    body: &JsonBody,
    api: GenerationApi,
    echo: bool,
    vocab_size: usize,
) -> Result<SamplingParams, ApiError> {
    let top_k = top_k(body)?;
    let seed = seed(body)?;
    let logit_bias = logit_bias(body, vocab_size)?;
    let logprobs = logprobs(body, api, echo)?;
    Ok(SamplingParams {
        temperature: body.f32("temperature")?.unwrap_or(1.0),
        top_p: body.f32("top_p")?.unwrap_or(1.0),
        top_k,
        min_p: body.f32("min_p")?.unwrap_or(0.0),
        repetition_penalty: body.f32("repetition_penalty")?.unwrap_or(1.0),
        presence_penalty: body.f32("presence_penalty")?.unwrap_or(0.0),
        frequency_penalty: body.f32("frequency_penalty")?.unwrap_or(0.0),
        logit_bias,
        logprobs,
        seed,
    })
}

/// `top_k`: -1 or 0 switch it off (0 in the engine).
fn top_k(body: &JsonBody) -> Result<usize, ApiError> {
    match body.int("top_k")? {
        None | Some(-1) | Some(0) => Ok(0),
        Some(k) if k > 0 => Ok(k as usize),
        Some(k) => Err(ApiError::invalid(
            "top_k",
            format!("`top_k` must be -1 (off) or at least 1, got {k}"),
        )),
    }
}

/// `seed`: any integer; negative ones wrap around to u64.
fn seed(body: &JsonBody) -> Result<Option<u64>, ApiError> {
    body.get("seed")
        .map(|v| {
            v.as_u64()
                .or_else(|| v.as_i64().map(|x| x as u64))
                .ok_or_else(|| wrong_type("seed", "an integer", v))
        })
        .transpose()
}

/// `logit_bias`: an object of token id (as a string) -> bias.
fn logit_bias(body: &JsonBody, vocab_size: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(v) = body.get("logit_bias") else {
        return Ok(Vec::new());
    };
    let map = v
        .as_object()
        .ok_or_else(|| wrong_type("logit_bias", "an object of token id -> bias", v))?;
    at_most("logit_bias", "entries", map.len(), MAX_LOGIT_BIAS_ENTRIES)?;
    map.iter()
        .map(|(key, bias)| {
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
            Ok((id, bias as f32))
        })
        .collect()
}

/// How many alternatives to report with each token's log probability. Chat: `logprobs: true`
/// plus `top_logprobs: k`; completions: `logprobs: k`. Not with `echo`. The most allowed is
/// the engine's limit, checked with the others.
fn logprobs(body: &JsonBody, api: GenerationApi, echo: bool) -> Result<Option<usize>, ApiError> {
    let logprobs = match api {
        GenerationApi::Chat => {
            let top = body.count("top_logprobs")?;
            match (body.bool("logprobs")?.unwrap_or(false), top) {
                (true, top) => Some(top.unwrap_or(0)),
                (false, Some(t)) if t > 0 => {
                    return Err(ApiError::invalid(
                        "top_logprobs",
                        "`logprobs` must be true when `top_logprobs` is used",
                    ))
                }
                (false, _) => None,
            }
        }
        GenerationApi::Completion => body.count("logprobs")?,
        // Only `top_logprobs: 0` gets this far (see fields.rs).
        GenerationApi::Responses => None,
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
    Ok(logprobs)
}

/// `stop`, `stop_token_ids`, `min_tokens` (at most `max_tokens`) and `ignore_eos`.
fn stop_conditions(
    body: &JsonBody,
    max_tokens: MaxTokens,
    vocab_size: usize,
) -> Result<StopConditions, ApiError> {
    let strings = "a string or an array of strings";
    let stop = match body.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(String::from)
                    .ok_or_else(|| wrong_type("stop", strings, s))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(wrong_type("stop", strings, other)),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "`stop` strings must not be empty",
        ));
    }
    at_most("stop", "strings", stop.len(), MAX_STOP_STRINGS)?;
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_STRING_BYTES) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` strings may be at most {MAX_STOP_STRING_BYTES} bytes long, got one of {}",
                long.len()
            ),
        ));
    }
    let stop_token_ids = match body.get("stop_token_ids") {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            at_most("stop_token_ids", "ids", items.len(), MAX_STOP_TOKEN_IDS)?;
            token_ids(items, "stop_token_ids", vocab_size)?
        }
        Some(other) => return Err(wrong_type("stop_token_ids", "an array of token ids", other)),
    };
    let min_tokens = body.count("min_tokens")?.unwrap_or(0);
    if let Some(max) = max_tokens.asked {
        if min_tokens > max {
            return Err(ApiError::invalid(
                "min_tokens",
                format!(
                    "`min_tokens` ({min_tokens}) must not exceed `{}` ({max})",
                    max_tokens.param
                ),
            ));
        }
    }
    Ok(StopConditions {
        stop,
        stop_token_ids,
        min_tokens,
        ignore_eos: body.bool("ignore_eos")?.unwrap_or(false),
    })
}

/// `priority`: an i32; lower is served first under the priority scheduling policy.
fn priority(body: &JsonBody) -> Result<i32, ApiError> {
    let priority = body.int("priority")?.unwrap_or(0);
    i32::try_from(priority).map_err(|_| {
        ApiError::invalid(
            "priority",
            format!("`priority` is out of range: {priority}"),
        )
    })
}

/// `stream` and `stream_options.include_usage` (the Responses API's stream always ends with
/// the usage, and its `stream_options` mean something else: see fields.rs).
fn stream_options(body: &JsonBody, api: GenerationApi) -> Result<StreamOptions, ApiError> {
    let stream = body.bool("stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        _ if api == GenerationApi::Responses => false,
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
    Ok(StreamOptions {
        stream,
        include_usage,
    })
}
