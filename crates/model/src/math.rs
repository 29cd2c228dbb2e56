//! Small f32 kernels written so that the compiler vectorizes them (the build targets the host
//! CPU), each with a fixed order of operations: a row's result never depends on what else is
//! in the batch.

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

/// `e^x` for `x <= 0` (the softmax's range), to about 2 ulp, in plain arithmetic that the
/// compiler vectorizes: libm's `expf` is a call per score and was a tenth of a batched step.
/// Cephes' `expf`: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-7 polynomial for `e^r`,
/// and `2^n` built in the exponent bits. Below `-87` the result (< 2^-125) is flushed to zero.
#[inline]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.max(-87.0);
    let n = (clamped * LOG2_E + ROUND) - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = e_r * two_n;
    if x < -87.0 {
        0.0
    } else {
        y
    }
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
    fn exp_matches_libm_over_the_softmax_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
            x += 0.001_7;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
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
