//! Tool calling, the request side: `tools`, `tool_choice` and `parallel_tool_calls` read and
//! checked, and the grammar that enforces `required` and a named choice. How calls are
//! written in the model's output and read back is `tool_format.rs`.

use minserve_grammar::Grammar;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::json_body::{wrong_type, JsonBody};
use crate::models::ServedModel;
use crate::structured::compile;
use crate::tool_format::{Tool, ToolCallFormat};

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolChoice {
    /// Text only; calls in the output are not parsed.
    None,
    /// The model decides; calls in its output are parsed.
    Auto,
    /// At least one call, enforced by a grammar.
    Required,
    /// A call of this function, enforced by a grammar.
    Named(String),
}

/// The tools of a chat request.
#[derive(Debug, Clone)]
pub(crate) struct ToolRequest {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// More than one call per turn (OpenAI's default: true).
    pub parallel: bool,
    /// `tools` as sent, for the chat template.
    pub definitions: Value,
}

impl ToolRequest {
    /// Whether the output is searched for calls.
    pub fn parses_calls(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The grammar that forces a call, for `required` and a named choice.
    pub fn forced_call_grammar(&self, format: ToolCallFormat) -> Option<Grammar> {
        let callable: Vec<&Tool> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
        };
        let parallel = self.parallel && self.choice == ToolChoice::Required;
        Some(format.call_grammar(&callable, parallel))
    }
}

/// A function name as OpenAI allows it: 1 to 64 of `a-z A-Z 0-9 _ -`.
fn valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `tools`, `tool_choice` and `parallel_tool_calls` of a chat request; `None` without tools.
/// Each `parameters` schema is compiled for `model`, so that a malformed one is refused now.
pub(crate) fn tool_request(
    body: &JsonBody,
    model: &ServedModel,
) -> Result<Option<ToolRequest>, ApiError> {
    let choice = tool_choice(body)?;
    let parallel = body.bool("parallel_tool_calls")?.unwrap_or(true);
    let definitions = match body.get("tools") {
        None => Value::Array(Vec::new()),
        Some(v @ Value::Array(_)) => v.clone(),
        Some(other) => return Err(wrong_type("tools", "an array of tools", other)),
    };
    let items = definitions.as_array().expect("checked above");
    if items.is_empty() {
        return match choice {
            None | Some(ToolChoice::None | ToolChoice::Auto) => Ok(None),
            Some(_) => Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` asks for a call but `tools` is empty or missing",
            )),
        };
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let tool = tool(i, item)?;
        if tools.iter().any(|t| t.name == tool.name) {
            return Err(ApiError::invalid(
                &format!("tools[{i}].function.name"),
                format!("two tools are named `{}`", tool.name),
            ));
        }
        let param = format!("tools[{i}].function.parameters");
        compile(&Grammar::JsonSchema(tool.parameters.clone()), &param, model)?;
        tools.push(tool);
    }
    let choice = choice.unwrap_or(ToolChoice::Auto);
    if let ToolChoice::Named(name) = &choice {
        if !tools.iter().any(|t| &t.name == name) {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("`tool_choice` names `{name}`, which is not in `tools`"),
            ));
        }
    }
    Ok(Some(ToolRequest {
        tools,
        choice,
        parallel,
        definitions,
    }))
}

/// Entry `i` of `tools`: `{"type": "function", "function": {"name", "description"?,
/// "parameters"?, "strict"?}}`.
fn tool(i: usize, item: &Value) -> Result<Tool, ApiError> {
    let param = format!("tools[{i}]");
    if item.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid(
            &format!("{param}.type"),
            format!("`{param}.type` must be `function`"),
        ));
    }
    let function = item
        .get("function")
        .filter(|f| f.is_object())
        .ok_or_else(|| {
            ApiError::invalid(
                &format!("{param}.function"),
                format!("`{param}.function` must be an object"),
            )
        })?;
    let name = function.get("name").and_then(Value::as_str).unwrap_or("");
    if !valid_function_name(name) {
        return Err(ApiError::invalid(
            &format!("{param}.function.name"),
            format!(
                "`{param}.function.name` must be 1 to 64 letters, digits, `_` or `-`, got {name:?}"
            ),
        ));
    }
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(schema @ Value::Object(_)) => schema.clone(),
        Some(other) => {
            return Err(wrong_type(
                &format!("{param}.function.parameters"),
                "a JSON schema object",
                other,
            ))
        }
    };
    Ok(Tool {
        name: name.to_string(),
        parameters,
    })
}

/// `tool_choice`: `none`, `auto`, `required`, or `{"type": "function", "function": {"name"}}`.
fn tool_choice(body: &JsonBody) -> Result<Option<ToolChoice>, ApiError> {
    let Some(v) = body.get("tool_choice") else {
        return Ok(None);
    };
    let choice = match v {
        Value::String(s) if s == "none" => ToolChoice::None,
        Value::String(s) if s == "auto" => ToolChoice::Auto,
        Value::String(s) if s == "required" => ToolChoice::Required,
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid("tool_choice", "`tool_choice.function.name` is required")
                })?;
            ToolChoice::Named(name.to_string())
        }
        other => {
            return Err(ApiError::invalid(
                "tool_choice",
                format!(
                    "`tool_choice` must be `none`, `auto`, `required` or {{\"type\": \"function\", \
                     \"function\": {{\"name\": ...}}}}, got {other}"
                ),
            ))
        }
    };
    Ok(Some(choice))
}
