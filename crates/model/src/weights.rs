//! The weights of a Llama-family model, whatever file they came from.
//!
//! GGUF tensors stay in their quantized format (the activations are quantized to match, as
//! llama.cpp does). Q4_0, Q4_1 and Q8_0 — the default model's types —, Q5_0 (as Q8_0), Q4_K
//! and Q6_K run on our own batch-reusing kernels (`crate::qmatmul`); other quantized types on
//! candle's `QMatMul`; safetensors tensors are plain f32 matmuls, on the CPU in a fixed order
//! of operations (`crate::dense`), so that they are batch-invariant like the quantized ones.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::config::ModelConfig;
use crate::qmatmul::{QInput, QWeight};
use crate::tensor_util::with_f32_slice;

/// The matrix of a [`Linear`] layer, in whichever form multiplies it fastest.
pub enum LinearWeight {
    /// Repacked GGUF blocks: each weight tile is decoded once for the whole batch, so a step
    /// of 64 tokens costs far less than 64 steps of one (see `benches/benches/qmatmul.rs`).
    Packed(QWeight),
    /// Everything else: candle's quantized or dense matmul.
    Candle(QMatMul),
}

impl LinearWeight {
    /// A GGUF tensor. For the CPU (`repack_for_cpu`) it is packed where our kernels handle its
    /// type; otherwise, and for the GPU, whose quantized matmuls take GGUF blocks as they are,
    /// it goes to candle's `QMatMul`.
    pub fn quantized(tensor: QTensor, repack_for_cpu: bool) -> candle_core::Result<Self> {
        let packed = match repack_for_cpu {
            true => QWeight::from_qtensor(&tensor)?,
            false => None,
        };
        Ok(match packed {
            Some(packed) => Self::Packed(packed),
            None => Self::Candle(QMatMul::from_qtensor(tensor)?),
        })
    }

    /// A dense f32 matrix `[out, in]`.
    pub fn dense(tensor: Tensor) -> Self {
        Self::Candle(QMatMul::Tensor(tensor))
    }

    /// An f32 matrix stored as `format`: kept dense for f32, quantized otherwise.
    pub fn from_f32(
        tensor: Tensor,
        format: GgmlDType,
        repack_for_cpu: bool,
    ) -> candle_core::Result<Self> {
        match format {
            GgmlDType::F32 => Ok(Self::dense(tensor)),
            _ => Self::quantized(QTensor::quantize(&tensor, format)?, repack_for_cpu),
        }
    }
}

/// The spellings of a weight format (`--weights-format`, `synthetic:NAME@FORMAT`): llama.cpp's
/// type names in lower case.
pub const WEIGHT_FORMATS: &[(&str, GgmlDType)] = &[
    ("f32", GgmlDType::F32),
    ("f16", GgmlDType::F16),
    ("bf16", GgmlDType::BF16),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
    ("q8_k", GgmlDType::Q8K),
];

/// A weight format by name (see [`WEIGHT_FORMATS`]); the error lists the choices.
pub fn parse_weight_format(name: &str) -> Result<GgmlDType, String> {
    WEIGHT_FORMATS
        .iter()
        .find(|(spelling, _)| spelling.eq_ignore_ascii_case(name))
        .map(|&(_, dtype)| dtype)
        .ok_or_else(|| {
            let known: Vec<&str> = WEIGHT_FORMATS.iter().map(|(s, _)| *s).collect();
            format!(
                "unknown weight format `{name}`; formats: {}",
                known.join(", ")
            )
        })
}

/// `y = x W^T (+ b)`.
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Several layers applied to the same `m` rows of `x` (q/k/v, gate/up), each into its
    /// `[m, out_features]` slice of `outs`. With packed weights the input is quantized once
    /// (into `input`, reused across calls) and all matrices run in one pass over the pool.
    pub fn forward_many_into(
        layers: &[&Linear],
        x: &[f32],
        m: usize,
        input: &mut QInput,
        outs: &mut [&mut [f32]],
    ) -> candle_core::Result<()> {
        if m == 0 {
            return Ok(());
        }
        let packed = Self::packed(layers);
        // Weights in different input-channel orders (act-order checkpoints) each need their own
        // quantized input.
        let packed = packed.filter(|ws| ws.iter().all(|w| w.shares_input_with(ws[0])));
        match packed {
            Some(weights) => {
                input.quantize_for(&weights, x, m);
                crate::step_profile::mark(crate::step_profile::Phase::ActivationQuantize);
                QWeight::matmul_quantized_many(&weights, input, outs);
            }
            // candle's, or a mix (a GGUF may store q and v in different types): one at a time.
            None => {
                let x_tensor = Tensor::from_slice(x, (m, x.len() / m), &Device::Cpu)?;
                for (layer, out) in layers.iter().zip(outs.iter_mut()) {
                    match &layer.weight {
                        LinearWeight::Packed(w) => {
                            input.quantize_for(&[w], x, m);
                            QWeight::matmul_quantized_many(&[w], input, &mut [&mut **out]);
                        }
                        // Dense f32 on the CPU: the fixed-order kernel, so that a row's
                        // result does not depend on the step's row count (`dense.rs`).
                        LinearWeight::Candle(QMatMul::Tensor(w))
                            if w.device().is_cpu() && w.dtype() == DType::F32 =>
                        {
                            let n = out.len() / m;
                            with_f32_slice(w, |w| crate::dense::matmul(x, m, w, n, out))?
                        }
                        LinearWeight::Candle(w) => {
                            with_f32_slice(&w.forward(&x_tensor)?, |y| out.copy_from_slice(y))?
                        }
                    }
                }
            }
        }
        Self::add_biases(layers, outs)
    }

    /// [`Linear::forward_many_into`] for `m` input rows that `produce(row, out)` makes on
    /// demand, fused into the activation quantization (see [`QInput::quantize_rows_for`]), when
    /// every layer is packed and the quantizer can take rows; returns `false`, without calling
    /// `produce`, when not, and the caller materializes the rows itself.
    pub fn forward_many_from_rows(
        layers: &[&Linear],
        m: usize,
        produce: &(dyn Fn(usize, &mut [f32]) + Sync),
        input: &mut QInput,
        outs: &mut [&mut [f32]],
    ) -> candle_core::Result<bool> {
        let packed = Self::packed(layers);
        let Some(weights) = packed.filter(|ws| QInput::quantizes_rows_for(ws)) else {
            return Ok(false);
        };
        if m > 0 {
            input.quantize_rows_for(&weights, m, produce);
            crate::step_profile::mark(crate::step_profile::Phase::ActivationQuantize);
            QWeight::matmul_quantized_many(&weights, input, outs);
            Self::add_biases(layers, outs)?;
        }
        Ok(true)
    }

    /// The layers' packed weights, if every one is packed.
    fn packed<'a>(layers: &[&'a Linear]) -> Option<Vec<&'a QWeight>> {
        layers
            .iter()
            .map(|l| match &l.weight {
                LinearWeight::Packed(w) => Some(w),
                LinearWeight::Candle(_) => None,
            })
            .collect()
    }

    fn add_biases(layers: &[&Linear], outs: &mut [&mut [f32]]) -> candle_core::Result<()> {
        for (layer, out) in layers.iter().zip(outs.iter_mut()) {
            if let Some(bias) = &layer.bias {
                with_f32_slice(bias, |b| {
                    for row in out.chunks_exact_mut(b.len()) {
                        crate::math::add_in_place(row, b);
                    }
                })?;
            }
        }
        Ok(())
    }

    /// One layer: [`Linear::forward_many_into`] with a single output.
    pub fn forward_into(
        &self,
        x: &[f32],
        m: usize,
        input: &mut QInput,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        Self::forward_many_into(&[self], x, m, input, &mut [out])
    }
}

pub struct LayerWeights {
    pub attn_norm: Tensor,
    /// Per-head RMSNorm weights of queries and keys (`head_dim` each), when `config.block.qk_norm`.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// RMSNorm of the attention and MLP outputs, when `config.block.post_norms`.
    pub post_attention_norm: Option<Tensor>,
    pub post_ffn_norm: Option<Tensor>,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub ffn_norm: Tensor,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// The token embedding table, `[vocab, hidden]`, indexed by token id.
pub enum Embedding {
    Dense(Tensor),
    /// A GGUF table kept in its quantized type, the rows a step looks up dequantized then:
    /// Gemma 3's 262,144 x 640 table is 640 MiB as f32, 170 MiB as Q8_0. A row dequantizes to
    /// exactly the values of the whole table dequantized (block by block, the same code).
    Quantized {
        blocks: Vec<u8>,
        dtype: GgmlDType,
        rows: usize,
        hidden: usize,
    },
}

impl Embedding {
    /// A GGUF table: kept quantized unless it is a float type already.
    pub fn from_qtensor(tensor: &QTensor) -> candle_core::Result<Self> {
        let (rows, hidden) = tensor.shape().dims2()?;
        Ok(match tensor.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                Self::Dense(tensor.dequantize(&Device::Cpu)?)
            }
            dtype => Self::Quantized {
                blocks: tensor.data()?.into_owned(),
                dtype,
                rows,
                hidden,
            },
        })
    }

    /// The rows of `tokens`, one after another, into `out` (`tokens.len() * hidden` values).
    pub fn rows_into(&self, tokens: &[u32], out: &mut [f32]) -> candle_core::Result<()> {
        match self {
            Self::Dense(table) => with_f32_slice(table, |table| {
                let hidden = out.len() / tokens.len().max(1);
                for (row, &token) in out.chunks_exact_mut(hidden).zip(tokens) {
                    let token = token as usize;
                    row.copy_from_slice(&table[token * hidden..(token + 1) * hidden]);
                }
            }),
            &Self::Quantized {
                ref blocks,
                dtype,
                rows,
                hidden,
            } => {
                let row_bytes = blocks.len() / rows;
                let mut gathered = Vec::with_capacity(tokens.len() * row_bytes);
                for &token in tokens {
                    let at = token as usize * row_bytes;
                    gathered.extend_from_slice(&blocks[at..at + row_bytes]);
                }
                let shape = vec![tokens.len(), hidden];
                let looked_up = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dtype,
                    &gathered,
                    shape,
                    &Device::Cpu,
                )?
                .dequantize(&Device::Cpu)?;
                with_f32_slice(&looked_up, |rows| out.copy_from_slice(rows))
            }
        }
    }

    /// The whole table as f32 (the GPU path, tests).
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(table) => Ok(table.clone()),
            &Self::Quantized {
                ref blocks,
                dtype,
                rows,
                hidden,
            } => candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                blocks,
                vec![rows, hidden],
                &Device::Cpu,
            )?
            .dequantize(&Device::Cpu),
        }
    }
}

pub struct LlamaWeights {
    pub config: ModelConfig,
    pub embedding: Embedding,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    pub lm_head: Linear,
}

impl LlamaWeights {
    /// Stores a float lm_head as `format` (`--lm-head-format`): the quantized checkpoints keep
    /// the (tied) lm_head in f16/bf16, which on a CPU is the largest matmul of every decode
    /// step (SmolLM2: 49,152 x 576), where a GGUF keeps it in Q8_0. Fails, with what it found,
    /// for an lm_head that is already quantized (a GGUF's keeps the file's type).
    pub fn store_lm_head_as(
        &mut self,
        format: GgmlDType,
        repack_for_cpu: bool,
    ) -> std::result::Result<(), String> {
        let LinearWeight::Candle(QMatMul::Tensor(dense)) = &self.lm_head.weight else {
            return Err(
                "--lm-head-format applies to a float lm_head (a Hugging Face folder's); this \
                 model's lm_head is already quantized and keeps its type"
                    .to_string(),
            );
        };
        self.lm_head.weight = LinearWeight::from_f32(dense.clone(), format, repack_for_cpu)
            .map_err(|e| format!("--lm-head-format: {e}"))?;
        Ok(())
    }
}
