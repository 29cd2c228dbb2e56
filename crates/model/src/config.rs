//! Shape and hyper-parameters of a Llama-family model, read from GGUF metadata or a Hugging Face
//! `config.json`. Llama, SmolLM2, Mistral, Qwen2, Qwen3 and Gemma 3 differ only in these fields, so
//! one forward pass serves them all: Gemma's extra norms, activation, embedding scale and
//! sliding windows are fields here, not a second model.

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

/// How RoPE frequencies are stretched so that a model reaches past the context it was first
/// trained on. Applies to the layers with global attention (Gemma's local layers use plain
/// RoPE at their own base). Formulas: `crate::rope::inverse_frequencies`.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    None,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f32 },
    /// Llama 3.1's: wavelengths longer than `original_context / low_freq_factor` divided by
    /// `factor`, shorter than `original_context / high_freq_factor` kept, a smooth ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
    /// YaRN as Hugging Face `transformers` computes it: interpolated low frequencies,
    /// extrapolated high ones, a linear ramp between (in dimensions set by `beta_fast` and
    /// `beta_slow`), and cos/sin multiplied by `attention_factor`.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
    },
    /// One divisor per frequency, as stored in a GGUF's `rope_freqs.weight`: how llama.cpp's
    /// converter writes Llama 3's scaling (the parameters themselves are not kept).
    Divisors(Vec<f32>),
}

/// The scaling types [`RopeScaling`] implements, for error messages.
const SUPPORTED_ROPE_SCALING: &str = "none/default, linear, llama3, yarn";

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// SwiGLU: `silu(gate) * up` (Llama, Qwen).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

/// Local attention on some layers: they see only the last `size` positions (the token itself
/// and `size - 1` before it), like Hugging Face's and llama.cpp's masks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    pub size: usize,
    /// Every `pattern`-th layer (counting from 1) is global, the others local: Gemma 3 has 6.
    pub pattern: usize,
    /// RoPE base of the local layers; global layers use `rope_theta` and `rope_scaling`.
    pub local_rope_theta: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `general.architecture` or `model_type`: llama, mistral, qwen2, qwen3, gemma3.
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
    pub rope_scaling: RopeScaling,
    /// How the block differs from Llama's.
    pub block: BlockVariant,
}

/// The ways a model's block differs from Llama's; the default is the Llama block.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlockVariant {
    pub activation: Activation,
    /// RMSNorm of each query and key head before RoPE (Gemma 3, Qwen3).
    pub qk_norm: bool,
    /// RMSNorm of the attention and MLP outputs before they join the residual stream (Gemma).
    pub post_norms: bool,
    /// Embeddings multiplied by `sqrt(hidden_size)` (Gemma).
    pub scale_embeddings: bool,
    /// Attention scores are scaled by `1 / sqrt(this)`; `None` means the head size. Gemma 3
    /// 27B's `query_pre_attn_scalar` differs from its head size.
    pub query_pre_attn_scalar: Option<usize>,
    pub sliding_window: Option<SlidingWindow>,
}

/// The architectures the one Llama code path implements.
const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "gemma3"];

fn check_supported(arch: &str, key: &'static str, source: &Path) -> Result<(), ModelError> {
    if SUPPORTED.contains(&arch) {
        Ok(())
    } else {
        Err(ModelError::UnsupportedArchitecture {
            path: source.to_path_buf(),
            key,
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
        check_supported(&arch, "general.architecture", source)?;
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
        let head_dim = get_u32("attention.key_length")
            .or_else(|_| get_u32("rope.dimension_count"))
            .unwrap_or(hidden_size / num_heads);
        let token_embd = content.tensor_infos.get("token_embd.weight");
        // Older GGUFs lack `<arch>.vocab_size`; the embedding's row count is authoritative.
        let vocab_size = match token_embd {
            Some(info) => info.shape.dims()[0],
            None => get_u32("vocab_size")?,
        };
        // llama.cpp's converter permutes q/k rows for interleaved pairs for Llama only.
        let rope_style = match arch.as_str() {
            "qwen2" | "qwen3" | "gemma3" => RopeStyle::Neox,
            _ => RopeStyle::Interleaved,
        };
        let gemma = arch == "gemma3";
        let sliding_window = match (gemma, get_u32("attention.sliding_window")) {
            (true, Ok(size)) => Some(SlidingWindow {
                size,
                // Not stored in Gemma 3 GGUFs: llama.cpp hard-codes both as well.
                pattern: get_u32("attention.sliding_window_pattern").unwrap_or(6),
                local_rope_theta: get_f32("rope.freq_base_swa").unwrap_or(10_000.0),
            }),
            _ => None,
        };
        let num_layers = get_u32("block_count")?;
        let config = Self {
            hidden_size,
            intermediate_size: get_u32("feed_forward_length")?,
            num_layers,
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
            rope_scaling: rope_scaling_from_gguf(content, &arch, source)?,
            block: BlockVariant {
                activation: if gemma {
                    Activation::GeluTanh
                } else {
                    Activation::Silu
                },
                qk_norm: content
                    .tensor_infos
                    .contains_key("blk.0.attn_q_norm.weight"),
                post_norms: content
                    .tensor_infos
                    .contains_key("blk.0.post_attention_norm.weight"),
                scale_embeddings: gemma,
                // llama.cpp tells Gemma 3 27B (62 layers) apart the same way; no key says it.
                query_pre_attn_scalar: (gemma && num_layers == 62).then(|| hidden_size / num_heads),
                sliding_window,
            },
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
        if raw.model_type.starts_with("gemma") {
            // Its safetensors need the (1 + w) norm convention and other names; not done yet.
            return Err(ModelError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                key: "model_type",
                architecture: raw.model_type,
                supported: "llama, mistral, qwen2, qwen3 from config.json; gemma3 from GGUF only"
                    .into(),
            });
        }
        check_supported(&raw.model_type, "model_type", path)?;
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        // transformers 5 writes the RoPE base and scaling together as `rope_parameters`
        // (`rope_theta`, `rope_type`, ...), older versions as `rope_theta` and `rope_scaling`.
        let parameters = raw.rope_parameters.as_ref().filter(|v| v.is_object());
        let rope_theta = raw
            .rope_theta
            .or_else(|| parameters?.get("rope_theta")?.as_f64().map(|v| v as f32))
            .unwrap_or(10_000.0);
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(4096);
        let scaling = match &raw.rope_scaling {
            None | Some(serde_json::Value::Null) => {
                parameters.filter(|p| p.get("rope_type").or_else(|| p.get("type")).is_some())
            }
            Some(value) => Some(value),
        };
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(value) => rope_scaling_from_json(value, max_position_embeddings, path)?,
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let config = Self {
            head_dim,
            attention_bias: raw.attention_bias.unwrap_or(raw.model_type == "qwen2"),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            rope_theta,
            rope_style: RopeStyle::Neox,
            max_position_embeddings,
            rope_scaling,
            block: BlockVariant {
                // Qwen3's per-head RMSNorm of queries and keys (`self_attn.q_norm` / `k_norm`).
                qk_norm: raw.model_type == "qwen3",
                ..BlockVariant::default()
            },
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
        if let Some(w) = &self.block.sliding_window {
            if w.size == 0 || w.pattern == 0 {
                return Err(bad(format!(
                    "sliding window of {} with a pattern of {}: both must be positive",
                    w.size, w.pattern
                )));
            }
        }
        if let RopeScaling::Divisors(d) = &self.rope_scaling {
            if d.len() != self.head_dim / 2 || d.iter().any(|&x| !(x.is_finite() && x > 0.0)) {
                return Err(bad(format!(
                    "rope_freqs.weight has {} entries (head dim {} needs {}), all positive",
                    d.len(),
                    self.head_dim,
                    self.head_dim / 2
                )));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head dim {} is odd: RoPE needs pairs",
                self.head_dim
            )));
        }
        Ok(())
    }

    /// The sliding window of layer `layer`, `None` for a global layer.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.block
            .sliding_window
            .filter(|w| !(layer + 1).is_multiple_of(w.pattern))
            .map(|w| w.size)
    }

    /// What attention scores are multiplied by.
    pub fn attention_scale(&self) -> f32 {
        let scalar = self.block.query_pre_attn_scalar.unwrap_or(self.head_dim);
        (1.0 / (scalar as f64).sqrt()) as f32
    }
}

/// `rope_scaling` of a `config.json`: `rope_type` (or the older `type`) and its parameters.
/// Types not implemented are an error naming them, never silently ignored: they would change
/// every logit.
fn rope_scaling_from_json(
    value: &serde_json::Value,
    max_position_embeddings: usize,
    path: &Path,
) -> Result<RopeScaling, ModelError> {
    let bad = |message: String| ModelError::Format {
        path: path.to_path_buf(),
        message: format!("rope_scaling: {message}"),
    };
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad(format!("no `rope_type` in {value}")))?;
    let number = |key: &str| value.get(key).and_then(|v| v.as_f64());
    let factor = || {
        number("factor")
            .map(|f| f as f32)
            .ok_or_else(|| bad(format!("`{kind}` needs a numeric `factor`")))
    };
    let original = number("original_max_position_embeddings").map(|v| v as usize);
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "llama3" => RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: number("low_freq_factor").unwrap_or(1.0) as f32,
            high_freq_factor: number("high_freq_factor").unwrap_or(4.0) as f32,
            original_context: original
                .ok_or_else(|| bad("`llama3` needs `original_max_position_embeddings`".into()))?,
        },
        "yarn" => {
            let factor = factor()?;
            let mscale = number("mscale");
            let mscale_all_dim = number("mscale_all_dim");
            let attention_factor = match (number("attention_factor"), mscale, mscale_all_dim) {
                (Some(a), _, _) => a as f32,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    yarn_mscale(factor, m as f32) / yarn_mscale(factor, all as f32)
                }
                _ => yarn_mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_context: original.unwrap_or(max_position_embeddings),
                beta_fast: number("beta_fast").unwrap_or(32.0) as f32,
                beta_slow: number("beta_slow").unwrap_or(1.0) as f32,
                attention_factor,
            }
        }
        other => {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                key: "rope_scaling.rope_type".into(),
                value: other.into(),
                supported: SUPPORTED_ROPE_SCALING.into(),
            })
        }
    })
}

/// YaRN's default attention factor: `0.1 * m * ln(factor) + 1` (1 when not stretching).
fn yarn_mscale(factor: f32, m: f32) -> f32 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

/// The scaling a GGUF declares: `rope_freqs.weight` (Llama 3, as llama.cpp converts it; its
/// length is checked in `validate`), else the `<arch>.rope.scaling.*` keys.
fn rope_scaling_from_gguf(
    content: &gguf_file::Content,
    arch: &str,
    source: &Path,
) -> Result<RopeScaling, ModelError> {
    let md = &content.metadata;
    let key = |name: &str| format!("{arch}.rope.scaling.{name}");
    let number = |name: &str| md.get(&key(name)).and_then(|v| v.to_f32().ok());
    let count = |name: &str| md.get(&key(name)).and_then(|v| v.to_u32().ok());
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        let mut file = std::fs::File::open(source).map_err(|e| ModelError::io(source, e))?;
        let divisors = content
            .tensor(&mut file, "rope_freqs.weight", &candle_core::Device::Cpu)
            .and_then(|t| t.dequantize(&candle_core::Device::Cpu))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| ModelError::Tensor {
                path: source.to_path_buf(),
                name: "rope_freqs.weight".into(),
                message: e.to_string(),
            })?;
        return Ok(RopeScaling::Divisors(divisors));
    }
    let kind = match md.get(&key("type")) {
        None => return Ok(RopeScaling::None),
        Some(v) => v.to_string().map_err(|_| ModelError::Format {
            path: source.to_path_buf(),
            message: format!("metadata key `{}` is not a string", key("type")),
        })?,
    };
    let factor = || {
        number("factor").ok_or_else(|| ModelError::Format {
            path: source.to_path_buf(),
            message: format!(
                "`{}` is `{kind}` but `{}` is missing",
                key("type"),
                key("factor")
            ),
        })
    };
    Ok(match kind.as_str() {
        "none" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "yarn" => {
            let factor = factor()?;
            RopeScaling::Yarn {
                factor,
                original_context: count("original_context_length")
                    .map(|v| v as usize)
                    .ok_or_else(|| ModelError::Format {
                        path: source.to_path_buf(),
                        message: format!("yarn scaling needs `{}`", key("original_context_length")),
                    })?,
                beta_fast: number("yarn_beta_fast").unwrap_or(32.0),
                beta_slow: number("yarn_beta_slow").unwrap_or(1.0),
                attention_factor: number("attn_factor").unwrap_or_else(|| yarn_mscale(factor, 1.0)),
            }
        }
        other => {
            return Err(ModelError::Unsupported {
                path: source.to_path_buf(),
                key: key("type"),
                value: other.into(),
                supported: "none, linear, yarn (and llama3 as rope_freqs.weight)".into(),
            })
        }
    })
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
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
}
