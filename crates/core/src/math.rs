//! Arithmetic shared by the engine's sampler and the model's kernels.

/// `e^x` for `x <= 0` (the softmax's range), to about 2 ulp, in plain arithmetic that the
/// compiler vectorizes: libm's `expf` is a call per value, and a softmax over a 49k vocabulary or
/// a batch's attention scores takes one per element.
/// Cephes' `expf`: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-7 polynomial for `e^r`,
/// and `2^n` built in the exponent bits. Below `-87` the result (< 2^-125) is flushed to zero,
/// and NaN gives zero too.
#[inline]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.max(-87.0);
    let rounded = clamped * LOG2_E + ROUND;
    let n = rounded - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // `rounded`'s low mantissa bits hold `n` itself: integer arithmetic on them builds 2^n
    // without a float-to-int conversion, which does not vectorize (`as` saturates).
    let n_bits = rounded.to_bits() as i32 - ROUND.to_bits() as i32;
    let two_n = f32::from_bits(((n_bits + 127) as u32) << 23);
    let y = e_r * two_n;
    // Written so that NaN, failing the comparison, also gives 0: a weight of nothing.
    if x >= -87.0 {
        y
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::exp;

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
        assert_eq!(exp(f32::NAN), 0.0);
    }
}
