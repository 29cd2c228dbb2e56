//! What every `--model` argument goes through: `synthetic:NAME[@FORMAT]` is built in memory
//! (`minserve_model::synthetic`); anything else is a path or a catalog alias, resolved (and
//! fetched on first use) by `minserve_hub`, then read from disk.

use anyhow::Context;
use candle_core::quantized::GgmlDType;
use clap::Args;
use minserve_model::{DeviceChoice, LoadOptions, LoadedModel, ModelConfig, SyntheticSpec};
use minserve_tokenizer::Tokenizer;

/// How the weights are stored once loaded.
#[derive(Args, Clone, Debug)]
pub struct WeightsArgs {
    /// Re-quantize the attention and MLP matrices at load to this type (llama.cpp's names: q8_0,
    /// q4_0, q4_1, f16, f32, ...; K-quants need widths in multiples of 256). Default: the
    /// file's own types. The embedding and lm_head keep theirs.
    #[arg(long, value_parser = parse_weights_format)]
    pub weights_format: Option<GgmlDType>,
    /// Store a float lm_head (a Hugging Face folder's, quantized or not) as this type, e.g. q8_0
    /// as a GGUF keeps it: on a CPU the f16/f32 lm_head is the largest matmul of each decode
    /// step. Default: as the file stores it. An lm_head that is already quantized is an error.
    #[arg(long, value_parser = parse_weights_format)]
    pub lm_head_format: Option<GgmlDType>,
    /// Where the model runs: `auto` (the first GPU when built with `--features cuda`, else the
    /// CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// On a GPU: the type dense weights, activations and the KV cache are computed and kept in
    /// (`bf16`, `f16` or `f32`). GGUF's quantized weights run in f32 whatever this says.
    #[arg(long, default_value = "bf16", value_parser = parse_gpu_dtype)]
    pub dtype: candle_core::DType,
}

fn parse_gpu_dtype(name: &str) -> Result<candle_core::DType, String> {
    match name {
        "bf16" => Ok(candle_core::DType::BF16),
        "f16" => Ok(candle_core::DType::F16),
        "f32" => Ok(candle_core::DType::F32),
        _ => Err(format!("unknown dtype `{name}`: bf16, f16 or f32")),
    }
}

impl WeightsArgs {
    /// `--device` made concrete (an error for `cuda` in a build without GPU support).
    pub fn device(&self) -> anyhow::Result<DeviceChoice> {
        Ok(self.device.resolve()?)
    }
}

fn parse_weights_format(name: &str) -> Result<GgmlDType, String> {
    minserve_model::weights::parse_weight_format(name)
}

/// The weights and tokenizer of `model`.
pub fn load(model: &str, weights: &WeightsArgs) -> anyhow::Result<LoadedModel> {
    if let Some(spec) = SyntheticSpec::parse(model)? {
        anyhow::ensure!(
            weights.weights_format.is_none() && weights.lm_head_format.is_none(),
            "a synthetic model takes its format in its name (synthetic:NAME@FORMAT), not from --weights-format or --lm-head-format"
        );
        return spec
            .load_for(weights.device()?)
            .with_context(|| format!("building {}", spec.name()));
    }
    let path = minserve_hub::resolve(model, &minserve_hub::FetchOptions::default())?;
    let options = LoadOptions {
        weights_format: weights.weights_format,
        lm_head_format: weights.lm_head_format,
        device: weights.device()?,
    };
    minserve_model::load_model_with(&path, &options)
        .with_context(|| format!("loading {}", path.display()))
}

/// The tokenizer of `model` alone: no weights are read or built.
pub fn load_tokenizer(model: &str) -> anyhow::Result<Tokenizer> {
    without_weights(
        model,
        |spec| Ok(minserve_model::synthetic::tokenizer(&spec.config())?),
        |path| {
            minserve_model::load_tokenizer(path)
                .with_context(|| format!("loading the tokenizer of {}", path.display()))
        },
    )
}

/// The shape of `model` alone: no weights or tokenizer are read.
pub fn load_config(model: &str) -> anyhow::Result<ModelConfig> {
    without_weights(
        model,
        |spec| Ok(spec.config()),
        |path| {
            minserve_model::load_config(path)
                .with_context(|| format!("reading the config of {}", path.display()))
        },
    )
}

/// Reads something of `model` other than its weights: from its synthetic spec, or from its
/// file or folder (resolved, and fetched on first use).
fn without_weights<T>(
    model: &str,
    synthetic: impl FnOnce(&SyntheticSpec) -> anyhow::Result<T>,
    on_disk: impl FnOnce(&std::path::Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    if let Some(spec) = SyntheticSpec::parse(model)? {
        return synthetic(&spec);
    }
    on_disk(&minserve_hub::resolve(
        model,
        &minserve_hub::FetchOptions::default(),
    )?)
}
