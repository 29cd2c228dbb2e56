//! Drafting with a second, smaller model (`--speculative draft:MODEL`): speculative decoding's
//! proposer when the output does not copy its input, so prompt lookup finds nothing.
//!
//! The draft model runs on its own executor with its own paged KV pool, beside the target's
//! and invisible to the scheduler: drafting is an optimisation the engine may drop at any time
//! (a pool that runs dry, an error), so none of the target's admission, preemption or prefix
//! caching depends on it. Each step, for every sequence that drafts, [`DraftModel::propose`]
//!
//! 1. finds how much of the sequence the draft cache already holds: the longest common prefix
//!    of the tokens it ran before and the sequence's tokens now. Accepted drafts are part of
//!    both, so their K/V is reused; rejected ones differ and are overwritten in place (no copy,
//!    no free: positions past the prefix are simply written again);
//! 2. runs what is missing (the whole prompt the first time, usually one or two tokens later)
//!    as a prefill chunk, in batches of at most [`DraftModel::MAX_STEP_TOKENS`] tokens, and takes
//!    the argmax of the last row as the first draft; a sequence with more tokens missing than it
//!    may still generate does not draft (the catch-up would cost more than the drafts can win);
//! 3. runs `k - 1` more one-token steps, batched across sequences, each feeding the previous
//!    draft back.
//!
//! Drafts are greedy. That keeps sampled output exact too: the verifier treats any proposal as
//! a point mass (accept with the target's probability of the token, else draw from the target
//! with that token removed: `Sampler::sample_token_with_draft`), which is the rejection rule for
//! a deterministic proposer, so the output keeps the target's distribution whatever drafted.
//!
//! The two models must share a vocabulary (same ids, same tokens); the command that builds the
//! pair checks the tokenizers, and [`DraftModel::new`] the vocabulary size.

use std::collections::HashMap;

use crate::batch::StepBatch;
use crate::executor::{Logits, ModelExecutor};
use crate::sampling::argmax;
use crate::sequence::SeqId;
use crate::speculative::{DraftWant, Drafter};

/// What the draft cache holds for one sequence.
#[derive(Debug)]
struct DraftSequence {
    /// The tokens whose K/V is in the cache, from position 0.
    cached: Vec<u32>,
    /// Block tables, one per KV group of the draft model.
    tables: Vec<Vec<u32>>,
}

/// A draft model on its executor, with a plain block allocator over the executor's pool.
pub struct DraftModel<E: ModelExecutor> {
    executor: E,
    block_size: usize,
    num_groups: usize,
    /// The longest sequence the draft model can run (its context length).
    max_len: usize,
    free_blocks: Vec<u32>,
    sequences: HashMap<SeqId, DraftSequence>,
}

impl<E: ModelExecutor + Send> DraftModel<E> {
    /// Catch-up tokens per draft step at most: a burst of new long prompts is prefilled in the
    /// draft in pieces of this size, not as one step as large as all of them.
    pub const MAX_STEP_TOKENS: usize = 1024;

    /// A drafter for a target whose vocabulary has `target_vocab_size` ids; sequences longer
    /// than `max_len` (the draft model's context length) get no drafts.
    pub fn new(executor: E, target_vocab_size: usize, max_len: usize) -> Result<Self, String> {
        if executor.vocab_size() != target_vocab_size {
            return Err(format!(
                "the draft model's vocabulary has {} ids and the target's {target_vocab_size}: \
                 a draft model must share the target's tokenizer",
                executor.vocab_size()
            ));
        }
        let geometry = executor.cache_geometry();
        let num_groups = executor.kv_group_windows().len();
        Ok(Self {
            block_size: geometry.block_size,
            num_groups,
            max_len,
            // Popped from the end: low ids first, which keeps a small run's blocks together.
            free_blocks: (0..geometry.num_blocks as u32).rev().collect(),
            sequences: HashMap::new(),
            executor,
        })
    }

    /// Blocks not held by any sequence.
    pub fn num_free_blocks(&self) -> usize {
        self.free_blocks.len()
    }

    /// Grows `seq`'s tables to hold `num_tokens` positions; false (and nothing taken) when the
    /// pool cannot.
    fn reserve(&mut self, id: SeqId, num_tokens: usize) -> bool {
        let seq = self
            .sequences
            .get_mut(&id)
            .expect("reserved for a known sequence");
        let needed = num_tokens.div_ceil(self.block_size);
        let missing = needed.saturating_sub(seq.tables[0].len());
        if missing * self.num_groups > self.free_blocks.len() {
            return false;
        }
        for table in &mut seq.tables {
            for _ in 0..missing {
                table.push(self.free_blocks.pop().expect("counted above"));
            }
        }
        true
    }

    /// Forgets every sequence `keep` says no to, its blocks back to the pool.
    fn forget(&mut self, mut keep: impl FnMut(SeqId) -> bool) {
        let free = &mut self.free_blocks;
        self.sequences.retain(|&id, seq| {
            keep(id) || {
                free.extend(seq.tables.drain(..).flatten());
                false
            }
        });
    }

    /// After a failed step nothing in the cache can be trusted: every sequence starts over.
    fn forget_all(&mut self) {
        self.forget(|_| false);
    }

    /// Runs `batch` and returns the argmax of each sampled row.
    fn greedy(&mut self, batch: &StepBatch) -> Result<Vec<u32>, String> {
        let logits: Logits = self
            .executor
            .execute(batch)
            .map_err(|e| format!("draft model: {e}"))?;
        Ok((0..logits.num_rows())
            .map(|r| argmax(logits.row(r)))
            .collect())
    }

    /// Catches every planned sequence up to its tokens (all but the last may already be
    /// cached), in steps of at most [`Self::MAX_STEP_TOKENS`] tokens, and returns the first draft
    /// of each, in `plans` order.
    fn catch_up(&mut self, plans: &[(SeqId, &[u32])]) -> Result<Vec<u32>, String> {
        let mut firsts = vec![0; plans.len()];
        let mut next = 0;
        while next < plans.len() {
            let mut batch = StepBatch::new();
            let mut sampled = Vec::new();
            let mut budget = Self::MAX_STEP_TOKENS;
            while next < plans.len() && budget > 0 {
                let (id, tokens) = plans[next];
                let seq = self.sequences.get_mut(&id).expect("planned");
                let start = seq.cached.len();
                let end = tokens.len().min(start + budget);
                let last_piece = end == tokens.len();
                batch.push_sequence_groups(
                    &tokens[start..end],
                    start,
                    &seq.tables,
                    self.block_size,
                    last_piece,
                );
                seq.cached.extend_from_slice(&tokens[start..end]);
                budget -= end - start;
                if last_piece {
                    sampled.push(next);
                    next += 1;
                }
            }
            for (i, token) in sampled.into_iter().zip(self.greedy(&batch)?) {
                firsts[i] = token;
            }
        }
        Ok(firsts)
    }
}

impl<E: ModelExecutor + Send> Drafter for DraftModel<E> {
    fn propose(&mut self, wants: &[DraftWant<'_>]) -> Result<Vec<Vec<u32>>, String> {
        let mut drafts = vec![Vec::new(); wants.len()];
        // (index into `wants`) of the sequences that draft this step.
        let mut drafting = Vec::new();
        for (i, want) in wants.iter().enumerate() {
            if want.k == 0 || want.tokens.is_empty() || want.tokens.len() + want.k > self.max_len {
                continue;
            }
            let num_groups = self.num_groups;
            let seq = self
                .sequences
                .entry(want.id)
                .or_insert_with(|| DraftSequence {
                    cached: Vec::new(),
                    tables: vec![Vec::new(); num_groups],
                });
            // The last token's logits are what the first draft comes from, so it always runs.
            let reusable = common_prefix(&seq.cached, want.tokens).min(want.tokens.len() - 1);
            // Catching up costs a draft pass over every missing token, which only the tokens
            // still to come can earn back: a long context met late (drafting was off while the
            // batch was large) is not worth it near the end of a sequence.
            if want.tokens.len() - reusable > want.remaining {
                continue;
            }
            seq.cached.truncate(reusable);
            // Positions written: the tokens, then every draft but the last.
            if self.reserve(want.id, want.tokens.len() + want.k - 1) {
                drafting.push(i);
            }
        }
        if drafting.is_empty() {
            return Ok(drafts);
        }
        let plans: Vec<(SeqId, &[u32])> = drafting
            .iter()
            .map(|&i| (wants[i].id, wants[i].tokens))
            .collect();
        let firsts = self.catch_up(&plans).inspect_err(|_| self.forget_all())?;
        for (&i, first) in drafting.iter().zip(firsts) {
            drafts[i].push(first);
        }
        // One-token steps while any sequence wants more drafts.
        loop {
            let mut batch = StepBatch::new();
            let mut fed = Vec::new();
            for &i in &drafting {
                let want = &wants[i];
                if drafts[i].len() >= want.k {
                    continue;
                }
                let seq = self.sequences.get_mut(&want.id).expect("drafting");
                let last = *drafts[i].last().expect("a first draft");
                batch.push_sequence_groups(
                    &[last],
                    seq.cached.len(),
                    &seq.tables,
                    self.block_size,
                    true,
                );
                seq.cached.push(last);
                fed.push(i);
            }
            if fed.is_empty() {
                break;
            }
            let next = self.greedy(&batch).inspect_err(|_| self.forget_all())?;
            for (i, token) in fed.into_iter().zip(next) {
                drafts[i].push(token);
            }
        }
        Ok(drafts)
    }

    fn retain(&mut self, live: &[SeqId]) {
        self.forget(|id| live.contains(&id));
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
