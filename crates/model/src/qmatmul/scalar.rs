//! Portable kernels: the reference arithmetic that the SIMD kernels reproduce bit for bit.

use std::ops::Range;

use half::f16;

use super::layout::{
    q4_mode, QInput, TileQ4, TileQ4K, TileQ6K, TileQ8, BLOCK, SUPER_BLOCK, TILE_N,
};

/// candle's `BlockQ8_1::from_float` (ggml's `quantize_row_q8_1_ref`) for one block; returns
/// (`d`, `s`, integer sum) with `d` and `s` rounded to f16 as stored there.
#[inline]
pub(super) fn quantize_block(x: &[f32; BLOCK], q: &mut [i8; BLOCK]) -> (f32, f32, i32) {
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

/// candle's `BlockQ8K::from_float` (ggml's `quantize_row_q8_K_ref`) for one super-block:
/// `iscale = -127 / v` for the first value `v` of largest magnitude, `q = round(iscale x)`;
/// returns `d = 1 / iscale` (0 for an all-zero block) and fills the sums of 16 and 32 codes.
#[inline]
pub(super) fn quantize_superblock(
    x: &[f32; SUPER_BLOCK],
    q: &mut [i8; SUPER_BLOCK],
    bsum16: &mut [i16; 16],
    bsum32: &mut [i16; 8],
) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = if amax == 0f32 {
        q.fill(0);
        0f32
    } else {
        let iscale = -127f32 / max;
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (iscale * v).round().clamp(-128., 127.) as i8;
        }
        1.0 / iscale
    };
    for (j, sum) in bsum16.iter_mut().enumerate() {
        *sum = q[16 * j..16 * (j + 1)].iter().map(|&v| v as i16).sum();
    }
    for (j, sum) in bsum32.iter_mut().enumerate() {
        *sum = bsum16[2 * j] + bsum16[2 * j + 1];
    }
    d
}

/// The stored `d` and `s` of a block with scale `d` and quantized sum `sum`.
#[inline]
pub(super) fn scales(d: f32, sum: i32) -> (f32, f32, i32) {
    let d16 = f16::from_f32(d);
    let s16 = f16::from_f32(sum as f32) * d16;
    (d16.to_f32(), s16.to_f32(), sum)
}

/// Q4 rows `rows` x `cols` columns of one column tile, the block values read as `mode` says
/// ([`q4_mode`]: Q4_0's offset of 8, Q4_1's minimum, or a zero point per column).
///
/// # Safety
/// `tiles.len() == acts.nb`, `rows.end <= acts.m`, `cols <= 16`, and `out + i * n + c` is valid
/// for writes for `i < rows.len()`, `c < cols`.
pub(super) unsafe fn q4(
    tiles: &[TileQ4],
    acts: &QInput,
    rows: Range<usize>,
    mode: u8,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let nb = acts.nb;
    for (i, r) in rows.enumerate() {
        for c in 0..cols {
            let mut acc = 0f32;
            for (b, t) in tiles.iter().enumerate() {
                let a = r * nb + b;
                let x = &acts.qs[a * BLOCK..(a + 1) * BLOCK];
                let mut sumi = 0i32;
                for g in 0..4 {
                    for j in 0..4 {
                        let byte = t.qs[(g * TILE_N + c) * 4 + j];
                        sumi += (byte & 0x0F) as i32 * x[4 * g + j] as i32
                            + (byte >> 4) as i32 * x[16 + 4 * g + j] as i32;
                    }
                }
                let v = if mode == q4_mode::MIN {
                    (sumi as f32 * t.d[c].to_f32()) * acts.d[a] + t.m[c].to_f32() * acts.s[a]
                } else {
                    // sum (q - z) x, exact: the zero point times the block's code sum.
                    let zero = match mode {
                        q4_mode::ZERO => t.m[c].to_f32() as i32,
                        _ => 8,
                    };
                    sumi -= zero * acts.sum[a];
                    (sumi as f32 * t.d[c].to_f32()) * acts.d[a]
                };
                acc += v;
            }
            *out.add(i * n + c) = acc;
        }
    }
}

/// Q8_0 rows `rows` x `cols` columns of one column tile.
///
/// # Safety
/// As [`q4`].
pub(super) unsafe fn q8(
    tiles: &[TileQ8],
    acts: &QInput,
    rows: Range<usize>,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let nb = acts.nb;
    for (i, r) in rows.enumerate() {
        for c in 0..cols {
            let mut acc = 0f32;
            for (b, t) in tiles.iter().enumerate() {
                let a = r * nb + b;
                let x = &acts.qs[a * BLOCK..(a + 1) * BLOCK];
                let mut sumi = 0i32;
                for g in 0..8 {
                    for j in 0..4 {
                        let q = (t.qs[(g * TILE_N + c) * 4 + j] ^ 0x80) as i8;
                        sumi += q as i32 * x[4 * g + j] as i32;
                    }
                }
                acc += (sumi as f32 * t.d[c].to_f32()) * acts.d[a];
            }
            *out.add(i * n + c) = acc;
        }
    }
}

/// The f32 arithmetic of the Q4_K kernels per (row, column, super-block), which the vector
/// kernels reproduce lane-wise: given the integer dot product `si` of the codes (sub-block
/// scales applied, exact in i32) and the minimums' integer term `mi`, adds
/// `(d_w d_x) si - (dmin_w d_x) mi` to the running sum, in super-block order.
#[inline]
fn q4k_step(acc: f32, dw: f32, dmin_w: f32, dx: f32, si: i32, mi: i32) -> f32 {
    acc + ((dw * dx) * si as f32 - (dmin_w * dx) * mi as f32)
}

/// Q6_K's: `(d_w d_x) si` added to the running sum.
#[inline]
fn q6k_step(acc: f32, dw: f32, dx: f32, si: i32) -> f32 {
    acc + (dw * dx) * si as f32
}

/// Every output of `rows` x `cols` of one column tile of a k-quant weight: `step(acc, tile,
/// column, a, x)` adds super-block `a` of the activations (codes `x`) times the tile's column.
///
/// # Safety
/// `tiles.len() == acts.nsb()`, the activations hold the Q8_K form, `rows.end <= acts.m`,
/// `cols <= 16`, and `out + i * n + c` is valid for writes for `i < rows.len()`, `c < cols`.
unsafe fn k_quant_outputs<T>(
    tiles: &[T],
    acts: &QInput,
    rows: Range<usize>,
    out: *mut f32,
    n: usize,
    cols: usize,
    step: impl Fn(f32, &T, usize, usize, &[i8]) -> f32,
) {
    let nsb = acts.nsb();
    for (i, r) in rows.enumerate() {
        for c in 0..cols {
            let mut acc = 0f32;
            for (b, t) in tiles.iter().enumerate() {
                let a = r * nsb + b;
                let x = &acts.q8k.qs[a * SUPER_BLOCK..(a + 1) * SUPER_BLOCK];
                acc = step(acc, t, c, a, x);
            }
            *out.add(i * n + c) = acc;
        }
    }
}

/// Q4_K rows `rows` x `cols` columns of one column tile.
///
/// # Safety
/// As [`k_quant_outputs`].
pub(super) unsafe fn q4k(
    tiles: &[TileQ4K],
    acts: &QInput,
    rows: Range<usize>,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let x8 = &acts.q8k;
    k_quant_outputs(tiles, acts, rows, out, n, cols, |acc, t, c, a, x| {
        let mut si = 0i32;
        for h in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for g in 0..8 {
                for j in 0..4 {
                    let byte = t.qs[((h * 8 + g) * TILE_N + c) * 4 + j] as i32;
                    lo += (byte & 0x0F) * x[64 * h + 4 * g + j] as i32;
                    hi += (byte >> 4) * x[64 * h + 32 + 4 * g + j] as i32;
                }
            }
            si += lo * t.scales[2 * h * TILE_N + c] as i32
                + hi * t.scales[(2 * h + 1) * TILE_N + c] as i32;
        }
        let mut mi = 0i32;
        for p in 0..4 {
            for half in 0..2 {
                mi += t.mins[(p * TILE_N + c) * 2 + half] as i32
                    * x8.bsum32[a * 8 + 2 * p + half] as i32;
            }
        }
        q4k_step(acc, t.d[c].to_f32(), t.dmin[c].to_f32(), x8.d[a], si, mi)
    })
}

/// Q6_K rows `rows` x `cols` columns of one column tile.
///
/// # Safety
/// As [`k_quant_outputs`].
pub(super) unsafe fn q6k(
    tiles: &[TileQ6K],
    acts: &QInput,
    rows: Range<usize>,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let x8 = &acts.q8k;
    k_quant_outputs(tiles, acts, rows, out, n, cols, |acc, t, c, a, x| {
        // Codes are 0..64 for values q - 32: sum sc * (sum q x - 32 sum x) per sub-block.
        let mut si = 0i32;
        let mut offset = 0i32;
        for h in 0..2 {
            for t6 in 0..4 {
                let (s, high) = (t6 % 2, t6 / 2);
                let p = h * 4 + t6;
                let mut sums = [0i32; 2];
                for g in 0..8 {
                    for j in 0..4 {
                        let low = t.ql[(((h * 2 + s) * 8 + g) * TILE_N + c) * 4 + j];
                        let low = if high == 0 { low & 0x0F } else { low >> 4 };
                        let top = t.qh[((h * 8 + g) * TILE_N + c) * 4 + j];
                        let code = low | (((top >> (2 * t6)) & 3) << 4);
                        sums[g / 4] += code as i32 * x[128 * h + 32 * t6 + 4 * g + j] as i32;
                    }
                }
                for (half, sum) in sums.into_iter().enumerate() {
                    let sc = t.scales[(p * TILE_N + c) * 2 + half] as i32;
                    si += sc * sum;
                    offset += sc * x8.bsum16[a * 16 + 2 * p + half] as i32;
                }
            }
        }
        q6k_step(acc, t.d[c].to_f32(), x8.d[a], si - 32 * offset)
    })
}
