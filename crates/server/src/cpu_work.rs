//! CPU-heavy request work, off the threads that answer HTTP.
//!
//! Parsing a large body, rendering the chat template, tokenizing a prompt of megabytes and
//! serializing a large response take from milliseconds to seconds of CPU. Done inside an async
//! handler, they hold one of tokio's few worker threads the whole time: on two cores, two
//! clients posting maximal prompts stall every other request, `/health` included. So this work
//! runs on tokio's blocking threads instead, and at most [`ServerOptions::cpu_work_threads`]
//! pieces at once (a fair semaphore): requests beyond that wait their turn in arrival order
//! rather than being refused, as a request to vLLM waits for its tokenizer. The async workers
//! only move bytes and run the cheap parts, so `/health` and `/metrics` answer while the
//! tokenizing threads are busy. Small work (a body under [`INLINE_WORK_BYTES`], the usual
//! case) still runs inline: it takes microseconds, and it must not queue behind large work.
//!
//! [`ServerOptions::cpu_work_threads`]: crate::ServerOptions::cpu_work_threads

use std::sync::Arc;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// Work on less than this many bytes runs inline: tens of microseconds at most.
pub(crate) const INLINE_WORK_BYTES: usize = 16 << 10;

/// The permits for CPU-heavy request work.
pub(crate) struct CpuWork {
    permits: Arc<Semaphore>,
}

impl CpuWork {
    pub fn new(threads: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(threads.max(1))),
        }
    }

    /// Runs `work`, of about `size` bytes of input or output: a small one at once, on the
    /// calling worker (a thread hop would cost more, and it must not queue behind large ones),
    /// a large one on a blocking thread once a permit is free. A panic in it is a 500.
    pub async fn run<T, W>(&self, size: usize, work: W) -> Result<T, ApiError>
    where
        T: Send + 'static,
        W: FnOnce() -> T + Send + 'static,
    {
        if size < INLINE_WORK_BYTES {
            return Ok(work());
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the CPU work pool is closed"))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| {
            tracing::error!(target: "minserve_server", "request work panicked: {e}");
            ApiError::internal("Internal server error while handling this request.")
        })
    }
}

/// `value` serialized, for [`json_response`]: done inside [`CpuWork::run`] when it may be
/// large (axum's `Json` would serialize it on the async worker).
pub(crate) fn serialize(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A 200 with a JSON body already serialized by [`serialize`].
pub(crate) fn json_response(body: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}
