//! What every `--model` argument goes through: `synthetic:NAME[@FORMAT]` is built in memory
//! (`minserve_model::synthetic`); anything else is a path or a catalog alias, resolved (and
//! fetched on first use) by `minserve_hub`, then read from disk.

use anyhow::Context;
use candle_core::quantized::GgmlDType;
use clap::Args;
use minserve_model::{LoadOptions, LoadedModel, SyntheticSpec};
use minserve_tokenizer::Tokenizer;

/// How the weights are stored once loaded.
#[derive(Args, Clone, Debug, Default)]
pub struct WeightsArgs {
    /// Re-quantize the attention and MLP matrices at load to this type (llama.cpp's names: q8_0,
    /// q4_0, q4_1, f16, f32, ...; K-quants need widths in multiples of 256). Default: the
    /// file's own types. The embedding and lm_head keep theirs.
    #[arg(long, value_parser = parse_weights_format)]
    pub weights_format: Option<GgmlDType>,
}

fn parse_weights_format(name: &str) -> Result<GgmlDType, String> {
    minserve_model::weights::parse_weight_format(name)
}

/// The weights and tokenizer of `model`.
pub fn load(model: &str, weights: &WeightsArgs) -> anyhow::Result<LoadedModel> {
    if let Some(spec) = SyntheticSpec::parse(model)? {
        anyhow::ensure!(
            weights.weights_format.is_none(),
            "a synthetic model takes its format in its name (synthetic:NAME@FORMAT), not from --weights-format"
        );
        return spec
            .load()
            .with_context(|| format!("building {}", spec.name()));
    }
    let path = minserve_hub::resolve(model, &minserve_hub::FetchOptions::default())?;
    let options = LoadOptions {
        weights_format: weights.weights_format,
    };
    minserve_model::load_model_with(&path, &options)
        .with_context(|| format!("loading {}", path.display()))
}

/// The tokenizer of `model` alone: no weights are read or built.
pub fn load_tokenizer(model: &str) -> anyhow::Result<Tokenizer> {
    if let Some(spec) = SyntheticSpec::parse(model)? {
        return Ok(minserve_model::synthetic::tokenizer(&spec.config())?);
    }
    let path = minserve_hub::resolve(model, &minserve_hub::FetchOptions::default())?;
    minserve_model::load_tokenizer(&path)
        .with_context(|| format!("loading the tokenizer of {}", path.display()))
}
