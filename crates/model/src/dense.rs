//! `out = x W^T` for dense f32 weights on the CPU, in one fixed order of operations, so that a
//! row's result never depends on how many rows its step has.
//!
//! candle's dense matmul picks its kernels (and with them its order of additions) by the shape
//! of the product, so a row computed alone and the same row inside a 5-row step could differ in
//! their last bits, and a near-tie between two tokens could flip: batching, chunked prefill and
//! speculative verification would then change greedy text on f32 Hugging Face folders, which the
//! quantized kernels (`crate::qmatmul`) never do. This kernel gives every output element the same
//! arithmetic wherever it is computed:
//!
//! ```text
//! acc[l] = fma(x[16j + l], w[16j + l], acc[l])   for j = 0, 1, ... (k padded with zeros to 16)
//! out    = ((acc[0..8] + acc[8..16]) folded to 4, then 2, then 1 lane)
//! ```
//!
//! AVX-512 holds the 16 lanes in one register, AVX2 in two, the scalar path in an array, and
//! the pairwise folding is the same tree everywhere, so every path is bit-identical. A step's
//! rows and columns are taken four by four (a 4 x 4 register tile: four weight rows and four
//! activation rows loaded per 16 inputs, sixteen FMAs); tails reuse the last row or column and
//! throw the duplicate away, which again leaves every element's arithmetic unchanged.

use crate::math::{reduce, LANES};
use crate::pool::DisjointWriter;
use crate::qmatmul::Isa;

/// Rows and columns per register tile.
const TILE: usize = 4;
/// Rows per work item: the activation rows a worker keeps in cache while it walks its columns.
const ROW_CHUNK: usize = 64;

/// `out[r * n + c] = sum_k x[r * k + i] * w[c * k + i]` for `m` rows, on the model's pool.
///
/// # Panics
/// If `x`, `w` or `out` are not `m x k`, `n x k`, `m x n`.
pub fn matmul(x: &[f32], m: usize, w: &[f32], n: usize, out: &mut [f32]) {
    matmul_with(best_isa(), x, m, w, n, out)
}

/// [`matmul`] on a given instruction set (all give bit-identical results).
///
/// # Panics
/// If `isa` is not available here, or the shapes are wrong.
pub fn matmul_with(isa: Isa, x: &[f32], m: usize, w: &[f32], n: usize, out: &mut [f32]) {
    assert!(
        is_available(isa),
        "dense matmul: {isa:?} is not available here"
    );
    if m == 0 || n == 0 {
        return;
    }
    let k = w.len() / n;
    assert_eq!(w.len(), n * k, "dense matmul: w is not {n} x k");
    assert_eq!(x.len(), m * k, "dense matmul: x is not {m} x {k}");
    assert_eq!(out.len(), m * n, "dense matmul: out is not {m} x {n}");
    let col_groups = n.div_ceil(TILE);
    let items = m.div_ceil(ROW_CHUNK) * col_groups;
    let out = DisjointWriter::new(out);
    let work = |range: std::ops::Range<usize>| {
        for item in range {
            let (chunk, group) = (item / col_groups, item % col_groups);
            let rows = chunk * ROW_CHUNK..m.min((chunk + 1) * ROW_CHUNK);
            let cols = group * TILE..n.min((group + 1) * TILE);
            let cs: [usize; TILE] = std::array::from_fn(|i| (cols.start + i).min(cols.end - 1));
            for r0 in rows.clone().step_by(TILE) {
                let rs: [usize; TILE] = std::array::from_fn(|i| (r0 + i).min(rows.end - 1));
                let tile = tile(isa, x, w, k, rs, cs);
                // The duplicated tail rows and columns are dropped here.
                for (r, values) in (r0..rows.end).zip(tile) {
                    // SAFETY: each (row chunk, column group) item goes to one worker, so no two
                    // live chunks overlap.
                    let row = unsafe { out.chunk(r * n + cols.start, cols.len()) };
                    row.copy_from_slice(&values[..cols.len()]);
                }
            }
        }
    };
    crate::pool::pool().execute_chunked(items, work);
}

/// The fastest instruction set for this kernel (detected once).
fn best_isa() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        Isa::available()
            .into_iter()
            .find(|&isa| is_available(isa))
            .unwrap_or(Isa::Scalar)
    })
}

/// AVX-512 F is part of [`Isa::Avx512Vnni`]; AVX2 needs FMA besides.
fn is_available(isa: Isa) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => isa.is_available() && is_x86_feature_detected!("fma"),
        _ => isa.is_available(),
    }
}

/// The 4 x 4 outputs of rows `rs` and columns `cs`.
fn tile(
    isa: Isa,
    x: &[f32],
    w: &[f32],
    k: usize,
    rs: [usize; TILE],
    cs: [usize; TILE],
) -> [[f32; TILE]; TILE] {
    let xs = rs.map(|r| &x[r * k..(r + 1) * k]);
    let ws = cs.map(|c| &w[c * k..(c + 1) * k]);
    match isa {
        // SAFETY: the instruction sets were checked by `matmul_with`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { x86::tile512(xs, ws) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::tile256(xs, ws) },
        _ => tile_scalar(xs, ws),
    }
}

/// The reference arithmetic (see the module docs), element by element.
fn tile_scalar(xs: [&[f32]; TILE], ws: [&[f32]; TILE]) -> [[f32; TILE]; TILE] {
    std::array::from_fn(|i| std::array::from_fn(|j| dot_reference(xs[i], ws[j])))
}

/// One element in the reference order.
fn dot_reference(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (xc, wc) in x.chunks(LANES).zip(w.chunks(LANES)) {
        for (l, acc) in acc.iter_mut().enumerate() {
            let (a, b) = (xc.get(l).copied(), wc.get(l).copied());
            *acc = a.unwrap_or(0.0).mul_add(b.unwrap_or(0.0), *acc);
        }
    }
    reduce(acc)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{LANES, TILE};
    use std::arch::x86_64::*;

    /// Lanes 0..8 of `v` folded as [`crate::math::reduce`] does its last three levels.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn fold8(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
        _mm_cvtss_f32(s1)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile512(xs: [&[f32]; TILE], ws: [&[f32]; TILE]) -> [[f32; TILE]; TILE] {
        let k = xs[0].len();
        let mut acc = [[_mm512_setzero_ps(); TILE]; TILE];
        let mut wv = [_mm512_setzero_ps(); TILE];
        let mut at = 0;
        while at < k {
            let take = (k - at).min(LANES);
            // Zeros past the end, as the reference pads.
            let mask: __mmask16 = if take == LANES {
                !0
            } else {
                (1u16 << take) - 1
            };
            for j in 0..TILE {
                wv[j] = _mm512_maskz_loadu_ps(mask, ws[j].as_ptr().add(at));
            }
            for i in 0..TILE {
                let xv = _mm512_maskz_loadu_ps(mask, xs[i].as_ptr().add(at));
                for j in 0..TILE {
                    acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
                }
            }
            at += LANES;
        }
        let mut out = [[0f32; TILE]; TILE];
        for i in 0..TILE {
            for j in 0..TILE {
                let v = acc[i][j];
                let lo = _mm512_castps512_ps256(v);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
                out[i][j] = fold8(_mm256_add_ps(lo, hi));
            }
        }
        out
    }

    /// One block of 16 inputs at `x[i] + at`, `w[j] + at` into the two halves' accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn step256(
        lo: &mut [[__m256; TILE]; TILE],
        hi: &mut [[__m256; TILE]; TILE],
        xs: [*const f32; TILE],
        ws: [*const f32; TILE],
    ) {
        let mut w_lo = [_mm256_setzero_ps(); TILE];
        let mut w_hi = [_mm256_setzero_ps(); TILE];
        for j in 0..TILE {
            w_lo[j] = _mm256_loadu_ps(ws[j]);
            w_hi[j] = _mm256_loadu_ps(ws[j].add(8));
        }
        for i in 0..TILE {
            let (x_lo, x_hi) = (_mm256_loadu_ps(xs[i]), _mm256_loadu_ps(xs[i].add(8)));
            for j in 0..TILE {
                lo[i][j] = _mm256_fmadd_ps(x_lo, w_lo[j], lo[i][j]);
                hi[i][j] = _mm256_fmadd_ps(x_hi, w_hi[j], hi[i][j]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile256(xs: [&[f32]; TILE], ws: [&[f32]; TILE]) -> [[f32; TILE]; TILE] {
        let k = xs[0].len();
        // Lanes 0..8 and 8..16 of the reference's 16.
        let mut lo = [[_mm256_setzero_ps(); TILE]; TILE];
        let mut hi = [[_mm256_setzero_ps(); TILE]; TILE];
        let full = k / LANES * LANES;
        let mut at = 0;
        while at < full {
            let xp = [0, 1, 2, 3].map(|i| xs[i].as_ptr().add(at));
            let wp = [0, 1, 2, 3].map(|j| ws[j].as_ptr().add(at));
            step256(&mut lo, &mut hi, xp, wp);
            at += LANES;
        }
        if full < k {
            // Zeros past the end, as the reference pads.
            let mut xpad = [[0f32; LANES]; TILE];
            let mut wpad = [[0f32; LANES]; TILE];
            for i in 0..TILE {
                xpad[i][..k - full].copy_from_slice(&xs[i][full..]);
                wpad[i][..k - full].copy_from_slice(&ws[i][full..]);
            }
            let xp = [0, 1, 2, 3].map(|i| xpad[i].as_ptr());
            let wp = [0, 1, 2, 3].map(|j| wpad[j].as_ptr());
            step256(&mut lo, &mut hi, xp, wp);
        }
        let mut out = [[0f32; TILE]; TILE];
        for i in 0..TILE {
            for j in 0..TILE {
                out[i][j] = fold8(_mm256_add_ps(lo[i][j], hi[i][j]));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: &mut u64, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Every instruction set, every row alone or in a batch, gives the reference's bits; and
    /// the reference is an honest dot product.
    #[test]
    fn every_path_and_batch_gives_the_reference_bits() {
        let mut seed = 0x9E37_79B9_7F4A_7C15;
        for (m, n, k) in [(1, 5, 7), (7, 9, 33), (70, 13, 576), (3, 4, 16), (5, 1, 1)] {
            let (x, w) = (values(&mut seed, m * k), values(&mut seed, n * k));
            let reference: Vec<f32> = (0..m * n)
                .map(|e| dot_reference(&x[e / n * k..][..k], &w[e % n * k..][..k]))
                .collect();
            for (e, &r) in reference.iter().enumerate() {
                let exact: f64 = (0..k)
                    .map(|i| x[e / n * k + i] as f64 * w[e % n * k + i] as f64)
                    .sum();
                assert!((r as f64 - exact).abs() < 1e-5 * k as f64, "{r} vs {exact}");
            }
            for isa in Isa::available().into_iter().filter(|&i| is_available(i)) {
                let mut out = vec![0f32; m * n];
                matmul_with(isa, &x, m, &w, n, &mut out);
                assert!(
                    out.iter()
                        .zip(&reference)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} m={m} n={n} k={k}"
                );
                // Each row alone.
                for r in 0..m {
                    let mut row = vec![0f32; n];
                    matmul_with(isa, &x[r * k..(r + 1) * k], 1, &w, n, &mut row);
                    assert!(row
                        .iter()
                        .zip(&reference[r * n..(r + 1) * n])
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
        }
    }
}
