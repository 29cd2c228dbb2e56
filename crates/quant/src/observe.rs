//! The quantizer inside the forward pass: [`Calibrator`] is the
//! [`ActivationObserver`] that, at each group of projections, collects the statistics of their
//! input, quantizes them (GPTQ or AWQ) and hands the quantized weights back, so that every
//! later layer calibrates on the activations of the already quantized model (the sequential
//! order both papers use).

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor};
use minserve_model::export::{gguf_rows_of, permute_rows_for_gguf, HfModel};
use minserve_model::hf_norms::HfNorms;
use minserve_model::{ActivationObserver, ModelError, ProjectionSite};

use crate::awq::{self, AwqOptions, InputStats, Projection};
use crate::gptq::{self, GptqOptions, Hessian};
use crate::grid::Symmetry;
use crate::rtn::quantize_groups;
use crate::{QuantError, QuantizedProjection};

/// Which calibrated method runs.
#[derive(Debug, Clone, Copy)]
pub enum Calibrated {
    Gptq(GptqOptions),
    Awq(AwqOptions),
}

/// How much a site's quantization error shrank against plain round-to-nearest, measured on its
/// calibration inputs (mean squared output error, summed over the site's projections).
#[derive(Debug, Clone)]
pub struct SiteError {
    pub layer: usize,
    pub site: ProjectionSite,
    pub error: f64,
    pub error_round_to_nearest: f64,
    /// AWQ's chosen exponent (`None` for GPTQ, and for AWQ's `o_proj`, which has no scale).
    pub alpha: Option<f32>,
}

pub struct Calibrator<'a> {
    model: &'a HfModel,
    index: HashMap<&'a str, usize>,
    method: Calibrated,
    /// Quantized projections by name (without `.weight`), rows in Hugging Face order.
    pub results: BTreeMap<String, QuantizedProjection>,
    /// AWQ: RMSNorms whose multipliers to divide elementwise by these scales, by tensor name.
    pub norm_divisors: HashMap<String, Vec<f32>>,
    pub errors: Vec<SiteError>,
    layer_done: &'a mut dyn FnMut(usize),
}

impl<'a> Calibrator<'a> {
    /// `layer_done(l)` is called once layer `l` is fully quantized.
    pub fn new(
        model: &'a HfModel,
        method: Calibrated,
        layer_done: &'a mut dyn FnMut(usize),
    ) -> Self {
        let index = model
            .tensors
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.as_str(), i))
            .collect();
        Self {
            model,
            index,
            method,
            results: BTreeMap::new(),
            norm_divisors: HashMap::new(),
            errors: Vec::new(),
            layer_done,
        }
    }

    /// A projection's f32 weight `[out, in]` in Hugging Face row order, and `out`.
    fn weight(&self, prefix: &str) -> Result<(Vec<f32>, usize), QuantError> {
        let name = format!("{prefix}.weight");
        let &at = self
            .index
            .get(name.as_str())
            .ok_or_else(|| QuantError::Invalid(format!("the model has no tensor `{name}`")))?;
        let tensor = &self.model.tensors[at].1;
        let rows = tensor.dims()[0];
        Ok((tensor.flatten_all()?.to_vec1::<f32>()?, rows))
    }

    fn step(
        &mut self,
        layer: usize,
        site: ProjectionSite,
        input: &[f32],
        rows: usize,
    ) -> Result<Vec<Tensor>, QuantError> {
        let cols = input.len() / rows;
        let x = Tensor::from_slice(input, (rows, cols), &Device::Cpu)?;
        let xtx = x.t()?.matmul(&x)?;
        drop(x);
        let hessian_mean = (&xtx / rows as f64)?;
        let prefixes: Vec<String> = site
            .projections()
            .iter()
            .map(|p| format!("model.layers.{layer}.{p}"))
            .collect();
        let weights = prefixes
            .iter()
            .map(|p| self.weight(p))
            .collect::<Result<Vec<_>, _>>()?;

        // The weights the rest of the pass multiplies by, per projection, Hugging Face rows.
        let mut effective: Vec<Vec<f32>> = Vec::with_capacity(prefixes.len());
        match self.method {
            Calibrated::Gptq(options) => {
                let mut hessian = Hessian::new(cols);
                hessian.add_product(&xtx.flatten_all()?.to_vec1::<f32>()?, rows);
                let (mut error, mut error_rtn) = (0.0, 0.0);
                for (prefix, (w, out)) in prefixes.iter().zip(&weights) {
                    let q = gptq::quantize(w, *out, cols, &hessian, &options)
                        .map_err(|e| QuantError::Invalid(format!("{prefix}: {e}")))?;
                    let values = q.dequantize();
                    let rtn = quantize_groups(
                        w,
                        *out,
                        cols,
                        options.bits,
                        options.group_size,
                        options.symmetry,
                    );
                    error += awq::weighted_error(&difference(w, &values), *out, &hessian_mean)?;
                    error_rtn += awq::weighted_error(
                        &difference(w, &rtn.dequantize()),
                        *out,
                        &hessian_mean,
                    )?;
                    effective.push(values);
                    self.results
                        .insert(prefix.clone(), QuantizedProjection::Group(q));
                }
                self.errors.push(SiteError {
                    layer,
                    site,
                    error,
                    error_round_to_nearest: error_rtn,
                    alpha: None,
                });
            }
            Calibrated::Awq(options) => {
                let mean_abs = mean_magnitudes(input, cols);
                let stats = InputStats {
                    cols,
                    hessian: hessian_mean,
                    mean_abs,
                };
                if site == ProjectionSite::AttentionOutput {
                    // Its input (the attention output) comes from v_proj through the heads; with
                    // grouped-query attention one v row feeds several o_proj columns, so no
                    // per-column scale can be folded back: round-to-nearest, as AutoAWQ does.
                    let (w, out) = &weights[0];
                    let q = quantize_groups(
                        w,
                        *out,
                        cols,
                        options.bits,
                        options.group_size,
                        Symmetry::Asymmetric,
                    );
                    let values = q.dequantize();
                    let error = awq::weighted_error(&difference(w, &values), *out, &stats.hessian)?;
                    effective.push(values);
                    self.results
                        .insert(prefixes[0].clone(), QuantizedProjection::Group(q));
                    self.errors.push(SiteError {
                        layer,
                        site,
                        error,
                        error_round_to_nearest: error,
                        alpha: None,
                    });
                } else {
                    let projections: Vec<Projection> = weights
                        .iter()
                        .map(|(w, out)| Projection {
                            weight: w,
                            rows: *out,
                        })
                        .collect();
                    let choice = awq::search_scales(&projections, &stats, &options)?;
                    for (prefix, q) in prefixes.iter().zip(choice.quantized) {
                        effective.push(awq::unscale_columns(&q.dequantize(), &choice.scales));
                        self.results
                            .insert(prefix.clone(), QuantizedProjection::Group(q));
                    }
                    self.fold_scales(layer, site, &choice.scales)?;
                    self.errors.push(SiteError {
                        layer,
                        site,
                        error: choice.error,
                        error_round_to_nearest: choice.error_unscaled,
                        alpha: Some(choice.alpha),
                    });
                }
            }
        }

        if site == ProjectionSite::MlpOutput {
            (self.layer_done)(layer);
        }
        prefixes
            .iter()
            .zip(effective)
            .map(|(prefix, values)| {
                let out = values.len() / cols;
                let t = Tensor::from_vec(values, (out, cols), &Device::Cpu)?;
                match gguf_rows_of(self.model, &format!("{prefix}.weight")) {
                    Some(heads) => permute_rows_for_gguf(&t, heads, self.model.config.head_dim)
                        .map_err(|m| QuantError::Invalid(format!("{prefix}: {m}"))),
                    None => Ok(t),
                }
            })
            .collect()
    }

    /// AWQ: the input of the scaled projections must be divided by `scales`. For q/k/v and
    /// gate/up the RMSNorm before them does it (which norm that is depends on the model:
    /// `HfNorms::before`); for down_proj, up_proj's output rows (already quantized: scaling a
    /// row scales its grid, exactly).
    fn fold_scales(
        &mut self,
        layer: usize,
        site: ProjectionSite,
        scales: &[f32],
    ) -> Result<(), QuantError> {
        if site == ProjectionSite::MlpOutput {
            let up = format!("model.layers.{layer}.mlp.up_proj");
            let Some(QuantizedProjection::Group(q)) = self.results.get_mut(&up) else {
                return Err(QuantError::Invalid(format!(
                    "{up} was not quantized before down_proj"
                )));
            };
            let inverse: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
            q.scale_rows(&inverse);
            return Ok(());
        }
        let norm = HfNorms::of(&self.model.config)
            .before(site)
            .ok_or_else(|| QuantError::Invalid(format!("no norm precedes the {site:?} site")))?;
        self.norm_divisors.insert(
            format!("model.layers.{layer}.{norm}.weight"),
            scales.to_vec(),
        );
        Ok(())
    }
}

impl ActivationObserver for Calibrator<'_> {
    fn observe(
        &mut self,
        layer: usize,
        site: ProjectionSite,
        input: &[f32],
        rows: usize,
    ) -> minserve_model::Result<Option<Vec<Tensor>>> {
        self.step(layer, site, input, rows)
            .map(Some)
            .map_err(|e| ModelError::Calibration(e.to_string()))
    }
}

fn difference(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// `mean |x_j|` over the rows of `x` (`[rows, cols]`).
fn mean_magnitudes(x: &[f32], cols: usize) -> Vec<f32> {
    let mut sums = vec![0f64; cols];
    let mut rows = 0usize;
    for row in x.chunks_exact(cols) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v.abs() as f64;
        }
        rows += 1;
    }
    sums.iter()
        .map(|s| (s / rows.max(1) as f64) as f32)
        .collect()
}
