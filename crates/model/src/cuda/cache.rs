//! The paged KV pool in GPU memory: per layer one key and one value tensor of
//! `[slots, kv_heads * head_dim]`, slot = block * block_size + offset, the numbering the
//! scheduler's block tables and slot mapping use on every device.

use candle_core::cuda::cudarc::driver::result;
use candle_core::cuda::WrapErr;
use candle_core::{DType, Device, Tensor};
use minserve_core::{BlockCopy, CacheGeometry};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

pub struct CudaKvCache {
    pub keys: Vec<Tensor>,
    pub values: Vec<Tensor>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl CudaKvCache {
    /// Bytes one block takes across all layers, keys and values.
    pub fn bytes_per_block(config: &ModelConfig, dtype: DType, block_size: usize) -> usize {
        2 * config.num_layers
            * block_size
            * config.num_kv_heads
            * config.head_dim
            * dtype.size_in_bytes()
    }

    pub fn new(
        config: &ModelConfig,
        dtype: DType,
        block_size: usize,
        num_blocks: usize,
        device: &Device,
    ) -> Result<Self> {
        let shape = (
            num_blocks * block_size,
            config.num_kv_heads * config.head_dim,
        );
        let zeros = || Tensor::zeros(shape, dtype, device);
        Ok(Self {
            keys: (0..config.num_layers)
                .map(|_| zeros())
                .collect::<candle_core::Result<_>>()?,
            values: (0..config.num_layers)
                .map(|_| zeros())
                .collect::<candle_core::Result<_>>()?,
            block_size,
            num_blocks,
        })
    }

    pub fn geometry(&self) -> CacheGeometry {
        CacheGeometry {
            block_size: self.block_size,
            num_blocks: self.num_blocks,
        }
    }

    /// Copy-on-write copies, in order, on the model's stream (so before this step's writes).
    pub fn copy_blocks(&mut self, copies: &[BlockCopy]) -> Result<()> {
        if let Some((src, dst)) = copies
            .iter()
            .find(|&&(src, dst)| src as usize >= self.num_blocks || dst as usize >= self.num_blocks)
        {
            return Err(ModelError::InvalidBatch(format!(
                "block copy {src} -> {dst} is outside the pool of {} blocks",
                self.num_blocks
            )));
        }
        let Some(first) = self.keys.first() else {
            return Ok(());
        };
        let stream = super::kernels::cuda_device(first.device())?.cuda_stream();
        let block_bytes = self.block_size * first.dim(1)? * first.dtype().size_in_bytes();
        for &(src, dst) in copies {
            for pool in self.keys.iter().chain(&self.values) {
                let base = super::kernels::address(pool, 0)?;
                // SAFETY: both blocks lie inside `pool` (checked above) and do not overlap.
                unsafe {
                    result::memcpy_dtod_async(
                        base + (dst as usize * block_bytes) as u64,
                        base + (src as usize * block_bytes) as u64,
                        block_bytes,
                        stream.cu_stream(),
                    )
                }
                .w()?;
            }
        }
        Ok(())
    }
}
