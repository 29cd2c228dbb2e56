//! compressed-tensors `float-quantized` checkpoints: FP8 E4M3 projection weights.
//!
//! Layout (as compressed-tensors' naive float compressor writes it, and vLLM's
//! `CompressedTensorsW8A16Fp8` / `CompressedTensorsW8A8Fp8` schemes read it): `P.weight` is
//! `F8_E4M3` `[out, in]`; `P.weight_scale` is f32 (or the model's bf16/f16) `[out, 1]` for
//! `strategy: "channel"` or `[1]` for `"tensor"`; `W[o, i] = decode(weight[o, i]) * scale[o]`.
//! `input_activations` is `null` (W8A16) or dynamic FP8 per token (W8A8-FP8; see
//! `qmatmul::fp8` for what the CPU does with it). Projections listed in `ignore` are stored
//! float and load as such, decided per tensor by its dtype.
//!
//! Every value is checked before it is served: a NaN weight code, or a scale that is zero,
//! negative, NaN or infinite, is a load error naming the tensor and the element.

use ::safetensors::Dtype;
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use serde_json::Value;

use super::{ConfigFields, RawTensor, TensorSource};
use crate::e4m3;
use crate::error::Result;
use crate::qmatmul::{Fp8Activations, QWeight, BLOCK};
use crate::weights::LinearWeight;

/// How the weight scales are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    /// One scale per output channel: `weight_scale` is `[out, 1]`.
    Channel,
    /// One scale for the whole matrix: `weight_scale` is `[1]`.
    Tensor,
}

/// A parsed `float-quantized` `quantization_config`.
#[derive(Debug)]
pub(crate) struct Fp8Scheme {
    strategy: Strategy,
    activations: Fp8Activations,
}

impl Fp8Scheme {
    pub(crate) fn from_config(config: &Value, fields: &ConfigFields) -> Result<Self> {
        let groups = config
            .get("config_groups")
            .and_then(Value::as_object)
            .filter(|groups| !groups.is_empty())
            .ok_or_else(|| fields.invalid("config_groups", "missing or empty"))?;
        let mut schemes = groups
            .iter()
            .map(|(name, group)| Self::from_group(&format!("config_groups.{name}"), group, fields));
        let first = schemes.next().expect("non-empty")?;
        for scheme in schemes {
            let scheme = scheme?;
            if (scheme.strategy, scheme.activations) != (first.strategy, first.activations) {
                return Err(fields.invalid(
                    "config_groups",
                    "groups with different FP8 schemes are not supported",
                ));
            }
        }
        Ok(first)
    }

    fn from_group(at: &str, group: &Value, fields: &ConfigFields) -> Result<Self> {
        if let Some(format) = group.get("format").and_then(Value::as_str) {
            if format != "float-quantized" {
                return Err(fields.unsupported(&format!("{at}.format"), format));
            }
        }
        let weights = group
            .get("weights")
            .filter(|w| w.is_object())
            .ok_or_else(|| fields.invalid(&format!("{at}.weights"), "missing"))?;
        expect_fp8(weights, &format!("{at}.weights"), fields)?;
        if weights.get("dynamic").and_then(Value::as_bool) == Some(true) {
            return Err(fields.unsupported(&format!("{at}.weights.dynamic"), true));
        }
        let strategy = match weights.get("strategy").and_then(Value::as_str) {
            Some("channel") => Strategy::Channel,
            Some("tensor") => Strategy::Tensor,
            other => {
                return Err(fields.unsupported(
                    &format!("{at}.weights.strategy"),
                    other.unwrap_or("<missing>"),
                ))
            }
        };
        let activations = match group.get("input_activations") {
            None | Some(Value::Null) => Fp8Activations::Bf16,
            Some(input) => {
                let at = format!("{at}.input_activations");
                expect_fp8(input, &at, fields)?;
                // A static scale, or one shared by the whole batch, would make a row's result
                // depend on the others (or need calibration data we do not load).
                if input.get("dynamic").and_then(Value::as_bool) != Some(true) {
                    let dynamic = input.get("dynamic").cloned().unwrap_or(Value::Null);
                    return Err(fields.unsupported(&format!("{at}.dynamic"), dynamic));
                }
                match input.get("strategy").and_then(Value::as_str) {
                    Some("token") => Fp8Activations::E4m3PerToken,
                    other => {
                        return Err(fields
                            .unsupported(&format!("{at}.strategy"), other.unwrap_or("<missing>")))
                    }
                }
            }
        };
        Ok(Self {
            strategy,
            activations,
        })
    }

    /// The header checks of projection `name` (`P.weight`) against `shape` (`[out, in]`).
    pub(crate) fn check(
        &self,
        source: &dyn TensorSource,
        name: &str,
        shape: &[usize],
    ) -> Result<()> {
        let weight = source.raw(name)?;
        if is_float(weight.dtype) {
            // Listed in `ignore`: stored unquantized.
            return source.check_float(name, shape);
        }
        if weight.dtype != Dtype::F8_E4M3 {
            return Err(source.tensor_error(
                name,
                format!(
                    "dtype {:?}: a float-quantized weight is F8_E4M3 (or float when ignored)",
                    weight.dtype
                ),
            ));
        }
        if weight.shape != shape {
            return Err(source.tensor_error(
                name,
                format!(
                    "shape {:?} does not match config.json, which implies {shape:?}",
                    weight.shape
                ),
            ));
        }
        let scale_name = scale_name(name);
        if !source.contains(&scale_name) {
            return Err(source.tensor_error(
                &scale_name,
                format!("missing: the F8_E4M3 weight `{name}` needs its scale"),
            ));
        }
        let scale = source.raw(&scale_name)?;
        if !is_float(scale.dtype) {
            return Err(source.tensor_error(
                &scale_name,
                format!(
                    "dtype {:?} is not supported (F32, F16 or BF16 only)",
                    scale.dtype
                ),
            ));
        }
        let (expected, strategy): (Vec<Vec<usize>>, _) = match self.strategy {
            Strategy::Channel => (vec![vec![shape[0], 1], vec![shape[0]]], "channel"),
            Strategy::Tensor => (vec![vec![1], vec![]], "tensor"),
        };
        if !expected.contains(&scale.shape) {
            return Err(source.tensor_error(
                &scale_name,
                format!(
                    "shape {:?} does not fit strategy `{strategy}` (expected {:?})",
                    scale.shape, expected[0]
                ),
            ));
        }
        Ok(())
    }

    /// Projection `name`, checked by [`Fp8Scheme::check`]: packed for our CPU kernels, or
    /// dequantized to f32 for the GPU (and for an input size the kernels do not tile).
    pub(crate) fn load_linear(
        &self,
        source: &dyn TensorSource,
        name: &str,
        repack_for_cpu: bool,
    ) -> Result<LinearWeight> {
        let weight = source.raw(name)?;
        if is_float(weight.dtype) {
            return Ok(LinearWeight::dense(source.load_f32(name)?));
        }
        let (n, k) = (weight.shape[0], weight.shape[1]);
        let codes = weight.data;
        if let Some(at) = codes.iter().position(|&c| e4m3::is_nan(c)) {
            return Err(source.tensor_error(
                name,
                format!(
                    "element [{}, {}] is the E4M3 NaN code {:#04x}",
                    at / k,
                    at % k,
                    codes[at]
                ),
            ));
        }
        let scale_name = scale_name(name);
        let scale = source.raw(&scale_name)?;
        let values = float_values(&scale);
        if let Some((at, bad)) = values
            .iter()
            .enumerate()
            .find(|(_, s)| !(s.is_finite() && **s > 0.0))
        {
            return Err(source.tensor_error(
                &scale_name,
                format!("element {at} is {bad}: an FP8 scale must be a positive finite number"),
            ));
        }
        let scales = match self.strategy {
            Strategy::Channel => values,
            Strategy::Tensor => vec![values[0]; n],
        };
        let error = |e: candle_core::Error| source.tensor_error(name, e.to_string());
        if repack_for_cpu && k.is_multiple_of(BLOCK) {
            let packed =
                QWeight::from_e4m3(codes, n, k, &scales, self.activations).map_err(error)?;
            return Ok(LinearWeight::Packed(packed));
        }
        let dense: Vec<f32> = codes
            .chunks_exact(k)
            .zip(&scales)
            .flat_map(|(row, &scale)| row.iter().map(move |&c| e4m3::decode(c) * scale))
            .collect();
        Ok(LinearWeight::dense(
            Tensor::from_vec(dense, (n, k), &Device::Cpu).map_err(error)?,
        ))
    }

    /// Whether the checkpoint tensor `name` is one this scheme reads besides the model's plan.
    pub(crate) fn reads(name: &str) -> bool {
        name.ends_with(".weight_scale")
    }
}

/// `num_bits: 8`, `type: "float"` at `at`.
fn expect_fp8(args: &Value, at: &str, fields: &ConfigFields) -> Result<()> {
    match args.get("num_bits").and_then(Value::as_u64) {
        Some(8) => {}
        other => {
            let value = other.map_or("<missing>".to_string(), |b| b.to_string());
            return Err(fields.unsupported(&format!("{at}.num_bits"), value));
        }
    }
    match args.get("type").and_then(Value::as_str) {
        Some("float") => Ok(()),
        other => Err(fields.unsupported(&format!("{at}.type"), other.unwrap_or("<missing>"))),
    }
}

/// `P.weight_scale` of `P.weight`.
fn scale_name(weight: &str) -> String {
    format!("{}_scale", weight)
}

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// The values of a float tensor (checked by [`is_float`]), as f32.
fn float_values(t: &RawTensor) -> Vec<f32> {
    match t.dtype {
        Dtype::F32 => t
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => t
            .data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => t
            .data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => unreachable!("float_values of {other:?}"),
    }
}
