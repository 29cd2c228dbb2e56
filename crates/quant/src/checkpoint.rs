//! `minserve quantize` end to end: a GGUF model read as a Hugging Face checkpoint (dequantized to
//! f32, as `minserve export` writes it), its projections quantized by the chosen method, and a
//! folder written in that method's standard layout. Everything but the seven projections of
//! each layer (embeddings, norms, lm_head) is written as `minserve export` writes it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use minserve_model::export::{
    prepare_out_dir, read_gguf_as_hf, write_hf_folder, write_json, ExportDType, HfModel,
};
use minserve_model::hf_norms::HfNorms;
use minserve_model::{load_model_with, DeviceChoice, LoadOptions, ProjectionSite};

use crate::awq::AwqOptions;
use crate::gptq::GptqOptions;
use crate::grid::Symmetry;
use crate::observe::{Calibrated, Calibrator, SiteError};
use crate::pack::{self, compressed::Scheme, Named, RawTensor};
use crate::{fp8, rtn, Method, QuantError, QuantizedProjection};

/// Everything `minserve quantize` was asked for.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub method: Method,
    pub bits: u32,
    /// Inputs per scale of the 4-bit (and GPTQ 8-bit) grids; per-channel methods ignore it.
    pub group_size: usize,
    /// The integer grids' zero points: `None` for the method's usual choice (see
    /// [`QuantizeOptions::grid_symmetry`]).
    pub symmetry: Option<Symmetry>,
    /// GPTQ only: columns in descending order of their Hessian diagonal.
    pub act_order: bool,
    /// GPTQ's dampening, a fraction of the Hessian's mean diagonal.
    pub damp: f64,
    /// Calibration tokens in all (GPTQ, AWQ), in windows of `calib_window`.
    pub calib_tokens: usize,
    pub calib_window: usize,
    /// The dtype of the tensors left in float (and of compressed-tensors' integer scales).
    pub dtype: ExportDType,
    /// Also write the quantized model as a plain f32 folder (every projection dequantized,
    /// AWQ's scales folded as a loader would), which any float loader reads: quality can be
    /// measured on exactly the weights the quantized folder holds.
    pub dequantized_twin: Option<PathBuf>,
}

impl QuantizeOptions {
    /// The method's own rules, checked before any file is read.
    pub fn check(&self) -> Result<(), QuantError> {
        let allowed: &[u32] = match self.method {
            Method::Rtn | Method::Gptq => &[4, 8],
            Method::Awq => &[4],
            Method::Fp8 => &[8],
        };
        if !allowed.contains(&self.bits) {
            return Err(QuantError::Invalid(format!(
                "--bits {} is not available for --method {}; it takes {}",
                self.bits,
                self.method,
                allowed
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(" or ")
            )));
        }
        match (self.method, self.bits, self.symmetry) {
            (_, _, None) | (Method::Gptq, 4, Some(_)) | (Method::Rtn, 4, Some(_)) => {}
            (Method::Gptq, _, Some(Symmetry::Symmetric)) => {}
            (Method::Gptq, _, Some(Symmetry::Asymmetric)) => {
                return Err(QuantError::Invalid(
                    "--asym: asymmetric GPTQ is written as compressed-tensors pack-quantized, \
                     which holds 4-bit codes; use --bits 4 or a symmetric 8-bit GPTQ"
                        .into(),
                ))
            }
            (Method::Rtn, _, Some(Symmetry::Symmetric)) => {}
            (Method::Rtn, _, Some(Symmetry::Asymmetric)) => {
                return Err(QuantError::Invalid(
                    "--asym: int8 RTN is written as compressed-tensors int-quantized W8A8, \
                     symmetric per channel; it has no zero points"
                        .into(),
                ))
            }
            (Method::Awq, _, Some(Symmetry::Symmetric)) => {
                return Err(QuantError::Invalid(
                    "--sym: the AWQ GEMM layout stores a zero point per group; AWQ is \
                     asymmetric here"
                        .into(),
                ))
            }
            (Method::Awq, _, Some(Symmetry::Asymmetric)) => {}
            (Method::Fp8, _, Some(_)) => {
                return Err(QuantError::Invalid(
                    "--sym/--asym choose integer zero points; FP8 has none".into(),
                ))
            }
        }
        if self.act_order && self.method != Method::Gptq {
            return Err(QuantError::Invalid(format!(
                "--act-order is a GPTQ option; --method {} has no column order",
                self.method
            )));
        }
        if self.uses_groups() && (self.group_size == 0 || !self.group_size.is_multiple_of(8)) {
            return Err(QuantError::Invalid(format!(
                "--group-size {} must be a positive multiple of 8 (the packed words hold 8 codes)",
                self.group_size
            )));
        }
        if !(0.0..=1.0).contains(&self.damp) || !self.damp.is_finite() {
            return Err(QuantError::Invalid(format!(
                "--damp {} must be a fraction between 0 and 1",
                self.damp
            )));
        }
        Ok(())
    }

    /// Whether the weights are quantized in groups of inputs (else one scale per output row).
    fn uses_groups(&self) -> bool {
        matches!(
            (self.method, self.bits),
            (Method::Rtn, 4) | (Method::Gptq, _) | (Method::Awq, _)
        )
    }

    /// The grid the integer methods fit: what was asked for, else GPTQModel's default for
    /// GPTQ (symmetric, the grid every GPTQ kernel runs) and zero points for the others.
    pub fn grid_symmetry(&self) -> Symmetry {
        self.symmetry.unwrap_or(match self.method {
            Method::Gptq => Symmetry::Symmetric,
            _ => Symmetry::Asymmetric,
        })
    }

    /// The layout the folder is written in, chosen once from the method, bits and grid.
    /// Asymmetric GPTQ goes to compressed-tensors `pack-quantized` with zero points (what
    /// llm-compressor writes for it) rather than GPTQ v1, which stores `zero - 1` in 4 bits
    /// and so cannot hold a zero point of 0: GPTQModel refuses `sym: false` v1 checkpoints
    /// from any other producer for that reason.
    pub fn layout(&self) -> Layout {
        let symmetric = self.grid_symmetry() == Symmetry::Symmetric;
        match (self.method, self.bits) {
            (Method::Gptq, _) if symmetric => Layout::GptqV1,
            (Method::Gptq, _) => Layout::PackQuantized {
                symmetric: false,
                act_order: self.act_order,
            },
            (Method::Awq, _) => Layout::AwqGemm,
            (Method::Rtn, 4) => Layout::PackQuantized {
                symmetric,
                act_order: false,
            },
            (Method::Rtn, _) => Layout::IntQuantized,
            (Method::Fp8, _) => Layout::FloatQuantized,
        }
    }

    pub fn needs_calibration(&self) -> bool {
        matches!(self.method, Method::Gptq | Method::Awq)
    }
}

/// The standard layouts `minserve quantize` writes (see `crate::pack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// AutoGPTQ / GPTQModel `gptq` (v1), symmetric.
    GptqV1,
    /// AutoAWQ GEMM.
    AwqGemm,
    /// compressed-tensors W4A16 groups, with `weight_g_idx` after act-order.
    PackQuantized { symmetric: bool, act_order: bool },
    /// compressed-tensors W8A8, int8 channels.
    IntQuantized,
    /// compressed-tensors FP8 W8A16, E4M3 channels.
    FloatQuantized,
}

/// Where a run stands, for the progress line.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub layers_done: usize,
    pub layers: usize,
    pub elapsed: Duration,
}

impl Progress {
    /// Time left if the remaining layers take as long as the finished ones did.
    pub fn remaining(&self) -> Option<Duration> {
        (self.layers_done > 0).then(|| {
            self.elapsed
                .mul_f64((self.layers - self.layers_done) as f64 / self.layers_done as f64)
        })
    }
}

/// What a run wrote and measured.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub out_dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub weights_bytes: u64,
    pub layout: &'static str,
    pub projections: usize,
    pub calibration_tokens: usize,
    pub site_errors: Vec<SiteError>,
    pub elapsed: Duration,
}

/// Quantizes the GGUF model at `gguf` into `out_dir` (new or empty). `calibration` is the text
/// GPTQ and AWQ calibrate on (required for them, unused otherwise).
pub fn quantize_gguf(
    gguf: &Path,
    out_dir: &Path,
    options: &QuantizeOptions,
    calibration: Option<&str>,
    progress: &mut dyn FnMut(Progress),
) -> Result<QuantizeReport, QuantError> {
    let started = Instant::now();
    options.check()?;
    if options.needs_calibration() && calibration.is_none() {
        return Err(QuantError::Invalid(format!(
            "--method {} calibrates on a text: give one with --calib FILE",
            options.method
        )));
    }
    let model = read_gguf_as_hf(gguf)?;
    check_shapes(&model, options)?;
    // Windows before the folder exists: a text too short for them writes nothing.
    let windows = match calibration {
        Some(text) if options.needs_calibration() => {
            let tokens = model
                .tokenizer
                .encode(text, false)
                .map_err(|e| QuantError::Invalid(format!("--calib: tokenizing: {e}")))?;
            crate::calibrate::windows(
                &tokens,
                options.calib_window,
                options.calib_tokens.div_ceil(options.calib_window),
            )?
        }
        _ => Vec::new(),
    };
    prepare_out_dir(out_dir)?;
    if let Some(twin) = &options.dequantized_twin {
        prepare_out_dir(twin)?;
    }
    let layers = model.config.num_layers;
    let mut report_layer = |layer: usize| {
        progress(Progress {
            layers_done: layer + 1,
            layers,
            elapsed: started.elapsed(),
        })
    };

    let (results, norm_divisors, site_errors) = if options.needs_calibration() {
        // The forward pass on the very f32 weights being quantized, not the GGUF's blocks.
        let load = LoadOptions {
            weights_format: Some(GgmlDType::F32),
            device: DeviceChoice::Cpu,
            ..LoadOptions::default()
        };
        let runner = load_model_with(gguf, &load)?.model;
        let method = match options.method {
            Method::Gptq => Calibrated::Gptq(GptqOptions {
                bits: options.bits,
                group_size: options.group_size,
                symmetry: options.grid_symmetry(),
                act_order: options.act_order,
                damp: options.damp,
            }),
            _ => Calibrated::Awq(AwqOptions {
                bits: options.bits,
                group_size: options.group_size,
                grid: 20,
            }),
        };
        let mut calibrator = Calibrator::new(&model, method, &mut report_layer);
        crate::calibrate::run(&runner, &windows, &mut calibrator)?;
        (
            calibrator.results,
            calibrator.norm_divisors,
            calibrator.errors,
        )
    } else {
        let mut results = std::collections::BTreeMap::new();
        for layer in 0..layers {
            for site in ProjectionSite::ALL {
                for p in site.projections() {
                    let prefix = format!("model.layers.{layer}.{p}");
                    let (w, rows, cols) = matrix(&model, &format!("{prefix}.weight"))?;
                    results.insert(prefix, quantize_without_data(&w, rows, cols, options));
                }
            }
            report_layer(layer);
        }
        (results, Default::default(), Vec::new())
    };
    let calibration_tokens = windows.iter().map(Vec::len).sum();

    let layout = layout_name(options);
    let norms = HfNorms::of(&model.config);
    let mut tensors: Vec<Named> = Vec::new();
    let mut twin: Vec<Named> = Vec::new();
    for (name, tensor) in &model.tensors {
        if let Some(prefix) = name.strip_suffix(".weight") {
            if let Some(q) = results.get(prefix) {
                tensors.extend(write_projection(prefix, q, options));
                if options.dequantized_twin.is_some() {
                    let values = q.dequantize();
                    twin.push((
                        name.clone(),
                        RawTensor::float(&values, tensor.dims().to_vec(), ExportDType::F32),
                    ));
                }
                continue;
            }
        }
        let mut values = tensor.flatten_all()?.to_vec1::<f32>()?;
        if let Some(divisors) = norm_divisors.get(name) {
            // The multiplier is divided, not the stored weight (Gemma stores `m - 1`).
            for (v, s) in values.iter_mut().zip(divisors) {
                *v = norms.stored(norms.multiplier(*v) / s);
            }
        }
        tensors.push((
            name.clone(),
            RawTensor::float(&values, tensor.dims().to_vec(), options.dtype),
        ));
        if options.dequantized_twin.is_some() {
            twin.push((
                name.clone(),
                RawTensor::float(&values, tensor.dims().to_vec(), ExportDType::F32),
            ));
        }
    }
    if let Some(twin_dir) = &options.dequantized_twin {
        write_hf_folder(
            twin_dir,
            twin.iter().map(|(n, t)| (n.as_str(), t)),
            model.config_json.clone(),
            ExportDType::F32.torch_dtype(),
            &model.tokenizer,
        )?;
        drop(twin);
    }

    let quantization_config = match options.layout() {
        Layout::GptqV1 => pack::gptq::config(
            options.bits,
            options.group_size,
            options.act_order,
            options.damp,
        ),
        Layout::AwqGemm => pack::awq::config(options.group_size),
        Layout::PackQuantized {
            symmetric,
            act_order,
        } => pack::compressed::config(Scheme::W4A16 {
            group_size: options.group_size,
            symmetric,
            act_order,
        }),
        Layout::IntQuantized => pack::compressed::config(Scheme::W8A8),
        Layout::FloatQuantized => pack::compressed::config(Scheme::Fp8W8A16),
    };
    let mut config_json = model.config_json.clone();
    config_json["quantization_config"] = quantization_config.clone();
    let (mut files, weights_bytes) = write_hf_folder(
        out_dir,
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        config_json,
        options.dtype.torch_dtype(),
        &model.tokenizer,
    )?;
    if options.layout() == Layout::GptqV1 {
        let path = out_dir.join("quantize_config.json");
        write_json(&path, &quantization_config)?;
        files.push(path);
    }
    Ok(QuantizeReport {
        out_dir: out_dir.to_path_buf(),
        files,
        weights_bytes,
        layout,
        projections: results.len(),
        calibration_tokens,
        site_errors,
        elapsed: started.elapsed(),
    })
}

/// The layout a method writes, as its tools name it.
pub fn layout_name(options: &QuantizeOptions) -> &'static str {
    match options.layout() {
        Layout::GptqV1 => "GPTQ v1 (AutoGPTQ / GPTQModel)",
        Layout::AwqGemm => "AWQ GEMM (AutoAWQ)",
        Layout::PackQuantized {
            symmetric: true, ..
        } => "compressed-tensors pack-quantized (W4A16, symmetric groups)",
        Layout::PackQuantized { .. } if options.method == Method::Gptq => {
            "compressed-tensors pack-quantized (W4A16, asymmetric groups, as llm-compressor's GPTQ)"
        }
        Layout::PackQuantized { .. } => {
            "compressed-tensors pack-quantized (W4A16, asymmetric groups)"
        }
        Layout::IntQuantized => {
            "compressed-tensors int-quantized (W8A8, dynamic per-token activations)"
        }
        Layout::FloatQuantized => {
            "compressed-tensors float-quantized (FP8 E4M3 W8A16, per-channel)"
        }
    }
}

/// Round-to-nearest and FP8, which need no calibration.
fn quantize_without_data(
    w: &[f32],
    rows: usize,
    cols: usize,
    options: &QuantizeOptions,
) -> QuantizedProjection {
    match (options.method, options.bits) {
        (Method::Fp8, _) => QuantizedProjection::Fp8(fp8::quantize_fp8_channels(w, rows, cols)),
        (_, 8) => QuantizedProjection::Int8(rtn::quantize_int8_channels(w, rows, cols)),
        _ => QuantizedProjection::Group(rtn::quantize_groups(
            w,
            rows,
            cols,
            options.bits,
            options.group_size,
            options.grid_symmetry(),
        )),
    }
}

fn write_projection(
    prefix: &str,
    q: &QuantizedProjection,
    options: &QuantizeOptions,
) -> Vec<Named> {
    match (q, options.layout()) {
        (QuantizedProjection::Group(q), Layout::GptqV1) => pack::gptq::tensors(prefix, q),
        (QuantizedProjection::Group(q), Layout::AwqGemm) => pack::awq::tensors(prefix, q),
        (QuantizedProjection::Group(q), _) => {
            pack::compressed::pack_quantized(prefix, q, options.dtype)
        }
        (QuantizedProjection::Int8(q), _) => {
            pack::compressed::int_quantized(prefix, q, options.dtype)
        }
        (QuantizedProjection::Fp8(q), _) => pack::compressed::float_quantized(prefix, q),
    }
}

/// A tensor of the model as `(values, rows, cols)`.
fn matrix(model: &HfModel, name: &str) -> Result<(Vec<f32>, usize, usize), QuantError> {
    let tensor: &Tensor = model
        .tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| QuantError::Invalid(format!("the model has no tensor `{name}`")))?;
    let (rows, cols) = tensor.dims2()?;
    Ok((tensor.flatten_all()?.to_vec1::<f32>()?, rows, cols))
}

/// Every projection must fit the layout: groups dividing its inputs, and packed words of 8
/// codes along the axes each layout packs. The error names the first tensor that does not.
fn check_shapes(model: &HfModel, options: &QuantizeOptions) -> Result<(), QuantError> {
    let c = &model.config;
    let q_dim = c.num_heads * c.head_dim;
    let kv_dim = c.num_kv_heads * c.head_dim;
    let (h, ff) = (c.hidden_size, c.intermediate_size);
    let shapes = [
        ("self_attn.q_proj", q_dim, h),
        ("self_attn.k_proj", kv_dim, h),
        ("self_attn.v_proj", kv_dim, h),
        ("self_attn.o_proj", h, q_dim),
        ("mlp.gate_proj", ff, h),
        ("mlp.up_proj", ff, h),
        ("mlp.down_proj", h, ff),
    ];
    for (name, out, inputs) in shapes {
        let tensor = format!("model.layers.0.{name}.weight");
        if options.uses_groups() && !inputs.is_multiple_of(options.group_size) {
            let fitting: Vec<String> = [32, 64, 128, 256]
                .iter()
                .filter(|&&g| shapes.iter().all(|s| s.2 % g == 0))
                .map(|g| g.to_string())
                .collect();
            return Err(QuantError::Invalid(format!(
                "--group-size {}: `{tensor}` has {inputs} inputs, not a multiple of it \
                 (group sizes that fit every projection of this model: {})",
                options.group_size,
                if fitting.is_empty() {
                    "none".to_string()
                } else {
                    fitting.join(", ")
                }
            )));
        }
        if matches!(options.method, Method::Gptq | Method::Awq) && !out.is_multiple_of(8) {
            return Err(QuantError::Invalid(format!(
                "`{tensor}` has {out} outputs; the {} layout packs 8 outputs per word",
                options.method
            )));
        }
    }
    Ok(())
}
