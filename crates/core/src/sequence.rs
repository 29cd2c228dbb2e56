//! A sequence: what the scheduler and block manager know about one stream of tokens.
//!
//! Prefill and decode are one idea: `num_computed_tokens` chases `tokens.len()`. A fresh prompt
//! has many tokens to catch up on (processed in one step or in chunks), a running sequence has
//! exactly one (the token sampled last step), and a preempted one starts over from zero while
//! keeping every token it generated.

use std::sync::Arc;
use std::time::Duration;

use crate::fair_share::FairClaim;

/// Hash of a full block's tokens chained with its parent's (see `block_manager.rs`).
pub type BlockHash = u64;

/// Identifies a sequence for its whole life, across preemptions.
pub type SeqId = u64;

/// A block-table entry of a sliding-window KV group whose block lies wholly before the window of
/// every token the sequence has still to compute: the block went back to the pool (see
/// `block_manager.rs`) and nothing may read it. Never a valid block id.
pub const RELEASED_BLOCK: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub num_prompt_tokens: usize,
    /// Tokens whose K/V sit in the cache (or are being written by the current step).
    pub num_computed_tokens: usize,
    /// Per KV group (see `block_manager.rs`; a model without sliding windows has one), the
    /// physical block of each logical block, owned through the block manager. Empty while the
    /// sequence holds no blocks. A sliding-window group's table keeps its length: logical block
    /// `i` stays at index `i`, [`RELEASED_BLOCK`] where the window has passed it.
    pub block_tables: Vec<Vec<u32>>,
    /// Prefix-cache hash of each full block of `tokens`, in order; each chains its parent's.
    pub block_hashes: Vec<BlockHash>,
    /// Lower runs first under the priority policy (vLLM's convention).
    pub priority: i32,
    /// Arrival order; ties in priority go to the earlier arrival.
    pub arrival: u64,
    /// Its request's tenant and session, shared by the request's samples; `None` for the
    /// anonymous tenant without a session (one pointer: sequences are many, see
    /// `tests/request_memory.rs`).
    pub owner: Option<Arc<Owner>>,
    /// Virtual start tag under the fair-share policy, set when the scheduler queues it.
    pub fair_tag: u64,
    /// Tokens proposed to follow `tokens` for the next step to verify (speculative decoding,
    /// see `speculative.rs`); never part of `tokens`, consumed by the step that schedules them.
    pub draft_tokens: Vec<u32>,
}

/// Who a sequence's request is from, as the scheduler and the block manager see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owner {
    /// The tenant's share the request claims (see `fair_share.rs`); `None`: the anonymous
    /// tenant.
    pub fair_claim: Option<FairClaim>,
    /// For how long its cached blocks outlive it ahead of others' in the prefix cache (a
    /// conversation session's time to live; see `block_manager.rs`); `None`: no preference.
    pub keep_cached: Option<Duration>,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>, priority: i32, arrival: u64) -> Self {
        Self {
            id,
            num_prompt_tokens: prompt.len(),
            tokens: prompt,
            num_computed_tokens: 0,
            block_tables: Vec::new(),
            block_hashes: Vec::new(),
            priority,
            arrival,
            owner: None,
            fair_tag: 0,
            draft_tokens: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Logical blocks the sequence holds (the same number in every KV group).
    pub fn num_logical_blocks(&self) -> usize {
        self.block_tables.first().map_or(0, Vec::len)
    }

    /// Tokens the model still has to compute before this sequence can sample again.
    pub fn num_pending_tokens(&self) -> usize {
        self.tokens.len() - self.num_computed_tokens
    }

    /// Its tenant's share, as fair share counts it; `None`: the anonymous tenant.
    pub fn fair_claim(&self) -> Option<&FairClaim> {
        self.owner.as_ref().and_then(|o| o.fair_claim.as_ref())
    }

    /// For how long its cached blocks are kept ahead of others' once freed (its session's).
    pub fn keep_cached(&self) -> Option<Duration> {
        self.owner.as_ref().and_then(|o| o.keep_cached)
    }

    pub fn output_tokens(&self) -> &[u32] {
        &self.tokens[self.num_prompt_tokens..]
    }

    /// Scheduling order: priority first, then arrival. The greatest key is the first to be
    /// preempted.
    pub fn order_key(&self) -> (i32, u64) {
        (self.priority, self.arrival)
    }
}
