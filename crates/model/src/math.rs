//! Small f32 kernels written so that the compiler vectorizes them (the build targets the host
//! CPU), each with a fixed order of operations: a row's result never depends on what else is
//! in the batch.

pub use minserve_core::math::exp;

/// Lanes of the partial sums below: one 512-bit register of f32.
const LANES: usize = 16;

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

/// Pairwise sum of the lanes, in a fixed order.
#[inline]
fn reduce(mut acc: [f32; LANES]) -> f32 {
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
