//! A loaded model with its paged KV cache: what the engine drives through [`ModelExecutor`].
//!
//! [`ModelRunner`] is the CPU executor (the forward pass of [`crate::llama`] on a
//! [`KvCache`]); [`Runner`] is the one the binary builds, whichever device
//! ([`crate::device`]) the model runs on. Both apply a step's copy-on-write block copies before
//! the step writes any K/V.

use minserve_core::{CacheGeometry, Logits, ModelExecutor, StepBatch};

use crate::device::{DeviceChoice, DeviceOptions};
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
            // The GPU cache holds the model's own dtype; only the CPU cache has scaled formats.
            DeviceChoice::Cuda(_) if matches!(cache.dtype, KvDtype::Fp8 | KvDtype::Q8) => {
                let name = match cache.dtype {
                    KvDtype::Fp8 => "fp8",
                    _ => "q8",
                };
                Err(ModelError::Device(format!(
                    "--kv-cache-dtype {name} runs on the CPU only; on a GPU the KV cache holds \
                     the model's dtype (use --device cpu, or drop --kv-cache-dtype)"
                )))
            }
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

    /// Gives the runner a host swap pool of `memory_bytes` for swap preemption (0: none).
    pub fn set_swap_space(&mut self, memory_bytes: usize) -> Result<()> {
        match self {
            Self::Cpu(runner) => {
                runner.set_swap_space(memory_bytes);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Self::Cuda(_) if memory_bytes == 0 => Ok(()),
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => Err(ModelError::Device(
                "swap preemption is not implemented on the GPU runner yet; use \
                 --preemption-mode recompute"
                    .into(),
            )),
        }
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

    fn kv_group_windows(&self) -> Vec<Option<usize>> {
        self.executor().kv_group_windows()
    }

    fn vocab_size(&self) -> usize {
        self.executor().vocab_size()
    }

    fn swap_capacity_blocks(&self) -> usize {
        self.executor().swap_capacity_blocks()
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
    /// Swap preemption's host pool: separate memory the K/V of preempted sequences is copied
    /// to and back (see `minserve_core::swap`); `None` without swap preemption.
    pub host: Option<KvCache>,
}

impl ModelRunner {
    pub fn new(model: LlamaModel, options: CacheOptions) -> Self {
        let cache = KvCache::with_memory(
            model.config(),
            options.dtype,
            options.block_size,
            options.memory_bytes,
        );
        Self {
            model,
            cache,
            host: None,
        }
    }

    /// A host pool of `memory_bytes` for swap preemption (0: none).
    pub fn set_swap_space(&mut self, memory_bytes: usize) {
        self.host = (memory_bytes > 0).then(|| self.cache.host_pool(memory_bytes));
    }
}

impl ModelExecutor for ModelRunner {
    type Error = ModelError;

    fn cache_geometry(&self) -> CacheGeometry {
        self.cache.geometry()
    }

    fn kv_group_windows(&self) -> Vec<Option<usize>> {
        self.cache.groups.windows.clone()
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn swap_capacity_blocks(&self) -> usize {
        self.host.as_ref().map_or(0, |host| host.layout.num_blocks)
    }

    fn for_each_index(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        crate::pool::pool().execute_chunked(n, |range| range.for_each(f));
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits> {
        // Swaps out read blocks as the last step left them, so they come before anything
        // writes; swaps in fill fresh blocks the forward pass reads (see `minserve_core::swap`).
        // Copy-on-write copies read blocks that this step's K/V writes may overwrite (a block
        // freed after being copied from can be reused at once), so they come before those.
        let swaps = !batch.swap_out.is_empty() || !batch.swap_in.is_empty();
        match &mut self.host {
            Some(host) => KvCache::swap_blocks(&self.cache, host, &batch.swap_out)?,
            None if swaps => {
                return Err(ModelError::InvalidBatch(
                    "a step swaps blocks but the runner has no swap space".into(),
                ))
            }
            None => {}
        }
        self.cache.copy_blocks(&batch.block_copies)?;
        if let Some(host) = &self.host {
            KvCache::swap_blocks(host, &mut self.cache, &batch.swap_in)?;
        }
        Ok(Logits {
            vocab_size: self.vocab_size(),
            data: self.model.forward(batch, &mut self.cache)?,
        })
    }
}
