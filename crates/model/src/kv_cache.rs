//! The paged KV cache: one pre-allocated pool of blocks per layer.
//!
//! A block holds the keys and values of `block_size` consecutive tokens of one sequence. Which
//! blocks a sequence owns is the engine's business (its block table); the cache only knows slots.
//! No per-sequence contiguous K/V exists anywhere: attention reads the blocks in place.
//!
//! Layout of each layer's pool: `[num_blocks, num_kv_heads, block_size, head_dim]`. Keeping a
//! head's `block_size` keys contiguous lets attention stream one block of one head as a single
//! `block_size * head_dim` run of memory.
//!
//! Copy-on-write: when a sequence is about to write into a block that other sequences (the other
//! samples of its request) still read, the engine gives it a fresh block and asks for the old
//! one's contents to be copied first ([`KvCache::copy_blocks`]). With this layout a block is one
//! contiguous run per layer for keys and one for values.
//!
//! Values are stored in f16 by default (like llama.cpp's and vLLM's default cache types): decode
//! attention is bound by the bytes it streams from the pool, so halving them halves its cost and
//! doubles the tokens a given memory holds. f32 storage stays available for exact comparisons.

use half::f16;
use minserve_core::block_manager::BlockCopy;
use minserve_core::CacheGeometry;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Both pools are `[num_blocks, kv_heads, ...]`, so one (block, KV head) is one contiguous run
/// of `block_size * head_dim` values. Inside a run, values are token-major (`[block_size,
/// head_dim]`: a token's value row is what the weighted sum adds), while keys are
/// dimension-major (`[head_dim, block_size]`): the scores of a block's 16 tokens then come out
/// of 16-lane multiply-adds directly, one token per lane, with no horizontal sums.
impl KvLayout {
    /// Offset of the value row of (`slot`, `kv_head`) in a layer's value pool: `head_dim`
    /// values follow.
    #[inline]
    pub fn value_offset(&self, slot: usize, kv_head: usize) -> usize {
        let (block, in_block) = (slot / self.block_size, slot % self.block_size);
        self.block_offset(block, kv_head) + in_block * self.head_dim
    }

    /// Offset of dimension 0 of the key of (`slot`, `kv_head`) in a layer's key pool;
    /// dimension `d` is `d * block_size` further.
    #[inline]
    pub fn key_offset(&self, slot: usize, kv_head: usize) -> usize {
        let (block, in_block) = (slot / self.block_size, slot % self.block_size);
        self.block_offset(block, kv_head) + in_block
    }

    /// Offset of the run of (`block`, `kv_head`) in either pool: `block_size * head_dim` values.
    #[inline]
    pub fn block_offset(&self, block: usize, kv_head: usize) -> usize {
        ((block * self.num_kv_heads + kv_head) * self.block_size) * self.head_dim
    }

    pub fn values_per_layer(&self) -> usize {
        self.num_blocks * self.num_kv_heads * self.block_size * self.head_dim
    }
}

/// The number format of the cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F16,
    F32,
}

impl KvDtype {
    pub fn size_in_bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            _ => Err(format!("unknown KV cache type {s:?}: expected f16 or f32")),
        }
    }
}

/// A number format the pool can hold. Attention works in f32, so a run of cached values is
/// widened into scratch space first (a no-op borrow for f32).
pub trait KvElement: Copy + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    fn widen<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32];
}

impl KvElement for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn widen<'a>(src: &'a [f32], _scratch: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElement for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn widen<'a>(src: &'a [f16], scratch: &'a mut [f32]) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        let dst = &mut scratch[..src.len()];
        // F16C (vcvtph2ps), detected at run time by `half`.
        src.convert_to_f32_slice(dst);
        dst
    }
}

/// Keys and values of one layer, in one element type.
pub struct KvPool<T> {
    pub keys: Vec<T>,
    pub values: Vec<T>,
}

impl<T: KvElement> KvPool<T> {
    /// Stores each new token's K/V rows (`[tokens, kv_heads, head_dim]`) at its slot — vLLM's
    /// `reshape_and_cache`.
    fn write(&mut self, layout: &KvLayout, keys: &[f32], values: &[f32], slots: &[u32]) {
        let row = layout.num_kv_heads * layout.head_dim;
        for (token, &slot) in slots.iter().enumerate() {
            for head in 0..layout.num_kv_heads {
                let src = token * row + head * layout.head_dim;
                let key = layout.key_offset(slot as usize, head);
                for (d, s) in keys[src..src + layout.head_dim].iter().enumerate() {
                    self.keys[key + d * layout.block_size] = T::from_f32(*s);
                }
                let dst = layout.value_offset(slot as usize, head);
                for (d, s) in self.values[dst..dst + layout.head_dim]
                    .iter_mut()
                    .zip(&values[src..src + layout.head_dim])
                {
                    *d = T::from_f32(*s);
                }
            }
        }
    }
}

impl<T: Copy> KvPool<T> {
    /// Copies every key and value of block `src` onto block `dst`.
    fn copy_block(&mut self, layout: &KvLayout, src: usize, dst: usize) {
        let len = layout.block_offset(1, 0);
        let (src, dst) = (layout.block_offset(src, 0), layout.block_offset(dst, 0));
        self.keys.copy_within(src..src + len, dst);
        self.values.copy_within(src..src + len, dst);
    }
}

/// Keys and values of one layer.
pub enum LayerKv {
    F16(KvPool<f16>),
    F32(KvPool<f32>),
}

impl LayerKv {
    fn zeroed(dtype: KvDtype, len: usize) -> Self {
        match dtype {
            // Zeroed through u16 so that the allocation is `calloc`'d: a large pool costs no
            // memory until blocks are written (tests build many runners side by side).
            KvDtype::F16 => LayerKv::F16(KvPool {
                keys: zeroed_f16(len),
                values: zeroed_f16(len),
            }),
            KvDtype::F32 => LayerKv::F32(KvPool {
                keys: vec![0.0; len],
                values: vec![0.0; len],
            }),
        }
    }

    /// Stores each new token's K/V rows (`[tokens, kv_heads, head_dim]`) at its slot.
    pub fn write(&mut self, layout: &KvLayout, keys: &[f32], values: &[f32], slots: &[u32]) {
        match self {
            LayerKv::F16(pool) => pool.write(layout, keys, values, slots),
            LayerKv::F32(pool) => pool.write(layout, keys, values, slots),
        }
    }

    fn copy_block(&mut self, layout: &KvLayout, src: usize, dst: usize) {
        match self {
            LayerKv::F16(pool) => pool.copy_block(layout, src, dst),
            LayerKv::F32(pool) => pool.copy_block(layout, src, dst),
        }
    }
}

fn zeroed_f16(len: usize) -> Vec<f16> {
    let bits = std::mem::ManuallyDrop::new(vec![0u16; len]);
    // SAFETY: f16 is `repr(transparent)` over u16 (same size and alignment), and every u16 bit
    // pattern is a valid f16; the Vec's allocation is handed over whole.
    unsafe { Vec::from_raw_parts(bits.as_ptr() as *mut f16, bits.len(), bits.capacity()) }
}

pub struct KvCache {
    pub layout: KvLayout,
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    /// A pool of `num_blocks` blocks for every layer of `config`.
    pub fn new(config: &ModelConfig, dtype: KvDtype, block_size: usize, num_blocks: usize) -> Self {
        let layout = KvLayout {
            num_blocks,
            block_size,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        };
        let layers = (0..config.num_layers)
            .map(|_| LayerKv::zeroed(dtype, layout.values_per_layer()))
            .collect();
        Self { layout, layers }
    }

    /// As many blocks as fit in `memory_bytes` (at least one).
    pub fn with_memory(
        config: &ModelConfig,
        dtype: KvDtype,
        block_size: usize,
        memory_bytes: usize,
    ) -> Self {
        let bytes_per_block = config.kv_bytes_per_token(dtype.size_in_bytes()) * block_size;
        Self::new(
            config,
            dtype,
            block_size,
            (memory_bytes / bytes_per_block).max(1),
        )
    }

    /// Copies the keys and values of every layer from block `src` onto block `dst`, for each
    /// `(src, dst)` in order (a step's copy-on-write copies, made before it writes any K/V).
    /// Checks every block id first, so that a bad list changes nothing.
    pub fn copy_blocks(&mut self, copies: &[BlockCopy]) -> Result<()> {
        let num_blocks = self.layout.num_blocks;
        if let Some((src, dst)) = copies
            .iter()
            .find(|&&(src, dst)| src as usize >= num_blocks || dst as usize >= num_blocks)
        {
            return Err(ModelError::InvalidBatch(format!(
                "block copy {src} -> {dst} is outside the pool of {num_blocks} blocks"
            )));
        }
        for &(src, dst) in copies {
            for layer in &mut self.layers {
                layer.copy_block(&self.layout, src as usize, dst as usize);
            }
        }
        Ok(())
    }

    pub fn geometry(&self) -> CacheGeometry {
        CacheGeometry {
            block_size: self.layout.block_size,
            num_blocks: self.layout.num_blocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key and value of `block` in `layer`, widened to f32, keys first.
    fn block_contents(cache: &KvCache, layer: usize, block: usize) -> Vec<f32> {
        let range = cache.layout.block_offset(block, 0)..cache.layout.block_offset(block + 1, 0);
        match &cache.layers[layer] {
            LayerKv::F16(pool) => pool.keys[range.clone()]
                .iter()
                .chain(&pool.values[range])
                .map(|x| x.to_f32())
                .collect(),
            LayerKv::F32(pool) => pool.keys[range.clone()]
                .iter()
                .chain(&pool.values[range])
                .copied()
                .collect(),
        }
    }

    #[test]
    fn copies_every_layer_of_a_block_in_order_and_checks_ids_first() {
        for dtype in [KvDtype::F16, KvDtype::F32] {
            let config = ModelConfig {
                num_layers: 2,
                num_kv_heads: 2,
                head_dim: 8,
                ..crate::synthetic::preset("tiny").unwrap()
            };
            let mut cache = KvCache::new(&config, dtype, 4, 4);
            let layout = cache.layout;
            let row = layout.num_kv_heads * layout.head_dim;
            let num_slots = layout.num_blocks * layout.block_size;
            // A distinct, f16-exact value for every (layer, slot, head, dim), keys and values.
            for (l, layer) in cache.layers.iter_mut().enumerate() {
                let keys: Vec<f32> = (0..num_slots * row)
                    .map(|i| (l * 1000 + i) as f32)
                    .collect();
                let values: Vec<f32> = keys.iter().map(|k| -k).collect();
                let slots: Vec<u32> = (0..num_slots as u32).collect();
                layer.write(&layout, &keys, &values, &slots);
            }
            let before: Vec<Vec<Vec<f32>>> = (0..2)
                .map(|l| (0..4).map(|b| block_contents(&cache, l, b)).collect())
                .collect();

            let err = cache.copy_blocks(&[(1, 2), (0, 4)]).unwrap_err();
            assert!(err.to_string().contains("outside the pool"), "{err}");
            assert_eq!(block_contents(&cache, 1, 2), before[1][2], "nothing copied");

            // Block 1 is copied away before it is overwritten by block 3.
            cache.copy_blocks(&[(1, 2), (3, 1)]).unwrap();
            // Each block now holds what this block held before the copies.
            let sources = [0, 3, 1, 3];
            for (l, blocks) in before.iter().enumerate() {
                for (block, &source) in sources.iter().enumerate() {
                    assert_eq!(
                        block_contents(&cache, l, block),
                        blocks[source],
                        "{dtype:?} layer {l} block {block}"
                    );
                }
            }
        }
    }
}
