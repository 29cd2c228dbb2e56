//! Repacking GGUF's Q4_0, Q4_1, Q8_0, Q4_K and Q6_K blocks into the tiles the kernels read (the
//! "Layout" section of the module docs): done once at load, moving the values, never
//! re-quantizing them, so a packed weight takes the file's memory (Q4_K: 148 bytes per 256
//! values instead of 144, its 6-bit scales and minimums unpacked to bytes). Q5_0 blocks are Q8_0 blocks exactly (their
//! 5-bit values fit an i8, under the same f16 scale, and both multiply Q8_0 activations), so they
//! are widened to Q8_0 and run on its kernels, for 34 bytes per 32 values instead of 22.
//! [`QWeight`] is the packed matrix; its multiplications are the module's entry points.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use half::f16;

use super::layout::{
    Forms, Fp8Tiles, TileQ4, TileQ4K, TileQ6K, TileQ8, BLOCK, SUPER_BLOCK, TILE_N,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
    /// FP8 E4M3 with a scale per column (`fp8`).
    Fp8,
}

impl Kind {
    /// Inputs per block of this kind (one tile holds one block of 16 columns).
    pub(crate) fn block_len(self) -> usize {
        match self {
            Kind::Q4_0 | Kind::Q4_1 | Kind::Q8_0 | Kind::Fp8 => BLOCK,
            Kind::Q4K | Kind::Q6K => SUPER_BLOCK,
        }
    }
}

pub(super) enum Packed {
    /// `[column tile][block]`.
    Q4(Vec<TileQ4>),
    Q8(Vec<TileQ8>),
    /// `[column tile][super-block]`.
    Q4K(Vec<TileQ4K>),
    Q6K(Vec<TileQ6K>),
    Fp8(Fp8Tiles),
}

/// A quantized `[n, k]` weight (`y = x W^T`), repacked for batched matmul.
pub struct QWeight {
    pub(super) kind: Kind,
    /// The ggml type in the file (`kind` is what it is packed as); `None` for FP8.
    dtype: Option<GgmlDType>,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) packed: Packed,
}

impl QWeight {
    /// Repacks a `[n, k]` CPU tensor of type Q4_0, Q4_1, Q5_0, Q8_0, Q4_K or Q6_K; `None` for
    /// other types or shapes (keep those on candle's `QMatMul`).
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q8_0 | GgmlDType::Q5_0 => Kind::Q8_0,
            GgmlDType::Q4K => Kind::Q4K,
            GgmlDType::Q6K => Kind::Q6K,
            _ => return Ok(None),
        };
        if !matches!(t.device(), Device::Cpu) {
            return Ok(None);
        }
        let Ok((n, k)) = t.shape().dims2() else {
            return Ok(None);
        };
        if k == 0 || n == 0 || !k.is_multiple_of(t.dtype().block_size()) {
            return Ok(None);
        }
        let data = t.data()?;
        let block_bytes = t.dtype().type_size();
        let nb = k / t.dtype().block_size();
        if data.len() != n * nb * block_bytes {
            candle_core::bail!(
                "qmatmul: {:?} tensor {n}x{k} has {} bytes, expected {}",
                t.dtype(),
                data.len(),
                n * nb * block_bytes
            );
        }
        let mut packed = match t.dtype() {
            GgmlDType::Q5_0 => Self::from_blocks(kind, n, k, &q5_0_as_q8_0(&data)),
            _ => Self::from_blocks(kind, n, k, &data),
        };
        packed.dtype = Some(t.dtype());
        Ok(Some(packed))
    }

    /// `data`: `n` rows of ggml blocks of `kind`.
    fn from_blocks(kind: Kind, n: usize, k: usize, data: &[u8]) -> Self {
        let packed = match kind {
            Kind::Q4_0 | Kind::Q4_1 => {
                let (block_bytes, qs_at) = match kind {
                    Kind::Q4_0 => (18, 2),
                    _ => (20, 4),
                };
                // Columns past `n` stay zero (scales 0) and are never written out.
                let empty = || TileQ4 {
                    qs: [0; 4 * TILE_N * 4],
                    d: [f16::ZERO; TILE_N],
                    m: [f16::ZERO; TILE_N],
                };
                let tiles = tile_blocks(n, k / BLOCK, data, block_bytes, empty, |tile, c, blk| {
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
                });
                Packed::Q4(tiles)
            }
            Kind::Q8_0 => {
                let empty = || TileQ8 {
                    // q = 0 (stored 128) in the padding columns.
                    qs: [128; 8 * TILE_N * 4],
                    d: [f16::ZERO; TILE_N],
                };
                let tiles = tile_blocks(n, k / BLOCK, data, 34, empty, |tile, c, blk| {
                    tile.d[c] = f16_at(blk, 0);
                    let qs = &blk[2..2 + BLOCK];
                    for g in 0..8 {
                        for j in 0..4 {
                            tile.qs[(g * TILE_N + c) * 4 + j] = qs[4 * g + j] ^ 0x80;
                        }
                    }
                });
                Packed::Q8(tiles)
            }
            Kind::Q4K => Packed::Q4K(tile_blocks(
                n,
                k / SUPER_BLOCK,
                data,
                144,
                empty_q4k,
                fill_q4k,
            )),
            Kind::Q6K => Packed::Q6K(tile_blocks(
                n,
                k / SUPER_BLOCK,
                data,
                210,
                empty_q6k,
                fill_q6k,
            )),
            Kind::Fp8 => unreachable!("FP8 weights come from `QWeight::from_e4m3`"),
        };
        Self::from_packed(kind, n, k, packed)
    }

    /// A weight from its packed tiles.
    pub(super) fn from_packed(kind: Kind, n: usize, k: usize, packed: Packed) -> Self {
        let dtype = match kind {
            Kind::Q4_0 => Some(GgmlDType::Q4_0),
            Kind::Q4_1 => Some(GgmlDType::Q4_1),
            Kind::Q8_0 => Some(GgmlDType::Q8_0),
            Kind::Q4K => Some(GgmlDType::Q4K),
            Kind::Q6K => Some(GgmlDType::Q6K),
            Kind::Fp8 => None,
        };
        Self {
            kind,
            dtype,
            n,
            k,
            packed,
        }
    }

    /// The ggml type of the weights in the file; `None` for FP8 (E4M3, not a ggml type).
    pub fn dtype(&self) -> Option<GgmlDType> {
        self.dtype
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
            Packed::Q4K(t) => std::mem::size_of_val(t.as_slice()),
            Packed::Q6K(t) => std::mem::size_of_val(t.as_slice()),
            Packed::Fp8(t) => t.size_in_bytes(),
        }
    }

    /// The quantized activations this weight multiplies: Q8_1 blocks, Q8_K super-blocks for
    /// the k-quants, bf16 or per-token E4M3 rows for FP8.
    pub(crate) fn activation_forms(&self) -> Forms {
        if let Packed::Fp8(t) = &self.packed {
            return t.forms();
        }
        let k_quant = self.kind.block_len() == SUPER_BLOCK;
        Forms {
            q8_1: !k_quant,
            q8k: k_quant,
            ..Forms::default()
        }
    }
}

/// Q5_0 blocks (f16 scale, 32 high bits, 16 bytes of low nibbles: value = d * (q - 16)) as the
/// Q8_0 blocks of the same values (f16 scale, 32 i8), as ggml decodes them.
fn q5_0_as_q8_0(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 22 * 34);
    for blk in data.chunks_exact(22) {
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let qs = &blk[6..22];
        out.extend_from_slice(&blk[..2]);
        let value = |low: u8, bit: u32| ((low as u32 | (((qh >> bit) & 1) << 4)) as i32 - 16) as i8;
        out.extend((0..16).map(|j| value(qs[j] & 0x0F, j as u32) as u8));
        out.extend((0..16).map(|j| value(qs[j] >> 4, j as u32 + 16) as u8));
    }
    out
}

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

/// Padding columns: scales 0, so they add nothing (and are never written out).
fn empty_q4k() -> TileQ4K {
    TileQ4K {
        qs: [0; 8 * 4 * TILE_N * 4],
        scales: [0; 8 * TILE_N],
        mins: [0; 8 * TILE_N],
        d: [f16::ZERO; TILE_N],
        dmin: [f16::ZERO; TILE_N],
    }
}

/// One column's Q4_K block (`d`, `dmin`, 12 bytes of 6-bit scales and minimums, 128 bytes of
/// nibbles) into column `c` of `tile`.
fn fill_q4k(tile: &mut TileQ4K, c: usize, blk: &[u8]) {
    tile.d[c] = f16_at(blk, 0);
    tile.dmin[c] = f16_at(blk, 2);
    let packed: &[u8] = &blk[4..16];
    for j in 0..8 {
        let (scale, min) = scale_min_k4(j, packed);
        tile.scales[j * TILE_N + c] = scale;
        tile.mins[((j / 2) * TILE_N + c) * 2 + j % 2] = min;
    }
    let qs = &blk[16..144];
    for h in 0..4 {
        for g in 0..8 {
            for j in 0..4 {
                tile.qs[((h * 8 + g) * TILE_N + c) * 4 + j] = qs[32 * h + 4 * g + j];
            }
        }
    }
}

/// Sub-block `j`'s 6-bit scale and minimum from Q4_K's 12 packed bytes (ggml's
/// `get_scale_min_k4`): the first four in the low 6 bits of bytes 0..4 and 4..8, the last four
/// from the nibbles of bytes 8..12 and the top 2 bits of bytes 0..8.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn empty_q6k() -> TileQ6K {
    TileQ6K {
        ql: [0; 2 * 2 * 8 * TILE_N * 4],
        qh: [0; 2 * 8 * TILE_N * 4],
        scales: [0; 16 * TILE_N],
        d: [f16::ZERO; TILE_N],
    }
}

/// One column's Q6_K block (128 bytes of low bits, 64 of high bits, 16 i8 scales, `d`) into
/// column `c` of `tile`.
fn fill_q6k(tile: &mut TileQ6K, c: usize, blk: &[u8]) {
    let (ql, qh, scales) = (&blk[..128], &blk[128..192], &blk[192..208]);
    tile.d[c] = f16_at(blk, 208);
    for (j, &scale) in scales.iter().enumerate() {
        tile.scales[((j / 2) * TILE_N + c) * 2 + j % 2] = scale as i8;
    }
    for h in 0..2 {
        for g in 0..8 {
            for j in 0..4 {
                for s in 0..2 {
                    tile.ql[(((h * 2 + s) * 8 + g) * TILE_N + c) * 4 + j] =
                        ql[64 * h + 32 * s + 4 * g + j];
                }
                tile.qh[((h * 8 + g) * TILE_N + c) * 4 + j] = qh[32 * h + 4 * g + j];
            }
        }
    }
}

/// Walks `data` (`n` rows of `nb` blocks of `block_bytes`) in the kernels' order, one
/// `[column tile][block]` tile at a time: `fill(tile, column, block)` moves one row's block
/// into its column; columns past `n` keep what `empty` put there.
fn tile_blocks<T>(
    n: usize,
    nb: usize,
    data: &[u8],
    block_bytes: usize,
    empty: impl Fn() -> T,
    mut fill: impl FnMut(&mut T, usize, &[u8]),
) -> Vec<T> {
    let n_tiles = n.div_ceil(TILE_N);
    let mut tiles = Vec::with_capacity(n_tiles * nb);
    for t in 0..n_tiles {
        for b in 0..nb {
            let mut tile = empty();
            for c in 0..TILE_N.min(n - t * TILE_N) {
                let at = ((t * TILE_N + c) * nb + b) * block_bytes;
                fill(&mut tile, c, &data[at..at + block_bytes]);
            }
            tiles.push(tile);
        }
    }
    tiles
}
