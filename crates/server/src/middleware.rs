//! The layers around every route: the API key check, a JSON body for every error, the
//! request log, and the in-flight count that shutdown waits on. [`with_layers`](crate::with_layers)
//! stacks them. The routes that take a JSON body also get [`require_json_content_type`].
//!
//! A request is logged once. Most are logged here when the handler returns; a generation
//! request whose response carries [`LoggedByHandler`] writes its own line when it ends, since
//! its token counts are known only then (see `telemetry.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::caller::{CallerTenant, SESSION_HEADER};
use crate::error::ApiError;
use crate::routes::dashboard;
use crate::state::AppState;

/// Routes that answer without the API key: probes, the API description, and the dashboard's
/// page (its data, `/dashboard/events`, needs the key).
fn is_public_route(path: &str) -> bool {
    matches!(path, "/health" | "/metrics" | "/get_load" | "/openapi.json")
        || path.starts_with("/health/")
        || dashboard::is_public_asset(path)
}

/// Constant-time comparison, so the key cannot be guessed byte by byte from timings.
fn keys_match(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The credentials of an `Authorization: Bearer <token>` header. The scheme is matched in any
/// case (RFC 7235: `bearer` and `BEARER` are the same scheme).
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// 401 unless the request carries `Authorization: Bearer <key>` with the server's key or a
/// tenant's (when the server has keys). A tenant's key marks the request as the tenant's
/// ([`CallerTenant`]).
pub(crate) async fn require_api_key(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let tenants = state.api_keys();
    if (state.options.api_key.is_some() || tenants.is_some())
        && !is_public_route(request.uri().path())
    {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .map(str::to_string);
        let tenant = given
            .as_deref()
            .and_then(|g| tenants.as_ref()?.tenant(g).cloned());
        match tenant {
            Some(tenant) => {
                request.extensions_mut().insert(CallerTenant(tenant));
            }
            None => {
                let server_key = state.options.api_key.as_deref().is_some_and(|key| {
                    given
                        .as_deref()
                        .is_some_and(|g| keys_match(g.as_bytes(), key.as_bytes()))
                });
                if !server_key {
                    return ApiError::unauthorized().into_response();
                }
            }
        }
    }
    next.run(request).await
}

/// 415 unless the body is declared `application/json`. Besides telling a client that sent the
/// wrong thing, this keeps web pages from driving the API: a cross-origin POST with any other
/// content type (`text/plain`, a form, none) is a "simple" request that browsers send without
/// asking the server first (no CORS preflight), while `application/json` needs the preflight,
/// which only origins allowed by `--allowed-origins` pass.
pub(crate) async fn require_json_content_type(request: Request, next: Next) -> Response {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !content_type.is_some_and(is_json_media_type) {
        let got = match content_type {
            Some(t) => format!("`{t}`"),
            None => "none".to_string(),
        };
        return ApiError::new(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!(
                "The request body must be JSON, sent with `Content-Type: application/json` \
                 (got {got})."
            ),
        )
        .code("unsupported_media_type")
        .into_response();
    }
    next.run(request).await
}

/// The CORS layer for `allowed_origins` (see [`ServerOptions::allowed_origins`]); `None` when
/// no origin is allowed, so that no CORS header is ever sent. Origins that are not valid header
/// values are skipped (the CLI refuses them before).
///
/// [`ServerOptions::allowed_origins`]: crate::ServerOptions::allowed_origins
pub(crate) fn cors(allowed_origins: &[String]) -> Option<CorsLayer> {
    if allowed_origins.is_empty() {
        return None;
    }
    let origins = if allowed_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::HeaderName::from_static(SESSION_HEADER),
            ])
            .expose_headers([header::RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    )
}

/// `application/json`, in any case, with or without parameters (`; charset=utf-8`).
fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// The 500 answered for a handler that panicked; the other requests carry on.
pub(crate) fn panic_response(panic: Box<dyn std::any::Any + Send>) -> Response {
    let detail = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    tracing::error!(target: "minserve_server", "handler panicked: {detail}");
    ApiError::internal("Internal server error while handling this request.").into_response()
}

/// Turns error responses that are not already JSON (wrong method, unknown route, ...) into
/// OpenAI's error shape.
pub(crate) async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let (parts, _) = response.into_parts();
        let mut fresh = ApiError::for_status(status).into_response();
        for (name, value) in parts.headers.iter() {
            if name == header::ALLOW || name == header::RETRY_AFTER {
                fresh.headers_mut().insert(name.clone(), value.clone());
            }
        }
        return fresh;
    }
    response
}

/// Set by a handler whose response logs itself when it ends (generation requests, whose token
/// counts are known only then).
#[derive(Clone, Copy)]
pub(crate) struct LoggedByHandler;

/// Marks `response` as [`LoggedByHandler`].
pub(crate) fn logged_by_handler(mut response: Response) -> Response {
    response.extensions_mut().insert(LoggedByHandler);
    response
}

/// Counts a request in [`AppState::inflight_requests`] for as long as it lives (also when its
/// client goes away and the handler's future is dropped half-way).
struct InFlightRequest(Arc<AppState>);

impl InFlightRequest {
    fn new(state: Arc<AppState>) -> Self {
        state.inflight_requests.fetch_add(1, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        self.0.inflight_requests.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts the request as in flight until its response ends, and logs it unless its handler
/// does ([`LoggedByHandler`]).
pub(crate) async fn log_and_count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let in_flight = InFlightRequest::new(state);
    let response = next.run(request).await;
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    // A stream is still being answered long after its handler returned: it counts until its
    // body ends or the client goes away.
    let response = if is_stream {
        response.map(|body| {
            Body::from_stream(body.into_data_stream().map(move |chunk| {
                let _counted = &in_flight;
                chunk
            }))
        })
    } else {
        drop(in_flight);
        response
    };
    if response.extensions().get::<LoggedByHandler>().is_none() {
        tracing::info!(
            target: "minserve_server",
            "{method} {path} {} latency_ms={:.1}",
            response.status().as_u16(),
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    response
}
