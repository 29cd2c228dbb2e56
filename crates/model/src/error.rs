use std::path::{Path, PathBuf};

/// Everything that can go wrong loading or running a model. Each variant names the file it is
/// about, so that a user who passed the wrong `--model` learns which file and why.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "{path}: architecture `{architecture}` is not supported (read from `{key}`; supported: {supported})"
    )]
    UnsupportedArchitecture {
        path: PathBuf,
        /// The metadata key it came from: `general.architecture` or `model_type`.
        key: &'static str,
        architecture: String,
        supported: String,
    },
    /// A setting the model code does not implement (a RoPE scaling type, ...): never ignored,
    /// since it would change every result.
    #[error("{path}: `{key}` = `{value}` is not supported (supported: {supported})")]
    Unsupported {
        path: PathBuf,
        key: String,
        value: String,
        supported: String,
    },
    #[error("{path}: tensor `{name}`: {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("{path}: tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        source: minserve_tokenizer::TokenizerError,
    },
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The device cannot run this model or configuration (no GPU, no memory left, a head size
    /// the GPU kernels are not built for).
    #[error("{0}")]
    Device(String),
    /// A quantizer observing the forward pass ([`crate::observer`]) could not go on.
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// For `map_err`: a tokenizer failure, tagged with the model file or folder it came from.
    pub fn tokenizer(path: &Path) -> impl FnOnce(minserve_tokenizer::TokenizerError) -> Self + '_ {
        move |source| Self::Tokenizer {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
