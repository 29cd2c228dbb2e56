//! The Llama-family forward pass on a CUDA device: candle's ops for the embedding, RMSNorm,
//! matmuls (cuBLAS for dense weights, candle's quantized kernels for GGUF types) and residual
//! adds; our kernels (`kernels/*.cu`) for RoPE with the KV write, paged attention and SwiGLU.

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use minserve_core::StepBatch;

use super::cache::CudaKvCache;
use super::kernels::{self, Kernels, StepTables};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::rope::RopeTable;
use crate::weights::{Linear, LinearWeight, LlamaWeights};

/// Linear layers that read the same input (q/k/v; gate/up; or one alone), computed as one
/// `[rows, sum of outputs]` result.
enum Projection {
    /// Dense matrices stacked into one `[sum of outputs, in]`: a single GEMM.
    Dense {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    /// Quantized matrices stay apart (their blocks cannot be stacked in general); their
    /// outputs are concatenated.
    Quantized(Vec<(QMatMul, Option<Tensor>)>),
}

impl Projection {
    fn new(layers: Vec<Linear>, dtype: DType, device: &Device) -> Result<Self> {
        let dense = layers.iter().all(|l| {
            matches!(
                &l.weight,
                LinearWeight::Candle(QMatMul::Tensor(_) | QMatMul::TensorF16(_))
            )
        });
        let bias = |l: &Linear| -> Result<Option<Tensor>> {
            Ok(match &l.bias {
                Some(b) => Some(b.to_device(device)?.to_dtype(dtype)?),
                None => None,
            })
        };
        if dense {
            let mut weights = Vec::with_capacity(layers.len());
            let mut biases = Vec::with_capacity(layers.len());
            for layer in &layers {
                let LinearWeight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) =
                    &layer.weight
                else {
                    unreachable!("checked above")
                };
                weights.push(w.to_device(device)?.to_dtype(dtype)?);
                biases.push(bias(layer)?);
            }
            let bias = match biases.iter().all(Option::is_some) {
                true => Some(Tensor::cat(
                    &biases.into_iter().flatten().collect::<Vec<_>>(),
                    0,
                )?),
                false => None,
            };
            return Ok(Self::Dense {
                weight: Tensor::cat(&weights, 0)?,
                bias,
            });
        }
        let mut parts = Vec::with_capacity(layers.len());
        for layer in &layers {
            let matmul = match &layer.weight {
                LinearWeight::Candle(QMatMul::QTensor(q)) => {
                    QMatMul::from_qtensor(to_device_quantized(q, device)?)?
                }
                LinearWeight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                    QMatMul::Tensor(w.to_device(device)?.to_dtype(dtype)?)
                }
                LinearWeight::Packed(_) => {
                    return Err(crate::error::ModelError::Device(
                        "weights repacked for the CPU cannot move to the GPU: load them with \
                         LoadOptions::device set to the GPU"
                            .into(),
                    ))
                }
            };
            parts.push((matmul, bias(layer)?));
        }
        Ok(Self::Quantized(parts))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Dense { weight, bias } => {
                let y = x.matmul(&weight.t()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            Self::Quantized(parts) => {
                let mut outs = Vec::with_capacity(parts.len());
                for (matmul, bias) in parts {
                    let y = matmul.forward(x)?;
                    outs.push(match bias {
                        Some(b) => y.broadcast_add(b)?,
                        None => y,
                    });
                }
                match outs.len() {
                    1 => outs.pop().expect("one output"),
                    _ => Tensor::cat(&outs, 1)?,
                }
            }
        })
    }
}

/// A GGUF tensor's blocks, copied as they are into GPU memory.
fn to_device_quantized(q: &QTensor, device: &Device) -> Result<QTensor> {
    let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
    Ok(QTensor::new(storage, q.shape().clone())?)
}

struct Layer {
    attn_norm: Tensor,
    qkv: Projection,
    o: Projection,
    ffn_norm: Tensor,
    gate_up: Projection,
    down: Projection,
}

pub struct CudaModel {
    pub config: ModelConfig,
    pub device: Device,
    /// Activations and KV cache. GGUF's quantized matmuls take and give f32.
    pub dtype: DType,
    embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    lm_head: Projection,
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
    kernels: Kernels,
}

impl CudaModel {
    /// Moves `weights` to `device`, dense matrices converted to `dtype`.
    pub fn new(weights: LlamaWeights, dtype: DType, device: &Device) -> Result<Self> {
        let c = weights.config;
        if c.block != crate::config::BlockVariant::default() {
            return Err(crate::error::ModelError::Device(format!(
                "the GPU path runs the Llama block only; `{}` (q/k norms, post-norms, GeGLU or \
                 sliding windows) runs on the CPU (--device cpu)",
                c.architecture
            )));
        }
        let quantized = matches!(
            weights.layers.first().map(|l| &l.q_proj.weight),
            Some(LinearWeight::Candle(QMatMul::QTensor(_)))
        );
        // candle's quantized CUDA matmuls only take f32 activations.
        let dtype = if quantized { DType::F32 } else { dtype };
        let vector = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(dtype)?) };
        let mut layers = Vec::with_capacity(weights.layers.len());
        for l in weights.layers {
            layers.push(Layer {
                attn_norm: vector(&l.attn_norm)?,
                ffn_norm: vector(&l.ffn_norm)?,
                qkv: Projection::new(vec![l.q_proj, l.k_proj, l.v_proj], dtype, device)?,
                o: Projection::new(vec![l.o_proj], dtype, device)?,
                gate_up: Projection::new(vec![l.gate_proj, l.up_proj], dtype, device)?,
                down: Projection::new(vec![l.down_proj], dtype, device)?,
            });
        }
        let embedding = vector(&weights.embedding.dense()?)?;
        let lm_head = match (&weights.lm_head.weight, c.tie_word_embeddings) {
            // Share the embedding's GPU copy instead of uploading the same matrix twice.
            (LinearWeight::Candle(QMatMul::Tensor(_)), true) => Projection::Dense {
                weight: embedding.clone(),
                bias: None,
            },
            _ => Projection::new(vec![weights.lm_head], dtype, device)?,
        };
        let rope = RopeTable::new(
            c.head_dim,
            c.rope_theta,
            &c.rope_scaling,
            c.max_position_embeddings,
            c.rope_style,
        );
        let half = c.head_dim / 2;
        let max_positions = rope.max_positions();
        Ok(Self {
            cos: Tensor::from_slice(rope.cos(), (max_positions, half), device)?,
            sin: Tensor::from_slice(rope.sin(), (max_positions, half), device)?,
            max_positions,
            final_norm: vector(&weights.final_norm)?,
            kernels: Kernels::load(kernels::cuda_device(device)?, dtype, &c)?,
            embedding,
            layers,
            lm_head,
            dtype,
            device: device.clone(),
            config: c,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Same contract as the CPU `LlamaModel::forward`: logits `[sampled rows, vocab]`.
    pub fn forward(&self, batch: &StepBatch, cache: &mut CudaKvCache) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = batch.num_tokens();
        let device = kernels::cuda_device(&self.device)?;
        let eps = c.rms_norm_eps as f32;
        let tables = self.step_tables(batch)?;

        let ids = Tensor::from_slice(&batch.token_ids, n, &self.device)?;
        let mut x = self.embedding.index_select(&ids, 0)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let (keys, values) = (&cache.keys[index], &cache.values[index]);
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let qkv = layer.qkv.forward(&h)?;
            let query = kernels::uninitialized((n, c.num_heads * c.head_dim), self.dtype, device)?;
            self.kernels.rope_and_cache(
                &qkv,
                &query,
                keys,
                values,
                &tables,
                (&self.cos, &self.sin),
            )?;
            let attention =
                kernels::uninitialized((n, c.num_heads * c.head_dim), self.dtype, device)?;
            self.kernels.paged_attention(
                &attention,
                &query,
                keys,
                values,
                &tables,
                cache.block_size,
            )?;
            x = (x + layer.o.forward(&attention)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let act = self.kernels.silu_and_mul(&layer.gate_up.forward(&h)?)?;
            x = (x + layer.down.forward(&act)?)?;
        }

        let rows: Vec<u32> = batch.sampled_rows().iter().map(|&r| r as u32).collect();
        let rows = Tensor::from_slice(&rows, rows.len(), &self.device)?;
        let last = candle_nn::ops::rms_norm(&x.index_select(&rows, 0)?, &self.final_norm, eps)?;
        let logits = self.lm_head.forward(&last)?.to_dtype(DType::F32)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }

    fn step_tables(&self, batch: &StepBatch) -> Result<StepTables> {
        let max_blocks = batch
            .sequences
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut block_tables = vec![0u32; batch.sequences.len() * max_blocks];
        let mut token_sequence = Vec::with_capacity(batch.num_tokens());
        for (index, seq) in batch.sequences.iter().enumerate() {
            block_tables[index * max_blocks..][..seq.block_table.len()]
                .copy_from_slice(&seq.block_table);
            token_sequence.extend(std::iter::repeat_n(index as u32, seq.num_new_tokens));
        }
        let upload = |v: &[u32]| Tensor::from_slice(v, v.len(), &self.device);
        Ok(StepTables {
            positions: upload(&batch.positions)?,
            slots: upload(&batch.slot_mapping)?,
            token_sequence: upload(&token_sequence)?,
            block_tables: upload(&block_tables)?,
            max_blocks,
        })
    }
}
