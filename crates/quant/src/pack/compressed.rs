//! compressed-tensors checkpoints (the format of llm-compressor and vLLM), three of its formats:
//!
//! - `pack-quantized` (W4A16): `weight_packed` int32 `[out, in / 8]`, 8 consecutive inputs per
//!   word, first in the lowest bits, each stored as `q + 8` (the signed code made unsigned);
//!   `weight_scale` `[out, groups]`; `weight_shape` int64 `[2]`; asymmetric grids add
//!   `weight_zero_point` int32 `[out / 8, groups]`, packed along the *output* axis, also `+ 8`.
//!   `W[o, i] = scale[o, g] * (q[o, i] - zp[o, g])` with `q`, `zp` signed.
//! - `int-quantized` (W8A8): `weight` int8 `[out, in]`, `weight_scale` `[out, 1]`; activations
//!   are quantized per token at run time (`dynamic`), so nothing is stored for them.
//! - `float-quantized` (FP8 W8A16): `weight` F8_E4M3 `[out, in]`, `weight_scale` f32 `[out, 1]`.
//!
//! Our unsigned 4-bit codes are exactly the stored `q + 8` (symmetric grids have zero 8).

use crate::fp8::ChannelFp8;
use crate::grid::{GroupQuantized, Symmetry};
use crate::pack::{named, pack_words, Named, RawTensor};
use crate::rtn::ChannelInt8;
use minserve_model::export::ExportDType;

/// `pack-quantized` tensors of one projection; scales in `dtype` (the model's).
///
/// Groups that are not runs of consecutive inputs (GPTQ's act-order) add `weight_g_idx`.
///
/// # Panics
/// Unless 4-bit (the caller checks).
pub fn pack_quantized(prefix: &str, q: &GroupQuantized, dtype: ExportDType) -> Vec<Named> {
    assert_eq!(q.bits, 4);
    let (rows, cols, groups) = (q.rows, q.cols, q.num_groups());
    let packed: Vec<i32> = q
        .codes
        .chunks_exact(cols)
        .flat_map(|row| pack_words(row.iter().copied(), 4))
        .collect();
    let mut out = vec![
        named(
            prefix,
            "weight_packed",
            RawTensor::int32(&packed, vec![rows, cols.div_ceil(8)]),
        ),
        named(
            prefix,
            "weight_scale",
            RawTensor::float(&q.scales, vec![rows, groups], dtype),
        ),
        named(
            prefix,
            "weight_shape",
            RawTensor::int64(&[rows as i64, cols as i64], vec![2]),
        ),
    ];
    if q.symmetry == Symmetry::Asymmetric {
        let zero_points: Vec<i32> = (0..rows.div_ceil(8))
            .flat_map(|word| {
                let column = move |g: usize| {
                    let rows_of_word = word * 8..(word * 8 + 8).min(rows);
                    pack_words(rows_of_word.map(move |o| q.zeros[o * groups + g]), 4)[0]
                };
                (0..groups).map(column)
            })
            .collect();
        out.push(named(
            prefix,
            "weight_zero_point",
            RawTensor::int32(&zero_points, vec![rows.div_ceil(8), groups]),
        ));
    }
    if !q.groups_are_contiguous() {
        let g_idx: Vec<i32> = q.g_idx.iter().map(|&g| g as i32).collect();
        out.push(named(
            prefix,
            "weight_g_idx",
            RawTensor::int32(&g_idx, vec![cols]),
        ));
    }
    out
}

/// `int-quantized` tensors of one projection; scales in `dtype`.
pub fn int_quantized(prefix: &str, q: &ChannelInt8, dtype: ExportDType) -> Vec<Named> {
    vec![
        named(
            prefix,
            "weight",
            RawTensor::int8(&q.codes, vec![q.rows, q.cols]),
        ),
        named(
            prefix,
            "weight_scale",
            RawTensor::float(&q.scales, vec![q.rows, 1], dtype),
        ),
    ]
}

/// `float-quantized` tensors of one projection (scales always f32).
pub fn float_quantized(prefix: &str, q: &ChannelFp8) -> Vec<Named> {
    vec![
        named(
            prefix,
            "weight",
            RawTensor::fp8_e4m3(&q.codes, vec![q.rows, q.cols]),
        ),
        named(
            prefix,
            "weight_scale",
            RawTensor::float(&q.scales, vec![q.rows, 1], ExportDType::F32),
        ),
    ]
}

/// Which compressed-tensors scheme a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// 4-bit integer weights in groups, activations as they are.
    W4A16 {
        group_size: usize,
        symmetric: bool,
        /// Groups in the order GPTQ's act-order quantized the columns (`weight_g_idx` stored,
        /// compressed-tensors' `actorder: "group"`).
        act_order: bool,
    },
    /// 8-bit integer weights per channel, 8-bit activations per token at run time.
    W8A8,
    /// FP8 E4M3 weights per channel, activations as they are.
    Fp8W8A16,
}

/// `quantization_config` of config.json for `scheme`; every Linear but the lm_head.
pub fn config(scheme: Scheme) -> serde_json::Value {
    let (format, weights, input_activations) = match scheme {
        Scheme::W4A16 {
            group_size,
            symmetric,
            act_order,
        } => (
            "pack-quantized",
            serde_json::json!({
                "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
                "group_size": group_size, "dynamic": false,
                "actorder": if act_order { serde_json::json!("group") } else { serde_json::Value::Null },
                "block_structure": null, "observer": "minmax", "observer_kwargs": {},
            }),
            serde_json::Value::Null,
        ),
        Scheme::W8A8 => (
            "int-quantized",
            serde_json::json!({
                "num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel",
                "group_size": null, "dynamic": false, "actorder": null,
                "block_structure": null, "observer": "minmax", "observer_kwargs": {},
            }),
            serde_json::json!({
                "num_bits": 8, "type": "int", "symmetric": true, "strategy": "token",
                "group_size": null, "dynamic": true, "actorder": null,
                "block_structure": null, "observer": null, "observer_kwargs": {},
            }),
        ),
        Scheme::Fp8W8A16 => (
            "float-quantized",
            serde_json::json!({
                "num_bits": 8, "type": "float", "symmetric": true, "strategy": "channel",
                "group_size": null, "dynamic": false, "actorder": null,
                "block_structure": null, "observer": "minmax", "observer_kwargs": {},
            }),
            serde_json::Value::Null,
        ),
    };
    serde_json::json!({
        "quant_method": "compressed-tensors",
        "format": format,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": input_activations,
                "output_activations": null,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_quantized_follows_the_reference_docstring() {
        // compressed-tensors' pack_to_int32 docstring: signed [1, 2] at 8 bits -> [129, 130]
        // -> 33409; at 4 bits the offset is 8, so signed codes -8..7 are the unsigned 0..15.
        assert_eq!(pack_words([129u8, 130].into_iter(), 8), vec![33409]);
        let q = GroupQuantized {
            rows: 9,
            cols: 8,
            bits: 4,
            group_size: 4,
            symmetry: Symmetry::Asymmetric,
            // Signed codes -8..-1 for every row: unsigned 0..7.
            codes: (0..9).flat_map(|_| 0..8u8).collect(),
            scales: vec![0.25; 18],
            // Row o, group g: zero (o + g) % 16.
            zeros: (0..9u8).flat_map(|o| [o, o + 1]).collect(),
            g_idx: (0..8).map(|c| c / 4).collect(),
        };
        let t = pack_quantized("m.p", &q, ExportDType::F16);
        let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "m.p.weight_packed",
                "m.p.weight_scale",
                "m.p.weight_shape",
                "m.p.weight_zero_point"
            ]
        );
        assert_eq!(t[0].1.shape, vec![9, 1]);
        assert_eq!(t[0].1.as_i32()[0], 0x7654_3210);
        assert_eq!(t[2].1.dtype, safetensors::Dtype::I64);
        // Zero points: [ceil(9/8) = 2, groups = 2]; word (0, g) packs rows 0..7, row 8 alone.
        let zp = &t[3].1;
        assert_eq!(zp.shape, vec![2, 2]);
        assert_eq!(zp.as_i32(), vec![0x7654_3210, 0x8765_4321u32 as i32, 8, 9]);
    }

    #[test]
    fn symmetric_pack_has_no_zero_point() {
        let q = GroupQuantized {
            rows: 1,
            cols: 8,
            bits: 4,
            group_size: 8,
            symmetry: Symmetry::Symmetric,
            codes: vec![8; 8],
            scales: vec![1.0],
            zeros: vec![8],
            g_idx: vec![0; 8],
        };
        let t = pack_quantized("p", &q, ExportDType::BF16);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].1.as_i32(), vec![0x8888_8888u32 as i32]);
        assert_eq!(t[1].1.dtype, safetensors::Dtype::BF16);
    }
}
