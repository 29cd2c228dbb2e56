//! The Responses API's `instructions` and `input` as the chat messages a template renders.

use minserve_tokenizer::ChatMessage;
use serde_json::{json, Map, Value};

use super::store::{ResponseStore, MAX_BYTES};
use crate::error::ApiError;
use crate::json_body::{wrong_type, JsonBody};
use crate::prompt::link_tool_results;

/// The messages to render, and the conversation to keep if the response is stored (the same,
/// without `instructions`): the stored conversation of `previous_response_id`, if any, then
/// `input`: a string (one user message) or a list of items: messages (`{"role", "content"}`,
/// `type: "message"` or none; the content a string or text parts), the model's earlier
/// `function_call`s (joined to the assistant turn they belong to) and their
/// `function_call_output`s (tool messages). `instructions` is a system message first.
pub(crate) fn input_messages(
    body: &JsonBody,
    store: &ResponseStore,
) -> Result<(Vec<ChatMessage>, Vec<ChatMessage>), ApiError> {
    let mut conversation = Conversation::default();
    if let Some(id) = body.str("previous_response_id")? {
        let previous = store.get(id).ok_or_else(|| {
            ApiError::invalid(
                "previous_response_id",
                format!(
                    "no response `{id}` is stored: minserve keeps finished responses in memory \
                     (the newest, up to {} MiB of text) unless they were sent with `store: \
                     false`, and none across restarts",
                    MAX_BYTES >> 20
                ),
            )
        })?;
        for message in previous.iter() {
            conversation.push(None, message.clone());
        }
    }
    match body.get("input") {
        None => return Err(ApiError::invalid("input", "`input` is required")),
        Some(Value::String(text)) => conversation.push(Some(0), ChatMessage::new("user", text)),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid("input", "`input` must not be empty"))
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                conversation.item(i, item)?;
            }
        }
        Some(other) => {
            return Err(wrong_type(
                "input",
                "a string or an array of input items",
                other,
            ))
        }
    }
    let Conversation { mut messages, from } = conversation;
    link_tool_results(&mut messages).map_err(|(m, id)| {
        let at = format!("input[{}].call_id", from[m].unwrap_or(0));
        ApiError::invalid(
            &at,
            format!("no earlier `function_call` item has the call_id `{id}`"),
        )
    })?;
    let history = messages.clone();
    if let Some(instructions) = body.str("instructions")? {
        // One system message: many templates take only one.
        match messages.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{instructions}\n\n{}", first.content);
            }
            _ => messages.insert(0, ChatMessage::new("system", instructions)),
        }
    }
    Ok((messages, history))
}

/// The messages so far, and the input item each came from (none for `instructions`).
#[derive(Default)]
struct Conversation {
    messages: Vec<ChatMessage>,
    from: Vec<Option<usize>>,
}

impl Conversation {
    fn push(&mut self, item: Option<usize>, message: ChatMessage) {
        // Consecutive system (or developer) messages are one: many templates take only one.
        if let Some(last) = self.messages.last_mut() {
            if last.role == "system" && message.role == "system" {
                last.content = format!("{}\n\n{}", last.content, message.content);
                return;
            }
        }
        self.messages.push(message);
        self.from.push(item);
    }

    /// Input item `i`.
    fn item(&mut self, i: usize, item: &Value) -> Result<(), ApiError> {
        let at = format!("input[{i}]");
        let obj = item
            .as_object()
            .ok_or_else(|| wrong_type(&at, "an input item (an object)", item))?;
        match obj.get("type").and_then(Value::as_str) {
            None | Some("message") => {
                let role = match obj.get("role").and_then(Value::as_str) {
                    Some(role @ ("user" | "assistant" | "system")) => role,
                    Some("developer") => "system",
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("{at}.role"),
                            format!(
                                "`{at}.role` must be `user`, `assistant`, `system` or `developer`"
                            ),
                        ))
                    }
                };
                let content = text_of(obj.get("content"), &format!("{at}.content"))?;
                self.push(Some(i), ChatMessage::new(role, content));
            }
            Some("function_call") => {
                let call = json!({
                    "id": required_str(obj, &at, "call_id")?,
                    "type": "function",
                    "function": {
                        "name": required_str(obj, &at, "name")?,
                        "arguments": arguments(obj, &at)?,
                    },
                });
                // Calls belong to the assistant turn they follow, or open one.
                match self.messages.last_mut() {
                    Some(last) if last.role == "assistant" => {
                        last.tool_calls.get_or_insert_with(Vec::new).push(call)
                    }
                    _ => {
                        let mut turn = ChatMessage::new("assistant", "");
                        turn.tool_calls = Some(vec![call]);
                        self.push(Some(i), turn);
                    }
                }
            }
            Some("function_call_output") => {
                let mut result =
                    ChatMessage::new("tool", text_of(obj.get("output"), &format!("{at}.output"))?);
                result.tool_call_id = Some(required_str(obj, &at, "call_id")?.to_string());
                self.push(Some(i), result);
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    &format!("{at}.type"),
                    format!(
                        "input items of type `{other}` are not supported: minserve reads \
                         `message`, `function_call` and `function_call_output` items"
                    ),
                ))
            }
        }
        Ok(())
    }
}

/// Field `name` of the item at `at`, a non-empty string.
fn required_str<'a>(
    obj: &'a Map<String, Value>,
    at: &str,
    name: &str,
) -> Result<&'a str, ApiError> {
    obj.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                &format!("{at}.{name}"),
                format!("`{at}.{name}` (a string) is required"),
            )
        })
}

/// A `function_call`'s `arguments`, JSON text, as the object templates write with `tojson`.
fn arguments(obj: &Map<String, Value>, at: &str) -> Result<Value, ApiError> {
    let param = format!("{at}.arguments");
    let text = required_str(obj, at, "arguments")?;
    match serde_json::from_str(text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(ApiError::invalid(
            &param,
            format!("`{param}` must be a JSON object"),
        )),
        Err(e) => Err(ApiError::invalid(
            &param,
            format!("`{param}` is not valid JSON: {e}"),
        )),
    }
}

/// A message's `content` or a call's `output`: a string, or text parts (`input_text`,
/// `output_text`, or a refusal) joined.
fn text_of(content: Option<&Value>, param: &str) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Err(ApiError::invalid(param, format!("`{param}` is required"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                let text = match kind {
                    Some("input_text" | "output_text" | "text") => part.get("text"),
                    Some("refusal") => part.get("refusal"),
                    _ => None,
                };
                match text.and_then(Value::as_str) {
                    Some(text) => texts.push(text),
                    None => {
                        return Err(ApiError::invalid(
                            &format!("{param}[{j}]"),
                            format!(
                                "`{param}[{j}]` is not a text part: only text \
                                 (`{{\"type\": \"input_text\", \"text\": ...}}`) is supported"
                            ),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(other) => Err(wrong_type(
            param,
            "a string or an array of text parts",
            other,
        )),
    }
}
