//! The step profiler sees every phase of a real forward pass, and nothing when off.

use std::time::Instant;

use candle_core::quantized::GgmlDType;
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::runner::ModelRunner;
use minserve_model::step_profile::{self, Phase};
use minserve_model::{CacheOptions, LlamaModel};

#[test]
fn a_profiled_pass_gives_time_to_every_phase_and_an_unprofiled_one_none() {
    // Gemma 3's shape, so that every kind of norm runs (query/key norms, post-norms), without
    // its sliding window (one KV group, so one block table).
    let mut config = minserve_model::synthetic::preset("tiny-gemma3").unwrap();
    config.block.sliding_window = None;
    let weights = minserve_model::synthetic::build(&config, 7, GgmlDType::Q8_0, true).unwrap();
    let mut runner = ModelRunner::new(LlamaModel::new(weights), CacheOptions::default());
    let block_size = runner.cache_geometry().block_size;
    let prompt: Vec<u32> = (0..40).map(|i| 3 + i * 7).collect();
    let table: Vec<u32> = (0..prompt.len().div_ceil(block_size) as u32).collect();
    let mut batch = StepBatch::new();
    batch.push_sequence(&prompt, 0, &table, block_size, true);

    step_profile::enable(true);
    let start = Instant::now();
    runner.execute(&batch).unwrap();
    let wall = start.elapsed().as_secs_f64();
    step_profile::enable(false);
    let profile = step_profile::take();
    assert_eq!(profile.steps, 1);
    assert_eq!(profile.seconds.len(), Phase::ALL.len());
    for (phase, seconds) in &profile.seconds {
        assert!(*seconds > 0.0, "{phase:?} got no time: {profile:?}");
    }
    assert!(profile.total_seconds() <= wall, "{profile:?} in {wall} s");

    runner.execute(&batch).unwrap();
    let off = step_profile::take();
    assert_eq!(off.steps, 0);
    assert_eq!(off.total_seconds(), 0.0, "{off:?}");
}
