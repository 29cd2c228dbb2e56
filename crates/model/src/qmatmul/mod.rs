//! Batched CPU matmul for GGUF's Q4_0, Q4_1 and Q8_0 weights: each weight block is decoded once
//! and applied to every row of the batch, so that continuous batching pays off.
//!
//! # Why
//!
//! candle's CPU `QMatMul` runs Q4_1 (and Q8_0 whenever `k` is not a multiple of 256, as with a
//! hidden size of 576) as one `vec_dot` per (row, column): a batch of 64 rows costs 64 times one
//! row. This module computes the same numbers, in the same formats, with tiles of 16 columns by
//! up to [`ROW_TILE`] rows, so the weights are read (and their nibbles unpacked) once per row tile
//! instead of once per row, and the integer work runs on int8 dot-product instructions.
//!
//! # Numerics: ggml's reference arithmetic, bit for bit
//!
//! The weights stay in the file's own format (repacked, never re-quantized). Each activation row
//! is quantized exactly as ggml's `quantize_row_q8_1` / candle's `BlockQ8_1::from_float` does
//! (blocks of 32, `d = amax / 127`, `q = round(x / d)`, `s = f16(sum q) * f16(d)`; the Q8_0
//! quantization candle uses for Q8_0 and Q4_0 weights gives the same `d` and `q`). Then, for
//! every (row, column), the blocks are accumulated in order with exactly the f32 operations of
//! ggml's generic `vec_dot` (candle's `vec_dot_unopt`):
//!
//! ```text
//! Q4_1:        acc += (sumi as f32 * d_w) * d_x + m_w * s_x
//! Q4_0, Q8_0:  acc += (sumi as f32 * d_w) * d_x
//! ```
//!
//! where `sumi` is the block's integer dot product (exact in i32, so the order in which SIMD
//! lanes add it up cannot matter). The vector kernels do the same f32 operations lane-wise (no
//! FMA, no reassociation), so:
//! * Q4_1 results are **bit-identical to candle's `QMatMul`** (which always takes the generic
//!   path for Q4_1), whatever the batch size;
//! * every ISA path (AVX-512 VNNI, AVX2, scalar) gives bit-identical results, so outputs do not
//!   even depend on the machine's instruction set;
//! * **batch invariance**: a row's result depends only on that row, never on `m`, on the other
//!   rows, on the row tile it lands in (tail rows run the same per-row arithmetic), or on how the
//!   columns are split over threads.
//!
//! For Q8_0 and Q4_0, candle's x86 kernels sum the blocks in another order (AVX `vec_dot`), or
//! quantize the activations to Q8_K when `k % 256 == 0` (its repacked Q8_0 path), so candle and
//! this module agree only to float rounding (or, for Q8_K, to activation-quantization noise);
//! this module matches llama.cpp's reference `vec_dot_q8_0_q8_0`.
//!
//! # Layout
//!
//! At load, the weights are repacked into tiles of 16 output columns by one block of 32 inputs:
//! the quantized values are interleaved so that each 32-bit lane of a 512-bit register holds four
//! consecutive inputs of one column (`qs[(group * 16 + column) * 4 + j]`, group = 4 inputs), and
//! one `vpdpbusd` (u8 x s8 -> i32) against a broadcast of four activation bytes produces 16
//! columns' partial sums. Q4 tiles keep the nibbles packed (low nibble: inputs 0..16 of the
//! block, high nibble: 16..32, as in ggml) and the f16 scales, so the packed weights take the
//! same memory as the file's. Q8_0 (signed) values are stored offset by +128 so that they are
//! unsigned for `vpdpbusd`, the offset being removed exactly through the activation block's
//! integer sum (`sum (q + 128) x = sum q x + 128 sum x`; Q4_0's `q - 8` likewise). The AVX2
//! path (`vpmaddubsw`) uses the same tiles, with ggml's abs/sign trick for Q8_0.
//!
//! Each (16-column tile, block) is decoded once (nibbles -> bytes: 8 AND/shift ops) and then
//! applied to [`ROW_TILE`] rows, whose accumulators stay in registers; tail rows run the 1-row
//! kernel, which does the same per-row operations. Per row and block the cost is 8 `vpdpbusd`
//! plus 5-6 f32 operations of the ggml epilogue; on Zen 5 these share the vector pipes, so one
//! core peaks near 300 GFLOP/s and wider row tiles gain nothing.
//!
//! # Threading
//!
//! Work items are (row chunk, column tile) pairs, shared over the model's thread pool
//! ([`crate::pool`]). Column splits leave every
//! element's arithmetic unchanged. Activations are quantized into a reusable thread-local buffer
//! (on the pool too when large); [`QInput`] and [`QWeight::forward_shared`] quantize once for
//! several weights with the same input and run them in one pass over the pool.
//!
//! # Use
//!
//! ```ignore
//! // at load: GGUF Q4_0 / Q4_1 / Q8_0 tensors get packed, the rest stay on candle
//! let w = match QWeight::from_qtensor(&qtensor)? {
//!     Some(packed) => LinearWeight::Packed(packed),
//!     None => LinearWeight::Candle(QMatMul::from_qtensor(qtensor)?),
//! };
//! // forward: [.., k] -> [.., n], like QMatMul::forward
//! let y = packed.forward(&x)?;
//! // q, k and v (or gate and up) read the same input: quantize it once, one pool pass
//! let qkv = QWeight::forward_shared(&[&q_w, &k_w, &v_w], &h)?;
//! ```

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::cell::RefCell;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

/// Inputs per quantization block (Q4_0, Q4_1, Q8_0 and the activations' Q8_1 all use 32).
pub const BLOCK: usize = 32;
/// Output columns per tile: one 512-bit register of i32 / f32 lanes.
pub const TILE_N: usize = 16;
/// Rows per work item: a worker walks the column tiles with one chunk of rows. Smaller chunks
/// (to keep the activations in L1 for large k) measured slower: 64 rows re-read from L2 cost less
/// than re-reading the weight tiles more often.
const ROW_CHUNK: usize = 64;

/// The instruction set a matmul runs on. All of them give bit-identical results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F + BW + VNNI (`vpdpbusd`), plus F16C for the f16 scales.
    Avx512Vnni,
    /// AVX2 (`vpmaddubsw`), plus F16C.
    Avx2,
    /// Portable Rust.
    Scalar,
}

impl Isa {
    /// Whether this machine can run `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest instruction set available (detected once).
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512Vnni, Isa::Avx2]
                .into_iter()
                .find(|isa| isa.is_available())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// Every instruction set this machine can run, fastest first.
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .filter(|isa| isa.is_available())
            .collect()
    }
}

/// Q4_0 / Q4_1 weights for 16 columns x one block of 32 inputs.
#[derive(Clone)]
#[repr(C, align(64))]
pub(crate) struct TileQ4 {
    /// `qs[(g * 16 + c) * 4 + j]` = byte `4g + j` of column `c`'s block (g in 0..4): low nibble
    /// is input `4g + j`, high nibble input `16 + 4g + j`.
    pub(crate) qs: [u8; 4 * TILE_N * 4],
    pub(crate) d: [f16; TILE_N],
    /// Q4_1's minimum (zero for Q4_0, and unused).
    pub(crate) m: [f16; TILE_N],
}

/// Q8_0 weights for 16 columns x one block of 32 inputs. Aligned to 32 bytes only, so that no
/// padding inflates the bytes streamed per token (544, not 576).
#[derive(Clone)]
#[repr(C, align(32))]
pub(crate) struct TileQ8 {
    /// `qs[(g * 16 + c) * 4 + j]` = `q[4g + j] + 128` of column `c` (g in 0..8).
    pub(crate) qs: [u8; 8 * TILE_N * 4],
    pub(crate) d: [f16; TILE_N],
}

const _: () = assert!(std::mem::size_of::<TileQ4>() == 320);
const _: () = assert!(std::mem::size_of::<TileQ8>() == 544);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
}

enum Packed {
    /// `[column tile][block]`.
    Q4(Vec<TileQ4>),
    Q8(Vec<TileQ8>),
}

/// A quantized `[n, k]` weight (`y = x W^T`), repacked for batched matmul.
pub struct QWeight {
    kind: Kind,
    n: usize,
    k: usize,
    packed: Packed,
}

/// Activation rows quantized to blocks of 32 with ggml's Q8_1 numerics, ready for any
/// [`QWeight`] with the same `k`: quantize once, multiply by several weights (q/k/v, gate/up).
///
/// Layout: `qs` is `[m][nb][32]`, the rest `[m][nb]` (`nb = k / 32`).
#[derive(Default)]
pub struct QInput {
    pub(crate) m: usize,
    pub(crate) nb: usize,
    pub(crate) qs: Vec<i8>,
    /// `f16(d)` as f32.
    pub(crate) d: Vec<f32>,
    /// `f16(f16(sum q) * f16(d))` as f32 (ggml's Q8_1 `s`).
    pub(crate) s: Vec<f32>,
    /// `sum q`, exact.
    pub(crate) sum: Vec<i32>,
}

/// Below this many blocks, quantizing on the calling thread beats waking the pool.
const PARALLEL_QUANTIZE_BLOCKS: usize = 512;

impl QInput {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Input features per row.
    pub fn k(&self) -> usize {
        self.nb * BLOCK
    }

    /// Quantizes `x` (`m x k`, row-major; `k` a multiple of 32), reusing this buffer's memory.
    /// The result is the same on every instruction set.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        self.quantize_with(Isa::best(), x, m, k)
    }

    pub(crate) fn quantize_with(&mut self, isa: Isa, x: &[f32], m: usize, k: usize) {
        assert!(isa.is_available(), "qmatmul: {isa:?} is not available here");
        assert!(
            k.is_multiple_of(BLOCK),
            "qmatmul: k = {k} is not a multiple of {BLOCK}"
        );
        assert_eq!(x.len(), m * k, "qmatmul: x is not {m} x {k}");
        let nb = k / BLOCK;
        self.m = m;
        self.nb = nb;
        let blocks = m * nb;
        // Grow only: the buffer is reused across calls.
        if self.d.len() < blocks {
            self.qs.resize(blocks * BLOCK, 0);
            self.d.resize(blocks, 0.0);
            self.s.resize(blocks, 0.0);
            self.sum.resize(blocks, 0);
        }
        let dst = BlockWriter {
            qs: self.qs.as_mut_ptr(),
            d: self.d.as_mut_ptr(),
            s: self.s.as_mut_ptr(),
            sum: self.sum.as_mut_ptr(),
        };
        // SAFETY: the buffers hold `blocks` blocks and `x` as many (asserted above); each block
        // index goes to exactly one call, so no two threads write the same block.
        if blocks < PARALLEL_QUANTIZE_BLOCKS {
            unsafe { dst.quantize(isa, x, 0..blocks) }
        } else {
            crate::pool::pool()
                .execute_chunked(blocks, |range| unsafe { dst.quantize(isa, x, range) });
        }
    }
}

/// Raw pointers into a [`QInput`]'s buffers, so that pool workers can fill disjoint blocks.
struct BlockWriter {
    qs: *mut i8,
    d: *mut f32,
    s: *mut f32,
    sum: *mut i32,
}

// SAFETY: writers only touch the blocks they are given, which never overlap (see `quantize`).
unsafe impl Sync for BlockWriter {}

impl BlockWriter {
    /// # Safety
    /// `isa` is available, `x` and the buffers hold every block of `range`, and nothing else
    /// accesses those blocks meanwhile.
    unsafe fn quantize(&self, isa: Isa, x: &[f32], range: std::ops::Range<usize>) {
        let mut range = range;
        // Whole groups of blocks first, their scales computed side by side (1.7x faster per
        // block); a group that needs the scalar path, and the tail, go block by block below.
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Vnni {
            while range.len() >= x86::QUANTIZE_GROUP {
                let i = range.start;
                assert!(x.len() >= (i + x86::QUANTIZE_GROUP) * BLOCK);
                let (q, d, s, sum) = (
                    self.qs.add(i * BLOCK),
                    self.d.add(i),
                    self.s.add(i),
                    self.sum.add(i),
                );
                if !x86::quantize_16_blocks(x.as_ptr().add(i * BLOCK), q, d, s, sum) {
                    break;
                }
                range.start += x86::QUANTIZE_GROUP;
            }
        }
        for i in range {
            let x: &[f32; BLOCK] = x[i * BLOCK..(i + 1) * BLOCK].try_into().unwrap();
            let q = &mut *(self.qs.add(i * BLOCK) as *mut [i8; BLOCK]);
            let (d, s, sum) = match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni => {
                    x86::quantize_block(x, q).unwrap_or_else(|| quantize_block(x, q))
                }
                _ => quantize_block(x, q),
            };
            *self.d.add(i) = d;
            *self.s.add(i) = s;
            *self.sum.add(i) = sum;
        }
    }
}

/// candle's `BlockQ8_1::from_float` (ggml's `quantize_row_q8_1_ref`) for one block; returns
/// (`d`, `s`, integer sum) with `d` and `s` rounded to f16 as stored there.
#[inline]
fn quantize_block(x: &[f32; BLOCK], q: &mut [i8; BLOCK]) -> (f32, f32, i32) {
    let mut amax = 0f32;
    for &v in x {
        amax = amax.max(v.abs());
    }
    let d = amax / 127.0;
    let id = if d != 0f32 { 1. / d } else { 0. };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = f32::round(v * id) as i8;
        sum += *q as i32;
    }
    scales(d, sum)
}

/// The stored `d` and `s` of a block with scale `d` and quantized sum `sum`.
#[inline]
fn scales(d: f32, sum: i32) -> (f32, f32, i32) {
    let d16 = f16::from_f32(d);
    let s16 = f16::from_f32(sum as f32) * d16;
    (d16.to_f32(), s16.to_f32(), sum)
}

thread_local! {
    static SCRATCH: RefCell<QInput> = RefCell::new(QInput::default());
}

/// Runs `f` on this thread's reusable activation buffer.
fn with_scratch<R>(f: impl FnOnce(&mut QInput) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut input) => f(&mut input),
        // Re-entered on this thread (not expected): use a fresh buffer.
        Err(_) => f(&mut QInput::default()),
    })
}

impl QWeight {
    /// Repacks a `[n, k]` CPU tensor of type Q4_0, Q4_1 or Q8_0; `None` for other types or
    /// shapes (keep those on candle's `QMatMul`).
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            _ => return Ok(None),
        };
        if !matches!(t.device(), Device::Cpu) {
            return Ok(None);
        }
        let Ok((n, k)) = t.shape().dims2() else {
            return Ok(None);
        };
        if k == 0 || n == 0 || !k.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let data = t.data()?;
        let block_bytes = t.dtype().type_size();
        let nb = k / BLOCK;
        if data.len() != n * nb * block_bytes {
            candle_core::bail!(
                "qmatmul: {:?} tensor {n}x{k} has {} bytes, expected {}",
                t.dtype(),
                data.len(),
                n * nb * block_bytes
            );
        }
        Ok(Some(Self::from_blocks(kind, n, k, &data)))
    }

    /// `data`: `n` rows of `k / 32` ggml blocks of `kind`.
    fn from_blocks(kind: Kind, n: usize, k: usize, data: &[u8]) -> Self {
        let nb = k / BLOCK;
        let n_tiles = n.div_ceil(TILE_N);
        let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
        let packed = match kind {
            Kind::Q4_0 | Kind::Q4_1 => {
                let (block_bytes, qs_at) = match kind {
                    Kind::Q4_0 => (18, 2),
                    _ => (20, 4),
                };
                let mut tiles = Vec::with_capacity(n_tiles * nb);
                for t in 0..n_tiles {
                    for b in 0..nb {
                        // Columns past `n` stay zero (scales 0) and are never written out.
                        let mut tile = TileQ4 {
                            qs: [0; 4 * TILE_N * 4],
                            d: [f16::ZERO; TILE_N],
                            m: [f16::ZERO; TILE_N],
                        };
                        for c in 0..TILE_N.min(n - t * TILE_N) {
                            let at = ((t * TILE_N + c) * nb + b) * block_bytes;
                            let blk = &data[at..at + block_bytes];
                            tile.d[c] = f16_at(blk, 0);
                            if kind == Kind::Q4_1 {
                                tile.m[c] = f16_at(blk, 2);
                            }
                            let qs = &blk[qs_at..qs_at + BLOCK / 2];
                            for g in 0..4 {
                                for j in 0..4 {
                                    tile.qs[(g * TILE_N + c) * 4 + j] = qs[4 * g + j];
                                }
                            }
                        }
                        tiles.push(tile);
                    }
                }
                Packed::Q4(tiles)
            }
            Kind::Q8_0 => {
                let block_bytes = 34;
                let mut tiles = Vec::with_capacity(n_tiles * nb);
                for t in 0..n_tiles {
                    for b in 0..nb {
                        let mut tile = TileQ8 {
                            // q = 0 (stored 128) in the padding columns.
                            qs: [128; 8 * TILE_N * 4],
                            d: [f16::ZERO; TILE_N],
                        };
                        for c in 0..TILE_N.min(n - t * TILE_N) {
                            let at = ((t * TILE_N + c) * nb + b) * block_bytes;
                            let blk = &data[at..at + block_bytes];
                            tile.d[c] = f16_at(blk, 0);
                            let qs = &blk[2..2 + BLOCK];
                            for g in 0..8 {
                                for j in 0..4 {
                                    tile.qs[(g * TILE_N + c) * 4 + j] = qs[4 * g + j] ^ 0x80;
                                }
                            }
                        }
                        tiles.push(tile);
                    }
                }
                Packed::Q8(tiles)
            }
        };
        Self { kind, n, k, packed }
    }

    /// The ggml type of the weights.
    pub fn dtype(&self) -> GgmlDType {
        match self.kind {
            Kind::Q4_0 => GgmlDType::Q4_0,
            Kind::Q4_1 => GgmlDType::Q4_1,
            Kind::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// Output features (rows of the weight).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held by the packed weights.
    pub fn size_in_bytes(&self) -> usize {
        match &self.packed {
            Packed::Q4(t) => std::mem::size_of_val(t.as_slice()),
            Packed::Q8(t) => std::mem::size_of_val(t.as_slice()),
        }
    }

    /// `out = x W^T`: `x` is `m x k` row-major, `out` is `m x n`, on the fastest instruction set.
    ///
    /// # Panics
    /// If `x` / `out` are not `m x k` / `m x n`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_with(Isa::best(), x, m, out)
    }

    /// [`QWeight::matmul`] on a given instruction set (all give bit-identical results).
    ///
    /// # Panics
    /// If `isa` is not available on this machine, or if `x` / `out` are not `m x k` / `m x n`.
    pub fn matmul_with(&self, isa: Isa, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "qmatmul: x is not {m} x {}", self.k);
        with_scratch(|input| {
            input.quantize_with(isa, x, m, self.k);
            self.matmul_quantized_with(isa, input, out)
        })
    }

    /// `out = x W^T` for activations already quantized (shared by several weights).
    ///
    /// # Panics
    /// If `input` does not have `k` columns or `out` is not `input.rows() x n`.
    pub fn matmul_quantized(&self, input: &QInput, out: &mut [f32]) {
        self.matmul_quantized_with(Isa::best(), input, out)
    }

    /// [`QWeight::matmul_quantized`] on a given instruction set.
    ///
    /// # Panics
    /// As [`QWeight::matmul_quantized`], or if `isa` is not available on this machine.
    pub fn matmul_quantized_with(&self, isa: Isa, input: &QInput, out: &mut [f32]) {
        self.check(isa, input, out);
        run_many(isa, &[(self, OutPtr(out.as_mut_ptr()))], input)
    }

    /// `outs[i] = x W_i^T` for every weight, in one pass over the thread pool (one wake-up and
    /// barrier instead of one per weight): for q/k/v or gate/up, which share their input.
    ///
    /// # Panics
    /// As [`QWeight::matmul_quantized`], for each weight and its output.
    pub fn matmul_quantized_many(weights: &[&QWeight], input: &QInput, outs: &mut [&mut [f32]]) {
        assert_eq!(weights.len(), outs.len(), "qmatmul: one output per weight");
        let isa = Isa::best();
        let jobs: Vec<(&QWeight, OutPtr)> = weights
            .iter()
            .zip(outs.iter_mut())
            .map(|(w, out)| {
                w.check(isa, input, out);
                (*w, OutPtr(out.as_mut_ptr()))
            })
            .collect();
        run_many(isa, &jobs, input)
    }

    /// The preconditions of [`run_many`] for this weight and output.
    fn check(&self, isa: Isa, input: &QInput, out: &[f32]) {
        assert!(isa.is_available(), "qmatmul: {isa:?} is not available here");
        let m = input.m;
        assert_eq!(
            input.k(),
            self.k,
            "qmatmul: input has k = {}, weight {}",
            input.k(),
            self.k
        );
        assert!(
            input.d.len() >= m * input.nb
                && input.s.len() >= m * input.nb
                && input.sum.len() >= m * input.nb
                && input.qs.len() >= m * self.k,
            "qmatmul: input buffers too short"
        );
        assert_eq!(
            out.len(),
            m * self.n,
            "qmatmul: out is not {m} x {}",
            self.n
        );
    }

    /// `x W^T` for an f32 CPU tensor `[.., k]`, giving `[.., n]`: a drop-in for
    /// `QMatMul::forward`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(Self::forward_shared(&[self], x)?.pop().unwrap())
    }

    /// `[x W^T for W in weights]`, quantizing `x` once for all of them (e.g. q/k/v or gate/up,
    /// which read the same normalized hidden state). The weights must share `k`.
    pub fn forward_shared(weights: &[&QWeight], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let Some(k) = weights.first().map(|w| w.k) else {
            return Ok(Vec::new());
        };
        let dims = x.dims();
        if dims.last() != Some(&k) || weights.iter().any(|w| w.k != k) {
            candle_core::bail!("qmatmul: input {dims:?} does not end in every weight's k");
        }
        if x.dtype() != candle_core::DType::F32 {
            candle_core::bail!("qmatmul: input must be f32, got {:?}", x.dtype());
        }
        let m = x.elem_count() / k;
        let outs = crate::tensor_util::with_f32_slice(x, |x| {
            with_scratch(|input| {
                input.quantize(x, m, k);
                let mut outs: Vec<Vec<f32>> = weights.iter().map(|w| vec![0f32; m * w.n]).collect();
                let mut slices: Vec<&mut [f32]> =
                    outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                Self::matmul_quantized_many(weights, input, &mut slices);
                outs
            })
        })?;
        outs.into_iter()
            .zip(weights)
            .map(|(out, w)| {
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().unwrap() = w.n;
                Tensor::from_vec(out, out_dims, x.device())
            })
            .collect()
    }

    /// Work item `item` (row chunk major, then column tile) of `x W^T` into `out`.
    ///
    /// # Safety
    /// The preconditions checked by [`QWeight::check`] hold for `input` and the `m x n` output
    /// at `out`; `item < row_chunks * n_tiles`; no one else accesses this item's elements.
    unsafe fn run_item(&self, isa: Isa, input: &QInput, item: usize, out: *mut f32) {
        let (m, n, nb) = (input.m, self.n, input.nb);
        let n_tiles = n.div_ceil(TILE_N);
        let (chunk, tile) = (item / n_tiles, item % n_tiles);
        let rows = chunk * ROW_CHUNK..m.min((chunk + 1) * ROW_CHUNK);
        let col0 = tile * TILE_N;
        let cols = TILE_N.min(n - col0);
        let tiles = tile * nb..(tile + 1) * nb;
        let dst = out.add(col0);
        match &self.packed {
            Packed::Q4(t) => tile_q4(isa, self.kind, &t[tiles], input, rows, dst, n, cols),
            Packed::Q8(t) => tile_q8(isa, &t[tiles], input, rows, dst, n, cols),
        }
    }
}

/// Runs every (weight, output) job on `input`, all their work items shared over our pool (`crate::pool`).
/// Callers have run [`QWeight::check`] on each job, and the outputs do not overlap.
fn run_many(isa: Isa, jobs: &[(&QWeight, OutPtr)], input: &QInput) {
    let row_chunks = input.m.div_ceil(ROW_CHUNK);
    let items = |w: &QWeight| row_chunks * w.n.div_ceil(TILE_N);
    let total = jobs.iter().map(|(w, _)| items(w)).sum();
    let work = |range: std::ops::Range<usize>| {
        for mut item in range {
            for (w, out) in jobs {
                if item < items(w) {
                    // SAFETY: checked preconditions (see above); `item` is in range for `w`;
                    // each item (a row chunk x column tile of one output) goes to exactly one
                    // worker, so no two workers write the same element.
                    unsafe { w.run_item(isa, input, item, out.0) };
                    break;
                }
                item -= items(w);
            }
        }
    };
    crate::pool::pool().execute_chunked(total, work);
}

struct OutPtr(*mut f32);
// SAFETY: workers write disjoint elements (see `run_many`).
unsafe impl Sync for OutPtr {}

/// Rows that share one decoded weight tile (their accumulators stay in registers). 8 measured
/// no faster on Zen 5: the `vpdpbusd` and f32 pipes, not the nibble decoding, are the limit.
pub const ROW_TILE: usize = 4;

/// How many rows the next kernel call takes: [`ROW_TILE`], or 1 for the tail rows (the kernels
/// for every width do the same per-row arithmetic, so this choice never changes a result).
#[inline]
fn next_take(left: usize) -> usize {
    if left >= ROW_TILE {
        ROW_TILE
    } else {
        1
    }
}

/// One column tile of a Q4 weight for `rows`, in row tiles of [`ROW_TILE`] rows, then single rows.
///
/// # Safety
/// `isa` is available; `tiles.len() == acts.nb`; `rows.end <= acts.m`; `out + r * n + c` is
/// valid for writes for every row `r` in `rows` and `c < cols <= 16`, and no one else accesses
/// those elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_q4(
    isa: Isa,
    kind: Kind,
    tiles: &[TileQ4],
    acts: &QInput,
    rows: std::ops::Range<usize>,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    assert!(tiles.len() == acts.nb && rows.end <= acts.m && cols <= TILE_N);
    let min = kind == Kind::Q4_1;
    let mut r = rows.start;
    while r < rows.end {
        let take = next_take(rows.end - r);
        let dst = out.add(r * n);
        match (isa, min, take) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, true, ROW_TILE) => {
                x86::q4_vnni::<ROW_TILE, true>(tiles, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, true, _) => x86::q4_vnni::<1, true>(tiles, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, false, ROW_TILE) => {
                x86::q4_vnni::<ROW_TILE, false>(tiles, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, false, _) => x86::q4_vnni::<1, false>(tiles, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, true, ROW_TILE) => {
                x86::q4_avx2::<ROW_TILE, true>(tiles, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, true, _) => x86::q4_avx2::<1, true>(tiles, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, false, ROW_TILE) => {
                x86::q4_avx2::<ROW_TILE, false>(tiles, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, false, _) => x86::q4_avx2::<1, false>(tiles, acts, r, dst, n, cols),
            _ => scalar::q4(tiles, acts, r..r + take, min, dst, n, cols),
        }
        r += take;
    }
}

/// [`tile_q4`] for Q8_0.
///
/// # Safety
/// As [`tile_q4`].
unsafe fn tile_q8(
    isa: Isa,
    tiles: &[TileQ8],
    acts: &QInput,
    rows: std::ops::Range<usize>,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    assert!(tiles.len() == acts.nb && rows.end <= acts.m && cols <= TILE_N);
    let mut r = rows.start;
    while r < rows.end {
        let take = next_take(rows.end - r);
        let dst = out.add(r * n);
        match (isa, take) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, ROW_TILE) => x86::q8_vnni::<ROW_TILE>(tiles, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, _) => x86::q8_vnni::<1>(tiles, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, ROW_TILE) => x86::q8_avx2::<ROW_TILE>(tiles, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, _) => x86::q8_avx2::<1>(tiles, acts, r, dst, n, cols),
            _ => scalar::q8(tiles, acts, r..r + take, dst, n, cols),
        }
        r += take;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks with every kind of value: random magnitudes, exact rounding ties, zeros,
    /// subnormals, and (last) NaN and infinities. Ties and zeros come first too, where the
    /// 16-block AVX-512 path takes them (the last group, holding NaN, falls back block by block).
    fn blocks() -> Vec<f32> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut ties: Vec<f32> = (0..BLOCK).map(|j| j as f32 * 4.0 - 63.5).collect();
        ties[0] = 127.0;
        let mut x = ties.clone();
        x.extend(ties.iter().map(|v| -v));
        x.extend([0.0; BLOCK]);
        // d = 0.75 and the sum 31 * 127 + 2, odd and above 2048: it rounds when stored as f16,
        // and s differs if that rounding is skipped.
        x.extend([95.25; BLOCK - 1]);
        x.push(1.5);
        for b in 0..4000 {
            let scale = f32::powi(2.0, (b % 60) - 40);
            for _ in 0..BLOCK {
                x.push(((next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale);
            }
        }
        // amax 127 gives d = 1: halves are exact ties.
        x.extend(&ties);
        x.extend(ties.iter().map(|v| -v));
        x.extend([0.0; BLOCK]);
        x.extend((0..BLOCK).map(|j| f32::from_bits(j as u32 * 1000 + 1)));
        x.extend((0..BLOCK).map(|j| if j == 5 { f32::NAN } else { j as f32 }));
        x.extend((0..BLOCK).map(|j| if j == 20 { f32::INFINITY } else { -(j as f32) }));
        x
    }

    #[test]
    fn quantization_matches_candle_q8_1_on_every_isa() {
        let x = blocks();
        let m = x.len() / BLOCK;
        // candle's quantizer on finite blocks (its f16 `s` of a NaN block is NaN).
        let finite = (m - 2) * BLOCK;
        let t = Tensor::from_slice(&x[..finite], (m - 2, BLOCK), &Device::Cpu).unwrap();
        let bytes = QTensor::quantize(&t, GgmlDType::Q8_1)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        let mut scalar = QInput::default();
        scalar.quantize_with(Isa::Scalar, &x, m, BLOCK);
        for b in 0..m - 2 {
            let blk = &bytes[b * 36..(b + 1) * 36];
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let s = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
            assert_eq!(scalar.d[b].to_bits(), d.to_bits(), "block {b}");
            assert_eq!(scalar.s[b].to_bits(), s.to_bits(), "block {b}");
            let q: Vec<i8> = blk[4..].iter().map(|&v| v as i8).collect();
            assert_eq!(&scalar.qs[b * BLOCK..(b + 1) * BLOCK], &q[..], "block {b}");
        }
        for isa in Isa::available() {
            let mut acts = QInput::default();
            acts.quantize_with(isa, &x, m, BLOCK);
            let first = acts.qs.iter().zip(&scalar.qs).position(|(a, b)| a != b);
            assert_eq!(first, None, "{isa:?}: first differing value");
            assert_eq!(acts.sum, scalar.sum, "{isa:?}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&acts.d), bits(&scalar.d), "{isa:?}");
            assert_eq!(bits(&acts.s), bits(&scalar.s), "{isa:?}");
        }
    }
}
