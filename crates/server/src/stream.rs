//! A generation answered as server-sent events, OpenAI's streaming format:
//!
//! ```text
//! data: {opening chunk per choice: chat's assistant role, or a completion's echo}
//! data: {chunk per visible token or finish}
//! data: {usage chunk, with stream_options.include_usage}
//! data: [DONE]
//! ```
//!
//! An error after the stream has started (the engine failed or went away, the shutdown timeout
//! was reached) can no longer change the status: it is sent as an error object in a `data:`
//! event, then `[DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::choices::ChoiceChange;
use crate::error::ApiError;
use crate::middleware::logged_by_handler;
use crate::render::{Finish, ResponseRenderer};
use crate::submit::InFlightGeneration;

fn sse_event(value: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(value.to_string()))
}

/// Streams `generation`'s choices as they come, rendered by `renderer`.
pub(crate) fn sse_response(renderer: ResponseRenderer, generation: InFlightGeneration) -> Response {
    let stream = async_stream::stream! {
        let mut generation = generation;
        let num_choices = generation.choices().len();
        for choice in 0..num_choices {
            if let Some(opening) = renderer.opening_delta(choice) {
                yield sse_event(&renderer.chunk(opening));
            }
        }
        let mut text_offsets = vec![0usize; num_choices];
        // Chat with a reasoning parser or tools: each choice's output read for its thinking
        // and its calls.
        let mut readers: Vec<_> = (0..num_choices).map(|_| renderer.choice_reader()).collect();
        while !generation.choices().all_finished() {
            let change = match generation.next_change().await {
                Ok(change) => change,
                Err(error) => {
                    yield sse_event(&error.to_json());
                    break;
                }
            };
            let delta = match change {
                ChoiceChange::Invisible => continue,
                ChoiceChange::Token { choice, text, .. } if readers[choice].is_some() => {
                    let reader = readers[choice].as_mut().expect("checked");
                    for delta in reader.read(&renderer, choice, &text, false) {
                        yield sse_event(&renderer.chunk(delta));
                    }
                    continue;
                }
                ChoiceChange::Token { choice, text, logprob } => renderer.token_delta(
                    choice,
                    text,
                    logprob.as_ref(),
                    &mut text_offsets[choice],
                ),
                ChoiceChange::Finished { choice, text, reason, stop_reason } => {
                    let end = Finish { reason, stop_reason: stop_reason.as_ref(), called: false };
                    match readers[choice].as_mut() {
                        Some(reader) => {
                            for delta in reader.read(&renderer, choice, &text, true) {
                                yield sse_event(&renderer.chunk(delta));
                            }
                            let end = Finish { called: reader.calls > 0, ..end };
                            renderer.finish_delta(choice, String::new(), end)
                        }
                        None => renderer.finish_delta(choice, text, end),
                    }
                }
                ChoiceChange::Failed(message) => {
                    generation.failed();
                    yield sse_event(&ApiError::internal(message).to_json());
                    break;
                }
            };
            yield sse_event(&renderer.chunk(delta));
        }
        if generation.choices().all_finished() {
            generation.finished();
            if renderer.include_usage() {
                yield sse_event(&renderer.usage_chunk(generation.prompt_tokens(), generation.choices()));
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    logged_by_handler(Sse::new(stream).into_response())
}
