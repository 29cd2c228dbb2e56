//! Models with real architectures and seeded random weights, built in memory.
//!
//! They let the forward pass be tested against a naive implementation in milliseconds, and let
//! speed be measured where real weights cannot be brought (CI, a lent GPU machine with no
//! network). Same name and seed, same weights, on every machine.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use minserve_core::sampling::Rng;

use crate::config::{ModelConfig, RopeStyle};
use crate::error::Result;
use crate::weights::{LayerWeights, Linear, LinearWeight, LlamaWeights};

/// The shapes `synthetic:NAME` knows.
pub fn preset(name: &str) -> Option<ModelConfig> {
    let llama = |hidden, intermediate, layers, heads, kv_heads, vocab| ModelConfig {
        architecture: "llama".into(),
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_style: RopeStyle::Interleaved,
        max_position_embeddings: 4096,
        attention_bias: false,
        tie_word_embeddings: true,
    };
    Some(match name {
        "tiny" => llama(64, 128, 2, 4, 2, 256),
        // Qwen2's differences from Llama, at the same tiny size: q/k/v bias, NeoX RoPE pairs,
        // a separate lm_head.
        "tiny-qwen2" => ModelConfig {
            architecture: "qwen2".into(),
            attention_bias: true,
            rope_style: RopeStyle::Neox,
            tie_word_embeddings: false,
            rope_theta: 1_000_000.0,
            ..llama(64, 128, 2, 4, 2, 256)
        },
        "smollm2-135m" => llama(576, 1536, 30, 9, 3, 49152),
        "llama-1b" => ModelConfig {
            rope_theta: 500_000.0,
            ..llama(2048, 8192, 16, 32, 8, 128_256)
        },
        "llama-8b" => ModelConfig {
            rope_theta: 500_000.0,
            tie_word_embeddings: false,
            ..llama(4096, 14336, 32, 32, 8, 128_256)
        },
        _ => return None,
    })
}

pub const PRESETS: &[&str] = &["tiny", "tiny-qwen2", "smollm2-135m", "llama-1b", "llama-8b"];

/// Seeded weights for `config`. Projections are stored as `dtype` (`F32` keeps them dense);
/// values are uniform with the spread of a trained model's (std about 0.02 for projections),
/// so that activations stay in a realistic range through many layers.
pub fn build(config: &ModelConfig, seed: u64, dtype: GgmlDType) -> Result<LlamaWeights> {
    let mut rng = Rng::new(seed);
    let device = Device::Cpu;
    let mut random = |shape: (usize, usize), spread: f32| -> Result<Tensor> {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * spread)
            .collect();
        Ok(Tensor::from_vec(data, shape, &device)?)
    };
    let matrix_spread = 0.035; // uniform in [-a, a] has std a / sqrt(3) ~ 0.02
    let as_linear = |w: Tensor| -> Result<Linear> {
        let weight = match dtype {
            GgmlDType::F32 => LinearWeight::dense(w),
            _ => LinearWeight::quantized(QTensor::quantize(&w, dtype)?)?,
        };
        Ok(Linear { weight, bias: None })
    };
    let linear = |rows, cols, random: &mut dyn FnMut((usize, usize), f32) -> Result<Tensor>| {
        as_linear(random((rows, cols), matrix_spread)?)
    };
    let with_bias =
        |mut l: Linear, rows, random: &mut dyn FnMut((usize, usize), f32) -> Result<Tensor>| {
            if config.attention_bias {
                l.bias = Some(random((1, rows), 0.5)?.squeeze(0)?);
            }
            Ok::<_, crate::error::ModelError>(l)
        };
    let c = config;
    let ones = Tensor::ones(c.hidden_size, candle_core::DType::F32, &device)?;
    let mut layers = Vec::with_capacity(c.num_layers);
    for _ in 0..c.num_layers {
        layers.push(LayerWeights {
            attn_norm: ones.clone(),
            q_proj: with_bias(
                linear(c.num_heads * c.head_dim, c.hidden_size, &mut random)?,
                c.num_heads * c.head_dim,
                &mut random,
            )?,
            k_proj: with_bias(
                linear(c.num_kv_heads * c.head_dim, c.hidden_size, &mut random)?,
                c.num_kv_heads * c.head_dim,
                &mut random,
            )?,
            v_proj: with_bias(
                linear(c.num_kv_heads * c.head_dim, c.hidden_size, &mut random)?,
                c.num_kv_heads * c.head_dim,
                &mut random,
            )?,
            o_proj: linear(c.hidden_size, c.num_heads * c.head_dim, &mut random)?,
            ffn_norm: ones.clone(),
            gate_proj: linear(c.intermediate_size, c.hidden_size, &mut random)?,
            up_proj: linear(c.intermediate_size, c.hidden_size, &mut random)?,
            down_proj: linear(c.hidden_size, c.intermediate_size, &mut random)?,
        });
    }
    let embedding = random((c.vocab_size, c.hidden_size), 1.0)?;
    let lm_head = match c.tie_word_embeddings {
        true => as_linear(embedding.clone())?,
        false => linear(c.vocab_size, c.hidden_size, &mut random)?,
    };
    Ok(LlamaWeights {
        config: config.clone(),
        embedding,
        layers,
        final_norm: ones,
        lm_head,
    })
}
