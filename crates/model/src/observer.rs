//! A hook into the forward pass for calibration-based quantization (`minserve quantize`):
//! [`ActivationObserver`] sees the input rows of each group of projections that share an input,
//! and may hand back the weights the rest of that pass multiplies by instead.
//!
//! Handing weights back is what makes calibration *sequential*, as GPTQ and AWQ are meant to
//! run: once a layer's projections are quantized, every later layer (and the later projections
//! of the same layer) sees the activations of the quantized model, not of the original one, so
//! each quantizer corrects the error of those before it. With no observer the forward pass
//! takes none of these branches (`LlamaModel::forward`).

use candle_core::Tensor;

use crate::error::Result;

/// The projections of a layer that read the same input, in the order the forward pass applies
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProjectionSite {
    /// `q_proj`, `k_proj`, `v_proj`: the attention RMSNorm's output.
    Attention,
    /// `o_proj`: the attention output.
    AttentionOutput,
    /// `gate_proj`, `up_proj`: the feed-forward RMSNorm's output.
    Mlp,
    /// `down_proj`: the gated activation.
    MlpOutput,
}

impl ProjectionSite {
    /// Every site, in the order one layer reaches them.
    pub const ALL: [ProjectionSite; 4] = [
        Self::Attention,
        Self::AttentionOutput,
        Self::Mlp,
        Self::MlpOutput,
    ];

    /// The Hugging Face names of the projections at this site, in the order the forward pass
    /// hands them to [`ActivationObserver::observe`] and expects replacements back.
    pub fn projections(self) -> &'static [&'static str] {
        match self {
            Self::Attention => &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            Self::AttentionOutput => &["self_attn.o_proj"],
            Self::Mlp => &["mlp.gate_proj", "mlp.up_proj"],
            Self::MlpOutput => &["mlp.down_proj"],
        }
    }
}

/// Sees what the projections of each layer read during [`crate::LlamaModel::forward_observed`].
pub trait ActivationObserver {
    /// `input` is `rows` rows of the projections' input (`input.len() / rows` values each), the
    /// same rows the pass is about to multiply. Returning `Some(weights)` replaces the matrices
    /// of [`ProjectionSite::projections`] for the rest of this pass: one dense f32 `[out, in]`
    /// tensor each, in that order, rows in the model's own order (for a GGUF, q/k rows as
    /// llama.cpp permuted them). Biases are kept.
    fn observe(
        &mut self,
        layer: usize,
        site: ProjectionSite,
        input: &[f32],
        rows: usize,
    ) -> Result<Option<Vec<Tensor>>>;
}
