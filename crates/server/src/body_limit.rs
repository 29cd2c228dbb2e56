//! Request bodies are read whole, up to `--max-body-bytes`, before any route sees them; a body
//! over the limit gets its 413 only after the rest of it was read and thrown away.
//!
//! Why read what is refused: a server that answers early and closes the connection while the
//! client is still sending leaves unread bytes in the socket, and the kernel then resets the
//! connection; the client sees `ECONNRESET` or a broken pipe instead of the 413 (depending on
//! timing, run to run). Discarding the rest costs the server a copy into one reused buffer, and
//! it is bounded: beyond [`MAX_DISCARDED_BYTES`] or [`MAX_DISCARD_TIME`] the server gives up,
//! answers the 413 with `Connection: close` and lets the connection go. A client that announced
//! the body with `Expect: 100-continue` has not sent it yet: it gets the 413 at once.
//!
//! Every later layer and handler (the API key check, the routes) thus gets a body that is
//! complete and in memory, and never answers while the client still sends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use crate::error::ApiError;
use crate::state::AppState;

/// Most bytes of an oversized body read and discarded before the server closes the connection.
pub(crate) const MAX_DISCARDED_BYTES: u64 = 64 << 20;
/// Longest time spent discarding an oversized body (a client sending slowly).
pub(crate) const MAX_DISCARD_TIME: Duration = Duration::from_secs(10);

/// Reads the request's body into memory, or answers 413 for one over the limit (see the module
/// documentation).
pub(crate) async fn read_body_within_limit(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let limit = state.options.max_body_bytes;
    let (parts, body) = request.into_parts();
    let declared = declared_length(&parts.headers);
    if declared.is_some_and(|len| len > limit as u64) && expects_continue(&parts.headers) {
        return ApiError::body_too_large(limit).into_response();
    }
    let mut chunks = body.into_data_stream();
    // Not more up front than a megabyte on a length the client only announced.
    let reserve = declared.unwrap_or(0).min(limit as u64).min(1 << 20);
    let mut buffer = Vec::with_capacity(reserve as usize);
    while let Some(chunk) = chunks.next().await {
        let Ok(chunk) = chunk else {
            return ApiError::bad_request("Could not read the request body.").into_response();
        };
        if buffer.len() + chunk.len() > limit {
            let drained = discard_rest(&mut chunks).await;
            let mut response = ApiError::body_too_large(limit).into_response();
            if !drained {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return response;
        }
        buffer.extend_from_slice(&chunk);
    }
    let request = Request::from_parts(parts, Body::from(Bytes::from(buffer)));
    next.run(request).await
}

/// Reads what is left of a body and drops it; false when it gave up at the byte or time bound.
async fn discard_rest(
    chunks: &mut (impl futures_util::Stream<Item = Result<Bytes, axum::Error>> + Unpin),
) -> bool {
    let started = Instant::now();
    let mut discarded = 0u64;
    loop {
        let left = MAX_DISCARD_TIME.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, chunks.next()).await {
            Ok(Some(Ok(chunk))) => {
                discarded += chunk.len() as u64;
                if discarded > MAX_DISCARDED_BYTES {
                    return false;
                }
            }
            Ok(None) => return true,
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}
