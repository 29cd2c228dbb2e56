//! The GPU path against the CPU path on the same synthetic weights (feature `cuda`; needs a
//! GPU, so CI only compiles it: `benches/gpu/run.sh` runs it on a GPU machine).
//!
//! Both runners get the same ragged steps: prompts of several lengths prefilled together, one
//! of them in two chunks, then decode steps, all through paged block tables, with the CPU's
//! greedy token fed to both (teacher forcing, so one disagreement does not derail the rest).
#![cfg(feature = "cuda")]

use std::sync::mpsc;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use minserve_core::sampling::{Rng, SamplingParams};
use minserve_core::scheduler::SchedulerConfig;
use minserve_core::{Engine, EngineConfig, Request, RequestEvent};
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::{
    synthetic, CacheOptions, DeviceChoice, DeviceOptions, LlamaModel, ModelConfig, Runner,
    SyntheticSpec,
};

const BLOCK_SIZE: usize = 16;

fn synthetic_model(spec: &str, device: DeviceChoice) -> LlamaModel {
    let spec = SyntheticSpec::parse(spec).unwrap().unwrap();
    spec.load_for(device).unwrap().model
}

fn runner(model: LlamaModel, device: DeviceChoice, dtype: DType) -> Runner {
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
    Runner::new(model, cache, device).unwrap()
}

/// The CPU and GPU runners of `spec`, the GPU one computing in `gpu_dtype`.
fn cpu_and_gpu(spec: &str, gpu_dtype: DType) -> (Runner, Runner) {
    (
        runner(
            synthetic_model(spec, DeviceChoice::Cpu),
            DeviceChoice::Cpu,
            DType::F32,
        ),
        runner(
            synthetic_model(spec, DeviceChoice::Cuda(0)),
            DeviceChoice::Cuda(0),
            gpu_dtype,
        ),
    )
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

impl Agreement {
    /// Every greedy token equal, logits within `relative` of the largest one.
    fn assert_within(&self, min_same_argmax: f32, relative: f32) {
        assert!(
            self.same_argmax as f32 >= min_same_argmax * self.rows as f32,
            "{self:?}"
        );
        assert!(
            self.max_abs_diff <= relative * self.max_abs_logit.max(1.0),
            "{self:?}"
        );
    }
}

/// Runs the comparison, prints what it found (the figures docs/gpu.md quotes) and checks it.
fn check(label: &str, (mut cpu, mut gpu): (Runner, Runner), min_same_argmax: f32, relative: f32) {
    let a = compare(&mut cpu, &mut gpu, 16);
    println!("{label}: {a:?}");
    a.assert_within(min_same_argmax, relative);
}

#[test]
fn f32_on_the_gpu_matches_the_cpu() {
    let spec = "synthetic:smollm2-135m@f32";
    check(spec, cpu_and_gpu(spec, DType::F32), 1.0, 1e-3);
}

#[test]
fn head_size_128_on_the_gpu_matches_the_cpu() {
    // Llama-8B's head size and GQA group of 4, at a size the CPU checks in seconds.
    let config = ModelConfig {
        hidden_size: 512,
        intermediate_size: 1024,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 1,
        head_dim: 128,
        vocab_size: 2048,
        ..synthetic::preset("smollm2-135m").unwrap()
    };
    let model = || LlamaModel::new(synthetic::build(&config, 3, GgmlDType::F32, true).unwrap());
    let runners = (
        runner(model(), DeviceChoice::Cpu, DType::F32),
        runner(model(), DeviceChoice::Cuda(0), DType::F32),
    );
    check("head size 128, f32", runners, 1.0, 1e-3);
}

// The CPU computes in f32 on the same rounded weights; the GPU rounds every activation and
// cached K/V to 16 bits as well (bf16 keeps 8 bits of mantissa, f16 11).
#[test]
fn bf16_on_the_gpu_stays_close_to_the_cpu() {
    let spec = "synthetic:smollm2-135m@bf16";
    check(spec, cpu_and_gpu(spec, DType::BF16), 0.9, 0.05);
}

#[test]
fn f16_on_the_gpu_stays_close_to_the_cpu() {
    let spec = "synthetic:smollm2-135m@f16";
    check(spec, cpu_and_gpu(spec, DType::F16), 0.9, 0.02);
}

#[test]
fn gguf_q4_1_on_the_gpu_stays_close_to_the_cpu() {
    // The default model's format: the CPU runs our repacked kernels, the GPU candle's
    // quantized CUDA matmuls on the GGUF blocks; both quantize activations to 8 bits.
    let spec = "synthetic:smollm2-135m@q4_1";
    check(spec, cpu_and_gpu(spec, DType::F32), 0.9, 0.05);
}

#[test]
fn a_sequence_gets_the_same_logits_alone_and_in_a_batch() {
    // Batch invariance on the GPU: our kernels treat each token alone, but cuBLAS may pick a
    // different GEMM algorithm for a different number of rows. This prints what it finds and
    // asserts the greedy token (the bit-for-bit CPU guarantee is tested in batch_invariance.rs).
    let model = synthetic_model("synthetic:smollm2-135m@bf16", DeviceChoice::Cuda(0));
    let mut gpu = runner(model, DeviceChoice::Cuda(0), DType::BF16);
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

#[test]
fn a_seeded_request_samples_the_same_tokens_alone_and_in_a_batch() {
    // Sampling runs on the CPU over the GPU's logits, so the seed's stream is the same; what
    // could differ is the logits (see above). 48 tokens at temperature 0.8 with top-p.
    let model = synthetic_model("synthetic:smollm2-135m@bf16", DeviceChoice::Cuda(0));
    let config = model.config().clone();
    let gpu = runner(model, DeviceChoice::Cuda(0), DType::BF16);
    let tokenizer = Arc::new(synthetic::tokenizer(&config).unwrap());
    let mut engine = Engine::new(
        gpu,
        EngineConfig {
            scheduler: SchedulerConfig::default(),
            prefix_caching: true,
            max_model_len: config.max_position_embeddings,
        },
        tokenizer.clone(),
        tokenizer.eos_token_ids().to_vec(),
    );
    let request = |prompt: &str, seed: u64| {
        let mut r = Request::new(tokenizer.encode(prompt, false).unwrap(), 48);
        r.params = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        r.ignore_eos = true;
        r
    };
    let mut run = |requests: Vec<Request>| -> Vec<Vec<u32>> {
        let receivers: Vec<_> = requests
            .into_iter()
            .map(|r| {
                let (tx, rx) = mpsc::channel();
                engine.submit(r, Box::new(tx)).unwrap();
                rx
            })
            .collect();
        while engine.step() {}
        receivers
            .iter()
            .map(|rx| {
                rx.try_iter()
                    .filter_map(|e| match e {
                        RequestEvent::Token { token, .. } => Some(token),
                        RequestEvent::Failed(e) => panic!("{e}"),
                        _ => None,
                    })
                    .collect()
            })
            .collect()
    };
    let alone = run(vec![request("The GPU and the seed", 42)]).remove(0);
    let mut batch = vec![request("The GPU and the seed", 42)];
    batch.extend((0..31).map(|i| request(&format!("another prompt, number {i}"), i)));
    let batched = run(batch).remove(0);
    assert_eq!(alone.len(), 48);
    assert_eq!(alone, batched);
}
