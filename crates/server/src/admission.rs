//! Back-pressure: a request's sequences beyond the running batch's capacity wait in the
//! engine's queue, and when the queue would grow past `--max-queue` the request is refused
//! with 429 and `Retry-After` instead of queued. A request with more sequences than the batch
//! and the queue hold together would be refused even by an idle server: retrying cannot help,
//! so it gets a 400 that says so instead.
//!
//! Each model has its own engine and so its own queue: the count of its sequences admitted but
//! not yet answered lives in its [`ModelSlot::inflight_seqs`]: a [`QueueSlots`] holds a
//! request's share of it and gives it back when the response ends, however it ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::ApiError;
use crate::models::ModelSlot;
use crate::state::{AppState, ReadyModel};

/// A request's sequences, counted as admitted until this is dropped.
pub(crate) struct QueueSlots {
    slot: Arc<ModelSlot>,
    num_seqs: usize,
}

impl Drop for QueueSlots {
    fn drop(&mut self) {
        self.slot
            .inflight_seqs
            .fetch_sub(self.num_seqs, Ordering::SeqCst);
    }
}

/// Admits `num_seqs` more sequences, or refuses them with 429 (counted in
/// `minserve_request_rejected_total`) when more than `max_queue` would be waiting, or with 400
/// when they could never be admitted.
pub(crate) fn admit(
    state: &Arc<AppState>,
    model: &ReadyModel,
    num_seqs: usize,
) -> Result<QueueSlots, ApiError> {
    let max_queue = state.options.max_queue;
    let most_admissible = model.max_num_seqs + max_queue;
    if num_seqs > most_admissible {
        return Err(ApiError::invalid(
            "n",
            format!(
                "this request asks for {num_seqs} sequences (prompts times `n`), but the server \
                 runs at most {} at once and queues at most {max_queue} more (--max-queue), so \
                 it could never be admitted; ask for at most {most_admissible}",
                model.max_num_seqs
            ),
        )
        .code("never_admissible"));
    }
    let before = model
        .slot
        .inflight_seqs
        .fetch_add(num_seqs, Ordering::SeqCst);
    // From here the slots are given back on drop, whatever happens.
    let slots = QueueSlots {
        slot: model.slot.clone(),
        num_seqs,
    };
    let waiting = model
        .engine
        .stats()
        .num_waiting
        .max((before + num_seqs).saturating_sub(model.max_num_seqs));
    if waiting > max_queue {
        model.slot.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::queue_full(waiting, max_queue));
    }
    Ok(slots)
}
