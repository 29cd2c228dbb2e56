//! Speculative decoding: propose a few tokens cheaply, let the model check them all in one
//! step, keep the ones it agrees with.
//!
//! A decoding sequence normally computes one token per step, and on a CPU a step of one token
//! costs about as much as a step of a few (the weights are read once either way). So the engine
//! *drafts* up to `K` tokens that are likely to come next, and the step runs the sequence's
//! pending token followed by the drafts, asking for logits at every one of those positions
//! (`SequenceChunk::logits_for_every_token`). Position `i`'s logits say what follows draft `i`;
//! walking them in order (`Engine::step`), each draft is verified against the request's own
//! sampling (`Sampler::sample_token_with_draft`: greedy accepts a draft equal to the argmax,
//! sampling accepts it with its probability, so the output keeps the model's distribution).
//! The first rejection ends the walk with the token drawn in its place; if all `K` are
//! accepted, the last row gives one more token. A step thus yields 1 to `K + 1` tokens.
//!
//! The drafts' K/V are written into the cache as any new token's would be; what the rejected
//! ones wrote lies past the sequence's new end, and the blocks wholly past it go back to the
//! pool (`Scheduler::accept_drafts`). No draft is ever in `Sequence::tokens`, so no block holding
//! one is ever registered for prefix reuse.
//!
//! **Drafting by prompt lookup** ([`propose_ngram`], vLLM's `ngram` method, llama.cpp's lookup
//! decoding): find the last `n` tokens of the sequence earlier in its prompt or output, for `n`
//! from `max_n` down to `min_n`, and propose what followed them there. It needs no second
//! model and costs a scan of the sequence; it pays on outputs that copy their input (editing,
//! extraction, code changes, summaries that quote).
//!
//! **Drafting from a prediction** ([`propose_from_prediction`], OpenAI's predicted outputs): a
//! request may carry text its output is expected to largely repeat (a file being edited). Its
//! drafts come from there first: its continuation while the output is a prefix of it, then what
//! follows the last `n` generated tokens where they occur in the prediction, the occurrence
//! nearest the output's own position; where it has no match, the server's drafter, if any,
//! takes over. The engine drafts this way for such a request even when the server runs without
//! `--speculative`, and before a draft model; it counts the accepted prediction tokens.
//!
//! **Switching itself off** ([`DraftGate`]): verifying `K` drafts costs compute; when a
//! sequence's drafts are mostly rejected, or the batch is large enough that every extra token
//! costs nearly as much as a step, drafting loses. Each sequence tracks its acceptance and stops
//! drafting for a while (longer each time) when it falls below what pays at the current batch
//! size, then tries again.
//!
//! **Which requests speculate.** Those whose next token depends only on the logits and the
//! generator: not those with a grammar (its mask would have to advance through each draft),
//! repetition, presence or frequency penalties (position-dependent history), or still inside
//! `min_tokens` (stop ids banned). Everything else (logit bias, temperature, top-k/p, min-p,
//! logprobs, seeds, stop strings, `max_tokens`) works unchanged: each verified position is
//! sampled with the request's parameters and passes the output stage token by token.

use crate::request::ValidatedRequest;
use crate::sequence::SeqId;

/// One sequence's request for drafts: propose up to `k` tokens to follow `tokens`, for a
/// sequence that may generate `remaining` more tokens.
#[derive(Debug, Clone, Copy)]
pub struct DraftWant<'a> {
    pub id: SeqId,
    pub tokens: &'a [u32],
    pub k: usize,
    pub remaining: usize,
}

/// What proposes draft tokens: prompt lookup ([`PromptLookup`]) or a draft model
/// (`draft_model::DraftModel`, which keeps a KV cache per sequence).
pub trait Drafter: Send {
    /// Up to `want.k` tokens for each want, in order; fewer (or none) where it cannot.
    fn propose(&mut self, wants: &[DraftWant<'_>]) -> Result<Vec<Vec<u32>>, String>;

    /// Drops the state of every sequence not in `live` (finished, aborted or preempted).
    fn retain(&mut self, live: &[SeqId]);
}

/// Prompt lookup as a [`Drafter`]: no state, [`propose_ngram`] on each sequence.
pub struct PromptLookup {
    pub min_n: usize,
    pub max_n: usize,
}

impl Drafter for PromptLookup {
    fn propose(&mut self, wants: &[DraftWant<'_>]) -> Result<Vec<Vec<u32>>, String> {
        Ok(wants
            .iter()
            .map(|w| propose_ngram(w.tokens, self.min_n, self.max_n, w.k))
            .collect())
    }

    fn retain(&mut self, _live: &[SeqId]) {}
}

/// How the engine drafts tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DraftMethod {
    /// Prompt lookup: the continuation of the longest earlier match of the sequence's last
    /// `min_n..=max_n` tokens.
    Ngram { min_n: usize, max_n: usize },
    /// A smaller model sharing the target's tokenizer drafts greedily (`draft_model.rs`).
    Model,
}

/// Speculative decoding's settings (`--speculative`, `--num-speculative-tokens`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeculativeConfig {
    pub method: DraftMethod,
    /// Drafts per sequence per step at most (`K`).
    pub num_speculative_tokens: usize,
    /// A sequence's drafts pay while its acceptance (the share of drafted tokens accepted, a
    /// moving average) stays above this at batch size 1; see [`DraftGate`].
    pub min_acceptance: f32,
    /// Extra acceptance required per sequence in the batch beyond the first: a verify token
    /// costs more of a step's time the larger the batch.
    pub min_acceptance_per_seq: f32,
    /// No sequence drafts in a step with more running sequences than this (vLLM's
    /// `disable_by_batch_size`). A draft model's passes run before the target's step, one after
    /// another, so even one sequence drafting delays the whole batch by `K` draft steps: in a
    /// large batch that costs more than the few tokens it can win.
    pub disable_by_batch_size: Option<usize>,
}

impl SpeculativeConfig {
    /// Prompt lookup with `k` drafts and the default thresholds.
    pub fn ngram(k: usize) -> Self {
        Self {
            method: DraftMethod::Ngram { min_n: 2, max_n: 4 },
            num_speculative_tokens: k,
            min_acceptance: 0.25,
            min_acceptance_per_seq: 0.1,
            disable_by_batch_size: None,
        }
    }

    /// A draft model with `k` drafts. Unlike prompt lookup, each draft costs a forward pass
    /// of the draft model, so drafts must be accepted more often to pay: with a draft step at
    /// 15% of a target step and `k = 4`, a verification costs ~1.6 target steps and yields
    /// `(1 - a^5) / (1 - a)` tokens at acceptance `a`, which passes 1.6 near `a = 0.4`. And no
    /// drafting at all above 4 running sequences: measured, a batch of 8 ran at 0.56-0.90x of
    /// its speed without drafts while the per-sequence gates kept a few sequences drafting
    /// (docs/speculative-decoding.md).
    pub fn draft_model(k: usize) -> Self {
        Self {
            method: DraftMethod::Model,
            min_acceptance: 0.4,
            disable_by_batch_size: Some(4),
            ..Self::ngram(k)
        }
    }

    /// How many drafts a sequence with room for `room` more drafted tokens may take in a step
    /// of `batch_size` running sequences: none above `disable_by_batch_size`.
    pub fn drafts_for(&self, room: usize, batch_size: usize) -> usize {
        match self.disable_by_batch_size {
            Some(limit) if batch_size > limit => 0,
            _ => self.num_speculative_tokens.min(room),
        }
    }

    /// The acceptance below which a sequence stops drafting, in a batch of `batch_size`
    /// sequences.
    pub fn acceptance_floor(&self, batch_size: usize) -> f32 {
        self.min_acceptance + self.min_acceptance_per_seq * batch_size.saturating_sub(1) as f32
    }
}

/// Whether a request's tokens may be drafted and verified at all (see the module docs); the
/// per-step conditions (`min_tokens`, room left) are the engine's.
pub fn request_speculates(request: &ValidatedRequest) -> bool {
    let p = &request.params;
    request.constraint.is_none()
        && p.repetition_penalty == 1.0
        && p.presence_penalty == 0.0
        && p.frequency_penalty == 0.0
}

/// Prompt lookup: the tokens that followed the most recent earlier occurrence of the last `n`
/// tokens of `tokens`, for the largest `n` in `min_n..=max_n` that has one; at most `k` of them.
/// Empty when nothing matches.
pub fn propose_ngram(tokens: &[u32], min_n: usize, max_n: usize, k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    let len = tokens.len();
    for n in (min_n.max(1)..=max_n).rev() {
        if n >= len {
            continue;
        }
        let suffix = &tokens[len - n..];
        // Latest first: recent context predicts best. A match may overlap the suffix (a
        // repeated run); `start < len - n` leaves at least one token after it to propose.
        let found = (0..len - n)
            .rev()
            .find(|&start| &tokens[start..start + n] == suffix);
        if let Some(start) = found {
            let from = start + n;
            return tokens[from..(from + k).min(len)].to_vec();
        }
    }
    Vec::new()
}

/// Drafts from a predicted output: its next `k` tokens while `output` is a prefix of it; then what
/// followed the last `n` tokens of `output` in `prediction`, for the largest `n` in
/// `min_n..=max_n` that occurs there, at the occurrence ending nearest `output.len()` (an
/// edited text keeps its order, so that is most likely where the output is); at most `k`
/// tokens. Empty when nothing matches or there is no prediction.
pub fn propose_from_prediction(
    output: &[u32],
    prediction: &[u32],
    min_n: usize,
    max_n: usize,
    k: usize,
) -> Vec<u32> {
    let len = output.len();
    // The engine drafts only once the prompt's step has sampled a first token, so the start is
    // recognized as a prefix, not as an empty output; shorter than `min_n`, no n-gram would.
    if prediction.starts_with(output) {
        return prediction[len..(len + k).min(prediction.len())].to_vec();
    }
    for n in (min_n.max(1)..=max_n).rev() {
        if n > len || n >= prediction.len() {
            continue;
        }
        let suffix = &output[len - n..];
        // A match must leave at least one token after it to propose.
        let nearest = (0..prediction.len() - n)
            .filter(|&start| &prediction[start..start + n] == suffix)
            .min_by_key(|&start| (start + n).abs_diff(len));
        if let Some(start) = nearest {
            let from = start + n;
            return prediction[from..(from + k).min(prediction.len())].to_vec();
        }
    }
    Vec::new()
}

/// One sequence's record of how its drafts fare, deciding whether it drafts this step.
#[derive(Debug, Clone)]
pub struct DraftGate {
    /// Moving average of the share of drafted tokens accepted per verification.
    acceptance: f32,
    /// Steps to wait next time the sequence is switched off; doubles each time.
    backoff: u64,
    /// The engine step before which it does not draft.
    paused_until: u64,
}

impl Default for DraftGate {
    fn default() -> Self {
        Self {
            // Optimistic: a sequence earns its first verifications; a bad first one (weight
            // below) switches it off at once.
            acceptance: 1.0,
            backoff: Self::FIRST_BACKOFF,
            paused_until: 0,
        }
    }
}

impl DraftGate {
    const FIRST_BACKOFF: u64 = 8;
    const MAX_BACKOFF: u64 = 512;
    /// Weight of the latest verification in the moving average.
    const WEIGHT: f32 = 0.5;

    /// Whether the sequence may draft at engine step `step`.
    pub fn open(&self, step: u64) -> bool {
        step >= self.paused_until
    }

    /// Records a verification of `drafted` tokens of which `accepted` were, at engine step
    /// `step`, in a batch whose acceptance floor is `floor`; below it the gate closes for a
    /// while, and the average starts over from the floor when it reopens.
    pub fn record(&mut self, drafted: usize, accepted: usize, step: u64, floor: f32) {
        if drafted == 0 {
            return;
        }
        let share = accepted as f32 / drafted as f32;
        self.acceptance += Self::WEIGHT * (share - self.acceptance);
        if self.acceptance < floor {
            self.paused_until = step + self.backoff;
            self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
            // One good verification after the pause keeps it open; a bad one closes it again.
            self.acceptance = floor;
        } else if share >= floor {
            self.backoff = Self::FIRST_BACKOFF;
        }
    }

    /// The moving average of accepted drafts, for tests and traces.
    pub fn acceptance(&self) -> f32 {
        self.acceptance
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_proposes_what_followed_the_longest_latest_match() {
        // "1 2 3" occurs at 0 and 5; the latest earlier one (5) is followed by 9 1 2.
        let tokens = [1, 2, 3, 4, 5, 1, 2, 3, 9, 1, 2, 3];
        assert_eq!(propose_ngram(&tokens, 1, 3, 3), vec![9, 1, 2]);
        assert_eq!(propose_ngram(&tokens, 1, 3, 10), vec![9, 1, 2, 3]);
        // No 2-gram "7 8" earlier: falls back to the 1-gram "8".
        let tokens = [8, 6, 5, 7, 8];
        assert_eq!(propose_ngram(&tokens, 1, 2, 2), vec![6, 5]);
        assert!(
            propose_ngram(&tokens, 2, 2, 2).is_empty(),
            "min_n bounds it"
        );
        assert!(
            propose_ngram(&[1, 2, 3], 1, 3, 4).is_empty(),
            "nothing repeats"
        );
        assert!(propose_ngram(&tokens, 1, 2, 0).is_empty());
    }

    #[test]
    fn a_prediction_drafts_its_start_then_follows_the_output_through_it() {
        let prediction = [10, 11, 12, 13, 14, 15, 11, 12, 16, 17];
        // Nothing generated yet: the prediction's start.
        assert_eq!(
            propose_from_prediction(&[], &prediction, 2, 4, 3),
            [10, 11, 12]
        );
        // The output so far matches the start: continue from there.
        assert_eq!(
            propose_from_prediction(&[10, 11, 12], &prediction, 2, 4, 3),
            [13, 14, 15]
        );
        // `11 12` occurs twice; after 7 output tokens the later occurrence is nearer.
        let output = [10, 11, 12, 13, 14, 15, 11, 12];
        assert_eq!(
            propose_from_prediction(&output, &prediction, 2, 4, 5),
            [16, 17]
        );
        assert_eq!(
            propose_from_prediction(&[99, 11, 12], &prediction, 2, 4, 2),
            [13, 14]
        );
        // An edit the prediction does not contain: nothing, and prompt lookup takes over.
        assert!(propose_from_prediction(&[10, 99], &prediction, 2, 4, 3).is_empty());
        assert!(propose_from_prediction(&[10, 11], &[], 2, 4, 3).is_empty());
        // An output that ran ahead of or behind the prediction still finds its only match.
        assert_eq!(
            propose_from_prediction(&[5, 12, 13], &[12, 13, 1, 9, 13, 2], 2, 4, 2),
            [1, 9]
        );
    }

    #[test]
    fn a_match_overlapping_the_suffix_proposes_the_repetition() {
        // "5 5" ends the sequence and occurs at 1..3: the run continues.
        assert_eq!(propose_ngram(&[4, 5, 5, 5], 2, 2, 3), vec![5]);
    }

    #[test]
    fn the_gate_closes_on_poor_acceptance_and_reopens_later() {
        let config = SpeculativeConfig::ngram(4);
        let floor = config.acceptance_floor(1);
        let mut gate = DraftGate::default();
        assert!(gate.open(0));
        gate.record(4, 4, 0, floor);
        assert!(gate.open(1), "all accepted");
        for step in 1..=3 {
            assert!(
                gate.open(step),
                "one bad verification does not undo a good one"
            );
            gate.record(4, 0, step, floor);
        }
        assert!(!gate.open(4), "three rejections in a row close it");
        let reopens = 3 + DraftGate::FIRST_BACKOFF;
        assert!(!gate.open(reopens - 1));
        assert!(gate.open(reopens));
        gate.record(4, 0, reopens, floor);
        assert!(
            !gate.open(reopens + DraftGate::FIRST_BACKOFF),
            "a bad probe closes it again, for twice as long"
        );
        assert!(gate.open(reopens + 2 * DraftGate::FIRST_BACKOFF));
    }

    #[test]
    fn a_larger_batch_asks_for_more_acceptance() {
        let config = SpeculativeConfig::ngram(4);
        assert!(config.acceptance_floor(8) > config.acceptance_floor(1));
        let mut gate = DraftGate::default();
        // Half accepted: pays alone, not in a batch of 8.
        for step in 0..4 {
            gate.record(4, 2, step, config.acceptance_floor(1));
        }
        assert!(gate.open(4));
        for step in 4..8 {
            gate.record(4, 2, step, config.acceptance_floor(8));
        }
        assert!(!gate.open(8));
    }
}
