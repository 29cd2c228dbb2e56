//! PagedAttention on the CPU: attention that reads each sequence's keys and values straight out
//! of the block pool, following its block table, with no gather into a contiguous buffer.
//!
//! Every new token attends to the cached tokens at positions `0..=its own position` of its
//! sequence. Because a token's K/V is written before attention runs, this one rule covers a
//! whole prompt (causal within it), a prompt chunk on top of earlier chunks, and a decode token.
//!
//! # Work split
//!
//! A work item is one sequence, one KV head and a tile of up to [`TILE_TOKENS`] of its new
//! tokens: all the query heads that share the KV head (grouped-query attention) for all tokens
//! of the tile. The tile's query rows run one after another over the same blocks, so only the
//! first reads them from memory: a decode step streams the pool once per KV head rather than
//! once per query head, and a prompt chunk reuses each block across its tokens.
//!
//! # Determinism
//!
//! A query row's arithmetic (its dot products, its softmax over exactly its own context, its
//! weighted sum of values in key order) depends only on that row: not on the tile it lands in,
//! nor on what else is in the batch. So a sequence's output is bit-identical alone, batched, or
//! prefilled in chunks.

use std::cell::RefCell;

use minserve_core::StepBatch;

use crate::kv_cache::{KvElement, KvLayout, KvPool, LayerKv};
use crate::math::{dot, exp_minus_max};
use crate::pool::DisjointWriter;

#[cfg(target_arch = "x86_64")]
mod x86;

/// New tokens per work item: enough query rows to reuse each loaded key block from L1, few
/// enough that a long prompt chunk still splits into many items for the thread pool.
const TILE_TOKENS: usize = 16;

/// One work item: tokens `first_row..first_row + num_rows` of the flat batch, all of
/// sequence `sequence`, against KV head `kv_head`.
#[derive(Debug, Clone, Copy)]
struct Tile {
    sequence: u32,
    kv_head: u32,
    first_row: u32,
    num_rows: u32,
}

/// The work items of a step, computed once and shared by every layer.
pub struct AttentionPlan {
    tiles: Vec<Tile>,
}

impl AttentionPlan {
    pub fn new(batch: &StepBatch, num_kv_heads: usize) -> Self {
        let mut tiles = Vec::new();
        let mut first_row = 0;
        for (sequence, chunk) in batch.sequences.iter().enumerate() {
            for start in (0..chunk.num_new_tokens).step_by(TILE_TOKENS) {
                let num_rows = TILE_TOKENS.min(chunk.num_new_tokens - start);
                for kv_head in 0..num_kv_heads {
                    tiles.push(Tile {
                        sequence: sequence as u32,
                        kv_head: kv_head as u32,
                        first_row: (first_row + start) as u32,
                        num_rows: num_rows as u32,
                    });
                }
            }
            first_row += chunk.num_new_tokens;
        }
        // Longest contexts first, so that the pool's last grabs are the cheap tiles.
        tiles.sort_by_key(|t| std::cmp::Reverse(batch.positions[t.first_row as usize]));
        Self { tiles }
    }
}

/// Attention of one layer for every new token of a step.
pub struct PagedAttention<'a> {
    pub kv: &'a LayerKv,
    pub layout: &'a KvLayout,
    pub batch: &'a StepBatch,
    pub plan: &'a AttentionPlan,
    pub num_heads: usize,
    pub scale: f32,
}

/// Per-worker buffers, kept across calls.
#[derive(Default)]
struct Scratch {
    /// One query row's scores, then its unnormalized softmax weights.
    scores: Vec<f32>,
    /// The portable kernel's widened block.
    block: Vec<f32>,
    /// The tile's blocks: (first key, offset of its run in the layer's pool).
    runs: Vec<(usize, usize)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Which row kernel runs. Both compute the same attention; they differ in float rounding only
/// (the AVX-512 one fuses multiply-adds), and each is deterministic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 F + F16C, for head sizes of 16, 32, 64 or 128: the query and the output
    /// accumulators stay in registers, f16 values are widened as they are loaded.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    Portable,
}

impl Kernel {
    /// The fastest kernel for `head_dim` on this machine.
    pub fn best(head_dim: usize) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if x86::supports(head_dim) {
            return Kernel::Avx512;
        }
        let _ = head_dim;
        Kernel::Portable
    }
}

/// One query row's inputs: everything [`attend_row`] needs besides the pool.
pub struct Row<'a> {
    pub query: &'a [f32],
    /// Keys visible to the row: positions `0..context`.
    pub context: usize,
    /// (first key, offset in the pool) of each block, covering at least `context` keys.
    pub runs: &'a [(usize, usize)],
    pub block_size: usize,
    pub scale: f32,
}

/// Attention of one query row over its sequence's cached keys and values in `kv`, into `out`
/// (`head_dim` values). `scores` is scratch space of at least `row.context` values.
pub fn attend_row(
    kernel: Kernel,
    kv: &LayerKv,
    row: &Row,
    scores: &mut [f32],
    block: &mut Vec<f32>,
    out: &mut [f32],
) {
    let head_dim = row.query.len();
    assert!(out.len() == head_dim && scores.len() >= row.context);
    let runs = &row.runs[..row.context.div_ceil(row.block_size)];
    let pool_len = match kv {
        LayerKv::F16(pool) => pool.keys.len().min(pool.values.len()),
        LayerKv::F32(pool) => pool.keys.len().min(pool.values.len()),
    };
    assert!(
        runs.iter()
            .all(|&(_, start)| start + row.block_size * head_dim <= pool_len),
        "attention: a block run lies outside the pool"
    );
    match (kernel, kv) {
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, kv) => {
            assert!(
                x86::supports(head_dim),
                "attention: AVX-512 kernel not usable here"
            );
            // SAFETY: the CPU features and head size are checked just above; every run lies
            // inside the pool (asserted) and `scores` holds `context` values.
            unsafe { x86::attend_row(kv, row, runs, scores, out) }
        }
        (Kernel::Portable, LayerKv::F16(pool)) => portable_row(pool, row, runs, scores, block, out),
        (Kernel::Portable, LayerKv::F32(pool)) => portable_row(pool, row, runs, scores, block, out),
    }
}

/// [`attend_row`] in plain Rust, one widened block at a time.
fn portable_row<T: KvElement>(
    pool: &KvPool<T>,
    row: &Row,
    runs: &[(usize, usize)],
    scores: &mut [f32],
    block: &mut Vec<f32>,
    out: &mut [f32],
) {
    let head_dim = row.query.len();
    block.resize(row.block_size * head_dim, 0.0);
    let visible = |first_key: usize| (row.context - first_key).min(row.block_size);
    for &(first_key, start) in runs {
        let n = visible(first_key);
        let keys = T::widen(&pool.keys[start..start + n * head_dim], block);
        for (score, key) in scores[first_key..]
            .iter_mut()
            .zip(keys.chunks_exact(head_dim))
        {
            *score = dot(row.query, key) * row.scale;
        }
    }
    let sum = exp_minus_max(&mut scores[..row.context]);
    out.fill(0.0);
    for &(first_key, start) in runs {
        let n = visible(first_key);
        let values = T::widen(&pool.values[start..start + n * head_dim], block);
        for (&w, value) in scores[first_key..]
            .iter()
            .zip(values.chunks_exact(head_dim))
        {
            for (o, &v) in out.iter_mut().zip(value) {
                *o += w * v;
            }
        }
    }
    let inverse = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inverse;
    }
}

impl PagedAttention<'_> {
    /// `queries` and `out` are `[tokens, num_heads, head_dim]`.
    pub fn run(&self, queries: &[f32], out: &mut [f32]) {
        let out = DisjointWriter::new(out);
        let kernel = Kernel::best(self.layout.head_dim);
        crate::pool::pool().execute_chunked(self.plan.tiles.len(), |items| {
            SCRATCH.with(|scratch| {
                let scratch = &mut scratch.borrow_mut();
                for tile in &self.plan.tiles[items] {
                    self.attend_tile(kernel, tile, queries, &out, scratch);
                }
            })
        });
    }

    /// Every query head of `tile.kv_head`'s group, for every token of the tile. The rows of a
    /// tile read the same blocks one after another, so all but the first find them in cache.
    fn attend_tile(
        &self,
        kernel: Kernel,
        tile: &Tile,
        queries: &[f32],
        out: &DisjointWriter<'_>,
        scratch: &mut Scratch,
    ) {
        let layout = self.layout;
        let head_dim = layout.head_dim;
        let group = self.num_heads / layout.num_kv_heads;
        let block_table = &self.batch.sequences[tile.sequence as usize].block_table;
        let first_token = tile.first_row as usize;
        // Positions grow along the tile, so its last token sees the most keys.
        let last_token = first_token + tile.num_rows as usize - 1;
        let max_context = self.batch.positions[last_token] as usize + 1;

        let Scratch {
            scores,
            block,
            runs,
        } = scratch;
        scores.resize(max_context, 0.0);
        runs.clear();
        runs.extend(
            block_table
                .iter()
                .take(max_context.div_ceil(layout.block_size))
                .enumerate()
                .map(|(i, &id)| {
                    (
                        i * layout.block_size,
                        layout.block_offset(id as usize, tile.kv_head as usize),
                    )
                }),
        );
        for token in first_token..=last_token {
            for head in 0..group {
                // Heads `kv_head * group..` of a token share this KV head.
                let head = tile.kv_head as usize * group + head;
                let at = (token * self.num_heads + head) * head_dim;
                let row = Row {
                    query: &queries[at..at + head_dim],
                    context: self.batch.positions[token] as usize + 1,
                    runs,
                    block_size: layout.block_size,
                    scale: self.scale,
                };
                // SAFETY: each (token, query head) belongs to exactly one tile, and each tile
                // to one worker, so no two live chunks overlap.
                let out = unsafe { out.chunk(at, head_dim) };
                attend_row(kernel, self.kv, &row, scores, block, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{KvCache, KvDtype};

    /// Every kernel, on both cache types and every supported head size, against attention
    /// computed in f64 from the same (rounded) cached values, over contexts that end inside a
    /// block, at a block edge, and past several scattered blocks.
    #[test]
    fn every_kernel_matches_f64_attention() {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if x86::supports(64) {
            kernels.push(Kernel::Avx512);
        }
        let mut seed = 1u64;
        let mut random = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for head_dim in [16usize, 32, 64, 128, 24] {
            for dtype in [KvDtype::F16, KvDtype::F32] {
                let block_size = 16;
                let config = crate::config::ModelConfig {
                    num_layers: 1,
                    num_kv_heads: 2,
                    head_dim,
                    ..crate::synthetic::preset("tiny").unwrap()
                };
                let mut cache = KvCache::new(&config, dtype, block_size, 8);
                let layout = cache.layout;
                let context_max = 5 * block_size + 3;
                // Scattered physical blocks for one sequence; KV head 1 is the one read.
                let table = [6u32, 2, 7, 0, 5, 3];
                let k: Vec<f32> = (0..context_max * 2 * head_dim).map(|_| random()).collect();
                let v: Vec<f32> = (0..context_max * 2 * head_dim).map(|_| random()).collect();
                let slots: Vec<u32> = (0..context_max)
                    .map(|p| table[p / block_size] * block_size as u32 + (p % block_size) as u32)
                    .collect();
                cache.layers[0].write(&layout, &k, &v, &slots);
                let cached = |x: f32| match dtype {
                    KvDtype::F16 => half::f16::from_f32(x).to_f32() as f64,
                    KvDtype::F32 => x as f64,
                };
                let runs: Vec<(usize, usize)> = table
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| (i * block_size, layout.block_offset(b as usize, 1)))
                    .collect();
                let query: Vec<f32> = (0..head_dim).map(|_| random()).collect();
                let scale = 1.0 / (head_dim as f32).sqrt();
                for context in [1, 15, 16, 17, context_max] {
                    let at = |p: usize, d: usize| (p * 2 + 1) * head_dim + d;
                    let logits: Vec<f64> = (0..context)
                        .map(|p| {
                            (0..head_dim)
                                .map(|d| query[d] as f64 * cached(k[at(p, d)]))
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    let expected: Vec<f64> = (0..head_dim)
                        .map(|d| {
                            (0..context)
                                .map(|p| weights[p] * cached(v[at(p, d)]))
                                .sum::<f64>()
                                / total
                        })
                        .collect();
                    for &kernel in &kernels {
                        if kernel != Kernel::Portable && head_dim == 24 {
                            continue;
                        }
                        let row = Row {
                            query: &query,
                            context,
                            runs: &runs,
                            block_size,
                            scale,
                        };
                        let mut scores = vec![0.0; context];
                        let mut out = vec![0.0; head_dim];
                        attend_row(
                            kernel,
                            &cache.layers[0],
                            &row,
                            &mut scores,
                            &mut Vec::new(),
                            &mut out,
                        );
                        let worst = out
                            .iter()
                            .zip(&expected)
                            .map(|(&o, &e)| (o as f64 - e).abs())
                            .fold(0.0, f64::max);
                        assert!(
                            worst < 1e-5,
                            "{kernel:?} {dtype:?} head {head_dim} context {context}: off by {worst}"
                        );
                    }
                }
            }
        }
    }
}
