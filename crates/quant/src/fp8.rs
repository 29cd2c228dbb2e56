//! FP8 E4M3 (the `float8_e4m3fn` of PyTorch and compressed-tensors): 1 sign, 4 exponent
//! (bias 7) and 3 mantissa bits, no infinities, largest finite value 448; the codec is the
//! model crate's (`minserve_model::e4m3`), which the loader decodes with. Weights are divided by a
//! per-output-row scale `max |w| / 448` so that each row uses the whole range.

use minserve_model::e4m3::{self, E4M3_MAX};

use crate::channel::PerChannel;

/// A matrix as E4M3 with one f32 scale per output row: `w[r, c] = scales[r] * e4m3(codes[r, c])`.
pub type ChannelFp8 = PerChannel<u8>;

impl ChannelFp8 {
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_with(e4m3::decode)
    }
}

/// Per output row: scale `max |w| / 448`, each weight rounded to E4M3.
pub fn quantize_fp8_channels(weight: &[f32], rows: usize, cols: usize) -> ChannelFp8 {
    PerChannel::quantize(weight, rows, cols, E4M3_MAX, e4m3::encode)
}

#[cfg(test)]
mod tests {
    use super::*;

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
