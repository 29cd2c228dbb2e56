//! compressed-tensors checkpoints (llm-compressor's output) with integer weights. For a
//! projection `P` of shape `[n, k]` (out, in):
//!
//! - `pack-quantized` (W4A16): `P.weight_packed` int32 `[n, ceil(k / 8)]`, 8 consecutive inputs
//!   per word, low nibble first, each the signed value plus 8; `P.weight_shape` `[2]` = `[n, k]`;
//!   `P.weight_scale` `[n, groups]` (the model's float type); asymmetric adds
//!   `P.weight_zero_point` int32 `[ceil(n / 8), groups]`, packed the same way along the
//!   *outputs* (signed, plus 8); act-order adds `P.weight_g_idx` `[k]`.
//!   `W = scale * (q - zero)`: on the stored unsigned codes `u`, `scale * (u - 8)` when
//!   symmetric and `scale * (u - u_zero)` when not.
//! - `int-quantized` (W8A8, or W8A16 without `input_activations`): `P.weight` int8 `[n, k]` and
//!   `P.weight_scale` `[n, 1]` (`channel`), `[1]` (`tensor`) or `[n, groups]` (`group`),
//!   symmetric. Activations: compressed-tensors quantizes them dynamically per token to int8;
//!   our kernels quantize them dynamically per block of 32 (a finer grain: at least as
//!   accurate, not bit-equal to an int8 GEMM with per-token scales).
//! - `float-quantized` (FP8): `P.weight` F8_E4M3 `[n, k]` and `P.weight_scale` `[n, 1]`
//!   (`channel`) or `[1]` (`tensor`); activations bf16 (W8A16) or dynamic E4M3 per token
//!   (W8A8-FP8). Read by [`super::fp8`].

use super::{
    contiguous_groups, group_map, nibble, per_row_scales, Codes, Fields, GroupSize, QuantMatrix,
    Shape, TensorSource,
};
use crate::error::Result;
use crate::qmatmul::Fp8Activations;

pub(crate) const SUFFIXES: &[&str] = &[
    "weight",
    "weight_packed",
    "weight_shape",
    "weight_scale",
    "weight_zero_point",
    "weight_g_idx",
];

/// compressed-tensors' `format`, the packing of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// compressed-tensors' own names: pack-quantized, int-quantized, float-quantized.
#[allow(clippy::enum_variant_names)]
pub enum CompressedFormat {
    /// Integers of up to 8 bits packed into int32 words (4-bit here).
    PackQuantized,
    /// int8 weights stored as int8.
    IntQuantized,
    /// FP8 (E4M3) weights stored as F8_E4M3.
    FloatQuantized,
}

impl CompressedFormat {
    const KNOWN: &'static str = "pack-quantized, int-quantized, float-quantized";

    /// The `format` field's value, read from `f`.
    fn parse(f: &Fields, name: &str) -> Result<Self> {
        match name {
            "pack-quantized" => Ok(Self::PackQuantized),
            "int-quantized" | "naive-quantized" => Ok(Self::IntQuantized),
            "float-quantized" => Ok(Self::FloatQuantized),
            other => Err(f.unsupported("format", other, Self::KNOWN)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::PackQuantized => "pack-quantized",
            Self::IntQuantized => "int-quantized",
            Self::FloatQuantized => "float-quantized",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CompressedConfig {
    pub format: CompressedFormat,
    pub symmetric: bool,
    pub group_size: GroupSize,
    /// What FP8 weights multiply (`float-quantized` only; `Bf16` otherwise).
    pub float_activations: Fp8Activations,
}

impl CompressedConfig {
    pub(crate) fn parse(f: &Fields) -> Result<Self> {
        let status = f.opt_str("quantization_status")?;
        if let Some(status) = status.filter(|s| s != "compressed") {
            return Err(f.unsupported("quantization_status", &status, "compressed"));
        }
        if let Some(kv) = f.get("kv_cache_scheme") {
            return Err(f.unsupported("kv_cache_scheme", &kv.to_string(), "null"));
        }
        if let Some(sparsity) = f.child("sparsity_config") {
            let format = sparsity.opt_str("format")?;
            if let Some(format) = format.filter(|s| s != "dense") {
                return Err(sparsity.unsupported("format", &format, "dense"));
            }
        }
        let top_format = f.opt_str("format")?;
        let groups = f
            .child("config_groups")
            .filter(|g| g.value.as_object().is_some_and(|o| !o.is_empty()))
            .ok_or_else(|| f.unsupported("config_groups", "(none)", "one or more groups"))?;
        let mut parsed: Option<(String, Self)> = None;
        for name in groups.value.as_object().expect("checked").keys() {
            let group = groups.child(name).expect("a key of the object");
            let scheme = Self::parse_group(&group, top_format.as_deref().map(|t| (f, t)))?;
            match &parsed {
                None => parsed = Some((name.clone(), scheme)),
                Some((first, seen)) if !seen.same_as(&scheme) => {
                    return Err(groups.unsupported(
                        name,
                        &format!("{scheme:?}"),
                        &format!("the scheme of `{first}` ({seen:?}): one scheme for all layers"),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(parsed.expect("at least one group").1)
    }

    fn same_as(&self, other: &Self) -> bool {
        self.format == other.format
            && self.symmetric == other.symmetric
            && self.group_size == other.group_size
            && self.float_activations == other.float_activations
    }

    /// One of `config_groups`; `top_format`: the top-level `format` and where it was read.
    fn parse_group(group: &Fields, top_format: Option<(&Fields, &str)>) -> Result<Self> {
        let (format, format_name) = match group.opt_str("format")? {
            Some(name) => (CompressedFormat::parse(group, &name)?, name),
            None => match top_format {
                Some((top, name)) => (CompressedFormat::parse(top, name)?, name.to_string()),
                None => return Err(group.unsupported("format", "(none)", CompressedFormat::KNOWN)),
            },
        };
        let w = group
            .child("weights")
            .ok_or_else(|| group.unsupported("weights", "null", "integer weight quantization"))?;
        let kind = w.opt_str("type")?.unwrap_or_else(|| "int".into());
        // `naive-quantized` (read as int-quantized) stores the values as they are: int8 or
        // FP8, as the weights' type says (llm-compressor writes weight-only FP8 that way).
        let format = match (format_name.as_str(), kind.as_str()) {
            ("naive-quantized", "float") => CompressedFormat::FloatQuantized,
            _ => format,
        };
        let expected_kind = match format {
            CompressedFormat::FloatQuantized => "float",
            _ => "int",
        };
        if kind != expected_kind {
            return Err(w.unsupported("type", &kind, expected_kind));
        }
        let bits = match format {
            CompressedFormat::PackQuantized => w.bits("num_bits", Some(8), &[4])?,
            CompressedFormat::IntQuantized | CompressedFormat::FloatQuantized => {
                w.bits("num_bits", Some(8), &[8])?
            }
        };
        debug_assert!(bits == 4 || bits == 8);
        if w.opt_bool("dynamic")? == Some(true) {
            return Err(w.unsupported("dynamic", "true", "false (static weight scales)"));
        }
        let symmetric = w.opt_bool("symmetric")?.unwrap_or(true);
        if !symmetric && format != CompressedFormat::PackQuantized {
            return Err(w.unsupported(
                "symmetric",
                "false",
                &format!("true (for {})", format.name()),
            ));
        }
        let strategy = w.opt_str("strategy")?.unwrap_or_else(|| "tensor".into());
        let group_size = match (strategy.as_str(), format) {
            ("group", _) => match w.group_size("group_size")? {
                GroupSize::Every(g) => GroupSize::Every(g),
                GroupSize::Row => return Err(w.unsupported("group_size", "null", "a size")),
            },
            ("channel", _) => GroupSize::Row,
            // One scale for the whole matrix: per row, the same value in every row.
            ("tensor", CompressedFormat::IntQuantized | CompressedFormat::FloatQuantized) => {
                GroupSize::Row
            }
            (other, CompressedFormat::PackQuantized) => {
                return Err(w.unsupported("strategy", other, "group, channel"))
            }
            (other, CompressedFormat::IntQuantized) => {
                return Err(w.unsupported("strategy", other, "channel, tensor, group"))
            }
            (other, CompressedFormat::FloatQuantized) => {
                return Err(w.unsupported("strategy", other, "channel, tensor"))
            }
        };
        if format == CompressedFormat::FloatQuantized && group_size != GroupSize::Row {
            return Err(w.unsupported(
                "strategy",
                "group",
                "channel, tensor (for float-quantized)",
            ));
        }
        let mut float_activations = Fp8Activations::Bf16;
        match (format, group.child("input_activations")) {
            (_, None) => {}
            (CompressedFormat::FloatQuantized, Some(a)) => {
                float_activations = super::fp8::activations(&a)?;
            }
            (CompressedFormat::IntQuantized, Some(a)) => {
                let kind = a.opt_str("type")?.unwrap_or_else(|| "int".into());
                if kind != "int" {
                    return Err(a.unsupported("type", &kind, "int"));
                }
                a.bits("num_bits", Some(8), &[8])?;
                if a.opt_bool("dynamic")? != Some(true) {
                    let value = a.get("dynamic").map_or("(none)".into(), |v| v.to_string());
                    return Err(a.unsupported("dynamic", &value, "true (per-token dynamic)"));
                }
            }
            (CompressedFormat::PackQuantized, Some(a)) => {
                return Err(group.unsupported(
                    "input_activations",
                    &a.value.to_string(),
                    "null (weight-only W4A16)",
                ))
            }
        }
        if let Some(out) = group.get("output_activations") {
            return Err(group.unsupported("output_activations", &out.to_string(), "null"));
        }
        Ok(Self {
            format,
            symmetric,
            group_size,
            float_activations,
        })
    }
}

pub(crate) fn load(
    config: &CompressedConfig,
    src: &dyn TensorSource,
    base: &str,
    shape: Shape,
) -> Result<Option<QuantMatrix>> {
    match config.format {
        CompressedFormat::PackQuantized => load_packed(config, src, base, shape),
        CompressedFormat::IntQuantized => load_int8(config, src, base, shape),
        CompressedFormat::FloatQuantized => {
            super::fp8::load(config.float_activations, src, base, shape)
        }
    }
}

fn load_packed(
    config: &CompressedConfig,
    src: &dyn TensorSource,
    base: &str,
    Shape { n, k }: Shape,
) -> Result<Option<QuantMatrix>> {
    let name = |suffix: &str| format!("{base}.{suffix}");
    let Some(packed) = src.tensor(&name("weight_packed"))? else {
        return Ok(None);
    };
    let words_per_row = k.div_ceil(8);
    packed.expect_shape(
        &[n, words_per_row],
        &format!("[out, ceil(in / 8)] for a [{n}, {k}] projection"),
    )?;
    if let Some(t) = src.tensor(&name("weight_shape"))? {
        let stored = t.ints()?;
        if stored != [n as i64, k as i64] {
            return Err(src.error(
                &name("weight_shape"),
                format!("{stored:?}, but config.json implies [{n}, {k}]"),
            ));
        }
    }
    let field = "quantization_config.config_groups.*.weights.group_size";
    let groups = config
        .group_size
        .groups(k, src, &name("weight_packed"), field)?;
    let scale_t = src.require(&name("weight_scale"))?;
    scale_t.expect_shape(&[n, groups], "[out, groups]")?;
    let scales = scale_t.floats()?;
    let g_idx = group_map(src, &name("weight_g_idx"), k, groups, config.group_size)?;

    let words = packed.i32s()?;
    let mut codes = vec![0u8; n * k];
    for (o, row) in words.chunks_exact(words_per_row).enumerate() {
        for (i, code) in codes[o * k..(o + 1) * k].iter_mut().enumerate() {
            *code = nibble(row[i / 8], i % 8);
        }
    }
    let zeros = match config.symmetric {
        true => vec![8u8; n * groups],
        false => {
            let zp = src.require(&name("weight_zero_point"))?;
            zp.expect_shape(&[n.div_ceil(8), groups], "[ceil(out / 8), groups]")?;
            let words = zp.i32s()?;
            let mut zeros = vec![0u8; n * groups];
            for o in 0..n {
                for g in 0..groups {
                    zeros[o * groups + g] = nibble(words[(o / 8) * groups + g], o % 8);
                }
            }
            zeros
        }
    };
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

fn load_int8(
    config: &CompressedConfig,
    src: &dyn TensorSource,
    base: &str,
    Shape { n, k }: Shape,
) -> Result<Option<QuantMatrix>> {
    let name = |suffix: &str| format!("{base}.{suffix}");
    let weight = src.require(&name("weight"))?;
    // Layers the tool left out (`ignore`) keep a float weight and no scale.
    if weight.dtype != ::safetensors::Dtype::I8 && src.tensor(&name("weight_scale"))?.is_none() {
        return Ok(None);
    }
    weight.expect_shape(&[n, k], &format!("[out, in] for a [{n}, {k}] projection"))?;
    let q = weight.i8s()?;
    let field = "quantization_config.config_groups.*.weights.group_size";
    let groups = config.group_size.groups(k, src, &name("weight"), field)?;
    let scale_t = src.require(&name("weight_scale"))?;
    let scales = per_row_scales(&scale_t, n, groups)?;
    if let Some(zp) = src.tensor(&name("weight_zero_point"))? {
        // Symmetric schemes may still carry zero points, all zero.
        if zp.dtype != ::safetensors::Dtype::I8 || zp.data.iter().any(|&b| b != 0) {
            return Err(src.error(
                &name("weight_zero_point"),
                "non-zero zero points in a symmetric int8 scheme".into(),
            ));
        }
    }
    Ok(Some(QuantMatrix {
        name: base.to_string(),
        n,
        k,
        codes: Codes::I8(q),
        scales,
        groups,
        g_idx: contiguous_groups(k, config.group_size.len(k)),
    }))
}
