//! Matrices with one scale per output row (int8 and FP8): `w[r, c] = scales[r] * decode(code)`,
//! the scale mapping each row's largest magnitude to the format's largest code.

#[derive(Debug, Clone, PartialEq)]
pub struct PerChannel<C> {
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols]`, row-major.
    pub codes: Vec<C>,
    pub scales: Vec<f32>,
}

impl<C: Copy> PerChannel<C> {
    /// Scale `max |w| / largest` per row (1 for a row of zeros: a zero scale is a load error
    /// in the layouts that check), `encode(w / scale)` per weight.
    pub fn quantize(
        weight: &[f32],
        rows: usize,
        cols: usize,
        largest: f32,
        encode: impl Fn(f32) -> C,
    ) -> Self {
        assert_eq!(weight.len(), rows * cols);
        let mut codes = Vec::with_capacity(rows * cols);
        let mut scales = Vec::with_capacity(rows);
        for row in weight.chunks_exact(cols) {
            let magnitude = row.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let scale = if magnitude > 0.0 {
                magnitude / largest
            } else {
                1.0
            };
            codes.extend(row.iter().map(|&v| encode(v / scale)));
            scales.push(scale);
        }
        Self {
            rows,
            cols,
            codes,
            scales,
        }
    }

    /// The values the codes stand for, `[rows, cols]`.
    pub fn dequantize_with(&self, decode: impl Fn(C) -> f32) -> Vec<f32> {
        self.codes
            .chunks_exact(self.cols)
            .zip(&self.scales)
            .flat_map(|(row, &s)| row.iter().map(|&q| s * decode(q)).collect::<Vec<_>>())
            .collect()
    }
}
