//! Hugging Face folders whose projection matrices are integer-quantized by another tool: GPTQ
//! (AutoGPTQ / GPTQModel, [`gptq`]), AWQ's GEMM packing (AutoAWQ, [`awq`]) and
//! compressed-tensors' `pack-quantized` W4A16, `int-quantized` W8A8 and `float-quantized` FP8
//! (llm-compressor, [`compressed`], [`fp8`]). `config.json`'s `quantization_config` names the scheme
//! ([`QuantScheme::from_folder`]); each format file turns one projection's tensors into a
//! [`QuantMatrix`] (codes, scales, zero points, group map), which becomes a packed
//! [`QWeight`] for our batch-reusing CPU kernels, or an f32 matrix where those cannot hold it
//! exactly (the GPU; groups that are not whole blocks of 32 inputs).
//!
//! # Numerics
//!
//! A 4-bit matrix is `W[o, i] = s[o, g(i)] * (q[o, i] - z[o, g(i)])`: the tiles keep `q` and `z`
//! as they are and `s` as f16, so the kernels multiply exactly the checkpoint's values whenever
//! its scales are f16 (GPTQ, AWQ) or bf16 within f16's normal range; f32 scales round to f16
//! (relative error at most 2^-11; logged when it happens). Scales that f16 cannot hold to
//! that precision (subnormal or beyond 65504) keep the matrix in f32 instead. The reference
//! tools round `s * (q - z)` to the scale's dtype; we do not, so against their dequantized
//! weights we differ by that rounding only. int8 matrices multiply per output channel (or
//! group) scales the same way, on the Q8_0 kernels.
//!
//! Act-order (`desc_act`, compressed-tensors' `actorder: group`) assigns input channels to
//! groups through `g_idx`. Sorting the channels by group makes every group contiguous again;
//! the packed weight keeps that order ([`QWeight::input_order`]) and each input row is
//! gathered into it before it is quantized (one pass over `k` values per row and matmul).

mod awq;
mod compressed;
mod fp8;
mod gptq;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::safetensors::Dtype;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use serde_json::Value;

use crate::e4m3;
use crate::error::{ModelError, Result};
use crate::qmatmul::{Fp8Activations, QWeight, BLOCK};
use crate::weights::LinearWeight;

/// The quantization scheme of a folder, from `config.json`'s `quantization_config`.
#[derive(Debug, Clone)]
pub enum QuantScheme {
    Gptq(gptq::GptqConfig),
    Awq(awq::AwqConfig),
    Compressed(compressed::CompressedConfig),
}

impl QuantScheme {
    /// The scheme of the folder whose `config.json` is at `config_path`: its
    /// `quantization_config` (or, for older AutoGPTQ folders without one, the
    /// `quantize_config.json` beside it); `None` for an unquantized folder. An unknown method,
    /// or a field value we cannot load, is an error naming the field and the value.
    pub fn from_folder(config_path: &Path) -> Result<Option<Self>> {
        let text =
            std::fs::read_to_string(config_path).map_err(|e| ModelError::io(config_path, e))?;
        let config: Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: config_path.to_path_buf(),
            message: format!("not a valid config.json: {e}"),
        })?;
        let (qc, path) = match config.get("quantization_config") {
            Some(qc) if !qc.is_null() => (qc.clone(), config_path.to_path_buf()),
            _ => {
                let legacy = config_path.with_file_name("quantize_config.json");
                if !legacy.is_file() {
                    return Ok(None);
                }
                let text =
                    std::fs::read_to_string(&legacy).map_err(|e| ModelError::io(&legacy, e))?;
                let mut qc: Value =
                    serde_json::from_str(&text).map_err(|e| ModelError::Format {
                        path: legacy.clone(),
                        message: format!("not valid JSON: {e}"),
                    })?;
                // AutoGPTQ's own file predates the field.
                if let Some(map) = qc.as_object_mut() {
                    map.entry("quant_method").or_insert_with(|| "gptq".into());
                }
                (qc, legacy)
            }
        };
        let fields = Fields {
            path: &path,
            prefix: "quantization_config".into(),
            value: &qc,
        };
        let method = fields.str("quant_method")?;
        Ok(Some(match method.to_ascii_lowercase().as_str() {
            "gptq" => Self::Gptq(gptq::GptqConfig::parse(&fields)?),
            "awq" => Self::Awq(awq::AwqConfig::parse(&fields)?),
            "compressed-tensors" => Self::Compressed(compressed::CompressedConfig::parse(&fields)?),
            _ => {
                return Err(fields.unsupported(
                    "quant_method",
                    &method,
                    "gptq, awq, compressed-tensors",
                ))
            }
        }))
    }

    /// The name of the scheme, for logs.
    pub fn name(&self) -> String {
        match self {
            Self::Gptq(c) => format!("GPTQ {}-bit", c.bits),
            Self::Awq(c) => format!("AWQ {}-bit", c.bits),
            Self::Compressed(c) => format!("compressed-tensors {}", c.format.name()),
        }
    }

    /// The tensor-name suffixes a quantized projection `P` stores as `P.<suffix>` (checked by
    /// the loader; listed so that they are not reported as unused).
    pub fn tensor_suffixes(&self) -> &'static [&'static str] {
        match self {
            Self::Gptq(_) => gptq::SUFFIXES,
            Self::Awq(_) => awq::SUFFIXES,
            Self::Compressed(_) => compressed::SUFFIXES,
        }
    }

    /// Whether the checkpoint stores projection `base` quantized (any of its quantized
    /// tensors is there, or its `base.weight` is not a float: int8 or FP8 missing its scale is
    /// then reported as such), rather than as a float `base.weight`.
    pub fn stores_quantized(&self, src: &dyn TensorSource, base: &str) -> bool {
        let quantized_weight = src
            .tensor(&format!("{base}.weight"))
            .ok()
            .flatten()
            .is_some_and(|t| !t.is_float());
        quantized_weight
            || self
                .tensor_suffixes()
                .iter()
                .filter(|&&suffix| suffix != "weight")
                .any(|suffix| src.contains(&format!("{base}.{suffix}")))
    }

    /// The projection `base` (e.g. `model.layers.0.mlp.up_proj`, of shape `[n, k]` =
    /// `[out, in]`) as the checkpoint stores it quantized, or `None` when it stores it as a
    /// plain float `base.weight` (a layer the tool left out, like `ignore`d ones).
    pub fn load_linear(
        &self,
        src: &dyn TensorSource,
        base: &str,
        n: usize,
        k: usize,
    ) -> Result<Option<QuantMatrix>> {
        let shape = Shape { n, k };
        match self {
            Self::Gptq(c) => gptq::load(c, src, base, shape),
            Self::Awq(c) => awq::load(c, src, base, shape),
            Self::Compressed(c) => compressed::load(c, src, base, shape),
        }
    }
}

/// The `[n, k]` (out, in) shape `config.json` implies for a projection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub(crate) n: usize,
    pub(crate) k: usize,
}

/// A JSON object of `quantization_config` being read, with its path for errors.
pub(crate) struct Fields<'a> {
    path: &'a Path,
    /// Where this object is, e.g. `quantization_config.config_groups.group_0.weights`.
    prefix: String,
    value: &'a Value,
}

impl<'a> Fields<'a> {
    fn key(&self, field: &str) -> String {
        format!("{}.{field}", self.prefix)
    }

    pub(crate) fn unsupported(&self, field: &str, value: &str, supported: &str) -> ModelError {
        ModelError::Unsupported {
            path: self.path.to_path_buf(),
            key: self.key(field),
            value: value.to_string(),
            supported: supported.to_string(),
        }
    }

    fn bad(&self, field: &str, message: &str) -> ModelError {
        ModelError::Format {
            path: self.path.to_path_buf(),
            message: format!("`{}`: {message}", self.key(field)),
        }
    }

    pub(crate) fn get(&self, field: &str) -> Option<&'a Value> {
        self.value.get(field).filter(|v| !v.is_null())
    }

    pub(crate) fn str(&self, field: &str) -> Result<String> {
        match self.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.bad(field, &format!("expected a string, found {other}"))),
            None => Err(self.bad(field, "missing")),
        }
    }

    pub(crate) fn opt_str(&self, field: &str) -> Result<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(_) => self.str(field).map(Some),
        }
    }

    pub(crate) fn opt_int(&self, field: &str) -> Result<Option<i64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.bad(field, &format!("expected an integer, found {v}"))),
        }
    }

    pub(crate) fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(field, &format!("expected true or false, found {v}"))),
        }
    }

    /// `bits`-like fields: only `supported` values load.
    pub(crate) fn bits(&self, field: &str, default: Option<i64>, supported: &[i64]) -> Result<u32> {
        let bits = match (self.opt_int(field)?, default) {
            (Some(b), _) | (None, Some(b)) => b,
            (None, None) => return Err(self.bad(field, "missing")),
        };
        if !supported.contains(&bits) {
            let list: Vec<String> = supported.iter().map(|b| b.to_string()).collect();
            return Err(self.unsupported(field, &bits.to_string(), &list.join(", ")));
        }
        Ok(bits as u32)
    }

    /// A group size: a positive integer, or -1 (GPTQ's "one group per row").
    pub(crate) fn group_size(&self, field: &str) -> Result<GroupSize> {
        match self.opt_int(field)? {
            None | Some(-1) => Ok(GroupSize::Row),
            Some(g) if g > 0 => Ok(GroupSize::Every(g as usize)),
            Some(g) => Err(self.unsupported(field, &g.to_string(), "a positive size, or -1")),
        }
    }

    pub(crate) fn child(&self, field: &str) -> Option<Fields<'a>> {
        self.get(field).map(|value| Fields {
            path: self.path,
            prefix: self.key(field),
            value,
        })
    }
}

/// How many inputs share a scale and zero point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupSize {
    /// One group per output channel (GPTQ's -1, compressed-tensors' `channel`).
    Row,
    Every(usize),
}

impl GroupSize {
    /// Groups per row of `k` inputs; an error naming `field` when the size does not divide `k`
    /// (tensor `name` being the one loaded).
    pub(crate) fn groups(
        self,
        k: usize,
        src: &dyn TensorSource,
        name: &str,
        field: &str,
    ) -> Result<usize> {
        match self {
            Self::Row => Ok(1),
            Self::Every(g) if k.is_multiple_of(g) => Ok(k / g),
            Self::Every(g) => Err(src.error(
                name,
                format!("{field} = {g} does not divide the {k} input features"),
            )),
        }
    }

    pub(crate) fn len(self, k: usize) -> usize {
        match self {
            Self::Row => k,
            Self::Every(g) => g,
        }
    }
}

/// Where quantized tensors come from: the folder's safetensors files.
pub trait TensorSource {
    /// Tensor `name`, or `None` when no file holds it.
    fn tensor(&self, name: &str) -> Result<Option<RawTensor<'_>>>;

    /// Whether a file holds tensor `name`.
    fn contains(&self, name: &str) -> bool;

    /// The file that holds `name`, or else the file (or index) that should have.
    fn path_of(&self, name: &str) -> PathBuf;

    /// An error about tensor `name`.
    fn error(&self, name: &str, message: String) -> ModelError {
        ModelError::Tensor {
            path: self.path_of(name),
            name: name.to_string(),
            message,
        }
    }

    /// Tensor `name`, an error naming it when it is missing.
    fn require(&self, name: &str) -> Result<RawTensor<'_>> {
        self.tensor(name)?
            .ok_or_else(|| self.error(name, "missing from the checkpoint".into()))
    }
}

/// One tensor's header and bytes, as a safetensors file holds them.
pub struct RawTensor<'a> {
    pub path: &'a Path,
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl RawTensor<'_> {
    /// Whether the tensor holds floats (a projection stored unquantized, or left out by the
    /// tool), rather than codes.
    pub(crate) fn is_float(&self) -> bool {
        matches!(self.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32)
    }

    fn error(&self, message: String) -> ModelError {
        ModelError::Tensor {
            path: self.path.to_path_buf(),
            name: self.name.clone(),
            message,
        }
    }

    /// Checks the shape (`what` says where the expected one comes from).
    pub(crate) fn expect_shape(&self, shape: &[usize], what: &str) -> Result<()> {
        match self.shape == shape {
            true => Ok(()),
            false => Err(self.error(format!(
                "shape {:?}, expected {shape:?} ({what})",
                self.shape
            ))),
        }
    }

    fn expect_dtype(&self, dtypes: &[Dtype]) -> Result<()> {
        match dtypes.contains(&self.dtype) {
            true => Ok(()),
            false => Err(self.error(format!("dtype {:?}, expected {dtypes:?}", self.dtype))),
        }
    }

    /// Checks that the bytes hold the header's shape of `size`-byte values.
    fn bytes(&self, size: usize) -> Result<&[u8]> {
        let count: usize = self.shape.iter().product();
        match self.data.len() == count * size {
            true => Ok(self.data),
            false => Err(self.error(format!(
                "{} bytes for shape {:?}",
                self.data.len(),
                self.shape
            ))),
        }
    }

    /// The values of an I32 tensor.
    pub(crate) fn i32s(&self) -> Result<Vec<i32>> {
        self.expect_dtype(&[Dtype::I32])?;
        Ok(self
            .bytes(4)?
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// The values of an I32 or I64 tensor (shapes, group indices).
    pub(crate) fn ints(&self) -> Result<Vec<i64>> {
        match self.dtype {
            Dtype::I64 => Ok(self
                .bytes(8)?
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect()),
            _ => Ok(self.i32s()?.into_iter().map(i64::from).collect()),
        }
    }

    /// The values of an I8 tensor.
    pub(crate) fn i8s(&self) -> Result<Vec<i8>> {
        self.expect_dtype(&[Dtype::I8])?;
        Ok(self.bytes(1)?.iter().map(|&b| b as i8).collect())
    }

    /// The values of an F16, BF16 or F32 tensor as f32 (exact); NaN or infinity is an error.
    pub(crate) fn floats(&self) -> Result<Vec<f32>> {
        self.expect_dtype(&[Dtype::F16, Dtype::BF16, Dtype::F32])?;
        let values: Vec<f32> = match self.dtype {
            Dtype::F16 => self
                .bytes(2)?
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => self
                .bytes(2)?
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => self
                .bytes(4)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.error(format!("value {} at index {i} is not finite", values[i])));
        }
        Ok(values)
    }
}

/// One projection matrix `[n, k]` as a checkpoint defines it, before packing:
/// `W[o, i] = scales[o * groups + g_idx[i]] * (codes[o * k + i] - zeros[o * groups + g_idx[i]])`.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    /// The projection, e.g. `model.layers.0.mlp.up_proj`: errors and logs name it.
    pub name: String,
    pub n: usize,
    pub k: usize,
    pub codes: Codes,
    /// `[n][groups]`, exactly as the file has them (f16 / bf16 / f32 values).
    pub scales: Vec<f32>,
    pub groups: usize,
    /// The group of each input channel (`[k]`, values below `groups`).
    pub g_idx: Vec<u32>,
}

/// The integer values of a [`QuantMatrix`].
#[derive(Debug, Clone)]
pub enum Codes {
    /// Unsigned 4-bit codes `[n][k]` (0..=15) and zero points `[n][groups]` (0..=16).
    U4 { codes: Vec<u8>, zeros: Vec<u8> },
    /// Signed 8-bit values `[n][k]`, symmetric (zero point 0).
    I8(Vec<i8>),
    /// FP8 E4M3 codes `[n][k]` (one scale per row: `groups` is 1), and what they multiply.
    E4m3 {
        codes: Vec<u8>,
        activations: Fp8Activations,
    },
}

impl QuantMatrix {
    /// `W` as f32 `[n, k]`, by the formula above (exact in f32: an 8-bit integer times the
    /// scale).
    pub fn dequantize(&self) -> Vec<f32> {
        let (k, groups) = (self.k, self.groups);
        let mut out = Vec::with_capacity(self.n * k);
        for o in 0..self.n {
            let scales = &self.scales[o * groups..(o + 1) * groups];
            match &self.codes {
                Codes::U4 { codes, zeros } => {
                    let zeros = &zeros[o * groups..(o + 1) * groups];
                    out.extend((0..k).map(|i| {
                        let g = self.g_idx[i] as usize;
                        scales[g] * (codes[o * k + i] as f32 - zeros[g] as f32)
                    }));
                }
                Codes::I8(q) => {
                    out.extend((0..k).map(|i| scales[self.g_idx[i] as usize] * q[o * k + i] as f32))
                }
                Codes::E4m3 { codes, .. } => out.extend(
                    (0..k).map(|i| scales[self.g_idx[i] as usize] * e4m3::decode(codes[o * k + i])),
                ),
            }
        }
        out
    }

    /// The matrix in the form it runs in: packed for our CPU kernels (`repack_for_cpu`), or
    /// f32 for the GPU; re-quantized to `weights_format` when one is asked for.
    pub fn into_linear(
        self,
        repack_for_cpu: bool,
        weights_format: Option<GgmlDType>,
    ) -> Result<LinearWeight> {
        let dense = |m: &QuantMatrix| Tensor::from_vec(m.dequantize(), (m.n, m.k), &Device::Cpu);
        if let Some(format) = weights_format {
            return Ok(LinearWeight::from_f32(
                dense(&self)?,
                format,
                repack_for_cpu,
            )?);
        }
        if !repack_for_cpu {
            return Ok(LinearWeight::dense(dense(&self)?));
        }
        match self.pack()? {
            Ok(packed) => Ok(LinearWeight::Packed(packed)),
            Err(why) => {
                tracing::warn!(
                    tensor = %self.name,
                    "{why}: running this matrix in f32 ({} MiB)",
                    (self.n * self.k * 4) >> 20
                );
                Ok(LinearWeight::dense(dense(&self)?))
            }
        }
    }

    /// Packs the matrix for the CPU kernels; `Ok(Err(why))` when its groups or scales do not
    /// fit them exactly (see the module docs).
    pub fn pack(&self) -> Result<std::result::Result<QWeight, String>> {
        let (n, k) = (self.n, self.k);
        if !k.is_multiple_of(BLOCK) {
            return Ok(Err(format!("{k} input features are not blocks of {BLOCK}")));
        }
        if let Codes::E4m3 { codes, activations } = &self.codes {
            // One f32 scale per row (`groups` is 1), kept as it is: the FP8 tiles hold f32.
            return Ok(QWeight::from_e4m3(codes, n, k, &self.scales, *activations)
                .map_err(|e| e.to_string()));
        }
        let order = input_order(&self.g_idx);
        let at = |j: usize| order.as_ref().map_or(j, |p| p[j] as usize);
        // Group of every block of 32 positions along the (reordered) inputs.
        let nb = k / BLOCK;
        let mut block_group = Vec::with_capacity(nb);
        for b in 0..nb {
            let g = self.g_idx[at(b * BLOCK)];
            if (b * BLOCK..(b + 1) * BLOCK).any(|j| self.g_idx[at(j)] != g) {
                return Ok(Err(format!(
                    "its groups are not whole blocks of {BLOCK} inputs"
                )));
            }
            block_group.push(g as usize);
        }
        let mut scales = Vec::with_capacity(n * nb);
        let mut rounded = 0usize;
        for o in 0..n {
            for &g in &block_group {
                let s = self.scales[o * self.groups + g];
                let h = f16::from_f32(s);
                if h.to_f32() != s {
                    // f16 keeps 11 significant bits in its normal range: more error than
                    // that means a subnormal or an overflow.
                    if !h.is_finite() || (h.to_f32() - s).abs() > s.abs() * f32::powi(2.0, -11) {
                        return Ok(Err(format!("scale {s} does not fit f16's range")));
                    }
                    rounded += 1;
                }
                scales.push(h);
            }
        }
        if rounded > 0 {
            tracing::info!(
                tensor = %self.name,
                "{rounded} of {} block scales rounded to f16 (relative error at most 2^-11)",
                scales.len()
            );
        }
        let order: Option<Arc<[u32]>> = order.as_deref().map(Arc::from);
        let packed = match &self.codes {
            Codes::U4 { codes, zeros } => {
                let mut reordered = Vec::with_capacity(n * k);
                let mut block_zeros = Vec::with_capacity(n * nb);
                for o in 0..n {
                    reordered.extend((0..k).map(|j| codes[o * k + at(j)]));
                    block_zeros.extend(block_group.iter().map(|&g| zeros[o * self.groups + g]));
                }
                QWeight::from_int4(n, k, &reordered, &scales, &block_zeros, order)
            }
            Codes::I8(q) => {
                let mut reordered = Vec::with_capacity(n * k);
                for o in 0..n {
                    reordered.extend((0..k).map(|j| q[o * k + at(j)]));
                }
                QWeight::from_int8(n, k, &reordered, &scales, order)
            }
            Codes::E4m3 { .. } => unreachable!("FP8 matrices are packed above"),
        };
        packed.map(Ok).map_err(|e| ModelError::Format {
            path: PathBuf::from(&self.name),
            message: e.to_string(),
        })
    }
}

/// The input channels sorted by group (stably, so each group keeps its channels' order);
/// `None` when that is the natural order (no act-order).
fn input_order(g_idx: &[u32]) -> Option<Vec<u32>> {
    if g_idx.windows(2).all(|w| w[0] <= w[1]) {
        return None;
    }
    let mut order: Vec<u32> = (0..g_idx.len() as u32).collect();
    order.sort_by_key(|&i| g_idx[i as usize]);
    Some(order)
}

/// The group map of `k` inputs in contiguous groups of `group_len`.
pub(crate) fn contiguous_groups(k: usize, group_len: usize) -> Vec<u32> {
    (0..k).map(|i| (i / group_len) as u32).collect()
}

/// The group of each of the `k` inputs: from the optional act-order tensor `name` (GPTQ's
/// `g_idx`, compressed-tensors' `weight_g_idx`), else contiguous groups of `group_size`.
pub(crate) fn group_map(
    src: &dyn TensorSource,
    name: &str,
    k: usize,
    groups: usize,
    group_size: GroupSize,
) -> Result<Vec<u32>> {
    let act_order = match src.tensor(name)? {
        Some(t) => read_g_idx(&t, k, groups)?,
        None => None,
    };
    Ok(act_order.unwrap_or_else(|| contiguous_groups(k, group_size.len(k))))
}

/// Checks a `g_idx` tensor's values (the group of each input, below `groups`) and returns
/// them; an entry of -1 (compressed-tensors' "not act-ordered" marker) gives `None`.
pub(crate) fn read_g_idx(t: &RawTensor, k: usize, groups: usize) -> Result<Option<Vec<u32>>> {
    t.expect_shape(&[k], "one group index per input feature")?;
    let values = t.ints()?;
    if values.contains(&-1) {
        return Ok(None);
    }
    match values.iter().find(|&&g| g < 0 || g as usize >= groups) {
        Some(bad) => Err(t.error(format!("group index {bad} outside 0..{groups}"))),
        None => Ok(Some(values.into_iter().map(|g| g as u32).collect())),
    }
}

/// Per-group parameters stored `[groups, n]` (scales) and `[groups, n / 8]` (zero points packed
/// 8 to an int32, nibble `j` of word `c` being output `output(c, j)`), as `[n][groups]`;
/// `zero_offset` is added to every stored zero point.
pub(crate) fn transpose_group_params(
    scale_values: &[f32],
    zero_words: &[i32],
    n: usize,
    groups: usize,
    output: impl Fn(usize, usize) -> usize,
    zero_offset: u8,
) -> (Vec<f32>, Vec<u8>) {
    let mut scales = vec![0f32; n * groups];
    let mut zeros = vec![0u8; n * groups];
    for g in 0..groups {
        for o in 0..n {
            scales[o * groups + g] = scale_values[g * n + o];
        }
        for (c, &word) in zero_words[g * n / 8..(g + 1) * n / 8].iter().enumerate() {
            for (j, z) in nibbles(word).enumerate() {
                zeros[output(c, j) * groups + g] = z + zero_offset;
            }
        }
    }
    (scales, zeros)
}

/// Nibble `j` of an int32 (bits `4j..4j + 4`).
pub(crate) fn nibble(word: i32, j: usize) -> u8 {
    ((word as u32 >> (4 * j)) & 0xF) as u8
}

/// The 8 nibbles of an int32, low first.
pub(crate) fn nibbles(word: i32) -> impl Iterator<Item = u8> {
    (0..8).map(move |j| nibble(word, j))
}

/// int8 scales as `[n][groups]`: `[n, groups]` as stored, `[n]` / `[n, 1]` per channel, or one
/// value (`[]`, `[1]`, `[1, 1]`) for the whole tensor.
pub(crate) fn per_row_scales(t: &RawTensor, n: usize, groups: usize) -> Result<Vec<f32>> {
    let values = t.floats()?;
    let count: usize = t.shape.iter().product();
    if count == 1 && groups == 1 {
        return Ok(vec![values[0]; n]);
    }
    if count == n * groups && t.shape.first() == Some(&n) {
        return Ok(values);
    }
    t.expect_shape(&[n, groups], "[out, groups]")?;
    Ok(values)
}
