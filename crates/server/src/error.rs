//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use minserve_core::request::RequestError;

/// An error answered to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 naming the parameter at fault.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).param(param)
    }

    /// 400 with no single parameter at fault.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 413: the body is over `--max-body-bytes`.
    pub fn body_too_large(max_body_bytes: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("The request body is larger than the limit of {max_body_bytes} bytes."),
        )
        .code("request_too_large")
    }

    /// No served model is called `model`; `served` are the names of those that are.
    pub fn model_not_found(model: &str, served: &[&str]) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{model}` does not exist; this server serves: {}.",
                served.join(", ")
            ),
        )
        .param("model")
        .code("model_not_found")
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect or missing API key: send it as `Authorization: Bearer <key>`.",
        )
        .code("invalid_api_key")
    }

    pub fn loading() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "The model is still loading; retry shortly.",
        )
        .code("model_loading");
        e.retry_after = Some(1);
        e
    }

    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "The server is shutting down.",
        )
        .code("shutting_down")
    }

    pub fn queue_full(waiting: usize, max_queue: usize) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "The server is busy: {waiting} sequences would be waiting, more than the \
                 queue limit of {max_queue}; retry later."
            ),
        )
        .code("queue_full");
        e.retry_after = Some(1);
        e
    }

    /// A tenant's limit (`tenants.rs`): retry in `retry_after` seconds.
    pub fn tenant_limit(message: String, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            .code("rate_limit_exceeded");
        e.retry_after = Some(retry_after);
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message).code("internal_error")
    }

    /// The shutdown timeout ended a request that was still running.
    pub fn cut_off_at_shutdown() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "The server shut down before this request finished (its shutdown timeout was \
             reached); the output so far is incomplete.",
        )
        .code("shutdown_timeout")
    }

    /// The client read its stream so slowly that the server stopped buffering for it.
    pub fn client_too_slow(buffered_per_sequence: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "The response was read too slowly: {buffered_per_sequence} events per sequence \
                 were waiting to be sent, the most the server keeps, so the request was \
                 aborted. Read the stream as it arrives."
            ),
        )
        .code("client_too_slow")
    }

    /// The engine thread stopped while a request was still running; `reason` is why, when
    /// known.
    pub fn engine_gone(reason: Option<&str>) -> Self {
        let message = match reason {
            Some(reason) => format!("The engine failed before the request finished: {reason}"),
            None => "The engine stopped before the request finished.".to_string(),
        };
        Self::internal(message).code("engine_failed")
    }

    /// 503 for a request that arrives while the engine is down.
    pub fn engine_unavailable(reason: &str) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!("The engine failed and cannot take requests: {reason}"),
        )
        .code("engine_failed");
        e.retry_after = Some(1);
        e
    }

    /// The shape used for an error both as a body and as an SSE event.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// 404 for a path no route serves, naming it and the API's routes: an SDK pointed here
    /// for an endpoint we do not have (`/v1/embeddings`, `/v1/audio/...`) should say so, not
    /// just "Not found".
    pub fn unknown_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "minserve does not serve {method} {path}. Its API: POST /v1/chat/completions, \
                 /v1/completions, /v1/responses, /tokenize, /detokenize; GET /v1/models, \
                 /health, /metrics, /dashboard; the full list: GET /openapi.json"
            ),
        )
        .code("not_found")
    }

    /// A default error for a bare status (wrong method, too large, ...).
    pub fn for_status(status: StatusCode) -> Self {
        let (kind, code, message) = match status {
            StatusCode::NOT_FOUND => ("invalid_request_error", "not_found", "Not found."),
            StatusCode::METHOD_NOT_ALLOWED => (
                "invalid_request_error",
                "method_not_allowed",
                "Method not allowed on this route.",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => (
                "invalid_request_error",
                "request_too_large",
                "The request body is too large.",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                "invalid_request_error",
                "unsupported_media_type",
                "Unsupported media type.",
            ),
            s if s.is_server_error() => {
                ("server_error", "internal_error", "Internal server error.")
            }
            _ => ("invalid_request_error", "bad_request", "Bad request."),
        };
        Self::new(status, kind, message).code(code)
    }

    /// The client-facing error for a request the engine's limits reject, naming the field at
    /// fault as the client's route calls it.
    pub fn from_request_error(e: &RequestError, fields: RequestFieldNames) -> Self {
        let param = match e {
            RequestError::EmptyPrompt
            | RequestError::TooLong { .. }
            | RequestError::TokenOutOfRange { .. } => fields.prompt.to_string(),
            RequestError::NeverFits { .. } => fields.max_tokens.to_string(),
            RequestError::InvalidParams(m) => first_word(m),
            RequestError::TooManyLogprobs { asked, max } => {
                let name = fields.logprobs;
                return Self::invalid(name, format!("`{name}` must be at most {max}, got {asked}"));
            }
        };
        Self::invalid(&param, e.to_string())
    }
}

/// What a route calls the request fields an engine rejection can be about: chat's prompt is
/// `messages`, its length may be `max_completion_tokens` and its logprobs are `top_logprobs`.
#[derive(Debug, Clone, Copy)]
pub struct RequestFieldNames {
    pub prompt: &'static str,
    pub max_tokens: &'static str,
    pub logprobs: &'static str,
}

/// The parameter a validation message starts with (`"temperature must be ..."`).
pub fn first_word(message: &str) -> String {
    message
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or_default()
        .to_string()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.to_json())).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}
