//! Round-to-nearest: every weight to the nearest point of its group's grid, with no data. The
//! baseline GPTQ and AWQ are measured against.

use crate::channel::PerChannel;
use crate::grid::{GroupGrid, GroupQuantized, Symmetry};

/// `weight` (`[rows, cols]`, row-major) rounded group by group (`group_size` consecutive input
/// columns of one output row share a grid). `group_size` must divide `cols` (checked by the
/// caller, which knows the tensor's name).
pub fn quantize_groups(
    weight: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group_size: usize,
    symmetry: Symmetry,
) -> GroupQuantized {
    assert_eq!(weight.len(), rows * cols);
    assert!(group_size > 0 && cols.is_multiple_of(group_size));
    let groups = cols / group_size;
    let mut codes = vec![0u8; rows * cols];
    let mut scales = Vec::with_capacity(rows * groups);
    let mut zeros = Vec::with_capacity(rows * groups);
    for (row, values) in weight.chunks_exact(cols).enumerate() {
        for (group, chunk) in values.chunks_exact(group_size).enumerate() {
            let grid = GroupGrid::fit(chunk, bits, symmetry);
            let at = row * cols + group * group_size;
            for (code, &v) in codes[at..at + group_size].iter_mut().zip(chunk) {
                *code = grid.code(v);
            }
            scales.push(grid.scale);
            zeros.push(grid.zero);
        }
    }
    GroupQuantized {
        rows,
        cols,
        bits,
        group_size,
        symmetry,
        codes,
        scales,
        zeros,
        g_idx: (0..cols).map(|c| (c / group_size) as u32).collect(),
    }
}

/// A matrix as signed 8-bit integers with one symmetric scale per output row:
/// `w[r, c] = scales[r] * codes[r, c]`.
pub type ChannelInt8 = PerChannel<i8>;

impl ChannelInt8 {
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_with(|q| q as f32)
    }
}

/// Per output row: scale `max |w| / 127`, codes in `-127..=127` (symmetric, so that
/// `-128` is never used and the grid is the same on both sides of zero).
pub fn quantize_int8_channels(weight: &[f32], rows: usize, cols: usize) -> ChannelInt8 {
    PerChannel::quantize(weight, rows, cols, 127.0, |v| {
        v.round().clamp(-127.0, 127.0) as i8
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_groups_round_each_value_within_a_step() {
        let weight: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 30.0) / 40.0)
            .collect();
        let q = quantize_groups(&weight, 2, 32, 4, 16, Symmetry::Asymmetric);
        assert_eq!(q.scales.len(), 4);
        let back = q.dequantize();
        for (i, (&w, &d)) in weight.iter().zip(&back).enumerate() {
            // Half a step of rounding, plus up to half a step at the ends of the range where the
            // rounded zero point shifts the grid and the code is clamped.
            let grid = q.grid(i / 32, (i % 32) / 16);
            assert!((w - d).abs() <= grid.scale + 1e-6, "{i}: {w} vs {d}");
            if (w - d).abs() > grid.scale / 2.0 + 1e-6 {
                assert!(
                    q.codes[i] == 0 || q.codes[i] == 15,
                    "{i}: only clamped codes"
                );
            }
        }
    }

    #[test]
    fn int8_channels_keep_the_row_maximum_exactly() {
        let weight = [0.5f32, -1.27, 0.01, 0.0, 2.54, -0.02];
        let q = quantize_int8_channels(&weight, 2, 3);
        assert_eq!(q.codes, vec![50, -127, 1, 0, 127, -1]);
        let back = q.dequantize();
        assert!((back[1] + 1.27).abs() < 1e-6);
        assert!((back[4] - 2.54).abs() < 1e-6);
    }

    #[test]
    fn zero_row_gets_a_usable_scale() {
        let q = quantize_int8_channels(&[0.0; 4], 1, 4);
        assert_eq!(q.scales, vec![1.0]);
    }
}
