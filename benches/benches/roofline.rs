//! The roofline of a decode step on this machine: measured f32 GEMM throughput and memory
//! bandwidth, against what a decode step of the default model achieves at batch 1, 8, 32, 64
//! (128 tokens of context each).
//!
//! `cargo bench -p minserve-benches --bench roofline`

use std::time::Instant;

use candle_core::{Device, Tensor};
use minserve_benches::{default_model_path, median, memory_gbps};
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::{load_model, CacheOptions, ModelRunner};

const CONTEXT: usize = 128;

fn gemm_gflops() -> f64 {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).expect("tensor");
    let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu).expect("tensor");
    let _ = a.matmul(&b).expect("warm-up");
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let _ = a.matmul(&b).expect("matmul");
            2.0 * (n * n * n) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(&mut runs)
}

fn main() {
    let path = default_model_path();
    let weight_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) as f64;
    let loaded = load_model(&path).expect("load model");
    let config = loaded.model.config().clone();
    // 2 FLOPs per weight per token, for every projection and the lm_head.
    let per_layer =
        config.hidden_size * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
            + config.num_heads * config.head_dim * config.hidden_size
            + 3 * config.hidden_size * config.intermediate_size;
    let flops_per_token =
        2.0 * (config.num_layers * per_layer + config.vocab_size * config.hidden_size) as f64;
    let kv_bytes_per_token = CacheOptions::default().dtype.bytes_per_token(&config) as f64;

    let gemm = gemm_gflops();
    let bandwidth = memory_gbps();
    println!(
        "machine: f32 GEMM {gemm:.0} GFLOP/s (candle, 1024^3), memory copy {bandwidth:.1} GB/s"
    );
    println!(
        "model: {:.0} MFLOP per token, {:.0} MB of weights read per step, {:.0} KB of KV per token of context",
        flops_per_token / 1e6,
        weight_bytes / 1e6,
        kv_bytes_per_token / 1e3
    );
    println!(
        "| batch | step ms | tokens/s | GFLOP/s | % of GEMM peak | GB/s read | % of bandwidth |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");

    let mut runner = ModelRunner::new(
        loaded.model,
        CacheOptions {
            memory_bytes: 1 << 30,
            ..CacheOptions::default()
        },
    );
    let block_size = runner.cache_geometry().block_size;
    let blocks_per_seq = (CONTEXT + 64).div_ceil(block_size);
    for batch_size in [1usize, 8, 32, 64] {
        if batch_size * blocks_per_seq > runner.cache_geometry().num_blocks {
            println!("| {batch_size} | (KV cache too small) | | | | | |");
            continue;
        }
        let tables: Vec<Vec<u32>> = (0..batch_size)
            .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
            .collect();
        // Fill each sequence's context with one prefill step per sequence.
        for table in &tables {
            let mut batch = StepBatch::new();
            let prompt: Vec<u32> = (0..CONTEXT as u32).map(|t| 1000 + t).collect();
            batch.push_sequence(&prompt, 0, table, block_size, true);
            runner.execute(&batch).expect("prefill");
        }
        let mut times = Vec::new();
        for step in 0..8 {
            let mut batch = StepBatch::new();
            for table in &tables {
                batch.push_sequence(&[2000], CONTEXT + step, table, block_size, true);
            }
            let start = Instant::now();
            runner.execute(&batch).expect("decode");
            times.push(start.elapsed().as_secs_f64());
        }
        let step = median(&mut times);
        let tokens_per_s = batch_size as f64 / step;
        let gflops = flops_per_token * tokens_per_s / 1e9;
        let bytes = weight_bytes + batch_size as f64 * CONTEXT as f64 * kv_bytes_per_token;
        let gbps = bytes / step / 1e9;
        println!(
            "| {batch_size} | {:.1} | {tokens_per_s:.0} | {gflops:.1} | {:.1}% | {gbps:.1} | {:.1}% |",
            step * 1e3,
            100.0 * gflops / gemm,
            100.0 * gbps / bandwidth
        );
    }
}
