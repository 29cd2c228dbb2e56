//! Constrained decoding as the engine sees it: a request may carry a grammar
//! ([`ConstraintFactory`]); each of its samples then walks the grammar ([`Constraint`]) and
//! may draw only the tokens it allows next ([`TokenMask`]).
//!
//! The grammar engine itself lives outside the core (`crates/grammar`, on llguidance), so
//! that the core keeps no heavy dependency. The engine computes a sample's mask for the next
//! step while the model runs the forward pass (`Engine::step`), applies it to the logits row
//! before anything else in sampling, and commits the drawn token; a sample whose grammar is
//! complete ends with `finish_reason` `stop`. Rows without a grammar pay nothing.

use std::fmt;

/// The set of token ids a sample may draw next, one bit per vocabulary entry (32 per word,
/// lowest bit first: the layout llguidance writes, so a mask is filled by a word copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMask {
    words: Vec<u32>,
}

impl TokenMask {
    /// A mask over `vocab_size` ids with none allowed.
    pub fn new(vocab_size: usize) -> Self {
        Self {
            words: vec![0; vocab_size.div_ceil(32)],
        }
    }

    /// The bits, for a grammar engine to fill; ids past the mask's vocabulary stay banned.
    pub fn words_mut(&mut self) -> &mut [u32] {
        &mut self.words
    }

    pub fn allow(&mut self, token: u32) {
        if let Some(w) = self.words.get_mut(token as usize / 32) {
            *w |= 1 << (token % 32);
        }
    }

    pub fn is_allowed(&self, token: u32) -> bool {
        self.words
            .get(token as usize / 32)
            .is_some_and(|w| w & (1 << (token % 32)) != 0)
    }

    /// How many ids are allowed.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Bans, in `logits`, every id the mask does not allow (its logit becomes -inf), so that
    /// whatever sampling does next (penalties, temperature, top-k/p, logprobs) sees only the
    /// allowed tokens. Whole words of banned ids are skipped in one test each.
    pub fn apply(&self, logits: &mut [f32]) {
        for (chunk, &word) in logits.chunks_mut(32).zip(&self.words) {
            if word == u32::MAX {
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word & (1 << bit) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        // Logits past the mask's words (a model vocabulary padded past the tokenizer's).
        let covered = self.words.len() * 32;
        if logits.len() > covered {
            logits[covered..].fill(f32::NEG_INFINITY);
        }
    }
}

/// One sample's walk through its grammar.
pub trait Constraint: Send {
    /// Writes into `mask` the tokens allowed next (the mask comes cleared). An error ends the
    /// request (a grammar engine out of its per-step budget, say).
    fn fill_mask(&mut self, mask: &mut TokenMask) -> Result<(), String>;
    /// Advances past `token`, which the last mask allowed.
    fn commit(&mut self, token: u32) -> Result<(), String>;
    /// The grammar is complete and allows no more tokens: the sample ends (`stop`).
    fn is_complete(&self) -> bool;
}

/// A compiled grammar, shared by a request's samples; each starts its own walk.
pub trait ConstraintFactory: Send + Sync + fmt::Debug {
    fn start(&self) -> Box<dyn Constraint>;
}

/// A sample's constraint and the mask of its next token.
pub(crate) struct ConstrainedSample {
    pub constraint: Box<dyn Constraint>,
    pub mask: TokenMask,
    /// `mask` holds the current position's allowed tokens.
    pub mask_ready: bool,
}

impl ConstrainedSample {
    pub fn new(constraint: Box<dyn Constraint>, vocab_size: usize) -> Self {
        Self {
            constraint,
            mask: TokenMask::new(vocab_size),
            mask_ready: false,
        }
    }

    /// Computes the mask of the next token unless it is already there.
    pub fn prepare_mask(&mut self) -> Result<(), String> {
        if !self.mask_ready {
            self.mask.words_mut().fill(0);
            self.constraint.fill_mask(&mut self.mask)?;
            self.mask_ready = true;
        }
        Ok(())
    }

    /// Advances past the drawn `token`; the next mask is computed anew.
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.mask_ready = false;
        self.constraint.commit(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_bans_exactly_the_ids_it_does_not_allow() {
        let mut mask = TokenMask::new(70);
        for t in [0, 31, 32, 69] {
            mask.allow(t);
        }
        // The logits row is longer than the mask's vocabulary (a padded embedding).
        let mut logits = vec![1.0; 80];
        mask.apply(&mut logits);
        let allowed: Vec<usize> = (0..80).filter(|&i| logits[i] == 1.0).collect();
        assert_eq!(allowed, [0, 31, 32, 69]);
        assert_eq!(mask.count(), 4);
        assert!(mask.is_allowed(69) && !mask.is_allowed(70) && !mask.is_allowed(1000));
    }
}
