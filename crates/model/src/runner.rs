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
    /// Where the weights will run: GGUF blocks are repacked for our CPU kernels only when it
    /// is the CPU; a GPU gets them as the file has them.
    pub device: DeviceChoice,
}

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

/// Loads a GGUF file, or a Hugging Face folder (config.json + safetensors + tokenizer.json).
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    load_model_with(path, &LoadOptions::default())
}

/// [`load_model`] with options.
pub fn load_model_with(path: &Path, options: &LoadOptions) -> Result<LoadedModel> {
    let repack_for_cpu = !options.device.is_gpu();
    if path.is_dir() {
        return crate::safetensors::load_folder(path, options.weights_format, repack_for_cpu);
    }
    let content = crate::gguf::read_content(path)?;
    // Cheap checks first, so a bad file fails before 100 MB of weights are read, and with the
    // most useful message: an unsupported architecture says more than any missing key.
    crate::config::ModelConfig::from_gguf(&content, path)?;
    let tokenizer = Tokenizer::from_gguf(&content).map_err(ModelError::tokenizer(path))?;
    let weights = crate::gguf::load(path, &content, options.weights_format, repack_for_cpu)?;
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

/// Where and how the model runs, beside the cache's shape ([`CacheOptions`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceOptions {
    /// Resolved ([`DeviceChoice::resolve`]) before it gets here.
    pub device: DeviceChoice,
    /// GPU: compute and KV type of dense weights (`--dtype`; quantized GGUF weights run in f32).
    pub dtype: candle_core::DType,
    /// GPU: size the KV pool from this fraction of the card's memory; `None` takes
    /// [`CacheOptions::memory_bytes`].
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

/// The executor for the device the model runs on.
// One per process: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Runner {
    Cpu(ModelRunner),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaRunner),
}

impl Runner {
    pub fn new(model: LlamaModel, cache: CacheOptions, device: DeviceOptions) -> Result<Self> {
        match device.device.resolve()? {
            DeviceChoice::Cuda(ordinal) => Self::cuda(model, cache, device, ordinal),
            _ => Ok(Self::Cpu(ModelRunner::new(model, cache))),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        model: LlamaModel,
        cache: CacheOptions,
        device: DeviceOptions,
        ordinal: usize,
    ) -> Result<Self> {
        use crate::cuda::{CudaRunner, GpuCacheSize, GpuOptions};
        let options = GpuOptions {
            ordinal,
            dtype: device.dtype,
            cache_size: match device.gpu_memory_utilization {
                Some(fraction) => GpuCacheSize::Utilization(fraction),
                None => GpuCacheSize::Bytes(cache.memory_bytes),
            },
            block_size: cache.block_size,
            max_step_tokens: device.max_step_tokens,
        };
        Ok(Self::Cuda(CudaRunner::new(model.weights, options)?))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda(_: LlamaModel, _: CacheOptions, _: DeviceOptions, _: usize) -> Result<Self> {
        unreachable!("DeviceChoice::resolve refuses a GPU without the cuda feature")
    }

    fn executor(&self) -> &dyn ModelExecutor<Error = ModelError> {
        match self {
            Self::Cpu(runner) => runner,
            #[cfg(feature = "cuda")]
            Self::Cuda(runner) => runner,
        }
    }
}

impl ModelExecutor for Runner {
    type Error = ModelError;

    fn cache_geometry(&self) -> CacheGeometry {
        self.executor().cache_geometry()
    }

    fn vocab_size(&self) -> usize {
        self.executor().vocab_size()
    }

    fn for_each_index(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.executor().for_each_index(n, f)
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits> {
        match self {
            Self::Cpu(runner) => runner.execute(batch),
            #[cfg(feature = "cuda")]
            Self::Cuda(runner) => runner.execute(batch),
        }
    }
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
