//! Small f32 kernels written so that the compiler vectorizes them (the build targets the host
//! CPU), each with a fixed order of operations: a row's result never depends on what else is
//! in the batch.

pub use minserve_core::math::exp;

/// Lanes of the partial sums below: one 512-bit register of f32.
pub(crate) const LANES: usize = 16;

/// Dot product with [`LANES`] independent partial sums, so that the compiler keeps them in one
/// SIMD register; the summation order is fixed, which keeps results deterministic.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_body, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_body, b_tail) = b.split_at(a_body.len());
    for (x, y) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for lane in 0..LANES {
            acc[lane] += x[lane] * y[lane];
        }
    }
    let mut sum = reduce(acc);
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

/// Pairwise sum of the lanes, in a fixed order: lanes `l` and `l + 8`, then `l + 4`, `l + 2`,
/// `l + 1` (the dense matmul's vector paths reproduce this tree, `crate::dense`).
#[inline]
pub(crate) fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for lane in 0..width {
            acc[lane] += acc[lane + width];
        }
        width /= 2;
    }
    acc[0]
}

/// Replaces `x` by `exp(x - max(x))` and returns their sum: softmax without the division, which
/// the caller applies once to the weighted sum instead of to every weight.
pub fn exp_minus_max(x: &mut [f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for lane in 0..LANES {
            chunk[lane] = exp(chunk[lane] - max);
            acc[lane] += chunk[lane];
        }
    }
    let mut sum = reduce(acc);
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    sum
}

/// `silu(gate) * up`, into `gate`: SwiGLU's activation, `x * sigmoid(x)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        // Only `exp` of a non-positive argument is needed: for x < 0, sigmoid(x) = e^x / (1 + e^x).
        let e = exp(-g.abs());
        let sigmoid = if *g >= 0.0 {
            1.0 / (1.0 + e)
        } else {
            e / (1.0 + e)
        };
        *g = *g * sigmoid * u;
    }
}

/// `gelu(gate) * up`, into `gate`: GeGLU with GELU's tanh approximation (Gemma's
/// `gelu_pytorch_tanh`), `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let y = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
        // tanh(|y|) = (1 - e^(-2|y|)) / (1 + e^(-2|y|)): `exp` of a non-positive argument only.
        let e = exp(-2.0 * y.abs());
        let tanh = ((1.0 - e) / (1.0 + e)).copysign(y);
        *g = 0.5 * x * (1.0 + tanh) * u;
    }
}

/// RMSNorm of each row of `x` (rows of `weight.len()` values) into `out`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (row, out) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean_square = dot(row, row) / dim as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// [`rms_norm`] of each row of `x` (rows of `weight.len()` values: a head for per-head
/// norms), in place.
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for row in x.chunks_exact_mut(dim) {
        let mean_square = dot(row, row) / dim as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// `x += y`.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_matches_the_formula() {
        for i in -400..=400 {
            let x = i as f32 / 40.0;
            let mut g = [x];
            gelu_tanh_mul(&mut g, &[1.5]);
            let xd = x as f64;
            let want = 0.5
                * xd
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh())
                * 1.5;
            assert!(
                (g[0] as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                "{x}: {} vs {want}",
                g[0]
            );
        }
    }

    #[test]
    fn in_place_rms_norm_equals_rms_norm() {
        let x: Vec<f32> = (0..48).map(|i| (i as f32 * 0.7).sin()).collect();
        let w: Vec<f32> = (0..16).map(|i| 1.0 + i as f32 * 0.1).collect();
        let mut out = vec![0.0; 48];
        rms_norm(&x, &w, 1e-6, &mut out);
        let mut y = x.clone();
        rms_norm_in_place(&mut y, &w, 1e-6);
        assert_eq!(y, out);
    }

    #[test]
    fn softmax_weights_sum_as_returned() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let expected: Vec<f32> = {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            x.iter().map(|v| (v - max).exp()).collect()
        };
        let sum = exp_minus_max(&mut x);
        for (a, b) in x.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!((sum - expected.iter().sum::<f32>()).abs() < 1e-5);
        assert!(x.contains(&1.0), "the maximum maps to exactly 1");
    }
}
