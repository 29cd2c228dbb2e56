//! Single-sequence decode speed on the default model: minserve's paged runner against
//! candle-transformers' `quantized_llama` driven the same way (same GGUF, same greedy tokens
//! fed to both, same thread), alternating runs so that both see the same machine state.
//!
//! `cargo bench -p minserve-benches --bench decode`

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use minserve_benches::{default_model_path, median};
use minserve_core::sampling::argmax;
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::{load_model, CacheOptions, ModelRunner};

const PROMPT_LEN: usize = 32;
const DECODE_TOKENS: usize = 128;
const ROUNDS: usize = 5;

fn main() {
    let path = default_model_path();
    let loaded = load_model(&path).expect("load model");
    let prompt = loaded
        .tokenizer
        .encode(
            &"The quick brown fox jumps over the lazy dog. ".repeat(8),
            false,
        )
        .expect("encode")[..PROMPT_LEN]
        .to_vec();
    let mut ours = ModelRunner::new(loaded.model, CacheOptions::default());
    let mut file = std::fs::File::open(&path).expect("open");
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("gguf");
    let mut theirs =
        quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("load");

    let block_size = ours.cache_geometry().block_size;
    let table: Vec<u32> =
        (0..(PROMPT_LEN + DECODE_TOKENS + 1).div_ceil(block_size) as u32).collect();
    let mut run_ours = || {
        let mut tokens = prompt.clone();
        let mut computed = 0;
        let mut start = Instant::now();
        for step in 0..=DECODE_TOKENS {
            if step == 1 {
                start = Instant::now(); // decode only: the prefill is step 0
            }
            let mut batch = StepBatch::new();
            batch.push_sequence(&tokens[computed..], computed, &table, block_size, true);
            let logits = ours.execute(&batch).expect("step");
            computed = tokens.len();
            tokens.push(argmax(logits.row(0)));
        }
        DECODE_TOKENS as f64 / start.elapsed().as_secs_f64()
    };
    let mut run_theirs = || {
        theirs.clear_kv_cache();
        let mut tokens = prompt.clone();
        let mut computed = 0;
        let mut start = Instant::now();
        for step in 0..=DECODE_TOKENS {
            if step == 1 {
                start = Instant::now();
            }
            let input = Tensor::new(&tokens[computed..], &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("input");
            let logits = theirs.forward(&input, computed).expect("step");
            let logits = logits
                .squeeze(0)
                .and_then(|l| l.to_vec1::<f32>())
                .expect("logits");
            computed = tokens.len();
            tokens.push(argmax(&logits));
        }
        DECODE_TOKENS as f64 / start.elapsed().as_secs_f64()
    };

    run_ours(); // warm-up: page in weights, build candle's thread pool
    run_theirs();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        a.push(run_ours());
        b.push(run_theirs());
    }
    let (ours_median, theirs_median) = (median(&mut a), median(&mut b));
    println!("single-sequence decode, default model, {PROMPT_LEN}-token prompt, {DECODE_TOKENS} tokens, median of {ROUNDS}:");
    println!("  minserve (paged):             {ours_median:7.1} tok/s");
    println!("  candle quantized_llama:       {theirs_median:7.1} tok/s");
    println!(
        "  ratio minserve / candle:      {:7.2}",
        ours_median / theirs_median
    );
}
