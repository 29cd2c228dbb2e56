//! The weights of a Llama-family model, whatever file they came from.
//!
//! Every projection is a candle `QMatMul`: GGUF tensors stay in their quantized format (the
//! activations are quantized to match, as llama.cpp does), safetensors tensors are plain f32.

use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

use crate::config::ModelConfig;

/// `y = x W^T (+ b)`.
pub struct Linear {
    pub weight: QMatMul,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub ffn_norm: Tensor,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

pub struct LlamaWeights {
    pub config: ModelConfig,
    /// `[vocab, hidden]` f32, indexed by token id.
    pub embedding: Tensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    pub lm_head: Linear,
}
