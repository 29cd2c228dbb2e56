//! What a client asks of the engine and what it gets back: the [`Request`], its validation
//! against the engine's limits, and the [`RequestEvent`]s streamed to its [`EventSink`].
//!
//! **A request is validated once.** [`EngineLimits::validate`] is the only way to make a
//! [`ValidatedRequest`], and the engine only queues validated requests, so nothing downstream
//! checks again. Whatever could never complete (an empty prompt, bad sampling parameters, more
//! tokens than the context or the whole KV cache holds) is refused here, up front, with a
//! message fit for the client.

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::constraint::ConstraintFactory;
use crate::fair_share::TenantShare;
use crate::sampling::{SamplingParams, MAX_LOGPROBS};

/// Identifies a request; handed out by the engine or its handle.
pub type RequestId = u64;

/// What a client asks for, already tokenized.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    /// EOS and stop ids are suppressed until this many tokens have been generated.
    pub min_tokens: usize,
    /// Text that ends generation; never emitted itself.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (the model's EOS ids always do, unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Independent samples of the same prompt.
    pub n: usize,
    pub priority: i32,
    /// A grammar the output must follow (structured outputs); each sample walks its own copy.
    pub constraint: Option<Arc<dyn ConstraintFactory>>,
    /// Whose request it is, for the fair-share policy (`fair_share.rs`); `None`: anonymous.
    pub tenant: Option<TenantShare>,
    /// The conversation session it belongs to: its blocks stay in the prefix cache ahead of
    /// unsessioned ones, for the session's next turn (`block_manager.rs`).
    pub session: Option<Session>,
    /// Text the output is expected to largely repeat, tokenized (OpenAI's predicted outputs):
    /// speculative decoding drafts from it (`speculative.rs`). Empty: none.
    pub prediction: Vec<u32>,
}

/// A conversation session, as a request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: Arc<str>,
    /// How long the request's cached blocks are kept ahead of others' once it ends.
    pub ttl: Duration,
}

impl Request {
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            params: SamplingParams::default(),
            max_tokens,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            n: 1,
            priority: 0,
            constraint: None,
            tenant: None,
            session: None,
            prediction: Vec::new(),
        }
    }
}

/// A [`Request`] that passed [`EngineLimits::validate`]; only validation makes one, so holding
/// one proves the check ran. Reads as a `&Request`.
#[derive(Debug, Clone)]
pub struct ValidatedRequest(Request);

impl ValidatedRequest {
    pub fn into_inner(self) -> Request {
        self.0
    }
}

impl Deref for ValidatedRequest {
    type Target = Request;

    fn deref(&self) -> &Request {
        &self.0
    }
}

/// What stopped a sample, when the request asked for it (vLLM's `stop_reason`): one of its
/// stop strings, or one of its stop token ids. EOS and a completed grammar are no such reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    String(String),
    Token(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id, or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a request's stream receives. `index` tells the `n` samples of one request apart.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestEvent {
    /// The scheduler picked the request for the first time, at `at`: its time in the queue is
    /// over. Sent once per request (not per sample, nor again after a preemption), before its
    /// first token.
    Scheduled {
        at: Instant,
        /// Prompt tokens found in the prefix cache, not computed again (OpenAI's
        /// `usage.prompt_tokens_details.cached_tokens`).
        cached_tokens: usize,
    },
    Token {
        index: usize,
        token: u32,
        /// New text; may be empty while a multi-byte character or a possible stop string is
        /// incomplete.
        text: String,
        logprob: Option<f32>,
        top_logprobs: Vec<(u32, f32)>,
    },
    Finished {
        index: usize,
        reason: FinishReason,
        /// Text held back until the end (a prefix of a stop string that never completed).
        text: String,
        completion_tokens: usize,
        /// The stop string or stop token id that ended it; `None` at EOS, a complete grammar
        /// or the length limit.
        stop_reason: Option<StopReason>,
        /// Tokens of the request's prediction that were drafted, accepted and emitted
        /// (OpenAI's `accepted_prediction_tokens`); 0 without a prediction.
        accepted_prediction_tokens: usize,
    },
    /// The request failed inside the engine; no more events follow.
    Failed(String),
}

/// Where a request's events go. Implemented by the server over its async channels; the core
/// stays free of any runtime.
pub trait EventSink: Send {
    /// False when the receiver is gone.
    fn send(&self, event: RequestEvent) -> bool;
    /// True when the receiver is gone (checked every step to abort early).
    fn is_closed(&self) -> bool;
}

impl EventSink for std::sync::mpsc::Sender<RequestEvent> {
    fn send(&self, event: RequestEvent) -> bool {
        std::sync::mpsc::Sender::send(self, event).is_ok()
    }
    fn is_closed(&self) -> bool {
        false // std's channel only tells on send; the next event will notice
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{0}")]
    InvalidParams(String),
    /// More alternatives per token than [`MAX_LOGPROBS`]: a variant of its own, so that an API
    /// can name the parameter as its clients know it (`logprobs`, chat's `top_logprobs`).
    #[error("logprobs must be at most {max}, got {asked}")]
    TooManyLogprobs { asked: usize, max: usize },
    #[error(
        "this model's maximum context length is {max_model_len} tokens, but the request needs \
         {prompt_tokens} prompt tokens plus up to {max_tokens} generated tokens"
    )]
    TooLong {
        max_model_len: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
    #[error(
        "the request needs up to {needed} KV cache blocks ({tokens} tokens) but the cache has only \
         {available}; it could never complete (raise the KV cache size)"
    )]
    NeverFits {
        needed: usize,
        available: usize,
        tokens: usize,
    },
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },
}

/// Limits a request is validated against before it is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

impl EngineLimits {
    /// Rejects up front what could never complete, with a message fit for the client; what
    /// passes is queued as it is, never checked again.
    pub fn validate(&self, request: Request) -> Result<ValidatedRequest, RequestError> {
        if request.prompt.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if request.n == 0 {
            return Err(RequestError::InvalidParams("n must be at least 1".into()));
        }
        if request.max_tokens == 0 {
            return Err(RequestError::InvalidParams(
                "max_tokens must be at least 1".into(),
            ));
        }
        request
            .params
            .validate()
            .map_err(RequestError::InvalidParams)?;
        if let Some(asked) = request.params.logprobs.filter(|&k| k > MAX_LOGPROBS) {
            return Err(RequestError::TooManyLogprobs {
                asked,
                max: MAX_LOGPROBS,
            });
        }
        // Drafts are fed to the model like prompt tokens: a predicted id must be as valid.
        if let Some(&token) = request
            .prompt
            .iter()
            .chain(&request.prediction)
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(RequestError::TokenOutOfRange {
                token,
                vocab_size: self.vocab_size,
            });
        }
        let tokens = request.prompt.len() + request.max_tokens;
        if tokens > self.max_model_len {
            return Err(RequestError::TooLong {
                max_model_len: self.max_model_len,
                prompt_tokens: request.prompt.len(),
                max_tokens: request.max_tokens,
            });
        }
        let needed = tokens.div_ceil(self.block_size);
        if needed > self.num_blocks {
            return Err(RequestError::NeverFits {
                needed,
                available: self.num_blocks,
                tokens,
            });
        }
        Ok(ValidatedRequest(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_logprobs_than_the_limit_are_refused_with_the_limit_and_the_count() {
        let limits = EngineLimits {
            max_model_len: 64,
            vocab_size: 100,
            num_blocks: 8,
            block_size: 16,
        };
        let mut request = Request::new(vec![1, 2, 3], 4);
        request.params.logprobs = Some(MAX_LOGPROBS + 1);
        let error = limits.validate(request.clone()).unwrap_err();
        assert_eq!(error, RequestError::TooManyLogprobs { asked: 21, max: 20 });
        assert_eq!(error.to_string(), "logprobs must be at most 20, got 21");
        request.params.logprobs = Some(MAX_LOGPROBS);
        assert!(limits.validate(request).is_ok());
    }
}
