//! Exporting a GGUF model to a standard Hugging Face folder (`config.json`, `model.safetensors`,
//! tokenizer files), so that a model fetched as GGUF can be read by `transformers`, by candle's
//! own Llama, or by minserve's safetensors path.
//!
//! Every tensor is dequantized: the folder holds the exact values minserve's GGUF path multiplies
//! by (in f32; f16/bf16 round them once more). Llama-style GGUFs store q/k projection rows
//! permuted for interleaved RoPE, so those are permuted back: the result is an ordinary
//! checkpoint that runs with the usual half-split (Neox) RoPE.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use minserve_tokenizer::Tokenizer;

use crate::config::{layer_types, ModelConfig, RopeScaling, RopeStyle, GEMMA3_TEXT};
use crate::error::{ModelError, Result};
use crate::hf_norms::HfNorms;
use crate::rope::llama3_parameters;
use crate::safetensors::{tensor_plan, WEIGHTS_FILE};

/// The dtype of the exported tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportDType {
    /// Exactly the dequantized values; twice the size of f16.
    #[default]
    F32,
    F16,
    BF16,
}

impl ExportDType {
    /// The `torch_dtype` that `config.json` declares.
    pub fn torch_dtype(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }
}

impl fmt::Display for ExportDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        })
    }
}

impl FromStr for ExportDType {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            _ => Err(format!("unknown dtype `{s}` (expected f32, f16 or bf16)")),
        }
    }
}

/// What [`export_gguf_to_hf`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out_dir: PathBuf,
    /// Every file written, `model.safetensors` first.
    pub files: Vec<PathBuf>,
    pub config: ModelConfig,
    pub dtype: ExportDType,
    /// Number of tensors in `model.safetensors`.
    pub num_tensors: usize,
    /// Size of `model.safetensors`.
    pub weights_bytes: u64,
    /// Whether q/k rows were permuted back from llama.cpp's interleaved layout.
    pub unpermuted_qk: bool,
    /// GGUF tensors with no Hugging Face counterpart, left out of the folder because
    /// `config.json` carries what they mean (`rope_freqs.weight`: `rope_scaling`).
    pub skipped: Vec<String>,
}

/// GGUF tensors that are derived data, not weights: `rope_freqs.weight` is Llama 3's RoPE
/// scaling, written to `config.json` as its parameters (`ModelConfig::to_hf_config_json`).
const SKIPPABLE: &[&str] = &["rope_freqs.weight"];

/// A GGUF model read into Hugging Face names and layout, every tensor dequantized to f32: what
/// [`export_gguf_to_hf`] writes, and what `minserve quantize` starts from.
pub struct HfModel {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    /// `config.json` for this model (without the quantization of a quantized checkpoint).
    pub config_json: serde_json::Value,
    /// `(Hugging Face name, f32 tensor)`, every tensor [`tensor_plan`] expects and no other.
    pub tensors: Vec<(String, Tensor)>,
    /// Whether q/k rows were permuted back from llama.cpp's interleaved layout (see
    /// [`gguf_rows_of`] for the way back).
    pub unpermuted_qk: bool,
    /// GGUF tensors with no Hugging Face counterpart, left out because `config.json` carries
    /// what they mean (`rope_freqs.weight`: `rope_scaling`).
    pub skipped: Vec<String>,
}

/// Reads the GGUF model at `gguf_path` as a Hugging Face checkpoint in memory. What
/// `config.json` cannot express fails here, before anything is written anywhere.
pub fn read_gguf_as_hf(gguf_path: &Path) -> Result<HfModel> {
    let content = crate::gguf::read_content(gguf_path)?;
    let config = ModelConfig::from_gguf(&content, gguf_path)?;
    let tokenizer = Tokenizer::from_gguf(&content).map_err(ModelError::tokenizer(gguf_path))?;
    let mut config_json =
        hf_config_json(&config, ExportDType::F32.torch_dtype()).map_err(|message| {
            ModelError::Format {
                path: gguf_path.to_path_buf(),
                message,
            }
        })?;
    if let Some(obj) = config_json.as_object_mut() {
        // transformers' generate() falls back to these when there is no generation_config.json.
        if let Some(bos) = tokenizer.bos_token_id() {
            obj.insert("bos_token_id".into(), bos.into());
        }
        if let Some(eos) = tokenizer.eos_token_id() {
            obj.insert("eos_token_id".into(), eos.into());
        }
    }

    let unpermute = config.rope_style == RopeStyle::Interleaved;
    let norms = HfNorms::of(&config);
    let file = File::open(gguf_path).map_err(|e| ModelError::io(gguf_path, e))?;
    let mut reader = BufReader::new(file);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(names.len());
    let mut skipped = Vec::new();
    for gguf_name in names {
        let tensor_err = |message: String| ModelError::Tensor {
            path: gguf_path.to_path_buf(),
            name: gguf_name.clone(),
            message,
        };
        let Some((hf, role)) = hf_name(gguf_name, &norms) else {
            if SKIPPABLE.contains(&gguf_name.as_str()) {
                skipped.push(gguf_name.clone());
                continue;
            }
            return Err(tensor_err(
                "has no Hugging Face counterpart; refusing to drop a weight silently".into(),
            ));
        };
        let qtensor = content
            .tensor(&mut reader, gguf_name, &Device::Cpu)
            .map_err(|e| tensor_err(e.to_string()))?;
        let mut t = qtensor.dequantize(&Device::Cpu)?;
        if unpermute {
            if let Some(heads) = role.heads(&config) {
                t = unpermute_rows(&t, heads, config.head_dim).map_err(tensor_err)?;
            }
        }
        if let Role::Norm = role {
            // The GGUF holds the multiplier; Gemma's checkpoints store one less.
            t = t.affine(1.0, -norms.stored_offset() as f64)?;
        }
        tensors.push((hf, t.to_dtype(DType::F32)?.contiguous()?));
    }
    check_complete(gguf_path, &config, &tensors)?;
    Ok(HfModel {
        config,
        tokenizer,
        config_json,
        tensors,
        unpermuted_qk: unpermute,
        skipped,
    })
}

/// Exports the GGUF model at `gguf_path` into `out_dir` (created; must be empty if it exists).
///
/// An existing non-empty folder is refused rather than overwritten: a stale shard index,
/// `generation_config.json` or tokenizer file left next to the new weights would silently change
/// how the folder loads.
pub fn export_gguf_to_hf(
    gguf_path: &Path,
    out_dir: &Path,
    dtype: ExportDType,
) -> Result<ExportReport> {
    let model = read_gguf_as_hf(gguf_path)?;
    prepare_out_dir(out_dir)?;
    let tensors = model
        .tensors
        .iter()
        .map(|(name, t)| Ok((name.as_str(), t.to_dtype(dtype.candle())?)))
        .collect::<Result<Vec<_>>>()?;
    let (files, weights_bytes) = write_hf_folder(
        out_dir,
        tensors.iter().map(|(n, t)| (*n, t)),
        model.config_json,
        dtype.torch_dtype(),
        &model.tokenizer,
    )?;
    Ok(ExportReport {
        out_dir: out_dir.to_path_buf(),
        files,
        config: model.config,
        dtype,
        num_tensors: tensors.len(),
        weights_bytes,
        unpermuted_qk: model.unpermuted_qk,
        skipped: model.skipped,
    })
}

/// Writes a Hugging Face folder into `out_dir` (already prepared): `model.safetensors` from
/// `tensors`, `config.json` (`config_json` with `torch_dtype`) and the tokenizer files. Returns
/// the files written, weights first, and the size of the weights file.
pub fn write_hf_folder<'a, V: ::safetensors::View + 'a>(
    out_dir: &Path,
    tensors: impl IntoIterator<Item = (&'a str, V)>,
    mut config_json: serde_json::Value,
    torch_dtype: &str,
    tokenizer: &Tokenizer,
) -> Result<(Vec<PathBuf>, u64)> {
    let weights_path = out_dir.join(WEIGHTS_FILE);
    write_safetensors(&weights_path, tensors)?;
    let weights_bytes = std::fs::metadata(&weights_path)
        .map_err(|e| ModelError::io(&weights_path, e))?
        .len();
    config_json["torch_dtype"] = torch_dtype.into();
    let config_path = out_dir.join("config.json");
    write_json(&config_path, &config_json)?;
    tokenizer
        .write_hf_files(out_dir)
        .map_err(ModelError::tokenizer(out_dir))?;
    let mut files = vec![weights_path, config_path];
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        let path = out_dir.join(name);
        if path.is_file() {
            files.push(path);
        }
    }
    Ok((files, weights_bytes))
}

/// The `config.json` that Hugging Face `transformers` would read for `config`: a Llama, Qwen or
/// Mistral, or Gemma 3's text model. Fails for what it cannot express (RoPE divisors that are
/// not Llama 3's).
pub fn hf_config_json(
    config: &ModelConfig,
    torch_dtype: &str,
) -> Result<serde_json::Value, String> {
    let c = config;
    if c.architecture == "gemma3" {
        return gemma3_config_json(c, torch_dtype);
    }
    if c.block.qk_norm && c.architecture != "qwen3" {
        // transformers reads q/k norms for Qwen3 only: refused before anything is written.
        return Err(format!(
            "exporting {} (per-head q/k norms) to a Hugging Face folder is not supported yet",
            c.architecture
        ));
    }
    let class = match c.architecture.as_str() {
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let extra = serde_json::json!({"hidden_act": "silu"});
    common_config_json(c, class, &c.architecture, torch_dtype, extra)
}

/// The keys every exported `config.json` has (class, shape, RoPE base and scaling), with the
/// model's own `extra` keys.
fn common_config_json(
    c: &ModelConfig,
    class: &str,
    model_type: &str,
    torch_dtype: &str,
    extra: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let mut json = serde_json::json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "attention_bias": c.attention_bias,
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": torch_dtype,
    });
    if let (Some(json), serde_json::Value::Object(extra)) = (json.as_object_mut(), extra) {
        json.extend(extra);
    }
    if let Some(scaling) = rope_scaling_to_json(c)? {
        json["rope_scaling"] = scaling;
    }
    Ok(json)
}

/// Gemma 3's text model (`Gemma3ForCausalLM`). RoPE and the layer pattern are written in
/// transformers 4's keys (`rope_theta`, `rope_local_base_freq`, `rope_scaling` of the global
/// layers, `sliding_window_pattern`), which transformers 5 still reads (into its per-layer-type
/// `rope_parameters`), plus the `layer_types` both read. Soft-capping is written as the `null`
/// Gemma 3 has: minserve does not implement it.
fn gemma3_config_json(c: &ModelConfig, torch_dtype: &str) -> Result<serde_json::Value, String> {
    let window = c
        .block
        .sliding_window
        .ok_or("a Gemma 3 without sliding-window layers cannot be written as `gemma3_text`")?;
    let extra = serde_json::json!({
        "rope_local_base_freq": window.local_rope_theta,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": c.block.query_pre_attn_scalar.unwrap_or(c.head_dim),
        "sliding_window": window.size,
        "sliding_window_pattern": window.pattern,
        "layer_types": layer_types(c.num_layers, window.pattern),
        "final_logit_softcapping": null,
        "attn_logit_softcapping": null,
    });
    common_config_json(c, "Gemma3ForCausalLM", GEMMA3_TEXT, torch_dtype, extra)
}

/// The `rope_scaling` object of an exported `config.json`, `None` without scaling. GGUF stores
/// Llama 3's scaling as divisors only; they are turned back into its parameters.
fn rope_scaling_to_json(c: &ModelConfig) -> Result<Option<serde_json::Value>, String> {
    Ok(Some(match &c.rope_scaling {
        RopeScaling::None => return Ok(None),
        RopeScaling::Linear { factor } => {
            serde_json::json!({"rope_type": "linear", "factor": factor})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => llama3_json(
            *factor,
            *low_freq_factor,
            *high_freq_factor,
            *original_context,
        ),
        RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            attention_factor,
        } => serde_json::json!({
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": original_context,
            "beta_fast": beta_fast,
            "beta_slow": beta_slow,
            "attention_factor": attention_factor,
        }),
        RopeScaling::Divisors(divisors) => {
            let (factor, low, high, original) =
                llama3_parameters(divisors, c.head_dim, c.rope_theta).ok_or(
                    "rope_freqs.weight is not Llama 3 scaling; config.json cannot express it",
                )?;
            llama3_json(factor, low, high, original)
        }
    }))
}

fn llama3_json(factor: f32, low: f32, high: f32, original: usize) -> serde_json::Value {
    serde_json::json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    })
}

/// Creates `out_dir`, refusing one that exists and is not empty (see [`export_gguf_to_hf`]).
pub fn prepare_out_dir(out_dir: &Path) -> Result<()> {
    if out_dir.exists() {
        let mut entries = std::fs::read_dir(out_dir).map_err(|e| ModelError::io(out_dir, e))?;
        if entries.next().is_some() {
            return Err(ModelError::Format {
                path: out_dir.to_path_buf(),
                message: "output folder is not empty; choose a new or empty folder".into(),
            });
        }
    }
    std::fs::create_dir_all(out_dir).map_err(|e| ModelError::io(out_dir, e))
}

/// Whether a GGUF tensor's rows must be un-permuted (and with which head count), or its values
/// shifted to the checkpoint's norm convention.
#[derive(Clone, Copy)]
enum Role {
    Query,
    Key,
    Norm,
    Other,
}

impl Role {
    /// The head count llama.cpp permuted this tensor's rows by, if it did.
    fn heads(self, config: &ModelConfig) -> Option<usize> {
        match self {
            Role::Query => Some(config.num_heads),
            Role::Key => Some(config.num_kv_heads),
            Role::Norm | Role::Other => None,
        }
    }
}

/// For a Hugging Face tensor of [`HfModel`], the head count to give [`permute_rows_for_gguf`]
/// to bring its rows back into the order the GGUF (and minserve's forward pass over it) has
/// them; `None` when they are in that order already.
pub fn gguf_rows_of(model: &HfModel, hf_name: &str) -> Option<usize> {
    if !model.unpermuted_qk {
        return None;
    }
    if hf_name.ends_with("self_attn.q_proj.weight") || hf_name.ends_with("self_attn.q_proj.bias") {
        Some(model.config.num_heads)
    } else if hf_name.ends_with("self_attn.k_proj.weight")
        || hf_name.ends_with("self_attn.k_proj.bias")
    {
        Some(model.config.num_kv_heads)
    } else {
        None
    }
}

/// The Hugging Face name of a llama.cpp tensor name, in a model whose norms are `norms`.
fn hf_name(gguf: &str, norms: &HfNorms) -> Option<(String, Role)> {
    let top = match gguf {
        "token_embd.weight" => Some(("model.embed_tokens.weight", Role::Other)),
        "output_norm.weight" => Some(("model.norm.weight", Role::Norm)),
        "output.weight" => Some(("lm_head.weight", Role::Other)),
        _ => None,
    };
    if let Some((name, role)) = top {
        return Some((name.to_string(), role));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (hf, role) = match base {
        "attn_q" => ("self_attn.q_proj", Role::Query),
        "attn_k" => ("self_attn.k_proj", Role::Key),
        "attn_v" => ("self_attn.v_proj", Role::Other),
        "attn_output" => ("self_attn.o_proj", Role::Other),
        "ffn_gate" => ("mlp.gate_proj", Role::Other),
        "ffn_up" => ("mlp.up_proj", Role::Other),
        "ffn_down" => ("mlp.down_proj", Role::Other),
        _ if suffix != "weight" => return None,
        "attn_norm" => (norms.attention, Role::Norm),
        // Per-head norms (Qwen3, Gemma 3): `head_dim` weights, not rows of heads, so never
        // permuted.
        "attn_q_norm" => ("self_attn.q_norm", Role::Norm),
        "attn_k_norm" => ("self_attn.k_norm", Role::Norm),
        "ffn_norm" => (norms.feed_forward, Role::Norm),
        "post_attention_norm" => (norms.post?.0, Role::Norm),
        "post_ffw_norm" => (norms.post?.1, Role::Norm),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}.{suffix}"), role))
}

/// Undoes llama.cpp's `permute(w, n_head)`, which reorders the rows of each head from
/// `[first halves..., second halves...]` to interleaved pairs:
/// `GGUF = HF.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2)`, so
/// `HF = GGUF.reshape(n_head, head_dim/2, 2, in).swapaxes(1, 2)`. Works for biases (1-D) too.
fn unpermute_rows(
    t: &Tensor,
    n_head: usize,
    head_dim: usize,
) -> std::result::Result<Tensor, String> {
    swap_head_axes(t, n_head, head_dim, (head_dim / 2, 2))
}

/// llama.cpp's `permute(w, n_head)`, the inverse of [`unpermute_rows`]:
/// `GGUF = HF.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2)`.
pub fn permute_rows_for_gguf(
    t: &Tensor,
    n_head: usize,
    head_dim: usize,
) -> std::result::Result<Tensor, String> {
    swap_head_axes(t, n_head, head_dim, (2, head_dim / 2))
}

/// `t.reshape(n_head, a, b, rest).swapaxes(1, 2)` back in `t`'s shape, `(a, b)` = `split`.
fn swap_head_axes(
    t: &Tensor,
    n_head: usize,
    head_dim: usize,
    split: (usize, usize),
) -> std::result::Result<Tensor, String> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if rows != n_head * head_dim || !head_dim.is_multiple_of(2) {
        return Err(format!(
            "shape {dims:?} does not split into {n_head} heads of {head_dim}"
        ));
    }
    let cols: usize = dims[1..].iter().product();
    let go = || -> candle_core::Result<Tensor> {
        t.reshape((n_head, split.0, split.1, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape(dims.as_slice())
    };
    go().map_err(|e| e.to_string())
}

/// The folder must load back: every tensor minserve's safetensors loader (and `transformers`)
/// expects must have been produced, with the shape the config implies.
fn check_complete(
    gguf_path: &Path,
    config: &ModelConfig,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let have: HashMap<&str, &[usize]> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.dims()))
        .collect();
    let plan = tensor_plan(config);
    for (name, shape) in &plan {
        match have.get(name.as_str()) {
            None => {
                return Err(ModelError::Format {
                    path: gguf_path.to_path_buf(),
                    message: format!("the GGUF has no tensor that exports to `{name}`"),
                })
            }
            Some(got) if *got != shape.as_slice() => {
                return Err(ModelError::Format {
                    path: gguf_path.to_path_buf(),
                    message: format!(
                    "`{name}` would have shape {got:?}, but the model's config implies {shape:?}"
                ),
                })
            }
            Some(_) => {}
        }
    }
    let wanted: BTreeSet<&str> = plan.iter().map(|(n, _)| n.as_str()).collect();
    if let Some((extra, _)) = tensors.iter().find(|(n, _)| !wanted.contains(n.as_str())) {
        return Err(ModelError::Format {
            path: gguf_path.to_path_buf(),
            message: format!("`{extra}` is not part of the model its metadata describes"),
        });
    }
    Ok(())
}

/// Writes through a temporary name and renames, so an interrupted export never leaves a
/// truncated `model.safetensors` that looks complete.
pub fn write_safetensors<'a, V: ::safetensors::View + 'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, V)>,
) -> Result<()> {
    let tmp = path.with_extension("safetensors.partial");
    // transformers refuses a safetensors checkpoint whose metadata lacks `format`.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    ::safetensors::serialize_to_file(tensors, Some(metadata), &tmp).map_err(|e| {
        ModelError::Format {
            path: tmp.clone(),
            message: format!("writing safetensors: {e}"),
        }
    })?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// Writes `value` as pretty-printed JSON with a final newline.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| ModelError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (n_head, head_dim, cols) = (3, 4, 2);
        let hf = Tensor::arange(0f32, (n_head * head_dim * cols) as f32, &Device::Cpu)
            .unwrap()
            .reshape((n_head * head_dim, cols))
            .unwrap();
        // llama.cpp: w.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2).reshape(out, in)
        let gguf = hf
            .reshape((n_head, 2, head_dim / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((n_head * head_dim, cols))
            .unwrap();
        assert_ne!(gguf.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let again = permute_rows_for_gguf(&hf, n_head, head_dim).unwrap();
        assert_eq!(
            again.to_vec2::<f32>().unwrap(),
            gguf.to_vec2::<f32>().unwrap()
        );
        let back = unpermute_rows(&gguf, n_head, head_dim).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        // Row 1 of head 0 in GGUF is the first row of the second half in HF.
        assert_eq!(
            gguf.get(1).unwrap().to_vec1::<f32>().unwrap(),
            vec![4.0, 5.0]
        );
    }

    #[test]
    fn names_map_to_hugging_face() {
        let llama = HfNorms::of(&crate::synthetic::preset("tiny").unwrap());
        let (name, _) = hf_name("blk.11.attn_k.bias", &llama).unwrap();
        assert_eq!(name, "model.layers.11.self_attn.k_proj.bias");
        let (name, _) = hf_name("blk.0.ffn_norm.weight", &llama).unwrap();
        assert_eq!(name, "model.layers.0.post_attention_layernorm.weight");
        assert!(hf_name("blk.0.post_ffw_norm.weight", &llama).is_none());
        assert!(hf_name("rope_freqs.weight", &llama).is_none());
        assert!(hf_name("blk.x.attn_q.weight", &llama).is_none());
        // Gemma's `post_attention_layernorm` is the norm of the attention output.
        let gemma = HfNorms::of(&crate::synthetic::preset("tiny-gemma3").unwrap());
        let name = |gguf| hf_name(gguf, &gemma).unwrap().0;
        assert_eq!(
            name("blk.2.ffn_norm.weight"),
            "model.layers.2.pre_feedforward_layernorm.weight"
        );
        assert_eq!(
            name("blk.2.post_attention_norm.weight"),
            "model.layers.2.post_attention_layernorm.weight"
        );
        assert_eq!(
            name("blk.2.post_ffw_norm.weight"),
            "model.layers.2.post_feedforward_layernorm.weight"
        );
    }

    #[test]
    fn dtype_parses() {
        assert_eq!("BF16".parse::<ExportDType>().unwrap(), ExportDType::BF16);
        assert!("q8".parse::<ExportDType>().is_err());
    }
}
