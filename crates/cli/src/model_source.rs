//! What every `--model` argument goes through: `synthetic:NAME[@FORMAT]` is built in memory
//! (`minserve_model::synthetic`); anything else is a path or a catalog alias, resolved (and
//! fetched on first use) by `minserve_hub`, then read from disk.

use anyhow::Context;
use minserve_model::{LoadedModel, SyntheticSpec};
use minserve_tokenizer::Tokenizer;

/// The weights and tokenizer of `model`.
pub fn load(model: &str) -> anyhow::Result<LoadedModel> {
    if let Some(spec) = SyntheticSpec::parse(model)? {
        return spec
            .load()
            .with_context(|| format!("building {}", spec.name()));
    }
    let path = minserve_hub::resolve(model, &minserve_hub::FetchOptions::default())?;
    minserve_model::load_model(&path).with_context(|| format!("loading {}", path.display()))
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
