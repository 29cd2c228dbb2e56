//! A request body as a JSON object, with typed getters whose errors name the parameter.
//!
//! Only shape and type are checked here ("`n` must be an integer, got a string"); what the
//! values mean is `params.rs`'s and `prompt.rs`'s business. `null` counts as absent, as the
//! OpenAI SDKs send it for unset fields in some versions.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// A request body that parsed as a JSON object.
pub(crate) struct JsonBody(Map<String, Value>);

/// How an error message names the JSON type a value has.
fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// 400: parameter `name` is not `expected`.
pub(crate) fn wrong_type(name: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        name,
        format!("`{name}` must be {expected}, got {}", json_type_name(got)),
    )
}

impl JsonBody {
    /// The body as an object, or 413 (over `max_body_bytes`) or 400 (unreadable, malformed,
    /// not an object).
    pub fn parse(
        body: Result<Bytes, BytesRejection>,
        max_body_bytes: usize,
    ) -> Result<Self, ApiError> {
        let bytes = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::body_too_large(max_body_bytes)
            } else {
                ApiError::bad_request(format!("Could not read the request body: {rejection}"))
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(format!("Malformed JSON in the request body: {e}"))
        })?;
        match value {
            Value::Object(map) => Ok(Self(map)),
            other => Err(ApiError::bad_request(format!(
                "The request body must be a JSON object, got {}",
                json_type_name(&other)
            ))),
        }
    }

    /// Every field as sent, `null`s included.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value of `name`, unless absent or `null`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn f32(&self, name: &str) -> Result<Option<f32>, ApiError> {
        self.get(name)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| wrong_type(name, "a number", v))
            })
            .transpose()
    }

    pub fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| as_int(v).ok_or_else(|| wrong_type(name, "an integer", v)))
            .transpose()
    }

    /// A non-negative integer.
    pub fn count(&self, name: &str) -> Result<Option<usize>, ApiError> {
        match self.int(name)? {
            Some(x) if x < 0 => Err(ApiError::invalid(
                name,
                format!("`{name}` must be at least 0, got {x}"),
            )),
            x => Ok(x.map(|x| x as usize)),
        }
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.get(name)
            .map(|v| v.as_bool().ok_or_else(|| wrong_type(name, "a boolean", v)))
            .transpose()
    }

    pub fn str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        self.get(name)
            .map(|v| v.as_str().ok_or_else(|| wrong_type(name, "a string", v)))
            .transpose()
    }
}

/// An integer, also when written as `3.0`.
pub(crate) fn as_int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|x| x.fract() == 0.0 && x.abs() < 9e15)
            .map(|x| x as i64)
    })
}

/// A token id of parameter `name`, within the model's vocabulary.
pub(crate) fn token_id(v: &Value, name: &str, vocab_size: usize) -> Result<u32, ApiError> {
    let id = as_int(v).ok_or_else(|| wrong_type(name, "an array of token ids (integers)", v))?;
    if id < 0 || id as u64 >= vocab_size as u64 {
        return Err(ApiError::invalid(
            name,
            format!("token id {id} in `{name}` is outside the vocabulary of {vocab_size}"),
        ));
    }
    Ok(id as u32)
}

/// The token ids of array parameter `name`.
pub(crate) fn token_ids(
    items: &[Value],
    name: &str,
    vocab_size: usize,
) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| token_id(v, name, vocab_size))
        .collect()
}
