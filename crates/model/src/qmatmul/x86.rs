//! x86-64 kernels: AVX-512 VNNI (`vpdpbusd`, 16 columns per register) and AVX2 (`vpmaddubsw`,
//! two halves of 8 columns). Each loads and decodes a weight block once for `R` rows, and does
//! per (row, column, block) exactly the f32 operations of [`super::scalar`], lane-wise.
//!
//! # Safety (all kernels)
//! The caller guarantees: the named target features are available; `tiles.len() == acts.nb`;
//! `row0 + R <= acts.m` (so `acts` holds every block read); `cols <= 16`; and
//! `out + r * n + c` is valid for writes for `r < R`, `c < cols`.

use std::arch::x86_64::*;

use super::layout::{QInput, TileQ4, TileQ8, BLOCK};

/// Four activation bytes (inputs `4g..4g + 4` of a block) broadcast to every 32-bit lane.
macro_rules! bcast512 {
    ($x:expr, $g:expr) => {
        _mm512_set1_epi32(($x.add(4 * $g) as *const i32).read_unaligned())
    };
}
macro_rules! bcast256 {
    ($x:expr, $g:expr) => {
        _mm256_set1_epi32(($x.add(4 * $g) as *const i32).read_unaligned())
    };
}

/// [`super::scalar::quantize_block`] on AVX-512, bit-identical; `None` (the caller then runs
/// the scalar version) for a block holding NaN or infinity or whose `1 / d` overflows, where the
/// vector float-to-int conversion would differ from `as i8`.
///
/// # Safety
/// AVX-512 F and BW are available.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_block(
    x: &[f32; BLOCK],
    q: &mut [i8; BLOCK],
) -> Option<(f32, f32, i32)> {
    let amax = block_amax(x.as_ptr())?;
    if !amax.is_finite() {
        return None;
    }
    let d = amax / 127.0;
    let id = if d != 0f32 { 1. / d } else { 0. };
    // A subnormal scale overflows 1 / d: x * id is then infinite or NaN.
    if !id.is_finite() {
        return None;
    }
    let sum = quantize_codes(x.as_ptr(), id, q.as_mut_ptr());
    Some(super::scalar::scales(d, sum))
}

/// The largest magnitude in the block at `x`, or `None` if it holds a NaN.
///
/// # Safety
/// AVX-512 F is available; `x` holds `BLOCK` values.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block_amax(x: *const f32) -> Option<f32> {
    let (x0, x1) = (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)));
    if _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x0, x1) != 0 {
        return None;
    }
    Some(_mm512_reduce_max_ps(_mm512_max_ps(
        _mm512_abs_ps(x0),
        _mm512_abs_ps(x1),
    )))
}

/// Writes the block at `x` times the finite inverse scale `id`, rounded, into the codes at `q`;
/// returns their sum.
///
/// # Safety
/// AVX-512 F and BW are available; `x` holds `BLOCK` values and `q` `BLOCK` bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_codes(x: *const f32, id: f32, q: *mut i8) -> i32 {
    let id = _mm512_set1_ps(id);
    // |x * id| <= 127 (+ rounding), so the values already fit in i8; the clamp only mirrors
    // `as i8`'s saturation.
    let (lo, hi) = (_mm512_set1_epi32(-128), _mm512_set1_epi32(127));
    let q0 = _mm512_max_epi32(
        _mm512_min_epi32(round512(_mm512_mul_ps(_mm512_loadu_ps(x), id)), hi),
        lo,
    );
    let q1 = _mm512_max_epi32(
        _mm512_min_epi32(round512(_mm512_mul_ps(_mm512_loadu_ps(x.add(16)), id)), hi),
        lo,
    );
    _mm_storeu_si128(q as *mut __m128i, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(q.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
    _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1))
}

/// Blocks [`quantize_16_blocks`] takes at once: one 512-bit register of f32 scales.
pub(super) const QUANTIZE_GROUP: usize = 16;

/// Sixteen consecutive blocks at `x` as [`quantize_block`] does each, bit-identical, with the
/// scales worked out for all sixteen in one register: the block-by-block version spends most
/// of its time waiting on its own chain (maximum, two divisions, rounding to f16, sum).
/// Returns `false`, having written nothing, if any block needs the scalar path.
///
/// # Safety
/// AVX-512 F and BW and F16C are available; `x` holds `16 * BLOCK` values, `q` as many bytes,
/// and `d`, `s`, `sum` 16 values each.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
pub(super) unsafe fn quantize_16_blocks(
    x: *const f32,
    q: *mut i8,
    d: *mut f32,
    s: *mut f32,
    sum: *mut i32,
) -> bool {
    let mut amax = [0f32; 16];
    for (b, amax) in amax.iter_mut().enumerate() {
        match block_amax(x.add(b * BLOCK)) {
            Some(m) => *amax = m,
            None => return false,
        }
    }
    let amax = _mm512_loadu_ps(amax.as_ptr());
    let dv = _mm512_div_ps(amax, _mm512_set1_ps(127.0));
    let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(dv, _mm512_setzero_ps());
    let idv = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0), dv);
    // Infinite maxima, or subnormal scales whose inverse overflows: the scalar path's cases.
    let finite = |v: __m512| {
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(v), _mm512_set1_ps(f32::INFINITY))
    };
    if finite(amax) != u16::MAX || finite(idv) != u16::MAX {
        return false;
    }
    let mut ids = [0f32; 16];
    _mm512_storeu_ps(ids.as_mut_ptr(), idv);
    let mut sums = [0i32; 16];
    for (b, (&id, sum)) in ids.iter().zip(sums.iter_mut()).enumerate() {
        *sum = quantize_codes(x.add(b * BLOCK), id, q.add(b * BLOCK));
    }
    // `scales` for all sixteen: d and sum rounded to f16, their product rounded to f16 again
    // (exact in f32 before that rounding: two 11-bit significands).
    let to_f16 = |v: __m512| _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
    let d16 = to_f16(dv);
    let sumv = _mm512_loadu_si512(sums.as_ptr() as *const __m512i);
    let s16 = to_f16(_mm512_mul_ps(to_f16(_mm512_cvtepi32_ps(sumv)), d16));
    _mm512_storeu_ps(d, d16);
    _mm512_storeu_ps(s, s16);
    _mm512_storeu_si512(sum as *mut __m512i, sumv);
    true
}

/// `f32::round` (half away from zero) to i32, as LLVM lowers it for scalars:
/// `trunc(v + copysign(pred(0.5), v))`, exact for every finite `v` below 2^31.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn round512(v: __m512) -> __m512i {
    let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
    let half = _mm512_or_si512(_mm512_set1_epi32(0x3EFF_FFFF), sign);
    _mm512_cvttps_epi32(_mm512_add_ps(v, _mm512_castsi512_ps(half)))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(super) unsafe fn q4_vnni<const R: usize, const MIN: bool>(
    tiles: &[TileQ4],
    acts: &QInput,
    row0: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let nb = acts.nb;
    let (xq, xd, xs, xsum) = (
        acts.qs.as_ptr(),
        acts.d.as_ptr(),
        acts.s.as_ptr(),
        acts.sum.as_ptr(),
    );
    let low = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, t) in tiles.iter().enumerate() {
        let p = t.qs.as_ptr() as *const __m512i;
        let raw = [
            _mm512_load_si512(p),
            _mm512_load_si512(p.add(1)),
            _mm512_load_si512(p.add(2)),
            _mm512_load_si512(p.add(3)),
        ];
        let w = [
            _mm512_and_si512(raw[0], low),
            _mm512_and_si512(raw[1], low),
            _mm512_and_si512(raw[2], low),
            _mm512_and_si512(raw[3], low),
            _mm512_and_si512(_mm512_srli_epi16::<4>(raw[0]), low),
            _mm512_and_si512(_mm512_srli_epi16::<4>(raw[1]), low),
            _mm512_and_si512(_mm512_srli_epi16::<4>(raw[2]), low),
            _mm512_and_si512(_mm512_srli_epi16::<4>(raw[3]), low),
        ];
        let dw = _mm512_cvtph_ps(_mm256_load_si256(t.d.as_ptr() as *const __m256i));
        let mw = _mm512_cvtph_ps(_mm256_load_si256(t.m.as_ptr() as *const __m256i));
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = (row0 + r) * nb + b;
            let x = xq.add(a * BLOCK);
            // Q4_0's `q - 8`: start from -8 * sum(x).
            let init = if MIN {
                zero
            } else {
                _mm512_set1_epi32(-8 * *xsum.add(a))
            };
            let mut s0 = _mm512_dpbusd_epi32(init, w[0], bcast512!(x, 0));
            let mut s1 = _mm512_dpbusd_epi32(zero, w[1], bcast512!(x, 1));
            s0 = _mm512_dpbusd_epi32(s0, w[2], bcast512!(x, 2));
            s1 = _mm512_dpbusd_epi32(s1, w[3], bcast512!(x, 3));
            s0 = _mm512_dpbusd_epi32(s0, w[4], bcast512!(x, 4));
            s1 = _mm512_dpbusd_epi32(s1, w[5], bcast512!(x, 5));
            s0 = _mm512_dpbusd_epi32(s0, w[6], bcast512!(x, 6));
            s1 = _mm512_dpbusd_epi32(s1, w[7], bcast512!(x, 7));
            let sumi = _mm512_add_epi32(s0, s1);
            let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), dw);
            v = _mm512_mul_ps(v, _mm512_set1_ps(*xd.add(a)));
            if MIN {
                v = _mm512_add_ps(v, _mm512_mul_ps(mw, _mm512_set1_ps(*xs.add(a))));
            }
            *acc = _mm512_add_ps(*acc, v);
        }
    }
    store512(&acc, out, n, cols);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(super) unsafe fn q8_vnni<const R: usize>(
    tiles: &[TileQ8],
    acts: &QInput,
    row0: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let nb = acts.nb;
    let (xq, xd, xsum) = (acts.qs.as_ptr(), acts.d.as_ptr(), acts.sum.as_ptr());
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, t) in tiles.iter().enumerate() {
        let p = t.qs.as_ptr() as *const __m512i;
        // Tiles are 32-byte aligned: unaligned loads.
        let w = [
            _mm512_loadu_si512(p),
            _mm512_loadu_si512(p.add(1)),
            _mm512_loadu_si512(p.add(2)),
            _mm512_loadu_si512(p.add(3)),
            _mm512_loadu_si512(p.add(4)),
            _mm512_loadu_si512(p.add(5)),
            _mm512_loadu_si512(p.add(6)),
            _mm512_loadu_si512(p.add(7)),
        ];
        let dw = _mm512_cvtph_ps(_mm256_load_si256(t.d.as_ptr() as *const __m256i));
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = (row0 + r) * nb + b;
            let x = xq.add(a * BLOCK);
            // Weights are stored as q + 128: start from -128 * sum(x).
            let init = _mm512_set1_epi32(-128 * *xsum.add(a));
            let mut s0 = _mm512_dpbusd_epi32(init, w[0], bcast512!(x, 0));
            let mut s1 = _mm512_dpbusd_epi32(zero, w[1], bcast512!(x, 1));
            s0 = _mm512_dpbusd_epi32(s0, w[2], bcast512!(x, 2));
            s1 = _mm512_dpbusd_epi32(s1, w[3], bcast512!(x, 3));
            s0 = _mm512_dpbusd_epi32(s0, w[4], bcast512!(x, 4));
            s1 = _mm512_dpbusd_epi32(s1, w[5], bcast512!(x, 5));
            s0 = _mm512_dpbusd_epi32(s0, w[6], bcast512!(x, 6));
            s1 = _mm512_dpbusd_epi32(s1, w[7], bcast512!(x, 7));
            let sumi = _mm512_add_epi32(s0, s1);
            let v = _mm512_mul_ps(_mm512_cvtepi32_ps(sumi), dw);
            let v = _mm512_mul_ps(v, _mm512_set1_ps(*xd.add(a)));
            *acc = _mm512_add_ps(*acc, v);
        }
    }
    store512(&acc, out, n, cols);
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store512<const R: usize>(acc: &[__m512; R], out: *mut f32, n: usize, cols: usize) {
    let mask = ((1u32 << cols) - 1) as u16;
    for (r, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(r * n), mask, *acc);
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q4_avx2<const R: usize, const MIN: bool>(
    tiles: &[TileQ4],
    acts: &QInput,
    row0: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let nb = acts.nb;
    let (xq, xd, xs, xsum) = (
        acts.qs.as_ptr(),
        acts.d.as_ptr(),
        acts.s.as_ptr(),
        acts.sum.as_ptr(),
    );
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for half in 0..2 {
        if half * 8 >= cols {
            break;
        }
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, t) in tiles.iter().enumerate() {
            // Group g of this half: bytes g * 64 + half * 32 .. + 32.
            let p = t.qs.as_ptr().add(half * 32) as *const __m256i;
            let raw = [
                _mm256_load_si256(p),
                _mm256_load_si256(p.add(2)),
                _mm256_load_si256(p.add(4)),
                _mm256_load_si256(p.add(6)),
            ];
            let w = [
                _mm256_and_si256(raw[0], low),
                _mm256_and_si256(raw[1], low),
                _mm256_and_si256(raw[2], low),
                _mm256_and_si256(raw[3], low),
                _mm256_and_si256(_mm256_srli_epi16::<4>(raw[0]), low),
                _mm256_and_si256(_mm256_srli_epi16::<4>(raw[1]), low),
                _mm256_and_si256(_mm256_srli_epi16::<4>(raw[2]), low),
                _mm256_and_si256(_mm256_srli_epi16::<4>(raw[3]), low),
            ];
            let dw = _mm256_cvtph_ps(_mm_load_si128(t.d.as_ptr().add(half * 8) as *const __m128i));
            let mw = _mm256_cvtph_ps(_mm_load_si128(t.m.as_ptr().add(half * 8) as *const __m128i));
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = (row0 + r) * nb + b;
                let x = xq.add(a * BLOCK);
                // u4 x s8 pairs are at most 2 * 15 * 128 in magnitude: eight groups summed in
                // i16 stay below 2^15, so the sums are exact.
                let mut p16 = _mm256_maddubs_epi16(w[0], bcast256!(x, 0));
                p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(w[1], bcast256!(x, 1)));
                p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(w[2], bcast256!(x, 2)));
                p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(w[3], bcast256!(x, 3)));
                p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(w[4], bcast256!(x, 4)));
                p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(w[5], bcast256!(x, 5)));
                p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(w[6], bcast256!(x, 6)));
                p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(w[7], bcast256!(x, 7)));
                let mut sumi = _mm256_madd_epi16(p16, ones);
                if !MIN {
                    sumi = _mm256_add_epi32(sumi, _mm256_set1_epi32(-8 * *xsum.add(a)));
                }
                let mut v = _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), dw);
                v = _mm256_mul_ps(v, _mm256_set1_ps(*xd.add(a)));
                if MIN {
                    v = _mm256_add_ps(v, _mm256_mul_ps(mw, _mm256_set1_ps(*xs.add(a))));
                }
                *acc = _mm256_add_ps(*acc, v);
            }
        }
        store256(&acc, out.add(half * 8), n, cols - half * 8);
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q8_avx2<const R: usize>(
    tiles: &[TileQ8],
    acts: &QInput,
    row0: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let nb = acts.nb;
    let (xq, xd) = (acts.qs.as_ptr(), acts.d.as_ptr());
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    for half in 0..2 {
        if half * 8 >= cols {
            break;
        }
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, t) in tiles.iter().enumerate() {
            let p = t.qs.as_ptr().add(half * 32) as *const __m256i;
            // Back to signed q, then ggml's trick: |q| (u8) x sign(q) * x (s8). Each pair is
            // at most 2 * 128 * 127 < 2^15 in magnitude, so vpmaddubsw never saturates.
            let mut w = [_mm256_setzero_si256(); 8];
            let mut aw = [_mm256_setzero_si256(); 8];
            for g in 0..8 {
                w[g] = _mm256_xor_si256(_mm256_load_si256(p.add(2 * g)), flip);
                aw[g] = _mm256_abs_epi8(w[g]);
            }
            let dw = _mm256_cvtph_ps(_mm_load_si128(t.d.as_ptr().add(half * 8) as *const __m128i));
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = (row0 + r) * nb + b;
                let x = xq.add(a * BLOCK);
                let mut sumi = _mm256_setzero_si256();
                for g in 0..8 {
                    let sx = _mm256_sign_epi8(bcast256!(x, g), w[g]);
                    let p16 = _mm256_maddubs_epi16(aw[g], sx);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, ones));
                }
                let v = _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), dw);
                let v = _mm256_mul_ps(v, _mm256_set1_ps(*xd.add(a)));
                *acc = _mm256_add_ps(*acc, v);
            }
        }
        store256(&acc, out.add(half * 8), n, cols - half * 8);
    }
}

/// Stores the first `cols.min(8)` lanes of each row.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store256<const R: usize>(acc: &[__m256; R], out: *mut f32, n: usize, cols: usize) {
    for (r, acc) in acc.iter().enumerate() {
        if cols >= 8 {
            _mm256_storeu_ps(out.add(r * n), *acc);
        } else {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.add(r * n), cols);
        }
    }
}
