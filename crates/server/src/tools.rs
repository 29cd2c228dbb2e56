//! Tool calling, the request side: `tools`, `tool_choice` and `parallel_tool_calls` read and
//! checked, and the grammar that enforces `required` and a named choice. Chat nests a
//! function under `function` (`{"type": "function", "function": {"name", ...}}`); the
//! Responses API writes it flat (`{"type": "function", "name", ...}`); both become the same
//! [`ToolRequest`]. How calls are
//! written in the model's output and read back is `tool_format.rs`.

use minserve_grammar::Grammar;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::generation_api::GenerationApi;
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
    /// `tools` in chat's shape, for the chat template.
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

/// `tools`, `tool_choice` and `parallel_tool_calls` of a chat or Responses API request; `None`
/// without tools. Each `parameters` schema is compiled for `model`, so that a malformed one is
/// refused now.
pub(crate) fn tool_request(
    body: &JsonBody,
    api: GenerationApi,
    model: &ServedModel,
) -> Result<Option<ToolRequest>, ApiError> {
    let choice = tool_choice(body)?;
    let parallel = body.bool("parallel_tool_calls")?.unwrap_or(true);
    let items: &[Value] = match body.get("tools") {
        None => &[],
        Some(Value::Array(items)) => items,
        Some(other) => return Err(wrong_type("tools", "an array of tools", other)),
    };
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
    let mut definitions = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let (function, at) = tool_function(i, item, api)?;
        let tool = tool(&function, &at)?;
        if tools.iter().any(|t| t.name == tool.name) {
            return Err(ApiError::invalid(
                &format!("{at}.name"),
                format!("two tools are named `{}`", tool.name),
            ));
        }
        let param = format!("{at}.parameters");
        compile(&Grammar::JsonSchema(tool.parameters.clone()), &param, model)?;
        tools.push(tool);
        definitions.push(json!({"type": "function", "function": function}));
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
        definitions: Value::Array(definitions),
    }))
}

/// Entry `i` of `tools`: the function it describes (chat: `{"type": "function", "function":
/// {...}}`, the Responses API: `{"type": "function", ...}`), and where its fields are named in
/// errors.
fn tool_function(
    i: usize,
    item: &Value,
    api: GenerationApi,
) -> Result<(Map<String, Value>, String), ApiError> {
    let param = format!("tools[{i}]");
    if item.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid(
            &format!("{param}.type"),
            format!("`{param}.type` must be `function`: minserve runs no hosted tools"),
        ));
    }
    let (function, at) = match api {
        GenerationApi::Responses => {
            let mut function = item.as_object().cloned().unwrap_or_default();
            function.remove("type");
            (Some(function), param)
        }
        _ => (
            item.get("function").and_then(Value::as_object).cloned(),
            format!("{param}.function"),
        ),
    };
    let function =
        function.ok_or_else(|| ApiError::invalid(&at, format!("`{at}` must be an object")))?;
    Ok((function, at))
}

/// A tool's function, `{"name", "description"?, "parameters"?, "strict"?}`, whose fields are
/// named `{param}.name` etc. in errors.
fn tool(function: &Map<String, Value>, param: &str) -> Result<Tool, ApiError> {
    let name = function.get("name").and_then(Value::as_str).unwrap_or("");
    if !valid_function_name(name) {
        return Err(ApiError::invalid(
            &format!("{param}.name"),
            format!("`{param}.name` must be 1 to 64 letters, digits, `_` or `-`, got {name:?}"),
        ));
    }
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(schema @ Value::Object(_)) => schema.clone(),
        Some(other) => {
            return Err(wrong_type(
                &format!("{param}.parameters"),
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

/// `tool_choice`: `none`, `auto`, `required`, or a function: `{"type": "function", "function":
/// {"name"}}` (chat) or `{"type": "function", "name"}` (the Responses API).
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
                .or_else(|| o.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid("tool_choice", "`tool_choice` must name the function")
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
