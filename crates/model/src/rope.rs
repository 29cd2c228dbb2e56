//! Rotary position embeddings applied per token, at each token's own position, so that one call
//! serves a ragged batch whose sequences sit at unrelated positions.

use std::f32::consts::PI;

use crate::config::{RopeScaling, RopeStyle};

/// `cos` and `sin` of `position * theta_i` for every position up to the model's context.
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half_dim: usize,
    style: RopeStyle,
}

/// The `head_dim / 2` rotation frequencies at base `theta`, stretched by `scaling`, following
/// Hugging Face `transformers`' `modeling_rope_utils` (in f32, as it computes them).
pub fn inverse_frequencies(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Vec<f32> {
    // Same f32 arithmetic as candle-transformers' Llama, so that both agree bit for bit.
    let plain = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32));
    match scaling {
        RopeScaling::None => plain.collect(),
        RopeScaling::Linear { factor } => plain.map(|f| f / factor).collect(),
        RopeScaling::Divisors(divisors) => plain.zip(divisors).map(|(f, d)| f / d).collect(),
        &RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => {
            let original = original_context as f32;
            let (low_wavelen, high_wavelen) =
                (original / low_freq_factor, original / high_freq_factor);
            plain
                .map(|f| {
                    let wavelen = 2.0 * PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        &RopeScaling::Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            ..
        } => {
            let dim = head_dim as f32;
            // The dimension at which a frequency turns `rotations` times over the context.
            let correction = |rotations: f32| {
                dim * (original_context as f32 / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln())
            };
            let low = correction(beta_fast).floor().max(0.0);
            let mut high = correction(beta_slow).ceil().min(dim - 1.0);
            if low == high {
                high += 0.001;
            }
            plain
                .enumerate()
                .map(|(i, f)| {
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    (f / factor) * (1.0 - extrapolation) + f * extrapolation
                })
                .collect()
        }
    }
}

/// What `cos` and `sin` are multiplied by: YaRN's attention factor, else 1.
fn attention_factor(scaling: &RopeScaling) -> f32 {
    match scaling {
        RopeScaling::Yarn {
            attention_factor, ..
        } => *attention_factor,
        _ => 1.0,
    }
}

/// Llama 3's parameters `(factor, low_freq_factor, high_freq_factor, original_context)` that
/// give these per-frequency divisors, if some do: the low frequencies' divisor is the factor,
/// and the ramp between (linear in the frequency) fixes the rest up to one common scale of
/// `original_context` and both frequency factors, which `low_freq_factor = 1` (every Llama 3.x
/// release) removes. Needs two frequencies on the ramp.
pub fn llama3_parameters(
    divisors: &[f32],
    head_dim: usize,
    theta: f32,
) -> Option<(f32, f32, f32, usize)> {
    let plain = inverse_frequencies(head_dim, theta, &RopeScaling::None);
    let factor = divisors.iter().copied().fold(1f32, f32::max);
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * b;
    // (frequency / 2pi, ramp position) of the frequencies strictly on the ramp.
    let ramp: Vec<(f64, f64)> = divisors
        .iter()
        .zip(&plain)
        .filter(|&(&d, _)| !close(d, 1.0) && !close(d, factor))
        .map(|(&d, &f)| {
            let smooth = (factor as f64 / d as f64 - 1.0) / (factor as f64 - 1.0);
            (f as f64 / (2.0 * std::f64::consts::PI), smooth)
        })
        .collect();
    let (&(x0, s0), &(x1, s1)) = (ramp.first()?, ramp.last()?);
    if factor <= 1.0 || x0 == x1 {
        return None;
    }
    // smooth = original * x / (high - low) - low / (high - low), with low = 1.
    let slope = (s1 - s0) / (x1 - x0);
    let intercept = s0 - slope * x0;
    if intercept >= 0.0 {
        return None;
    }
    let width = -1.0 / intercept; // high - low
    let original = (slope * width).round() as usize;
    let params = (factor, 1.0, (1.0 + width) as f32, original);
    // Only claim parameters that reproduce every divisor.
    let scaling = RopeScaling::Llama3 {
        factor: params.0,
        low_freq_factor: params.1,
        high_freq_factor: params.2,
        original_context: params.3,
    };
    let again = inverse_frequencies(head_dim, theta, &scaling);
    let matches = again
        .iter()
        .zip(&plain)
        .zip(divisors)
        .all(|((&a, &f), &d)| close(f / a, d));
    matches.then_some(params)
}

impl RopeTable {
    pub fn new(
        head_dim: usize,
        theta: f32,
        scaling: &RopeScaling,
        max_positions: usize,
        style: RopeStyle,
    ) -> Self {
        let half_dim = head_dim / 2;
        let inv_freq = inverse_frequencies(head_dim, theta, scaling);
        let magnitude = attention_factor(scaling);
        let mut cos = Vec::with_capacity(max_positions * half_dim);
        let mut sin = Vec::with_capacity(max_positions * half_dim);
        for position in 0..max_positions {
            for &f in &inv_freq {
                let angle = position as f32 * f;
                cos.push(angle.cos() * magnitude);
                sin.push(angle.sin() * magnitude);
            }
        }
        Self {
            cos,
            sin,
            half_dim,
            style,
        }
    }

    /// `cos` of every (position, frequency), row-major `[positions, head_dim / 2]`.
    pub fn cos(&self) -> &[f32] {
        &self.cos
    }

    /// `sin`, laid out as [`RopeTable::cos`].
    pub fn sin(&self) -> &[f32] {
        &self.sin
    }

    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half_dim.max(1)
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`, row-major) in place.
    pub fn apply(&self, x: &mut [f32], positions: &[u32], num_heads: usize) {
        let head_dim = 2 * self.half_dim;
        for (token, &pos) in positions.iter().enumerate() {
            let row = &mut x[token * num_heads * head_dim..(token + 1) * num_heads * head_dim];
            for head in row.chunks_exact_mut(head_dim) {
                self.rotate_head(head, pos);
            }
        }
    }

    /// Rotates one head's row (`head_dim` values) of the token at `position`.
    #[inline]
    pub fn rotate_head(&self, head: &mut [f32], position: u32) {
        let table = position as usize * self.half_dim;
        let cos = &self.cos[table..table + self.half_dim];
        let sin = &self.sin[table..table + self.half_dim];
        match self.style {
            RopeStyle::Interleaved => {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (x0, x1) = (pair[0], pair[1]);
                    pair[0] = x0 * cos[i] - x1 * sin[i];
                    pair[1] = x0 * sin[i] + x1 * cos[i];
                }
            }
            RopeStyle::Neox => {
                let (lo, hi) = head.split_at_mut(self.half_dim);
                for i in 0..self.half_dim {
                    let (x0, x1) = (lo[i], hi[i]);
                    lo[i] = x0 * cos[i] - x1 * sin[i];
                    hi[i] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }
}
