//! The paged, batched, chunked forward pass against a naive one on a tiny synthetic model: full
//! causal attention over contiguous K/V, written with plain candle ops, no cache at all.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Tensor, D};
use minserve_core::sampling::Rng;
use minserve_core::sequence::{Sequence, RELEASED_BLOCK};
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::config::{Activation, RopeScaling};
use minserve_model::weights::{Linear, LinearWeight, LlamaWeights};
use minserve_model::{synthetic, CacheOptions, KvDtype, LlamaModel, ModelRunner, RopeStyle};

/// `x W^T (+ b)` for a tensor `[.., in]`: the textbook form of a layer, on tensors.
fn linear(layer: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    let y = match &layer.weight {
        LinearWeight::Packed(w) => w.forward(x)?,
        LinearWeight::Candle(w) => w.forward(x)?,
    };
    match &layer.bias {
        Some(bias) => y.broadcast_add(bias),
        None => Ok(y),
    }
}

/// RoPE frequencies at base `theta`, stretched as Llama 3.1 publishes it, computed apart from
/// `rope.rs`.
fn reference_frequencies(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Vec<f32> {
    let plain = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32));
    match *scaling {
        RopeScaling::None => plain.collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => common::llama3_reference_frequencies(
            head_dim,
            theta as f64,
            factor as f64,
            low_freq_factor as f64,
            high_freq_factor as f64,
            original_context as f64,
        )
        .into_iter()
        .map(|f| f as f32)
        .collect(),
        ref other => panic!("the reference has no {other:?}"),
    }
}

/// Logits at every position of `tokens`, computed the textbook way: full causal attention
/// (within the window, on a sliding-window layer) over contiguous K/V, and the architecture's
/// extra norms, activation and embedding scale spelled out.
fn naive_logits(w: &LlamaWeights, tokens: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
    let c = &w.config;
    let dev = Device::Cpu;
    let t = tokens.len();
    let eps = c.rms_norm_eps as f32;
    let cos_sin = |theta: f32, scaling: &RopeScaling| -> candle_core::Result<(Tensor, Tensor)> {
        let inv = reference_frequencies(c.head_dim, theta, scaling);
        let inv = Tensor::new(inv.as_slice(), &dev)?.unsqueeze(0)?;
        let pos = Tensor::arange(0u32, t as u32, &dev)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let angles = pos.broadcast_mul(&inv)?;
        Ok((angles.cos()?, angles.sin()?))
    };
    let global_rope = cos_sin(c.rope_theta, &c.rope_scaling)?;
    // Query i sees key j when j <= i and, within a window of w, i - j < w.
    let mask = |window: Option<usize>| {
        let mask: Vec<f32> = (0..t * t)
            .map(|n| {
                let (i, j) = (n / t, n % t);
                if j > i || window.is_some_and(|w| i - j >= w) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(mask, (t, t), &dev)
    };
    let global_mask = mask(None)?;
    let scale = (c.block.query_pre_attn_scalar.unwrap_or(c.head_dim) as f64).sqrt();
    let heads = |x: &Tensor, n: usize| -> candle_core::Result<Tensor> {
        x.reshape((1, t, n, c.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let group = c.num_heads / c.num_kv_heads;
    let repeat = |x: Tensor| -> candle_core::Result<Tensor> {
        // [1, kv, t, d] -> [1, kv * group, t, d], each KV head serving `group` query heads.
        let (b, kv, t, d) = x.dims4()?;
        x.unsqueeze(2)?
            .expand((b, kv, group, t, d))?
            .reshape((b, kv * group, t, d))
    };

    // An optional norm: applied when the architecture has it.
    let norm = |x: Tensor, weight: &Option<Tensor>| match weight {
        Some(weight) => candle_nn::ops::rms_norm(&x, weight, eps),
        None => Ok(x),
    };

    let ids = Tensor::new(tokens, &dev)?;
    let mut x = w.embedding.dense()?.index_select(&ids, 0)?;
    if c.block.scale_embeddings {
        x = (x * (c.hidden_size as f32).sqrt() as f64)?;
    }
    for (index, layer) in w.layers.iter().enumerate() {
        // Every `pattern`-th layer (from 1) is global, the others see a window at their own base.
        let window = c
            .block
            .sliding_window
            .filter(|sw| (index + 1) % sw.pattern != 0);
        let ((cos, sin), mask) = match window {
            Some(sw) => (
                cos_sin(sw.local_rope_theta, &RopeScaling::None)?,
                mask(Some(sw.size))?,
            ),
            None => (global_rope.clone(), global_mask.clone()),
        };
        let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
        let q = norm(
            heads(&linear(&layer.q_proj, &h)?, c.num_heads)?,
            &layer.q_norm,
        )?;
        let k = norm(
            heads(&linear(&layer.k_proj, &h)?, c.num_kv_heads)?,
            &layer.k_norm,
        )?;
        let v = heads(&linear(&layer.v_proj, &h)?, c.num_kv_heads)?;
        let rope = match c.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i,
            RopeStyle::Neox => candle_nn::rotary_emb::rope,
        };
        let q = rope(&q, &cos, &sin)?;
        let k = repeat(rope(&k, &cos, &sin)?)?;
        let v = repeat(v)?;
        let scores = (q.matmul(&k.t()?)? / scale)?.broadcast_add(&mask)?;
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
        let attn = attn
            .transpose(1, 2)?
            .reshape((t, c.num_heads * c.head_dim))?;
        x = (norm(linear(&layer.o_proj, &attn)?, &layer.post_attention_norm)? + x)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
        let gate = linear(&layer.gate_proj, &h)?;
        let gate = match c.block.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            // candle's `gelu` is the tanh approximation.
            Activation::GeluTanh => gate.gelu()?,
        };
        let down = linear(&layer.down_proj, &(gate * linear(&layer.up_proj, &h)?)?)?;
        x = (norm(down, &layer.post_ffn_norm)? + x)?;
    }
    let x = candle_nn::ops::rms_norm(&x, &w.final_norm, eps)?;
    linear(&w.lm_head, &x)?.to_vec2::<f32>()
}

fn tiny_runner(preset: &str, dtype: KvDtype, block_size: usize, num_blocks: usize) -> ModelRunner {
    let config = synthetic::preset(preset).unwrap();
    let weights = synthetic::build(&config, 42, GgmlDType::F32, true).unwrap();
    let mut runner = ModelRunner::new(
        LlamaModel::new(weights),
        CacheOptions {
            block_size,
            memory_bytes: 0,
            dtype,
        },
    );
    runner.cache =
        minserve_model::KvCache::new(runner.model.config(), dtype, block_size, num_blocks);
    runner
}

/// Llama: interleaved RoPE pairs, no bias, tied embeddings. With an f32 cache, only the order
/// of float operations differs from the naive pass.
#[test]
fn paged_attention_matches_naive_attention() {
    check_against_naive("tiny", KvDtype::F32, 1e-4);
}

/// Qwen2: q/k/v bias, NeoX RoPE pairs, separate lm_head.
#[test]
fn qwen2_variant_matches_naive_attention() {
    check_against_naive("tiny-qwen2", KvDtype::F32, 1e-4);
}

/// Llama 3's RoPE scaling, against the published formula in the naive pass.
#[test]
fn llama3_rope_scaling_matches_naive_attention() {
    check_against_naive("tiny-llama3", KvDtype::F32, 1e-4);
}

/// Gemma 3's block: GeGLU, q/k norms, post-norms, scaled embeddings, and sliding-window layers
/// (window 8) at their own RoPE base: prompts of 19 and 41 tokens run far past the window, in
/// chunks that start inside and outside it.
#[test]
fn gemma3_variant_matches_naive_attention() {
    check_against_naive("tiny-gemma3", KvDtype::F32, 1e-4);
    check_against_naive("tiny-gemma3", KvDtype::F16, 1e-4);
}

/// The default f16 cache rounds every cached value to 11 significant bits (relative error up to
/// 2^-11); on these models the logits still stay within the f32 tolerance, which also proves
/// the widening path reads the same slots.
#[test]
fn f16_cache_stays_close_to_naive_attention() {
    check_against_naive("tiny", KvDtype::F16, 1e-4);
    check_against_naive("tiny-qwen2", KvDtype::F16, 1e-4);
}

/// The q8 cache rounds every cached key and value to within half of 1/127 of its row's largest
/// magnitude, coarser than f16's 11 significant bits, so the tolerance is 10x the f16 one.
/// Measured: worst 1.2e-4 (tiny) and 3.1e-4 (tiny-qwen2) of the logits' magnitude, against
/// 6e-6 and 1.6e-5 with f16; a kernel that dropped or misplaced the scales is off by whole
/// units.
#[test]
fn q8_cache_stays_close_to_naive_attention() {
    check_against_naive("tiny", KvDtype::Q8, 1e-3);
    check_against_naive("tiny-qwen2", KvDtype::Q8, 1e-3);
}

/// Three sequences of lengths that are not multiples of any block size tried, prefilled in
/// chunks of different sizes in shared steps, with scattered blocks from the real block manager,
/// then decoded together; every sampled row must match the naive logits at that position. On a
/// sliding-window model, the local layers' blocks that the window has passed are released and
/// reused while the sequences run.
fn check_against_naive(preset: &str, dtype: KvDtype, tolerance: f32) {
    let lengths = [1usize, 19, 41];
    let mut rng = Rng::new(7);
    let prompts: Vec<Vec<u32>> = lengths
        .iter()
        .map(|&n| (0..n).map(|_| (rng.next_u64() % 256) as u32).collect())
        .collect();
    let decode_steps = 6usize;
    let mut worst = 0f32;
    let mut released = 0;
    for block_size in [1usize, 3, 16] {
        for chunk in [4usize, 7, 64] {
            let per_seq_blocks = (41 + decode_steps).div_ceil(block_size);
            let config = synthetic::preset(preset).unwrap();
            let groups = minserve_model::KvGroups::of(&config).num_groups();
            let num_blocks = per_seq_blocks * prompts.len() * groups + 64;
            let mut runner = tiny_runner(preset, dtype, block_size, num_blocks);
            let mut blocks = common::Blocks::scattered(&runner, rng.next_u64());
            let mut seqs: Vec<Sequence> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| Sequence::new(i as u64, p.clone(), 0, i as u64))
                .collect();
            let mut checked = 0;
            for step in 0..64 {
                let mut batch = StepBatch::new();
                let mut in_batch = Vec::new();
                for (s, seq) in seqs.iter_mut().enumerate() {
                    let n = seq.num_pending_tokens().min(chunk);
                    if n == 0 {
                        continue;
                    }
                    blocks.push(&mut batch, seq, n, true);
                    in_batch.push((s, seq.num_computed_tokens + n));
                }
                if batch.is_empty() {
                    break;
                }
                blocks.finish(&mut batch);
                let logits = runner.execute(&batch).unwrap();
                for (row, &(s, upto)) in in_batch.iter().enumerate() {
                    let seq = &mut seqs[s];
                    seq.num_computed_tokens = upto;
                    let naive = naive_logits(&runner.model.weights, &seq.tokens[..upto]).unwrap();
                    let expected = &naive[upto - 1];
                    let scale = expected.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let diff = logits
                        .row(row)
                        .iter()
                        .zip(expected)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    worst = worst.max(diff / scale);
                    assert!(
                        diff <= tolerance * scale,
                        "block {block_size}, chunk {chunk}, step {step}, seq {s} at {upto}: diff {diff}"
                    );
                    checked += 1;
                    // Once the prompt is in, extend the sequence with its greedy token.
                    if upto == seq.len() && seq.len() < prompts[s].len() + decode_steps {
                        seq.tokens
                            .push(minserve_core::sampling::argmax(logits.row(row)));
                    }
                }
            }
            released += seqs
                .iter()
                .flat_map(|s| s.block_tables.iter().flatten())
                .filter(|&&id| id == RELEASED_BLOCK)
                .count();
            assert!(
                checked >= prompts.len() * decode_steps,
                "only {checked} rows checked"
            );
        }
    }
    eprintln!("{preset} {dtype:?}: worst difference {worst:e} of the logits' magnitude, {released} blocks released");
    let windowed = synthetic::preset(preset)
        .unwrap()
        .block
        .sliding_window
        .is_some();
    assert_eq!(
        windowed,
        released > 0,
        "{preset}: released {released} blocks"
    );
}
