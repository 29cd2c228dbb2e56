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

/// The `model_type`s of `config.json` that the same code path reads.
const SUPPORTED_HF: &[&str] = &["llama", "mistral", "qwen2", "qwen3", GEMMA3_TEXT];

/// Gemma 3's text model (`Gemma3ForCausalLM`) in `config.json`; minserve calls it `gemma3`, as
/// GGUF does.
pub const GEMMA3_TEXT: &str = "gemma3_text";

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
        let invalid = |e: serde_json::Error| ModelError::Format {
            path: path.to_path_buf(),
            message: format!("not a valid config.json: {e}"),
        };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(invalid)?;
        let raw = HfConfig::deserialize(&json).map_err(invalid)?;
        let gemma = match raw.model_type.as_str() {
            GEMMA3_TEXT => Some(GemmaFields::deserialize(&json).map_err(invalid)?),
            _ => None,
        };
        let architecture = match raw.model_type.as_str() {
            GEMMA3_TEXT => "gemma3".to_string(),
            other if SUPPORTED_HF.contains(&other) => other.to_string(),
            other => {
                return Err(ModelError::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    key: "model_type",
                    architecture: other.to_string(),
                    supported: format!(
                        "{}{}",
                        SUPPORTED_HF.join(", "),
                        if other == "gemma3" {
                            " (`gemma3` is the image-and-text model; its text model's \
                             config.json says `gemma3_text`)"
                        } else {
                            ""
                        }
                    ),
                })
            }
        };
        let head_dim = raw.head_dim.unwrap_or(match gemma {
            // Gemma 3's heads are 256 wide whatever the hidden size (transformers' default).
            Some(_) => 256,
            None => raw.hidden_size / raw.num_attention_heads.max(1),
        });
        let max_position_embeddings =
            raw.max_position_embeddings
                .unwrap_or(if gemma.is_some() { 131_072 } else { 4096 });
        let (rope_theta, rope_scaling, block) = match &gemma {
            Some(fields) => {
                let gemma = gemma3_block(fields, &raw, head_dim, max_position_embeddings, path)?;
                (gemma.rope_theta, gemma.rope_scaling, gemma.block)
            }
            None => {
                let (theta, scaling) = match &raw.rope_parameters {
                    None | Some(serde_json::Value::Null) => (
                        raw.rope_theta.unwrap_or(10_000.0),
                        top_level_rope_scaling(&raw, max_position_embeddings, path)?,
                    ),
                    Some(value) => rope_from_parameters(
                        value,
                        "rope_parameters",
                        &raw,
                        max_position_embeddings,
                        path,
                    )?,
                };
                let block = BlockVariant {
                    // Qwen3's per-head RMSNorm of queries and keys (`self_attn.q_norm` / `k_norm`).
                    qk_norm: raw.model_type == "qwen3",
                    ..BlockVariant::default()
                };
                (theta, scaling, block)
            }
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let config = Self {
            head_dim,
            attention_bias: raw.attention_bias.unwrap_or(raw.model_type == "qwen2"),
            // transformers ties Gemma's embeddings unless told otherwise, and no other model's.
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(gemma.is_some()),
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw
                .rms_norm_eps
                .unwrap_or(if gemma.is_some() { 1e-6 } else { 1e-5 }),
            rope_theta,
            rope_style: RopeStyle::Neox,
            max_position_embeddings,
            rope_scaling,
            block,
            architecture,
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
    field: &str,
    max_position_embeddings: usize,
    path: &Path,
) -> Result<RopeScaling, ModelError> {
    let bad = |message: String| ModelError::Format {
        path: path.to_path_buf(),
        message: format!("{field}: {message}"),
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
                key: format!("{field}.rope_type"),
                value: other.into(),
                supported: SUPPORTED_ROPE_SCALING.into(),
            })
        }
    })
}

/// transformers 5's `rope_parameters` (`field` names where it sits): the base and the scaling in
/// one object. Defaulting the base when it is missing would run every position with the wrong
/// frequencies, so a missing or conflicting base is an error naming the field.
fn rope_from_parameters(
    value: &serde_json::Value,
    field: &str,
    raw: &HfConfig,
    max_position_embeddings: usize,
    path: &Path,
) -> Result<(f32, RopeScaling), ModelError> {
    let bad = |message: String| ModelError::Format {
        path: path.to_path_buf(),
        message: format!("{field}: {message}"),
    };
    let theta = value
        .get("rope_theta")
        .and_then(|v| v.as_f64())
        .map(|t| t as f32)
        .or(raw.rope_theta)
        .ok_or_else(|| {
            bad(format!(
                "no numeric `rope_theta` in {value} (one object per layer type is read for \
                 `{GEMMA3_TEXT}` only)"
            ))
        })?;
    if let Some(top) = raw.rope_theta.filter(|&top| top != theta) {
        return Err(bad(format!(
            "`rope_theta` {theta} differs from the top-level `rope_theta` {top}"
        )));
    }
    if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "both `rope_parameters` and `rope_scaling` are set: say the scaling once".into(),
        ));
    }
    let scaling = match value.get("rope_type").or_else(|| value.get("type")) {
        None => RopeScaling::None,
        Some(_) => rope_scaling_from_json(value, field, max_position_embeddings, path)?,
    };
    Ok((theta, scaling))
}

/// transformers 4's spelling: `rope_scaling` beside a top-level `rope_theta`.
fn top_level_rope_scaling(
    raw: &HfConfig,
    max_position_embeddings: usize,
    path: &Path,
) -> Result<RopeScaling, ModelError> {
    match &raw.rope_scaling {
        None | Some(serde_json::Value::Null) => Ok(RopeScaling::None),
        Some(value) => rope_scaling_from_json(value, "rope_scaling", max_position_embeddings, path),
    }
}

/// What Gemma 3's `config.json` sets beyond the Llama fields.
struct Gemma3Parts {
    rope_theta: f32,
    rope_scaling: RopeScaling,
    block: BlockVariant,
}

/// Gemma 3's block from its `config.json`, with transformers' defaults for absent keys. Both
/// RoPE spellings are read: transformers 4's (`rope_theta` and `rope_scaling` for the global
/// layers, `rope_local_base_freq` for the local ones) and transformers 5's `rope_parameters`
/// with one object per layer type. What the forward pass does not implement (logit
/// soft-capping, bidirectional attention, an irregular layer pattern) is an error naming the key.
fn gemma3_block(
    fields: &GemmaFields,
    raw: &HfConfig,
    head_dim: usize,
    max_position_embeddings: usize,
    path: &Path,
) -> Result<Gemma3Parts, ModelError> {
    let unsupported = |key: &str, value: String, supported: &str| ModelError::Unsupported {
        path: path.to_path_buf(),
        key: key.to_string(),
        value,
        supported: supported.to_string(),
    };
    let bad = |message: String| ModelError::Format {
        path: path.to_path_buf(),
        message,
    };
    let activation = fields
        .hidden_activation
        .as_deref()
        .unwrap_or(GEMMA_ACTIVATION);
    if activation != GEMMA_ACTIVATION {
        return Err(unsupported(
            "hidden_activation",
            activation.into(),
            GEMMA_ACTIVATION,
        ));
    }
    for (key, value) in [
        ("final_logit_softcapping", fields.final_logit_softcapping),
        ("attn_logit_softcapping", fields.attn_logit_softcapping),
    ] {
        if let Some(cap) = value {
            return Err(unsupported(key, cap.to_string(), "null (no soft-capping)"));
        }
    }
    if fields.use_bidirectional_attention == Some(true) {
        return Err(unsupported(
            "use_bidirectional_attention",
            "true".into(),
            "false (causal attention)",
        ));
    }
    if raw.attention_bias == Some(true) {
        return Err(unsupported("attention_bias", "true".into(), "false"));
    }

    let ((rope_theta, rope_scaling), local_rope_theta) = match &raw.rope_parameters {
        None | Some(serde_json::Value::Null) => (
            (
                raw.rope_theta.unwrap_or(GEMMA_GLOBAL_THETA),
                top_level_rope_scaling(raw, max_position_embeddings, path)?,
            ),
            fields.rope_local_base_freq.unwrap_or(GEMMA_LOCAL_THETA),
        ),
        Some(value) => {
            let object = value
                .as_object()
                .ok_or_else(|| bad(format!("rope_parameters: not an object: {value}")))?;
            if let Some(other) = object.keys().find(|k| !LAYER_TYPES.contains(&k.as_str())) {
                return Err(bad(format!(
                    "rope_parameters: `{other}` is not a layer type; `{GEMMA3_TEXT}` keeps one \
                     object per layer type ({})",
                    LAYER_TYPES.join(", ")
                )));
            }
            let global = match object.get(FULL_ATTENTION) {
                Some(full) => rope_from_parameters(
                    full,
                    "rope_parameters.full_attention",
                    raw,
                    max_position_embeddings,
                    path,
                )?,
                None => (
                    raw.rope_theta.unwrap_or(GEMMA_GLOBAL_THETA),
                    RopeScaling::None,
                ),
            };
            (
                global,
                local_theta(object.get(SLIDING_ATTENTION), fields, path)?,
            )
        }
    };

    let size = match fields.sliding_window {
        None => 4096,
        Some(Some(size)) => size,
        Some(None) => {
            return Err(unsupported(
                "sliding_window",
                "null".into(),
                "a window size (Gemma 3's local layers)",
            ))
        }
    };
    let pattern = match &fields.layer_types {
        Some(types) => {
            let pattern = pattern_of(types, raw.num_hidden_layers, path)?;
            if let Some(declared) = fields.sliding_window_pattern {
                if layer_types(raw.num_hidden_layers, declared) != *types {
                    return Err(bad(format!(
                        "`sliding_window_pattern` {declared} and `layer_types` disagree"
                    )));
                }
            }
            pattern
        }
        None => fields.sliding_window_pattern.unwrap_or(6),
    };
    let scalar = fields.query_pre_attn_scalar.unwrap_or(256.0);
    if !(scalar >= 1.0 && scalar.fract() == 0.0) {
        return Err(bad(format!(
            "`query_pre_attn_scalar` {scalar} is not a positive whole number"
        )));
    }
    let scalar = scalar as usize;
    Ok(Gemma3Parts {
        rope_theta,
        rope_scaling,
        block: BlockVariant {
            activation: Activation::GeluTanh,
            qk_norm: true,
            post_norms: true,
            scale_embeddings: true,
            query_pre_attn_scalar: (scalar != head_dim).then_some(scalar),
            sliding_window: Some(SlidingWindow {
                size,
                pattern,
                local_rope_theta,
            }),
        },
    })
}

/// The RoPE base of Gemma's local layers from `rope_parameters.sliding_attention`: plain RoPE
/// (minserve scales only the global layers, as Gemma 3 does).
fn local_theta(
    sliding: Option<&serde_json::Value>,
    fields: &GemmaFields,
    path: &Path,
) -> Result<f32, ModelError> {
    let field = "rope_parameters.sliding_attention";
    let Some(sliding) = sliding else {
        return Ok(fields.rope_local_base_freq.unwrap_or(GEMMA_LOCAL_THETA));
    };
    if let Some(kind) = sliding.get("rope_type").and_then(|v| v.as_str()) {
        if kind != "default" {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                key: format!("{field}.rope_type"),
                value: kind.into(),
                supported: "default (scaling applies to full_attention only)".into(),
            });
        }
    }
    let theta = sliding.get("rope_theta").and_then(|v| v.as_f64());
    match (theta, fields.rope_local_base_freq) {
        (Some(theta), Some(top)) if theta as f32 != top => Err(ModelError::Format {
            path: path.to_path_buf(),
            message: format!(
                "{field}: `rope_theta` {theta} differs from `rope_local_base_freq` {top}"
            ),
        }),
        (Some(theta), _) => Ok(theta as f32),
        (None, top) => Ok(top.unwrap_or(GEMMA_LOCAL_THETA)),
    }
}

const FULL_ATTENTION: &str = "full_attention";
const SLIDING_ATTENTION: &str = "sliding_attention";
const LAYER_TYPES: &[&str] = &[FULL_ATTENTION, SLIDING_ATTENTION];
const GEMMA_ACTIVATION: &str = "gelu_pytorch_tanh";
/// transformers' defaults for Gemma 3's RoPE bases.
const GEMMA_GLOBAL_THETA: f32 = 1_000_000.0;
const GEMMA_LOCAL_THETA: f32 = 10_000.0;

/// `layer_types` of `layers` layers where every `pattern`-th (counting from 1) is global.
pub fn layer_types(layers: usize, pattern: usize) -> Vec<String> {
    (0..layers)
        .map(|i| match (i + 1).is_multiple_of(pattern) {
            true => FULL_ATTENTION.to_string(),
            false => SLIDING_ATTENTION.to_string(),
        })
        .collect()
}

/// The period of `types`: minserve's forward pass knows "every n-th layer is global" and
/// nothing more irregular, so any other list is an error that shows it.
fn pattern_of(types: &[String], layers: usize, path: &Path) -> Result<usize, ModelError> {
    let bad = |message: String| ModelError::Format {
        path: path.to_path_buf(),
        message: format!("layer_types: {message}"),
    };
    if types.len() != layers {
        return Err(bad(format!(
            "{} entries for {layers} layers (`num_hidden_layers`)",
            types.len()
        )));
    }
    if let Some(other) = types.iter().find(|t| !LAYER_TYPES.contains(&t.as_str())) {
        return Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            key: "layer_types".into(),
            value: other.clone(),
            supported: LAYER_TYPES.join(", "),
        });
    }
    // No global layer at all is the pattern one past the last layer.
    let pattern = types
        .iter()
        .position(|t| t == FULL_ATTENTION)
        .map_or(layers + 1, |first| first + 1);
    if layer_types(layers, pattern) != types {
        let global: Vec<usize> = (0..layers)
            .filter(|&i| types[i] == FULL_ATTENTION)
            .collect();
        return Err(bad(format!(
            "full-attention layers {global:?} are not every {pattern}-th layer, the only \
             pattern the forward pass implements"
        )));
    }
    Ok(pattern)
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
    /// transformers 5's spelling of RoPE: `{"rope_theta": .., "rope_type": .., ...scaling}` in one
    /// object, with no top-level `rope_theta` or `rope_scaling`.
    rope_parameters: Option<serde_json::Value>,
}

/// The keys of Gemma 3's `config.json` (`gemma3_text`) beyond [`HfConfig`], read for it only:
/// other models use some of the same names with other meanings (Mistral's `sliding_window`).
#[derive(Debug, Deserialize)]
struct GemmaFields {
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    /// Absent (transformers' default window) and `null` (no window) differ.
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<usize>>,
    /// transformers 4's spelling of the layer pattern; `layer_types` lists each layer instead.
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f32>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
}

/// A key that is present deserializes to `Some`, even when its value is `null`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}
