//! Turning a model on disk into weights and the tokenizer that goes with it: a GGUF file
//! ([`crate::gguf`]) or a Hugging Face folder ([`crate::safetensors`]). Synthetic models are built
//! in memory instead ([`crate::synthetic`]) and end in the same [`LoadedModel`].
//!
//! Policy: the cheap checks (architecture, shapes, names) run before any tensor data is read, so a
//! wrong file fails in milliseconds with the most useful message; how the weights are stored
//! depends on the device they will run on ([`LoadOptions::device`]).

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use minserve_tokenizer::Tokenizer;

use crate::config::ModelConfig;
use crate::device::DeviceChoice;
use crate::error::{ModelError, Result};
use crate::llama::LlamaModel;

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
    /// Store a float lm_head as this type (`--lm-head-format`; see
    /// [`crate::weights::LlamaWeights::store_lm_head_as`]). `None` keeps the file's.
    pub lm_head_format: Option<GgmlDType>,
    /// Where the weights will run: GGUF blocks are repacked for our CPU kernels only when it
    /// is the CPU; a GPU gets them as the file has them.
    pub device: DeviceChoice,
}

/// Loads a GGUF file, or a Hugging Face folder (config.json + safetensors + tokenizer.json).
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    load_model_with(path, &LoadOptions::default())
}

/// [`load_model`] with options.
pub fn load_model_with(path: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let repack_for_cpu = !options.device.is_gpu();
    let (mut weights, tokenizer) = if path.is_dir() {
        crate::safetensors::load_folder(path, options.weights_format, repack_for_cpu)?
    } else {
        let content = crate::gguf::read_content(path)?;
        // Cheap checks first, so a bad file fails before 100 MB of weights are read, and with
        // the most useful message: an unsupported architecture says more than any missing key.
        ModelConfig::from_gguf(&content, path)?;
        let tokenizer = Tokenizer::from_gguf(&content).map_err(ModelError::tokenizer(path))?;
        let weights = crate::gguf::load(path, &content, options.weights_format, repack_for_cpu)?;
        (weights, tokenizer)
    };
    if let Some(format) = options.lm_head_format {
        weights
            .store_lm_head_as(format, repack_for_cpu)
            .map_err(|message| ModelError::Format {
                path: path.to_path_buf(),
                message,
            })?;
    }
    Ok(LoadedModel {
        model: LlamaModel::new(weights),
        tokenizer,
        path: path.to_path_buf(),
    })
}

/// The shape of the model in a GGUF file or Hugging Face folder, without reading any weights.
pub fn load_config(path: &Path) -> Result<ModelConfig> {
    if path.is_dir() {
        return ModelConfig::from_hf_config(&path.join("config.json"));
    }
    ModelConfig::from_gguf(&crate::gguf::read_content(path)?, path)
}

/// The tokenizer of a GGUF file or Hugging Face folder, without reading any weights.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        return Tokenizer::from_hf_folder(path).map_err(ModelError::tokenizer(path));
    }
    let content = crate::gguf::read_content(path)?;
    Tokenizer::from_gguf(&content).map_err(ModelError::tokenizer(path))
}
