//! Paged attention alone, as a batched decode step of the default model sees it: 64 sequences,
//! one new token each at a context of 192, over all 30 layers' pools (about 280 MB of f16 K/V,
//! far more than the caches hold, as in the real step), with an f16 and a q8 cache side by
//! side, and f16 in 32-token blocks (runs of K/V twice as long between jumps). Prints the
//! achieved K/V read rate (scales included for q8) against the machine's memory bandwidth
//! measured in the same run.
//!
//! `cargo bench -p minserve-benches --bench attention`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use minserve_benches::memory_gbps;
use minserve_core::StepBatch;
use minserve_model::kv_cache::{KvDtype, KvLayout, LayerKv};
use minserve_model::paged_attention::{AttentionPlan, PagedAttention};

const NUM_SEQS: usize = 64;
const CONTEXT: usize = 192;
const NUM_LAYERS: usize = 30;
const NUM_HEADS: usize = 9;
const NUM_KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

/// Deterministic values in [-1, 1): content does not matter for speed, only that it is not zero.
fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn decode_attention_f16(c: &mut Criterion) {
    decode_attention(c, KvDtype::F16, 16, "f16");
}

fn decode_attention_q8(c: &mut Criterion) {
    decode_attention(c, KvDtype::Q8, 16, "q8");
}

fn decode_attention_f16_32_token_blocks(c: &mut Criterion) {
    decode_attention(c, KvDtype::F16, 32, "f16, 32-token blocks");
}

fn decode_attention(c: &mut Criterion, dtype: KvDtype, block_size: usize, name: &str) {
    let blocks_per_seq = CONTEXT.div_ceil(block_size);
    let layout = KvLayout {
        num_blocks: NUM_SEQS * blocks_per_seq,
        block_size,
        num_kv_heads: NUM_KV_HEADS,
        head_dim: HEAD_DIM,
    };
    let layers: Vec<LayerKv> = (0..NUM_LAYERS)
        .map(|layer| {
            let mut kv = LayerKv::zeroed(dtype, &layout);
            let len = layout.values_per_layer();
            let slots: Vec<u32> = (0..(layout.num_blocks * block_size) as u32).collect();
            let (keys, values) = (
                noise(len, 2 * layer as u64),
                noise(len, 2 * layer as u64 + 1),
            );
            kv.write(&layout, &keys, &values, &slots);
            kv
        })
        .collect();
    // Sequences' blocks interleaved across the pool, as a busy server's free list leaves them.
    let mut batch = StepBatch::new();
    for seq in 0..NUM_SEQS {
        let table: Vec<u32> = (0..blocks_per_seq)
            .map(|b| (b * NUM_SEQS + seq) as u32)
            .collect();
        batch.push_sequence(&[7], CONTEXT - 1, &table, block_size, true);
    }
    let plan = AttentionPlan::new(&batch, NUM_KV_HEADS);
    let queries = noise(NUM_SEQS * NUM_HEADS * HEAD_DIM, 99);
    let mut out = vec![0f32; queries.len()];
    let step = |out: &mut [f32]| {
        for kv in &layers {
            PagedAttention {
                kv,
                layout: &layout,
                batch: &batch,
                group: 0,
                plan: &plan,
                num_heads: NUM_HEADS,
                scale: 0.125,
                window: None,
            }
            .run(&queries, out);
        }
    };

    let kv_bytes =
        (NUM_LAYERS * NUM_SEQS * CONTEXT * NUM_KV_HEADS * 2 * dtype.bytes_per_row(HEAD_DIM)) as u64;
    let mut group = c.benchmark_group("paged attention");
    group.throughput(Throughput::Bytes(kv_bytes));
    group.measurement_time(Duration::from_secs(10));
    group.bench_function(
        format!("decode step: 64 seqs x 192 context x 30 layers, {name}"),
        |b| b.iter(|| step(&mut out)),
    );
    group.finish();

    let copy_gbps = memory_gbps();
    let start = Instant::now();
    let reps = 20;
    for _ in 0..reps {
        step(&mut out);
    }
    let seconds = start.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{name}: K/V read {:.1} GB/s ({:.1} ms per step) vs memory copy {copy_gbps:.1} GB/s",
        kv_bytes as f64 / seconds / 1e9,
        seconds * 1e3
    );
}

criterion_group!(
    benches,
    decode_attention_f16,
    decode_attention_q8,
    decode_attention_f16_32_token_blocks
);
criterion_main!(benches);
