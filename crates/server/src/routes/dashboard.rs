//! The live dashboard: `GET /dashboard` (a static page, its script and its style, compiled
//! into the binary) and `GET /dashboard/events?model=NAME`, the server-sent events the page
//! draws from (docs/dashboard.md).
//!
//! The page is public like `/openapi.json`: it holds no data and says nothing about the
//! server. The events are the data, and sit behind the API key like every model route. A
//! browser's `EventSource` cannot send an `Authorization` header, so the page reads the events
//! with `fetch()` and a streamed body, which can; the key never goes into a URL (where logs
//! and history would keep it).
//!
//! Each events stream is one watcher of its model's live feed (`minserve_core::live`): the
//! engine builds records only while at least one stream is open. The stream reads the feed
//! every [`PUSH_INTERVAL`] on the server's runtime and sends what is new; serializing happens
//! here, never on the engine thread. It ends when the server shuts down, or when the model's
//! engine fails or is replaced (the page reconnects, and shows the 503 while there is one).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use minserve_core::live::LiveUpdate;
use minserve_core::EngineStats;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::state::AppState;

const PAGE: &str = include_str!("../../dashboard/index.html");
const SCRIPT: &str = include_str!("../../dashboard/dashboard.js");
const STYLE: &str = include_str!("../../dashboard/dashboard.css");

/// How often an events stream reads the feed: at most this many updates a second reach a page.
const PUSH_INTERVAL: Duration = Duration::from_millis(100);

/// The page and its assets need no key: they hold no data (see the module's comment).
pub(crate) fn is_public_asset(path: &str) -> bool {
    matches!(
        path,
        "/dashboard" | "/dashboard/dashboard.js" | "/dashboard/dashboard.css"
    )
}

pub(crate) async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // A new binary may serve a new page: never keep an old one.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
pub(crate) struct EventsQuery {
    /// The model to watch, by name or alias; the first served one when absent.
    model: Option<String>,
}

/// The live feed of one model as server-sent events: `hello` first (the pool's shape, the
/// served models), then `update`s (new step and request records, the latest block map, the
/// engine's counters). 404 for an unknown model, 503 for one not ready.
pub(crate) async fn events(
    State(state): State<Arc<AppState>>,
    Query(query): Query<EventsQuery>,
) -> Response {
    let ready = match state.ready_model(query.model.as_deref()) {
        Ok(ready) => ready,
        Err(e) => return e.into_response(),
    };
    let mut watch = ready.engine.watch_live();
    let hello = json!({
        "model": ready.slot.name(),
        "models": state.models.names(),
        "pool": watch.feed().header(),
        "max_num_seqs": ready.max_num_seqs,
        "max_model_len": ready.max_model_len(),
    });
    let stream = async_stream::stream! {
        yield event("hello", &hello);
        let mut ticks = tokio::time::interval(PUSH_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_stats = None;
        loop {
            ticks.tick().await;
            let same_engine = ready
                .slot
                .model()
                .is_some_and(|current| Arc::ptr_eq(&current, &ready.model));
            // Shutting down, or the engine failed: the page reconnects and shows the 503.
            if state.readiness(&ready.slot).is_err() || !same_engine {
                break;
            }
            let update = watch.read();
            let stats = ready.engine.stats();
            if update.is_empty() && last_stats == Some(stats) {
                continue;
            }
            last_stats = Some(stats);
            yield event("update", &update_json(update, &stats));
        }
    };
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn event(name: &str, data: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().event(name).data(data.to_string()))
}

fn update_json(update: LiveUpdate, stats: &EngineStats) -> Value {
    json!({
        "records": update.records,
        "missed": update.missed,
        "block_map": update.block_map.as_deref(),
        "totals": {
            "steps": stats.steps,
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "kv_usage": stats.kv_usage,
            "peak_kv_usage": stats.peak_kv_usage,
            "preemptions": stats.num_preemptions,
            "swapped_out": stats.num_swapped_out,
            "swapped_in": stats.num_swapped_in,
            "prompt_tokens": stats.prompt_tokens,
            "generation_tokens": stats.generation_tokens,
            "prefix_queried_tokens": stats.prefix_queried_tokens,
            "prefix_hit_tokens": stats.prefix_hit_tokens,
        },
    })
}
