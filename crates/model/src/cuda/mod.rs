//! The GPU path (feature `cuda`): the same model, scheduler and sampler as on the CPU, with the
//! forward pass and the paged KV pool on a CUDA device.
//!
//! What the engine sees does not change: a step's batch goes in (token ids, positions, slot
//! mapping, block tables), logits of the sampled rows come out and are sampled on the CPU by
//! the same seeded sampler. See docs/gpu.md.

mod cache;
mod kernels;
mod model;

use candle_core::cuda::cudarc::driver::{result, sys};
use candle_core::cuda::WrapErr;
use candle_core::{DType, Device};
use minserve_core::{CacheGeometry, Logits, ModelExecutor, SequenceChunk, StepBatch};

pub use cache::CudaKvCache;
pub use model::CudaModel;

use crate::error::{ModelError, Result};
use crate::weights::LlamaWeights;

/// How much GPU memory the KV pool gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GpuCacheSize {
    /// vLLM's `--gpu-memory-utilization`: this fraction of the card's memory for everything
    /// (weights, activations at their peak, the pool); the pool gets what the rest leaves.
    Utilization(f64),
    Bytes(usize),
}

#[derive(Debug, Clone, Copy)]
pub struct GpuOptions {
    pub ordinal: usize,
    /// Activations and KV cache for dense weights (GGUF's quantized weights always run in f32).
    pub dtype: DType,
    pub cache_size: GpuCacheSize,
    pub block_size: usize,
    /// The largest step the engine will run (`--max-num-batched-tokens`): the warm-up step
    /// that measures peak activation memory is this big.
    pub max_step_tokens: usize,
}

pub struct CudaRunner {
    pub model: CudaModel,
    pub cache: CudaKvCache,
}

/// Opens GPU `ordinal`, with the stream-ordered allocator keeping what it frees (like
/// PyTorch's caching allocator): steps then reuse memory instead of asking the driver, and the
/// memory in use after a warm-up step is that step's peak.
pub fn open_device(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    let stream = kernels::cuda_device(&device)?.cuda_stream();
    let context = stream.context();
    context.bind_to_thread().w()?;
    if context.has_async_alloc() {
        let mut keep_everything = u64::MAX;
        // SAFETY: the pool of a device we just opened; the attribute takes a u64.
        unsafe {
            let mut pool = std::ptr::null_mut();
            sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
                .result()
                .w()?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep_everything as *mut u64).cast(),
            )
            .w()?;
        }
    }
    Ok(device)
}

/// `(free, total)` bytes of the GPU behind `device`, after everything queued has run.
fn memory_info(device: &Device) -> Result<(usize, usize)> {
    let stream = kernels::cuda_device(device)?.cuda_stream();
    stream.synchronize().w()?;
    stream.context().bind_to_thread().w()?;
    Ok(result::mem_get_info().w()?)
}

impl CudaRunner {
    /// Moves `weights` to the GPU, runs one warm-up step of `max_step_tokens` tokens on a
    /// scratch cache, then gives the pool what `cache_size` allows.
    pub fn new(weights: LlamaWeights, options: GpuOptions) -> Result<Self> {
        let device = open_device(options.ordinal)?;
        let model = CudaModel::new(weights, options.dtype, &device)?;
        let c = &model.config;
        let block_size = options.block_size;
        let per_block = CudaKvCache::bytes_per_block(c, model.dtype, block_size);
        let warmup_tokens = options.max_step_tokens.min(model.max_positions()).max(1);
        let scratch_blocks = warmup_tokens.div_ceil(block_size);
        let mut scratch = CudaKvCache::new(c, model.dtype, block_size, scratch_blocks, &device)?;
        model.forward(&warmup_batch(warmup_tokens, block_size), &mut scratch)?;
        drop(scratch);
        let (free, total) = memory_info(&device)?;
        let pool_bytes = match options.cache_size {
            GpuCacheSize::Bytes(bytes) => bytes,
            GpuCacheSize::Utilization(fraction) => {
                // Memory in use now counts the weights, cuBLAS's workspace and the warm-up's
                // peak activations (kept by the allocator); the scratch cache went back to the
                // allocator too, which the pool reuses.
                let in_use = total - free;
                let budget = (total as f64 * fraction) as usize;
                budget.saturating_sub(in_use) + scratch_blocks * per_block
            }
        };
        let num_blocks = pool_bytes / per_block;
        if num_blocks == 0 {
            return Err(ModelError::Device(format!(
                "no GPU memory left for the KV cache ({} MiB free of {} MiB after loading)",
                free >> 20,
                total >> 20
            )));
        }
        tracing::info!(
            num_blocks,
            pool_mib = (num_blocks * per_block) >> 20,
            free_mib = free >> 20,
            total_mib = total >> 20,
            dtype = ?model.dtype,
            "GPU KV cache"
        );
        let cache = CudaKvCache::new(c, model.dtype, block_size, num_blocks, &device)?;
        Ok(Self { model, cache })
    }
}

/// One sequence of `tokens` new tokens from position 0, sampled: the largest step shape.
fn warmup_batch(tokens: usize, block_size: usize) -> StepBatch {
    let blocks = tokens.div_ceil(block_size);
    StepBatch {
        token_ids: vec![0; tokens],
        positions: (0..tokens as u32).collect(),
        slot_mapping: (0..tokens as u32).collect(),
        sequences: vec![SequenceChunk {
            num_new_tokens: tokens,
            context_len: tokens,
            block_table: (0..blocks as u32).collect(),
            group_block_tables: Vec::new(),
            sample: true,
            logits_for_every_token: false,
        }],
        block_copies: Vec::new(),
        swap_out: Vec::new(),
        swap_in: Vec::new(),
        group_slot_mappings: Vec::new(),
    }
}

impl ModelExecutor for CudaRunner {
    type Error = ModelError;

    fn cache_geometry(&self) -> CacheGeometry {
        self.cache.geometry()
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn for_each_index(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        crate::pool::pool().execute_chunked(n, |range| range.for_each(f));
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits> {
        crate::llama::validate_batch(
            batch,
            self.model.config.vocab_size,
            self.model.max_positions(),
            self.cache.geometry(),
            &[None],
        )?;
        // The GPU runner offers no swap pool (`swap_capacity_blocks` is 0), so the scheduler
        // never swaps; a batch that does anyway is refused rather than run without its K/V.
        if !batch.swap_out.is_empty() || !batch.swap_in.is_empty() {
            return Err(ModelError::InvalidBatch(
                "swap preemption is not supported by the GPU runner".into(),
            ));
        }
        self.cache.copy_blocks(&batch.block_copies)?;
        Ok(Logits {
            vocab_size: self.model.config.vocab_size,
            data: self.model.forward(batch, &mut self.cache)?,
        })
    }
}
