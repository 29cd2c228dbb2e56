//! The paged KV cache: one pre-allocated pool of blocks per layer.
//!
//! A block holds the keys and values of `block_size` consecutive tokens of one sequence. Which
//! blocks a sequence owns is the engine's business (its block table); the cache only knows slots.
//! No per-sequence contiguous K/V exists anywhere: attention reads the blocks in place.
//!
//! Layout of each layer's pool: `[num_blocks, num_kv_heads, block_size, head_dim]`. Keeping a
//! head's `block_size` keys contiguous lets attention stream one block of one head as a single
//! `block_size * head_dim` run of memory.

use minserve_core::CacheGeometry;

use crate::config::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Offset of the first value of (`slot`, `kv_head`) in a layer's pool.
    #[inline]
    pub fn offset(&self, slot: usize, kv_head: usize) -> usize {
        let (block, in_block) = (slot / self.block_size, slot % self.block_size);
        self.block_offset(block, kv_head) + in_block * self.head_dim
    }

    /// Offset of the first key of `kv_head` in `block`: `block_size * head_dim` values follow.
    #[inline]
    pub fn block_offset(&self, block: usize, kv_head: usize) -> usize {
        ((block * self.num_kv_heads + kv_head) * self.block_size) * self.head_dim
    }

    pub fn values_per_layer(&self) -> usize {
        self.num_blocks * self.num_kv_heads * self.block_size * self.head_dim
    }
}

/// Keys and values of one layer.
pub struct LayerKv {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

pub struct KvCache {
    pub layout: KvLayout,
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    /// A pool of `num_blocks` blocks for every layer of `config`.
    pub fn new(config: &ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        let layout = KvLayout {
            num_blocks,
            block_size,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        };
        let layers = (0..config.num_layers)
            .map(|_| LayerKv {
                keys: vec![0.0; layout.values_per_layer()],
                values: vec![0.0; layout.values_per_layer()],
            })
            .collect();
        Self { layout, layers }
    }

    /// As many blocks as fit in `memory_bytes` (at least one).
    pub fn with_memory(config: &ModelConfig, block_size: usize, memory_bytes: usize) -> Self {
        let bytes_per_block = config.kv_bytes_per_token(std::mem::size_of::<f32>()) * block_size;
        Self::new(config, block_size, (memory_bytes / bytes_per_block).max(1))
    }

    pub fn geometry(&self) -> CacheGeometry {
        CacheGeometry {
            block_size: self.layout.block_size,
            num_blocks: self.layout.num_blocks,
        }
    }
}

impl LayerKv {
    /// Stores each new token's K/V rows (`[tokens, kv_heads, head_dim]`) at its slot — vLLM's
    /// `reshape_and_cache`.
    pub fn write(&mut self, layout: &KvLayout, keys: &[f32], values: &[f32], slots: &[u32]) {
        let row = layout.num_kv_heads * layout.head_dim;
        for (token, &slot) in slots.iter().enumerate() {
            for head in 0..layout.num_kv_heads {
                let src = token * row + head * layout.head_dim;
                let dst = layout.offset(slot as usize, head);
                self.keys[dst..dst + layout.head_dim]
                    .copy_from_slice(&keys[src..src + layout.head_dim]);
                self.values[dst..dst + layout.head_dim]
                    .copy_from_slice(&values[src..src + layout.head_dim]);
            }
        }
    }
}
