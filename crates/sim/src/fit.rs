//! Fitting a [`LinearCost`] to measured steps: least squares on relative error (a 5 ms decode
//! step and a 300 ms prefill step count alike, so that small batches, which set TPOT at low
//! load, are not drowned by large ones), with every coefficient kept at zero or above (a
//! feature that would come out negative is dropped and the rest refitted: time never shrinks
//! with more work).

use serde::Serialize;

use crate::cost::{Feature, LinearCost, StepFeatures};

/// One measured step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeasuredStep {
    pub features: StepFeatures,
    pub seconds: f64,
}

/// How well a fit describes the steps it was fitted on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FitQuality {
    pub steps: usize,
    /// Median and 90th percentile of |predicted - measured| / measured.
    pub median_relative_error: f64,
    pub p90_relative_error: f64,
    /// Total predicted time over total measured time.
    pub total_time_ratio: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FitError {
    #[error("no measured steps to fit")]
    NoSteps,
    #[error("a measured step took {0} s; step times must be positive")]
    BadTime(f64),
    #[error("no non-negative fit: every feature came out negative")]
    Degenerate,
}

/// Fits the coefficients of `features` (the others stay 0).
pub fn fit_linear(steps: &[MeasuredStep], features: &[Feature]) -> Result<LinearCost, FitError> {
    if steps.is_empty() {
        return Err(FitError::NoSteps);
    }
    if let Some(bad) = steps
        .iter()
        .find(|s| !(s.seconds.is_finite() && s.seconds > 0.0))
    {
        return Err(FitError::BadTime(bad.seconds));
    }
    let mut active: Vec<Feature> = features.to_vec();
    loop {
        if active.is_empty() {
            return Err(FitError::Degenerate);
        }
        let coefficients = weighted_least_squares(steps, &active);
        let most_negative = coefficients
            .iter()
            .enumerate()
            .filter(|(_, &c)| c < 0.0)
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        match most_negative {
            Some(i) => {
                active.remove(i);
            }
            None => {
                let mut cost = LinearCost::default();
                for (&feature, c) in active.iter().zip(coefficients) {
                    *cost.coefficient_mut(feature) = c;
                }
                return Ok(cost);
            }
        }
    }
}

/// Minimises sum(((x . c) - t) / t)^2 through the normal equations, each column scaled to unit
/// size first so that features counted in thousands (keys) and in ones (the constant) condition
/// alike; a column that is all zero gets coefficient 0.
fn weighted_least_squares(steps: &[MeasuredStep], features: &[Feature]) -> Vec<f64> {
    let k = features.len();
    let rows: Vec<Vec<f64>> = steps
        .iter()
        .map(|s| {
            features
                .iter()
                .map(|&f| s.features.get(f) / s.seconds)
                .collect()
        })
        .collect();
    let scale: Vec<f64> = (0..k)
        .map(|j| {
            let norm = rows.iter().map(|r| r[j] * r[j]).sum::<f64>().sqrt();
            if norm > 0.0 {
                norm
            } else {
                1.0
            }
        })
        .collect();
    let mut a = vec![vec![0.0; k + 1]; k];
    for row in &rows {
        for i in 0..k {
            let xi = row[i] / scale[i];
            for j in 0..k {
                a[i][j] += xi * row[j] / scale[j];
            }
            // The target is t / t = 1.
            a[i][k] += xi;
        }
    }
    // A tiny ridge keeps collinear features (decode tokens and sampled rows in decode-only
    // steps) from blowing up; on unit-scaled columns it changes a well-posed fit by nothing
    // measurable.
    for (i, row) in a.iter_mut().enumerate() {
        row[i] += 1e-9;
    }
    solve(&mut a)
        .into_iter()
        .zip(&scale)
        .map(|(c, s)| c / s)
        .collect()
}

/// Gaussian elimination with partial pivoting on the augmented `k x (k + 1)` matrix.
fn solve(a: &mut [Vec<f64>]) -> Vec<f64> {
    let k = a.len();
    for col in 0..k {
        let pivot = (col..k)
            .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        let p = a[col][col];
        if p.abs() < 1e-300 {
            continue;
        }
        let pivot_row = a[col].clone();
        for (row, values) in a.iter_mut().enumerate() {
            if row != col {
                let factor = values[col] / p;
                for (v, pv) in values[col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= factor * pv;
                }
            }
        }
    }
    (0..k)
        .map(|i| {
            if a[i][i].abs() < 1e-300 {
                0.0
            } else {
                a[i][k] / a[i][i]
            }
        })
        .collect()
}

pub fn quality(cost: &LinearCost, steps: &[MeasuredStep]) -> FitQuality {
    let mut errors: Vec<f64> = steps
        .iter()
        .map(|s| (cost.step_seconds(&s.features) - s.seconds).abs() / s.seconds)
        .collect();
    errors.sort_by(f64::total_cmp);
    let predicted: f64 = steps.iter().map(|s| cost.step_seconds(&s.features)).sum();
    let measured: f64 = steps.iter().map(|s| s.seconds).sum();
    FitQuality {
        steps: steps.len(),
        median_relative_error: crate::stats::percentile(&errors, 50.0).unwrap_or(0.0),
        p90_relative_error: crate::stats::percentile(&errors, 90.0).unwrap_or(0.0),
        total_time_ratio: predicted / measured.max(1e-12),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(prefill: usize, decode: usize, keys: usize) -> StepFeatures {
        StepFeatures {
            prefill_tokens: prefill,
            decode_tokens: decode,
            attended_keys: keys,
            context_tokens: keys,
            sequences: decode + usize::from(prefill > 0),
            sampled_rows: decode,
        }
    }

    #[test]
    fn recovers_the_coefficients_of_an_exact_linear_law() {
        let truth = LinearCost {
            constant: 0.004,
            prefill_tokens: 0.0005,
            decode_tokens: 0.0003,
            attended_keys: 2e-7,
            ..LinearCost::default()
        };
        let steps: Vec<MeasuredStep> = [
            (0, 1, 130),
            (0, 64, 9000),
            (512, 0, 70000),
            (200, 30, 30000),
            (0, 8, 1500),
            (128, 2, 8000),
        ]
        .iter()
        .map(|&(p, d, k)| {
            let features = step(p, d, k);
            MeasuredStep {
                features,
                seconds: truth.step_seconds(&features),
            }
        })
        .collect();
        let fitted = fit_linear(
            &steps,
            &[
                Feature::Constant,
                Feature::PrefillTokens,
                Feature::DecodeTokens,
                Feature::AttendedKeys,
            ],
        )
        .unwrap();
        for f in Feature::ALL {
            let (a, b) = (fitted.coefficient(f), truth.coefficient(f));
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-9),
                "{}: {a} vs {b}",
                f.name()
            );
        }
        let q = quality(&fitted, &steps);
        assert!(q.p90_relative_error < 1e-6 && (q.total_time_ratio - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_feature_that_would_be_negative_is_dropped() {
        // Time falls with attended keys in this (made-up) data: the fit must not say so.
        let steps: Vec<MeasuredStep> = [
            (1, 10, 0.011),
            (1, 1000, 0.010),
            (2, 10, 0.013),
            (2, 1000, 0.012),
        ]
        .iter()
        .map(|&(d, k, t)| MeasuredStep {
            features: step(0, d, k),
            seconds: t,
        })
        .collect();
        let fitted = fit_linear(
            &steps,
            &[
                Feature::Constant,
                Feature::DecodeTokens,
                Feature::AttendedKeys,
            ],
        )
        .unwrap();
        assert_eq!(fitted.attended_keys, 0.0);
        assert!(fitted.constant > 0.0 && fitted.decode_tokens > 0.0);
    }

    #[test]
    fn bad_measurements_are_refused() {
        assert_eq!(
            fit_linear(&[], &[Feature::Constant]),
            Err(FitError::NoSteps)
        );
        let bad = [MeasuredStep {
            features: step(0, 1, 1),
            seconds: 0.0,
        }];
        assert_eq!(
            fit_linear(&bad, &[Feature::Constant]),
            Err(FitError::BadTime(0.0))
        );
    }
}
