//! AWQ checkpoints in AutoAWQ's GEMM packing (`version: gemm`), 4-bit with zero points. For a
//! projection `P` of shape `[n, k]` (out, in):
//!
//! - `P.qweight` int32 `[k, n / 8]`: word `[i, c]` holds outputs `8c..8c + 8` of input `i`,
//!   nibble `j` (bits `4j..4j + 4`) being output `8c + ORDER[j]`, `ORDER = [0, 2, 4, 6, 1, 3,
//!   5, 7]` (the order AWQ's GEMM kernel unpacks in);
//! - `P.qzeros` int32 `[groups, n / 8]`, the same packing, the zero point stored as it is;
//! - `P.scales` `[groups, n]` (f16).
//!
//! `W[o, i] = scales[i / group_size, o] * (q[i, o] - zero[i / group_size, o])`.

use super::{
    contiguous_groups, nibbles, transpose_group_params, Codes, Fields, GroupSize, QuantMatrix,
    Shape, TensorSource,
};
use crate::error::Result;

pub(crate) const SUFFIXES: &[&str] = &["qweight", "qzeros", "scales"];

/// Nibble `j` of a word holds output `8c + ORDER[j]`.
const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

#[derive(Debug, Clone)]
pub struct AwqConfig {
    pub bits: u32,
    pub group_size: GroupSize,
}

impl AwqConfig {
    pub(crate) fn parse(f: &Fields) -> Result<Self> {
        // transformers' AwqConfig spells them bits / group_size; AutoAWQ's own quant_config
        // w_bit / q_group_size.
        let bits_field = if f.get("bits").is_some() {
            "bits"
        } else {
            "w_bit"
        };
        let bits = f.bits(bits_field, None, &[4])?;
        let group_field = if f.get("group_size").is_some() {
            "group_size"
        } else {
            "q_group_size"
        };
        let group_size = f.group_size(group_field)?;
        let version = f.opt_str("version")?.unwrap_or_else(|| "gemm".into());
        if !version.eq_ignore_ascii_case("gemm") {
            return Err(f.unsupported("version", &version, "gemm"));
        }
        if f.opt_bool("zero_point")? == Some(false) {
            return Err(f.unsupported("zero_point", "false", "true"));
        }
        Ok(Self { bits, group_size })
    }
}

pub(crate) fn load(
    config: &AwqConfig,
    src: &dyn TensorSource,
    base: &str,
    Shape { n, k }: Shape,
) -> Result<Option<QuantMatrix>> {
    let name = |suffix: &str| format!("{base}.{suffix}");
    let Some(qweight) = src.tensor(&name("qweight"))? else {
        return Ok(None);
    };
    if !n.is_multiple_of(8) {
        return Err(src.error(
            &name("qweight"),
            format!("a [{n}, {k}] projection does not pack 8 outputs per int32"),
        ));
    }
    qweight.expect_shape(
        &[k, n / 8],
        &format!("[in, out / 8] for a [{n}, {k}] projection"),
    )?;
    let groups =
        config
            .group_size
            .groups(k, src, &name("qweight"), "quantization_config.group_size")?;
    let scales_t = src.require(&name("scales"))?;
    scales_t.expect_shape(&[groups, n], "[groups, out]")?;
    let qzeros = src.require(&name("qzeros"))?;
    qzeros.expect_shape(&[groups, n / 8], "[groups, out / 8]")?;

    let words = qweight.i32s()?;
    let mut codes = vec![0u8; n * k];
    for (i, row) in words.chunks_exact(n / 8).enumerate() {
        for (c, &word) in row.iter().enumerate() {
            for (j, q) in nibbles(word).enumerate() {
                codes[(8 * c + ORDER[j]) * k + i] = q;
            }
        }
    }
    let (scales, zeros) = transpose_group_params(
        &scales_t.floats()?,
        &qzeros.i32s()?,
        n,
        groups,
        |c, j| 8 * c + ORDER[j],
        0,
    );
    Ok(Some(QuantMatrix {
        name: base.to_string(),
        n,
        k,
        codes: Codes::U4 { codes, zeros },
        scales,
        groups,
        g_idx: contiguous_groups(k, config.group_size.len(k)),
    }))
}
