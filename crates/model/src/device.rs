//! Where the model runs: the `--device` choice, its `auto` resolution, and the settings that only
//! mean something on a GPU ([`DeviceOptions`]).
//!
//! Policy: `auto` takes the first GPU when the build has the `cuda` feature and the driver
//! reports one, else the CPU; asking for a GPU of a build without the feature is an error, never a
//! silent fall-back to the CPU. Loading ([`crate::load`]) and the runner ([`crate::runner`]) both
//! take a choice that has been resolved.

use crate::error::{ModelError, Result};

/// Where the model runs (`--device`: `auto`, `cpu`, `cuda`, `cuda:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU when built with the `cuda` feature, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: auto, cpu, cuda or cuda:N")),
        }
    }
}

impl DeviceChoice {
    /// Whether weights loaded for this device run on a GPU (so stay in their file's layout
    /// rather than being repacked for the CPU kernels). `Auto` must be resolved first.
    pub fn is_gpu(self) -> bool {
        matches!(self, Self::Cuda(_))
    }

    /// `Auto` made concrete: the first GPU when the build has the `cuda` feature and the
    /// driver reports one, else the CPU. A GPU asked of a build without the feature is an error.
    pub fn resolve(self) -> Result<Self> {
        match self {
            Self::Auto if gpu_present() => Ok(Self::Cuda(0)),
            Self::Auto => Ok(Self::Cpu),
            Self::Cuda(_) if !cfg!(feature = "cuda") => Err(ModelError::Device(
                "this minserve was built without GPU support: build it with \
                 `cargo build --release --features cuda`"
                    .into(),
            )),
            other => Ok(other),
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu_present() -> bool {
    use candle_core::cuda::cudarc::driver::CudaContext;
    // A driver without a device (or a container without the GPU passed through) fails
    // initialisation: that too means "run on the CPU".
    CudaContext::device_count().is_ok_and(|n| n > 0)
}

#[cfg(not(feature = "cuda"))]
fn gpu_present() -> bool {
    false
}

/// Where and how the model runs, beside the cache's shape ([`crate::CacheOptions`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// Resolved ([`DeviceChoice::resolve`]) before it gets here.
    pub device: DeviceChoice,
    /// GPU: compute and KV type of dense weights (`--dtype`; quantized GGUF weights run in f32).
    pub dtype: candle_core::DType,
    /// GPU: size the KV pool from this fraction of the card's memory; `None` takes
    /// [`crate::CacheOptions::memory_bytes`].
    pub gpu_memory_utilization: Option<f64>,
    /// The largest step (`--max-num-batched-tokens`), for the GPU's warm-up step.
    pub max_step_tokens: usize,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            dtype: candle_core::DType::BF16,
            gpu_memory_utilization: None,
            max_step_tokens: 512,
        }
    }
}
