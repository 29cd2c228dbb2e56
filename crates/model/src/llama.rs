//! The Llama-family forward pass over a ragged batch on the paged KV cache.

use candle_core::{Device, Tensor};
use minserve_core::StepBatch;

use crate::error::{ModelError, Result};
use crate::kv_cache::KvCache;
use crate::paged_attention::{AttentionPlan, PagedAttention};
use crate::rope::{RopeOp, RopeTable};
use crate::tensor_util::with_f32_slice;
use crate::weights::{Linear, LlamaWeights};

pub struct LlamaModel {
    pub weights: LlamaWeights,
    rope: RopeTable,
}

impl LlamaModel {
    pub fn new(weights: LlamaWeights) -> Self {
        let c = &weights.config;
        let rope = RopeTable::new(
            c.head_dim,
            c.rope_theta,
            c.max_position_embeddings,
            c.rope_style,
        );
        Self { weights, rope }
    }

    pub fn config(&self) -> &crate::config::ModelConfig {
        &self.weights.config
    }

    /// Runs every new token of `batch` through the model, writing their K/V into `cache`, and
    /// returns logits `[sampled sequences, vocab]` for the last new token of each sequence that
    /// samples. The other rows never reach the lm_head, the single most expensive matmul.
    pub fn forward(&self, batch: &StepBatch, cache: &mut KvCache) -> Result<Tensor> {
        self.validate(batch, cache)?;
        let c = &self.weights.config;
        let device = Device::Cpu;
        let num_tokens = batch.num_tokens();
        let eps = c.rms_norm_eps as f32;
        let scale = (1.0 / (c.head_dim as f64).sqrt()) as f32;

        let plan = AttentionPlan::new(batch, c.num_kv_heads);
        let ids = Tensor::from_slice(&batch.token_ids, num_tokens, &device)?;
        let mut x = self.weights.embedding.index_select(&ids, 0)?;
        for (layer, kv) in self.weights.layers.iter().zip(cache.layers.iter_mut()) {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let [q, k, v]: [Tensor; 3] =
                Linear::forward_many(&[&layer.q_proj, &layer.k_proj, &layer.v_proj], &h)?
                    .try_into()
                    .map_err(|_| ModelError::InvalidBatch("q/k/v projection count".into()))?;
            let q = q.apply_op1_no_bwd(&RopeOp {
                table: &self.rope,
                positions: &batch.positions,
                num_heads: c.num_heads,
            })?;
            let k = k.apply_op1_no_bwd(&RopeOp {
                table: &self.rope,
                positions: &batch.positions,
                num_heads: c.num_kv_heads,
            })?;
            with_f32_slice(&k, |k| {
                with_f32_slice(&v, |v| kv.write(&cache.layout, k, v, &batch.slot_mapping))
            })??;
            let attn = q.apply_op1_no_bwd(&PagedAttention {
                kv,
                layout: &cache.layout,
                batch,
                plan: &plan,
                num_heads: c.num_heads,
                scale,
            })?;
            x = (layer.o_proj.forward(&attn)? + x)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate = candle_nn::ops::silu(&layer.gate_proj.forward(&h)?)?;
            let mlp = layer
                .down_proj
                .forward(&(gate * layer.up_proj.forward(&h)?)?)?;
            x = (mlp + x)?;
        }
        let rows: Vec<u32> = batch.sampled_rows().iter().map(|&r| r as u32).collect();
        let rows = Tensor::from_vec(rows.clone(), rows.len(), &device)?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.weights.final_norm, eps)?;
        Ok(self.weights.lm_head.forward(&x)?)
    }

    /// A malformed batch is an engine bug, but it must surface as an error, never as an
    /// out-of-bounds panic inside a kernel.
    fn validate(&self, batch: &StepBatch, cache: &KvCache) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidBatch(m));
        let n = batch.num_tokens();
        if n == 0 {
            return bad("empty batch".into());
        }
        if batch.positions.len() != n || batch.slot_mapping.len() != n {
            return bad("token, position and slot arrays differ in length".into());
        }
        let layout = &cache.layout;
        let num_slots = layout.num_blocks * layout.block_size;
        let vocab = self.weights.config.vocab_size;
        if let Some(t) = batch.token_ids.iter().find(|&&t| t as usize >= vocab) {
            return bad(format!("token id {t} is outside the vocabulary of {vocab}"));
        }
        if let Some(s) = batch
            .slot_mapping
            .iter()
            .find(|&&s| s as usize >= num_slots)
        {
            return bad(format!(
                "slot {s} is outside the cache of {num_slots} slots"
            ));
        }
        let mut row = 0;
        for (index, seq) in batch.sequences.iter().enumerate() {
            if seq.num_new_tokens == 0 || seq.num_new_tokens > seq.context_len {
                return bad(format!("sequence {index}: bad new-token count"));
            }
            if seq.context_len > self.rope.max_positions() {
                return bad(format!(
                    "sequence {index}: {} tokens exceed the model's context of {}",
                    seq.context_len,
                    self.rope.max_positions()
                ));
            }
            if seq.block_table.len() * layout.block_size < seq.context_len {
                return bad(format!("sequence {index}: block table too short"));
            }
            if seq
                .block_table
                .iter()
                .any(|&b| b as usize >= layout.num_blocks)
            {
                return bad(format!("sequence {index}: block id outside the pool"));
            }
            for (i, position) in (seq.start_position()..seq.context_len).enumerate() {
                if batch.positions.get(row + i) != Some(&(position as u32)) {
                    return bad(format!(
                        "sequence {index}: positions do not follow its context"
                    ));
                }
            }
            row += seq.num_new_tokens;
        }
        if row != n {
            return bad("sequences do not cover the token rows".into());
        }
        Ok(())
    }
}
