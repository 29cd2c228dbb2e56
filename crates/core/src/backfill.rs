//! Admission with backfill: when the head of the waiting queue cannot fit (not enough free KV
//! blocks), requests behind it that do fit may be admitted first, so that free blocks do not
//! sit idle while the head waits for a large allocation.
//!
//! Unbounded, this starves the head: a stream of small requests can keep taking the blocks
//! that running sequences free, and the head never fits. So each waiting sequence may be
//! overtaken by at most `limit` others (`--backfill N`); once its count is spent, nothing is
//! admitted past it, and the blocks freed by finishing sequences accumulate until it fits.
//! The head's delay is then bounded by the `limit` requests admitted ahead of it, on top of what
//! it would wait without backfill (the running batch finishing enough to make room).
//!
//! A count rather than a time bound keeps the rule deterministic (a test can check it step by
//! step) and independent of the machine's speed.

use std::collections::HashMap;

use crate::sequence::SeqId;

#[derive(Debug, Default)]
pub struct Backfill {
    /// Requests that may overtake one blocked sequence; 0 turns backfill off.
    limit: usize,
    /// How many have overtaken each waiting sequence that was once a blocked head.
    overtaken: HashMap<SeqId, usize>,
}

impl Backfill {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            overtaken: HashMap::new(),
        }
    }

    /// Whether one more request may be admitted ahead of the blocked sequence `head`.
    pub fn may_overtake(&self, head: SeqId) -> bool {
        self.overtaken.get(&head).copied().unwrap_or(0) < self.limit
    }

    /// A request was admitted ahead of the blocked sequence `head`.
    pub fn overtook(&mut self, head: SeqId) {
        *self.overtaken.entry(head).or_default() += 1;
    }

    /// How many requests have overtaken `id` so far.
    pub fn times_overtaken(&self, id: SeqId) -> usize {
        self.overtaken.get(&id).copied().unwrap_or(0)
    }

    /// `id` was admitted or removed: its count is done with.
    pub fn forget(&mut self, id: SeqId) {
        if !self.overtaken.is_empty() {
            self.overtaken.remove(&id);
        }
    }
}
