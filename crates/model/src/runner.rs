//! A loaded model with its paged KV cache: what the engine drives through [`ModelExecutor`].

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;

use minserve_core::{CacheGeometry, Logits, ModelExecutor, StepBatch};
use minserve_tokenizer::Tokenizer;

use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, KvDtype};
use crate::llama::LlamaModel;

/// How to size the KV cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheOptions {
    pub block_size: usize,
    pub memory_bytes: usize,
    pub dtype: KvDtype,
}

impl Default for CacheOptions {
    /// 1 GiB of f16: 46k tokens of the default model, room for 64 sequences of 700 tokens. The
    /// pages are only touched as blocks fill.
    fn default() -> Self {
        Self {
            block_size: 16,
            memory_bytes: 1 << 30,
            dtype: KvDtype::F16,
        }
    }
}

/// A model file turned into weights and the tokenizer that goes with it.
pub struct LoadedModel {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
}

/// How to turn a model file into weights.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Store every projection matrix (attention and MLP) as this type, re-quantizing from the
    /// file's own (`--weights-format`). `None` keeps the file's types. The embedding and the
    /// lm_head keep theirs either way, as llama.cpp's quantizer does by default: they are the
    /// most sensitive matrices.
    pub weights_format: Option<GgmlDType>,
}

/// Loads a GGUF file, or a Hugging Face folder (config.json + safetensors + tokenizer.json).
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    load_model_with(path, &LoadOptions::default())
}

/// [`load_model`] with options.
pub fn load_model_with(path: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    if path.is_dir() {
        return crate::safetensors::load_folder(path, options.weights_format);
    }
    let content = crate::gguf::read_content(path)?;
    // Cheap checks first, so a bad file fails before 100 MB of weights are read, and with the
    // most useful message: an unsupported architecture says more than any missing key.
    crate::config::ModelConfig::from_gguf(&content, path)?;
    let tokenizer = Tokenizer::from_gguf(&content).map_err(ModelError::tokenizer(path))?;
    let weights = crate::gguf::load(path, &content, options.weights_format)?;
    Ok(LoadedModel {
        model: LlamaModel::new(weights),
        tokenizer,
        path: path.to_path_buf(),
    })
}

/// The tokenizer of a GGUF file or Hugging Face folder, without reading any weights.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        return Tokenizer::from_hf_folder(path).map_err(ModelError::tokenizer(path));
    }
    let content = crate::gguf::read_content(path)?;
    Tokenizer::from_gguf(&content).map_err(ModelError::tokenizer(path))
}

pub struct ModelRunner {
    pub model: LlamaModel,
    pub cache: KvCache,
}

impl ModelRunner {
    pub fn new(model: LlamaModel, options: CacheOptions) -> Self {
        let cache = KvCache::with_memory(
            model.config(),
            options.dtype,
            options.block_size,
            options.memory_bytes,
        );
        Self { model, cache }
    }
}

impl ModelExecutor for ModelRunner {
    type Error = ModelError;

    fn cache_geometry(&self) -> CacheGeometry {
        self.cache.geometry()
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn for_each_index(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        crate::pool::pool().execute_chunked(n, |range| range.for_each(f));
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits> {
        // Copy-on-write copies read blocks that this step's K/V writes may overwrite (a block
        // freed after being copied from can be reused at once), so they come first.
        self.cache.copy_blocks(&batch.block_copies)?;
        Ok(Logits {
            vocab_size: self.vocab_size(),
            data: self.model.forward(batch, &mut self.cache)?,
        })
    }
}
