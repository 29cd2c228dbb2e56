//! compressed-tensors `float-quantized` projections: FP8 E4M3 weights.
//!
//! Layout (as compressed-tensors' naive float compressor writes it, and vLLM's
//! `CompressedTensorsW8A16Fp8` / `CompressedTensorsW8A8Fp8` schemes read it): `P.weight` is
//! `F8_E4M3` `[out, in]`; `P.weight_scale` is f32 (or the model's bf16/f16) `[out, 1]` for
//! `strategy: "channel"` or `[1]` for `"tensor"`; `W[o, i] = decode(weight[o, i]) * scale[o]`.
//! `input_activations` is `null` (W8A16) or dynamic FP8 per token (W8A8-FP8; see
//! `qmatmul::fp8` for what the CPU does with it). Projections listed in `ignore` are stored
//! float and load as such.
//!
//! Every value is checked before it is served: a NaN weight code, or a scale that is zero,
//! negative, NaN or infinite, is a load error naming the tensor and the element.

use ::safetensors::Dtype;

use super::{contiguous_groups, per_row_scales, Codes, Fields, QuantMatrix, Shape, TensorSource};
use crate::e4m3;
use crate::error::Result;
use crate::qmatmul::Fp8Activations;

/// What a `float-quantized` group's `input_activations` (not null) asks for: only dynamic FP8
/// per token loads. A static scale, or one shared by the whole batch, would make a row's
/// result depend on the other rows (or need calibration data we do not load).
pub(crate) fn activations(a: &Fields) -> Result<Fp8Activations> {
    let kind = a.opt_str("type")?.unwrap_or_else(|| "float".into());
    if kind != "float" {
        return Err(a.unsupported("type", &kind, "float"));
    }
    a.bits("num_bits", Some(8), &[8])?;
    if a.opt_bool("dynamic")? != Some(true) {
        let value = a.get("dynamic").map_or("(none)".into(), |v| v.to_string());
        return Err(a.unsupported("dynamic", &value, "true (per-token dynamic)"));
    }
    match a.opt_str("strategy")?.as_deref() {
        Some("token") => Ok(Fp8Activations::E4m3PerToken),
        other => Err(a.unsupported("strategy", other.unwrap_or("(none)"), "token")),
    }
}

/// Projection `base`, or `None` when the tool left it float (`ignore`d: no scale);
/// `activations`: what the config says its weights multiply.
pub(crate) fn load(
    activations: Fp8Activations,
    src: &dyn TensorSource,
    base: &str,
    Shape { n, k }: Shape,
) -> Result<Option<QuantMatrix>> {
    let weight_name = format!("{base}.weight");
    let scale_name = format!("{base}.weight_scale");
    let weight = src.require(&weight_name)?;
    if weight.is_float() && !src.contains(&scale_name) {
        return Ok(None);
    }
    if weight.dtype != Dtype::F8_E4M3 {
        return Err(src.error(
            &weight_name,
            format!(
                "dtype {:?}: a float-quantized weight is F8_E4M3",
                weight.dtype
            ),
        ));
    }
    weight.expect_shape(&[n, k], &format!("[out, in] for a [{n}, {k}] projection"))?;
    let codes = weight.data.to_vec();
    if let Some(at) = codes.iter().position(|&c| e4m3::is_nan(c)) {
        return Err(src.error(
            &weight_name,
            format!(
                "element [{}, {}] is the E4M3 NaN code {:#04x}",
                at / k,
                at % k,
                codes[at]
            ),
        ));
    }
    let scale = src.require(&scale_name)?;
    let scales = per_row_scales(&scale, n, 1)?;
    if let Some((at, bad)) = scales
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        return Err(src.error(
            &scale_name,
            format!("element {at} is {bad}: an FP8 scale must be a positive finite number"),
        ));
    }
    Ok(Some(QuantMatrix {
        name: base.to_string(),
        n,
        k,
        codes: Codes::E4m3 { codes, activations },
        scales,
        groups: 1,
        g_idx: contiguous_groups(k, k),
    }))
}
