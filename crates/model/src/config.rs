//! Shape and hyper-parameters of a Llama-family model, read from GGUF metadata or a Hugging Face
//! `config.json`. Llama, SmolLM2, Mistral and Qwen2 differ only in these fields, so one forward
//! pass serves them all.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::ModelError;

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`. llama.cpp's GGUF converter permutes Llama's q/k weights so that this is
    /// the layout in a Llama GGUF.
    Interleaved,
    /// Pairs `(i, i + d/2)`: the layout of Hugging Face checkpoints, and of Qwen2 GGUFs.
    Neox,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `general.architecture` or `model_type`: llama, mistral, qwen2.
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Longest sequence the model was trained for; requests are capped to it.
    pub max_position_embeddings: usize,
    /// Whether q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Whether the lm_head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
}

/// The architectures the one Llama code path implements.
const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2"];

fn check_supported(arch: &str, source: &Path) -> Result<(), ModelError> {
    if SUPPORTED.contains(&arch) {
        Ok(())
    } else {
        Err(ModelError::UnsupportedArchitecture {
            path: source.to_path_buf(),
            architecture: arch.to_string(),
            supported: SUPPORTED.join(", "),
        })
    }
}

impl ModelConfig {
    /// Reads the `<arch>.*` keys of a GGUF file.
    pub fn from_gguf(content: &gguf_file::Content, source: &Path) -> Result<Self, ModelError> {
        let md = &content.metadata;
        let missing = |key: &str| ModelError::Format {
            path: source.to_path_buf(),
            message: format!("metadata key `{key}` is missing or has the wrong type"),
        };
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| missing("general.architecture"))?
            .clone();
        check_supported(&arch, source)?;
        let get_u32 = |name: &str| -> Result<usize, ModelError> {
            let key = format!("{arch}.{name}");
            md.get(&key)
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
                .ok_or_else(|| missing(&key))
        };
        let get_f32 = |name: &str| -> Option<f32> {
            md.get(&format!("{arch}.{name}"))
                .and_then(|v| v.to_f32().ok())
        };
        let hidden_size = get_u32("embedding_length")?;
        let num_heads = get_u32("attention.head_count")?;
        let num_kv_heads = get_u32("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = get_u32("rope.dimension_count").unwrap_or(hidden_size / num_heads);
        let token_embd = content.tensor_infos.get("token_embd.weight");
        // Older GGUFs lack `<arch>.vocab_size`; the embedding's row count is authoritative.
        let vocab_size = match token_embd {
            Some(info) => info.shape.dims()[0],
            None => get_u32("vocab_size")?,
        };
        let rope_style = if arch == "qwen2" {
            RopeStyle::Neox
        } else {
            RopeStyle::Interleaved
        };
        let config = Self {
            hidden_size,
            intermediate_size: get_u32("feed_forward_length")?,
            num_layers: get_u32("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: get_f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
            rope_theta: get_f32("rope.freq_base").unwrap_or(10_000.0),
            rope_style,
            max_position_embeddings: get_u32("context_length").unwrap_or(4096),
            attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
            architecture: arch,
        };
        config.validate(source)?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: path.to_path_buf(),
            message: format!("not a valid config.json: {e}"),
        })?;
        check_supported(&raw.model_type, path)?;
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let config = Self {
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            attention_bias: raw.attention_bias.unwrap_or(raw.model_type == "qwen2"),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_style: RopeStyle::Neox,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            architecture: raw.model_type,
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, source: &Path) -> Result<(), ModelError> {
        let bad = |message: String| ModelError::Format {
            path: source.to_path_buf(),
            message,
        };
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_layers == 0 {
            return Err(bad("zero heads or layers".into()));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(format!(
                "{} query heads are not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head dim {} is odd: RoPE needs pairs",
                self.head_dim
            )));
        }
        Ok(())
    }

    /// The `config.json` a Hugging Face `transformers` Llama would read, for `minserve export`.
    pub fn to_hf_config_json(&self, torch_dtype: &str) -> serde_json::Value {
        serde_json::json!({
            "architectures": [match self.architecture.as_str() {
                "qwen2" => "Qwen2ForCausalLM",
                "mistral" => "MistralForCausalLM",
                _ => "LlamaForCausalLM",
            }],
            "model_type": self.architecture,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": torch_dtype,
        })
    }
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    max_position_embeddings: Option<usize>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
}
