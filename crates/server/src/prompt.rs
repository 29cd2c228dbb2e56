//! Prompts as token ids: a text completion's `prompt` (text or ids, one or several), and a
//! chat's `messages` rendered with the model's chat template.
//!
//! Errors name the field the prompt came from (`prompt` or `messages`); a prompt's length is
//! checked against the model's limits later, once, by the engine handle (see `submit.rs`).

use minserve_tokenizer::{ChatMessage, RenderOptions, Tokenizer};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::json_body::{token_ids, wrong_type, JsonBody};
use crate::limits::{at_most, MAX_PREDICTION_TOKENS, MAX_SEQUENCES_PER_REQUEST};
use crate::tool_format::ToolCallFormat;
use crate::tools::ToolRequest;

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

/// The text of a message's `content`: a string, an array of text parts, or nothing.
fn content_text(param: &str, content: Option<&Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
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
            Ok(texts.join("\n"))
        }
        Some(other) => Err(wrong_type(
            &format!("{param}.content"),
            "a string or an array of text parts",
            other,
        )),
    }
}

/// An assistant message's `tool_calls`, with each call's `arguments` (a JSON string, as
/// OpenAI sends them) turned into the object templates write with `tojson`.
fn tool_calls(param: &str, calls: &Value) -> Result<Vec<Value>, ApiError> {
    let param = format!("{param}.tool_calls");
    let items = calls
        .as_array()
        .ok_or_else(|| wrong_type(&param, "an array of tool calls", calls))?;
    items
        .iter()
        .enumerate()
        .map(|(i, call)| {
            let at = format!("{param}[{i}]");
            let id = call.get("id").and_then(Value::as_str);
            let function = call.get("function");
            let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
            let (Some(id), Some(name)) = (id, name) else {
                return Err(ApiError::invalid(
                    &at,
                    format!("`{at}` needs an `id` and a `function.name`"),
                ));
            };
            let arguments = match function.and_then(|f| f.get("arguments")) {
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(Value::String(text)) => serde_json::from_str(text).map_err(|e| {
                    ApiError::invalid(
                        &format!("{at}.function.arguments"),
                        format!("`{at}.function.arguments` is not valid JSON: {e}"),
                    )
                })?,
                Some(other) => other.clone(),
            };
            Ok(serde_json::json!({
                "id": id, "type": "function",
                "function": {"name": name, "arguments": arguments},
            }))
        })
        .collect()
}

/// One entry of `messages`: a role, its content (a string or an array of text parts), and for
/// tool calling an assistant's `tool_calls` or a tool's `tool_call_id`.
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
    let mut message = ChatMessage::new(role, content_text(&param, obj.get("content"))?);
    match obj.get("tool_calls").filter(|v| !v.is_null()) {
        Some(calls) if message.role == "assistant" => {
            message.tool_calls = Some(tool_calls(&param, calls)?)
        }
        Some(_) => {
            return Err(ApiError::invalid(
                &format!("{param}.tool_calls"),
                "only assistant messages carry `tool_calls`",
            ))
        }
        None => {}
    }
    if message.role == "tool" {
        let id = obj
            .get("tool_call_id")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ApiError::invalid(
                    &format!("{param}.tool_call_id"),
                    format!("`{param}.tool_call_id` is required in a tool message"),
                )
            })?;
        message.tool_call_id = Some(id.to_string());
    }
    if let Some(name) = obj.get("name").and_then(Value::as_str) {
        message.name = Some(name.to_string());
    }
    Ok(message)
}

/// Every `tool` message answers a call an earlier assistant message made; its `name` is the
/// called function's when the client left it out. A tool message that answers no call is an
/// error: its index, and the id it answers.
pub(crate) fn link_tool_results(messages: &mut [ChatMessage]) -> Result<(), (usize, String)> {
    let mut calls: Vec<(String, String)> = Vec::new();
    for (i, message) in messages.iter_mut().enumerate() {
        for call in message.tool_calls.iter().flatten() {
            let id = call["id"].as_str().unwrap_or_default().to_string();
            let name = call["function"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            calls.push((id, name));
        }
        if let Some(id) = &message.tool_call_id {
            let Some((_, name)) = calls.iter().find(|(call, _)| call == id) else {
                return Err((i, id.clone()));
            };
            message.name.get_or_insert_with(|| name.clone());
        }
    }
    Ok(())
}

/// Chat's `messages`.
pub(crate) fn chat_messages(body: &JsonBody) -> Result<Vec<ChatMessage>, ApiError> {
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
    let mut messages = items
        .iter()
        .enumerate()
        .map(|(i, m)| chat_message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    link_tool_results(&mut messages).map_err(|(i, id)| {
        ApiError::invalid(
            &format!("messages[{i}].tool_call_id"),
            format!("no earlier assistant message made a tool call with id `{id}`"),
        )
    })?;
    Ok(messages)
}

/// For a template that does not render tools: the tools described in the system message, and
/// earlier calls and their results written into the messages' text, in `format`'s words.
fn describe_tools_in_messages(
    messages: &mut Vec<ChatMessage>,
    tools: &ToolRequest,
    format: ToolCallFormat,
) {
    let mut written: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let mut after_result = false;
    for mut message in messages.drain(..) {
        for call in message.tool_calls.take().into_iter().flatten() {
            let name = call["function"]["name"].as_str().unwrap_or_default();
            let text = format.call_text(name, &call["function"]["arguments"]);
            if !message.content.is_empty() {
                message.content.push('\n');
            }
            message.content.push_str(&text);
        }
        if message.role != "tool" {
            after_result = false;
            written.push(message);
            continue;
        }
        let result = format.result_text(&message.content);
        match written.last_mut() {
            // The results of one turn's calls are one user turn (templates such as Gemma's
            // want the turns to alternate).
            Some(last) if after_result => {
                last.content.push('\n');
                last.content.push_str(&result);
            }
            _ => written.push(ChatMessage::new("user", result)),
        }
        after_result = true;
    }
    *messages = written;
    let description = format.system_prompt(&tools.definitions);
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{description}", first.content);
        }
        _ => messages.insert(0, ChatMessage::new("system", description)),
    }
}

/// How `messages` become the prompt text: the tools, the template's extra variables and where
/// the prompt ends.
pub(crate) struct ChatRendering<'a> {
    pub tools: Option<&'a ToolRequest>,
    pub format: ToolCallFormat,
}

/// `chat_template_kwargs` (vLLM's parameter): extra template variables, such as Qwen3's
/// `enable_thinking`; the ones minserve sets from the request are refused.
fn template_kwargs(body: &JsonBody) -> Result<Option<&Map<String, Value>>, ApiError> {
    let Some(v) = body.get("chat_template_kwargs") else {
        return Ok(None);
    };
    let kwargs = v
        .as_object()
        .ok_or_else(|| wrong_type("chat_template_kwargs", "an object", v))?;
    for reserved in [
        "messages",
        "tools",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
    ] {
        if kwargs.contains_key(reserved) {
            return Err(ApiError::invalid(
                "chat_template_kwargs",
                format!(
                    "`chat_template_kwargs` may not set `{reserved}`: minserve sets it from the \
                     request"
                ),
            ));
        }
    }
    Ok(Some(kwargs))
}

/// The conversation in `messages` (read from `body`'s `messages` or the Responses API's
/// `input`), rendered with the model's chat template. By default the prompt opens the
/// assistant's turn (`add_generation_prompt`); with `continue_final_message` it ends inside
/// the last (assistant) message instead, for the model to continue it, as Hugging Face's
/// `apply_chat_template` does.
pub(crate) fn render_chat(
    body: &JsonBody,
    mut messages: Vec<ChatMessage>,
    tokenizer: &Tokenizer,
    default_generation_prompt: bool,
    rendering: &ChatRendering,
) -> Result<String, ApiError> {
    let template = tokenizer.chat_template().ok_or_else(|| {
        ApiError::bad_request(
            "This model has no chat template: send a `prompt` to /v1/completions instead.",
        )
    })?;
    let continue_final = body.bool("continue_final_message")?.unwrap_or(false);
    let add_generation_prompt = body
        .bool("add_generation_prompt")?
        .unwrap_or(default_generation_prompt && !continue_final);
    if continue_final && add_generation_prompt {
        return Err(ApiError::invalid(
            "continue_final_message",
            "`continue_final_message` continues the last message: it cannot be combined with \
             `add_generation_prompt`",
        ));
    }
    let final_text = messages
        .last()
        .map(|m| m.content.clone())
        .unwrap_or_default();
    if continue_final
        && (final_text.trim().is_empty() || messages.last().is_some_and(|m| m.role != "assistant"))
    {
        return Err(ApiError::invalid(
            "continue_final_message",
            "`continue_final_message` needs a last message from the assistant with text to \
             continue",
        ));
    }
    let tools = rendering.tools;
    if let Some(tools) = tools.filter(|_| !template.renders_tools()) {
        describe_tools_in_messages(&mut messages, tools, rendering.format);
    }
    let options = RenderOptions {
        add_generation_prompt,
        tools: tools
            .filter(|_| template.renders_tools())
            .map(|t| &t.definitions),
        extra: template_kwargs(body)?,
    };
    let text = template.render_with(&messages, &options).map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("could not apply the chat template: {e}"),
        )
    })?;
    if continue_final {
        // Cut what the template writes after the last message (its end-of-turn marker).
        let final_text = final_text.trim();
        let end = text.rfind(final_text).ok_or_else(|| {
            ApiError::invalid(
                "continue_final_message",
                "the chat template does not write the last message's text as it is; it cannot \
                 be continued",
            )
        })?;
        return Ok(text[..end + final_text.len()].to_string());
    }
    Ok(text)
}

/// Chat's `prediction` (OpenAI's predicted outputs: `{"type": "content", "content": text or
/// text parts}`), tokenized as the output would be: the engine drafts from it
/// (`minserve_core::speculative`). Empty when absent or empty.
pub(crate) fn prediction_tokens(
    body: &JsonBody,
    tokenizer: &Tokenizer,
) -> Result<Vec<u32>, ApiError> {
    let prediction = match body.get("prediction") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(p @ Value::Object(_)) => p,
        Some(other) => {
            return Err(wrong_type(
                "prediction",
                "an object like {\"type\": \"content\", \"content\": \"...\"}",
                other,
            ))
        }
    };
    match prediction.get("type").and_then(Value::as_str) {
        Some("content") => {}
        _ => return Err(ApiError::invalid(
            "prediction.type",
            "`prediction.type` must be \"content\" (the only kind of prediction OpenAI defines)",
        )),
    }
    if prediction.get("content").is_none() {
        return Err(ApiError::invalid(
            "prediction.content",
            "`prediction` needs a `content`: the text the output is expected to repeat",
        ));
    }
    let text = content_text("prediction", prediction.get("content"))?;
    let tokens = tokenizer.encode(&text, false).map_err(|e| {
        ApiError::invalid(
            "prediction.content",
            format!("could not tokenize the prediction: {e}"),
        )
    })?;
    at_most("prediction", "tokens", tokens.len(), MAX_PREDICTION_TOKENS)?;
    Ok(tokens)
}

/// The conversation in `messages`, rendered and tokenized, ready for the assistant's turn.
pub(crate) fn chat_prompt(
    body: &JsonBody,
    messages: Vec<ChatMessage>,
    tokenizer: &Tokenizer,
    rendering: &ChatRendering,
) -> Result<Prompt, ApiError> {
    let text = render_chat(body, messages, tokenizer, true, rendering)?;
    // The template writes any BOS itself.
    let tokens = tokenizer.encode(&text, false).map_err(|e| {
        ApiError::invalid("messages", format!("could not tokenize the messages: {e}"))
    })?;
    Ok(Prompt {
        tokens,
        text: Some(text),
    })
}
