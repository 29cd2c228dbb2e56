//! The Llama-family forward pass over a ragged batch on the paged KV cache.
//!
//! The pass runs on plain f32 buffers that live across steps, with our own kernels on our own
//! thread pool ([`crate::pool`]): per-op tensor dispatch and fresh allocations cost more than
//! the arithmetic at small batches, and one pool keeps two sets of spinning threads from
//! fighting over the cores. candle still loads the weights, and multiplies those our kernels
//! do not handle.

use std::ops::Range;
use std::sync::Mutex;

use minserve_core::sequence::RELEASED_BLOCK;
use minserve_core::StepBatch;

use crate::config::Activation;
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, StepSlots};
use crate::math::{add_in_place, gelu_tanh_mul, rms_norm, rms_norm_in_place, silu_mul};
use crate::observer::{ActivationObserver, ProjectionSite};
use crate::paged_attention::{AttentionPlan, PagedAttention};
use crate::pool::DisjointWriter;
use crate::qmatmul::QInput;
use crate::rope::RopeTable;
use crate::step_profile::{self, Phase};
use crate::weights::{Linear, LinearWeight, LlamaWeights};

pub struct LlamaModel {
    pub weights: LlamaWeights,
    /// RoPE of the global layers (all layers of most models).
    rope: RopeTable,
    /// RoPE of the sliding-window layers, at their own base (Gemma 3).
    local_rope: Option<RopeTable>,
    layers: Vec<LayerNorms>,
    final_norm: Vec<f32>,
    buffers: Mutex<Buffers>,
}

/// A layer's RMSNorm weights as plain vectors; the optional ones are the architecture's
/// variations of the Llama block (see `ModelConfig`).
struct LayerNorms {
    attention: Vec<f32>,
    feed_forward: Vec<f32>,
    /// Per-head norms of queries and keys.
    qk: Option<(Vec<f32>, Vec<f32>)>,
    /// Norms of the attention and MLP outputs.
    post: Option<(Vec<f32>, Vec<f32>)>,
}

/// Activations of one step, kept across steps (grown, never shrunk) so that a step allocates
/// nothing but its logits.
#[derive(Default)]
struct Buffers {
    /// The residual stream, `[tokens, hidden]`.
    x: Vec<f32>,
    /// Normalized input of a sub-layer, `[tokens, hidden]`, when it is stored (see
    /// [`project_rows`]), and the final norm's rows.
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attention: Vec<f32>,
    /// A sub-layer's output before it joins the residual stream, `[tokens, hidden]`.
    projected: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// The MLP's activation, `[tokens, intermediate]`, when it is stored (see [`project_rows`]).
    activated: Vec<f32>,
    /// Quantized activations shared by the matmuls that read the same input.
    quantized: QInput,
}

/// Resizes `v` to `len` without shrinking its capacity.
fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    v.resize(len, 0.0);
    &mut v[..len]
}

impl LlamaModel {
    pub fn new(weights: LlamaWeights) -> Self {
        let c = &weights.config;
        let rope = RopeTable::new(
            c.head_dim,
            c.rope_theta,
            &c.rope_scaling,
            c.max_position_embeddings,
            c.rope_style,
        );
        let local_rope = c.block.sliding_window.map(|w| {
            let plain = crate::config::RopeScaling::None;
            RopeTable::new(
                c.head_dim,
                w.local_rope_theta,
                &plain,
                c.max_position_embeddings,
                c.rope_style,
            )
        });
        let vector = |t: &candle_core::Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("norm weights are f32 vectors")
        };
        let pair = |a: &Option<candle_core::Tensor>, b: &Option<candle_core::Tensor>| {
            Some((vector(a.as_ref()?), vector(b.as_ref()?)))
        };
        let layers = weights
            .layers
            .iter()
            .map(|l| LayerNorms {
                attention: vector(&l.attn_norm),
                feed_forward: vector(&l.ffn_norm),
                qk: pair(&l.q_norm, &l.k_norm),
                post: pair(&l.post_attention_norm, &l.post_ffn_norm),
            })
            .collect();
        Self {
            final_norm: vector(&weights.final_norm),
            weights,
            rope,
            local_rope,
            layers,
            buffers: Mutex::new(Buffers::default()),
        }
    }

    pub fn config(&self) -> &crate::config::ModelConfig {
        &self.weights.config
    }

    /// Runs every new token of `batch` through the model, writing their K/V into `cache`, and
    /// returns logits `[sampled sequences, vocab]` (row-major) for the last new token of each
    /// sequence that samples. The other rows never reach the lm_head, the single most expensive
    /// matmul.
    pub fn forward(&self, batch: &StepBatch, cache: &mut KvCache) -> Result<Vec<f32>> {
        self.forward_observed(batch, cache, None)
    }

    /// [`forward`](Self::forward) with an observer that sees the input of every group of
    /// projections and may replace their weights for the rest of the pass (calibration for
    /// quantization, see [`crate::observer`]).
    pub fn forward_observed(
        &self,
        batch: &StepBatch,
        cache: &mut KvCache,
        mut observer: Option<&mut dyn ActivationObserver>,
    ) -> Result<Vec<f32>> {
        self.validate(batch, cache)?;
        let c = &self.weights.config;
        let n = batch.num_tokens();
        let (hidden, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let eps = c.rms_norm_eps as f32;
        let scale = c.attention_scale();
        let plan = AttentionPlan::new(batch, c.num_kv_heads);
        let mut guard = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let b = &mut *guard;
        step_profile::start_step();

        let x = sized(&mut b.x, n * hidden);
        self.weights.embedding.rows_into(&batch.token_ids, x)?;
        if c.block.scale_embeddings {
            let factor = (hidden as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= factor);
        }
        step_profile::mark(Phase::Embedding);
        let q = sized(&mut b.q, n * q_dim);
        let k = sized(&mut b.k, n * kv_dim);
        let v = sized(&mut b.v, n * kv_dim);
        let attention = sized(&mut b.attention, n * q_dim);
        let projected = sized(&mut b.projected, n * hidden);
        let gate = sized(&mut b.gate, n * c.intermediate_size);
        let up = sized(&mut b.up, n * c.intermediate_size);
        let quantized = &mut b.quantized;
        let slots: Vec<StepSlots> = (0..batch.num_groups())
            .map(|group| StepSlots::new(batch.slots(group), &cache.layout))
            .collect();

        for (index, (layer, norms)) in self.weights.layers.iter().zip(&self.layers).enumerate() {
            let (group, pool) = cache.groups.layers[index];
            let kv = &mut cache.pools[pool];
            let window = c.layer_window(index);
            let rope = match (window, &self.local_rope) {
                (Some(_), Some(local)) => local,
                _ => &self.rope,
            };
            // The attention's input: the residual stream, which the previous layer's MLP output
            // joins here (layer 0: the embeddings), normalized.
            {
                let x_rows = DisjointWriter::new(x);
                let mlp_output = (index > 0).then_some(&*projected);
                let attention_input = add_then_norm(&x_rows, mlp_output, &norms.attention, eps);
                project_rows(
                    &mut observer,
                    (index, ProjectionSite::Attention),
                    [&layer.q_proj, &layer.k_proj, &layer.v_proj],
                    RowSource {
                        count: n,
                        width: hidden,
                        produce: &attention_input,
                        phase: if index == 0 {
                            Phase::Norms
                        } else {
                            Phase::Residual
                        },
                    },
                    &mut b.normed,
                    quantized,
                    &mut [&mut *q, &mut *k, &mut *v],
                )?;
            }
            step_profile::mark(Phase::QkvProjection);
            if let Some((q_norm, k_norm)) = &norms.qk {
                rows_parallel(q, q_dim, |_, rows| rms_norm_in_place(rows, q_norm, eps));
                rows_parallel(k, kv_dim, |_, rows| rms_norm_in_place(rows, k_norm, eps));
                step_profile::mark(Phase::Norms);
            }
            rope.apply(q, &batch.positions, c.num_heads);
            step_profile::mark(Phase::Rope);
            // The keys' RoPE happens inside the write, on each row while it is in L1.
            let positions = &batch.positions;
            kv.write_rotated(&cache.layout, k, v, slots[group], &|token, key| {
                rope.rotate_head(key, positions[token])
            });
            step_profile::mark(Phase::KvWrite);
            PagedAttention {
                kv,
                layout: &cache.layout,
                batch,
                group,
                plan: &plan,
                num_heads: c.num_heads,
                scale,
                window,
            }
            .run(q, attention);
            step_profile::mark(Phase::Attention);
            let mut replaced = Vec::new();
            let [o_proj] = observed(
                &mut observer,
                &mut replaced,
                (index, ProjectionSite::AttentionOutput),
                attention,
                n,
                [&layer.o_proj],
            )?;
            o_proj.forward_into(attention, n, quantized, projected)?;
            step_profile::mark(Phase::OutputProjection);
            if let Some((post_attention, _)) = &norms.post {
                rows_parallel(projected, hidden, |_, rows| {
                    rms_norm_in_place(rows, post_attention, eps)
                });
                step_profile::mark(Phase::Norms);
            }
            // The MLP's input: the residual stream with the attention output joined, normalized.
            {
                let x_rows = DisjointWriter::new(x);
                let mlp_input = add_then_norm(&x_rows, Some(projected), &norms.feed_forward, eps);
                project_rows(
                    &mut observer,
                    (index, ProjectionSite::Mlp),
                    [&layer.gate_proj, &layer.up_proj],
                    RowSource {
                        count: n,
                        width: hidden,
                        produce: &mlp_input,
                        phase: Phase::Residual,
                    },
                    &mut b.normed,
                    quantized,
                    &mut [&mut *gate, &mut *up],
                )?;
            }
            step_profile::mark(Phase::GateUpProjection);
            {
                let width = c.intermediate_size;
                let activation_mul = match c.block.activation {
                    Activation::Silu => silu_mul,
                    Activation::GeluTanh => gelu_tanh_mul,
                };
                let (gate, up) = (&*gate, &*up);
                let activated = |row: usize, out: &mut [f32]| {
                    out.copy_from_slice(&gate[row * width..][..width]);
                    activation_mul(out, &up[row * width..][..width]);
                };
                project_rows(
                    &mut observer,
                    (index, ProjectionSite::MlpOutput),
                    [&layer.down_proj],
                    RowSource {
                        count: n,
                        width,
                        produce: &activated,
                        phase: Phase::ActivationFunction,
                    },
                    &mut b.activated,
                    quantized,
                    &mut [&mut *projected],
                )?;
            }
            step_profile::mark(Phase::DownProjection);
            if let Some((_, post_ffn)) = &norms.post {
                rows_parallel(projected, hidden, |_, rows| {
                    rms_norm_in_place(rows, post_ffn, eps)
                });
                step_profile::mark(Phase::Norms);
            }
        }
        // Every other layer's output joins the residual stream inside the next layer's input.
        add_in_place(x, projected);
        step_profile::mark(Phase::Residual);

        let rows = batch.sampled_rows();
        let last = sized(&mut b.normed, rows.len() * hidden);
        for (out, &row) in last.chunks_exact_mut(hidden).zip(&rows) {
            rms_norm(
                &b.x[row * hidden..(row + 1) * hidden],
                &self.final_norm,
                eps,
                out,
            );
        }
        step_profile::mark(Phase::Norms);
        let mut logits = vec![0f32; rows.len() * c.vocab_size];
        self.weights
            .lm_head
            .forward_into(last, rows.len(), &mut b.quantized, &mut logits)?;
        step_profile::mark(Phase::LmHead);
        Ok(logits)
    }

    fn validate(&self, batch: &StepBatch, cache: &KvCache) -> Result<()> {
        validate_batch(
            batch,
            self.weights.config.vocab_size,
            self.rope.max_positions(),
            cache.geometry(),
            &cache.groups.windows,
        )
    }
}

/// The projections the pass multiplies by at a site of a layer: the layer's own, or, when an
/// observer hands back weights, those (kept alive in `replaced`, with the layer's biases).
fn observed<'a, const N: usize>(
    observer: &mut Option<&mut dyn ActivationObserver>,
    replaced: &'a mut Vec<Linear>,
    (layer, site): (usize, ProjectionSite),
    input: &[f32],
    rows: usize,
    own: [&'a Linear; N],
) -> Result<[&'a Linear; N]> {
    let Some(observer) = observer else {
        return Ok(own);
    };
    let Some(weights) = observer.observe(layer, site, input, rows)? else {
        return Ok(own);
    };
    if weights.len() != N {
        return Err(ModelError::Calibration(format!(
            "layer {layer}: {} weights handed back for the {N} projections of {site:?}",
            weights.len()
        )));
    }
    *replaced = weights
        .into_iter()
        .zip(own)
        .map(|(weight, linear)| Linear {
            weight: LinearWeight::dense(weight),
            bias: linear.bias.clone(),
        })
        .collect();
    let replaced: &'a Vec<Linear> = replaced;
    Ok(std::array::from_fn(|i| &replaced[i]))
}

/// A malformed batch is an engine bug, but it must surface as an error, never as an
/// out-of-bounds access inside a kernel (on the CPU a panic, on a GPU silent corruption).
pub(crate) fn validate_batch(
    batch: &StepBatch,
    vocab: usize,
    max_positions: usize,
    layout: minserve_core::CacheGeometry,
    group_windows: &[Option<usize>],
) -> Result<()> {
    let bad = |m: String| Err(ModelError::InvalidBatch(m));
    let n = batch.num_tokens();
    if n == 0 {
        return bad("empty batch".into());
    }
    if batch.num_groups() != group_windows.len() {
        return bad(format!(
            "{} KV groups in the batch, {} in the cache",
            batch.num_groups(),
            group_windows.len()
        ));
    }
    let groups = 0..group_windows.len();
    if batch.positions.len() != n || groups.clone().any(|g| batch.slots(g).len() != n) {
        return bad("token, position and slot arrays differ in length".into());
    }
    let num_slots = layout.num_blocks * layout.block_size;
    if let Some(t) = batch.token_ids.iter().find(|&&t| t as usize >= vocab) {
        return bad(format!("token id {t} is outside the vocabulary of {vocab}"));
    }
    if let Some(s) = groups
        .clone()
        .flat_map(|g| batch.slots(g))
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
        if seq.context_len > max_positions {
            return bad(format!(
                "sequence {index}: {} tokens exceed the model's context of {max_positions}",
                seq.context_len,
            ));
        }
        for (group, window) in group_windows.iter().enumerate() {
            let table = seq.table(group);
            if table.len() * layout.block_size < seq.context_len {
                return bad(format!("sequence {index}: block table too short"));
            }
            // Attention reads from the window start of the first new token on; only blocks
            // before it may have been released.
            let first_read = window.map_or(0, |w| {
                (seq.start_position() + 1).saturating_sub(w) / layout.block_size
            });
            let outside = |(i, &b): (usize, &u32)| {
                b as usize >= layout.num_blocks && !(b == RELEASED_BLOCK && i < first_read)
            };
            if table.iter().enumerate().any(outside) {
                return bad(format!(
                    "sequence {index}: block id outside the pool in KV group {group}"
                ));
            }
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

/// Row `r` of a sub-layer's input: the residual stream's row `r` (in `x`) with `added`'s row
/// joined to it in place, when given, then RMSNorm-ed into `out`. Only for [`project_rows`],
/// which makes each row once: the residual row is written through `x` without a lock.
fn add_then_norm<'a>(
    x: &'a DisjointWriter<'_>,
    added: Option<&'a [f32]>,
    weight: &'a [f32],
    eps: f32,
) -> impl Fn(usize, &mut [f32]) + Sync + 'a {
    let hidden = weight.len();
    move |row, out| {
        // SAFETY: `project_rows` produces each row once, so chunks never overlap.
        let x = unsafe { x.chunk(row * hidden, hidden) };
        if let Some(added) = added {
            add_in_place(x, &added[row * hidden..][..hidden]);
        }
        rms_norm(x, weight, eps, out);
    }
}

/// `count` rows of `width` values, made one at a time by `produce(row, out)`.
struct RowSource<'a> {
    count: usize,
    width: usize,
    produce: &'a (dyn Fn(usize, &mut [f32]) + Sync),
    /// The step phase that making them is, when they are made apart from the quantization.
    phase: Phase,
}

/// Multiplies the rows `produce` makes (a norm, an activation function) by a site's
/// projections. With packed weights and nobody observing, each row is made just before it is
/// quantized and never stored (`Linear::forward_many_from_rows`): one pass over memory
/// instead of two. Otherwise the rows are stored in `rows_buffer` first, where an observer
/// sees them. `produce` runs exactly once per row either way, which lets it update the
/// residual stream as it goes.
fn project_rows<const N: usize>(
    observer: &mut Option<&mut dyn ActivationObserver>,
    at: (usize, ProjectionSite),
    layers: [&Linear; N],
    source: RowSource,
    rows_buffer: &mut Vec<f32>,
    quantized: &mut QInput,
    outs: &mut [&mut [f32]],
) -> Result<()> {
    let RowSource {
        count: n,
        width,
        produce,
        phase,
    } = source;
    if observer.is_none() && Linear::forward_many_from_rows(&layers, n, produce, quantized, outs)? {
        return Ok(());
    }
    let rows = sized(rows_buffer, n * width);
    rows_parallel(rows, width, |range, out| {
        for (row, out) in range.zip(out.chunks_exact_mut(width)) {
            produce(row, out);
        }
    });
    step_profile::mark(phase);
    let mut replaced = Vec::new();
    let layers = observed(observer, &mut replaced, at, rows, n, layers)?;
    Linear::forward_many_into(&layers, rows, n, quantized, outs)?;
    Ok(())
}

/// Below this many values an elementwise pass runs on the calling thread: waking the pool
/// costs more than the work.
const PARALLEL_VALUES: usize = 1 << 15;

/// Runs `f(rows, out_rows)` over row ranges of `out` (rows of `row_len` values), split over
/// the pool when large. Rows are independent, so the split never changes a result.
fn rows_parallel(out: &mut [f32], row_len: usize, f: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    let rows = out.len() / row_len;
    if out.len() < PARALLEL_VALUES {
        return f(0..rows, out);
    }
    let out = DisjointWriter::new(out);
    crate::pool::pool().execute_chunked(rows, |range| {
        // SAFETY: the pool hands out disjoint ranges within `0..rows`.
        let chunk = unsafe { out.chunk(range.start * row_len, range.len() * row_len) };
        f(range, chunk)
    });
}
