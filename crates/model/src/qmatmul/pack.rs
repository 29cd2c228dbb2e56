//! Repacking GGUF's Q4_0, Q4_1 and Q8_0 blocks into the tiles the kernels read (the "Layout"
//! section of the module docs): done once at load, moving the values, never re-quantizing them,
//! so a packed weight takes the file's memory. Q5_0 blocks are Q8_0 blocks exactly (their
//! 5-bit values fit an i8, under the same f16 scale, and both multiply Q8_0 activations), so they
//! are widened to Q8_0 and run on its kernels, for 34 bytes per 32 values instead of 22.
//! [`QWeight`] is the packed matrix; its multiplications are the module's entry points.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use half::f16;

use super::layout::{TileQ4, TileQ8, BLOCK, TILE_N};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
}

pub(super) enum Packed {
    /// `[column tile][block]`.
    Q4(Vec<TileQ4>),
    Q8(Vec<TileQ8>),
}

/// A quantized `[n, k]` weight (`y = x W^T`), repacked for batched matmul.
pub struct QWeight {
    pub(super) kind: Kind,
    /// The type in the file (`kind` is what it is packed as).
    dtype: GgmlDType,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) packed: Packed,
}

impl QWeight {
    /// Repacks a `[n, k]` CPU tensor of type Q4_0, Q4_1 or Q8_0; `None` for other types or
    /// shapes (keep those on candle's `QMatMul`).
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q8_0 | GgmlDType::Q5_0 => Kind::Q8_0,
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
        let mut packed = match t.dtype() {
            GgmlDType::Q5_0 => Self::from_blocks(kind, n, k, &q5_0_as_q8_0(&data)),
            _ => Self::from_blocks(kind, n, k, &data),
        };
        packed.dtype = t.dtype();
        Ok(Some(packed))
    }

    /// `data`: `n` rows of `k / 32` ggml blocks of `kind`.
    fn from_blocks(kind: Kind, n: usize, k: usize, data: &[u8]) -> Self {
        let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
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
                let tiles = tile_blocks(n, k, data, block_bytes, empty, |tile, c, blk| {
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
                let tiles = tile_blocks(n, k, data, 34, empty, |tile, c, blk| {
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
        };
        let dtype = match kind {
            Kind::Q4_0 => GgmlDType::Q4_0,
            Kind::Q4_1 => GgmlDType::Q4_1,
            Kind::Q8_0 => GgmlDType::Q8_0,
        };
        Self {
            kind,
            dtype,
            n,
            k,
            packed,
        }
    }

    /// The ggml type of the weights in the file.
    pub fn dtype(&self) -> GgmlDType {
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

/// Walks `data` (`n` rows of `k / BLOCK` blocks of `block_bytes`) in the kernels' order, one
/// `[column tile][block]` tile at a time: `fill(tile, column, block)` moves one row's block
/// into its column; columns past `n` keep what `empty` put there.
fn tile_blocks<T>(
    n: usize,
    k: usize,
    data: &[u8],
    block_bytes: usize,
    empty: impl Fn() -> T,
    mut fill: impl FnMut(&mut T, usize, &[u8]),
) -> Vec<T> {
    let nb = k / BLOCK;
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
