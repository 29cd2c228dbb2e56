//! Swap preemption: a preempted sequence's K/V moved to a host pool and back, instead of being
//! dropped and recomputed (vLLM v0's `--preemption-mode swap`).
//!
//! The model runner owns the host pool (separate memory beside the device pool: on the CPU a
//! second allocation, on a GPU pinned host memory) and says how many blocks it holds
//! ([`ModelExecutor::swap_capacity_blocks`](crate::ModelExecutor::swap_capacity_blocks)); this
//! module does the bookkeeping, which host block holds which logical block of which swapped
//! sequence, and queues the copies the runner makes at the start of the next step
//! ([`StepBatch::swap_out`](crate::StepBatch::swap_out), [`StepBatch::swap_in`](crate::StepBatch::swap_in)).
//!
//! * **Out.** Every held block of the sequence's computed tokens, in every KV group, gets a
//!   host block, and the device blocks are freed as recompute preemption frees them (so they
//!   stay in the prefix cache until reused). The copies run first in the next step, before
//!   anything writes, so they read the blocks as the previous step left them, even when the
//!   scheduler hands those blocks to someone else in the same step. When the host pool is
//!   full the sequence is recomputed instead.
//! * **In.** When the sequence is admitted again it gets fresh private device blocks for its
//!   host blocks, its block tables, hashes and computed tokens come back, and it continues
//!   where it stopped: one decode token, not a prefill of its whole context. The restored
//!   blocks are not registered in the prefix cache again (their content is registered already,
//!   or was evicted; a duplicate stays private, as in `block_manager.rs`).
//! * **Host blocks freed at the next step.** A host block given up (swapped in, or its sequence
//!   aborted) is reused only from the next step on: within one step, the swap-outs run before
//!   the swap-ins, and a host block being read by a swap-in must not be overwritten first.

use std::collections::HashMap;

use crate::batch::BlockSwap;
use crate::block_manager::BlockManager;
use crate::sequence::{BlockHash, SeqId, Sequence, RELEASED_BLOCK};

/// What a swapped-out sequence had on the device.
#[derive(Debug, Clone)]
struct SwappedSeq {
    /// Per KV group, the host block of each logical block ([`RELEASED_BLOCK`] where a sliding
    /// window had released it).
    host_tables: Vec<Vec<u32>>,
    block_hashes: Vec<BlockHash>,
    num_computed_tokens: usize,
}

/// Outcome of [`SwapSpace::swap_in`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapIn {
    /// The sequence holds no swapped K/V (recomputed, or new): admit it the ordinary way.
    NotSwapped,
    /// Not enough free device blocks for its K/V and its new tokens; nothing changed.
    NoRoom,
    /// Its blocks are back (copies queued) and room for its new tokens allocated.
    Resumed,
}

/// The host pool's bookkeeping and the swaps queued for the step being scheduled.
#[derive(Debug, Default)]
pub struct SwapSpace {
    num_blocks: usize,
    free: Vec<u32>,
    /// Given up during this step; free from the next one.
    released: Vec<u32>,
    swapped: HashMap<SeqId, SwappedSeq>,
    pending_out: Vec<BlockSwap>,
    pending_in: Vec<BlockSwap>,
    num_swapped_out: u64,
    num_swapped_in: u64,
}

impl SwapSpace {
    /// A host pool of `num_blocks` blocks (0: every preemption recomputes).
    pub fn new(num_blocks: usize) -> Self {
        Self {
            num_blocks,
            free: (0..num_blocks as u32).rev().collect(),
            ..Self::default()
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Sequences whose K/V sit in the host pool.
    pub fn num_swapped(&self) -> usize {
        self.swapped.len()
    }

    /// Swap-outs and swap-ins since start.
    pub fn counts(&self) -> (u64, u64) {
        (self.num_swapped_out, self.num_swapped_in)
    }

    pub fn is_swapped(&self, id: SeqId) -> bool {
        self.swapped.contains_key(&id)
    }

    /// Computed tokens a swapped sequence comes back with.
    pub fn computed_tokens(&self, id: SeqId) -> Option<usize> {
        self.swapped.get(&id).map(|s| s.num_computed_tokens)
    }

    /// Starts a step: host blocks given up during the last one are free again.
    pub fn begin_step(&mut self) {
        self.free.append(&mut self.released);
    }

    /// Moves the K/V of `seq`'s computed tokens to host blocks and frees its device blocks.
    /// False, changing nothing, when it has nothing computed or the host pool lacks room: the
    /// caller frees it for recomputation instead.
    pub fn swap_out(&mut self, seq: &mut Sequence, blocks: &mut BlockManager) -> bool {
        let computed = seq.num_computed_tokens;
        let logical = blocks.blocks_for(computed).min(seq.num_logical_blocks());
        let held = seq
            .block_tables
            .iter()
            .flat_map(|table| &table[..logical])
            .filter(|&&id| id != RELEASED_BLOCK)
            .count();
        if computed == 0 || held > self.free.len() {
            return false;
        }
        let host_tables = seq
            .block_tables
            .iter()
            .map(|table| {
                table[..logical]
                    .iter()
                    .map(|&id| {
                        if id == RELEASED_BLOCK {
                            return RELEASED_BLOCK;
                        }
                        let host = self.free.pop().expect("counted above");
                        self.pending_out.push((blocks.pre_step_block(id), host));
                        host
                    })
                    .collect()
            })
            .collect();
        // Hashes of blocks this step was to fill are dropped: the step never computes them.
        let full = computed / blocks.block_size();
        let block_hashes = seq.block_hashes[..full.min(seq.block_hashes.len())].to_vec();
        blocks.free(seq);
        self.swapped.insert(
            seq.id,
            SwappedSeq {
                host_tables,
                block_hashes,
                num_computed_tokens: computed,
            },
        );
        self.num_swapped_out += 1;
        true
    }

    /// Brings a swapped-out `seq` back to device blocks and allocates room for its next
    /// `num_new_tokens` tokens.
    pub fn swap_in(
        &mut self,
        seq: &mut Sequence,
        blocks: &mut BlockManager,
        num_new_tokens: usize,
    ) -> SwapIn {
        let Some(saved) = self.swapped.get(&seq.id) else {
            return SwapIn::NotSwapped;
        };
        let host: Vec<u32> = saved
            .host_tables
            .iter()
            .flatten()
            .copied()
            .filter(|&h| h != RELEASED_BLOCK)
            .collect();
        let logical = saved.host_tables.first().map_or(0, Vec::len);
        let grow = blocks
            .blocks_for(saved.num_computed_tokens + num_new_tokens)
            .saturating_sub(logical);
        // Conservative (releases by a sliding window would free some): never half-done.
        if host.len() + grow * blocks.num_groups() > blocks.num_free_blocks() {
            return SwapIn::NoRoom;
        }
        let device = blocks.take_blocks(host.len()).expect("counted above");
        let mut next = device.iter().copied();
        seq.block_tables = saved
            .host_tables
            .iter()
            .map(|table| {
                table
                    .iter()
                    .map(|&h| match h {
                        RELEASED_BLOCK => RELEASED_BLOCK,
                        _ => next.next().expect("one device block per host block"),
                    })
                    .collect()
            })
            .collect();
        seq.block_hashes.clone_from(&saved.block_hashes);
        seq.num_computed_tokens = saved.num_computed_tokens;
        if !blocks.allocate_slots(seq, num_new_tokens, None) {
            blocks.free(seq);
            return SwapIn::NoRoom;
        }
        self.pending_in.extend(host.iter().copied().zip(device));
        self.released.extend(host);
        self.swapped.remove(&seq.id);
        self.num_swapped_in += 1;
        SwapIn::Resumed
    }

    /// Forgets a sequence removed while swapped out (finished by an abort); its host blocks
    /// are free from the next step.
    pub fn discard(&mut self, id: SeqId) {
        if let Some(saved) = self.swapped.remove(&id) {
            let host = saved.host_tables.into_iter().flatten();
            self.released.extend(host.filter(|&h| h != RELEASED_BLOCK));
        }
    }

    /// The swaps queued since the last call, `(out, in)`, for the step being ended.
    pub fn take_swaps(&mut self) -> (Vec<BlockSwap>, Vec<BlockSwap>) {
        (
            std::mem::take(&mut self.pending_out),
            std::mem::take(&mut self.pending_in),
        )
    }
}
