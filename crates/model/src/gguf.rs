//! Loading a Llama-family model from a GGUF file (llama.cpp's format), keeping every tensor in
//! its own quantized type.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::{Embedding, LayerWeights, Linear, LinearWeight, LlamaWeights};

/// Reads the header (metadata and tensor directory) of a GGUF file.
pub fn read_content(path: &Path) -> Result<gguf_file::Content> {
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| ModelError::Format {
        path: path.to_path_buf(),
        message: format!("not a readable GGUF file: {e}"),
    })?;
    check_complete(path, &content, &file)?;
    Ok(content)
}

/// A download cut short leaves a valid header and missing tensors; say so up front rather than
/// failing on whichever tensor happens to be read first.
fn check_complete(path: &Path, content: &gguf_file::Content, file: &File) -> Result<()> {
    let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let needed = content
        .tensor_infos
        .values()
        .map(|info| {
            let blocks = info.shape.elem_count() / info.ggml_dtype.block_size();
            content.tensor_data_offset + info.offset + (blocks * info.ggml_dtype.type_size()) as u64
        })
        .max()
        .unwrap_or(0);
    if file_len < needed {
        return Err(ModelError::Format {
            path: path.to_path_buf(),
            message: format!(
                "file is truncated: {file_len} bytes, but its tensors need {needed} (re-download it)"
            ),
        });
    }
    Ok(())
}

/// Reads named tensors out of an open GGUF file, with errors that name the file and tensor.
struct TensorReader<'a> {
    path: &'a Path,
    content: &'a gguf_file::Content,
    reader: BufReader<File>,
    device: Device,
    /// Re-quantize projection matrices to this type (see `LoadOptions::weights_format`).
    weights_format: Option<GgmlDType>,
    /// Repack blocks for our CPU kernels (see `LoadOptions::device`).
    repack_for_cpu: bool,
}

impl TensorReader<'_> {
    fn tensor(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.reader, name, &self.device)
            .map_err(|e| ModelError::Tensor {
                path: self.path.to_path_buf(),
                name: name.to_string(),
                message: e.to_string(),
            })
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.tensor(name)?.dequantize(&self.device)?)
    }

    /// A dense tensor the configuration calls for (`wanted`), else none.
    fn optional(&mut self, wanted: bool, name: &str) -> Result<Option<Tensor>> {
        wanted.then(|| self.dense(name)).transpose()
    }

    fn quantized(&self, tensor: QTensor) -> Result<LinearWeight> {
        Ok(LinearWeight::quantized(tensor, self.repack_for_cpu)?)
    }

    fn linear(&mut self, name: &str, with_bias: bool) -> Result<Linear> {
        let tensor = self.tensor(&format!("{name}.weight"))?;
        let weight = match self.weights_format {
            Some(format) if format != tensor.dtype() => LinearWeight::from_f32(
                tensor.dequantize(&self.device)?,
                format,
                self.repack_for_cpu,
            )?,
            _ => self.quantized(tensor)?,
        };
        let bias = match with_bias {
            true => Some(self.dense(&format!("{name}.bias"))?),
            false => None,
        };
        Ok(Linear { weight, bias })
    }
}

pub fn load(
    path: &Path,
    content: &gguf_file::Content,
    weights_format: Option<GgmlDType>,
    repack_for_cpu: bool,
) -> Result<LlamaWeights> {
    let config = ModelConfig::from_gguf(content, path)?;
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut r = TensorReader {
        path,
        content,
        reader: BufReader::new(file),
        device: Device::Cpu,
        weights_format,
        repack_for_cpu,
    };
    let mut layers = Vec::with_capacity(config.num_layers);
    for i in 0..config.num_layers {
        let p = format!("blk.{i}");
        let bias = config.attention_bias;
        layers.push(LayerWeights {
            q_proj: r.linear(&format!("{p}.attn_q"), bias)?,
            k_proj: r.linear(&format!("{p}.attn_k"), bias)?,
            v_proj: r.linear(&format!("{p}.attn_v"), bias)?,
            o_proj: r.linear(&format!("{p}.attn_output"), false)?,
            gate_proj: r.linear(&format!("{p}.ffn_gate"), false)?,
            up_proj: r.linear(&format!("{p}.ffn_up"), false)?,
            down_proj: r.linear(&format!("{p}.ffn_down"), false)?,
            attn_norm: r.dense(&format!("{p}.attn_norm.weight"))?,
            ffn_norm: r.dense(&format!("{p}.ffn_norm.weight"))?,
            // llama.cpp's converter stores Gemma's norms as (1 + w): plain RMSNorm weights.
            q_norm: r.optional(config.block.qk_norm, &format!("{p}.attn_q_norm.weight"))?,
            k_norm: r.optional(config.block.qk_norm, &format!("{p}.attn_k_norm.weight"))?,
            post_attention_norm: r.optional(
                config.block.post_norms,
                &format!("{p}.post_attention_norm.weight"),
            )?,
            post_ffn_norm: r.optional(
                config.block.post_norms,
                &format!("{p}.post_ffw_norm.weight"),
            )?,
        });
    }
    let embedding_q = r.tensor("token_embd.weight")?;
    // The GPU path uploads the table as it is; the CPU keeps it quantized.
    let embedding = match repack_for_cpu {
        true => Embedding::from_qtensor(&embedding_q)?,
        false => Embedding::Dense(embedding_q.dequantize(&r.device)?),
    };
    let lm_head = match config.tie_word_embeddings {
        true => Linear {
            weight: r.quantized(embedding_q)?,
            bias: None,
        },
        // Not `linear`: the lm_head keeps the file's type (see `LoadOptions::weights_format`).
        false => Linear {
            weight: {
                let output = r.tensor("output.weight")?;
                r.quantized(output)?
            },
            bias: None,
        },
    };
    let final_norm = r.dense("output_norm.weight")?;
    Ok(LlamaWeights {
        config,
        embedding,
        layers,
        final_norm,
        lm_head,
    })
}
