//! The GPU path against the CPU path on the same synthetic weights (feature `cuda`; needs a
//! GPU, so CI only compiles it: `benches/gpu/run.sh` runs it on a GPU machine).
//!
//! Both runners get the same ragged steps: prompts of several lengths prefilled together, one
//! of them in two chunks, then decode steps, all through paged block tables, with the CPU's
//! greedy token fed to both (teacher forcing, so one disagreement does not derail the rest).
#![cfg(feature = "cuda")]

use candle_core::DType;
use minserve_core::sampling::Rng;
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::{CacheOptions, DeviceChoice, DeviceOptions, Runner, SyntheticSpec};

const BLOCK_SIZE: usize = 16;

fn runner(spec: &str, device: DeviceChoice, dtype: DType) -> Runner {
    let loaded = SyntheticSpec::parse(spec).unwrap().unwrap().load().unwrap();
    let cache = CacheOptions {
        block_size: BLOCK_SIZE,
        memory_bytes: 256 << 20,
        ..CacheOptions::default()
    };
    let device = DeviceOptions {
        device,
        dtype,
        gpu_memory_utilization: None,
        max_step_tokens: 512,
    };
    Runner::new(loaded.model, cache, device).unwrap()
}

/// What one comparison found, over every sampled row of every step.
#[derive(Debug, Default)]
struct Agreement {
    rows: usize,
    same_argmax: usize,
    max_abs_diff: f32,
    /// Largest |logit| seen on the CPU: the scale `max_abs_diff` is relative to.
    max_abs_logit: f32,
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// A step of chunks `(sequence, tokens from, tokens to, sample)`.
type Step = Vec<(usize, usize, usize, bool)>;

fn compare(cpu: &mut Runner, gpu: &mut Runner, decode_steps: usize) -> Agreement {
    let vocab = cpu.vocab_size() as u64;
    let mut rng = Rng::new(7);
    let lengths = [5usize, 37, 80, 130];
    let mut tokens: Vec<Vec<u32>> = lengths
        .iter()
        .map(|&n| (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect())
        .collect();
    // Disjoint block tables, with room for the decode steps.
    let mut next_block = 0u32;
    let tables: Vec<Vec<u32>> = lengths
        .iter()
        .map(|&n| {
            let blocks = (n + decode_steps).div_ceil(BLOCK_SIZE) as u32;
            let table = (next_block..next_block + blocks).rev().collect();
            next_block += blocks;
            table
        })
        .collect();
    // Prefill: three prompts whole and the longest one's first 64 tokens, then its rest.
    let mut steps: Vec<Step> = vec![
        vec![
            (0, 0, 5, true),
            (1, 0, 37, true),
            (2, 0, 80, true),
            (3, 0, 64, false),
        ],
        vec![(3, 64, 130, true)],
    ];
    let mut agreement = Agreement::default();
    let mut step_index = 0;
    while step_index < steps.len() + decode_steps {
        if step_index >= steps.len() {
            steps.push(
                (0..tokens.len())
                    .map(|s| (s, tokens[s].len() - 1, tokens[s].len(), true))
                    .collect(),
            );
        }
        let step = &steps[step_index];
        let mut batch = StepBatch::new();
        for &(seq, from, to, sample) in step {
            batch.push_sequence(
                &tokens[seq][from..to],
                from,
                &tables[seq],
                BLOCK_SIZE,
                sample,
            );
        }
        let expected = cpu.execute(&batch).unwrap();
        let actual = gpu.execute(&batch).unwrap();
        let sampled: Vec<usize> = step.iter().filter(|c| c.3).map(|c| c.0).collect();
        for (row, &seq) in sampled.iter().enumerate() {
            let (e, a) = (expected.row(row), actual.row(row));
            agreement.rows += 1;
            agreement.same_argmax += (argmax(e) == argmax(a)) as usize;
            for (x, y) in e.iter().zip(a) {
                agreement.max_abs_diff = agreement.max_abs_diff.max((x - y).abs());
                agreement.max_abs_logit = agreement.max_abs_logit.max(x.abs());
            }
            if step_index >= 1 {
                tokens[seq].push(argmax(e));
            }
        }
        step_index += 1;
    }
    agreement
}

#[test]
fn f32_on_the_gpu_matches_the_cpu() {
    let spec = "synthetic:smollm2-135m@f32";
    let mut cpu = runner(spec, DeviceChoice::Cpu, DType::F32);
    let mut gpu = runner(spec, DeviceChoice::Cuda(0), DType::F32);
    let a = compare(&mut cpu, &mut gpu, 16);
    println!("f32: {a:?}");
    assert_eq!(a.same_argmax, a.rows, "{a:?}");
    assert!(a.max_abs_diff <= 1e-3 * a.max_abs_logit.max(1.0), "{a:?}");
}

#[test]
fn bf16_on_the_gpu_stays_close_to_the_cpu() {
    // The CPU computes in f32 on the same bf16-rounded weights; the GPU rounds every
    // activation and cached K/V to bf16 (8 bits of mantissa) as well.
    let spec = "synthetic:smollm2-135m@bf16";
    let mut cpu = runner(spec, DeviceChoice::Cpu, DType::F32);
    let mut gpu = runner(spec, DeviceChoice::Cuda(0), DType::BF16);
    let a = compare(&mut cpu, &mut gpu, 16);
    println!("bf16: {a:?}");
    assert!(a.same_argmax * 10 >= a.rows * 9, "{a:?}");
    assert!(a.max_abs_diff <= 0.05 * a.max_abs_logit.max(1.0), "{a:?}");
}

#[test]
fn a_sequence_gets_the_same_logits_alone_and_in_a_batch() {
    // Batch invariance on the GPU: our kernels treat each token alone, but cuBLAS may pick a
    // different GEMM algorithm for a different number of rows. This prints what it finds and
    // asserts the greedy token (the bit-for-bit CPU guarantee is tested in batch_invariance.rs).
    let spec = "synthetic:smollm2-135m@bf16";
    let mut gpu = runner(spec, DeviceChoice::Cuda(0), DType::BF16);
    let vocab = gpu.vocab_size() as u64;
    let mut rng = Rng::new(11);
    let prompt: Vec<u32> = (0..40).map(|_| (rng.next_u64() % vocab) as u32).collect();
    let others: Vec<Vec<u32>> = (0..31)
        .map(|_| (0..40).map(|_| (rng.next_u64() % vocab) as u32).collect())
        .collect();
    let table: Vec<u32> = (0..3).collect();
    let mut alone = StepBatch::new();
    alone.push_sequence(&prompt, 0, &table, BLOCK_SIZE, true);
    let alone = gpu.execute(&alone).unwrap();
    let mut batched = StepBatch::new();
    batched.push_sequence(&prompt, 0, &table, BLOCK_SIZE, true);
    let other_tables: Vec<Vec<u32>> = (0..31u32)
        .map(|i| (3 + 3 * i..6 + 3 * i).collect())
        .collect();
    for (tokens, table) in others.iter().zip(&other_tables) {
        batched.push_sequence(tokens, 0, table, BLOCK_SIZE, true);
    }
    let batched = gpu.execute(&batched).unwrap();
    let diff = alone
        .row(0)
        .iter()
        .zip(batched.row(0))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("alone vs in a batch of 32: max |logit difference| {diff}");
    assert_eq!(argmax(alone.row(0)), argmax(batched.row(0)));
}
