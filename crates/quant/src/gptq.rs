//! GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers"), written from the paper's Algorithm 1.
//!
//! A linear layer's output error on calibration inputs `X` (`[n, in]`) is
//! `||W X^T - Q X^T||^2 = tr((W - Q) H (W - Q)^T)` with `H = X^T X` (the paper's `2 X X^T`; the
//! factor changes nothing). GPTQ quantizes one input column at a time and spreads each column's
//! rounding error over the columns not yet quantized, weighted by the inverse Hessian, so
//! that later columns compensate for it (Optimal Brain Quantization, with the paper's three
//! changes: a fixed column order for all rows, lazy batch updates, and the Cholesky form of
//! `H^-1`). Each output row is independent given `H`, so rows run in parallel.

use rayon::prelude::*;

use crate::grid::{GroupGrid, GroupQuantized, Symmetry};
use crate::linalg::inverse_upper_cholesky;

/// The sums a layer's Hessian is made of: `X^T X` over every calibration row seen so far.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub cols: usize,
    /// `[cols, cols]`, row-major.
    pub sum: Vec<f64>,
    pub rows_seen: usize,
}

impl Hessian {
    pub fn new(cols: usize) -> Self {
        Self {
            cols,
            sum: vec![0.0; cols * cols],
            rows_seen: 0,
        }
    }

    /// Adds `X^T X` of `x` (`[rows, cols]`, row-major) computed elsewhere (a fast matmul),
    /// `xtx` `[cols, cols]`.
    pub fn add_product(&mut self, xtx: &[f32], rows: usize) {
        for (sum, &v) in self.sum.iter_mut().zip(xtx) {
            *sum += v as f64;
        }
        self.rows_seen += rows;
    }

    /// Adds the rows of `x` one by one (small problems, tests).
    pub fn add_rows(&mut self, x: &[f32]) {
        let n = self.cols;
        for row in x.chunks_exact(n) {
            for i in 0..n {
                let xi = row[i] as f64;
                for (sum, &xj) in self.sum[i * n..(i + 1) * n].iter_mut().zip(row) {
                    *sum += xi * xj as f64;
                }
            }
            self.rows_seen += 1;
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct GptqOptions {
    pub bits: u32,
    pub group_size: usize,
    pub symmetry: Symmetry,
    /// Quantize columns in descending order of `diag(H)` (the paper's "act-order", GPTQModel's
    /// `desc_act`): the columns whose inputs are largest go first, while the most columns are
    /// left to absorb their error.
    pub act_order: bool,
    /// Dampening: `damp * mean(diag(H))` added to the diagonal, so that `H` is safely
    /// positive definite (0.01 in the paper).
    pub damp: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum GptqError {
    #[error(
        "the Hessian is not positive definite at column {column} even after dampening; \
         try a larger --damp or more calibration tokens"
    )]
    NotPositiveDefinite { column: usize },
}

/// Lazy batches of at least this many columns: the updates inside a batch touch only its
/// columns, and the columns after it get the batch's errors in one pass.
const BATCH_COLUMNS: usize = 128;

/// Output rows handled together: they share each read of the inverse Hessian's rows.
const ROW_TILE: usize = 16;

/// `weight` (`[rows, cols]`, row-major) quantized by GPTQ with the Hessian `hessian`.
/// `group_size` must divide `cols`.
pub fn quantize(
    weight: &[f32],
    rows: usize,
    cols: usize,
    hessian: &Hessian,
    options: &GptqOptions,
) -> Result<GroupQuantized, GptqError> {
    assert_eq!(weight.len(), rows * cols);
    assert_eq!(hessian.cols, cols);
    let group_size = options.group_size;
    assert!(group_size > 0 && cols.is_multiple_of(group_size));

    let mut h = hessian.sum.clone();
    let mut weight = weight.to_vec();
    // A column no calibration input ever reached: any value works, so 0, and a unit pivot.
    for i in 0..cols {
        if h[i * cols + i] == 0.0 {
            h[i * cols + i] = 1.0;
            for row in weight.chunks_exact_mut(cols) {
                row[i] = 0.0;
            }
        }
    }
    let mut order: Vec<usize> = (0..cols).collect();
    if options.act_order {
        order.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]));
    }
    let mut permuted_h = vec![0f64; cols * cols];
    for (i, &oi) in order.iter().enumerate() {
        for (j, &oj) in order.iter().enumerate() {
            permuted_h[i * cols + j] = h[oi * cols + oj];
        }
    }
    let mean_diag = (0..cols).map(|i| permuted_h[i * cols + i]).sum::<f64>() / cols as f64;
    for i in 0..cols {
        permuted_h[i * cols + i] += options.damp * mean_diag;
    }
    let upper = inverse_upper_cholesky(&permuted_h, cols)
        .map_err(|c| GptqError::NotPositiveDefinite { column: order[c] })?;
    let upper: Vec<f32> = upper.iter().map(|&v| v as f32).collect();

    let permuted: Vec<f32> = weight
        .chunks_exact(cols)
        .flat_map(|row| order.iter().map(move |&c| row[c]))
        .collect();
    let groups = cols / group_size;
    let batch = group_size * BATCH_COLUMNS.div_ceil(group_size);
    let mut codes_permuted = vec![0u8; rows * cols];
    let mut grids = vec![
        GroupGrid {
            scale: 1.0,
            zero: 0,
            max_code: 0
        };
        rows * groups
    ];
    permuted
        .par_chunks(ROW_TILE * cols)
        .zip(codes_permuted.par_chunks_mut(ROW_TILE * cols))
        .zip(grids.par_chunks_mut(ROW_TILE * groups))
        .for_each(|((tile, codes), grids)| {
            quantize_rows(tile, cols, &upper, options, batch, codes, grids)
        });

    // Back to the original column order; the groups stay those of the quantization order.
    let mut codes = vec![0u8; rows * cols];
    for (row, permuted_row) in codes_permuted.chunks_exact(cols).enumerate() {
        for (j, &c) in order.iter().enumerate() {
            codes[row * cols + c] = permuted_row[j];
        }
    }
    let mut g_idx = vec![0u32; cols];
    for (j, &c) in order.iter().enumerate() {
        g_idx[c] = (j / group_size) as u32;
    }
    Ok(GroupQuantized {
        rows,
        cols,
        bits: options.bits,
        group_size,
        symmetry: options.symmetry,
        codes,
        scales: grids.iter().map(|g| g.scale).collect(),
        zeros: grids.iter().map(|g| g.zero).collect(),
        g_idx,
    })
}

/// Algorithm 1 on a tile of rows (columns already in quantization order): `codes` and
/// `grids` (`[rows, groups]`) receive the result.
fn quantize_rows(
    tile: &[f32],
    cols: usize,
    upper: &[f32],
    options: &GptqOptions,
    batch: usize,
    codes: &mut [u8],
    grids: &mut [GroupGrid],
) {
    let rows = tile.len() / cols;
    let groups = cols / options.group_size;
    let mut w = tile.to_vec();
    let mut errors = vec![0f32; rows * batch];
    for start in (0..cols).step_by(batch) {
        let end = (start + batch).min(cols);
        for i in start..end {
            if i % options.group_size == 0 {
                // The grid of a group is fitted when its first column comes up, on the
                // weights as the errors of the columns before have left them.
                let group = i / options.group_size;
                for r in 0..rows {
                    let values = &w[r * cols + i..r * cols + i + options.group_size];
                    grids[r * groups + group] =
                        GroupGrid::fit(values, options.bits, options.symmetry);
                }
            }
            let pivot = upper[i * cols + i];
            let spread = &upper[i * cols + i + 1..i * cols + end];
            for r in 0..rows {
                let grid = grids[r * groups + i / options.group_size];
                let row = &mut w[r * cols..(r + 1) * cols];
                let code = grid.code(row[i]);
                codes[r * cols + i] = code;
                let error = (row[i] - grid.value(code)) / pivot;
                errors[r * batch + (i - start)] = error;
                for (value, &u) in row[i + 1..end].iter_mut().zip(spread) {
                    *value -= error * u;
                }
            }
        }
        // The batch's errors reach the later columns at once (the lazy update).
        if end < cols {
            for r in 0..rows {
                let row = &mut w[r * cols + end..(r + 1) * cols];
                for k in 0..end - start {
                    let error = errors[r * batch + k];
                    let spread = &upper[(start + k) * cols + end..(start + k + 1) * cols];
                    for (value, &u) in row.iter_mut().zip(spread) {
                        *value -= error * u;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtn::quantize_groups;

    /// Deterministic pseudo-random numbers in [-1, 1).
    fn noise(seed: u64, len: usize) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// `||X W^T - X Q^T||^2` summed over rows of `x` (`[n, cols]`).
    fn output_error(x: &[f32], w: &[f32], q: &[f32], rows: usize, cols: usize) -> f64 {
        let mut total = 0f64;
        for xr in x.chunks_exact(cols) {
            for r in 0..rows {
                let d: f64 = (0..cols)
                    .map(|c| (xr[c] * (w[r * cols + c] - q[r * cols + c])) as f64)
                    .sum();
                total += d * d;
            }
        }
        total
    }

    /// Calibration inputs whose channels differ in scale and are correlated, as activations
    /// are: that is what GPTQ exploits and RTN ignores.
    fn inputs(n: usize, cols: usize) -> Vec<f32> {
        let base = noise(1, n * cols);
        let shared = noise(2, n);
        let mut x = vec![0f32; n * cols];
        for i in 0..n {
            for c in 0..cols {
                let channel_scale = 0.2 + (c % 7) as f32;
                x[i * cols + c] = channel_scale * (base[i * cols + c] + 0.8 * shared[i]);
            }
        }
        x
    }

    fn problem() -> (Vec<f32>, Vec<f32>, Hessian, usize, usize) {
        let (rows, cols, n) = (24, 64, 512);
        let w: Vec<f32> = noise(3, rows * cols).iter().map(|v| v * 0.05).collect();
        let x = inputs(n, cols);
        let mut h = Hessian::new(cols);
        h.add_rows(&x);
        (w, x, h, rows, cols)
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_the_output() {
        let (w, x, h, rows, cols) = problem();
        for (symmetry, act_order) in [
            (Symmetry::Symmetric, false),
            (Symmetry::Asymmetric, false),
            (Symmetry::Symmetric, true),
        ] {
            let options = GptqOptions {
                bits: 4,
                group_size: 16,
                symmetry,
                act_order,
                damp: 0.01,
            };
            let gptq = quantize(&w, rows, cols, &h, &options).unwrap();
            let rtn = quantize_groups(&w, rows, cols, 4, 16, symmetry);
            let gptq_error = output_error(&x, &w, &gptq.dequantize(), rows, cols);
            let rtn_error = output_error(&x, &w, &rtn.dequantize(), rows, cols);
            assert!(
                gptq_error < 0.8 * rtn_error,
                "{symmetry:?} act_order={act_order}: GPTQ {gptq_error} vs RTN {rtn_error}"
            );
        }
    }

    #[test]
    fn act_order_groups_follow_the_quantization_order() {
        let (w, _, h, rows, cols) = problem();
        let options = GptqOptions {
            bits: 4,
            group_size: 16,
            symmetry: Symmetry::Symmetric,
            act_order: true,
            damp: 0.01,
        };
        let q = quantize(&w, rows, cols, &h, &options).unwrap();
        assert!(!q.groups_are_contiguous());
        // Every group holds exactly group_size columns, and the first group the columns with
        // the largest inputs.
        let mut counts = vec![0; cols / 16];
        for &g in &q.g_idx {
            counts[g as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c == 16));
        let largest = (0..cols)
            .max_by(|&a, &b| h.sum[a * cols + a].total_cmp(&h.sum[b * cols + b]))
            .unwrap();
        assert_eq!(q.g_idx[largest], 0);
    }

    #[test]
    fn unreached_columns_quantize_to_zero() {
        let (rows, cols) = (4, 16);
        let w = noise(5, rows * cols);
        let mut x = inputs(64, cols);
        for row in x.chunks_exact_mut(cols) {
            row[3] = 0.0;
        }
        let mut h = Hessian::new(cols);
        h.add_rows(&x);
        let options = GptqOptions {
            bits: 4,
            group_size: 16,
            symmetry: Symmetry::Asymmetric,
            act_order: false,
            damp: 0.01,
        };
        let q = quantize(&w, rows, cols, &h, &options).unwrap().dequantize();
        for r in 0..rows {
            assert_eq!(q[r * cols + 3], 0.0);
        }
    }
}
