//! Handing a parsed generation request to the engine, and following it while its response
//! lives.
//!
//! [`submit`] builds one complete engine request per prompt, has the engine handle validate
//! each against the engine's limits (the one place a request is checked against them), admits
//! the request's sequences (429 beyond the queue limit, see `admission.rs`), and queues the
//! requests, each with a [`ChannelSink`] into one channel. The returned [`InFlightGeneration`]
//! folds the events into choices and feeds the request's telemetry; dropping it before the
//! request ended (the client went away) aborts what is still running in the engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use minserve_core::request::{
    EventSink, FinishReason, RequestError, RequestEvent, RequestId, ValidatedRequest,
};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{channel, Receiver, Sender};

use crate::admission::{admit, QueueSlots};
use crate::caller::Caller;
use crate::choices::{ChoiceChange, Choices};
use crate::error::ApiError;
use crate::metrics::Interruption;
use crate::models::{ModelSlot, ServedModel};
use crate::params::GenerationParams;
use crate::prompt::Prompt;
use crate::state::{AppState, ReadyModel};
use crate::telemetry::RequestTelemetry;
use crate::tenants::TenantPermit;

/// Forwards one prompt's events to the response; `is_closed` turns true once the response (and
/// with it the receiver) is dropped, which makes the engine abort the request.
///
/// The channel is bounded (`ServerOptions::max_buffered_events` per sequence) and the engine
/// thread never waits on it: when a client reads so slowly that the channel is full, the event
/// is refused, the request's sinks all report themselves closed, the engine aborts it, and the
/// response ends with a `client_too_slow` error once the client has read what was buffered.
struct ChannelSink {
    prompt: usize,
    tx: Sender<(usize, RequestEvent)>,
    slow_client: Arc<SlowClient>,
}

/// Shared by the sinks of one generation: whether an event did not fit. Counted the moment it
/// happens, on the engine thread: the response may never be polled again (its client reads
/// nothing), so it could not count it itself.
struct SlowClient {
    overflowed: AtomicBool,
    slot: Arc<ModelSlot>,
}

impl SlowClient {
    fn overflow(&self) {
        if !self.overflowed.swap(true, Ordering::Relaxed) {
            self.slot
                .metrics
                .count_interruption(Interruption::ClientTooSlow);
        }
    }

    fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }
}

impl EventSink for ChannelSink {
    fn send(&self, event: RequestEvent) -> bool {
        match self.tx.try_send((self.prompt, event)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.slow_client.overflow();
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
    fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.slow_client.overflowed()
    }
}

/// A generation request handed to the engine, for as long as its response lives.
pub(crate) struct InFlightGeneration {
    /// Each prompt's events, tagged with the prompt's index.
    events: Receiver<(usize, RequestEvent)>,
    /// Set when the client read too slowly and an event did not fit (see [`ChannelSink`]).
    slow_client: Arc<SlowClient>,
    /// The most events buffered per sequence, for the error message.
    buffered_per_sequence: usize,
    choices: Choices,
    model: Arc<ServedModel>,
    /// One engine request per prompt (none when nothing is generated).
    engine_ids: Vec<RequestId>,
    /// Declared before `telemetry`: the slots are given back before the log line is written.
    _slots: Option<QueueSlots>,
    /// The request's place in its tenant's concurrency limit.
    _tenant_permit: Option<TenantPermit>,
    telemetry: RequestTelemetry,
    /// Turns true when the shutdown timeout cuts the running responses off.
    cut_off: tokio::sync::watch::Receiver<bool>,
}

impl InFlightGeneration {
    pub fn choices(&self) -> &Choices {
        &self.choices
    }

    pub fn prompt_tokens(&self) -> usize {
        self.telemetry.prompt_tokens()
    }

    /// Waits for the next event and folds it into the choices; or the error that ends the
    /// response early: the engine went away, or the shutdown timeout was reached.
    pub async fn next_change(&mut self) -> Result<ChoiceChange, ApiError> {
        let next = tokio::select! {
            biased;
            next = self.events.recv() => next,
            true = turns_true(&mut self.cut_off) => {
                return Err(self.interrupt(Interruption::ShutdownTimeout));
            }
        };
        let Some((prompt, event)) = next else {
            let reason = match self.slow_client.overflowed() {
                true => Interruption::ClientTooSlow,
                false => Interruption::EngineFailed,
            };
            return Err(self.interrupt(reason));
        };
        self.telemetry.observe(&event);
        Ok(self.choices.apply(prompt, event))
    }

    /// Ends the response early for `reason`: the error the client gets.
    fn interrupt(&mut self, reason: Interruption) -> ApiError {
        let error = match reason {
            Interruption::ShutdownTimeout => ApiError::cut_off_at_shutdown(),
            Interruption::ClientTooSlow => ApiError::client_too_slow(self.buffered_per_sequence),
            Interruption::EngineFailed => {
                ApiError::engine_gone(self.model.engine.failure().as_deref())
            }
        };
        // The sink counted a slow client already, when it happened.
        let counted = reason != Interruption::ClientTooSlow;
        self.telemetry
            .interrupted(reason, error.status.as_u16(), counted);
        error
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

/// Completes with true once `signal` is true; with false if its sender is gone (never, here:
/// the state that owns it outlives every response).
async fn turns_true(signal: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    signal.wait_for(|&value| value).await.is_ok()
}

impl Drop for InFlightGeneration {
    fn drop(&mut self) {
        if self.slow_client.overflowed() {
            // Its client left before reading the error: still a slow client, not a cancel.
            let status = ApiError::client_too_slow(0).status.as_u16();
            self.telemetry
                .interrupted(Interruption::ClientTooSlow, status, false);
        }
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
    /// Its tenant (whose limits it counts against) and session.
    pub caller: Caller,
}

/// Validates the submission's prompts against the engine's limits, admits them (429 when the
/// queue is full) and queues them in the engine.
pub(crate) fn submit(
    state: &Arc<AppState>,
    model: &ReadyModel,
    submission: Submission<'_>,
) -> Result<InFlightGeneration, ApiError> {
    let Submission {
        params,
        prompts,
        samples_per_prompt,
        arrival,
        caller,
    } = submission;
    let buffered_per_sequence = state.options.max_buffered_events.max(1);
    // Room for every sequence's buffered tokens, and each prompt's `Scheduled`.
    let capacity = prompts.len() * (samples_per_prompt * buffered_per_sequence + 1);
    let (tx, events) = channel(capacity);
    let slow_client = Arc::new(SlowClient {
        overflowed: AtomicBool::new(false),
        slot: model.slot.clone(),
    });
    let in_flight = |engine_ids, slots, permit, telemetry| InFlightGeneration {
        events,
        slow_client: slow_client.clone(),
        buffered_per_sequence,
        choices: Choices::new(prompts.len(), samples_per_prompt),
        model: model.model.clone(),
        engine_ids,
        _slots: slots,
        _tenant_permit: permit,
        telemetry,
        cut_off: state.cut_off_signal(),
    };
    let prompt_tokens = prompts.iter().map(|p| p.tokens.len()).sum();
    let path = params.api.path();
    let telemetry = || RequestTelemetry::new(model.slot.clone(), path, arrival, prompt_tokens);
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
                    stop_reason: None,
                    accepted_prediction_tokens: 0,
                };
                let _ = tx.try_send((prompt, finished));
            }
        }
        return Ok(in_flight(Vec::new(), None, None, telemetry()));
    }

    let max_total_tokens = model.max_total_tokens();
    let requests = prompts
        .iter()
        .map(|p| {
            let mut request = params.engine_request(p, samples_per_prompt, max_total_tokens);
            request.tenant = caller.tenant.as_ref().map(|t| t.share());
            request.session = caller.session.clone();
            model.engine.validate(request).map_err(reject)
        })
        .collect::<Result<Vec<ValidatedRequest>, ApiError>>()?;

    let mut telemetry = telemetry();
    let tokens: usize = requests
        .iter()
        .map(|r| r.prompt.len() + r.n * r.max_tokens)
        .sum();
    // The queue first: a request the queue refuses takes nothing from its tenant's tokens.
    let admitted = admit(state, model, prompts.len() * samples_per_prompt).and_then(|slots| {
        let permit = caller
            .tenant
            .as_ref()
            .map(|tenant| TenantPermit::acquire(tenant, tokens as u64))
            .transpose()
            .inspect_err(|e| {
                if e.status.as_u16() == 429 {
                    model
                        .slot
                        .metrics
                        .rate_limited
                        .fetch_add(1, Ordering::Relaxed);
                }
            })?;
        Ok((slots, permit))
    });
    let (slots, permit) = match admitted {
        Ok(admitted) => admitted,
        Err(e) => {
            telemetry.rejected();
            return Err(e);
        }
    };
    let mut generation = in_flight(Vec::new(), Some(slots), permit, telemetry);
    for (prompt, request) in requests.into_iter().enumerate() {
        let sink = ChannelSink {
            prompt,
            tx: tx.clone(),
            slow_client: slow_client.clone(),
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
