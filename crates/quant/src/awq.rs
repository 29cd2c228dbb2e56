//! AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
//! Acceleration"), the scale search of its section 3.2, written from the paper.
//!
//! A few input channels carry much larger activations than the rest, and the weights they meet
//! matter most. Multiplying input channel `j` of the weights by `s_j > 1` (and dividing the
//! input by it, folded into the operation before) leaves the product unchanged in full
//! precision but shrinks that weight's relative rounding error. The paper searches
//! `s = s_x^alpha` with `s_x` the mean input magnitude per channel, `alpha` on a grid in
//! [0, 1), for the `alpha` that minimizes the quantized layers' output error on calibration
//! inputs; `alpha = 0` is plain round-to-nearest, so the search never does worse than it.
//!
//! The output error of `X W^T` is measured as `tr(E H E^T)` with `E` the weight error and
//! `H = X^T X / n`: exactly the mean squared output error over every calibration row, at a
//! cost that does not grow with the number of rows.

use candle_core::{Device, Tensor};

use crate::grid::{GroupQuantized, Symmetry};
use crate::rtn::quantize_groups;

/// What the search needs of a projection input: its second moments and mean magnitudes.
pub struct InputStats {
    pub cols: usize,
    /// `X^T X / n`, `[cols, cols]`.
    pub hessian: Tensor,
    /// `mean |x_j|` per input channel.
    pub mean_abs: Vec<f32>,
}

#[derive(Debug, Clone, Copy)]
pub struct AwqOptions {
    pub bits: u32,
    pub group_size: usize,
    /// Points of the `alpha` grid: `alpha = i / grid` for `i` in `0..grid` (20 in the paper).
    pub grid: usize,
}

/// The chosen scales and the projections quantized with them.
pub struct ScaleChoice {
    /// `s`, one per input channel: the projections were quantized as `W diag(s)` and their
    /// input must be divided by `s`.
    pub scales: Vec<f32>,
    pub alpha: f32,
    /// Mean squared output error with the chosen scales, and with none (`alpha = 0`).
    pub error: f64,
    pub error_unscaled: f64,
    /// `Q(W_k diag(s))` for each projection, in the order given.
    pub quantized: Vec<GroupQuantized>,
}

/// A weight `[rows, cols]`, row-major.
pub struct Projection<'a> {
    pub weight: &'a [f32],
    pub rows: usize,
}

/// Searches the scales shared by `projections` (all reading the input `stats` describes).
pub fn search_scales(
    projections: &[Projection],
    stats: &InputStats,
    options: &AwqOptions,
) -> candle_core::Result<ScaleChoice> {
    let mut best: Option<ScaleChoice> = None;
    let mut error_unscaled = f64::NAN;
    for step in 0..options.grid.max(1) {
        let alpha = step as f32 / options.grid.max(1) as f32;
        let scales = scales_for(&stats.mean_abs, alpha);
        let mut error = 0f64;
        let mut quantized = Vec::with_capacity(projections.len());
        for p in projections {
            let (q, e) = quantize_scaled(p, &scales, stats, options)?;
            error += e;
            quantized.push(q);
        }
        if step == 0 {
            error_unscaled = error;
        }
        if best.as_ref().is_none_or(|b| error < b.error) {
            best = Some(ScaleChoice {
                scales,
                alpha,
                error,
                error_unscaled,
                quantized,
            });
        }
    }
    let mut best = best.expect("the grid has at least one point");
    best.error_unscaled = error_unscaled;
    Ok(best)
}

/// `s_x^alpha`, normalized so that the largest and smallest scale are reciprocal (the weights'
/// overall range stays put); channels that never saw an input get a tiny floor, not zero.
pub fn scales_for(mean_abs: &[f32], alpha: f32) -> Vec<f32> {
    let raw: Vec<f32> = mean_abs
        .iter()
        .map(|&m| m.max(1e-4).powf(alpha).max(1e-4))
        .collect();
    let (lo, hi) = raw
        .iter()
        .fold((f32::MAX, 0f32), |(lo, hi), &s| (lo.min(s), hi.max(s)));
    let norm = (lo * hi).sqrt();
    raw.iter().map(|&s| s / norm).collect()
}

/// `Q(W diag(s))` and the output error of the weights it stands for, `Q(W diag(s)) diag(1/s)`.
fn quantize_scaled(
    projection: &Projection,
    scales: &[f32],
    stats: &InputStats,
    options: &AwqOptions,
) -> candle_core::Result<(GroupQuantized, f64)> {
    let cols = stats.cols;
    let scaled: Vec<f32> = projection
        .weight
        .chunks_exact(cols)
        .flat_map(|row| row.iter().zip(scales).map(|(w, s)| w * s))
        .collect();
    let q = quantize_groups(
        &scaled,
        projection.rows,
        cols,
        options.bits,
        options.group_size,
        Symmetry::Asymmetric,
    );
    let effective = unscale_columns(&q.dequantize(), scales);
    let diff: Vec<f32> = projection
        .weight
        .iter()
        .zip(&effective)
        .map(|(w, e)| w - e)
        .collect();
    let error = weighted_error(&diff, projection.rows, &stats.hessian)?;
    Ok((q, error))
}

/// `w diag(1/s)` for `w` `[rows, s.len()]`.
pub fn unscale_columns(weight: &[f32], scales: &[f32]) -> Vec<f32> {
    weight
        .chunks_exact(scales.len())
        .flat_map(|row| row.iter().zip(scales).map(|(w, s)| w / s))
        .collect()
}

/// `tr(E H E^T)` for `diff` = `E` `[rows, cols]`: the squared output error of a weight error
/// on inputs whose second moments `H` (`[cols, cols]`) describes.
pub fn weighted_error(diff: &[f32], rows: usize, hessian: &Tensor) -> candle_core::Result<f64> {
    let cols = diff.len() / rows;
    let e = Tensor::from_slice(diff, (rows, cols), &Device::Cpu)?;
    let total = (e.matmul(hessian)? * &e)?.sum_all()?.to_scalar::<f32>()?;
    Ok(total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_are_normalized_around_one() {
        let s = scales_for(&[4.0, 1.0, 0.25], 1.0);
        assert!((s[0] * s[2] - 1.0).abs() < 1e-5);
        assert!((s[1] - 1.0).abs() < 1e-5);
        assert_eq!(scales_for(&[4.0, 1.0], 0.0), vec![1.0, 1.0]);
    }

    #[test]
    fn search_protects_the_channels_with_large_inputs() {
        // Two channels of 32 carry inputs 50x larger than the rest: rounding errors there cost
        // 2,500x more, and scaling them up before rounding pays off.
        let (rows, cols, n) = (16, 32, 256);
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let weight: Vec<f32> = (0..rows * cols).map(|_| next() * 0.1).collect();
        let x: Vec<f32> = (0..n * cols)
            .map(|i| next() * if i % cols < 2 { 50.0 } else { 1.0 })
            .collect();
        let xt = Tensor::from_slice(&x, (n, cols), &Device::Cpu).unwrap();
        let hessian = (xt.t().unwrap().matmul(&xt).unwrap() / n as f64).unwrap();
        let mean_abs: Vec<f32> = (0..cols)
            .map(|c| (0..n).map(|i| x[i * cols + c].abs()).sum::<f32>() / n as f32)
            .collect();
        let stats = InputStats {
            cols,
            hessian,
            mean_abs,
        };
        let options = AwqOptions {
            bits: 4,
            group_size: 16,
            grid: 20,
        };
        let choice = search_scales(
            &[Projection {
                weight: &weight,
                rows,
            }],
            &stats,
            &options,
        )
        .unwrap();
        assert!(choice.alpha > 0.0);
        assert!(
            choice.error < 0.7 * choice.error_unscaled,
            "{} vs {}",
            choice.error,
            choice.error_unscaled
        );
        assert!(choice.scales[0] > choice.scales[5]);
    }
}
