//! GPTQ checkpoints as AutoGPTQ and GPTQModel write them (`checkpoint_format` `gptq`, and
//! GPTQModel's `gptq_v2`), 4-bit. For a projection `P` of shape `[n, k]` (out, in):
//!
//! - `P.qweight` int32 `[k / 8, n]`: word `[r, o]` holds inputs `8r..8r + 8` of output `o`,
//!   input `8r + j` in bits `4j..4j + 4`;
//! - `P.qzeros` int32 `[groups, n / 8]`: word `[g, c]` holds the zero points of outputs
//!   `8c..8c + 8` the same way; format `gptq` (v1) stores `zero - 1`, and its readers add the 1
//!   back to the masked nibble (so a stored 15 reads as 16), `gptq_v2` stores the zero itself;
//! - `P.scales` `[groups, n]` (f16);
//! - `P.g_idx` int32 `[k]`: the group of each input (`i / group_size` unless act-order).
//!
//! `W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])`.

use super::{
    group_map, nibbles, transpose_group_params, Codes, Fields, GroupSize, QuantMatrix, Shape,
    TensorSource,
};
use crate::error::Result;

pub(crate) const SUFFIXES: &[&str] = &["qweight", "qzeros", "scales", "g_idx"];

#[derive(Debug, Clone)]
pub struct GptqConfig {
    pub bits: u32,
    pub group_size: GroupSize,
    /// What the file stores for a zero point `z`: `z - 1` (v1) or `z` (v2).
    pub zero_offset: u8,
}

impl GptqConfig {
    pub(crate) fn parse(f: &Fields) -> Result<Self> {
        let bits = f.bits("bits", None, &[4])?;
        let group_size = f.group_size("group_size")?;
        let format = f.opt_str("checkpoint_format")?;
        let zero_offset = match format.as_deref().unwrap_or("gptq") {
            "gptq" => 1,
            "gptq_v2" => 0,
            other => return Err(f.unsupported("checkpoint_format", other, "gptq, gptq_v2")),
        };
        // desc_act and sym need no setting: g_idx and qzeros say the same per tensor.
        f.opt_bool("desc_act")?;
        f.opt_bool("sym")?;
        if f.opt_bool("lm_head")? == Some(true) {
            return Err(f.unsupported("lm_head", "true", "false (a float lm_head)"));
        }
        Ok(Self {
            bits,
            group_size,
            zero_offset,
        })
    }
}

pub(crate) fn load(
    config: &GptqConfig,
    src: &dyn TensorSource,
    base: &str,
    Shape { n, k }: Shape,
) -> Result<Option<QuantMatrix>> {
    let name = |suffix: &str| format!("{base}.{suffix}");
    let Some(qweight) = src.tensor(&name("qweight"))? else {
        return Ok(None);
    };
    if !k.is_multiple_of(8) || !n.is_multiple_of(8) {
        return Err(src.error(
            &name("qweight"),
            format!("a [{n}, {k}] projection does not pack 8 values per int32"),
        ));
    }
    let what = format!("[in / 8, out] for a [{n}, {k}] projection");
    qweight.expect_shape(&[k / 8, n], &what)?;
    let groups =
        config
            .group_size
            .groups(k, src, &name("qweight"), "quantization_config.group_size")?;
    let scales_t = src.require(&name("scales"))?;
    scales_t.expect_shape(&[groups, n], "[groups, out]")?;
    let qzeros = src.require(&name("qzeros"))?;
    qzeros.expect_shape(&[groups, n / 8], "[groups, out / 8]")?;
    let g_idx = group_map(src, &name("g_idx"), k, groups, config.group_size)?;

    // qweight [k/8, n] -> codes [n][k].
    let words = qweight.i32s()?;
    let mut codes = vec![0u8; n * k];
    for (r, row) in words.chunks_exact(n).enumerate() {
        for (o, &word) in row.iter().enumerate() {
            for (j, q) in nibbles(word).enumerate() {
                codes[o * k + 8 * r + j] = q;
            }
        }
    }
    // scales [groups, n] -> [n][groups]; zeros likewise.
    let (scales, zeros) = transpose_group_params(
        &scales_t.floats()?,
        &qzeros.i32s()?,
        n,
        groups,
        |c, j| 8 * c + j,
        config.zero_offset,
    );
    Ok(Some(QuantMatrix {
        name: base.to_string(),
        n,
        k,
        codes: Codes::U4 { codes, zeros },
        scales,
        groups,
        g_idx,
    }))
}
