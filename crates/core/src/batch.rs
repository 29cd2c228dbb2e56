//! One engine step's work for the model: a *ragged* batch.
//!
//! Prefill and decode are the same idea here (vLLM v1 style): every scheduled sequence contributes
//! the tokens it has not computed yet — a whole prompt, a chunk of one, or the single token sampled
//! last step. The model sees all those tokens as one flat list, so a step can mix prompt chunks and
//! decode tokens of many sequences without padding.
//!
//! **KV groups.** A model whose layers have different attention spans (Gemma 3: sliding-window
//! layers beside global ones) keeps its layers' K/V in several *KV groups*, each with its own
//! block table per sequence (see `block_manager.rs`). Group 0's slots and tables are the plain
//! fields below (`slot_mapping`, `block_table`), so a model with one group sees nothing else;
//! groups 1.. follow in `group_slot_mappings` / `group_block_tables`. [`StepBatch::slots`] and
//! [`SequenceChunk::table`] index them all alike.

use crate::sequence::RELEASED_BLOCK;

/// A block's contents to duplicate before a step writes: `(source, destination)` block ids.
pub type BlockCopy = (u32, u32);

/// A block's contents to move between the device pool and the host swap pool: `(source,
/// destination)`, a device block and a host block for a swap-out, the other way round for a
/// swap-in (see `swap.rs`).
pub type BlockSwap = (u32, u32);

/// The part of a [`StepBatch`] that belongs to one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceChunk {
    /// How many rows of the flat arrays (`token_ids`, `positions`, `slot_mapping`) belong to this
    /// sequence; its rows follow the previous sequence's.
    pub num_new_tokens: usize,
    /// Tokens of this sequence held in the KV cache once this step has written its new ones, i.e.
    /// the position of its last new token plus one. Attention for a new token at position `p`
    /// reads cache slots `0..=p`.
    pub context_len: usize,
    /// Physical block id of each logical block of the sequence in KV group 0, in order. Token at
    /// position `p` lives in block `block_table[p / block_size]` at offset `p % block_size`.
    pub block_table: Vec<u32>,
    /// The same for KV groups 1..; a sliding-window group's table holds
    /// [`RELEASED_BLOCK`] where its blocks lie wholly before the window of every new token.
    pub group_block_tables: Vec<Vec<u32>>,
    /// Whether the engine wants logits for this sequence's last new token. A prompt chunk that
    /// does not reach the end of the prompt needs none, and the model skips its lm_head row.
    pub sample: bool,
    /// Whether the logits of *every* new token are wanted, not only the last one's: scoring a
    /// text (perplexity, teacher-forced comparisons) needs the prediction at each position,
    /// and one pass over the text gives them all. Only meaningful with `sample`.
    pub logits_for_every_token: bool,
}

impl SequenceChunk {
    /// Position of the first new token.
    pub fn start_position(&self) -> usize {
        self.context_len - self.num_new_tokens
    }

    /// Rows of logits this sequence gets from the step.
    pub fn num_logit_rows(&self) -> usize {
        match (self.sample, self.logits_for_every_token) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => self.num_new_tokens,
        }
    }

    /// The block table of KV group `group`.
    pub fn table(&self, group: usize) -> &[u32] {
        match group {
            0 => &self.block_table,
            g => &self.group_block_tables[g - 1],
        }
    }
}

/// Everything the model needs for one forward pass over a ragged batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepBatch {
    /// Token ids of every new token of every sequence, sequence after sequence.
    pub token_ids: Vec<u32>,
    /// Position of each new token within its own sequence (drives RoPE).
    pub positions: Vec<u32>,
    /// Cache slot (`block_id * block_size + offset`) where each new token's K/V is written, in
    /// KV group 0.
    pub slot_mapping: Vec<u32>,
    /// The same for KV groups 1.. (empty for a model with one group).
    pub group_slot_mappings: Vec<Vec<u32>>,
    /// The sequences, in the same order as their rows.
    pub sequences: Vec<SequenceChunk>,
    /// Blocks whose K/V the model copies, `(source, destination)`, one after another in this
    /// order, before it writes any of this step's K/V: copy-on-write of a block that a
    /// sequence is about to write while others still read it (see `block_manager.rs`).
    pub block_copies: Vec<BlockCopy>,
    /// Device blocks the model copies to host blocks first of all, before the copies above:
    /// the K/V of sequences preempted by swapping, read as the previous step left them.
    pub swap_out: Vec<BlockSwap>,
    /// Host blocks the model copies back to device blocks after the copies above and before
    /// the forward pass: sequences resumed from the swap pool.
    pub swap_in: Vec<BlockSwap>,
}

impl StepBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `new_tokens` of a sequence whose first `num_computed` tokens are already cached,
    /// for a model with one KV group.
    ///
    /// Positions and cache slots are derived from the block table here, once, so that the model
    /// never has to know how blocks were assigned.
    ///
    /// # Panics
    /// If the block table is too short for the new tokens: that is a scheduler bug, not user input.
    pub fn push_sequence(
        &mut self,
        new_tokens: &[u32],
        num_computed: usize,
        block_table: &[u32],
        block_size: usize,
        sample: bool,
    ) {
        self.push_sequence_groups(
            new_tokens,
            num_computed,
            std::slice::from_ref(&block_table),
            block_size,
            sample,
        );
    }

    /// [`push_sequence`](Self::push_sequence) with one block table per KV group. Every sequence
    /// of a batch has the same number of groups.
    ///
    /// # Panics
    /// If a table is too short for the new tokens, or a new token would land in a released
    /// block: scheduler bugs.
    pub fn push_sequence_groups<T: AsRef<[u32]>>(
        &mut self,
        new_tokens: &[u32],
        num_computed: usize,
        block_tables: &[T],
        block_size: usize,
        sample: bool,
    ) {
        let context_len = num_computed + new_tokens.len();
        let (first, rest) = block_tables
            .split_first()
            .expect("a sequence has at least one KV group");
        if self.sequences.is_empty() {
            self.group_slot_mappings = vec![Vec::new(); rest.len()];
        }
        assert_eq!(
            self.group_slot_mappings.len(),
            rest.len(),
            "every sequence of a batch has the same KV groups"
        );
        let slots = std::iter::once(&mut self.slot_mapping).chain(&mut self.group_slot_mappings);
        for (table, slots) in block_tables.iter().zip(slots) {
            let table = table.as_ref();
            assert!(
                table.len() * block_size >= context_len,
                "block table of {} blocks cannot hold {context_len} tokens",
                table.len()
            );
            for position in num_computed..context_len {
                let block = table[position / block_size];
                assert_ne!(
                    block, RELEASED_BLOCK,
                    "a new token lands in a released block"
                );
                slots.push((block as usize * block_size + position % block_size) as u32);
            }
        }
        self.token_ids.extend_from_slice(new_tokens);
        self.positions
            .extend((num_computed..context_len).map(|p| p as u32));
        self.sequences.push(SequenceChunk {
            num_new_tokens: new_tokens.len(),
            context_len,
            block_table: first.as_ref().to_vec(),
            group_block_tables: rest.iter().map(|t| t.as_ref().to_vec()).collect(),
            sample,
            logits_for_every_token: false,
        });
    }

    /// Like [`push_sequence_groups`](Self::push_sequence_groups) with `sample`, but the step
    /// returns a row of logits for each of `new_tokens` (in order), each predicting the token
    /// after it.
    pub fn push_scored_sequence<T: AsRef<[u32]>>(
        &mut self,
        new_tokens: &[u32],
        num_computed: usize,
        block_tables: &[T],
        block_size: usize,
    ) {
        self.push_sequence_groups(new_tokens, num_computed, block_tables, block_size, true);
        let pushed = self.sequences.last_mut().expect("just pushed");
        pushed.logits_for_every_token = true;
    }

    /// KV groups of the batch's cache.
    pub fn num_groups(&self) -> usize {
        1 + self.group_slot_mappings.len()
    }

    /// The cache slot of each new token in KV group `group`.
    pub fn slots(&self, group: usize) -> &[u32] {
        match group {
            0 => &self.slot_mapping,
            g => &self.group_slot_mappings[g - 1],
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }

    /// Number of rows of logits the step returns: one per sampled sequence, or one per new
    /// token of a sequence that wants [every token's](SequenceChunk::logits_for_every_token).
    pub fn num_sampled(&self) -> usize {
        self.sequences
            .iter()
            .map(SequenceChunk::num_logit_rows)
            .sum()
    }

    /// Rows (in the flat token arrays) whose logits the step returns, in output order: the last
    /// new token of each sampled sequence, or all of them for a sequence scored token by token.
    pub fn sampled_rows(&self) -> Vec<usize> {
        let mut rows = Vec::with_capacity(self.sequences.len());
        let mut end = 0;
        for seq in &self.sequences {
            end += seq.num_new_tokens;
            rows.extend(end - seq.num_logit_rows()..end);
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_block_table() {
        let mut batch = StepBatch::new();
        // 3 cached tokens, 3 new ones, blocks of 4: positions 3..6 straddle blocks 7 and 2.
        batch.push_sequence(&[10, 11, 12], 3, &[7, 2], 4, true);
        batch.push_sequence(&[20], 0, &[5], 4, false);
        assert_eq!(batch.positions, vec![3, 4, 5, 0]);
        assert_eq!(batch.slot_mapping, vec![7 * 4 + 3, 2 * 4, 2 * 4 + 1, 5 * 4]);
        assert_eq!(batch.sequences[0].context_len, 6);
        assert_eq!(batch.sequences[0].start_position(), 3);
        assert_eq!(batch.sampled_rows(), vec![2]);
        assert_eq!(batch.num_sampled(), 1);
    }

    #[test]
    fn a_scored_sequence_gets_a_row_per_new_token() {
        let mut batch = StepBatch::new();
        batch.push_sequence(&[1, 2], 0, &[0], 4, true);
        batch.push_scored_sequence(&[3, 4, 5], 1, &[[1]], 4);
        batch.push_sequence(&[6], 0, &[2], 4, false);
        assert_eq!(batch.sampled_rows(), vec![1, 2, 3, 4]);
        assert_eq!(batch.num_sampled(), 4);
    }

    #[test]
    fn each_kv_group_gets_its_own_slots() {
        let mut batch = StepBatch::new();
        // Group 1 (a window) has released its first block: positions 4..6 use block 3 there.
        let tables = [vec![7, 2], vec![RELEASED_BLOCK, 3]];
        batch.push_sequence_groups(&[10, 11], 4, &tables, 4, true);
        assert_eq!(batch.num_groups(), 2);
        assert_eq!(batch.slots(0), [2 * 4, 2 * 4 + 1]);
        assert_eq!(batch.slots(1), [3 * 4, 3 * 4 + 1]);
        assert_eq!(batch.sequences[0].table(1), [RELEASED_BLOCK, 3]);
    }

    #[test]
    #[should_panic(expected = "released block")]
    fn writing_into_a_released_block_is_a_bug() {
        let tables = [vec![7, 2], vec![RELEASED_BLOCK, 3]];
        StepBatch::new().push_sequence_groups(&[10], 3, &tables, 4, true);
    }

    #[test]
    #[should_panic(expected = "cannot hold")]
    fn a_short_block_table_is_a_bug() {
        StepBatch::new().push_sequence(&[1, 2, 3], 2, &[0], 4, true);
    }
}
