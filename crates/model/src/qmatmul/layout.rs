//! The memory layouts that the packer, the activation quantizer and the kernels share: weight
//! tiles of 16 columns by one block of 32 inputs ([`TileQ4`], [`TileQ8`]) or by one super-block
//! of 256 ([`TileQ4K`], [`TileQ6K`]), filled by `pack`; activation rows quantized to blocks of 32
//! and, for the k-quants, to super-blocks of 256 ([`QInput`]; filled by `quantize`); FP8 tiles
//! and bf16 activation rows ([`TileFp8`], [`Bf16Rows`]; filled by `fp8`). Data only,
//! so that every other file of the module can use them without one importing another back.

use half::f16;

/// Inputs per quantization block (Q4_0, Q4_1, Q8_0 and the activations' Q8_1 all use 32).
pub const BLOCK: usize = 32;
/// Inputs per k-quant super-block (Q4_K, Q6_K, and the activations' Q8_K).
pub const SUPER_BLOCK: usize = 256;
/// Output columns per tile: one 512-bit register of i32 / f32 lanes.
pub const TILE_N: usize = 16;

/// How a Q4 kernel turns a block's integer dot product into values: a const parameter of the
/// kernels, one per [`TileQ4`] reading.
pub(crate) mod q4_mode {
    /// Q4_0: codes offset by 8, `d * (q - 8)`.
    pub(crate) const OFFSET8: u8 = 0;
    /// Q4_1: `d * q + m`.
    pub(crate) const MIN: u8 = 1;
    /// An integer zero point per column and block (GPTQ, AWQ, compressed-tensors asymmetric):
    /// `d * (q - z)`, with `z` stored in the tile's `m` (an integer 0..=16, exact in f16).
    pub(crate) const ZERO: u8 = 2;
}

/// Q4_0 / Q4_1 / zero-point weights for 16 columns x one block of 32 inputs.
#[derive(Clone)]
#[repr(C, align(64))]
pub(crate) struct TileQ4 {
    /// `qs[(g * 16 + c) * 4 + j]` = byte `4g + j` of column `c`'s block (g in 0..4): low nibble
    /// is input `4g + j`, high nibble input `16 + 4g + j`.
    pub(crate) qs: [u8; 4 * TILE_N * 4],
    pub(crate) d: [f16; TILE_N],
    /// Q4_1's minimum; the zero point for [`q4_mode::ZERO`] weights; zero for Q4_0, and unused.
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

/// Q4_K weights for 16 columns x one super-block of 256 inputs: sub-block `j` (32 inputs) of a
/// column has the value `d * scales[j] * q - dmin * mins[j]`, q in 0..16.
#[derive(Clone)]
#[repr(C, align(64))]
pub(crate) struct TileQ4K {
    /// `qs[((h * 8 + g) * 16 + c) * 4 + j]` = byte `32h + 4g + j` of column `c`'s nibbles (h in
    /// 0..4, g in 0..8): low nibble is input `64h + 4g + j` (sub-block `2h`), high nibble input
    /// `64h + 32 + 4g + j` (sub-block `2h + 1`), as in ggml.
    pub(crate) qs: [u8; 8 * 4 * TILE_N * 4],
    /// `scales[j * 16 + c]`: the 6-bit scale of sub-block `j`, unpacked at load.
    pub(crate) scales: [u8; 8 * TILE_N],
    /// `mins[(p * 16 + c) * 2 + i]`: the 6-bit minimum of sub-block `2p + i`, in pairs so that
    /// one `vpdpwssd` applies two of them.
    pub(crate) mins: [u8; 8 * TILE_N],
    pub(crate) d: [f16; TILE_N],
    pub(crate) dmin: [f16; TILE_N],
}

/// Q6_K weights for 16 columns x one super-block of 256 inputs: sub-block `j` (16 inputs) of a
/// column has the value `d * scales[j] * (q - 32)`, q in 0..64 (4 low bits in `ql`, 2 high bits
/// in `qh`, kept apart as in the file so the tile takes the file's 210 bytes per column).
#[derive(Clone)]
#[repr(C, align(32))]
pub(crate) struct TileQ6K {
    /// `ql[(((h * 2 + s) * 8 + g) * 16 + c) * 4 + j]` = low-bits byte `64h + 32s + 4g + j` of
    /// column `c` (h, s in 0..2, g in 0..8): low nibble for input `128h + 32s + 4g + j`, high
    /// nibble for input `128h + 64 + 32s + 4g + j`.
    pub(crate) ql: [u8; 2 * 2 * 8 * TILE_N * 4],
    /// `qh[((h * 8 + g) * 16 + c) * 4 + j]` = high-bits byte `32h + 4g + j` of column `c`: bits
    /// `2t, 2t + 1` for input `128h + 32t + 4g + j` (t in 0..4).
    pub(crate) qh: [u8; 2 * 8 * TILE_N * 4],
    /// `scales[(p * 16 + c) * 2 + i]`: the signed scale of sub-block `2p + i`, in pairs.
    pub(crate) scales: [i8; 16 * TILE_N],
    pub(crate) d: [f16; TILE_N],
}

/// FP8 E4M3 weights for 16 columns x 32 inputs, in pairs of inputs as `vdpbf16ps` multiplies
/// them: one 32-byte run per pair of inputs decodes to one register of 16 (column) lanes of two
/// bf16 each. The per-column scales live beside the tiles ([`Fp8Tiles`]).
#[derive(Clone)]
#[repr(C, align(64))]
pub(crate) struct TileFp8 {
    /// `qs[j * 32 + 2 * c + p]` = the code of input `2j + p` of column `c` (j in 0..16).
    pub(crate) qs: [u8; BLOCK * TILE_N],
}

/// What an FP8 weight multiplies (the numerics are in `qmatmul/fp8.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Activations {
    /// W8A16: activations in bf16.
    Bf16,
    /// W8A8-FP8: activations quantized to E4M3 with a dynamic scale per token (row).
    E4m3PerToken,
}

/// A packed FP8 weight: `[column tile][block of 32 inputs]` tiles and a scale per column.
pub(crate) struct Fp8Tiles {
    pub(crate) tiles: Vec<TileFp8>,
    /// `[n_tiles * 16]`: the columns past `n` have scale 0.
    pub(crate) scales: Vec<f32>,
    pub(crate) activations: Fp8Activations,
}

impl Fp8Tiles {
    pub(crate) fn size_in_bytes(&self) -> usize {
        std::mem::size_of_val(self.tiles.as_slice()) + std::mem::size_of_val(&self.scales[..])
    }

    pub(crate) fn forms(&self) -> Forms {
        Forms {
            bf16: self.activations == Fp8Activations::Bf16,
            e4m3: self.activations == Fp8Activations::E4m3PerToken,
            ..Forms::default()
        }
    }
}

const _: () = assert!(std::mem::size_of::<TileQ4>() == 320);
const _: () = assert!(std::mem::size_of::<TileFp8>() == 512);
// The file's bytes (144 and 210 per column and super-block), plus 4 for Q4_K's scales and
// minimums unpacked from 12 bytes to 16.
const _: () = assert!(std::mem::size_of::<TileQ4K>() == TILE_N * 148);
const _: () = assert!(std::mem::size_of::<TileQ6K>() == TILE_N * 210);
const _: () = assert!(std::mem::size_of::<TileQ8>() == 544);

/// Activation rows quantized to blocks of 32 with ggml's Q8_1 numerics and/or to super-blocks
/// of 256 with its Q8_K numerics, whichever the weights that read them need (the k-quants
/// multiply Q8_K, as in ggml), ready for any [`QWeight`] with the same `k`: quantize once,
/// multiply by several weights (q/k/v, gate/up).
///
/// Layout: `qs` is `[m][nb][32]`, the rest `[m][nb]` (`nb = k / 32`); `q8k` likewise per
/// super-block.
#[derive(Default)]
pub struct QInput {
    pub(crate) m: usize,
    pub(crate) nb: usize,
    /// Which forms the last quantization filled.
    pub(crate) forms: Forms,
    pub(crate) q8k: Q8KRows,
    pub(crate) qs: Vec<i8>,
    /// `f16(d)` as f32.
    pub(crate) d: Vec<f32>,
    /// `f16(f16(sum q) * f16(d))` as f32 (ggml's Q8_1 `s`).
    pub(crate) s: Vec<f32>,
    /// `sum q`, exact.
    pub(crate) sum: Vec<i32>,
    /// The input-channel order the rows were quantized in: `Some(p)` when column `j` holds
    /// input `p[j]` (GPTQ's act-order), `None` for the natural order. A weight multiplies only
    /// an input quantized in its own order ([`super::QWeight::input_order`]).
    pub(crate) order: Option<std::sync::Arc<[u32]>>,
    /// Scratch for the reordered rows.
    pub(crate) reordered: Vec<f32>,
    /// Rows as bf16, for FP8 weights that keep activations in high precision (W8A16).
    pub(crate) bf16: Bf16Rows,
    /// Rows quantized to E4M3 per token and held as bf16 (exact), for W8A8-FP8 weights.
    pub(crate) e4m3: Bf16Rows,
}

/// Activation rows in bf16 with one f32 scale per row: row `r`'s input `i` is
/// `values[r * k + i] * scales[r]` (the scale is 1 for plain bf16 rows).
#[derive(Default)]
pub(crate) struct Bf16Rows {
    /// bf16 bit patterns, `[m][k]`; never subnormal (flushed to zero, as `vdpbf16ps` reads
    /// them), so that every instruction set sees the same inputs.
    pub(crate) values: Vec<u16>,
    pub(crate) scales: Vec<f32>,
}

/// The quantized forms of activations that weights multiply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Forms {
    /// Blocks of 32, ggml's Q8_1 (Q4_0, Q4_1, Q8_0 weights).
    pub(crate) q8_1: bool,
    /// Super-blocks of 256, ggml's Q8_K (Q4_K, Q6_K weights).
    pub(crate) q8k: bool,
    /// bf16 rows (FP8 W8A16 weights).
    pub(crate) bf16: bool,
    /// E4M3 rows with a scale per token (FP8 W8A8 weights).
    pub(crate) e4m3: bool,
}

impl Forms {
    pub(crate) fn union(self, other: Forms) -> Forms {
        Forms {
            q8_1: self.q8_1 || other.q8_1,
            q8k: self.q8k || other.q8k,
            bf16: self.bf16 || other.bf16,
            e4m3: self.e4m3 || other.e4m3,
        }
    }

    /// Whether every form of `needed` is in `self`.
    pub(crate) fn covers(self, needed: Forms) -> bool {
        self.union(needed) == self
    }
}

/// Activation rows as ggml's Q8_K super-blocks (candle's `BlockQ8K`): `qs` is `[m][nsb][256]`,
/// `d` `[m][nsb]`, `bsum16` `[m][nsb][16]` (sums of 16 codes), `bsum32` `[m][nsb][8]` (of 32).
#[derive(Default)]
pub(crate) struct Q8KRows {
    pub(crate) qs: Vec<i8>,
    /// The f32 scale, `1 / iscale` (negative when the largest magnitude is negative).
    pub(crate) d: Vec<f32>,
    pub(crate) bsum16: Vec<i16>,
    pub(crate) bsum32: Vec<i16>,
}

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

    /// Super-blocks per row (k / 256; 0 when k is not a multiple of 256).
    pub(crate) fn nsb(&self) -> usize {
        match self.k().is_multiple_of(SUPER_BLOCK) {
            true => self.k() / SUPER_BLOCK,
            false => 0,
        }
    }
}
