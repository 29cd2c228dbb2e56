//! Hugging Face folders whose projection matrices are stored quantized, as config.json's
//! `quantization_config` says: parsing that config, and loading each projection into a
//! [`LinearWeight`] that runs on our kernels. Embeddings, norms and the lm_head stay float and
//! load as before (`crate::safetensors`).
//!
//! Supported: compressed-tensors `float-quantized` (FP8 E4M3 weights, [`fp8`]). Any other
//! method or format is a load error naming the field and its value.

use std::path::{Path, PathBuf};

use ::safetensors::Dtype;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::weights::LinearWeight;

pub(crate) mod fp8;

/// One tensor of a checkpoint, as stored.
pub(crate) struct RawTensor<'a> {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: &'a [u8],
}

/// Where a scheme reads tensors from: the folder's safetensors files.
pub(crate) trait TensorSource {
    /// The tensor `name`, or an error naming it (missing, unreadable).
    fn raw(&self, name: &str) -> Result<RawTensor<'_>>;
    /// Whether the checkpoint holds `name`.
    fn contains(&self, name: &str) -> bool;
    /// An error about tensor `name`, naming the file that holds it (or should).
    fn tensor_error(&self, name: &str, message: String) -> ModelError;
    /// The checks of an unquantized tensor: present, float, `shape`.
    fn check_float(&self, name: &str, shape: &[usize]) -> Result<()>;
    /// An unquantized tensor as f32.
    fn load_f32(&self, name: &str) -> Result<candle_core::Tensor>;
}

/// How a checkpoint's projection matrices are stored.
pub(crate) enum QuantizedCheckpoint {
    Fp8(fp8::Fp8Scheme),
}

/// The layer tensors a scheme may store quantized: the seven projections of each layer.
const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl QuantizedCheckpoint {
    /// The scheme named by `config_path`'s `quantization_config`; `None` without one.
    pub(crate) fn from_config(config_path: &Path) -> Result<Option<Self>> {
        let text =
            std::fs::read_to_string(config_path).map_err(|e| ModelError::io(config_path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: config_path.to_path_buf(),
            message: format!("not valid JSON: {e}"),
        })?;
        let Some(config) = json.get("quantization_config") else {
            return Ok(None);
        };
        let field = |name: &str| config.get(name).and_then(Value::as_str);
        let method = field("quant_method").unwrap_or("<missing>");
        let format = field("format").unwrap_or("<missing>");
        let fields = ConfigFields {
            path: config_path.to_path_buf(),
        };
        match (method, format) {
            ("compressed-tensors", "float-quantized") => Ok(Some(Self::Fp8(
                fp8::Fp8Scheme::from_config(config, &fields)?,
            ))),
            ("compressed-tensors", _) => Err(fields.unsupported("format", format)),
            _ => Err(fields.unsupported("quant_method", method)),
        }
    }

    /// Whether `name` (a tensor of the model's plan) is one this scheme loads.
    pub(crate) fn handles(&self, name: &str) -> bool {
        projection_of(name).is_some()
    }

    /// The header checks of projection `name` (`P.weight`) with the `[out, in]` `shape` that
    /// config.json implies, before any data is read.
    pub(crate) fn check(
        &self,
        source: &dyn TensorSource,
        name: &str,
        shape: &[usize],
    ) -> Result<()> {
        match self {
            Self::Fp8(scheme) => scheme.check(source, name, shape),
        }
    }

    /// Projection `name` (`P.weight`), for the CPU kernels (`repack_for_cpu`) or dequantized to
    /// f32 (the GPU path).
    pub(crate) fn load_linear(
        &self,
        source: &dyn TensorSource,
        name: &str,
        repack_for_cpu: bool,
    ) -> Result<LinearWeight> {
        match self {
            Self::Fp8(scheme) => scheme.load_linear(source, name, repack_for_cpu),
        }
    }

    /// Whether the scheme reads the checkpoint tensor `name` besides the model's plan (scales).
    pub(crate) fn reads(&self, name: &str) -> bool {
        match self {
            Self::Fp8(_) => fp8::Fp8Scheme::reads(name),
        }
    }
}

/// `P` of `P.weight` when that is one of a layer's projections.
fn projection_of(name: &str) -> Option<&str> {
    let prefix = name.strip_suffix(".weight")?;
    let last = prefix.rsplit('.').next()?;
    PROJECTIONS.contains(&last).then_some(prefix)
}

/// Errors about `quantization_config`'s fields, naming the file, the field and its value.
pub(crate) struct ConfigFields {
    path: PathBuf,
}

impl ConfigFields {
    pub(crate) fn unsupported(&self, field: &str, value: impl std::fmt::Display) -> ModelError {
        ModelError::Format {
            path: self.path.clone(),
            message: format!("quantization_config.{field} = {value} is not supported"),
        }
    }

    pub(crate) fn invalid(&self, field: &str, message: impl std::fmt::Display) -> ModelError {
        ModelError::Format {
            path: self.path.clone(),
            message: format!("quantization_config.{field}: {message}"),
        }
    }
}
