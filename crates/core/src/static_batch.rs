//! Static batching (`--batching static`): the pre-Orca baseline that continuous batching is
//! measured against. A batch is formed only when the previous one has completely finished, and
//! nothing joins it afterwards: a sequence that finishes early leaves its seat empty, and a
//! request that arrives meanwhile waits for the whole batch.
//!
//! A batch's members are the sequences waiting when it opens (the running batch empty). Their
//! prompts still go through the step's token budget, so a batch of long prompts may take several
//! steps to form (the first members can start decoding meanwhile); but nobody who arrived
//! after it opened joins. Formation ends at the first step whose admission stops for anything
//! but the token budget (the queue of members is exhausted, or seats or blocks run out): the
//! members left behind wait for the next batch.

use crate::sequence::Sequence;

#[derive(Debug, Default)]
pub struct StaticBatch {
    /// The latest arrival among the members of the batch being formed; `None` once formation
    /// has ended.
    forming: Option<u64>,
}

impl StaticBatch {
    /// Called before admitting in a step, with the running batch's emptiness and the waiting
    /// queue: an empty batch opens a new one for everything waiting. Returns whether this step
    /// may admit at all.
    pub fn begin_admission<'a>(
        &mut self,
        batch_is_empty: bool,
        waiting: impl Iterator<Item = &'a Sequence>,
    ) -> bool {
        if batch_is_empty {
            self.forming = waiting.map(|s| s.arrival).max();
        }
        self.forming.is_some()
    }

    /// Whether `seq` belongs to the batch being formed.
    pub fn admits(&self, seq: &Sequence) -> bool {
        self.forming.is_some_and(|last| seq.arrival <= last)
    }

    /// Called after admitting in a step: formation continues only when the token budget was
    /// what stopped it.
    pub fn end_admission(&mut self, budget_spent: bool) {
        if !budget_spent {
            self.forming = None;
        }
    }
}
