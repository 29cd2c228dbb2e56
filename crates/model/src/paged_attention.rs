//! PagedAttention on the CPU: attention that reads each sequence's keys and values straight out
//! of the block pool, following its block table, with no gather into a contiguous buffer.
//!
//! Every new token attends to the cached tokens at positions `0..=its own position` of its
//! sequence. Because a token's K/V is written before attention runs, this one rule covers a
//! whole prompt (causal within it), a prompt chunk on top of earlier chunks, and a decode token.
//!
//! Work is split over (token, query head) pairs across the thread pool. Each pair's arithmetic is
//! the same whatever else is in the batch, so a sequence's output is bit-identical alone, batched,
//! or prefilled in chunks.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use minserve_core::StepBatch;

use crate::kv_cache::{KvLayout, LayerKv};

/// Attention of one layer for every new token of a step, as a candle op on the queries
/// (`[tokens, num_heads * head_dim]`, RoPE applied). Output has the same shape.
pub struct PagedAttention<'a> {
    pub kv: &'a LayerKv,
    pub layout: &'a KvLayout,
    pub batch: &'a StepBatch,
    /// Which entry of `batch.sequences` each token row belongs to.
    pub row_sequence: &'a [u32],
    pub num_heads: usize,
    pub scale: f32,
}

impl CustomOp1 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "minserve-paged-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let queries = crate::tensor_util::contiguous_f32(storage, layout)?;
        let head_dim = self.layout.head_dim;
        if queries.len() != self.batch.num_tokens() * self.num_heads * head_dim {
            candle_core::bail!("paged attention: queries do not match the batch");
        }
        let mut out = vec![0f32; queries.len()];
        self.run(queries, &mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

impl PagedAttention<'_> {
    /// `queries` and `out` are `[tokens, num_heads, head_dim]`.
    pub fn run(&self, queries: &[f32], out: &mut [f32]) {
        let head_dim = self.layout.head_dim;
        let heads_per_kv = self.num_heads / self.layout.num_kv_heads;
        let out = DisjointWriter::new(out);
        // candle's own pool, not rayon's: candle keeps its workers spinning between ops, and a
        // second pool on the same cores makes both crawl.
        candle_core::utils::barrier_pool().execute_chunked(queries.len() / head_dim, |items| {
            let mut scores = Vec::new();
            for index in items {
                let token = index / self.num_heads;
                let kv_head = (index % self.num_heads) / heads_per_kv;
                let sequence = &self.batch.sequences[self.row_sequence[token] as usize];
                let context = self.batch.positions[token] as usize + 1;
                let query = &queries[index * head_dim..(index + 1) * head_dim];
                // SAFETY: each index is handed to exactly one worker, so the chunks written
                // never overlap.
                let out = unsafe { out.chunk(index * head_dim, head_dim) };
                self.attend_one(
                    query,
                    kv_head,
                    &sequence.block_table,
                    context,
                    &mut scores,
                    out,
                );
            }
        });
    }

    /// One query head of one token against the first `context` cached tokens of its sequence.
    fn attend_one(
        &self,
        query: &[f32],
        kv_head: usize,
        block_table: &[u32],
        context: usize,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let layout = self.layout;
        let head_dim = layout.head_dim;
        // (start of a block's run for this head, how many of its tokens are in context)
        let runs = block_table
            .iter()
            .enumerate()
            .take(context.div_ceil(layout.block_size))
            .map(|(i, &block)| {
                let len = (context - i * layout.block_size).min(layout.block_size);
                (layout.block_offset(block as usize, kv_head), len * head_dim)
            });

        scores.clear();
        for (start, len) in runs.clone() {
            for key in self.kv.keys[start..start + len].chunks_exact(head_dim) {
                scores.push(dot(query, key) * self.scale);
            }
        }
        softmax_in_place(scores);

        out.fill(0.0);
        let mut weights = scores.iter();
        for (start, len) in runs {
            for (value, &w) in self.kv.values[start..start + len]
                .chunks_exact(head_dim)
                .zip(&mut weights)
            {
                for (o, &v) in out.iter_mut().zip(value) {
                    *o += w * v;
                }
            }
        }
    }
}

/// Dot product with eight independent partial sums, so that the compiler can keep them in one
/// SIMD register; the summation order is fixed, which keeps results deterministic.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() / 8 * 8);
    let (b8, b_tail) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for lane in 0..8 {
            acc[lane] += x[lane] * y[lane];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

/// Numerically stable softmax: subtract the max before exponentiating.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Lets pool workers write disjoint parts of one output buffer.
struct DisjointWriter {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: callers of `chunk` guarantee that no two live chunks overlap.
unsafe impl Sync for DisjointWriter {}

impl DisjointWriter {
    fn new(buf: &mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// # Safety
    /// No other live chunk may overlap `start..start + len`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn chunk(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.len, "chunk out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}
