//! FP8 E4M3 weights with one f32 scale per output column (compressed-tensors
//! `float-quantized`, per channel or per tensor), batched like the GGUF kernels: a tile of 16
//! columns by 32 inputs is decoded once (E4M3 to bf16 is exact) and applied to [`ROW_TILE`]
//! activation rows.
//!
//! # Activations
//!
//! * **W8A16** ([`Fp8Activations::Bf16`]): rows are rounded to bf16 (nearest even; subnormals
//!   flushed to zero). That rounding is the one difference from an f32 matmul on the
//!   dequantized weights: a relative error of at most 2^-8 per input, the same the GPU kernels
//!   that feed bf16 activations to the tensor cores make.
//! * **W8A8-FP8, dynamic per token** ([`Fp8Activations::E4m3PerToken`]): as vLLM does on GPUs
//!   with FP8 arithmetic, each row is quantized to E4M3 with its own scale `max |x| / 448`
//!   (at least `1 / (448 * 512)`, vLLM's floor), and the products are of E4M3 weights and E4M3
//!   activations, so the outputs carry the checkpoint's intended activation quantization
//!   error. A CPU has no FP8 arithmetic: the E4M3 activation codes are held as bf16 (exactly)
//!   and run through the same kernels, one more multiply per output for the row's scale.
//!
//! # Numerics: `vdpbf16ps`, bit for bit, on every path
//!
//! Per (row, column) the products of pairs of inputs are accumulated exactly as AVX-512 BF16's
//! `vdpbf16ps` does for one lane: `acc = ftz(fma(w[2j+1], x[2j+1], acc))`, then
//! `acc = ftz(fma(w[2j], x[2j], acc))`, where `ftz` flushes a subnormal result to zero (the
//! instruction's fixed denormal handling; its inputs are never subnormal here). This was checked
//! on Zen 4 against 3.2 million random lanes, products and sums in the subnormal range included
//! (0 mismatches; the "pair summed first" and "one rounding" readings both mismatch). Pair `j`
//! goes to chain `j % 4` (four independent chains keep the multiply-adds in flight); at the end
//! `((c0 + c1) + (c2 + c3)) * scale[column] * scale[row]`. The AVX2 kernel (FMA plus an explicit
//! flush) and the scalar one (`f32::mul_add` plus a flush) do the same operations, so every
//! instruction set gives bit-identical results, and a row's result depends on that row alone
//! (batch invariance), as in the rest of this module.

use std::ops::Range;

use super::isa::Isa;
use super::layout::{Bf16Rows, Fp8Activations, Fp8Tiles, QInput, TileFp8, BLOCK, TILE_N};
use super::pack::{Kind, Packed, QWeight};
use crate::e4m3;

/// Rows that share one decoded weight tile, as in the GGUF kernels; tail rows go one by one
/// (the same per-row arithmetic, so this choice never changes a result).
const ROW_TILE: usize = 4;

/// Independent accumulators per (row, column): pairs of inputs go to them round robin.
const CHAINS: usize = 4;

/// Pairs of inputs per tile.
const PAIRS: usize = BLOCK / 2;

/// vLLM's floor on a dynamic per-token FP8 scale, so that an all-zero row divides by something.
const MIN_TOKEN_SCALE: f32 = 1.0 / (e4m3::E4M3_MAX * 512.0);

impl QWeight {
    /// A `[n, k]` matrix of E4M3 codes (row-major, as a safetensors `F8_E4M3` tensor stores
    /// it) with `scales[c]` for output column `c`: `W[c, i] = decode(codes[c * k + i]) *
    /// scales[c]`.
    ///
    /// # Errors
    /// If `k` is not a multiple of 32, the lengths do not match, or a code is NaN (the loader
    /// names the tensor; a NaN weight would make every output it feeds NaN).
    pub fn from_e4m3(
        codes: &[u8],
        n: usize,
        k: usize,
        scales: &[f32],
        activations: Fp8Activations,
    ) -> candle_core::Result<Self> {
        if n == 0 || k == 0 || !k.is_multiple_of(BLOCK) {
            candle_core::bail!("fp8: a {n} x {k} weight: k must be a positive multiple of {BLOCK}");
        }
        if codes.len() != n * k || scales.len() != n {
            candle_core::bail!(
                "fp8: {} codes and {} scales for a {n} x {k} weight",
                codes.len(),
                scales.len()
            );
        }
        if let Some(at) = codes.iter().position(|&c| e4m3::is_nan(c)) {
            candle_core::bail!("fp8: NaN code at row {}, column {}", at / k, at % k);
        }
        let (n_tiles, nb) = (n.div_ceil(TILE_N), k / BLOCK);
        let mut tiles = Vec::with_capacity(n_tiles * nb);
        for t in 0..n_tiles {
            for b in 0..nb {
                // Padding columns hold code 0 (zero) and scale 0.
                let mut tile = TileFp8 {
                    qs: [0; BLOCK * TILE_N],
                };
                for c in 0..TILE_N.min(n - t * TILE_N) {
                    let row = &codes[(t * TILE_N + c) * k + b * BLOCK..][..BLOCK];
                    for (i, &code) in row.iter().enumerate() {
                        tile.qs[(i / 2) * 2 * TILE_N + 2 * c + i % 2] = code;
                    }
                }
                tiles.push(tile);
            }
        }
        let mut padded = scales.to_vec();
        padded.resize(n_tiles * TILE_N, 0.0);
        Ok(Self::from_packed(
            Kind::Fp8,
            n,
            k,
            Packed::Fp8(Fp8Tiles {
                tiles,
                scales: padded,
                activations,
            }),
        ))
    }
}

/// `x` as bf16 bits, rounded to nearest even, a subnormal result flushed to zero (keeping the
/// sign): `vdpbf16ps` reads subnormal inputs as zero, and the other paths must see the same.
#[inline]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let bits = half::bf16::from_f32(x).to_bits();
    match bits & 0x7F80 {
        0 => bits & 0x8000,
        _ => bits,
    }
}

#[inline]
fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

impl QInput {
    /// Fills the bf16 form (`e4m3 == false`) or the per-token E4M3 form of `m` rows of `x`.
    pub(super) fn fill_fp8_forms(&mut self, x: &[f32], m: usize, k: usize, e4m3_rows: bool) {
        let rows = match e4m3_rows {
            true => &mut self.e4m3,
            false => &mut self.bf16,
        };
        rows.values.resize(m * k, 0);
        rows.scales.resize(m, 1.0);
        for ((row, values), scale) in x
            .chunks_exact(k)
            .zip(rows.values.chunks_exact_mut(k))
            .zip(&mut rows.scales)
        {
            match e4m3_rows {
                false => {
                    *scale = 1.0;
                    for (v, &x) in values.iter_mut().zip(row) {
                        *v = bf16_bits(x);
                    }
                }
                true => {
                    let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                    *scale = (amax / e4m3::E4M3_MAX).max(MIN_TOKEN_SCALE);
                    for (v, &x) in values.iter_mut().zip(row) {
                        // E4M3 values are bf16 values: the top 16 bits of the f32 are exact.
                        *v = (e4m3::decode(e4m3::encode(x / *scale)).to_bits() >> 16) as u16;
                    }
                }
            }
        }
    }
}

/// One column tile (`tiles`: its blocks, `scales`: its 16 column scales) of an FP8 weight for
/// `rows`, in row tiles of [`ROW_TILE`], then single rows.
///
/// # Safety
/// `isa` is available; `tiles.len() * 32 == k`; `acts` holds `rows` of `k` values;
/// `scales.len() == 16`; `out + r * n + c` is valid for writes for every row `r` in `rows` and
/// `c < cols <= 16`, and no one else accesses those elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_fp8(
    isa: Isa,
    tiles: &[TileFp8],
    scales: &[f32],
    acts: &Bf16Rows,
    rows: Range<usize>,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let k = tiles.len() * BLOCK;
    assert!(
        acts.values.len() >= rows.end * k
            && acts.scales.len() >= rows.end
            && scales.len() == TILE_N
            && cols <= TILE_N
    );
    let path = Path::of(isa);
    let mut r = rows.start;
    while r < rows.end {
        let take = if rows.end - r >= ROW_TILE {
            ROW_TILE
        } else {
            1
        };
        let dst = out.add(r * n);
        match (path, take) {
            #[cfg(target_arch = "x86_64")]
            (Path::Bf16, ROW_TILE) => {
                x86::fp8_bf16::<ROW_TILE>(tiles, scales, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Path::Bf16, _) => x86::fp8_bf16::<1>(tiles, scales, acts, r, dst, n, cols),
            #[cfg(target_arch = "x86_64")]
            (Path::Avx2, ROW_TILE) => {
                x86::fp8_avx2::<ROW_TILE>(tiles, scales, acts, r, dst, n, cols)
            }
            #[cfg(target_arch = "x86_64")]
            (Path::Avx2, _) => x86::fp8_avx2::<1>(tiles, scales, acts, r, dst, n, cols),
            _ => scalar(tiles, scales, acts, r..r + take, dst, n, cols),
        }
        r += take;
    }
}

/// The kernel an [`Isa`] runs FP8 on: AVX-512 machines without BF16 take the AVX2 kernel, and
/// AVX2 machines without FMA the scalar one (all give the same results).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    #[cfg(target_arch = "x86_64")]
    Bf16,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

impl Path {
    fn of(isa: Isa) -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            let bf16 = || {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512bf16")
            };
            let avx2 = || is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            match isa {
                Isa::Avx512Vnni if bf16() => return Path::Bf16,
                Isa::Avx512Vnni | Isa::Avx2 if avx2() => return Path::Avx2,
                _ => {}
            }
        }
        let _ = isa;
        Path::Scalar
    }
}

/// `vdpbf16ps`'s flush of a subnormal result to zero (of the same sign).
#[inline]
fn ftz(x: f32) -> f32 {
    match x.is_subnormal() {
        true => 0f32.copysign(x),
        false => x,
    }
}

/// The reference arithmetic (see the module documentation), one row and column at a time.
///
/// # Safety
/// As [`tile_fp8`], with `rows` of at most [`ROW_TILE`] rows.
unsafe fn scalar(
    tiles: &[TileFp8],
    scales: &[f32],
    acts: &Bf16Rows,
    rows: Range<usize>,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let k = tiles.len() * BLOCK;
    for (i, r) in rows.enumerate() {
        let x = &acts.values[r * k..(r + 1) * k];
        for (c, &scale) in scales.iter().enumerate().take(cols) {
            let mut chains = [0f32; CHAINS];
            for (b, tile) in tiles.iter().enumerate() {
                for j in 0..PAIRS {
                    let chain = &mut chains[j % CHAINS];
                    let at = 2 * (b * PAIRS + j);
                    let w = |p: usize| e4m3::decode(tile.qs[j * 2 * TILE_N + 2 * c + p]);
                    *chain = ftz(w(1).mul_add(bf16_value(x[at + 1]), *chain));
                    *chain = ftz(w(0).mul_add(bf16_value(x[at]), *chain));
                }
            }
            let sum = (chains[0] + chains[1]) + (chains[2] + chains[3]);
            *out.add(i * n + c) = sum * scale * acts.scales[r];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX-512 BF16 (`vdpbf16ps`, 16 columns per register) and AVX2 (FMA, two halves of 8
    //! columns) kernels: each decodes a pair-of-inputs run of a tile once for `R` rows and
    //! does per (row, column) the operations of [`super::scalar`], lane-wise.
    //!
    //! # Safety (both kernels)
    //! The caller guarantees the target features, and [`super::tile_fp8`]'s conditions for
    //! rows `row0..row0 + R`.

    use std::arch::x86_64::*;

    use super::{Bf16Rows, TileFp8, BLOCK, CHAINS, PAIRS, TILE_N};

    /// bf16 bit patterns of the E4M3 subnormals `m * 2^-9` (m in 0..8), by `m`.
    const SUBNORMALS: [u16; 32] = {
        let mut table = [0u16; 32];
        let mut m = 1;
        while m < 8 {
            table[m] = (crate::e4m3::decode_const(m as u8).to_bits() >> 16) as u16;
            m += 1;
        }
        table
    };

    /// 32 E4M3 codes at `p` as 32 bf16 (exact): normal codes by moving the exponent and
    /// mantissa into place and rebiasing (`(magnitude << 4) + (120 << 7)`), the seven
    /// subnormals from a table, the sign bit last.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn decode32(p: *const u8) -> __m512i {
        let codes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(p as *const __m256i));
        let magnitude = _mm512_and_si512(codes, _mm512_set1_epi16(0x7F));
        let normal = _mm512_add_epi16(
            _mm512_slli_epi16::<4>(magnitude),
            _mm512_set1_epi16(120 << 7),
        );
        let subnormal = _mm512_cmplt_epu16_mask(magnitude, _mm512_set1_epi16(8));
        let table = _mm512_loadu_si512(SUBNORMALS.as_ptr() as *const __m512i);
        let value = _mm512_mask_permutexvar_epi16(normal, subnormal, magnitude, table);
        let sign = _mm512_slli_epi16::<8>(_mm512_and_si512(codes, _mm512_set1_epi16(0x80)));
        _mm512_or_si512(value, sign)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn fp8_bf16<const R: usize>(
        tiles: &[TileFp8],
        scales: &[f32],
        acts: &Bf16Rows,
        row0: usize,
        out: *mut f32,
        n: usize,
        cols: usize,
    ) {
        let k = tiles.len() * BLOCK;
        let x = acts.values.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); CHAINS]; R];
        for (b, tile) in tiles.iter().enumerate() {
            for j in 0..PAIRS {
                let w: __m512bh =
                    std::mem::transmute(decode32(tile.qs.as_ptr().add(j * 2 * TILE_N)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pair = x.add((row0 + r) * k + 2 * (b * PAIRS + j)) as *const i32;
                    let xb: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(pair.read_unaligned()));
                    acc[j % CHAINS] = _mm512_dpbf16_ps(acc[j % CHAINS], w, xb);
                }
            }
        }
        let column_scales = _mm512_loadu_ps(scales.as_ptr());
        let mask = ((1u32 << cols) - 1) as u16;
        for (r, acc) in acc.iter().enumerate() {
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            let y = _mm512_mul_ps(
                _mm512_mul_ps(sum, column_scales),
                _mm512_set1_ps(acts.scales[row0 + r]),
            );
            _mm512_mask_storeu_ps(out.add(r * n), mask, y);
        }
    }

    /// Eight E4M3 codes (one per 32-bit lane) as f32, exactly: the magnitude's bits placed as
    /// an f32 with a zero-based exponent, times 2^120 to rebias (subnormals included: an f32
    /// subnormal times a power of two is exact here), the sign bit last.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn decode8(codes: __m256i) -> __m256 {
        let magnitude = _mm256_and_si256(codes, _mm256_set1_epi32(0x7F));
        let value = _mm256_mul_ps(
            _mm256_castsi256_ps(_mm256_slli_epi32::<20>(magnitude)),
            _mm256_set1_ps(f32::from_bits((127 + 120) << 23)),
        );
        let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(codes, _mm256_set1_epi32(0x80)));
        _mm256_or_ps(value, _mm256_castsi256_ps(sign))
    }

    /// `fma(w, x, acc)` flushed to zero when subnormal, lane-wise: one `vdpbf16ps` step.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma_ftz(w: __m256, x: f32, acc: __m256) -> __m256 {
        let v = _mm256_fmadd_ps(w, _mm256_set1_ps(x), acc);
        let sign = _mm256_set1_ps(-0.0);
        let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(
            _mm256_andnot_ps(sign, v),
            _mm256_set1_ps(f32::MIN_POSITIVE),
        );
        _mm256_blendv_ps(v, _mm256_and_ps(v, sign), tiny)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fp8_avx2<const R: usize>(
        tiles: &[TileFp8],
        scales: &[f32],
        acts: &Bf16Rows,
        row0: usize,
        out: *mut f32,
        n: usize,
        cols: usize,
    ) {
        let k = tiles.len() * BLOCK;
        let value = |at: usize| f32::from_bits((acts.values[at] as u32) << 16);
        for half in 0..2 {
            if half * 8 >= cols {
                break;
            }
            let mut acc = [[_mm256_setzero_ps(); CHAINS]; R];
            for (b, tile) in tiles.iter().enumerate() {
                for j in 0..PAIRS {
                    // Columns 8 half .. + 8 of pair j: 16 bytes, (even, odd) per column.
                    let p = tile.qs.as_ptr().add(j * 2 * TILE_N + 16 * half);
                    let pairs = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
                    let even = decode8(_mm256_and_si256(pairs, _mm256_set1_epi32(0xFF)));
                    let odd = decode8(_mm256_srli_epi32::<8>(pairs));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let at = (row0 + r) * k + 2 * (b * PAIRS + j);
                        let chain = &mut acc[j % CHAINS];
                        *chain = fma_ftz(odd, value(at + 1), *chain);
                        *chain = fma_ftz(even, value(at), *chain);
                    }
                }
            }
            let column_scales = _mm256_loadu_ps(scales.as_ptr().add(8 * half));
            let cols = (cols - 8 * half).min(8);
            for (r, acc) in acc.iter().enumerate() {
                let sum =
                    _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                let y = _mm256_mul_ps(
                    _mm256_mul_ps(sum, column_scales),
                    _mm256_set1_ps(acts.scales[row0 + r]),
                );
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), y);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.add(r * n + 8 * half), cols);
            }
        }
    }
}
