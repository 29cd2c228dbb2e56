//! The paged KV cache: pre-allocated pools of blocks, shared by the layers of each KV group.
//!
//! A block holds the keys and values of `block_size` consecutive tokens of one sequence. Which
//! blocks a sequence owns is the engine's business (its block table); the cache only knows slots.
//! No per-sequence contiguous K/V exists anywhere: attention reads the blocks in place.
//!
//! KV groups (vLLM's hybrid allocator; the bookkeeping is `minserve_core::block_manager`): the
//! layers are split into groups of equally many layers ([`KvGroups`]), all layers of a group
//! with the same attention span (global, or one sliding window). Block `b` of pool `j` holds
//! the K/V of the `j`-th layer of whichever group block `b` is handed to, so a block costs the
//! same in every group and the pool is one: a model with 3 global and 15 sliding-window layers
//! has 6 groups of 3 layers and 3 pools, and its long sequences hold only a window's worth of
//! blocks in 5 of the 6 groups. A model without windows has one group of all its layers: one
//! pool per layer, as before groups existed.
//!
//! Layout of each pool: `[num_blocks, num_kv_heads, block_size * head_dim]`, keys
//! dimension-major and values token-major inside a run (see [`KvLayout`]). Keeping a head's
//! `block_size` tokens contiguous lets attention stream one block of one head as a single
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
//!
//! `q8` halves the bytes again (like llama.cpp's `q8_0` cache types): each (slot, KV head) row
//! of keys or values is stored as i8 with one f32 scale (symmetric absmax). The scales sit
//! beside the pool, `[num_blocks, num_kv_heads, block_size]`, so a block's 16 key scales are one
//! 64-byte load for the attention kernel and block copies stay one contiguous run.
//!
//! `fp8` stores the same bytes as `q8` (like vLLM's `fp8` cache type, E4M3): each row as E4M3
//! codes with one f32 scale, `absmax / 448`, in the same place as q8's. Against q8 it trades
//! precision near the row's largest magnitude (3 mantissa bits: a relative step of 1/8 to 1/16
//! everywhere) for precision near zero (a floating point keeps small components relative,
//! where q8 rounds everything below half a step to 0); see docs/kv-cache.md for the figures.

use half::f16;
use minserve_core::{BlockCopy, BlockSwap, CacheGeometry};

use crate::config::ModelConfig;
use crate::e4m3::{self, E4m3};
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

    /// Offset of the scale of (`slot`, `kv_head`) in a layer's key or value scales. The scales
    /// of the run at `block_offset(block, kv_head)` start at that offset divided by `head_dim`,
    /// which is how kernels find them from a run's offset alone.
    #[inline]
    pub fn scale_offset(&self, slot: usize, kv_head: usize) -> usize {
        let (block, in_block) = (slot / self.block_size, slot % self.block_size);
        (block * self.num_kv_heads + kv_head) * self.block_size + in_block
    }

    pub fn scales_per_layer(&self) -> usize {
        self.num_blocks * self.num_kv_heads * self.block_size
    }
}

/// The number format of the cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F16,
    F32,
    /// i8 with one f32 scale per (slot, KV head) row, for keys and values each.
    Q8,
    /// FP8 E4M3 with one f32 scale per (slot, KV head) row, for keys and values each.
    Fp8,
}

impl KvDtype {
    /// Bytes that one (slot, KV head) row of `head_dim` keys or values takes, its scale
    /// included: what pool sizing must count for `--kv-cache-memory` to hold.
    pub fn bytes_per_row(self, head_dim: usize) -> usize {
        match self {
            KvDtype::F16 => 2 * head_dim,
            KvDtype::F32 => 4 * head_dim,
            KvDtype::Q8 | KvDtype::Fp8 => head_dim + std::mem::size_of::<f32>(),
        }
    }

    /// Bytes of K plus V that one token of `config`'s model occupies across all layers when
    /// cached as `self` (with the scales of a scaled type).
    pub fn bytes_per_token(self, config: &ModelConfig) -> usize {
        2 * config.num_layers * config.num_kv_heads * self.bytes_per_row(config.head_dim)
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            "q8" => Ok(KvDtype::Q8),
            "fp8" => Ok(KvDtype::Fp8),
            _ => Err(format!(
                "unknown KV cache type {s:?}: expected f16, f32, q8 or fp8"
            )),
        }
    }
}

/// A number format the pool can hold. Attention works in f32, so a run of cached values is
/// widened into scratch space first (a no-op borrow for f32).
///
/// A scaled format stores each (slot, KV head) row as `x / scale` with the row's own scale
/// (in [`KvPool::key_scales`] / [`KvPool::value_scales`]); readers multiply it back. Float
/// formats have no scales, and code guarded by the constant `SCALED` compiles away for them.
pub trait KvElement: Copy + Send + Sync + 'static {
    const SCALED: bool = false;
    /// The scale `row` is stored with.
    fn row_scale(_row: &[f32]) -> f32 {
        1.0
    }
    /// `x` of a row stored with `scale`.
    fn encode(x: f32, scale: f32) -> Self;
    /// [`encode`](Self::encode) of a whole row into `out`.
    fn encode_row(row: &[f32], scale: f32, out: &mut [Self]) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o = Self::encode(x, scale);
        }
    }
    fn widen<'a>(src: &'a [Self], scratch: &'a mut [f32]) -> &'a [f32];
}

impl KvElement for f32 {
    fn encode(x: f32, _scale: f32) -> Self {
        x
    }
    fn widen<'a>(src: &'a [f32], _scratch: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElement for f16 {
    fn encode(x: f32, _scale: f32) -> Self {
        f16::from_f32(x)
    }
    fn encode_row(row: &[f32], _scale: f32, out: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        // F16C (vcvtps2ph) eight at a time, where one `from_f32` per value re-checks for it
        // and converts alone: the K/V write was 3% of a batched run.
        out.convert_from_f32_slice(row);
    }
    fn widen<'a>(src: &'a [f16], scratch: &'a mut [f32]) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        let dst = &mut scratch[..src.len()];
        // F16C (vcvtph2ps), detected at run time by `half`.
        src.convert_to_f32_slice(dst);
        dst
    }
}

/// Symmetric absmax: the row's largest magnitude maps to 127. Per row rather than per block of
/// 32 values (llama.cpp's `q8_0`) so that the scale is one multiply per score and per weight in
/// attention instead of one per 32 products.
impl KvElement for i8 {
    const SCALED: bool = true;
    fn row_scale(row: &[f32]) -> f32 {
        row.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0
    }
    fn encode(x: f32, scale: f32) -> Self {
        if scale == 0.0 {
            0
        } else {
            (x / scale).round() as i8
        }
    }
    fn widen<'a>(src: &'a [i8], scratch: &'a mut [f32]) -> &'a [f32] {
        let dst = &mut scratch[..src.len()];
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s as f32;
        }
        dst
    }
}

/// E4M3 codes scaled per row so that its largest magnitude maps to 448, the format's largest
/// finite value (the per-token dynamic scaling vLLM applies to FP8 activations). A row with a
/// NaN stores NaN codes and reads back NaN, as the float caches would.
impl KvElement for E4m3 {
    const SCALED: bool = true;
    fn row_scale(row: &[f32]) -> f32 {
        row.iter().fold(0f32, |m, x| m.max(x.abs())) / e4m3::E4M3_MAX
    }
    fn encode(x: f32, scale: f32) -> Self {
        if scale == 0.0 {
            E4m3(0)
        } else {
            E4m3(e4m3::encode(x / scale))
        }
    }
    fn widen<'a>(src: &'a [E4m3], scratch: &'a mut [f32]) -> &'a [f32] {
        let dst = &mut scratch[..src.len()];
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
        dst
    }
}

/// Keys and values of one layer, in one element type.
pub struct KvPool<T> {
    pub keys: Vec<T>,
    pub values: Vec<T>,
    /// One per (slot, KV head), laid out as [`KvLayout::scale_offset`] says; empty unless
    /// `T::SCALED`.
    pub key_scales: Vec<f32>,
    pub value_scales: Vec<f32>,
}

impl<T: KvElement> KvPool<T> {
    /// Stores each new token's K/V rows (`[tokens, kv_heads, head_dim]`) at its slot — vLLM's
    /// `reshape_and_cache` — after `rotate_key(token, key_head_row)` on a copy of each key
    /// (RoPE, applied here while the row is in L1 rather than in a pass of its own).
    ///
    /// A decode step's tokens land in as many different blocks, and each key row, stored
    /// dimension-major, touches `head_dim / 2` cache lines that are usually cold: the write is
    /// bound by misses, so the pool's threads share the tokens to keep more of them in flight.
    fn write(
        &mut self,
        layout: &KvLayout,
        keys: &[f32],
        values: &[f32],
        step_slots: StepSlots,
        rotate_key: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        let slots = step_slots.slots;
        let row = layout.num_kv_heads * layout.head_dim;
        assert!(keys.len() >= slots.len() * row && values.len() >= slots.len() * row);
        assert_eq!(
            step_slots.pool_slots,
            layout.num_blocks * layout.block_size,
            "slots checked against another pool"
        );
        assert!(self.keys.len() >= layout.values_per_layer());
        assert!(self.values.len() >= layout.values_per_layer());
        assert!(
            !T::SCALED
                || self.key_scales.len().min(self.value_scales.len()) >= layout.scales_per_layer()
        );
        let pool = RawPool {
            keys: self.keys.as_mut_ptr(),
            values: self.values.as_mut_ptr(),
            key_scales: self.key_scales.as_mut_ptr(),
            value_scales: self.value_scales.as_mut_ptr(),
        };
        let write_tokens = |tokens: std::ops::Range<usize>| {
            // SAFETY: the slots are inside the pool (checked by `StepSlots::new` against a pool
            // of this size), and the tokens of different calls have different slots (checked
            // there too before calls run side by side), so no two calls write one element.
            unsafe { pool.write_tokens(layout, keys, values, slots, rotate_key, tokens) }
        };
        if slots.len() * row < PARALLEL_WRITE_VALUES || !step_slots.distinct {
            write_tokens(0..slots.len());
        } else {
            crate::pool::pool().execute_chunked(slots.len(), write_tokens);
        }
    }
}

/// Below this many key values a step's write stays on the calling thread.
const PARALLEL_WRITE_VALUES: usize = 4096;

/// A step's slots in one KV group, checked once per step rather than once per layer: inside
/// a pool of `layout`'s size, and whether any repeats (the scheduler never gives two new
/// tokens one slot; a batch that did would be written on one thread, last token last, rather
/// than raced).
#[derive(Clone, Copy)]
pub struct StepSlots<'a> {
    slots: &'a [u32],
    pool_slots: usize,
    distinct: bool,
}

impl<'a> StepSlots<'a> {
    /// # Panics
    /// If a slot lies outside a pool of `layout`'s size.
    pub fn new(slots: &'a [u32], layout: &KvLayout) -> Self {
        let pool_slots = layout.num_blocks * layout.block_size;
        assert!(
            slots.iter().all(|&s| (s as usize) < pool_slots),
            "slot outside the pool"
        );
        let mut sorted = slots.to_vec();
        sorted.sort_unstable();
        Self {
            slots,
            pool_slots,
            distinct: sorted.windows(2).all(|w| w[0] != w[1]),
        }
    }
}

/// A [`KvPool`]'s buffers as pointers, so that the pool's threads can fill the slots of
/// different tokens at once.
struct RawPool<T> {
    keys: *mut T,
    values: *mut T,
    key_scales: *mut f32,
    value_scales: *mut f32,
}

// SAFETY: callers of `write_tokens` guarantee that concurrent calls touch different slots.
unsafe impl<T: Send> Sync for RawPool<T> {}

impl<T: KvElement> RawPool<T> {
    /// # Safety
    /// Every slot of `tokens` is inside the pool of `layout`, and no concurrent call writes
    /// one of them.
    unsafe fn write_tokens(
        &self,
        layout: &KvLayout,
        keys: &[f32],
        values: &[f32],
        slots: &[u32],
        rotate_key: &(dyn Fn(usize, &mut [f32]) + Sync),
        tokens: std::ops::Range<usize>,
    ) {
        let (row, head_dim) = (layout.num_kv_heads * layout.head_dim, layout.head_dim);
        let mut key_row = vec![0f32; head_dim];
        let mut encoded_key = vec![T::encode(0.0, 0.0); head_dim];
        for token in tokens {
            let slot = slots[token] as usize;
            for head in 0..layout.num_kv_heads {
                let src = token * row + head * head_dim;
                key_row.copy_from_slice(&keys[src..src + head_dim]);
                rotate_key(token, &mut key_row);
                let value_row = &values[src..src + head_dim];
                let (key_scale, value_scale) = (T::row_scale(&key_row), T::row_scale(value_row));
                T::encode_row(&key_row, key_scale, &mut encoded_key);
                // Keys are dimension-major within a block (see `key_offset`).
                let key = self.keys.add(layout.key_offset(slot, head));
                for (d, &k) in encoded_key.iter().enumerate() {
                    *key.add(d * layout.block_size) = k;
                }
                let value = std::slice::from_raw_parts_mut(
                    self.values.add(layout.value_offset(slot, head)),
                    head_dim,
                );
                T::encode_row(value_row, value_scale, value);
                if T::SCALED {
                    let at = layout.scale_offset(slot, head);
                    *self.key_scales.add(at) = key_scale;
                    *self.value_scales.add(at) = value_scale;
                }
            }
        }
    }
}

impl<T: KvElement> KvPool<T> {
    /// A zeroed pool for `layout`.
    fn zeroed(layout: &KvLayout, zeroed: impl Fn(usize) -> Vec<T>) -> Self {
        let scales = if T::SCALED {
            layout.scales_per_layer()
        } else {
            0
        };
        Self {
            keys: zeroed(layout.values_per_layer()),
            values: zeroed(layout.values_per_layer()),
            key_scales: vec![0.0; scales],
            value_scales: vec![0.0; scales],
        }
    }

    /// Copies every key and value of block `src` onto block `dst`, with their scales.
    fn copy_block(&mut self, layout: &KvLayout, src: usize, dst: usize) {
        let len = layout.block_offset(1, 0);
        let (src, dst) = (layout.block_offset(src, 0), layout.block_offset(dst, 0));
        self.keys.copy_within(src..src + len, dst);
        self.values.copy_within(src..src + len, dst);
        if T::SCALED {
            let (src, dst, len) = (
                src / layout.head_dim,
                dst / layout.head_dim,
                len / layout.head_dim,
            );
            self.key_scales.copy_within(src..src + len, dst);
            self.value_scales.copy_within(src..src + len, dst);
        }
    }

    /// Copies block `src` of this pool onto block `dst` of `to`, a pool of the same layout but
    /// for its block count (swap preemption's host pool, or back).
    fn copy_block_into(&self, layout: &KvLayout, src: usize, to: &mut Self, dst: usize) {
        let len = layout.block_offset(1, 0);
        let (src, dst) = (layout.block_offset(src, 0), layout.block_offset(dst, 0));
        to.keys[dst..dst + len].copy_from_slice(&self.keys[src..src + len]);
        to.values[dst..dst + len].copy_from_slice(&self.values[src..src + len]);
        if T::SCALED {
            let (src, dst, len) = (
                src / layout.head_dim,
                dst / layout.head_dim,
                len / layout.head_dim,
            );
            to.key_scales[dst..dst + len].copy_from_slice(&self.key_scales[src..src + len]);
            to.value_scales[dst..dst + len].copy_from_slice(&self.value_scales[src..src + len]);
        }
    }

    /// Whether the run at `start` (a [`KvLayout::block_offset`]) of `block_size` tokens lies
    /// inside the pool, scales included.
    pub fn holds_run(&self, start: usize, block_size: usize, head_dim: usize) -> bool {
        let end = start + block_size * head_dim;
        end <= self.keys.len().min(self.values.len())
            && (!T::SCALED
                || start / head_dim + block_size
                    <= self.key_scales.len().min(self.value_scales.len()))
    }
}

/// Keys and values of one layer.
pub enum LayerKv {
    F16(KvPool<f16>),
    F32(KvPool<f32>),
    Q8(KvPool<i8>),
    Fp8(KvPool<E4m3>),
}

impl LayerKv {
    /// A zeroed pool of `dtype` for `layout`.
    pub fn zeroed(dtype: KvDtype, layout: &KvLayout) -> Self {
        match dtype {
            // SAFETY: f16 wraps a u16 and E4m3 a u8 (`repr(transparent)`), zero bits are zero.
            KvDtype::F16 => LayerKv::F16(KvPool::zeroed(layout, |len| unsafe {
                zeroed_as::<f16, u16>(len)
            })),
            KvDtype::F32 => LayerKv::F32(KvPool::zeroed(layout, |len| vec![0.0; len])),
            KvDtype::Q8 => LayerKv::Q8(KvPool::zeroed(layout, |len| vec![0; len])),
            KvDtype::Fp8 => LayerKv::Fp8(KvPool::zeroed(layout, |len| unsafe {
                zeroed_as::<E4m3, u8>(len)
            })),
        }
    }

    /// Stores each new token's K/V rows (`[tokens, kv_heads, head_dim]`) at its slot.
    pub fn write(&mut self, layout: &KvLayout, keys: &[f32], values: &[f32], slots: &[u32]) {
        self.write_rotated(
            layout,
            keys,
            values,
            StepSlots::new(slots, layout),
            &|_, _| {},
        )
    }

    /// [`write`](Self::write) with `rotate_key(token, key_head_row)` applied to each key
    /// head's row on its way in (RoPE), leaving `keys` as they were.
    pub fn write_rotated(
        &mut self,
        layout: &KvLayout,
        keys: &[f32],
        values: &[f32],
        slots: StepSlots,
        rotate_key: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        match self {
            LayerKv::F16(pool) => pool.write(layout, keys, values, slots, rotate_key),
            LayerKv::F32(pool) => pool.write(layout, keys, values, slots, rotate_key),
            LayerKv::Q8(pool) => pool.write(layout, keys, values, slots, rotate_key),
            LayerKv::Fp8(pool) => pool.write(layout, keys, values, slots, rotate_key),
        }
    }

    fn copy_block(&mut self, layout: &KvLayout, src: usize, dst: usize) {
        match self {
            LayerKv::F16(pool) => pool.copy_block(layout, src, dst),
            LayerKv::F32(pool) => pool.copy_block(layout, src, dst),
            LayerKv::Q8(pool) => pool.copy_block(layout, src, dst),
            LayerKv::Fp8(pool) => pool.copy_block(layout, src, dst),
        }
    }

    fn dtype(&self) -> KvDtype {
        match self {
            LayerKv::F16(_) => KvDtype::F16,
            LayerKv::F32(_) => KvDtype::F32,
            LayerKv::Q8(_) => KvDtype::Q8,
            LayerKv::Fp8(_) => KvDtype::Fp8,
        }
    }

    /// Copies block `src` of this pool onto block `dst` of `to`, a pool of the same type.
    fn copy_block_into(&self, layout: &KvLayout, src: usize, to: &mut Self, dst: usize) {
        match (self, to) {
            (LayerKv::F16(a), LayerKv::F16(b)) => a.copy_block_into(layout, src, b, dst),
            (LayerKv::F32(a), LayerKv::F32(b)) => a.copy_block_into(layout, src, b, dst),
            (LayerKv::Q8(a), LayerKv::Q8(b)) => a.copy_block_into(layout, src, b, dst),
            (LayerKv::Fp8(a), LayerKv::Fp8(b)) => a.copy_block_into(layout, src, b, dst),
            _ => unreachable!("a host pool is made like its device pool"),
        }
    }

    /// [`KvPool::holds_run`] of whichever pool this is.
    pub fn holds_run(&self, start: usize, block_size: usize, head_dim: usize) -> bool {
        match self {
            LayerKv::F16(pool) => pool.holds_run(start, block_size, head_dim),
            LayerKv::F32(pool) => pool.holds_run(start, block_size, head_dim),
            LayerKv::Q8(pool) => pool.holds_run(start, block_size, head_dim),
            LayerKv::Fp8(pool) => pool.holds_run(start, block_size, head_dim),
        }
    }
}

/// `len` zeros of `T`, allocated zeroed through the integer `U` (`calloc`), so that a large
/// pool costs no memory until blocks are written (tests build many runners side by side).
///
/// # Safety
/// `T` is `repr(transparent)` over `U` (same size and alignment) and all-zero bits are a valid
/// `T`.
unsafe fn zeroed_as<T, U: Copy + Default>(len: usize) -> Vec<T> {
    let bits = std::mem::ManuallyDrop::new(vec![U::default(); len]);
    // The Vec's allocation is handed over whole.
    Vec::from_raw_parts(bits.as_ptr() as *mut T, bits.len(), bits.capacity())
}

/// How the cache groups a model's layers: see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvGroups {
    /// The sliding window of each group (`None`: global), global groups first.
    pub windows: Vec<Option<usize>>,
    /// For each layer, its group and its pool (its index among the group's layers).
    pub layers: Vec<(usize, usize)>,
    /// Layers in every group, and so pools in the cache.
    pub layers_per_group: usize,
}

impl KvGroups {
    /// Groups of `config`'s layers by attention span, as large as divides every span's layer
    /// count (Gemma 3 270M: 3 global and 15 local layers, groups of 3).
    pub fn of(config: &ModelConfig) -> Self {
        let mut spans: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
        for layer in 0..config.num_layers {
            let window = config.layer_window(layer);
            match spans.iter_mut().find(|(w, _)| *w == window) {
                Some((_, layers)) => layers.push(layer),
                None => spans.push((window, vec![layer])),
            }
        }
        // Group 0 is global when any layer is: its blocks are the heads of prefixes, freed last.
        spans.sort_by_key(|(window, _)| window.is_some());
        let per_group = spans
            .iter()
            .fold(0, |g, (_, layers)| gcd(g, layers.len()))
            .max(1);
        let mut groups = Self {
            windows: Vec::new(),
            layers: vec![(0, 0); config.num_layers],
            layers_per_group: per_group,
        };
        for (window, layers) in spans {
            for chunk in layers.chunks(per_group) {
                for (pool, &layer) in chunk.iter().enumerate() {
                    groups.layers[layer] = (groups.windows.len(), pool);
                }
                groups.windows.push(window);
            }
        }
        if groups.windows.is_empty() {
            groups.windows.push(None);
        }
        groups
    }

    /// All layers in one global group: nothing is released while a sequence runs (attention
    /// still reads only each layer's window). What the cache was before KV groups; kept to
    /// measure what they save.
    pub fn single(config: &ModelConfig) -> Self {
        Self {
            windows: vec![None],
            layers: (0..config.num_layers).map(|layer| (0, layer)).collect(),
            layers_per_group: config.num_layers.max(1),
        }
    }

    pub fn num_groups(&self) -> usize {
        self.windows.len()
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

pub struct KvCache {
    pub layout: KvLayout,
    /// One pool per layer of a group (see [`KvGroups`]).
    pub pools: Vec<LayerKv>,
    pub groups: KvGroups,
}

impl KvCache {
    /// A pool of `num_blocks` blocks, grouped by [`KvGroups::of`].
    pub fn new(config: &ModelConfig, dtype: KvDtype, block_size: usize, num_blocks: usize) -> Self {
        Self::with_groups(config, KvGroups::of(config), dtype, block_size, num_blocks)
    }

    pub fn with_groups(
        config: &ModelConfig,
        groups: KvGroups,
        dtype: KvDtype,
        block_size: usize,
        num_blocks: usize,
    ) -> Self {
        let layout = KvLayout {
            num_blocks,
            block_size,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
        };
        let pools = (0..groups.layers_per_group)
            .map(|_| LayerKv::zeroed(dtype, &layout))
            .collect();
        Self {
            layout,
            pools,
            groups,
        }
    }

    /// Bytes of one block of `groups` (the K/V of `block_size` tokens for the layers of one
    /// group, with the scales of a scaled type).
    pub fn bytes_per_block(
        config: &ModelConfig,
        groups: &KvGroups,
        dtype: KvDtype,
        block_size: usize,
    ) -> usize {
        2 * groups.layers_per_group
            * config.num_kv_heads
            * dtype.bytes_per_row(config.head_dim)
            * block_size
    }

    /// As many blocks as fit in `memory_bytes` (at least one).
    pub fn with_memory(
        config: &ModelConfig,
        dtype: KvDtype,
        block_size: usize,
        memory_bytes: usize,
    ) -> Self {
        let groups = KvGroups::of(config);
        let bytes_per_block = Self::bytes_per_block(config, &groups, dtype, block_size);
        let num_blocks = (memory_bytes / bytes_per_block).max(1);
        Self::with_groups(config, groups, dtype, block_size, num_blocks)
    }

    /// Copies the keys and values of every pool from block `src` onto block `dst`, for each
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
            for pool in &mut self.pools {
                pool.copy_block(&self.layout, src as usize, dst as usize);
            }
        }
        Ok(())
    }

    /// An empty cache shaped like this one (groups, layers, element type) with as many blocks
    /// as fit in `memory_bytes`, possibly none: the host pool of swap preemption, a separate
    /// allocation beside this one.
    pub fn host_pool(&self, memory_bytes: usize) -> Self {
        let dtype = self.pools.first().map_or(KvDtype::F16, LayerKv::dtype);
        let bytes_per_block = 2
            * self.groups.layers_per_group
            * self.layout.num_kv_heads
            * dtype.bytes_per_row(self.layout.head_dim)
            * self.layout.block_size;
        let layout = KvLayout {
            num_blocks: memory_bytes / bytes_per_block.max(1),
            ..self.layout
        };
        Self {
            pools: (0..self.pools.len())
                .map(|_| LayerKv::zeroed(dtype, &layout))
                .collect(),
            layout,
            groups: self.groups.clone(),
        }
    }

    /// Copies block `src` of `from` onto block `dst` of `to`, in every pool, for each
    /// `(src, dst)` in order: a swap between the device pool and its host pool. Checks every
    /// id first, so that a bad list changes nothing.
    pub fn swap_blocks(from: &KvCache, to: &mut KvCache, swaps: &[BlockSwap]) -> Result<()> {
        let (from_blocks, to_blocks) = (from.layout.num_blocks, to.layout.num_blocks);
        if let Some((src, dst)) = swaps
            .iter()
            .find(|&&(src, dst)| src as usize >= from_blocks || dst as usize >= to_blocks)
        {
            return Err(ModelError::InvalidBatch(format!(
                "block swap {src} -> {dst} is outside the pools of {from_blocks} and {to_blocks} blocks"
            )));
        }
        for &(src, dst) in swaps {
            for (source, target) in from.pools.iter().zip(&mut to.pools) {
                source.copy_block_into(&from.layout, src as usize, target, dst as usize);
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

    /// Every key and value of `block` in `layer`, widened to f32 (q8, fp8: times its scale),
    /// keys first.
    fn block_contents(cache: &KvCache, layer: usize, block: usize) -> Vec<f32> {
        let layout = &cache.layout;
        let range = layout.block_offset(block, 0)..layout.block_offset(block + 1, 0);
        match &cache.pools[layer] {
            LayerKv::Q8(pool) => scaled_contents(pool, layout, range, |q| q as f32),
            LayerKv::Fp8(pool) => scaled_contents(pool, layout, range, E4m3::to_f32),
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

    /// [`block_contents`] of a scaled pool: each code times its row's scale.
    fn scaled_contents<T: KvElement>(
        pool: &KvPool<T>,
        layout: &KvLayout,
        range: std::ops::Range<usize>,
        value_of: impl Fn(T) -> f32,
    ) -> Vec<f32> {
        let run = layout.block_size * layout.head_dim;
        let first_scale = range.start / layout.head_dim;
        // Keys are `[kv_head][dim][token]`, values `[kv_head][token][dim]`.
        let key_scale = |i: usize| (i / run) * layout.block_size + i % layout.block_size;
        let value_scale = |i: usize| (i / run) * layout.block_size + (i % run) / layout.head_dim;
        let keys = pool.keys[range.clone()]
            .iter()
            .enumerate()
            .map(|(i, &q)| value_of(q) * pool.key_scales[first_scale + key_scale(i)]);
        let values = pool.values[range]
            .iter()
            .enumerate()
            .map(|(i, &q)| value_of(q) * pool.value_scales[first_scale + value_scale(i)]);
        keys.chain(values).collect()
    }

    /// Bytes a pool holds: its elements and its scales.
    fn pool_bytes<T>(p: &KvPool<T>) -> usize {
        std::mem::size_of::<T>() * (p.keys.len() + p.values.len())
            + 4 * (p.key_scales.len() + p.value_scales.len())
    }

    /// `--kv-cache-memory` holds: the pool, scales included, fits in the memory it was sized
    /// for, and q8 fits close to twice f16's tokens (its scales cost 4 bytes per row).
    #[test]
    fn pools_sized_by_memory_count_their_scales() {
        let config = crate::synthetic::preset("tiny").unwrap();
        let memory = 1 << 20;
        let blocks = |dtype| {
            KvCache::with_memory(&config, dtype, 16, memory)
                .layout
                .num_blocks
        };
        for dtype in [KvDtype::F16, KvDtype::F32, KvDtype::Q8, KvDtype::Fp8] {
            let cache = KvCache::with_memory(&config, dtype, 16, memory);
            let bytes: usize = cache
                .pools
                .iter()
                .map(|layer| match layer {
                    LayerKv::F16(p) => pool_bytes(p),
                    LayerKv::F32(p) => pool_bytes(p),
                    LayerKv::Q8(p) => pool_bytes(p),
                    LayerKv::Fp8(p) => pool_bytes(p),
                })
                .sum();
            assert!(bytes <= memory, "{dtype:?}: {bytes} bytes");
            assert!(
                bytes + bytes / cache.layout.num_blocks > memory,
                "{dtype:?} undersized"
            );
        }
        let head_dim = config.head_dim;
        let expected = (2 * head_dim) as f64 / (head_dim + 4) as f64;
        for dtype in [KvDtype::Q8, KvDtype::Fp8] {
            let ratio = blocks(dtype) as f64 / blocks(KvDtype::F16) as f64;
            assert!(
                (ratio - expected).abs() < 0.05,
                "{dtype:?}: {ratio} vs {expected}"
            );
        }
    }

    type Check<'a> = (&'a [f32], f32, &'a dyn Fn(usize) -> f32);

    /// Each q8 row is stored as i8 codes times its own absmax / 127: within half a step of the
    /// input, its largest magnitude exact to rounding, and an all-zero row all zero.
    #[test]
    fn q8_rows_round_to_their_own_scale() {
        let layout = KvLayout {
            num_blocks: 2,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 8,
        };
        let mut kv = LayerKv::zeroed(KvDtype::Q8, &layout);
        let row = layout.num_kv_heads * layout.head_dim;
        // Token 0: head 0 small values, head 1 zeros; token 1: large values in both heads.
        let keys: Vec<f32> = (0..2 * row)
            .map(|i| match (i / layout.head_dim, i % layout.head_dim) {
                (0, d) => d as f32 * 0.01 - 0.03,
                (1, _) => 0.0,
                (_, d) => (d as f32 - 3.5) * 40.0,
            })
            .collect();
        let values: Vec<f32> = keys.iter().map(|k| -2.0 * k).collect();
        kv.write(&layout, &keys, &values, &[6, 1]);
        let LayerKv::Q8(pool) = &kv else {
            unreachable!()
        };
        for (token, slot) in [(0usize, 6usize), (1, 1)] {
            for head in 0..layout.num_kv_heads {
                let src = token * row + head * layout.head_dim;
                let at = layout.scale_offset(slot, head);
                let key = |d: usize| {
                    pool.keys[layout.key_offset(slot, head) + d * layout.block_size] as f32
                        * pool.key_scales[at]
                };
                let value = |d: usize| {
                    pool.values[layout.value_offset(slot, head) + d] as f32 * pool.value_scales[at]
                };
                // (input row, its scale, the stored value of dimension d times the scale)
                let checks: [Check; 2] = [
                    (&keys[src..src + layout.head_dim], pool.key_scales[at], &key),
                    (
                        &values[src..src + layout.head_dim],
                        pool.value_scales[at],
                        &value,
                    ),
                ];
                for (input, scale, stored) in checks {
                    let absmax = input.iter().fold(0f32, |m, x| m.max(x.abs()));
                    assert_eq!(scale, absmax / 127.0, "token {token} head {head}");
                    for (d, &x) in input.iter().enumerate() {
                        let back = stored(d);
                        assert!(
                            (back - x).abs() <= 0.5 * scale * (1.0 + 1e-6),
                            "token {token} head {head} dim {d}: {x} came back as {back}"
                        );
                    }
                }
            }
        }
    }

    /// Each fp8 row is stored as E4M3 codes times its own absmax / 448: its largest magnitude
    /// comes back exactly, every value within half an E4M3 step (a relative 2^-4 in the
    /// normal range, 2^-10 of the scale below it), small values stay nonzero where q8 would
    /// round them to 0, and an all-zero row is all zero.
    #[test]
    fn fp8_rows_keep_relative_precision() {
        let layout = KvLayout {
            num_blocks: 1,
            block_size: 4,
            num_kv_heads: 1,
            head_dim: 8,
        };
        let mut kv = LayerKv::zeroed(KvDtype::Fp8, &layout);
        let rows: [[f32; 8]; 3] = [
            [1000.0, -3.7, 0.01, 1e-3, -250.0, 7.0, 0.0, 123.456],
            [0.0; 8],
            [-0.5, 0.25, 1e-6, 0.3, -0.0, 0.49, 0.125, -0.126],
        ];
        let keys: Vec<f32> = rows.iter().flatten().copied().collect();
        let values: Vec<f32> = keys.iter().map(|k| k * 3.0).collect();
        kv.write(&layout, &keys, &values, &[0, 1, 2]);
        let LayerKv::Fp8(pool) = &kv else {
            unreachable!()
        };
        for (slot, row) in rows.iter().enumerate() {
            let at = layout.scale_offset(slot, 0);
            let (key_scale, value_scale) = (pool.key_scales[at], pool.value_scales[at]);
            let absmax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert_eq!(key_scale, absmax / 448.0, "slot {slot}");
            assert_eq!(value_scale, 3.0 * absmax / 448.0, "slot {slot}");
            for (d, &x) in row.iter().enumerate() {
                let key = pool.keys[layout.key_offset(slot, 0) + d * layout.block_size];
                let value = pool.values[layout.value_offset(slot, 0) + d];
                let checks = [
                    (key, key_scale, x, absmax),
                    (value, value_scale, 3.0 * x, 3.0 * absmax),
                ];
                for (stored, scale, x, max) in checks {
                    let back = stored.to_f32() * scale;
                    let step = (x.abs() / 16.0).max(scale / 1024.0);
                    assert!(
                        (back - x).abs() <= step * (1.0 + 1e-6),
                        "slot {slot} dim {d}: {x} came back as {back}"
                    );
                    if x.abs() == max {
                        assert!((back - x).abs() <= x.abs() * 1e-6, "{x}: {back}");
                    }
                }
            }
        }
        // 0.01 in a row of absmax 1000: far below half a q8 step (3.9), kept by fp8 (as a
        // subnormal code: 2 * 2^-9 of the scale).
        let tiny = pool.keys[layout.key_offset(0, 0) + 2 * layout.block_size];
        assert!(tiny.to_f32() * pool.key_scales[0] > 0.0);
    }

    /// The tiny synthetic model's config with `layers` layers of `kv_heads` KV heads of
    /// `head_dim`.
    fn tiny_with(layers: usize, kv_heads: usize, head_dim: usize) -> ModelConfig {
        ModelConfig {
            num_layers: layers,
            num_kv_heads: kv_heads,
            head_dim,
            ..crate::synthetic::preset("tiny").unwrap()
        }
    }

    /// A step large enough for the pool's threads to share its tokens writes what writing
    /// the tokens one at a time writes, with the keys rotated; a batch that repeats a slot
    /// (never made by the scheduler) is written in token order, the last token winning.
    #[test]
    fn a_shared_write_equals_token_by_token_writes() {
        for dtype in [KvDtype::F16, KvDtype::F32, KvDtype::Q8, KvDtype::Fp8] {
            let config = tiny_with(1, 2, 16);
            let (block_size, num_blocks) = (16, 32);
            let row = 2 * 16;
            let tokens = 400;
            assert!(tokens * row >= PARALLEL_WRITE_VALUES);
            // Slots scattered over the blocks, as a decode step's are.
            let slots: Vec<u32> = (0..tokens as u32).map(|t| (t * 37) % 512).collect();
            let keys: Vec<f32> = (0..tokens * row)
                .map(|i| ((i * 7) % 61) as f32 - 30.0)
                .collect();
            let values: Vec<f32> = keys.iter().map(|k| 0.5 * k + 1.0).collect();
            let rotate = |token: usize, key: &mut [f32]| key[0] += token as f32;

            let mut shared = KvCache::new(&config, dtype, block_size, num_blocks);
            let layout = shared.layout;
            let step_slots = StepSlots::new(&slots, &layout);
            shared.pools[0].write_rotated(&layout, &keys, &values, step_slots, &rotate);
            let mut one_by_one = KvCache::new(&config, dtype, block_size, num_blocks);
            for t in 0..tokens {
                let span = t * row..(t + 1) * row;
                one_by_one.pools[0].write_rotated(
                    &layout,
                    &keys[span.clone()],
                    &values[span],
                    StepSlots::new(&slots[t..t + 1], &layout),
                    &|_, key: &mut [f32]| rotate(t, key),
                );
            }
            for block in 0..num_blocks {
                assert_eq!(
                    block_contents(&shared, 0, block),
                    block_contents(&one_by_one, 0, block),
                    "{dtype:?} block {block}"
                );
            }

            let mut repeated = slots.clone();
            repeated[tokens - 1] = repeated[0];
            let mut cache = KvCache::new(&config, dtype, block_size, num_blocks);
            cache.pools[0].write(&layout, &keys, &values, &repeated);
            let LayerKv::F32(pool) = &cache.pools[0] else {
                continue;
            };
            let last = (tokens - 1) * row;
            assert_eq!(
                pool.values[layout.value_offset(slots[0] as usize, 0)],
                values[last]
            );
        }
    }

    #[test]
    fn copies_every_layer_of_a_block_in_order_and_checks_ids_first() {
        for dtype in [KvDtype::F16, KvDtype::F32, KvDtype::Q8, KvDtype::Fp8] {
            let config = tiny_with(2, 2, 8);
            let mut cache = KvCache::new(&config, dtype, 4, 4);
            let layout = cache.layout;
            let row = layout.num_kv_heads * layout.head_dim;
            let num_slots = layout.num_blocks * layout.block_size;
            // A distinct, f16-exact value for every (layer, slot, head, dim), keys and values;
            // q8 rows get distinct scales, so a block copied without its scales reads wrong.
            for (l, layer) in cache.pools.iter_mut().enumerate() {
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
