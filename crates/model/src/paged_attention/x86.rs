//! The AVX-512 kernel: the queries of up to four heads sharing a KV head (head size up to 128)
//! and their output accumulators live in registers for the whole context, each key and value is
//! loaded once for all of them, f16, i8 and E4M3 keys and values are widened as they are
//! loaded (`vcvtph2ps`; `vpmovsxbd` + `vcvtdq2ps`; a zero-extension, shift and multiply), and
//! multiply-adds are fused.
//!
//! The i8 (q8) and E4M3 (fp8) caches' per-token scales cost one multiply per block of 16
//! scores (a row's score is its code dot product times the key's scale) and one per value
//! (folded into the softmax weight broadcast for it): nothing per product.

use std::arch::x86_64::*;

use half::f16;

use super::query_group::QueryGroup;
use crate::e4m3::{E4m3, E4M3_NAN};
use crate::kv_cache::{KvElement, KvPool, LayerKv};
use crate::math::exp_minus_max;

/// Tokens the kernel scores at once: one 512-bit register of f32 lanes. A block holds one or
/// more such lanes' worth (block sizes 16, 32, 64, ...).
const LANES: usize = 16;

/// How far ahead keys are prefetched, in tokens (whole blocks, at least one).
const PREFETCH_TOKENS: usize = 64;

/// Whether this machine, head size and block size can use [`attend_group`].
pub fn supports(head_dim: usize, block_size: usize) -> bool {
    matches!(head_dim, 16 | 32 | 64 | 128)
        && block_size >= LANES
        && block_size.is_multiple_of(LANES)
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("f16c")
}

/// Sixteen cached values as f32 lanes (the stored numbers: a scaled type's codes, unscaled).
trait Load16: KvElement {
    /// # Safety
    /// AVX-512 F and F16C are available; 16 values are readable at `p`.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Load16 for f32 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
}

impl Load16 for f16 {
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn load16(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

impl Load16 for i8 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const i8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }
}

/// E4M3 codes widened exactly: the magnitude's bits placed as an f32 with a zero-based
/// exponent, times 2^120 to rebias (E4M3 subnormals land on f32 subnormals, and scaling those
/// by a power of two is exact), then the sign; the NaN code gives NaN, as the table does.
impl Load16 for E4m3 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const E4m3) -> __m512 {
        let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        let magnitude = _mm512_and_si512(codes, _mm512_set1_epi32(0x7F));
        let value = _mm512_mul_ps(
            _mm512_castsi512_ps(_mm512_slli_epi32::<20>(magnitude)),
            _mm512_set1_ps(f32::from_bits((127 + 120) << 23)),
        );
        let nan = _mm512_cmpeq_epi32_mask(magnitude, _mm512_set1_epi32(E4M3_NAN as i32));
        let value = _mm512_mask_mov_ps(value, nan, _mm512_set1_ps(f32::NAN));
        let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(codes, _mm512_set1_epi32(0x80)));
        _mm512_or_ps(value, _mm512_castsi512_ps(sign))
    }
}

/// Query rows one kernel call handles at once: each needs its query and its accumulators in
/// registers (`2 * CH` of the 32), next to the `CH` registers of the key or value being applied.
const fn max_rows(chunks: usize) -> usize {
    if chunks <= 4 {
        4
    } else {
        2
    }
}

/// # Safety
/// [`supports`] holds for `group.head_dim`; every run of `runs` holds `block_size` keys and
/// values inside the pool; `scores` holds `group.num_rows() * group.context` values; `out`
/// holds `group.num_rows() * head_dim`.
pub unsafe fn attend_group(
    kv: &LayerKv,
    group: &QueryGroup,
    runs: &[(usize, usize)],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let chunks = group.head_dim / 16;
    let step = max_rows(chunks);
    let mut first = 0;
    while first < group.num_rows() {
        let rows = step.min(group.num_rows() - first);
        let queries = &group.queries[first * group.head_dim..];
        let scores = &mut scores[first * group.context..];
        let out = &mut out[first * group.head_dim..];
        macro_rules! kernel {
            ($($ch:literal: $($g:literal)+;)+) => {
                match (kv, chunks, rows) {
                    $($(
                        (LayerKv::F16(pool), $ch, $g) => {
                            rows_kernel::<f16, $ch, $g>(pool, group, queries, runs, scores, out)
                        }
                        (LayerKv::F32(pool), $ch, $g) => {
                            rows_kernel::<f32, $ch, $g>(pool, group, queries, runs, scores, out)
                        }
                        (LayerKv::Q8(pool), $ch, $g) => {
                            rows_kernel::<i8, $ch, $g>(pool, group, queries, runs, scores, out)
                        }
                        (LayerKv::Fp8(pool), $ch, $g) => {
                            rows_kernel::<E4m3, $ch, $g>(pool, group, queries, runs, scores, out)
                        }
                    )+)+
                    _ => unreachable!("checked by `supports` and `max_rows`"),
                }
            };
        }
        kernel! {
            1: 1 2 3 4;
            2: 1 2 3 4;
            4: 1 2 3 4;
            8: 1 2;
        }
        first += rows;
    }
}

/// `G` query rows with a head size of `16 * CH`, all over the same keys: each key and value
/// is loaded (and widened) once for the `G` rows. A row's own arithmetic is the same whatever
/// `G` is, so results do not depend on how a group is split.
#[target_feature(enable = "avx512f,f16c")]
unsafe fn rows_kernel<T: Load16, const CH: usize, const G: usize>(
    pool: &KvPool<T>,
    group: &QueryGroup,
    queries: &[f32],
    runs: &[(usize, usize)],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let head_dim = 16 * CH;
    let context = group.context;
    let block_size = group.block_size;
    let block_bytes = block_size * head_dim * std::mem::size_of::<T>();
    let scale_bytes = block_size * std::mem::size_of::<f32>();
    let prefetch_blocks = (PREFETCH_TOKENS / block_size).max(1);
    let scores_ptr = scores.as_mut_ptr();
    // Keys are dimension-major within a block: lane t of `key(d)` is token t's dimension d, so
    // a row's 16 scores accumulate lane-wise, sixteen tokens of a block at a time. Four
    // accumulators per row (dimensions taken round robin) keep enough independent multiply-adds
    // in flight.
    // Blocks lie anywhere in the pool, where the hardware prefetcher cannot guess, and a block
    // costs less compute than a trip to memory: keys are fetched PREFETCH_TOKENS ahead, and
    // each block's values while its keys are used, for the second pass.
    // A scaled type's run at `start` has its scales, one per token, at `start / head_dim`;
    // the float types have none, and these branches compile away for them.
    let prefetch_keys = |r: usize| {
        if let Some(&(_, start)) = runs.get(r) {
            prefetch::<_MM_HINT_T1>(pool.keys.as_ptr().add(start) as *const i8, block_bytes);
            if T::SCALED {
                let scales = pool.key_scales.as_ptr().add(start / head_dim);
                prefetch::<_MM_HINT_T1>(scales as *const i8, scale_bytes);
            }
        }
    };
    for r in 0..prefetch_blocks {
        prefetch_keys(r);
    }
    let scale = _mm512_set1_ps(group.scale);
    for (r, &(first_key, start)) in runs.iter().enumerate() {
        prefetch_keys(r + prefetch_blocks);
        prefetch::<_MM_HINT_T1>(pool.values.as_ptr().add(start) as *const i8, block_bytes);
        if T::SCALED {
            let scales = pool.value_scales.as_ptr().add(start / head_dim);
            prefetch::<_MM_HINT_T1>(scales as *const i8, scale_bytes);
        }
        let visible = group.visible(first_key);
        // Only the sixteen-token parts of the block that hold visible keys.
        for part in (visible.start / LANES)..visible.end.div_ceil(LANES) {
            let first = part * LANES;
            let keys = pool.keys.as_ptr().add(start + first);
            let mut acc = [[_mm512_setzero_ps(); 4]; G];
            for d in (0..head_dim).step_by(4) {
                for a in 0..4 {
                    let key = T::load16(keys.add((d + a) * block_size));
                    for (g, acc) in acc.iter_mut().enumerate() {
                        let q = _mm512_set1_ps(*queries.get_unchecked(g * head_dim + d + a));
                        acc[a] = _mm512_fmadd_ps(q, key, acc[a]);
                    }
                }
            }
            let (from, to) = (
                visible.start.max(first) - first,
                visible.end.min(first + LANES) - first,
            );
            let lanes = (((1u32 << to) - 1) & !((1u32 << from) - 1)) as u16;
            // Lanes past the context read the block's unused scales, finite and masked off
            // below.
            let key_scales = if T::SCALED {
                _mm512_loadu_ps(pool.key_scales.as_ptr().add(start / head_dim + first))
            } else {
                _mm512_setzero_ps()
            };
            for (g, acc) in acc.iter().enumerate() {
                let mut sum =
                    _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
                if T::SCALED {
                    sum = _mm512_mul_ps(sum, key_scales);
                }
                let at = scores_ptr.add(g * context + first_key + first);
                _mm512_mask_storeu_ps(at, lanes, _mm512_mul_ps(sum, scale));
            }
        }
    }
    let mut inverse = [0f32; G];
    for (g, inverse) in inverse.iter_mut().enumerate() {
        *inverse = 1.0 / exp_minus_max(&mut scores[g * context + group.start..(g + 1) * context]);
    }
    let mut acc = [[_mm512_setzero_ps(); CH]; G];
    for &(first_key, start) in runs {
        let values = pool.values.as_ptr().add(start);
        // Only read when `T::SCALED`: the float types' scales are empty.
        let value_scales = pool.value_scales.as_ptr().wrapping_add(start / head_dim);
        for j in group.visible(first_key) {
            let value = values.add(j * head_dim);
            let mut v = [_mm512_setzero_ps(); CH];
            for (c, v) in v.iter_mut().enumerate() {
                *v = T::load16(value.add(16 * c));
            }
            for (g, acc) in acc.iter_mut().enumerate() {
                let mut weight = *scores_ptr.add(g * context + first_key + j);
                if T::SCALED {
                    weight *= *value_scales.add(j);
                }
                let weight = _mm512_set1_ps(weight);
                for c in 0..CH {
                    acc[c] = _mm512_fmadd_ps(weight, v[c], acc[c]);
                }
            }
        }
    }
    for (g, acc) in acc.iter().enumerate() {
        let inverse = _mm512_set1_ps(inverse[g]);
        for (c, acc) in acc.iter().enumerate() {
            let at = out.as_mut_ptr().add(g * head_dim + 16 * c);
            _mm512_storeu_ps(at, _mm512_mul_ps(*acc, inverse));
        }
    }
}

/// Prefetches the cache lines of the `bytes` at `at`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn prefetch<const HINT: i32>(at: *const i8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<HINT>(at.add(line));
    }
}
