//! What one generation request reports about itself: its latencies and finish reasons in
//! `/metrics`, and one log line when its response ends (finished, failed, refused or
//! cancelled by the client going away).
//!
//! The response path feeds it every engine event ([`RequestTelemetry::observe`]) and tells it
//! how the request ended; the line is written on drop, so a response dropped half-way is
//! logged too, as `cancelled`, and counted in `minserve_request_aborted_total`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use minserve_core::request::{FinishReason, RequestEvent};

use crate::choices::Choices;
use crate::metrics::Interruption;
use crate::models::ModelSlot;

pub(crate) struct RequestTelemetry {
    /// The model it went to: its metrics.
    slot: Arc<ModelSlot>,
    /// The route, for the log line.
    path: &'static str,
    arrival: Instant,
    scheduled: bool,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// The request ended and nothing is left to abort: finished, failed or refused.
    ended: bool,
    /// The status the log line reports.
    status: u16,
    /// Why the server ended it early, if it did.
    interruption: Option<Interruption>,
}

impl RequestTelemetry {
    pub fn new(
        slot: Arc<ModelSlot>,
        path: &'static str,
        arrival: Instant,
        prompt_tokens: usize,
    ) -> Self {
        Self {
            slot,
            path,
            arrival,
            scheduled: false,
            first_token: None,
            prompt_tokens,
            completion_tokens: 0,
            ended: false,
            status: 200,
            interruption: None,
        }
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Whether the request ended (see [`RequestTelemetry::ended`]); if not, dropping its
    /// response cancels it.
    pub fn has_ended(&self) -> bool {
        self.ended
    }

    /// Times an engine event: the first scheduling ends the queue time (the other prompts of
    /// a multi-prompt completion count with the first, as its time to first token does), the
    /// first token the time to first token.
    pub fn observe(&mut self, event: &RequestEvent) {
        match event {
            RequestEvent::Scheduled { at, .. } if !self.scheduled => {
                self.scheduled = true;
                let queued = at.saturating_duration_since(self.arrival);
                self.slot.metrics.queue_time.observe(queued.as_secs_f64());
            }
            RequestEvent::Token { .. } => {
                if self.first_token.is_none() {
                    let now = Instant::now();
                    self.slot
                        .metrics
                        .time_to_first_token
                        .observe(now.duration_since(self.arrival).as_secs_f64());
                    self.first_token = Some(now);
                }
                self.completion_tokens += 1;
            }
            _ => {}
        }
    }

    /// Every choice finished: end-to-end latency, time per output token (of the longest
    /// choice) and the finish reasons.
    pub fn finished(&mut self, choices: &Choices) {
        if self.ended {
            return;
        }
        self.ended = true;
        let m = &self.slot.metrics;
        let e2e = self.arrival.elapsed().as_secs_f64();
        m.e2e_latency.observe(e2e);
        let longest = choices.longest_choice_tokens();
        if let Some(first) = self.first_token {
            let ttft = first.duration_since(self.arrival).as_secs_f64();
            if longest > 1 {
                m.time_per_output_token
                    .observe((e2e - ttft) / (longest - 1) as f64);
            }
        }
        for reason in choices.finish_reasons() {
            match reason {
                FinishReason::Stop => m.success_stop.fetch_add(1, Ordering::Relaxed),
                FinishReason::Length => m.success_length.fetch_add(1, Ordering::Relaxed),
            };
        }
    }

    /// The engine failed the request: nothing left to abort, and the log says 500.
    pub fn failed(&mut self) {
        self.ended = true;
        self.status = 500;
    }

    /// The server ends the request early, counted by reason unless `count` is false (counted
    /// already where it happened); what still runs in the engine is aborted when the response
    /// is dropped.
    pub fn interrupted(&mut self, reason: Interruption, status: u16, count: bool) {
        if self.interruption.is_none() && !self.ended {
            if count {
                self.slot.metrics.count_interruption(reason);
            }
            self.interruption = Some(reason);
            self.status = status;
        }
    }

    /// Refused by admission (429): it never reached the engine.
    pub fn rejected(&mut self) {
        self.ended = true;
        self.status = 429;
    }
}

impl Drop for RequestTelemetry {
    fn drop(&mut self) {
        let cancelled = !self.ended && self.interruption.is_none();
        if cancelled {
            self.slot.metrics.aborted.fetch_add(1, Ordering::Relaxed);
        }
        let outcome = match self.interruption {
            Some(reason) => format!(" interrupted={}", reason.label()),
            None if cancelled => " cancelled".to_string(),
            None => String::new(),
        };
        tracing::info!(
            target: "minserve_server",
            "POST {} {} prompt_tokens={} completion_tokens={} latency_ms={:.1}{}",
            self.path,
            self.status,
            self.prompt_tokens,
            self.completion_tokens,
            self.arrival.elapsed().as_secs_f64() * 1e3,
            outcome,
        );
    }
}
