//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use minserve_core::RequestError;

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

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist."),
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

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message).code("internal_error")
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

    /// A default error for a bare status (unknown route, wrong method, ...).
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

    /// Maps an engine rejection; `prompt_param` is `prompt` or `messages`.
    pub fn from_request_error(e: &RequestError, prompt_param: &str) -> Self {
        let param = match e {
            RequestError::EmptyPrompt
            | RequestError::TooLong { .. }
            | RequestError::TokenOutOfRange { .. } => prompt_param.to_string(),
            RequestError::NeverFits { .. } => "max_tokens".to_string(),
            RequestError::InvalidParams(m) => first_word(m),
        };
        Self::invalid(&param, e.to_string())
    }
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
