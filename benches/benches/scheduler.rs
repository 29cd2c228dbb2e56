//! Cost of one scheduling step with 256 running (decoding) sequences: the scheduler must stay
//! far below the model's step time (target: under 1% of a decode step).
//!
//! `cargo bench -p minserve-benches --bench scheduler`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use minserve_core::block_manager::BlockManager;
use minserve_core::scheduler::{Scheduler, SchedulerConfig};
use minserve_core::sequence::Sequence;

const NUM_SEQS: usize = 256;
const PROMPT_LEN: usize = 128;
const BLOCK_SIZE: usize = 16;

/// 256 sequences with their prompts computed, and a pool big enough for `steps` more tokens
/// each, so that every measured step is a pure decode step and nothing is preempted.
fn decoding_scheduler(steps: u64) -> Scheduler {
    let blocks_per_seq = (PROMPT_LEN + steps as usize + 1).div_ceil(BLOCK_SIZE);
    let blocks = BlockManager::new(NUM_SEQS * blocks_per_seq, BLOCK_SIZE, true);
    let mut scheduler = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: NUM_SEQS,
            max_num_batched_tokens: PROMPT_LEN * NUM_SEQS,
            ..SchedulerConfig::default()
        },
        blocks,
    );
    for id in 0..NUM_SEQS as u64 {
        let prompt = (0..PROMPT_LEN as u32)
            .map(|t| (t * 7 + id as u32 * 13) % 50_000)
            .collect();
        scheduler.add(Sequence::new(id, prompt, 0, id));
    }
    let step = scheduler.schedule();
    scheduler.mark_computed(&step);
    append_sampled_tokens(&mut scheduler, &step);
    scheduler
}

fn append_sampled_tokens(
    scheduler: &mut Scheduler,
    step: &minserve_core::scheduler::ScheduledStep,
) {
    for s in step.seqs.iter().filter(|s| s.samples) {
        if let Some(seq) = scheduler.get_mut(s.id) {
            let token = (seq.len() as u32 * 31) % 50_000;
            seq.tokens.push(token);
        }
    }
}

fn decode_step_with_256_sequences(c: &mut Criterion) {
    c.bench_function("schedule 256 decoding sequences", |b| {
        b.iter_custom(|iters| {
            let mut scheduler = decoding_scheduler(iters);
            let start = Instant::now();
            for _ in 0..iters {
                let step = scheduler.schedule();
                assert_eq!(step.seqs.len(), NUM_SEQS);
                scheduler.mark_computed(&step);
                append_sampled_tokens(&mut scheduler, &step);
            }
            start.elapsed()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).sample_size(20);
    targets = decode_step_with_256_sequences
}
criterion_main!(benches);
