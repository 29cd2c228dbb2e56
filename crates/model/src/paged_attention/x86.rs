//! The AVX-512 row kernel: the query (up to 128 values) and the output accumulators live in
//! registers for the whole row, f16 keys and values are widened as they are loaded
//! (`vcvtph2ps`), and multiply-adds are fused.

use std::arch::x86_64::*;

use half::f16;

use super::Row;
use crate::kv_cache::{KvPool, LayerKv};
use crate::math::exp_minus_max;

/// Whether this machine and head size can use [`attend_row`].
pub fn supports(head_dim: usize) -> bool {
    matches!(head_dim, 16 | 32 | 64 | 128)
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("f16c")
}

/// Sixteen cached values as f32 lanes.
trait Load16: Copy {
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

/// # Safety
/// [`supports`] holds for `row.query.len()`; every run of `runs` holds `block_size` keys and
/// values inside the pool; `scores` holds `row.context` values; `out` holds `head_dim`.
pub unsafe fn attend_row(
    kv: &LayerKv,
    row: &Row,
    runs: &[(usize, usize)],
    scores: &mut [f32],
    out: &mut [f32],
) {
    match (kv, row.query.len() / 16) {
        (LayerKv::F16(pool), 1) => row_kernel::<f16, 1>(pool, row, runs, scores, out),
        (LayerKv::F16(pool), 2) => row_kernel::<f16, 2>(pool, row, runs, scores, out),
        (LayerKv::F16(pool), 4) => row_kernel::<f16, 4>(pool, row, runs, scores, out),
        (LayerKv::F16(pool), 8) => row_kernel::<f16, 8>(pool, row, runs, scores, out),
        (LayerKv::F32(pool), 1) => row_kernel::<f32, 1>(pool, row, runs, scores, out),
        (LayerKv::F32(pool), 2) => row_kernel::<f32, 2>(pool, row, runs, scores, out),
        (LayerKv::F32(pool), 4) => row_kernel::<f32, 4>(pool, row, runs, scores, out),
        (LayerKv::F32(pool), 8) => row_kernel::<f32, 8>(pool, row, runs, scores, out),
        _ => unreachable!("checked by `supports`"),
    }
}

/// One row with a head size of `16 * CH`.
#[target_feature(enable = "avx512f,f16c")]
unsafe fn row_kernel<T: Load16, const CH: usize>(
    pool: &KvPool<T>,
    row: &Row,
    runs: &[(usize, usize)],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let head_dim = 16 * CH;
    let visible = |first_key: usize| (row.context - first_key).min(row.block_size);
    let query: [__m512; CH] =
        std::array::from_fn(|c| _mm512_loadu_ps(row.query.as_ptr().add(16 * c)));
    let scores_ptr = scores.as_mut_ptr();
    for &(first_key, start) in runs {
        let keys = pool.keys.as_ptr().add(start);
        for j in 0..visible(first_key) {
            let key = keys.add(j * head_dim);
            let mut acc = _mm512_mul_ps(query[0], T::load16(key));
            for (c, q) in query.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(*q, T::load16(key.add(16 * c)), acc);
            }
            *scores_ptr.add(first_key + j) = _mm512_reduce_add_ps(acc) * row.scale;
        }
    }
    let sum = exp_minus_max(&mut scores[..row.context]);
    let mut acc = [_mm512_setzero_ps(); CH];
    for &(first_key, start) in runs {
        let values = pool.values.as_ptr().add(start);
        for j in 0..visible(first_key) {
            let weight = _mm512_set1_ps(*scores_ptr.add(first_key + j));
            let value = values.add(j * head_dim);
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(weight, T::load16(value.add(16 * c)), *acc);
            }
        }
    }
    let inverse = _mm512_set1_ps(1.0 / sum);
    for (c, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.as_mut_ptr().add(16 * c), _mm512_mul_ps(*acc, inverse));
    }
}
