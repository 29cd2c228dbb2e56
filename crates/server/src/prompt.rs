//! Prompts as token ids: a text completion's `prompt` (text or ids, one or several), and a
//! chat's `messages` rendered with the model's chat template.
//!
//! Errors name the field the prompt came from (`prompt` or `messages`); a prompt's length is
//! checked against the model's limits later, once, by the engine handle (see `submit.rs`).

use minserve_tokenizer::{ChatMessage, Tokenizer};
use serde_json::Value;

use crate::error::ApiError;
use crate::json_body::{token_ids, wrong_type, JsonBody};
use crate::limits::{at_most, MAX_SEQUENCES_PER_REQUEST};

/// A prompt as the client gave it: its tokens, and its text when it came as text.
pub(crate) struct Prompt {
    pub tokens: Vec<u32>,
    pub text: Option<String>,
}

/// A text completion's `prompt`: a string, an array of strings, an array of token ids or an
/// array of arrays of token ids; one [`Prompt`] per prompt.
pub(crate) fn completion_prompts(
    body: &JsonBody,
    tokenizer: &Tokenizer,
    vocab_size: usize,
) -> Result<Vec<Prompt>, ApiError> {
    let encode = |text: &str| -> Result<Prompt, ApiError> {
        let tokens = tokenizer.encode(text, true).map_err(|e| {
            ApiError::invalid("prompt", format!("could not tokenize the prompt: {e}"))
        })?;
        Ok(Prompt {
            tokens,
            text: Some(text.to_string()),
        })
    };
    let ids = |items: &[Value]| -> Result<Prompt, ApiError> {
        Ok(Prompt {
            tokens: token_ids(items, "prompt", vocab_size)?,
            text: None,
        })
    };
    let expected =
        "a string, an array of strings, an array of token ids or an array of arrays of token ids";
    // Each prompt is at least one sequence: too many are refused before any is tokenized.
    if let Some(Value::Array(items)) = body.get("prompt") {
        if !items.first().is_some_and(Value::is_number) {
            at_most("prompt", "prompts", items.len(), MAX_SEQUENCES_PER_REQUEST)?;
        }
    }
    let prompts = match body.get("prompt") {
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

/// One entry of `messages`: a role and its content, a string or an array of text parts.
fn chat_message(index: usize, message: &Value) -> Result<ChatMessage, ApiError> {
    let param = format!("messages[{index}]");
    let obj = message
        .as_object()
        .ok_or_else(|| wrong_type(&param, "an object", message))?;
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
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("{param}.content"),
                            "only text content parts ({\"type\": \"text\", \"text\": ...}) \
                                 are supported",
                        ))
                    }
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
}

fn chat_messages(body: &JsonBody) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match body.get("messages") {
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
        .map(|(i, m)| chat_message(i, m))
        .collect()
}

/// `chat_template_kwargs` (vLLM's parameter): extra variables for the chat template, such as
/// Qwen3's `enable_thinking`.
fn chat_template_kwargs(body: &JsonBody) -> Result<serde_json::Map<String, Value>, ApiError> {
    match body.get("chat_template_kwargs") {
        None | Some(Value::Null) => Ok(serde_json::Map::new()),
        Some(Value::Object(map)) => Ok(map.clone()),
        Some(other) => Err(wrong_type("chat_template_kwargs", "an object", other)),
    }
}

/// The conversation in `messages`, rendered with the model's chat template.
pub(crate) fn render_chat(
    body: &JsonBody,
    tokenizer: &Tokenizer,
    add_generation_prompt: bool,
) -> Result<String, ApiError> {
    let messages = chat_messages(body)?;
    let kwargs = chat_template_kwargs(body)?;
    let template = tokenizer.chat_template().ok_or_else(|| {
        ApiError::bad_request(
            "This model has no chat template: send a `prompt` to /v1/completions instead.",
        )
    })?;
    template
        .render_with(&messages, add_generation_prompt, &kwargs)
        .map_err(|e| {
            ApiError::invalid(
                "messages",
                format!("could not apply the chat template: {e}"),
            )
        })
}

/// The conversation in `messages`, rendered and tokenized, ready for the assistant's turn.
pub(crate) fn chat_prompt(body: &JsonBody, tokenizer: &Tokenizer) -> Result<Prompt, ApiError> {
    let text = render_chat(body, tokenizer, true)?;
    // The template writes any BOS itself.
    let tokens = tokenizer.encode(&text, false).map_err(|e| {
        ApiError::invalid("messages", format!("could not tokenize the messages: {e}"))
    })?;
    Ok(Prompt {
        tokens,
        text: Some(text),
    })
}
