//! The interface between the engine and a model runner.

use crate::batch::StepBatch;

/// Shape of the paged KV cache a runner owns, which the engine's block manager mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheGeometry {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
}

/// Logits of the sampled rows of one step, row-major `[rows, vocab_size]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub vocab_size: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn num_rows(&self) -> usize {
        self.data.len().checked_div(self.vocab_size).unwrap_or(0)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab_size..(i + 1) * self.vocab_size]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.vocab_size..(i + 1) * self.vocab_size]
    }
}

/// What the engine drives: one forward pass over a ragged batch, writing the new tokens' K/V
/// into the runner's paged cache and returning logits for the sequences that sample.
pub trait ModelExecutor {
    type Error: std::error::Error + Send + Sync + 'static;

    fn cache_geometry(&self) -> CacheGeometry;

    /// The sliding window of each KV group of the runner's cache (`None`: a group of global
    /// layers), in the order the step's slots and block tables give them (see
    /// `block_manager.rs`). One global group unless the model has sliding-window layers.
    fn kv_group_windows(&self) -> Vec<Option<usize>> {
        vec![None]
    }

    fn vocab_size(&self) -> usize;

    /// Blocks in the runner's host swap pool, which holds the K/V of sequences preempted by
    /// swapping (`PreemptionMode::Swap`, see `swap.rs`); 0 when it has none, and then every
    /// preemption recomputes. A runner with a pool copies [`StepBatch::swap_out`] (device to
    /// host) before anything else in a step and [`StepBatch::swap_in`] (host to device) after
    /// the block copies, before the forward pass.
    fn swap_capacity_blocks(&self) -> usize {
        0
    }

    /// Runs one step. Rows of the result are those of [`StepBatch::sampled_rows`], in its
    /// order: one per sampled sequence, or one per new token of a scored one.
    fn execute(&mut self, batch: &StepBatch) -> Result<Logits, Self::Error>;

    /// Calls `f(i)` once for every `i` in `0..n`, in any order, on the executor's own threads if
    /// it has any: the engine samples a step's logits rows through this, so that sampling uses
    /// the cores the model just used instead of one of them.
    fn for_each_index(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(f)
    }
}
