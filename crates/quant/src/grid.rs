//! Integer grids: a matrix as unsigned codes in groups along its input dimension, each group of
//! each output row with its own scale and zero point, `w = scale * (code - zero)`. Every 4-bit
//! method here (RTN, GPTQ, AWQ) ends in a [`GroupQuantized`]; the writers in [`crate::pack`] only
//! lay it out.

use half::f16;

/// How a group's scale and zero point are chosen from its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symmetry {
    /// Zero point fixed in the middle of the grid (`2^(bits-1)`), scale from the largest
    /// magnitude: what GPTQ's `sym=True` checkpoints store.
    Symmetric,
    /// Scale and zero point from the group's minimum and maximum (both widened to include 0,
    /// so that 0 is always on the grid and the zero point always fits in `bits`).
    Asymmetric,
}

/// The grid of one group: `w ~ scale * (code - zero)` with `code` in `0..=max_code`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupGrid {
    /// Already rounded to f16, the precision every 4-bit layout stores scales in, so that the
    /// codes are chosen for the scale that will be written.
    pub scale: f32,
    pub zero: u8,
    pub max_code: u8,
}

impl GroupGrid {
    /// The grid for `values` (one group of one output row).
    pub fn fit(values: &[f32], bits: u32, symmetry: Symmetry) -> Self {
        let max_code = ((1u32 << bits) - 1) as u8;
        let (lo, hi) = values
            .iter()
            .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let (scale, zero) = match symmetry {
            Symmetry::Symmetric => {
                let magnitude = hi.max(-lo);
                // The grid spans [-mid, mid - 1] codes; 2 * magnitude / max_code is GPTQ's
                // choice: the most negative value lands slightly outside, the positive
                // maximum slightly inside.
                let scale = 2.0 * magnitude / max_code as f32;
                (scale, (max_code / 2 + 1))
            }
            Symmetry::Asymmetric => {
                let scale = (hi - lo) / max_code as f32;
                let scale = rounded_scale(scale);
                let zero = (-lo / scale).round().clamp(0.0, max_code as f32) as u8;
                (scale, zero)
            }
        };
        Self {
            scale: rounded_scale(scale),
            zero,
            max_code,
        }
    }

    pub fn code(&self, value: f32) -> u8 {
        ((value / self.scale).round() + self.zero as f32).clamp(0.0, self.max_code as f32) as u8
    }

    pub fn value(&self, code: u8) -> f32 {
        self.scale * (code as f32 - self.zero as f32)
    }

    /// `value` rounded onto the grid.
    pub fn round(&self, value: f32) -> f32 {
        self.value(self.code(value))
    }
}

/// A scale as f16 will store it, never zero (an all-zero group would otherwise divide by zero,
/// and a zero scale is a load error in the layouts that check).
pub fn rounded_scale(scale: f32) -> f32 {
    let smallest = f16::from_bits(1).to_f32();
    let scale = if scale.is_finite() { scale } else { 1.0 };
    f16::from_f32(scale.max(smallest)).to_f32().max(smallest)
}

/// A matrix `[rows = out_features, cols = in_features]` quantized to `bits`-bit codes with one
/// [`GroupGrid`] per output row and group of input columns.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupQuantized {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group_size: usize,
    pub symmetry: Symmetry,
    /// `[rows, cols]`, row-major, each in `0..2^bits`.
    pub codes: Vec<u8>,
    /// `[rows, groups]`, f16 values.
    pub scales: Vec<f32>,
    /// `[rows, groups]`, each in `0..2^bits`.
    pub zeros: Vec<u8>,
    /// The group of each input column: `col / group_size`, except after GPTQ's act-order,
    /// where groups follow the order the columns were quantized in.
    pub g_idx: Vec<u32>,
}

impl GroupQuantized {
    pub fn num_groups(&self) -> usize {
        self.cols / self.group_size
    }

    /// Whether the groups are runs of consecutive columns (no act-order permutation): what the
    /// layouts without a `g_idx` (AWQ, compressed-tensors without actorder) can express.
    pub fn groups_are_contiguous(&self) -> bool {
        self.g_idx
            .iter()
            .enumerate()
            .all(|(col, &g)| g as usize == col / self.group_size)
    }

    pub fn grid(&self, row: usize, group: usize) -> GroupGrid {
        let at = row * self.num_groups() + group;
        GroupGrid {
            scale: self.scales[at],
            zero: self.zeros[at],
            max_code: ((1u32 << self.bits) - 1) as u8,
        }
    }

    /// The values the codes stand for, `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (row, out_row) in out.chunks_exact_mut(self.cols).enumerate() {
            let codes = &self.codes[row * self.cols..(row + 1) * self.cols];
            for (col, (value, &code)) in out_row.iter_mut().zip(codes).enumerate() {
                *value = self.grid(row, self.g_idx[col] as usize).value(code);
            }
        }
        out
    }

    /// Multiplies every output row by `factors[row]`. Exact on the codes: scaling a row scales
    /// its grid (only the scales change, rounded to f16 again).
    pub fn scale_rows(&mut self, factors: &[f32]) {
        let groups = self.num_groups();
        for (row, &factor) in factors.iter().enumerate() {
            for scale in &mut self.scales[row * groups..(row + 1) * groups] {
                *scale = rounded_scale(*scale * factor);
            }
        }
    }

    /// The same matrix with its output rows reordered: row `i` of the result is row
    /// `order[i]` of `self`.
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        let groups = self.num_groups();
        let gather = |data: &[u8], width: usize| -> Vec<u8> {
            order
                .iter()
                .flat_map(|&r| data[r * width..(r + 1) * width].iter().copied())
                .collect()
        };
        Self {
            codes: gather(&self.codes, self.cols),
            zeros: gather(&self.zeros, groups),
            scales: order
                .iter()
                .flat_map(|&r| self.scales[r * groups..(r + 1) * groups].iter().copied())
                .collect(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asymmetric_grid_covers_min_and_max() {
        let values = [-0.5f32, 0.1, 1.0, 0.25];
        let grid = GroupGrid::fit(&values, 4, Symmetry::Asymmetric);
        // 1.5 / 15 = 0.1, zero = 5
        assert!((grid.scale - 0.1).abs() < 1e-4, "{grid:?}");
        assert_eq!(grid.zero, 5);
        assert_eq!(grid.code(-0.5), 0);
        assert_eq!(grid.code(1.0), 15);
        for v in values {
            assert!((grid.round(v) - v).abs() <= grid.scale / 2.0 + 1e-6);
        }
    }

    #[test]
    fn symmetric_grid_has_zero_in_the_middle() {
        let grid = GroupGrid::fit(&[-0.75, 0.3, 0.75], 4, Symmetry::Symmetric);
        assert_eq!(grid.zero, 8);
        assert!((grid.scale - 0.1).abs() < 1e-4);
        assert_eq!(grid.code(0.0), 8);
        assert_eq!(grid.code(-0.75), 0); // -7.5 rounds to -8 (away from zero), code 0
        assert_eq!(grid.code(0.75), 15); // 7.5 -> 8 -> clamped to 15
    }

    #[test]
    fn all_zero_group_has_a_nonzero_scale() {
        let grid = GroupGrid::fit(&[0.0; 8], 4, Symmetry::Asymmetric);
        assert!(grid.scale > 0.0);
        assert_eq!(grid.round(0.0), 0.0);
    }
}
