//! The output stage: what each sampled token adds to its sample's stream, and when the
//! sample ends.
//!
//! For every new token, in this order:
//!
//! 1. **Stop tokens.** EOS (unless the request sets `ignore_eos`) and the request's stop ids
//!    end the sample; the token itself is never text. Sampling masks the same ids while
//!    `min_tokens` are not out ([`OutputStage::stop_token_ids`]).
//! 2. **Detokenizing** ([`IncrementalDetokenizer`]): the text the token completes, held back
//!    while a character is incomplete.
//! 3. **Stop strings** ([`StopStrings`]): that text is emitted, except a tail that could still
//!    grow into a stop string; a completed stop string ends the sample and is never emitted.
//! 4. **Length.** A sample that did not stop ends at `max_tokens`.
//!
//! When a sample ends, whatever text is still held back (a partial character, or a prefix of a
//! stop string that never completed) is released, unless a stop string ended it
//! ([`OutputStage::held_back`]).

use std::sync::Arc;

use crate::detokenize::{IncrementalDetokenizer, TokenDecoder};
use crate::request::{FinishReason, Request, StopReason};
use crate::stop::StopStrings;

/// The engine-wide part of the stage: how to decode, and the model's end-of-sequence ids.
pub struct OutputStage {
    decoder: Arc<dyn TokenDecoder>,
    eos_token_ids: Vec<u32>,
}

/// One sample's text so far, as far as the stage still needs it.
#[derive(Debug, Clone)]
pub struct SampleOutput {
    detokenizer: IncrementalDetokenizer,
    stop_strings: StopStrings,
}

/// What one token adds to its sample's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOutput {
    /// Text to emit now (possibly empty).
    pub text: String,
    /// Set when this token ends the sample.
    pub finish: Option<FinishReason>,
    /// The request's stop string or stop token id that ended it, if one did.
    pub stop_reason: Option<StopReason>,
}

impl OutputStage {
    pub fn new(decoder: Arc<dyn TokenDecoder>, eos_token_ids: Vec<u32>) -> Self {
        Self {
            decoder,
            eos_token_ids,
        }
    }

    /// The token ids that end `request`'s samples: EOS (unless `ignore_eos`) and its stop ids.
    pub fn stop_token_ids<'a>(&'a self, request: &'a Request) -> impl Iterator<Item = u32> + 'a {
        self.eos_token_ids
            .iter()
            .filter(|_| !request.ignore_eos)
            .chain(&request.stop_token_ids)
            .copied()
    }

    /// The state of a new sample of `request`, before its first token.
    pub fn new_sample(&self, request: &Request) -> SampleOutput {
        SampleOutput {
            detokenizer: IncrementalDetokenizer::new(&request.prompt),
            stop_strings: StopStrings::new(&request.stop),
        }
    }

    /// Takes `token`, the `num_output`-th token generated for `sample` of `request`.
    pub fn push(
        &self,
        sample: &mut SampleOutput,
        request: &Request,
        token: u32,
        num_output: usize,
    ) -> TokenOutput {
        let mut finish = None;
        let mut stop_reason = None;
        let mut text = String::new();
        if self.stop_token_ids(request).any(|t| t == token) {
            finish = Some(FinishReason::Stop);
            // EOS first, as vLLM checks it: a stop id that is also EOS reports no reason.
            let eos = !request.ignore_eos && self.eos_token_ids.contains(&token);
            if !eos {
                stop_reason = Some(StopReason::Token(token));
            }
        } else {
            let delta = sample.detokenizer.push(token, self.decoder.as_ref());
            let outcome = sample.stop_strings.push(&delta);
            text = outcome.emit;
            if outcome.stopped {
                finish = Some(FinishReason::Stop);
                stop_reason = sample
                    .stop_strings
                    .matched()
                    .map(|s| StopReason::String(s.to_string()));
            }
        }
        if finish.is_none() && num_output >= request.max_tokens {
            finish = Some(FinishReason::Length);
        }
        TokenOutput {
            text,
            finish,
            stop_reason,
        }
    }

    /// The text `sample` still holds back once it has ended: a partial character, or a prefix
    /// of a stop string that never completed. Nothing after a stop string.
    pub fn held_back(&self, sample: &mut SampleOutput) -> String {
        if sample.stop_strings.is_stopped() {
            return String::new();
        }
        let tail = sample.detokenizer.finish(self.decoder.as_ref());
        let outcome = sample.stop_strings.push(&tail);
        match outcome.stopped {
            true => outcome.emit,
            false => outcome.emit + &sample.stop_strings.finish(),
        }
    }
}
