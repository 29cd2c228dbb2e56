//! Handing a parsed generation request to the engine, and following it while its response
//! lives.
//!
//! [`submit`] builds one complete engine request per prompt, has the engine handle validate
//! each against the engine's limits (the one place a request is checked against them), admits
//! the request's sequences (429 beyond the queue limit, see `admission.rs`), and queues the
//! requests, each with a [`ChannelSink`] into one channel. The returned [`InFlightGeneration`]
//! folds the events into choices and feeds the request's telemetry; dropping it before the
//! request ended (the client went away) aborts what is still running in the engine.

use std::sync::Arc;
use std::time::Instant;

use minserve_core::request::{
    EventSink, FinishReason, RequestError, RequestEvent, RequestId, ValidatedRequest,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::admission::{admit, QueueSlots};
use crate::choices::{ChoiceChange, Choices};
use crate::error::ApiError;
use crate::params::GenerationParams;
use crate::prompt::Prompt;
use crate::state::{AppState, ServedModel};
use crate::telemetry::RequestTelemetry;

/// Forwards one prompt's events to the response; `is_closed` turns true once the response (and
/// with it the receiver) is dropped, which makes the engine abort the request.
struct ChannelSink {
    prompt: usize,
    tx: UnboundedSender<(usize, RequestEvent)>,
}

impl EventSink for ChannelSink {
    fn send(&self, event: RequestEvent) -> bool {
        self.tx.send((self.prompt, event)).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A generation request handed to the engine, for as long as its response lives.
pub(crate) struct InFlightGeneration {
    /// Each prompt's events, tagged with the prompt's index.
    events: UnboundedReceiver<(usize, RequestEvent)>,
    choices: Choices,
    model: Arc<ServedModel>,
    /// One engine request per prompt (none when nothing is generated).
    engine_ids: Vec<RequestId>,
    /// Declared before `telemetry`: the slots are given back before the log line is written.
    _slots: Option<QueueSlots>,
    telemetry: RequestTelemetry,
}

impl InFlightGeneration {
    pub fn choices(&self) -> &Choices {
        &self.choices
    }

    pub fn prompt_tokens(&self) -> usize {
        self.telemetry.prompt_tokens()
    }

    /// Waits for the next event and folds it into the choices; `None` when the engine went
    /// away before the request finished.
    pub async fn next_change(&mut self) -> Option<ChoiceChange> {
        let (prompt, event) = self.events.recv().await?;
        self.telemetry.observe(&event);
        Some(self.choices.apply(prompt, event))
    }

    /// Every choice finished: the request's metrics are recorded.
    pub fn finished(&mut self) {
        self.telemetry.finished(&self.choices);
    }

    /// The engine failed the request.
    pub fn failed(&mut self) {
        self.telemetry.failed();
    }
}

impl Drop for InFlightGeneration {
    fn drop(&mut self) {
        if !self.telemetry.has_ended() {
            for &id in &self.engine_ids {
                self.model.engine.abort(id);
            }
        }
    }
}

/// What a submission needs besides the state and the model.
pub(crate) struct Submission<'a> {
    pub params: &'a GenerationParams,
    pub prompts: &'a [Prompt],
    /// `n`, already checked against the request's sequence limit.
    pub samples_per_prompt: usize,
    /// When the request arrived, for its latencies.
    pub arrival: Instant,
}

/// Validates the submission's prompts against the engine's limits, admits them (429 when the
/// queue is full) and queues them in the engine.
pub(crate) fn submit(
    state: &Arc<AppState>,
    model: &Arc<ServedModel>,
    submission: Submission<'_>,
) -> Result<InFlightGeneration, ApiError> {
    let Submission {
        params,
        prompts,
        samples_per_prompt,
        arrival,
    } = submission;
    let (tx, events) = unbounded_channel();
    let in_flight = |engine_ids, slots, telemetry| InFlightGeneration {
        events,
        choices: Choices::new(prompts.len(), samples_per_prompt),
        model: model.clone(),
        engine_ids,
        _slots: slots,
        telemetry,
    };
    let prompt_tokens = prompts.iter().map(|p| p.tokens.len()).sum();
    let path = params.api.path();
    let telemetry = || RequestTelemetry::new(state.clone(), path, arrival, prompt_tokens);
    let reject = |e: RequestError| ApiError::from_request_error(&e, params.field_names());

    if params.echoes_prompt_only() {
        validate_echo_only(model, params, prompts).map_err(reject)?;
        // Nothing to generate: every choice ends at once, and the engine never sees it.
        for prompt in 0..prompts.len() {
            for index in 0..samples_per_prompt {
                let finished = RequestEvent::Finished {
                    index,
                    reason: FinishReason::Length,
                    text: String::new(),
                    completion_tokens: 0,
                };
                let _ = tx.send((prompt, finished));
            }
        }
        return Ok(in_flight(Vec::new(), None, telemetry()));
    }

    let max_total_tokens = model.max_total_tokens();
    let requests = prompts
        .iter()
        .map(|p| {
            let request = params.engine_request(p, samples_per_prompt, max_total_tokens);
            model.engine.validate(request).map_err(reject)
        })
        .collect::<Result<Vec<ValidatedRequest>, ApiError>>()?;

    let mut telemetry = telemetry();
    let slots = match admit(state, model, prompts.len() * samples_per_prompt) {
        Ok(slots) => slots,
        Err(e) => {
            telemetry.rejected();
            return Err(e);
        }
    };
    let mut generation = in_flight(Vec::new(), Some(slots), telemetry);
    for (prompt, request) in requests.into_iter().enumerate() {
        let sink = ChannelSink {
            prompt,
            tx: tx.clone(),
        };
        let id = model.engine.add_request(request, Box::new(sink));
        generation.engine_ids.push(id);
    }
    Ok(generation)
}

/// The limits that still apply when nothing is generated: the sampling parameters must be
/// valid, the prompts must exist and fit the context (the KV cache is never used, so its size
/// does not matter).
fn validate_echo_only(
    model: &ServedModel,
    params: &GenerationParams,
    prompts: &[Prompt],
) -> Result<(), RequestError> {
    params
        .sampling
        .validate()
        .map_err(RequestError::InvalidParams)?;
    let max_model_len = model.max_model_len();
    for p in prompts {
        if p.tokens.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if p.tokens.len() > max_model_len {
            return Err(RequestError::TooLong {
                max_model_len,
                prompt_tokens: p.tokens.len(),
                max_tokens: 0,
            });
        }
    }
    Ok(())
}
