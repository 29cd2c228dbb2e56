//! FP8 E4M3 (the `float8_e4m3fn` of PyTorch and compressed-tensors): 1 sign, 4 exponent
//! (bias 7) and 3 mantissa bits, no infinities, largest finite value 448. Weights are divided by a
//! per-output-row scale `max |w| / 448` so that each row uses the whole range.

use crate::channel::PerChannel;

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// `value` as E4M3 bits, rounded to nearest (ties to even), saturating at +-448.
pub fn encode_e4m3(value: f32) -> u8 {
    if value.is_nan() {
        return 0x7f;
    }
    let sign = if value.is_sign_negative() { 0x80u8 } else { 0 };
    let magnitude = (value.abs() as f64).min(E4M3_MAX as f64);
    // Below 2^-6 the exponent field is 0 and the step is 2^-9 (subnormals); a code of 8 there is
    // the smallest normal, which the same bit pattern encodes.
    let min_normal = 2f64.powi(-6);
    if magnitude < min_normal {
        let steps = (magnitude / 2f64.powi(-9)).round_ties_even() as u8;
        return sign | steps;
    }
    let mut exponent = magnitude.log2().floor() as i32;
    // log2 of a value just below a power of two can round up; keep the mantissa in [1, 2).
    if 2f64.powi(exponent) > magnitude {
        exponent -= 1;
    }
    let mut mantissa = ((magnitude / 2f64.powi(exponent) - 1.0) * 8.0).round_ties_even() as u8;
    if mantissa == 8 {
        mantissa = 0;
        exponent += 1;
    }
    let field = (exponent + 7) as u8;
    sign | (field << 3) | mantissa
}

/// The value of E4M3 bits.
pub fn decode_e4m3(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let field = (bits >> 3) & 0x0f;
    let mantissa = (bits & 0x07) as f32;
    if field == 0x0f && mantissa == 7.0 {
        return f32::NAN;
    }
    let magnitude = match field {
        0 => mantissa / 8.0 * 2f32.powi(-6),
        e => (1.0 + mantissa / 8.0) * 2f32.powi(e as i32 - 7),
    };
    sign * magnitude
}

/// A matrix as E4M3 with one f32 scale per output row: `w[r, c] = scales[r] * e4m3(codes[r, c])`.
pub type ChannelFp8 = PerChannel<u8>;

impl ChannelFp8 {
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_with(decode_e4m3)
    }
}

/// Per output row: scale `max |w| / 448`, each weight rounded to E4M3.
pub fn quantize_fp8_channels(weight: &[f32], rows: usize, cols: usize) -> ChannelFp8 {
    PerChannel::quantize(weight, rows, cols, E4M3_MAX, encode_e4m3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        // From the E4M3 table of the FP8 formats paper (Micikevicius et al. 2022): max normal
        // S.1111.110 = 448, min normal S.0001.000 = 2^-6, min subnormal S.0000.001 = 2^-9.
        assert_eq!(encode_e4m3(448.0), 0x7e);
        assert_eq!(encode_e4m3(-448.0), 0xfe);
        assert_eq!(encode_e4m3(1.0), 0x38);
        assert_eq!(encode_e4m3(2f32.powi(-6)), 0x08);
        assert_eq!(encode_e4m3(2f32.powi(-9)), 0x01);
        assert_eq!(encode_e4m3(0.0), 0x00);
        assert_eq!(encode_e4m3(1000.0), 0x7e, "saturates");
        // 1.0625 is halfway between 1.0 (mantissa 0) and 1.125 (mantissa 1): ties to even.
        assert_eq!(encode_e4m3(1.0625), 0x38);
        assert_eq!(encode_e4m3(1.1875), 0x3a);
    }

    #[test]
    fn every_finite_code_round_trips() {
        for bits in 0u8..=255 {
            let value = decode_e4m3(bits);
            if value.is_nan() {
                continue;
            }
            let back = encode_e4m3(value);
            // +0 and -0 are distinct codes of the same value.
            assert!(
                back == bits || value == 0.0,
                "{bits:#x} -> {value} -> {back:#x}"
            );
        }
    }

    #[test]
    fn channel_scales_map_row_maximum_to_448() {
        let q = quantize_fp8_channels(&[0.5, -2.0, 0.25, 0.0, 0.0, 0.0], 2, 3);
        assert_eq!(q.scales, vec![2.0 / 448.0, 1.0]);
        assert_eq!(q.codes[1], 0xfe);
        let back = q.dequantize();
        assert_eq!(back[1], -2.0);
        assert_eq!(back[0], 0.5);
    }
}
