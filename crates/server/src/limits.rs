//! What one request may ask for: the limits that bound its memory and its cost per token,
//! each refused with a 400 naming the field (the table is in docs/reliability.md). The body
//! itself is bounded by `--max-body-bytes`, log probabilities by the engine
//! (`minserve_core::sampling::MAX_LOGPROBS`), and the tokens by the context.
//!
//! Everything here is held for as long as the request runs; stop strings are also matched
//! against every generated token of every sample, so their count and length bound the engine's
//! work per token as well.

use crate::error::ApiError;

/// Most samples one request may ask for (`n` times the number of prompts).
pub(crate) const MAX_SEQUENCES_PER_REQUEST: usize = 128;

/// Most strings in `stop`.
pub(crate) const MAX_STOP_STRINGS: usize = 64;
/// Longest string in `stop`, in bytes.
pub(crate) const MAX_STOP_STRING_BYTES: usize = 1024;
/// Most ids in `stop_token_ids`.
pub(crate) const MAX_STOP_TOKEN_IDS: usize = 1024;
/// Most entries in `logit_bias`.
pub(crate) const MAX_LOGIT_BIAS_ENTRIES: usize = 1024;
/// Most tokens in chat's `prediction`: each decoding step searches it for the output's last
/// tokens, so its length bounds that work.
pub(crate) const MAX_PREDICTION_TOKENS: usize = 32_768;

/// 400 naming `param` when it holds more than `max` `things` (`count` of them).
pub(crate) fn at_most(param: &str, things: &str, count: usize, max: usize) -> Result<(), ApiError> {
    if count > max {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` may have at most {max} {things}, got {count}"),
        ));
    }
    Ok(())
}
