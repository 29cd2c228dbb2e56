//! A sequence's logits are bit-for-bit the same whether it runs alone, batched with other
//! sequences of other lengths, or with its prompt prefilled in several chunks.
//!
//! This holds because every kernel computes each row on its own in a fixed order: the quantized
//! matmuls quantize and multiply each activation row independently, and paged attention gives
//! each (token, head) pair its own fixed summation order.

mod common;

use candle_core::quantized::GgmlDType;
use minserve_core::sampling::argmax;
use minserve_core::sequence::Sequence;
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::{load_model, CacheOptions, KvDtype, ModelRunner};

/// A sequence with nothing computed yet.
fn seq(tokens: &[u32]) -> Sequence {
    Sequence::new(0, tokens.to_vec(), 0, 0)
}

/// Every step's logits bit for bit equal to the lone run's.
fn assert_bit_identical(alone: &[Vec<f32>], others: [(&str, &[Vec<f32>]); 2]) {
    for (name, other) in others {
        assert_eq!(other.len(), alone.len(), "{name}: step count");
        for (step, (x, y)) in alone.iter().zip(other.iter()).enumerate() {
            assert!(
                x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{name}: logits differ from the lone run at step {step}"
            );
        }
    }
}

/// Runs steps until every sequence has `decode` generated tokens, with blocks from `blocks`;
/// `chunks[i]` bounds how many prompt tokens sequence `i` may prefill per step. Returns each
/// step's logits of sequence 0.
fn run(
    runner: &mut ModelRunner,
    mut blocks: common::Blocks,
    seqs: &mut [Sequence],
    prompt_len0: usize,
    chunks: &[usize],
    decode: usize,
) -> Vec<Vec<f32>> {
    let target: Vec<usize> = seqs.iter().map(|s| s.len() + decode).collect();
    let mut seq0_logits = Vec::new();
    loop {
        let mut batch = StepBatch::new();
        let mut members = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            let pending = s.num_pending_tokens();
            if pending == 0 {
                continue;
            }
            let n = pending.min(chunks[i]);
            let sample = s.num_computed_tokens + n == s.len();
            blocks.push(&mut batch, s, n, sample);
            members.push((i, n, sample));
        }
        if batch.is_empty() {
            break;
        }
        blocks.finish(&mut batch);
        let logits = runner.execute(&batch).unwrap();
        let mut row = 0;
        for (i, n, sample) in members {
            let s = &mut seqs[i];
            s.num_computed_tokens += n;
            if !sample {
                continue;
            }
            let l = logits.row(row);
            row += 1;
            if i == 0 && s.num_computed_tokens >= prompt_len0 {
                seq0_logits.push(l.to_vec());
            }
            if s.len() < target[i] {
                s.tokens.push(argmax(l));
            }
        }
    }
    seq0_logits
}

#[test]
fn logits_do_not_depend_on_batch_or_chunking() {
    check_batch_invariance(CacheOptions::default());
}

/// A q8 row is quantized from its own K/V alone, and its scales enter a row's arithmetic the
/// same way wherever the row lands: the same bit-identity holds.
#[test]
fn logits_do_not_depend_on_batch_or_chunking_with_a_q8_cache() {
    check_batch_invariance(CacheOptions {
        dtype: KvDtype::Q8,
        ..CacheOptions::default()
    });
}

/// The same for fp8 rows: each is encoded from its own K/V alone.
#[test]
fn logits_do_not_depend_on_batch_or_chunking_with_an_fp8_cache() {
    check_batch_invariance(CacheOptions {
        dtype: KvDtype::Fp8,
        ..CacheOptions::default()
    });
}

fn check_batch_invariance(cache: CacheOptions) {
    let loaded = load_model(&common::default_model_path()).unwrap();
    let tk = &loaded.tokenizer;
    let prompt = |t: &str| tk.encode(t, false).unwrap();
    let a = prompt("Paged attention stores the keys and values of every sequence in fixed-size blocks, so that memory is allocated on demand and shared between requests.");
    let b = prompt("Hello!");
    let c = prompt("Write a haiku about the sea, then explain the metaphor you chose in two sentences, being careful to mention the moon and the tide as well as the wind over the water at night.");
    let mut runner = ModelRunner::new(loaded.model, cache);
    let decode = 6;

    check_runs(&mut runner, [&a, &b, &c], [7, 13], decode);
}

/// The real gemma3-270m (Q5_0, Q8_0, Q4_K and Q6_K matrices, all on the batch-reusing kernels,
/// and a 512-token sliding window): the same bit-identity.
#[test]
fn gemma3_270m_logits_do_not_depend_on_batch_or_chunking() {
    let loaded = load_model(&common::catalog_model_path("gemma3-270m")).unwrap();
    let tk = &loaded.tokenizer;
    let prompt = |t: &str| tk.encode(t, true).unwrap();
    let a = prompt("The tide comes in twice a day because the moon pulls on the oceans, and the sun does too, a little less.");
    let b = prompt("Hi");
    let c = prompt("List three rivers of Europe, then say which one is the longest and through how many countries it flows.");
    let mut runner = ModelRunner::new(loaded.model, CacheOptions::default());
    check_runs(&mut runner, [&a, &b, &c], [7, 13], 4);
}

/// The same bit-identity on a sliding-window model (synthetic Gemma 3 shape, window 8, every
/// third layer global): prompts far past the window, chunks that start inside and outside it,
/// sequences of different lengths in one batch; the local layers' blocks that the window has
/// passed are released and handed out again (to other groups and sequences) as the runs go.
#[test]
fn sliding_window_logits_do_not_depend_on_batch_or_chunking() {
    check_synthetic("tiny-gemma3", GgmlDType::Q8_0, 3, [45, 3, 70], [5, 13], 12);
}

/// A synthetic model `preset` stored as `dtype` (weights from `seed`), prompts of `lens` tokens,
/// through [`check_runs`].
fn check_synthetic(
    preset: &str,
    dtype: GgmlDType,
    seed: u64,
    lens: [usize; 3],
    chunks: [usize; 2],
    decode: usize,
) {
    let config = minserve_model::synthetic::preset(preset).unwrap();
    let vocab = config.vocab_size as u32;
    let weights = minserve_model::synthetic::build(&config, seed, dtype, true).unwrap();
    let mut runner = ModelRunner::new(
        minserve_model::LlamaModel::new(weights),
        CacheOptions::default(),
    );
    let [a, b, c] =
        [(lens[0], 1), (lens[1], 2), (lens[2], 3)].map(|(n, seed): (usize, u32)| -> Vec<u32> {
            (0..n as u32)
                .map(|i| (i * 37 + seed * 101) % vocab)
                .collect()
        });
    check_runs(&mut runner, [&a, &b, &c], chunks, decode);
}

/// Dense f32 matrices (a Hugging Face folder's) run on the fixed-order kernel (`dense.rs`):
/// the same bit-identity. On candle's dense matmul, whose kernels depend on the row count, this
/// failed.
#[test]
fn dense_f32_logits_do_not_depend_on_batch_or_chunking() {
    check_synthetic("tiny", GgmlDType::F32, 5, [40, 3, 61], [7, 13], 8);
}

/// Sequence `a`'s logits over its prompt and `decode` tokens, bit for bit the same alone, in a
/// batch with `b` and `c`, and with `a` and `c` prefilled in chunks of `chunks` tokens; each
/// run from fresh bookkeeping, the batched and chunked ones with scattered blocks.
fn check_runs(runner: &mut ModelRunner, [a, b, c]: [&[u32]; 3], chunks: [usize; 2], decode: usize) {
    let alone = {
        let blocks = common::Blocks::new(runner);
        run(
            runner,
            blocks,
            &mut [seq(a)],
            a.len(),
            &[usize::MAX],
            decode,
        )
    };
    assert_eq!(alone.len(), decode + 1);
    let batched = {
        let blocks = common::Blocks::scattered(runner, 1);
        let mut seqs = [seq(a), seq(b), seq(c)];
        run(runner, blocks, &mut seqs, a.len(), &[usize::MAX; 3], decode)
    };
    let chunked = {
        let blocks = common::Blocks::scattered(runner, 2);
        let mut seqs = [seq(a), seq(c)];
        run(runner, blocks, &mut seqs, a.len(), &chunks, decode)
    };
    assert_bit_identical(&alone, [("batched", &batched), ("chunked", &chunked)]);
}
