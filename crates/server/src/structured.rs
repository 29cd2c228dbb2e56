//! Structured outputs: chat's `response_format` and the Responses API's `text.format`
//! (OpenAI), and `structured_outputs` on chat and completions (vLLM's extra parameter: `json`,
//! `regex`, `choice` or `grammar`), read and compiled
//! into a grammar the engine follows token by token (`crates/grammar`). Everything that
//! cannot be followed is a 400 here, before the request is queued.

use std::sync::Arc;

use minserve_core::constraint::ConstraintFactory;
use minserve_grammar::Grammar;
use serde_json::Value;

use crate::error::ApiError;
use crate::generation_api::GenerationApi;
use crate::json_body::{wrong_type, JsonBody};
use crate::models::ServedModel;

/// The grammar `body` asks for, and the field that asked.
pub(crate) fn requested_grammar(
    body: &JsonBody,
    api: GenerationApi,
) -> Result<Option<(Grammar, &'static str)>, ApiError> {
    if api == GenerationApi::Responses {
        return Ok(text_format(body)?.map(|g| (g, "text.format")));
    }
    let from_response_format = match body.get("response_format") {
        Some(format) if api == GenerationApi::Chat => response_format(format)?,
        _ => None,
    };
    let from_structured_outputs = match body.get("structured_outputs") {
        Some(so) => Some(structured_outputs(so)?),
        None => None,
    };
    match (from_response_format, from_structured_outputs) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "structured_outputs",
            "send either `response_format` or `structured_outputs`, not both",
        )),
        (Some(g), None) => Ok(Some((g, "response_format"))),
        (None, Some(g)) => Ok(Some(g)),
        (None, None) => Ok(None),
    }
}

/// The grammar `body` asks for, compiled for `model`'s vocabulary.
pub(crate) fn compiled_grammar(
    body: &JsonBody,
    api: GenerationApi,
    model: &ServedModel,
) -> Result<Option<Arc<dyn ConstraintFactory>>, ApiError> {
    let Some((grammar, param)) = requested_grammar(body, api)? else {
        return Ok(None);
    };
    compile(&grammar, param, model).map(Some)
}

/// `grammar` compiled for `model`; a grammar it cannot follow is a 400 naming `param`.
pub(crate) fn compile(
    grammar: &Grammar,
    param: &str,
    model: &ServedModel,
) -> Result<Arc<dyn ConstraintFactory>, ApiError> {
    let compiler = model.grammars().map_err(|e| {
        ApiError::invalid(
            param,
            format!("structured outputs are not available for this model: {e}"),
        )
    })?;
    compiler
        .compile(grammar)
        .map_err(|e| ApiError::invalid(param, format!("`{param}` cannot be used: {e}")))
}

/// OpenAI's chat `response_format`: `text` (no grammar), `json_object` or `json_schema`, the
/// schema under `json_schema`.
fn response_format(format: &Value) -> Result<Option<Grammar>, ApiError> {
    let spec = match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            let spec = format.get("json_schema").ok_or_else(|| {
                ApiError::invalid(
                    "response_format.json_schema",
                    "`response_format.json_schema` is required with type `json_schema`",
                )
            })?;
            if !spec.is_object() {
                return Err(wrong_type("response_format.json_schema", "an object", spec));
            }
            Some(spec)
        }
        _ => None,
    };
    output_format(format, "response_format", spec)
}

/// The Responses API's `text`: `format` as chat's `response_format` but with the schema's
/// fields beside `type`; `verbosity` is refused as chat's is.
fn text_format(body: &JsonBody) -> Result<Option<Grammar>, ApiError> {
    let Some(text) = body.get("text") else {
        return Ok(None);
    };
    let config = text
        .as_object()
        .ok_or_else(|| wrong_type("text", "an object", text))?;
    for (key, value) in config.iter().filter(|(_, v)| !v.is_null()) {
        match key.as_str() {
            "format" => {}
            "verbosity" if value.as_str() == Some("medium") => {}
            other => {
                return Err(ApiError::invalid(
                    &format!("text.{other}"),
                    format!(
                        "`text.{other}` is not supported: only `text.format` is (and \
                         `verbosity: medium`, the default)"
                    ),
                ))
            }
        }
    }
    match config.get("format").filter(|f| !f.is_null()) {
        None => Ok(None),
        Some(format) => output_format(format, "text.format", Some(format)),
    }
}

/// A format object of type `text` (no grammar), `json_object` or `json_schema`; `spec` holds
/// the `schema` of a `json_schema` one.
fn output_format(
    format: &Value,
    param: &str,
    spec: Option<&Value>,
) -> Result<Option<Grammar>, ApiError> {
    let kind = format
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| wrong_type(param, "an object with a `type`", format))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Grammar::JsonSchema(
            serde_json::json!({"type": "object"}),
        ))),
        "json_schema" => {
            // `strict` false would let OpenAI stray from the schema; following it exactly is
            // within what it allows. No `schema` means any JSON object, as in OpenAI's API.
            let schema = match spec.and_then(|s| s.get("schema")) {
                None | Some(Value::Null) => serde_json::json!({"type": "object"}),
                Some(schema) => schema.clone(),
            };
            Ok(Some(Grammar::JsonSchema(schema)))
        }
        other => Err(ApiError::invalid(
            &format!("{param}.type"),
            format!("`{param}.type` must be `text`, `json_object` or `json_schema`, got {other:?}"),
        )),
    }
}

/// The string `value` of field `param`.
fn text(value: &Value, param: &str) -> Result<String, ApiError> {
    value
        .as_str()
        .map(String::from)
        .ok_or_else(|| wrong_type(param, "a string", value))
}

/// vLLM's `structured_outputs`: exactly one of `json` (a schema, as an object or a string),
/// `regex`, `choice`, `grammar` (Lark) or `json_object: true`. Its other options are refused
/// by name: minserve's JSON is always without free whitespace, and it has no fallback.
fn structured_outputs(so: &Value) -> Result<(Grammar, &'static str), ApiError> {
    let fields = so
        .as_object()
        .ok_or_else(|| wrong_type("structured_outputs", "an object", so))?;
    let mut found = Vec::new();
    for (key, value) in fields.iter().filter(|(_, v)| !v.is_null()) {
        let grammar = match key.as_str() {
            "json" => {
                let schema = match value {
                    Value::String(text) => serde_json::from_str(text).map_err(|e| {
                        ApiError::invalid(
                            "structured_outputs.json",
                            format!("`structured_outputs.json` is not valid JSON: {e}"),
                        )
                    })?,
                    other => other.clone(),
                };
                (Grammar::JsonSchema(schema), "structured_outputs.json")
            }
            "regex" => (
                Grammar::Regex(text(value, "structured_outputs.regex")?),
                "structured_outputs.regex",
            ),
            "choice" => {
                let expected = "an array of strings";
                let items = value
                    .as_array()
                    .ok_or_else(|| wrong_type("structured_outputs.choice", expected, value))?;
                let choices = items
                    .iter()
                    .map(|c| {
                        c.as_str()
                            .map(String::from)
                            .ok_or_else(|| wrong_type("structured_outputs.choice", expected, c))
                    })
                    .collect::<Result<_, _>>()?;
                (Grammar::Choice(choices), "structured_outputs.choice")
            }
            "grammar" => (
                Grammar::Lark(text(value, "structured_outputs.grammar")?),
                "structured_outputs.grammar",
            ),
            "json_object" if value == &Value::Bool(true) => (
                Grammar::JsonSchema(serde_json::json!({"type": "object"})),
                "structured_outputs.json_object",
            ),
            "json_object" => continue,
            // Already how minserve writes JSON.
            "disable_any_whitespace" if value == &Value::Bool(true) => continue,
            other => {
                return Err(ApiError::invalid(
                    &format!("structured_outputs.{other}"),
                    format!(
                        "`structured_outputs.{other}` is not supported; send one of `json`, \
                         `regex`, `choice`, `grammar` or `json_object`"
                    ),
                ))
            }
        };
        found.push(grammar);
    }
    match found.len() {
        1 => Ok(found.pop().expect("one")),
        0 => Err(ApiError::invalid(
            "structured_outputs",
            "`structured_outputs` needs one of `json`, `regex`, `choice`, `grammar` or \
             `json_object`",
        )),
        _ => Err(ApiError::invalid(
            "structured_outputs",
            "`structured_outputs` takes one of `json`, `regex`, `choice`, `grammar` or \
             `json_object`, not several",
        )),
    }
}
