//! Portable kernels: the reference arithmetic that the SIMD kernels reproduce bit for bit.

use std::ops::Range;

use half::f16;

use super::layout::{QInput, TileQ4, TileQ8, BLOCK, TILE_N};

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

/// The stored `d` and `s` of a block with scale `d` and quantized sum `sum`.
#[inline]
pub(super) fn scales(d: f32, sum: i32) -> (f32, f32, i32) {
    let d16 = f16::from_f32(d);
    let s16 = f16::from_f32(sum as f32) * d16;
    (d16.to_f32(), s16.to_f32(), sum)
}

/// Q4_0 (`min == false`) or Q4_1 rows `rows` x `cols` columns of one column tile.
///
/// # Safety
/// `tiles.len() == acts.nb`, `rows.end <= acts.m`, `cols <= 16`, and `out + i * n + c` is valid
/// for writes for `i < rows.len()`, `c < cols`.
pub(super) unsafe fn q4(
    tiles: &[TileQ4],
    acts: &QInput,
    rows: Range<usize>,
    min: bool,
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
                let v = if min {
                    (sumi as f32 * t.d[c].to_f32()) * acts.d[a] + t.m[c].to_f32() * acts.s[a]
                } else {
                    sumi -= 8 * acts.sum[a];
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
