//! A Responses API answer as server-sent events: `response.created`, `response.in_progress`,
//! the output's events (`output.rs`), then `response.completed` (or `response.incomplete`)
//! with the whole response and its usage. Each event names its type in the SSE `event:` field
//! and carries a `sequence_number`, from 0.
//!
//! An error after the stream started (the engine failed, the shutdown timeout) is an `error`
//! event carrying the error object, which the SDK raises as an `APIError`.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::object::{usage, ResponseShell, Status};
use crate::choices::ChoiceChange;
use crate::error::ApiError;
use crate::middleware::logged_by_handler;
use crate::submit::InFlightGeneration;

/// Numbers the events of one stream.
#[derive(Default)]
struct Sequence {
    next: u64,
}

impl Sequence {
    fn event(&mut self, mut event: Value) -> Result<Event, Infallible> {
        event["sequence_number"] = json!(self.next);
        self.next += 1;
        let kind = event["type"].as_str().unwrap_or("message").to_string();
        Ok(Event::default().event(kind).data(event.to_string()))
    }

    /// OpenAI's `error` event (`code`, `message`, `param`), with the error object the SDK
    /// raises.
    fn error(&mut self, error: &ApiError) -> Result<Event, Infallible> {
        let mut event = error.to_json();
        event["type"] = json!("error");
        event["code"] = json!(error.code);
        event["message"] = json!(error.message);
        event["param"] = json!(error.param);
        self.event(event)
    }
}

/// Streams `generation`'s one choice as the Responses API's events.
pub(crate) fn sse_response(shell: ResponseShell, generation: InFlightGeneration) -> Response {
    let stream = async_stream::stream! {
        let mut generation = generation;
        let mut events = Sequence::default();
        for kind in ["response.created", "response.in_progress"] {
            let response = shell.object(Status::InProgress, &[], None);
            yield events.event(json!({"type": kind, "response": response}));
        }
        let mut output = shell.output_items();
        let mut status = Status::InProgress;
        while !generation.choices().all_finished() {
            let new_events = match generation.next_change().await {
                Ok(ChoiceChange::Invisible) => continue,
                Ok(ChoiceChange::Token { text, .. }) => output.push(&text),
                Ok(ChoiceChange::Finished { text, reason, .. }) => {
                    status = Status::of(Some(reason));
                    output.finish(&text, status != Status::Incomplete)
                }
                Ok(ChoiceChange::Failed(message)) => {
                    generation.failed();
                    yield events.error(&ApiError::internal(message));
                    break;
                }
                Err(error) => {
                    yield events.error(&error);
                    break;
                }
            };
            for event in new_events {
                yield events.event(event);
            }
        }
        if generation.choices().all_finished() {
            generation.finished();
            let usage = usage(generation.choices(), generation.prompt_tokens());
            shell.keep(output.items());
            let response = shell.object(status, output.items(), Some(usage));
            yield events.event(json!({"type": status.final_event(), "response": response}));
        }
    };
    logged_by_handler(Sse::new(stream).into_response())
}
