//! Rotary position embeddings applied per token, at each token's own position, so that one call
//! serves a ragged batch whose sequences sit at unrelated positions.

use crate::config::RopeStyle;

/// `cos` and `sin` of `position * theta_i` for every position up to the model's context.
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half_dim: usize,
    style: RopeStyle,
}

impl RopeTable {
    pub fn new(head_dim: usize, theta: f32, max_positions: usize, style: RopeStyle) -> Self {
        let half_dim = head_dim / 2;
        // Same f32 arithmetic as candle-transformers' Llama, so that both agree bit for bit.
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half_dim);
        let mut sin = Vec::with_capacity(max_positions * half_dim);
        for position in 0..max_positions {
            for &f in &inv_freq {
                let angle = position as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
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
            let table = pos as usize * self.half_dim;
            let cos = &self.cos[table..table + self.half_dim];
            let sin = &self.sin[table..table + self.half_dim];
            let row = &mut x[token * num_heads * head_dim..(token + 1) * num_heads * head_dim];
            for head in row.chunks_exact_mut(head_dim) {
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
    }
}
