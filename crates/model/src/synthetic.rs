//! Models with real architectures and seeded random weights, built in memory.
//!
//! They let the forward pass be tested against a naive implementation in milliseconds, and let
//! speed be measured where real weights cannot be brought (CI, a lent GPU machine with no
//! network). Same name and seed, same weights, on every machine.
//!
//! `--model synthetic:NAME[@FORMAT]` ([`SyntheticSpec`]) loads one wherever a model file would
//! be loaded. It comes with a byte-level tokenizer built in memory ([`tokenizer`]), so that
//! nothing at all has to be on the machine: one byte of text is one token, which also makes
//! prompt lengths exact and predictable.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use minserve_core::sampling::Rng;
use minserve_tokenizer::Tokenizer;

use crate::config::{Activation, BlockVariant, ModelConfig, RopeScaling, RopeStyle, SlidingWindow};
use crate::device::DeviceChoice;
use crate::error::{ModelError, Result};
use crate::llama::LlamaModel;
use crate::load::LoadedModel;
use crate::weights::{Embedding, LayerWeights, Linear, LinearWeight, LlamaWeights};

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
        rope_scaling: RopeScaling::None,
        block: BlockVariant::default(),
    };
    // Gemma 3's block: GeGLU, q/k norms, post-norms, scaled embeddings, NeoX RoPE, and
    // sliding-window layers (`window` positions, every `pattern`-th layer global).
    let gemma3 = |base: ModelConfig, head_dim, window, pattern| ModelConfig {
        architecture: "gemma3".into(),
        head_dim,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_style: RopeStyle::Neox,
        block: BlockVariant {
            activation: Activation::GeluTanh,
            qk_norm: true,
            post_norms: true,
            scale_embeddings: true,
            query_pre_attn_scalar: None,
            sliding_window: Some(SlidingWindow {
                size: window,
                pattern,
                local_rope_theta: 10_000.0,
            }),
        },
        max_position_embeddings: 32_768,
        ..base
    };
    // Qwen3 (dense): Llama's block with per-head q/k RMSNorm, NeoX RoPE pairs, no bias, and
    // a head size of its own (not hidden / heads).
    let qwen3 = |base: ModelConfig, head_dim| ModelConfig {
        architecture: "qwen3".into(),
        head_dim,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_style: RopeStyle::Neox,
        max_position_embeddings: 40_960,
        block: BlockVariant {
            qk_norm: true,
            ..BlockVariant::default()
        },
        ..base
    };
    // 512 leaves room for the synthetic tokenizer's 256 byte tokens and its special tokens.
    Some(match name {
        "tiny" => llama(64, 128, 2, 4, 2, 512),
        // Qwen2's differences from Llama, at the same tiny size: q/k/v bias, NeoX RoPE pairs,
        // a separate lm_head.
        "tiny-qwen2" => ModelConfig {
            architecture: "qwen2".into(),
            attention_bias: true,
            rope_style: RopeStyle::Neox,
            tie_word_embeddings: false,
            rope_theta: 1_000_000.0,
            ..llama(64, 128, 2, 4, 2, 512)
        },
        "smollm2-135m" => llama(576, 1536, 30, 9, 3, 49152),
        // A window of 8 positions, every 3rd layer global: short prompts already cross it.
        "tiny-gemma3" => gemma3(llama(64, 128, 3, 4, 2, 512), 32, 8, 3),
        // Llama 3.2's RoPE scaling at the tiny size, with a short original context so that
        // the scaled band falls among the tiny head's frequencies.
        "tiny-llama3" => ModelConfig {
            rope_theta: 500_000.0,
            rope_style: RopeStyle::Neox,
            rope_scaling: RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 64,
            },
            ..llama(64, 128, 2, 4, 2, 512)
        },
        "gemma3-270m" => gemma3(llama(640, 2048, 18, 4, 1, 262_144), 256, 512, 6),
        "gemma3-1b" => gemma3(llama(1152, 6912, 26, 4, 1, 262_144), 256, 512, 6),
        // Heads of 32 with a hidden size of 64: 4 x 32 = 128 query dims, as Qwen3's heads of
        // 128 outgrow its hidden size of 1,024 (16 x 128 = 2,048).
        "tiny-qwen3" => qwen3(llama(64, 128, 2, 4, 2, 512), 32),
        "qwen3-0.6b" => qwen3(llama(1024, 3072, 28, 16, 8, 151_936), 128),
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

pub const PRESETS: &[&str] = &[
    "tiny",
    "tiny-qwen2",
    "smollm2-135m",
    "llama-1b",
    "llama-8b",
    "tiny-llama3",
    "tiny-gemma3",
    "gemma3-270m",
    "gemma3-1b",
    "tiny-qwen3",
    "qwen3-0.6b",
];

/// Seeded weights for `config`. Projections are stored as `dtype` (`F32` keeps them dense);
/// values are uniform with the spread of a trained model's (std about 0.02 for projections),
/// so that activations stay in a realistic range through many layers. `repack_for_cpu` as in
/// [`LinearWeight::quantized`].
pub fn build(
    config: &ModelConfig,
    seed: u64,
    dtype: GgmlDType,
    repack_for_cpu: bool,
) -> Result<LlamaWeights> {
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
        Ok(Linear {
            weight: LinearWeight::from_f32(w, dtype, repack_for_cpu)?,
            bias: None,
        })
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
    // Norm weights near 1 where a trained model's are not all ones either, so that a
    // misplaced norm changes the logits.
    let norm = |wanted: bool,
                len: usize,
                random: &mut dyn FnMut((usize, usize), f32) -> Result<Tensor>| {
        wanted
            .then(|| Ok::<_, ModelError>((random((1, len), 0.3)?.squeeze(0)? + 1.0)?))
            .transpose()
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for _ in 0..c.num_layers {
        layers.push(LayerWeights {
            q_norm: norm(c.block.qk_norm, c.head_dim, &mut random)?,
            k_norm: norm(c.block.qk_norm, c.head_dim, &mut random)?,
            post_attention_norm: norm(c.block.post_norms, c.hidden_size, &mut random)?,
            post_ffn_norm: norm(c.block.post_norms, c.hidden_size, &mut random)?,
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
        embedding: Embedding::Dense(embedding),
        layers,
        final_norm: ones,
        lm_head,
    })
}

/// What marks a `--model` argument as a synthetic model.
pub const PREFIX: &str = "synthetic:";

/// The format without `@FORMAT`: the default model's projection type, so that a synthetic
/// smollm2-135m runs the same kernels as the real one.
pub const DEFAULT_FORMAT: GgmlDType = GgmlDType::Q4_1;

/// The name alone fixes the weights, so that figures from two machines compare.
const SEED: u64 = 0;

/// A parsed `synthetic:NAME[@FORMAT]`, e.g. `synthetic:llama-1b@q8_0`: preset `NAME`'s
/// architecture with seeded weights whose matrices are stored as `FORMAT` (default
/// [`DEFAULT_FORMAT`]); norms and the embedding table stay f32, as in GGUF files.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    preset: String,
    format: GgmlDType,
}

impl SyntheticSpec {
    /// `Ok(None)` when `model` does not start with [`PREFIX`] (a path or a catalog alias);
    /// an error naming the choices when the preset or the format is unknown.
    pub fn parse(model: &str) -> Result<Option<Self>> {
        let Some(rest) = model.strip_prefix(PREFIX) else {
            return Ok(None);
        };
        let bad = |message: String| ModelError::Format {
            path: PathBuf::from(model),
            message,
        };
        let (name, format) = match rest.split_once('@') {
            Some((name, format)) => (name, Some(format)),
            None => (rest, None),
        };
        if preset(name).is_none() {
            return Err(bad(format!(
                "no synthetic model `{name}`; presets: {}",
                PRESETS.join(", ")
            )));
        }
        let format = match format {
            None => DEFAULT_FORMAT,
            Some(f) => crate::weights::parse_weight_format(f).map_err(bad)?,
        };
        Ok(Some(Self {
            preset: name.to_string(),
            format,
        }))
    }

    pub fn preset(&self) -> &str {
        &self.preset
    }

    pub fn format(&self) -> GgmlDType {
        self.format
    }

    pub fn config(&self) -> ModelConfig {
        preset(&self.preset).expect("parse accepts known presets only")
    }

    /// The full spelling, format included: `synthetic:tiny@q4_1`.
    pub fn name(&self) -> String {
        let format = crate::weights::WEIGHT_FORMATS
            .iter()
            .find(|(_, dtype)| *dtype == self.format)
            .map_or("?", |(spelling, _)| spelling);
        format!("{PREFIX}{}@{format}", self.preset)
    }

    /// Builds the weights and the tokenizer for the CPU. Memory is the quantized matrices plus
    /// the f32 embedding table: for llama-8b in q4_1, about 4.7 GB + 2.1 GB.
    pub fn load(&self) -> Result<LoadedModel> {
        self.load_for(DeviceChoice::Cpu)
    }

    /// [`Self::load`] for the device the model will run on (quantized weights stay GGUF
    /// blocks for a GPU).
    pub fn load_for(&self, device: DeviceChoice) -> Result<LoadedModel> {
        let config = self.config();
        // Checked here so that the message names the spec rather than an anonymous tensor.
        let block = self.format.block_size();
        for (what, width) in [
            ("hidden size", config.hidden_size),
            ("attention width", config.num_heads * config.head_dim),
            ("intermediate size", config.intermediate_size),
        ] {
            if width % block != 0 {
                return Err(ModelError::Format {
                    path: PathBuf::from(self.name()),
                    message: format!(
                        "the {what} {width} is not a multiple of {:?}'s block of {block}",
                        self.format
                    ),
                });
            }
        }
        Ok(LoadedModel {
            model: LlamaModel::new(build(&config, SEED, self.format, !device.is_gpu())?),
            tokenizer: tokenizer(&config)?,
            path: PathBuf::from(self.name()),
        })
    }
}

/// The tokens after the 256 bytes: EOS, then ChatML's turn markers (as SmolLM2's).
const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The tokenizer of every synthetic model: byte-level BPE without merges, so one byte of text
/// is one token. Ids 0..256 are the bytes, then [`SPECIAL_TOKENS`], then filler words
/// (` w300`, ...) up to the model's vocabulary size, which only the model produces: they give
/// its random output a readable spelling. Built as GGUF metadata, so it goes through the same
/// loader as a real model's tokenizer.
pub fn tokenizer(config: &ModelConfig) -> Result<Tokenizer> {
    let path = PathBuf::from(format!("{PREFIX}tokenizer"));
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata: tokenizer_metadata(config)?,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    Tokenizer::from_gguf(&content).map_err(ModelError::tokenizer(&path))
}

/// The GGUF metadata [`tokenizer`] is built from, to write into a synthetic GGUF file.
pub fn tokenizer_metadata(config: &ModelConfig) -> Result<HashMap<String, Value>> {
    let path = PathBuf::from(format!("{PREFIX}tokenizer"));
    let vocab = config.vocab_size;
    let first_filler = 256 + SPECIAL_TOKENS.len();
    if vocab < first_filler {
        return Err(ModelError::Format {
            path,
            message: format!(
                "a vocabulary of {vocab} cannot hold 256 byte tokens and {} special tokens",
                SPECIAL_TOKENS.len()
            ),
        });
    }
    let mut tokens: Vec<String> = byte_alphabet().iter().map(char::to_string).collect();
    tokens.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
    // `Ġ` is the byte-level spelling of a space.
    tokens.extend((first_filler..vocab).map(|id| format!("\u{120}w{id}")));
    let control = 256..first_filler;
    let token_types = (0..vocab)
        .map(|id| Value::I32(if control.contains(&id) { 3 } else { 1 }))
        .collect();
    let strings = |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
    let id = |token: &str| Value::U32(tokens.iter().position(|t| t == token).unwrap() as u32);
    let metadata = HashMap::from([
        (
            "general.architecture".to_string(),
            Value::String(config.architecture.clone()),
        ),
        (
            format!("{}.context_length", config.architecture),
            Value::U64(config.max_position_embeddings as u64),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(token_types),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
        ("tokenizer.ggml.eos_token_id".into(), id("<|endoftext|>")),
        ("tokenizer.ggml.eot_token_id".into(), id("<|im_end|>")),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML_TEMPLATE.into()),
        ),
        ("tokenizer.ggml.tokens".into(), strings(tokens.clone())),
    ]);
    Ok(metadata)
}

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for the
/// characters from U+0100 on, in byte order.
fn byte_alphabet() -> Vec<char> {
    let mut next = 0x100;
    (0..=255u8)
        .map(|b| match b {
            b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF => b as char,
            _ => {
                next += 1;
                char::from_u32(next - 1).expect("below the surrogates")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_a_format() {
        let spec = SyntheticSpec::parse("synthetic:tiny").unwrap().unwrap();
        assert_eq!((spec.preset(), spec.format()), ("tiny", GgmlDType::Q4_1));
        assert_eq!(spec.name(), "synthetic:tiny@q4_1");
        let spec = SyntheticSpec::parse("synthetic:llama-1b@Q8_0")
            .unwrap()
            .unwrap();
        assert_eq!(spec.format(), GgmlDType::Q8_0);
        assert_eq!(SyntheticSpec::parse("smollm2-135m-instruct").unwrap(), None);
        let err = SyntheticSpec::parse("synthetic:huge")
            .unwrap_err()
            .to_string();
        assert!(err.contains("presets: tiny, tiny-qwen2"), "{err}");
        let err = SyntheticSpec::parse("synthetic:tiny@q9")
            .unwrap_err()
            .to_string();
        assert!(err.contains("formats: f32, f16"), "{err}");
    }

    #[test]
    fn k_quants_need_widths_in_whole_blocks() {
        let spec = SyntheticSpec::parse("synthetic:smollm2-135m@q4_k")
            .unwrap()
            .unwrap();
        let err = spec.load().err().expect("576 is not a multiple of 256");
        assert!(err.to_string().contains("hidden size 576"), "{err}");
    }

    #[test]
    fn tokenizer_is_one_token_per_byte_and_round_trips() {
        let config = preset("tiny").unwrap();
        let tok = tokenizer(&config).unwrap();
        assert_eq!(tok.vocab_size(), config.vocab_size);
        let text = "Héllo, world!\n\ttabs";
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        assert_eq!(tok.eos_token_ids(), [256, 258]);
        assert_eq!(tok.decode(&[300, 301], true).unwrap(), " w300 w301");
        let chat = tok
            .chat_template()
            .unwrap()
            .render(&[minserve_tokenizer::ChatMessage::new("user", "hi")], true)
            .unwrap();
        assert_eq!(
            chat,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        // The three markers (12 + 10 + 12 bytes) are one token each, the rest one per byte.
        assert_eq!(tok.encode(&chat, true).unwrap().len(), 3 + chat.len() - 34);
    }

    #[test]
    fn tiny_loads_in_each_format() {
        for format in ["f32", "q8_0", "q4_1"] {
            let spec = SyntheticSpec::parse(&format!("synthetic:tiny@{format}"))
                .unwrap()
                .unwrap();
            let loaded = spec.load().unwrap();
            assert_eq!(loaded.model.config().vocab_size, 512);
            assert_eq!(loaded.path, PathBuf::from(spec.name()));
        }
    }
}
