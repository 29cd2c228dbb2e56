//! GPTQ checkpoints as AutoGPTQ and GPTQModel write them (`checkpoint_format: "gptq"`, v1):
//!
//! - `qweight` int32 `[in / (32/bits), out]`: word `r` of column `o` packs input rows
//!   `r*k .. r*k+k-1` of output `o` (`k = 32/bits`), the first in the lowest bits.
//! - `qzeros` int32 `[groups, out / k]`: word `c` of group `g` packs the zero points of outputs
//!   `c*k ..`, each stored as `zero - 1` (v1's off-by-one, undone by every v1 loader).
//! - `scales` f16 `[groups, out]`; `g_idx` int32 `[in]`, the group of each input row.
//!
//! `W[o, i] = scales[g_idx[i], o] * (q[i, o] - (stored_zero[g_idx[i], o] + 1))`.

use crate::grid::{GroupQuantized, Symmetry};
use crate::pack::{named, pack_words, Named, RawTensor};
use minserve_model::export::ExportDType;

/// The tensors of one projection (`prefix` without `.weight`).
///
/// # Panics
/// If `out` is not a multiple of the words' width or the grid is asymmetric with a zero point
/// of 0 (v1 cannot store it): the caller checks shapes, and GPTQ here is symmetric.
pub fn tensors(prefix: &str, q: &GroupQuantized) -> Vec<Named> {
    let per_word = (32 / q.bits) as usize;
    assert!(q.rows.is_multiple_of(per_word) && q.cols.is_multiple_of(per_word));
    assert!(q.symmetry == Symmetry::Symmetric || q.zeros.iter().all(|&z| z > 0));
    let (rows, cols, groups) = (q.rows, q.cols, q.num_groups());
    // Input-major: for each word of input rows, each output column.
    let mut qweight = Vec::with_capacity(cols / per_word * rows);
    for word in 0..cols / per_word {
        for o in 0..rows {
            let at = o * cols + word * per_word;
            qweight.extend(pack_words(
                q.codes[at..at + per_word].iter().copied(),
                q.bits,
            ));
        }
    }
    let mask = ((1u32 << q.bits) - 1) as u8;
    let qzeros: Vec<i32> = (0..groups)
        .flat_map(|g| {
            pack_words(
                (0..rows).map(move |o| q.zeros[o * groups + g].wrapping_sub(1) & mask),
                q.bits,
            )
        })
        .collect();
    let scales: Vec<f32> = (0..groups)
        .flat_map(|g| (0..rows).map(move |o| q.scales[o * groups + g]))
        .collect();
    let g_idx: Vec<i32> = q.g_idx.iter().map(|&g| g as i32).collect();
    vec![
        named(
            prefix,
            "qweight",
            RawTensor::int32(&qweight, vec![cols / per_word, rows]),
        ),
        named(
            prefix,
            "qzeros",
            RawTensor::int32(&qzeros, vec![groups, rows / per_word]),
        ),
        named(
            prefix,
            "scales",
            RawTensor::float(&scales, vec![groups, rows], ExportDType::F16),
        ),
        named(prefix, "g_idx", RawTensor::int32(&g_idx, vec![cols])),
    ]
}

/// `quantization_config` (config.json) and `quantize_config.json` alike.
pub fn config(bits: u32, group_size: usize, act_order: bool, damp: f64) -> serde_json::Value {
    serde_json::json!({
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": act_order,
        "sym": true,
        "static_groups": false,
        "true_sequential": true,
        "damp_percent": damp,
        "checkpoint_format": "gptq",
        "lm_head": false,
        "model_file_base_name": "model",
        "meta": { "quantizer": [concat!("minserve:", env!("CARGO_PKG_VERSION"))] },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 8 outputs x 8 inputs, one group of 8, symmetric: zero 8 is stored as 7.
    fn example() -> GroupQuantized {
        GroupQuantized {
            rows: 8,
            cols: 8,
            bits: 4,
            group_size: 8,
            symmetry: Symmetry::Symmetric,
            // Output o has codes o, o+1, ..., o+7 (mod 16) along its inputs.
            codes: (0..8)
                .flat_map(|o| (0..8).map(move |i| ((o + i) % 16) as u8))
                .collect(),
            scales: (0..8).map(|o| 0.5 + o as f32).collect(),
            zeros: vec![8; 8],
            g_idx: vec![0; 8],
        }
    }

    #[test]
    fn packs_inputs_along_qweight_rows_and_outputs_along_qzeros() {
        let t = tensors("p", &example());
        let (name, qweight) = &t[0];
        assert_eq!(name, "p.qweight");
        assert_eq!(qweight.shape, vec![1, 8]);
        // Column o: codes o..o+7 for inputs 0..7, input 0 in the low nibble.
        assert_eq!(qweight.as_i32()[0], 0x7654_3210);
        assert_eq!(qweight.as_i32()[1], 0x8765_4321u32 as i32);
        let qzeros = &t[1].1;
        assert_eq!(qzeros.shape, vec![1, 1]);
        assert_eq!(qzeros.as_i32(), vec![0x7777_7777]);
        assert_eq!(t[2].1.shape, vec![1, 8]);
        assert_eq!(t[3].1.as_i32(), vec![0; 8]);
    }

    #[test]
    fn unpacking_by_the_documented_formula_gives_the_weights_back() {
        let q = example();
        let t = tensors("p", &q);
        let (qweight, qzeros) = (t[0].1.as_i32(), t[1].1.as_i32());
        let expected = q.dequantize();
        for o in 0..8 {
            for i in 0..8 {
                let code = (qweight[(i / 8) * 8 + o] >> (4 * (i % 8))) & 0xf;
                let zero = ((qzeros[o / 8] >> (4 * (o % 8))) & 0xf) + 1;
                let scale = half::f16::from_f32(q.scales[o]).to_f32();
                let w = scale * (code - zero) as f32;
                assert_eq!(w, expected[o * 8 + i]);
            }
        }
    }
}
