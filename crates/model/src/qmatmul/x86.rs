//! x86-64 kernels: AVX-512 VNNI (`vpdpbusd`, 16 columns per register) and AVX2 (`vpmaddubsw`,
//! two halves of 8 columns). Each loads and decodes a weight block once for `R` rows, and does
//! per (row, column, block) exactly the f32 operations of [`super::scalar`], lane-wise.
//!
//! # Safety (all kernels)
//! The caller guarantees: the named target features are available; `tiles.len() == acts.nb`
//! (`acts.nsb()` for the k-quants, whose activations hold the Q8_K form); `row0 + R <= acts.m`
//! (so `acts` holds every block read); `cols <= 16`; and `out + r * n + c` is valid for writes
//! for `r < R`, `c < cols`.

use std::arch::x86_64::*;

use super::layout::{q4_mode, QInput, TileQ4, TileQ4K, TileQ6K, TileQ8, BLOCK, SUPER_BLOCK};

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

/// Two i16 sums (`$p` and `$p + 1` of the row's sums at `$s`) broadcast to every 32-bit lane.
macro_rules! pair512 {
    ($s:expr, $p:expr) => {
        _mm512_set1_epi32(($s.add(2 * $p) as *const i32).read_unaligned())
    };
}
macro_rules! pair256 {
    ($s:expr, $p:expr) => {
        _mm256_set1_epi32(($s.add(2 * $p) as *const i32).read_unaligned())
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
pub(super) unsafe fn q4_vnni<const R: usize, const MODE: u8>(
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
        // The zero points (small integers, exact in f16), negated.
        let neg_zero = _mm512_sub_epi32(zero, _mm512_cvttps_epi32(mw));
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = (row0 + r) * nb + b;
            let x = xq.add(a * BLOCK);
            // `q - 8` (Q4_0) or `q - z`: start from -8 * sum(x) or -z * sum(x).
            let init = match MODE {
                q4_mode::MIN => zero,
                q4_mode::ZERO => _mm512_mullo_epi32(neg_zero, _mm512_set1_epi32(*xsum.add(a))),
                _ => _mm512_set1_epi32(-8 * *xsum.add(a)),
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
            if MODE == q4_mode::MIN {
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
pub(super) unsafe fn q4_avx2<const R: usize, const MODE: u8>(
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
            let neg_zero = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_cvttps_epi32(mw));
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
                match MODE {
                    q4_mode::MIN => {}
                    q4_mode::ZERO => {
                        let sum = _mm256_set1_epi32(*xsum.add(a));
                        sumi = _mm256_add_epi32(sumi, _mm256_mullo_epi32(neg_zero, sum));
                    }
                    _ => sumi = _mm256_add_epi32(sumi, _mm256_set1_epi32(-8 * *xsum.add(a))),
                }
                let mut v = _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), dw);
                v = _mm256_mul_ps(v, _mm256_set1_ps(*xd.add(a)));
                if MODE == q4_mode::MIN {
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

/// The dot products of `G` groups of four inputs at `x` with the decoded weights `w` (16 columns
/// each), in two chains. Exact in i32, so the chains' order cannot matter.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn dot_groups512<const G: usize>(w: &[__m512i; G], x: *const i8) -> __m512i {
    let mut s = [_mm512_setzero_si512(); 2];
    for (g, w) in w.iter().enumerate() {
        s[g % 2] = _mm512_dpbusd_epi32(s[g % 2], *w, bcast512!(x, g));
    }
    _mm512_add_epi32(s[0], s[1])
}

/// [`dot_groups512`] on AVX2 for 8 columns, for codes below 16 (Q4_K): u4 x s8 pairs are at
/// most 2 * 15 * 128 in magnitude, so eight groups summed in i16 stay below 2^15.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_groups256_u4(w: &[__m256i; 8], x: *const i8) -> __m256i {
    let mut p16 = _mm256_maddubs_epi16(w[0], bcast256!(x, 0));
    for (g, w) in w.iter().enumerate().skip(1) {
        p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(*w, bcast256!(x, g)));
    }
    _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
}

/// The same for four groups of codes below 64 (Q6_K): a pair is at most 2 * 63 * 128 = 16,128
/// in magnitude, so two groups may share an i16 sum, not more.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dot_groups256_u6(w: &[__m256i], x: *const i8) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let p01 = _mm256_add_epi16(
        _mm256_maddubs_epi16(w[0], bcast256!(x, 0)),
        _mm256_maddubs_epi16(w[1], bcast256!(x, 1)),
    );
    let p23 = _mm256_add_epi16(
        _mm256_maddubs_epi16(w[2], bcast256!(x, 2)),
        _mm256_maddubs_epi16(w[3], bcast256!(x, 3)),
    );
    _mm256_add_epi32(_mm256_madd_epi16(p01, ones), _mm256_madd_epi16(p23, ones))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(super) unsafe fn q4k_vnni<const R: usize>(
    tiles: &[TileQ4K],
    acts: &QInput,
    row0: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let nsb = acts.nsb();
    let x8 = &acts.q8k;
    let (xq, xd, xb) = (x8.qs.as_ptr(), x8.d.as_ptr(), x8.bsum32.as_ptr());
    let low = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, t) in tiles.iter().enumerate() {
        let mut si = [zero; R];
        // Sub-blocks 2h (low nibbles) and 2h + 1 (high nibbles), decoded once for R rows.
        for h in 0..4 {
            let p = t.qs.as_ptr().add(h * 512) as *const __m512i;
            let mut lo = [zero; 8];
            let mut hi = [zero; 8];
            for g in 0..8 {
                let raw = _mm512_load_si512(p.add(g));
                lo[g] = _mm512_and_si512(raw, low);
                hi[g] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
            }
            let scale = |j: usize| {
                _mm512_cvtepu8_epi32(_mm_loadu_si128(t.scales.as_ptr().add(j * 16) as *const _))
            };
            let (sc_lo, sc_hi) = (scale(2 * h), scale(2 * h + 1));
            for (r, si) in si.iter_mut().enumerate() {
                let x = xq.add(((row0 + r) * nsb + b) * SUPER_BLOCK + 64 * h);
                let s_lo = _mm512_mullo_epi32(dot_groups512(&lo, x), sc_lo);
                let s_hi = _mm512_mullo_epi32(dot_groups512(&hi, x.add(32)), sc_hi);
                *si = _mm512_add_epi32(*si, _mm512_add_epi32(s_lo, s_hi));
            }
        }
        // Pairs of minimums (as i16) against pairs of the row's sums of 32 codes.
        let mins: [__m512i; 4] = std::array::from_fn(|p| {
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(t.mins.as_ptr().add(p * 32) as *const _))
        });
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr() as *const __m256i));
        let dm = _mm512_cvtph_ps(_mm256_loadu_si256(t.dmin.as_ptr() as *const __m256i));
        for (r, (acc, si)) in acc.iter_mut().zip(si).enumerate() {
            let a = (row0 + r) * nsb + b;
            let sums = xb.add(a * 8);
            let mut mi = zero;
            for (p, mins) in mins.iter().enumerate() {
                mi = _mm512_dpwssd_epi32(mi, *mins, pair512!(sums, p));
            }
            let dx = _mm512_set1_ps(*xd.add(a));
            let v = _mm512_sub_ps(
                _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(si)),
                _mm512_mul_ps(_mm512_mul_ps(dm, dx), _mm512_cvtepi32_ps(mi)),
            );
            *acc = _mm512_add_ps(*acc, v);
        }
    }
    store512(&acc, out, n, cols);
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub(super) unsafe fn q6k_vnni<const R: usize>(
    tiles: &[TileQ6K],
    acts: &QInput,
    row0: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let nsb = acts.nsb();
    let x8 = &acts.q8k;
    let (xq, xd, xb) = (x8.qs.as_ptr(), x8.d.as_ptr(), x8.bsum16.as_ptr());
    let low = _mm512_set1_epi8(0x0F);
    let top = _mm512_set1_epi8(0x30);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, t) in tiles.iter().enumerate() {
        let mut si = [zero; R];
        // sum over sub-blocks of scale * sum x: the codes' offset of 32, removed at the end.
        let mut offset = [zero; R];
        for h in 0..2 {
            for t6 in 0..4 {
                // Inputs 128h + 32 t6 .. + 32: sub-blocks 2p and 2p + 1.
                let (s, high) = (t6 % 2, t6 / 2);
                let pl = t.ql.as_ptr().add((h * 2 + s) * 512) as *const __m512i;
                let ph = t.qh.as_ptr().add(h * 512) as *const __m512i;
                let mut w = [zero; 8];
                for (g, w) in w.iter_mut().enumerate() {
                    let l = _mm512_loadu_si512(pl.add(g));
                    let l = match high {
                        0 => _mm512_and_si512(l, low),
                        _ => _mm512_and_si512(_mm512_srli_epi16::<4>(l), low),
                    };
                    let q = _mm512_loadu_si512(ph.add(g));
                    // Bits 2 t6 and 2 t6 + 1 of the high-bits byte to bits 4 and 5.
                    let q = match t6 {
                        0 => _mm512_slli_epi16::<4>(q),
                        1 => _mm512_slli_epi16::<2>(q),
                        2 => q,
                        _ => _mm512_srli_epi16::<2>(q),
                    };
                    // l | (q & 0x30)
                    *w = _mm512_ternarylogic_epi32::<0xF8>(l, q, top);
                }
                let p = h * 4 + t6;
                let pair = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                    t.scales.as_ptr().add(p * 32) as *const __m256i
                ));
                let sc0 = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(pair));
                let sc1 = _mm512_srai_epi32::<16>(pair);
                let (w0, w1): (&[__m512i; 4], &[__m512i; 4]) =
                    (w[..4].try_into().unwrap(), w[4..].try_into().unwrap());
                for r in 0..R {
                    let a = (row0 + r) * nsb + b;
                    let x = xq.add(a * SUPER_BLOCK + 128 * h + 32 * t6);
                    let s0 = _mm512_mullo_epi32(dot_groups512(w0, x), sc0);
                    let s1 = _mm512_mullo_epi32(dot_groups512(w1, x.add(16)), sc1);
                    si[r] = _mm512_add_epi32(si[r], _mm512_add_epi32(s0, s1));
                    offset[r] = _mm512_dpwssd_epi32(offset[r], pair, pair512!(xb.add(a * 16), p));
                }
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.d.as_ptr() as *const __m256i));
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = (row0 + r) * nsb + b;
            let si = _mm512_sub_epi32(si[r], _mm512_slli_epi32::<5>(offset[r]));
            let dx = _mm512_set1_ps(*xd.add(a));
            let v = _mm512_mul_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(si));
            *acc = _mm512_add_ps(*acc, v);
        }
    }
    store512(&acc, out, n, cols);
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q4k_avx2<const R: usize>(
    tiles: &[TileQ4K],
    acts: &QInput,
    row0: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let nsb = acts.nsb();
    let x8 = &acts.q8k;
    let (xq, xd, xb) = (x8.qs.as_ptr(), x8.d.as_ptr(), x8.bsum32.as_ptr());
    let low = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    for half in 0..2 {
        if half * 8 >= cols {
            break;
        }
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, t) in tiles.iter().enumerate() {
            let mut si = [zero; R];
            for h in 0..4 {
                // Group g of this half: bytes h * 512 + g * 64 + half * 32 .. + 32.
                let p = t.qs.as_ptr().add(h * 512 + half * 32) as *const __m256i;
                let mut lo = [zero; 8];
                let mut hi = [zero; 8];
                for g in 0..8 {
                    let raw = _mm256_load_si256(p.add(2 * g));
                    lo[g] = _mm256_and_si256(raw, low);
                    hi[g] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                }
                let scale = |j: usize| {
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        t.scales.as_ptr().add(j * 16 + half * 8) as *const _
                    ))
                };
                let (sc_lo, sc_hi) = (scale(2 * h), scale(2 * h + 1));
                for (r, si) in si.iter_mut().enumerate() {
                    let x = xq.add(((row0 + r) * nsb + b) * SUPER_BLOCK + 64 * h);
                    let s_lo = _mm256_mullo_epi32(dot_groups256_u4(&lo, x), sc_lo);
                    let s_hi = _mm256_mullo_epi32(dot_groups256_u4(&hi, x.add(32)), sc_hi);
                    *si = _mm256_add_epi32(*si, _mm256_add_epi32(s_lo, s_hi));
                }
            }
            let mins: [__m256i; 4] = std::array::from_fn(|p| {
                _mm256_cvtepu8_epi16(_mm_loadu_si128(
                    t.mins.as_ptr().add(p * 32 + half * 16) as *const _
                ))
            });
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(half * 8) as *const _));
            let dm = _mm256_cvtph_ps(_mm_loadu_si128(t.dmin.as_ptr().add(half * 8) as *const _));
            for (r, (acc, si)) in acc.iter_mut().zip(si).enumerate() {
                let a = (row0 + r) * nsb + b;
                let sums = xb.add(a * 8);
                let mut mi = zero;
                for (p, mins) in mins.iter().enumerate() {
                    mi = _mm256_add_epi32(mi, _mm256_madd_epi16(*mins, pair256!(sums, p)));
                }
                let dx = _mm256_set1_ps(*xd.add(a));
                let v = _mm256_sub_ps(
                    _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(si)),
                    _mm256_mul_ps(_mm256_mul_ps(dm, dx), _mm256_cvtepi32_ps(mi)),
                );
                *acc = _mm256_add_ps(*acc, v);
            }
        }
        store256(&acc, out.add(half * 8), n, cols - half * 8);
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn q6k_avx2<const R: usize>(
    tiles: &[TileQ6K],
    acts: &QInput,
    row0: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let nsb = acts.nsb();
    let x8 = &acts.q8k;
    let (xq, xd, xb) = (x8.qs.as_ptr(), x8.d.as_ptr(), x8.bsum16.as_ptr());
    let low = _mm256_set1_epi8(0x0F);
    let top = _mm256_set1_epi8(0x30);
    let zero = _mm256_setzero_si256();
    for half in 0..2 {
        if half * 8 >= cols {
            break;
        }
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, t) in tiles.iter().enumerate() {
            let mut si = [zero; R];
            let mut offset = [zero; R];
            for h in 0..2 {
                for t6 in 0..4 {
                    let (s, high) = (t6 % 2, t6 / 2);
                    let pl = t.ql.as_ptr().add((h * 2 + s) * 512 + half * 32) as *const __m256i;
                    let ph = t.qh.as_ptr().add(h * 512 + half * 32) as *const __m256i;
                    let mut w = [zero; 8];
                    for (g, w) in w.iter_mut().enumerate() {
                        let l = _mm256_loadu_si256(pl.add(2 * g));
                        let l = match high {
                            0 => _mm256_and_si256(l, low),
                            _ => _mm256_and_si256(_mm256_srli_epi16::<4>(l), low),
                        };
                        let q = _mm256_loadu_si256(ph.add(2 * g));
                        let q = match t6 {
                            0 => _mm256_slli_epi16::<4>(q),
                            1 => _mm256_slli_epi16::<2>(q),
                            2 => q,
                            _ => _mm256_srli_epi16::<2>(q),
                        };
                        *w = _mm256_or_si256(l, _mm256_and_si256(q, top));
                    }
                    let p = h * 4 + t6;
                    let pair = _mm256_cvtepi8_epi16(_mm_loadu_si128(
                        t.scales.as_ptr().add(p * 32 + half * 16) as *const __m128i,
                    ));
                    let sc0 = _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(pair));
                    let sc1 = _mm256_srai_epi32::<16>(pair);
                    for r in 0..R {
                        let a = (row0 + r) * nsb + b;
                        let x = xq.add(a * SUPER_BLOCK + 128 * h + 32 * t6);
                        let s0 = _mm256_mullo_epi32(dot_groups256_u6(&w[..4], x), sc0);
                        let s1 = _mm256_mullo_epi32(dot_groups256_u6(&w[4..], x.add(16)), sc1);
                        si[r] = _mm256_add_epi32(si[r], _mm256_add_epi32(s0, s1));
                        let sums = pair256!(xb.add(a * 16), p);
                        offset[r] = _mm256_add_epi32(offset[r], _mm256_madd_epi16(pair, sums));
                    }
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(t.d.as_ptr().add(half * 8) as *const _));
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = (row0 + r) * nsb + b;
                let si = _mm256_sub_epi32(si[r], _mm256_slli_epi32::<5>(offset[r]));
                let dx = _mm256_set1_ps(*xd.add(a));
                let v = _mm256_mul_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(si));
                *acc = _mm256_add_ps(*acc, v);
            }
        }
        store256(&acc, out.add(half * 8), n, cols - half * 8);
    }
}
