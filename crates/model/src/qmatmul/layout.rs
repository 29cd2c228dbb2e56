//! The memory layouts that the packer, the activation quantizer and the kernels share: weight
//! tiles of 16 columns by one block of 32 inputs ([`TileQ4`], [`TileQ8`]; filled by `pack`) and
//! activation rows quantized to blocks of 32 ([`QInput`]; filled by `quantize`). Data only, so
//! that every other file of the module can use them without one importing another back.

use half::f16;

/// Inputs per quantization block (Q4_0, Q4_1, Q8_0 and the activations' Q8_1 all use 32).
pub const BLOCK: usize = 32;
/// Output columns per tile: one 512-bit register of i32 / f32 lanes.
pub const TILE_N: usize = 16;

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
}
