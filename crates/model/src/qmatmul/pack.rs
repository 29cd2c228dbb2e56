//! Repacking GGUF's Q4_0, Q4_1, Q8_0, Q4_K and Q6_K blocks into the tiles the kernels read (the
//! "Layout" section of the module docs): done once at load, moving the values, never
//! re-quantizing them, so a packed weight takes the file's memory (Q4_K: 148 bytes per 256
//! values instead of 144, its 6-bit scales and minimums unpacked to bytes). Q5_0 blocks are Q8_0 blocks exactly (their
//! 5-bit values fit an i8, under the same f16 scale, and both multiply Q8_0 activations), so they
//! are widened to Q8_0 and run on its kernels, for 34 bytes per 32 values instead of 22.
//! [`QWeight`] is the packed matrix; its multiplications are the module's entry points.
//! Integer checkpoints (GPTQ, AWQ, compressed-tensors; `crate::quantized_checkpoint`) come in
//! as codes with per-block scales and zero points ([`QWeight::from_int4`],
//! [`QWeight::from_int8`]) and land in the same tiles.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use half::f16;

use super::layout::{
    q4_mode, Forms, Fp8Tiles, TileQ4, TileQ4K, TileQ6K, TileQ8, BLOCK, SUPER_BLOCK, TILE_N,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Q4_0,
    Q4_1,
    /// 4-bit codes with an integer zero point per column and block: `d * (q - z)`.
    Q4Zero,
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
            Kind::Q4_0 | Kind::Q4_1 | Kind::Q4Zero | Kind::Q8_0 | Kind::Fp8 => BLOCK,
            Kind::Q4K | Kind::Q6K => SUPER_BLOCK,
        }
    }

    /// The Q4 kernels' [`q4_mode`] for this kind.
    pub(crate) fn q4_mode(self) -> u8 {
        match self {
            Kind::Q4_1 => q4_mode::MIN,
            Kind::Q4Zero => q4_mode::ZERO,
            _ => q4_mode::OFFSET8,
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
    /// The GGUF type in the file (`kind` is what it is packed as); `None` for integer
    /// checkpoints and FP8.
    dtype: Option<GgmlDType>,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) packed: Packed,
    /// The order of the input channels along `k` in the tiles: `Some(p)` when tile position
    /// `j` holds input `p[j]` (act-order checkpoints, whose groups follow a permutation).
    pub(super) input_order: Option<Arc<[u32]>>,
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

    /// A `[n, k]` matrix of 4-bit codes with a scale and an integer zero point per column and
    /// block of 32 inputs: `W[c, j] = scales[c * nb + j / 32] * (codes[c * k + j] -
    /// zeros[c * nb + j / 32])` (`nb = k / 32`), the tiles holding the values exactly (a
    /// zero point of 8 everywhere packs as Q4_0, the same arithmetic on fewer operations).
    /// `input_order` as [`QWeight::input_order`]: position `j` along `k` is input
    /// `input_order[j]`.
    pub fn from_int4(
        n: usize,
        k: usize,
        codes: &[u8],
        scales: &[f16],
        zeros: &[u8],
        input_order: Option<Arc<[u32]>>,
    ) -> candle_core::Result<Self> {
        let nb = check_int_shape(n, k, codes.len(), scales.len(), input_order.as_deref())?;
        if zeros.len() != n * nb {
            candle_core::bail!("qmatmul: {} zero points for {n} x {nb} blocks", zeros.len());
        }
        if let Some(bad) = codes.iter().find(|&&q| q > 15) {
            candle_core::bail!("qmatmul: 4-bit code {bad} out of range");
        }
        if let Some(bad) = zeros.iter().find(|&&z| z > 16) {
            candle_core::bail!("qmatmul: zero point {bad} out of range 0..=16");
        }
        // As Q4_1-shaped blocks (d, the zero point in m's place, 16 bytes of nibbles) for
        // `from_blocks`: low nibble input j, high nibble input 16 + j, as in ggml.
        let mut blocks = Vec::with_capacity(n * nb * 20);
        for c in 0..n {
            for b in 0..nb {
                let at = c * nb + b;
                blocks.extend_from_slice(&scales[at].to_le_bytes());
                blocks.extend_from_slice(&f16::from_f32(zeros[at] as f32).to_le_bytes());
                let q = &codes[c * k + b * BLOCK..c * k + (b + 1) * BLOCK];
                blocks.extend((0..BLOCK / 2).map(|j| q[j] | (q[16 + j] << 4)));
            }
        }
        let mut packed = Self::from_blocks(Kind::Q4Zero, n, k, &blocks);
        if zeros.iter().all(|&z| z == 8) {
            // The same tiles (Q4_0's kernels never read `m`).
            packed.kind = Kind::Q4_0;
        }
        packed.input_order = input_order;
        Ok(packed)
    }

    /// A `[n, k]` matrix of int8 values with a scale per column and block of 32 inputs:
    /// `W[c, j] = scales[c * nb + j / 32] * q[c * k + j]`, on the Q8_0 kernels.
    pub fn from_int8(
        n: usize,
        k: usize,
        q: &[i8],
        scales: &[f16],
        input_order: Option<Arc<[u32]>>,
    ) -> candle_core::Result<Self> {
        let nb = check_int_shape(n, k, q.len(), scales.len(), input_order.as_deref())?;
        let mut blocks = Vec::with_capacity(n * nb * 34);
        for c in 0..n {
            for b in 0..nb {
                blocks.extend_from_slice(&scales[c * nb + b].to_le_bytes());
                let row = &q[c * k + b * BLOCK..c * k + (b + 1) * BLOCK];
                blocks.extend(row.iter().map(|&v| v as u8));
            }
        }
        let mut packed = Self::from_blocks(Kind::Q8_0, n, k, &blocks);
        packed.input_order = input_order;
        Ok(packed)
    }

    /// The weights as f32 `[n, k]`, unpacked from the tiles, in the natural input order: what
    /// the kernels multiply, for checks against a checkpoint's own dequantization. `None` for
    /// the k-quants (their blocks are candle's to dequantize) and FP8 (its checkpoint matrix
    /// dequantizes itself: `QuantMatrix::dequantize`).
    pub fn dequantize(&self) -> Option<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        let nb = k / BLOCK;
        let mut out = vec![0f32; n * k];
        let n_tiles = n.div_ceil(TILE_N);
        // Position `j` along the tiles' k is input `order(j)`.
        let order = |j: usize| match &self.input_order {
            Some(p) => p[j] as usize,
            None => j,
        };
        for t in 0..n_tiles {
            for c in 0..TILE_N.min(n - t * TILE_N) {
                let row = &mut out[(t * TILE_N + c) * k..(t * TILE_N + c + 1) * k];
                for b in 0..nb {
                    let value = |j: usize| -> f32 {
                        match &self.packed {
                            Packed::Q4(tiles) => {
                                let tile = &tiles[t * nb + b];
                                let (g, i) = ((j % 16) / 4, j % 4);
                                let byte = tile.qs[(g * TILE_N + c) * 4 + i];
                                let q = if j < 16 { byte & 0x0F } else { byte >> 4 } as f32;
                                let (d, m) = (tile.d[c].to_f32(), tile.m[c].to_f32());
                                match self.kind {
                                    Kind::Q4_1 => d * q + m,
                                    Kind::Q4Zero => d * (q - m),
                                    _ => d * (q - 8.0),
                                }
                            }
                            Packed::Q8(tiles) => {
                                let tile = &tiles[t * nb + b];
                                let (g, i) = (j / 4, j % 4);
                                let q = (tile.qs[(g * TILE_N + c) * 4 + i] ^ 0x80) as i8;
                                tile.d[c].to_f32() * q as f32
                            }
                            Packed::Q4K(_) | Packed::Q6K(_) | Packed::Fp8(_) => f32::NAN,
                        }
                    };
                    for j in 0..BLOCK {
                        row[order(b * BLOCK + j)] = value(j);
                    }
                }
            }
        }
        match self.packed {
            Packed::Q4K(_) | Packed::Q6K(_) | Packed::Fp8(_) => None,
            _ => Some(out),
        }
    }

    /// `data`: `n` rows of ggml blocks of `kind`.
    fn from_blocks(kind: Kind, n: usize, k: usize, data: &[u8]) -> Self {
        let packed = match kind {
            Kind::Q4_0 | Kind::Q4_1 | Kind::Q4Zero => {
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
                    if kind != Kind::Q4_0 {
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

    /// A weight from its packed tiles, in the natural input order; the caller that read a
    /// GGUF tensor sets its type.
    pub(super) fn from_packed(kind: Kind, n: usize, k: usize, packed: Packed) -> Self {
        Self {
            kind,
            dtype: None,
            n,
            k,
            packed,
            input_order: None,
        }
    }

    /// The ggml type of the weights in the file; `None` for integer checkpoints (GPTQ, AWQ,
    /// compressed-tensors) and FP8 (E4M3 is not a ggml type).
    pub fn dtype(&self) -> Option<GgmlDType> {
        self.dtype
    }

    /// The order of the input channels this weight multiplies: `Some(p)` when its position
    /// `j` along `k` is input `p[j]` (act-order GPTQ), so that an input row is gathered into
    /// that order before it is quantized; `None` for the natural order.
    pub fn input_order(&self) -> Option<&Arc<[u32]>> {
        self.input_order.as_ref()
    }

    /// Whether `self` and `other` can multiply one quantized input: the same `k` and order.
    pub fn shares_input_with(&self, other: &QWeight) -> bool {
        self.k == other.k && same_order(self.input_order(), other.input_order())
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

/// Whether two input orders are the same permutation (`None` is the identity).
pub(crate) fn same_order(a: Option<&Arc<[u32]>>, b: Option<&Arc<[u32]>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a[..] == b[..],
        _ => false,
    }
}

/// Checks the shape of an integer matrix (`values` codes, `scales` per block of 32, the input
/// order a permutation of `0..k`); returns the blocks per column.
fn check_int_shape(
    n: usize,
    k: usize,
    values: usize,
    scales: usize,
    order: Option<&[u32]>,
) -> candle_core::Result<usize> {
    if n == 0 || k == 0 || !k.is_multiple_of(BLOCK) {
        candle_core::bail!("qmatmul: a {n} x {k} matrix is not made of blocks of {BLOCK} inputs");
    }
    let nb = k / BLOCK;
    if values != n * k || scales != n * nb {
        candle_core::bail!(
            "qmatmul: {values} values and {scales} scales for a {n} x {k} matrix in blocks of \
             {BLOCK}"
        );
    }
    if let Some(order) = order {
        let mut seen = vec![false; k];
        for &i in order {
            match seen.get_mut(i as usize) {
                Some(s) if !*s => *s = true,
                _ => candle_core::bail!("qmatmul: the input order is not a permutation of 0..{k}"),
            }
        }
        if order.len() != k {
            candle_core::bail!("qmatmul: the input order is not a permutation of 0..{k}");
        }
    }
    Ok(nb)
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
