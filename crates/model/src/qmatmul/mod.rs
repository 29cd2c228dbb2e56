//! Batched CPU matmul for GGUF's Q4_0, Q4_1, Q8_0, Q4_K and Q6_K weights (and Q5_0, widened to
//! the Q8_0 blocks of the same values at load), and for FP8 E4M3 weights (`fp8`): each weight
//! block is decoded once and applied to every row of the batch, so that continuous batching
//! pays off.
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
//! # The k-quants (Q4_K, Q6_K): Q8_K activations, one f32 epilogue per 256 inputs
//!
//! As in ggml, Q4_K and Q6_K weights multiply activations quantized to Q8_K super-blocks of 256
//! (`iscale = -127 / max`, f32 scale, sums of 16 codes), computed exactly as candle's
//! `BlockQ8K::from_float` (tested byte for byte). Per (row, column, super-block) everything up to
//! one f32 epilogue is exact integer arithmetic: the sub-block dot products `S_j` (`vpdpbusd` on
//! the unsigned codes), times the sub-block scales (`vpmulld`), summed into `si`; Q4_K's
//! minimums give `mi = sum_j m_j * (sum of the row's 32 codes of sub-block j)` (`vpdpwssd` on
//! pairs), Q6_K's offset of 32 likewise `32 * sum_j sc_j * (sum of 16 codes)`. Then
//!
//! ```text
//! Q4_K:  acc += (d_w * d_x) * si - (dmin_w * d_x) * mi
//! Q6_K:  acc += (d_w * d_x) * si            (si with the offset already taken out)
//! ```
//!
//! lane-wise, no FMA, super-blocks in order: every ISA path is bit-identical and results are
//! batch-invariant, as above. This is not candle's arithmetic (its repacked x86 kernel and its
//! AVX `vec_dot` round per sub-block, with FMAs, and differ from each other: candle's Q6_K
//! results for a row change between m = 1 and m > 1), so against candle the tests hold a
//! rounding bound (`tests/qmatmul.rs`), not bit-equality. The tiles keep the file's bytes (Q4_K
//! unpacks its 12 bytes of 6-bit scales and minimums to 16 at load); Q6_K's 4 + 2 bit codes are
//! joined per tile (a shift and a `vpternlogd` per register), shared by the row tile.
//!
//! # Integer checkpoints: zero points and input orders
//!
//! GPTQ / AWQ / compressed-tensors 4-bit weights (`crate::quantized_checkpoint`) are
//! `d * (q - z)` per column and group: they use Q4_0's tiles with the per-column zero point `z`
//! (an integer 0..=16) where Q4_1 keeps its minimum, and Q4_0's arithmetic with `z` in place of
//! 8, the block's integer sum starting from `-z * sum(x)` (exact in i32):
//!
//! ```text
//! zero point:  acc += ((sumi - z * sum_x) as f32 * d_w) * d_x
//! ```
//!
//! Groups of 32, 64 or 128 inputs repeat their scale and zero point in each block of 32; a
//! symmetric matrix (`z = 8` everywhere) runs as Q4_0. int8 weights (compressed-tensors
//! `int-quantized`) are Q8_0 tiles with the channel's scale in every block. Act-order weights
//! carry an input order ([`QWeight::input_order`]): each activation row is gathered into it
//! before it is quantized, so their groups are contiguous blocks again; weights of the same
//! order (q/k/v, gate/up) share one gathered and quantized input.
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
//! # Files
//!
//! `isa` detects the instruction set; `layout` holds the data the kernels read (weight tiles,
//! quantized activation rows); `pack` turns GGUF blocks into tiles ([`QWeight::from_qtensor`]);
//! `quantize` turns activation rows into Q8_1 blocks and Q8_K super-blocks
//! ([`QInput::quantize_for`]); this file holds the
//! entry points (`matmul*`, `forward*`) and splits their work over the pool; `x86` and `scalar`
//! are the kernels, `scalar` also the reference arithmetic that the others reproduce. `fp8`
//! holds FP8 E4M3 weights whole ([`QWeight::from_e4m3`]: packing, bf16 / E4M3 activation rows,
//! its kernels; see its own documentation for the numerics).
//!
//! # Use
//!
//! ```ignore
//! // at load: GGUF Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q4_K / Q6_K tensors get packed, the rest stay
//! // on candle
//! let w = match QWeight::from_qtensor(&qtensor)? {
//!     Some(packed) => LinearWeight::Packed(packed),
//!     None => LinearWeight::Candle(QMatMul::from_qtensor(qtensor)?),
//! };
//! // forward: [.., k] -> [.., n], like QMatMul::forward
//! let y = packed.forward(&x)?;
//! // q, k and v (or gate and up) read the same input: quantize it once, one pool pass
//! let qkv = QWeight::forward_shared(&[&q_w, &k_w, &v_w], &h)?;
//! ```

mod fp8;
mod isa;
mod layout;
mod pack;
mod quantize;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::Tensor;

pub use isa::Isa;
pub use layout::{Fp8Activations, QInput, BLOCK, TILE_N};
pub use pack::QWeight;

use crate::tensor_util::with_f32_slice;
use layout::{q4_mode, TileQ4, TileQ4K, TileQ6K, TileQ8};
use pack::{same_order, Kind, Packed};
use quantize::with_scratch;

/// Rows per work item: a worker walks the column tiles with one chunk of rows. Smaller chunks
/// (to keep the activations in L1 for large k) measured slower: 64 rows re-read from L2 cost less
/// than re-reading the weight tiles more often.
const ROW_CHUNK: usize = 64;

impl QWeight {
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
            let (forms, order) = (self.activation_forms(), self.input_order());
            input.quantize_with(isa, x, m, self.k, forms, order);
            self.matmul_quantized_with(isa, input, out)
        })
    }

    /// `out = x W^T` for activations already quantized, on `isa`.
    ///
    /// # Panics
    /// If `isa` is not available on this machine, `input` does not have `k` columns or `out`
    /// is not `input.rows() x n`.
    fn matmul_quantized_with(&self, isa: Isa, input: &QInput, out: &mut [f32]) {
        self.check(isa, input, out);
        run_many(isa, &[(self, OutPtr(out.as_mut_ptr()))], input)
    }

    /// `outs[i] = x W_i^T` for every weight, in one pass over the thread pool (one wake-up and
    /// barrier instead of one per weight): for q/k/v or gate/up, which share their input.
    ///
    /// # Panics
    /// If `input` does not have every weight's `k` columns, or an output is not
    /// `input.rows() x n` of its weight.
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
            same_order(input.order.as_ref(), self.input_order()),
            "qmatmul: input quantized in another input-channel order than the weight's"
        );
        let needed = self.activation_forms();
        assert!(
            input.forms.covers(needed),
            "qmatmul: input quantized as {:?}, the weight needs {needed:?}",
            input.forms
        );
        let (nb, nsb) = (input.nb, input.nsb());
        let q8k = &input.q8k;
        assert!(
            !needed.q8_1
                || (input.d.len() >= m * nb
                    && input.s.len() >= m * nb
                    && input.sum.len() >= m * nb
                    && input.qs.len() >= m * self.k),
            "qmatmul: input buffers too short"
        );
        let fp8_rows =
            |rows: &layout::Bf16Rows| rows.values.len() >= m * self.k && rows.scales.len() >= m;
        assert!(
            (!needed.bf16 || fp8_rows(&input.bf16)) && (!needed.e4m3 || fp8_rows(&input.e4m3)),
            "qmatmul: input buffers too short"
        );
        assert!(
            !needed.q8k
                || (q8k.d.len() >= m * nsb
                    && q8k.bsum16.len() >= m * nsb * 16
                    && q8k.bsum32.len() >= m * nsb * 8
                    && q8k.qs.len() >= m * self.k),
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
        if weights.iter().any(|w| !w.shares_input_with(weights[0])) {
            candle_core::bail!("qmatmul: weights with different input-channel orders");
        }
        if x.dtype() != candle_core::DType::F32 {
            candle_core::bail!("qmatmul: input must be f32, got {:?}", x.dtype());
        }
        let m = x.elem_count() / k;
        let outs = with_f32_slice(x, |x| {
            with_scratch(|input| {
                input.quantize_for(weights, x, m);
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
        let (m, n) = (input.m, self.n);
        let nb = self.k / self.kind.block_len();
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
            Packed::Q4K(t) => tile_k(isa, KTiles::Q4K(&t[tiles]), input, rows, dst, n, cols),
            Packed::Q6K(t) => tile_k(isa, KTiles::Q6K(&t[tiles]), input, rows, dst, n, cols),
            Packed::Fp8(t) => {
                let acts = match t.activations {
                    Fp8Activations::Bf16 => &input.bf16,
                    Fp8Activations::E4m3PerToken => &input.e4m3,
                };
                let scales = &t.scales[col0..col0 + TILE_N];
                fp8::tile_fp8(isa, &t.tiles[tiles], scales, acts, rows, dst, n, cols)
            }
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
    match kind.q4_mode() {
        q4_mode::MIN => tile_q4_as::<{ q4_mode::MIN }>(isa, tiles, acts, rows, out, n, cols),
        q4_mode::ZERO => tile_q4_as::<{ q4_mode::ZERO }>(isa, tiles, acts, rows, out, n, cols),
        _ => tile_q4_as::<{ q4_mode::OFFSET8 }>(isa, tiles, acts, rows, out, n, cols),
    }
}

/// [`tile_q4`] for one [`q4_mode`].
///
/// # Safety
/// As [`tile_q4`].
unsafe fn tile_q4_as<const MODE: u8>(
    isa: Isa,
    tiles: &[TileQ4],
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
            (Isa::Avx512Vnni, ROW_TILE) => {
                x86::q4_vnni::<ROW_TILE, MODE>(tiles, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, _) => x86::q4_vnni::<1, MODE>(tiles, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, ROW_TILE) => x86::q4_avx2::<ROW_TILE, MODE>(tiles, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, _) => x86::q4_avx2::<1, MODE>(tiles, acts, r, dst, n, cols),
            _ => scalar::q4(tiles, acts, r..r + take, MODE, dst, n, cols),
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

/// The tiles of one column tile of a k-quant weight.
#[derive(Clone, Copy)]
enum KTiles<'a> {
    Q4K(&'a [TileQ4K]),
    Q6K(&'a [TileQ6K]),
}

/// [`tile_q4`] for Q4_K and Q6_K.
///
/// # Safety
/// As [`tile_q4`], with one tile per super-block (`acts.nsb()`) and the Q8_K form in `acts`.
unsafe fn tile_k(
    isa: Isa,
    tiles: KTiles,
    acts: &QInput,
    rows: std::ops::Range<usize>,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let len = match tiles {
        KTiles::Q4K(t) => t.len(),
        KTiles::Q6K(t) => t.len(),
    };
    assert!(len == acts.nsb() && rows.end <= acts.m && cols <= TILE_N);
    let mut r = rows.start;
    while r < rows.end {
        let take = next_take(rows.end - r);
        let dst = out.add(r * n);
        match (isa, tiles, take) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, KTiles::Q4K(t), ROW_TILE) => {
                x86::q4k_vnni::<ROW_TILE>(t, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, KTiles::Q4K(t), _) => x86::q4k_vnni::<1>(t, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, KTiles::Q6K(t), ROW_TILE) => {
                x86::q6k_vnni::<ROW_TILE>(t, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512Vnni, KTiles::Q6K(t), _) => x86::q6k_vnni::<1>(t, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, KTiles::Q4K(t), ROW_TILE) => {
                x86::q4k_avx2::<ROW_TILE>(t, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, KTiles::Q4K(t), _) => x86::q4k_avx2::<1>(t, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, KTiles::Q6K(t), ROW_TILE) => {
                x86::q6k_avx2::<ROW_TILE>(t, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, KTiles::Q6K(t), _) => x86::q6k_avx2::<1>(t, acts, r, dst, n, cols),
            (_, KTiles::Q4K(t), _) => scalar::q4k(t, acts, r..r + take, dst, n, cols),
            (_, KTiles::Q6K(t), _) => scalar::q6k(t, acts, r..r + take, dst, n, cols),
        }
        r += take;
    }
}
