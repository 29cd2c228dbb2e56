//! Every field a chat, text completion or Responses API request may carry, and what minserve
//! does with it: honour it, accept it as meaningless here, or refuse it. Nothing is silently ignored: a field
//! that is not in [`FIELDS`] is refused as OpenAI refuses it ("Unrecognized request argument
//! supplied"), and a refused field is a 400 naming it unless it holds the value that asks for
//! nothing (`store: false`, `best_of` equal to `n`, ...).
//!
//! `docs/api-fields.md` is this table for people; a test keeps the two in step.

use serde_json::Value;

use crate::error::ApiError;
use crate::generation_api::GenerationApi;
use crate::json_body::{as_int, JsonBody};

/// The APIs a field belongs to: a set of [`GenerationApi`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Apis(u8);

impl Apis {
    const fn of(api: GenerationApi) -> u8 {
        match api {
            GenerationApi::Chat => 1,
            GenerationApi::Completion => 2,
            GenerationApi::Responses => 4,
        }
    }

    fn includes(self, api: GenerationApi) -> bool {
        self.0 & Self::of(api) != 0
    }

    /// Whether a field of `self` and one of `other` could be sent to the same API.
    #[cfg(test)]
    fn overlaps(self, other: Apis) -> bool {
        self.0 & other.0 != 0
    }
}

const CHAT: Apis = Apis(Apis::of(GenerationApi::Chat));
const COMPLETION: Apis = Apis(Apis::of(GenerationApi::Completion));
const RESPONSES: Apis = Apis(Apis::of(GenerationApi::Responses));
/// Chat and text completions.
const BOTH: Apis = Apis(CHAT.0 | COMPLETION.0);
/// The two conversation APIs: chat and the Responses API.
const CHAT_RESPONSES: Apis = Apis(CHAT.0 | RESPONSES.0);
const ALL: Apis = Apis(BOTH.0 | RESPONSES.0);

/// What minserve does with a field.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Handling {
    /// Read and honoured (`params.rs`, `prompt.rs`, `structured.rs`, `tools.rs`,
    /// `responses/input.rs`).
    Supported,
    /// Accepted (its type is not checked beyond JSON) and without effect here, for the reason
    /// given.
    Meaningless(&'static str),
    /// A 400 naming the field, for the reason given, unless `asks_nothing` holds for its value
    /// (given the whole body, for values that depend on another field).
    Refused {
        reason: &'static str,
        asks_nothing: fn(&Value, &JsonBody) -> bool,
    },
}

/// One request field.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    pub name: &'static str,
    pub apis: Apis,
    pub handling: Handling,
}

const fn supported(name: &'static str, apis: Apis) -> Field {
    Field {
        name,
        apis,
        handling: Handling::Supported,
    }
}

const fn meaningless(name: &'static str, apis: Apis, reason: &'static str) -> Field {
    Field {
        name,
        apis,
        handling: Handling::Meaningless(reason),
    }
}

const fn refused(
    name: &'static str,
    apis: Apis,
    reason: &'static str,
    asks_nothing: fn(&Value, &JsonBody) -> bool,
) -> Field {
    Field {
        name,
        apis,
        handling: Handling::Refused {
            reason,
            asks_nothing,
        },
    }
}

fn never(_: &Value, _: &JsonBody) -> bool {
    false
}

fn is_false(v: &Value, _: &JsonBody) -> bool {
    v == &Value::Bool(false)
}

fn is_true(v: &Value, _: &JsonBody) -> bool {
    v == &Value::Bool(true)
}

fn is_zero(v: &Value, _: &JsonBody) -> bool {
    as_int(v) == Some(0)
}

fn is_empty_array(v: &Value, _: &JsonBody) -> bool {
    v.as_array().is_some_and(Vec::is_empty)
}

/// `truncation: "disabled"`, the default.
fn is_disabled(v: &Value, _: &JsonBody) -> bool {
    v.as_str() == Some("disabled")
}

/// `modalities: ["text"]`: text out is all there is.
fn text_only(v: &Value, _: &JsonBody) -> bool {
    v.as_array()
        .is_some_and(|m| m.iter().all(|x| x.as_str() == Some("text")))
}

/// `service_tier`: the one tier there is.
fn default_tier(v: &Value, _: &JsonBody) -> bool {
    matches!(v.as_str(), Some("auto" | "default"))
}

/// `best_of` equal to `n` (1 by default): as many candidates as answers, nothing to rank.
fn best_of_n(v: &Value, body: &JsonBody) -> bool {
    let n = body.get("n").and_then(as_int).unwrap_or(1);
    as_int(v) == Some(n)
}

/// Every field of both requests, in the order of `docs/api-fields.md`.
pub(crate) const FIELDS: &[Field] = &[
    // The prompt and the model.
    supported("model", ALL),
    supported("messages", CHAT),
    supported("prompt", COMPLETION),
    supported("input", RESPONSES),
    supported("instructions", RESPONSES),
    // Length and stopping.
    supported("max_tokens", BOTH),
    supported("max_completion_tokens", CHAT),
    supported("max_output_tokens", RESPONSES),
    supported("min_tokens", ALL),
    supported("stop", ALL),
    supported("stop_token_ids", ALL),
    supported("ignore_eos", ALL),
    // Sampling.
    supported("temperature", ALL),
    supported("top_p", ALL),
    supported("top_k", ALL),
    supported("min_p", ALL),
    supported("presence_penalty", ALL),
    supported("frequency_penalty", ALL),
    supported("repetition_penalty", ALL),
    supported("logit_bias", ALL),
    supported("seed", ALL),
    supported("n", BOTH),
    supported("logprobs", BOTH),
    supported("top_logprobs", CHAT),
    supported("echo", COMPLETION),
    // Delivery and scheduling.
    supported("stream", ALL),
    supported("stream_options", BOTH),
    supported("priority", ALL),
    supported("prediction", CHAT),
    // Structured outputs and tools.
    supported("response_format", CHAT),
    supported("text", RESPONSES),
    supported("store", RESPONSES),
    supported("previous_response_id", RESPONSES),
    supported("structured_outputs", BOTH),
    supported("tools", CHAT_RESPONSES),
    supported("tool_choice", CHAT_RESPONSES),
    supported("parallel_tool_calls", CHAT_RESPONSES),
    // The chat template.
    supported("chat_template_kwargs", CHAT),
    supported("add_generation_prompt", CHAT),
    supported("continue_final_message", CHAT),
    // Accepted, without effect here.
    meaningless(
        "user",
        ALL,
        "an end-user id for the provider's abuse monitoring; minserve keeps no per-user state",
    ),
    meaningless(
        "safety_identifier",
        CHAT_RESPONSES,
        "the successor of `user`, for abuse monitoring; nothing to monitor with",
    ),
    meaningless(
        "metadata",
        CHAT_RESPONSES,
        "tags for stored completions; minserve stores none",
    ),
    meaningless(
        "prompt_cache_key",
        CHAT_RESPONSES,
        "a routing hint for the provider's prompt cache; minserve's prefix cache is automatic \
         and shared by all requests",
    ),
    // Reasoning switches (`routes/chat.rs`, `reasoning.rs`), which the vLLM and SGLang routers
    // add to every request they forward; without --reasoning-parser there is nothing to split.
    supported("separate_reasoning", CHAT),
    supported("include_reasoning", CHAT),
    refused(
        "stream_reasoning",
        CHAT,
        "SGLang's; minserve streams the thinking as it comes (`stream_reasoning: true`) and \
         cannot hold it back to the end",
        |v, _| v == &Value::Bool(true),
    ),
    meaningless(
        "stream_options",
        RESPONSES,
        "`include_obfuscation` pads streamed events against length side channels; minserve \
         does not pad them",
    ),
    meaningless(
        "prompt_cache_retention",
        RESPONSES,
        "minserve's prefix cache keeps blocks while the KV cache has room for them",
    ),
    // Refused unless they ask for nothing.
    refused("store", CHAT, "minserve stores no completions", is_false),
    refused(
        "service_tier",
        CHAT_RESPONSES,
        "there is one tier: `auto` or `default`",
        default_tier,
    ),
    refused(
        "modalities",
        CHAT,
        "only text output: `[\"text\"]`",
        text_only,
    ),
    refused(
        "best_of",
        COMPLETION,
        "minserve does not rank candidates: `best_of` must equal `n` (or be left out)",
        best_of_n,
    ),
    refused(
        "suffix",
        COMPLETION,
        "insertion (fill-in-the-middle) is not supported",
        never,
    ),
    refused("audio", CHAT, "audio output is not supported", never),
    refused(
        "reasoning_effort",
        CHAT,
        "the served models are not reasoning models",
        never,
    ),
    refused(
        "verbosity",
        CHAT,
        "no model here is trained to follow a verbosity setting",
        never,
    ),
    refused(
        "web_search_options",
        CHAT,
        "minserve has no web search",
        never,
    ),
    refused(
        "functions",
        CHAT,
        "the deprecated function-calling fields are not supported: send `tools`",
        never,
    ),
    refused(
        "function_call",
        CHAT,
        "the deprecated function-calling fields are not supported: send `tool_choice`",
        never,
    ),
    // vLLM's extra parameters that minserve does not implement.
    refused(
        "use_beam_search",
        BOTH,
        "beam search is not implemented",
        is_false,
    ),
    refused(
        "include_stop_str_in_output",
        BOTH,
        "a matched stop string is never part of the output",
        is_false,
    ),
    refused(
        "skip_special_tokens",
        BOTH,
        "special tokens are always left out of the text",
        is_true,
    ),
    refused(
        "spaces_between_special_tokens",
        BOTH,
        "special tokens are always left out of the text",
        is_true,
    ),
    // SGLang's extra parameters that routers forward with their default values.
    refused(
        "no_stop_trim",
        BOTH,
        "a matched stop string is always trimmed from the output",
        is_false,
    ),
    refused(
        "return_hidden_states",
        BOTH,
        "hidden states are not returned",
        is_false,
    ),
    refused(
        "prompt_logprobs",
        BOTH,
        "the model runner computes logits at the last prompt position only",
        never,
    ),
    refused(
        "truncate_prompt_tokens",
        BOTH,
        "prompts are never truncated: a prompt that does not fit is refused",
        never,
    ),
    refused(
        "guided_json",
        BOTH,
        "vLLM's removed `guided_*` fields are not supported: send `structured_outputs`",
        never,
    ),
    refused(
        "guided_regex",
        BOTH,
        "vLLM's removed `guided_*` fields are not supported: send `structured_outputs`",
        never,
    ),
    refused(
        "guided_choice",
        BOTH,
        "vLLM's removed `guided_*` fields are not supported: send `structured_outputs`",
        never,
    ),
    refused(
        "guided_grammar",
        BOTH,
        "vLLM's removed `guided_*` fields are not supported: send `structured_outputs`",
        never,
    ),
    refused(
        "chat_template",
        CHAT,
        "a request cannot replace the model's chat template",
        never,
    ),
    // The Responses API's state and hosted features.
    refused(
        "conversation",
        RESPONSES,
        "conversation objects are not kept: use `previous_response_id`, or send the whole \
         conversation in `input`",
        never,
    ),
    refused(
        "background",
        RESPONSES,
        "a response runs while its request is open; there is no background mode",
        is_false,
    ),
    refused(
        "include",
        RESPONSES,
        "there is no extra output to include: an empty list asks for nothing",
        is_empty_array,
    ),
    refused(
        "reasoning",
        RESPONSES,
        "the served models are not reasoning models",
        never,
    ),
    refused(
        "top_logprobs",
        RESPONSES,
        "log probabilities are not reported on /v1/responses: use /v1/chat/completions",
        is_zero,
    ),
    refused(
        "truncation",
        RESPONSES,
        "prompts are never truncated: a prompt that does not fit is refused",
        is_disabled,
    ),
    refused(
        "max_tool_calls",
        RESPONSES,
        "the number of calls is not limited: leave it out",
        never,
    ),
    refused(
        "prompt",
        RESPONSES,
        "stored prompt templates are not supported: send `input`",
        never,
    ),
    refused(
        "context_management",
        RESPONSES,
        "conversations are not compacted: send the input that should be read",
        never,
    ),
];

/// 400 for the first field of `body` that `api` refuses or does not know.
pub(crate) fn refuse_unsupported(body: &JsonBody, api: GenerationApi) -> Result<(), ApiError> {
    for (name, value) in body.fields() {
        if value.is_null() {
            continue;
        }
        let field = FIELDS
            .iter()
            .find(|f| f.name == name && f.apis.includes(api));
        match field.map(|f| f.handling) {
            None => {
                return Err(ApiError::invalid(
                    name,
                    format!(
                        "Unrecognized request argument supplied: {name} (the fields {} accepts \
                         are listed in docs/api-fields.md)",
                        api.path()
                    ),
                ))
            }
            Some(Handling::Refused {
                reason,
                asks_nothing,
            }) if !asks_nothing(value, body) => {
                return Err(ApiError::invalid(
                    name,
                    format!("`{name}` is not supported: {reason}"),
                ))
            }
            Some(Handling::Meaningless(reason)) => {
                tracing::debug!(target: "minserve_server", "`{name}` has no effect: {reason}");
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word the docs' table uses for a handling.
    fn status(handling: Handling) -> &'static str {
        match handling {
            Handling::Supported => "supported",
            Handling::Meaningless(_) => "accepted, no effect",
            Handling::Refused { .. } => "refused",
        }
    }

    /// The docs' table has one row per field, with the same APIs and status as [`FIELDS`].
    #[test]
    fn the_docs_table_lists_every_field_as_handled() {
        let doc = include_str!("../../../docs/api-fields.md");
        for field in FIELDS {
            let apis = match field.apis {
                BOTH => "both",
                CHAT => "chat",
                COMPLETION => "completions",
                RESPONSES => "responses",
                CHAT_RESPONSES => "chat, responses",
                ALL => "all",
                other => panic!("no docs name for {other:?}"),
            };
            let row = format!("| `{}` | {apis} | {} |", field.name, status(field.handling));
            assert!(
                doc.lines().any(|line| line.starts_with(&row)),
                "docs/api-fields.md has no row starting with {row:?}"
            );
        }
        let rows = doc.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(
            rows,
            FIELDS.len(),
            "docs/api-fields.md has rows for unknown fields"
        );
    }

    #[test]
    fn field_names_are_unique_per_api() {
        for (i, a) in FIELDS.iter().enumerate() {
            for b in &FIELDS[i + 1..] {
                assert!(
                    a.name != b.name || !a.apis.overlaps(b.apis),
                    "{} is listed twice",
                    a.name
                );
            }
        }
    }
}
