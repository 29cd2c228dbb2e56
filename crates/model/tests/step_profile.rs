//! The step profiler sees every phase of a real forward pass, and nothing when off.

use std::time::Instant;

use candle_core::quantized::GgmlDType;
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::runner::ModelRunner;
use minserve_model::step_profile::{self, Phase};
use minserve_model::{CacheOptions, LlamaModel};

/// One profiled prefill of 40 tokens on Gemma 3's shape in `format`, so that every kind of norm
/// runs (query/key norms, post-norms), without its sliding window (one KV group, so one block
/// table); then the same unprofiled, which must record nothing.
fn profile_a_pass(format: GgmlDType) -> step_profile::StepProfile {
    let mut config = minserve_model::synthetic::preset("tiny-gemma3").unwrap();
    config.block.sliding_window = None;
    let weights = minserve_model::synthetic::build(&config, 7, format, true).unwrap();
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
    assert!(profile.total_seconds() <= wall, "{profile:?} in {wall} s");

    runner.execute(&batch).unwrap();
    let off = step_profile::take();
    assert_eq!(off.steps, 0);
    assert_eq!(off.total_seconds(), 0.0, "{off:?}");
    profile
}

fn seconds(profile: &step_profile::StepProfile, phase: Phase) -> f64 {
    profile.seconds.iter().find(|(p, _)| *p == phase).unwrap().1
}

#[test]
fn a_profiled_pass_on_packed_weights_times_every_phase_but_the_fused_activation() {
    // The activation function is made inside the down projection's input quantization.
    let profile = profile_a_pass(GgmlDType::Q8_0);
    for phase in Phase::ALL {
        let seconds = seconds(&profile, phase);
        match phase {
            Phase::ActivationFunction => assert_eq!(seconds, 0.0, "{profile:?}"),
            _ => assert!(seconds > 0.0, "{phase:?} got no time: {profile:?}"),
        }
    }
}

#[test]
fn a_profiled_pass_on_dense_weights_times_the_unfused_row_passes() {
    // Dense weights take stored rows: the norms, adds and activation are passes of their own,
    // and no activation is quantized.
    let profile = profile_a_pass(GgmlDType::F32);
    for phase in [Phase::Norms, Phase::Residual, Phase::ActivationFunction] {
        assert!(seconds(&profile, phase) > 0.0, "{phase:?}: {profile:?}");
    }
    assert_eq!(
        seconds(&profile, Phase::ActivationQuantize),
        0.0,
        "{profile:?}"
    );
}
