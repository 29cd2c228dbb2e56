//! AWQ checkpoints as AutoAWQ writes them (`version: "gemm"`), 4-bit with zero points:
//!
//! - `qweight` int32 `[in, out / 8]`: word `c` of input row `i` packs outputs `8c .. 8c+7` in
//!   AutoAWQ's interleaved order: nibble `j` (bits `4j ..`) holds output `8c + ORDER[j]`.
//! - `qzeros` int32 `[groups, out / 8]`, the same packing, zero points stored as they are.
//! - `scales` f16 `[groups, out]`.
//!
//! `W[o, i] = scales[i / group, o] * (q[i, o] - z[i / group, o])`.

use crate::grid::GroupQuantized;
use crate::pack::{named, pack_words, Named, RawTensor};
use minserve_model::export::ExportDType;

/// The output each nibble of a word holds, nibble `j` -> output `8c + ORDER[j]`.
pub const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// The tensors of one projection (`prefix` without `.weight`).
///
/// # Panics
/// Unless 4-bit with groups of consecutive inputs and `out` a multiple of 8 (the caller checks).
pub fn tensors(prefix: &str, q: &GroupQuantized) -> Vec<Named> {
    assert_eq!(q.bits, 4);
    assert!(q.groups_are_contiguous() && q.rows.is_multiple_of(8));
    let (rows, cols, groups) = (q.rows, q.cols, q.num_groups());
    let interleaved = |value: &dyn Fn(usize) -> u8, word: usize| {
        pack_words(ORDER.iter().map(|&j| value(word * 8 + j)), 4)[0]
    };
    let qweight: Vec<i32> = (0..cols)
        .flat_map(|i| (0..rows / 8).map(move |c| interleaved(&|o| q.codes[o * cols + i], c)))
        .collect();
    let qzeros: Vec<i32> = (0..groups)
        .flat_map(|g| (0..rows / 8).map(move |c| interleaved(&|o| q.zeros[o * groups + g], c)))
        .collect();
    let scales: Vec<f32> = (0..groups)
        .flat_map(|g| (0..rows).map(move |o| q.scales[o * groups + g]))
        .collect();
    vec![
        named(
            prefix,
            "qweight",
            RawTensor::int32(&qweight, vec![cols, rows / 8]),
        ),
        named(
            prefix,
            "qzeros",
            RawTensor::int32(&qzeros, vec![groups, rows / 8]),
        ),
        named(
            prefix,
            "scales",
            RawTensor::float(&scales, vec![groups, rows], ExportDType::F16),
        ),
    ]
}

/// `quantization_config` of config.json.
pub fn config(group_size: usize) -> serde_json::Value {
    serde_json::json!({
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": true,
        "version": "gemm",
        "modules_to_not_convert": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::Symmetry;

    #[test]
    fn outputs_are_interleaved_in_awq_order() {
        // 8 outputs x 2 inputs, one group: output o has codes o and 15 - o, zero 15 - o.
        let q = GroupQuantized {
            rows: 8,
            cols: 2,
            bits: 4,
            group_size: 2,
            symmetry: Symmetry::Asymmetric,
            codes: (0..8u8).flat_map(|o| [o, 15 - o]).collect(),
            scales: vec![1.0; 8],
            zeros: (0..8u8).map(|o| 15 - o).collect(),
            g_idx: vec![0, 0],
        };
        let t = tensors("p", &q);
        let qweight = t[0].1.as_i32();
        assert_eq!(t[0].1.shape, vec![2, 1]);
        // Nibbles hold outputs 0,2,4,6,1,3,5,7.
        assert_eq!(qweight[0], 0x7531_6420);
        assert_eq!(qweight[1], 0x8ace_9bdfu32 as i32);
        assert_eq!(t[1].1.as_i32(), vec![0x8ace_9bdfu32 as i32]);
        // Unpacking with the reverse order gives the codes back.
        let reverse = [0, 4, 1, 5, 2, 6, 3, 7];
        for (o, &nibble) in reverse.iter().enumerate() {
            assert_eq!((qweight[0] >> (4 * nibble)) & 0xf, o as i32);
        }
    }
}
