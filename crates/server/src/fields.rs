//! Every field a chat or text completion request may carry, and what minserve does with it:
//! honour it, accept it as meaningless here, or refuse it. Nothing is silently ignored: a field
//! that is not in [`FIELDS`] is refused as OpenAI refuses it ("Unrecognized request argument
//! supplied"), and a refused field is a 400 naming it unless it holds the value that asks for
//! nothing (`store: false`, `best_of` equal to `n`, ...).
//!
//! `docs/api-fields.md` is this table for people; a test keeps the two in step.

use serde_json::Value;

use crate::error::ApiError;
use crate::generation_api::GenerationApi;
use crate::json_body::{as_int, JsonBody};

/// The APIs a field belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Apis {
    Chat,
    Completion,
    Both,
}

impl Apis {
    fn includes(self, api: GenerationApi) -> bool {
        match self {
            Apis::Both => true,
            Apis::Chat => api == GenerationApi::Chat,
            Apis::Completion => api == GenerationApi::Completion,
        }
    }
}

/// What minserve does with a field.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Handling {
    /// Read and honoured (`params.rs`, `prompt.rs`, `structured.rs`, `tools.rs`).
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

use Apis::{Both, Chat, Completion};

/// Every field of both requests, in the order of `docs/api-fields.md`.
pub(crate) const FIELDS: &[Field] = &[
    // The prompt and the model.
    supported("model", Both),
    supported("messages", Chat),
    supported("prompt", Completion),
    // Length and stopping.
    supported("max_tokens", Both),
    supported("max_completion_tokens", Chat),
    supported("min_tokens", Both),
    supported("stop", Both),
    supported("stop_token_ids", Both),
    supported("ignore_eos", Both),
    // Sampling.
    supported("temperature", Both),
    supported("top_p", Both),
    supported("top_k", Both),
    supported("min_p", Both),
    supported("presence_penalty", Both),
    supported("frequency_penalty", Both),
    supported("repetition_penalty", Both),
    supported("logit_bias", Both),
    supported("seed", Both),
    supported("n", Both),
    supported("logprobs", Both),
    supported("top_logprobs", Chat),
    supported("echo", Completion),
    // Delivery and scheduling.
    supported("stream", Both),
    supported("stream_options", Both),
    supported("priority", Both),
    // Structured outputs and tools.
    supported("response_format", Chat),
    supported("structured_outputs", Both),
    supported("tools", Chat),
    supported("tool_choice", Chat),
    supported("parallel_tool_calls", Chat),
    // The chat template.
    supported("chat_template_kwargs", Chat),
    supported("add_generation_prompt", Chat),
    supported("continue_final_message", Chat),
    // Accepted, without effect here.
    meaningless(
        "user",
        Both,
        "an end-user id for the provider's abuse monitoring; minserve keeps no per-user state",
    ),
    meaningless(
        "safety_identifier",
        Chat,
        "the successor of `user`, for abuse monitoring; nothing to monitor with",
    ),
    meaningless(
        "metadata",
        Chat,
        "tags for stored completions; minserve stores none",
    ),
    meaningless(
        "prompt_cache_key",
        Chat,
        "a routing hint for the provider's prompt cache; minserve's prefix cache is automatic \
         and shared by all requests",
    ),
    // SGLang's reasoning switches, which the vLLM and SGLang routers add to every request they
    // forward. SGLang itself gives them effect only when started with a reasoning parser.
    meaningless(
        "separate_reasoning",
        Chat,
        "SGLang's; takes effect only with a reasoning parser, which minserve does not run: \
         reasoning text stays in `content`",
    ),
    meaningless(
        "stream_reasoning",
        Chat,
        "SGLang's; as `separate_reasoning`",
    ),
    meaningless(
        "include_reasoning",
        Chat,
        "SGLang's; as `separate_reasoning`",
    ),
    // Refused unless they ask for nothing.
    refused("store", Chat, "minserve stores no completions", is_false),
    refused(
        "service_tier",
        Chat,
        "there is one tier: `auto` or `default`",
        default_tier,
    ),
    refused(
        "modalities",
        Chat,
        "only text output: `[\"text\"]`",
        text_only,
    ),
    refused(
        "best_of",
        Completion,
        "minserve does not rank candidates: `best_of` must equal `n` (or be left out)",
        best_of_n,
    ),
    refused(
        "suffix",
        Completion,
        "insertion (fill-in-the-middle) is not supported",
        never,
    ),
    refused("audio", Chat, "audio output is not supported", never),
    refused(
        "prediction",
        Chat,
        "predicted outputs (speculative decoding from a given text) are not supported",
        never,
    ),
    refused(
        "reasoning_effort",
        Chat,
        "the served models are not reasoning models",
        never,
    ),
    refused(
        "verbosity",
        Chat,
        "no model here is trained to follow a verbosity setting",
        never,
    ),
    refused(
        "web_search_options",
        Chat,
        "minserve has no web search",
        never,
    ),
    refused(
        "functions",
        Chat,
        "the deprecated function-calling fields are not supported: send `tools`",
        never,
    ),
    refused(
        "function_call",
        Chat,
        "the deprecated function-calling fields are not supported: send `tool_choice`",
        never,
    ),
    // vLLM's extra parameters that minserve does not implement.
    refused(
        "use_beam_search",
        Both,
        "beam search is not implemented",
        is_false,
    ),
    refused(
        "include_stop_str_in_output",
        Both,
        "a matched stop string is never part of the output",
        is_false,
    ),
    refused(
        "skip_special_tokens",
        Both,
        "special tokens are always left out of the text",
        is_true,
    ),
    refused(
        "spaces_between_special_tokens",
        Both,
        "special tokens are always left out of the text",
        is_true,
    ),
    // SGLang's extra parameters that routers forward with their default values.
    refused(
        "no_stop_trim",
        Both,
        "a matched stop string is always trimmed from the output",
        is_false,
    ),
    refused(
        "return_hidden_states",
        Both,
        "hidden states are not returned",
        is_false,
    ),
    refused(
        "prompt_logprobs",
        Both,
        "the model runner computes logits at the last prompt position only",
        never,
    ),
    refused(
        "truncate_prompt_tokens",
        Both,
        "prompts are never truncated: a prompt that does not fit is refused",
        never,
    ),
    refused(
        "guided_json",
        Both,
        "vLLM's removed `guided_*` fields are not supported: send `structured_outputs`",
        never,
    ),
    refused(
        "guided_regex",
        Both,
        "vLLM's removed `guided_*` fields are not supported: send `structured_outputs`",
        never,
    ),
    refused(
        "guided_choice",
        Both,
        "vLLM's removed `guided_*` fields are not supported: send `structured_outputs`",
        never,
    ),
    refused(
        "guided_grammar",
        Both,
        "vLLM's removed `guided_*` fields are not supported: send `structured_outputs`",
        never,
    ),
    refused(
        "chat_template",
        Chat,
        "a request cannot replace the model's chat template",
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
                Both => "both",
                Chat => "chat",
                Completion => "completions",
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
                    a.name != b.name || (a.apis != Both && b.apis != Both && a.apis != b.apis),
                    "{} is listed twice",
                    a.name
                );
            }
        }
    }
}
