//! The strided, batched scoring against the plainest possible reading: one forward pass per
//! scored token over exactly the tokens before it in its window, its last row's logits taken
//! as they come out for sampling.

use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::{CacheOptions, ModelRunner, SyntheticSpec};

use super::score::{score_windows, window_tables, StepLimits, TokenScore};
use super::windows::{plan, Window};

fn runner(model: &str) -> ModelRunner {
    let loaded = SyntheticSpec::parse(model)
        .unwrap()
        .unwrap()
        .load()
        .unwrap();
    ModelRunner::new(
        loaded.model,
        CacheOptions {
            block_size: 4,
            memory_bytes: 4 << 20,
            ..CacheOptions::default()
        },
    )
}

fn naive_scores(runner: &mut ModelRunner, windows: &[Window]) -> Vec<TokenScore> {
    let block_size = runner.cache_geometry().block_size;
    let kv_groups = runner.kv_group_windows().len();
    let mut scores = Vec::new();
    for window in windows {
        for place in window.first_scored..window.input.len() {
            let before = &window.input[..place];
            let tables = window_tables(0, kv_groups, before.len().div_ceil(block_size));
            let mut batch = StepBatch::new();
            batch.push_sequence_groups(before, 0, &tables, block_size, true);
            let logits = runner.execute(&batch).unwrap();
            let row = logits.row(0);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
            let target = window.input[place] as usize;
            let argmax = row.iter().position(|&v| v == max).unwrap() as u32;
            scores.push(TokenScore {
                nll: z.ln() - f64::from(row[target] - max),
                argmax,
            });
        }
    }
    scores
}

fn assert_matches_naive(model: &str, bos: Option<u32>, context: usize, stride: usize) {
    let tokens: Vec<u32> = (0..150u32).map(|i| (i * 37 + 11) % 200 + 3).collect();
    let windows = plan(&tokens, bos, context, stride).unwrap();
    assert!(windows.len() > 3, "the text must span several windows");
    let mut runner = runner(model);
    // Small steps: windows side by side, split into chunks, the logits rows capped, so that
    // every path of the step building is taken.
    let limits = StepLimits {
        tokens: 23,
        logit_rows: 7,
        windows: 3,
    };
    let mut progress = Vec::new();
    let batched = score_windows(&mut runner, &windows, limits, |done| progress.push(done)).unwrap();
    assert_eq!(progress.last(), Some(&windows.len()));
    let naive = naive_scores(&mut runner, &windows);
    assert_eq!(batched.len(), naive.len());
    for (i, (b, n)) in batched.iter().zip(&naive).enumerate() {
        assert!(
            (b.nll - n.nll).abs() <= 1e-4 * n.nll.abs().max(1.0),
            "{model}: scored token {i}: {b:?} vs {n:?}"
        );
        assert_eq!(b.argmax, n.argmax, "{model}: scored token {i}");
    }
}

#[test]
fn batched_strided_scoring_equals_one_pass_per_token() {
    assert_matches_naive("synthetic:tiny", Some(1), 40, 16);
    assert_matches_naive("synthetic:tiny", None, 32, 32);
}

#[test]
fn sliding_window_layers_score_like_the_naive_reading() {
    // tiny-gemma3 attends over a window of 8 on its local layers: every eval window crosses it,
    // and its KV groups each get their own block tables.
    assert_matches_naive("synthetic:tiny-gemma3", Some(2), 48, 20);
}

#[test]
fn a_cache_too_small_for_one_window_is_an_error() {
    let mut runner = ModelRunner::new(
        SyntheticSpec::parse("synthetic:tiny")
            .unwrap()
            .unwrap()
            .load()
            .unwrap()
            .model,
        CacheOptions {
            block_size: 4,
            memory_bytes: 1,
            ..CacheOptions::default()
        },
    );
    let windows = plan(&(3..100).collect::<Vec<u32>>(), None, 64, 32).unwrap();
    let limits = StepLimits::new(64, 1 << 20, 512, 4);
    let err = score_windows(&mut runner, &windows, limits, |_| {}).unwrap_err();
    assert!(err.to_string().contains("cannot hold one window"), "{err}");
}
