//! PagedAttention on the CPU: attention that reads each sequence's keys and values straight out
//! of the block pool, following its block table, with no gather into a contiguous buffer.
//!
//! Every new token attends to the cached tokens at positions `0..=its own position` of its
//! sequence. Because a token's K/V is written before attention runs, this one rule covers a
//! whole prompt (causal within it), a prompt chunk on top of earlier chunks, and a decode token.
//! On a layer with a sliding window of `w`, the range starts at `position + 1 - w` instead, and
//! blocks wholly before it are not read at all.
//!
//! # Work split
//!
//! A work item is one sequence, one KV head and a tile of up to [`TILE_TOKENS`] of its new
//! tokens: all the query heads that share the KV head (grouped-query attention) for all tokens
//! of the tile. A token's query heads of the group ([`QueryGroup`]) go through the kernel
//! together, so each key and value is loaded once for all of them: a decode step streams the
//! pool once per KV head rather than once per query head. The tile's tokens then run one after
//! another over the same blocks, so a prompt chunk reuses each block from cache.
//!
//! # Keys are stored dimension-major
//!
//! Inside a block, a KV head's keys are laid out `[head_dim, block_size]` (values stay
//! `[block_size, head_dim]`; see [`KvLayout`]). One 512-bit load holds dimension `d` of 16
//! consecutive keys of a block, so a query's 16 scores accumulate lane by lane with
//! multiply-adds (the query value broadcast): no horizontal sum per key, which cost more
//! instructions than the products themselves.
//!
//! # Determinism
//!
//! A query row's arithmetic (its dot products, its softmax over exactly its own context, its
//! weighted sum of values in key order) depends only on that row and on block boundaries, which
//! are fixed positions: not on the tile or group it lands in, nor on what else is in the batch. So a sequence's output is bit-identical alone, batched, or
//! prefilled in chunks.

use std::cell::RefCell;

use minserve_core::StepBatch;

use crate::kv_cache::{KvElement, KvLayout, KvPool, LayerKv};
use crate::math::exp_minus_max;
use crate::pool::DisjointWriter;

mod query_group;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use query_group::QueryGroup;

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
    /// The layer's KV group: whose block tables hold its blocks.
    pub group: usize,
    pub plan: &'a AttentionPlan,
    pub num_heads: usize,
    pub scale: f32,
    /// The layer's sliding window (positions a token sees, itself included), if it has one.
    pub window: Option<usize>,
}

/// Per-worker buffers, kept across calls.
#[derive(Default)]
struct Scratch {
    /// A query group's scores, row after row, then their unnormalized softmax weights.
    scores: Vec<f32>,
    /// The portable kernel's widened block.
    block: Vec<f32>,
    /// The tile's blocks: (first key, offset of its run in the layer's pool).
    runs: Vec<(usize, usize)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Which kernel runs. Both compute the same attention; they differ in float rounding only (the
/// AVX-512 one fuses multiply-adds and sums a score's products in another order), and each is
/// deterministic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 F + F16C, for head sizes of 16, 32, 64 or 128 and blocks of a multiple of 16
    /// tokens: scores and
    /// output accumulators stay in registers, f16 values are widened as they are loaded.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    Portable,
}

impl Kernel {
    /// The fastest kernel for `head_dim` and `block_size` on this machine.
    pub fn best(head_dim: usize, block_size: usize) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if x86::supports(head_dim, block_size) {
            return Kernel::Avx512;
        }
        let _ = (head_dim, block_size);
        Kernel::Portable
    }
}

/// Attention of a group of query rows over its sequence's cached keys and values in `kv`, into
/// `out` (`num_rows * head_dim` values). `scores` is scratch space of at least
/// `num_rows * context` values.
pub fn attend_group(
    kernel: Kernel,
    kv: &LayerKv,
    group: &QueryGroup,
    scores: &mut [f32],
    block: &mut Vec<f32>,
    out: &mut [f32],
) {
    let head_dim = group.head_dim;
    let rows = group.num_rows();
    assert!(group.queries.len() == rows * head_dim && out.len() == rows * head_dim);
    assert!(scores.len() >= rows * group.context);
    assert!(group.start < group.context, "attention: an empty window");
    // The blocks holding keys `start..context`.
    let first = group
        .runs
        .iter()
        .take_while(|&&(first_key, _)| first_key + group.block_size <= group.start)
        .count();
    let end = group
        .runs
        .iter()
        .take_while(|&&(first_key, _)| first_key < group.context)
        .count();
    let runs = &group.runs[first..end];
    assert!(
        runs.first().is_some_and(|&(k, _)| k <= group.start)
            && runs
                .last()
                .is_some_and(|&(k, _)| k + group.block_size >= group.context),
        "attention: the block runs do not cover the visible keys"
    );
    assert!(
        runs.iter()
            .all(|&(_, start)| kv.holds_run(start, group.block_size, head_dim)),
        "attention: a block run lies outside the pool"
    );
    match (kernel, kv) {
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512, kv) => {
            assert!(
                x86::supports(head_dim, group.block_size),
                "attention: AVX-512 kernel not usable here"
            );
            // SAFETY: the CPU features and head size are checked just above; every run lies
            // inside the pool (asserted), `scores` and `out` are large enough (asserted).
            unsafe { x86::attend_group(kv, group, runs, scores, out) }
        }
        (Kernel::Portable, LayerKv::F16(pool)) => {
            portable_group(pool, group, runs, scores, block, out)
        }
        (Kernel::Portable, LayerKv::F32(pool)) => {
            portable_group(pool, group, runs, scores, block, out)
        }
        (Kernel::Portable, LayerKv::Q8(pool)) => {
            portable_group(pool, group, runs, scores, block, out)
        }
        (Kernel::Portable, LayerKv::Fp8(pool)) => {
            portable_group(pool, group, runs, scores, block, out)
        }
    }
}

/// [`attend_group`] in plain Rust, one row and one widened block at a time.
fn portable_group<T: KvElement>(
    pool: &KvPool<T>,
    group: &QueryGroup,
    runs: &[(usize, usize)],
    scores: &mut [f32],
    block: &mut Vec<f32>,
    out: &mut [f32],
) {
    let head_dim = group.head_dim;
    for (query, out) in group
        .queries
        .chunks_exact(head_dim)
        .zip(out.chunks_exact_mut(head_dim))
    {
        portable_row(pool, group, query, runs, scores, block, out);
    }
}

fn portable_row<T: KvElement>(
    pool: &KvPool<T>,
    group: &QueryGroup,
    query: &[f32],
    runs: &[(usize, usize)],
    scores: &mut [f32],
    block: &mut Vec<f32>,
    out: &mut [f32],
) {
    let head_dim = group.head_dim;
    block.resize(group.block_size * head_dim, 0.0);
    let block_size = group.block_size;
    // A scaled type's run at `start` has its scales at `start / head_dim` (see `KvLayout`).
    for &(first_key, start) in runs {
        // Keys are dimension-major: token t's dimension d is at `d * block_size + t`.
        let keys = T::widen(&pool.keys[start..start + block_size * head_dim], block);
        for t in group.visible(first_key) {
            let score = &mut scores[first_key + t];
            let key = keys[t..].iter().step_by(block_size);
            let mut dot = query.iter().zip(key).map(|(q, k)| q * k).sum::<f32>();
            if T::SCALED {
                dot *= pool.key_scales[start / head_dim + t];
            }
            *score = dot * group.scale;
        }
    }
    let sum = exp_minus_max(&mut scores[group.start..group.context]);
    out.fill(0.0);
    for &(first_key, start) in runs {
        let visible = group.visible(first_key);
        let values = T::widen(&pool.values[start..start + visible.end * head_dim], block);
        for t in visible {
            let (w, value) = (
                scores[first_key + t],
                &values[t * head_dim..(t + 1) * head_dim],
            );
            // The value's scale rides on its weight: one multiply instead of `head_dim`.
            let w = if T::SCALED {
                w * pool.value_scales[start / head_dim + t]
            } else {
                w
            };
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
        let kernel = Kernel::best(self.layout.head_dim, self.layout.block_size);
        crate::pool::pool().execute_chunked(self.plan.tiles.len(), |items| {
            SCRATCH.with(|scratch| {
                let scratch = &mut scratch.borrow_mut();
                for tile in &self.plan.tiles[items] {
                    self.attend_tile(kernel, tile, queries, &out, scratch);
                }
            })
        });
    }

    /// Every query head of `tile.kv_head`'s group, for every token of the tile. The tokens of a
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
        let block_table = self.batch.sequences[tile.sequence as usize].table(self.group);
        let first_token = tile.first_row as usize;
        // Positions grow along the tile, so its last token sees the most keys.
        let last_token = first_token + tile.num_rows as usize - 1;
        let max_context = self.batch.positions[last_token] as usize + 1;
        // Keys before the window of the tile's first token are read by none of its tokens.
        let first_visible = |position: u32| match self.window {
            Some(window) => (position as usize + 1).saturating_sub(window),
            None => 0,
        };
        let first_block = first_visible(self.batch.positions[first_token]) / layout.block_size;

        let Scratch {
            scores,
            block,
            runs,
        } = scratch;
        scores.resize(group * max_context, 0.0);
        runs.clear();
        runs.extend(
            block_table
                .iter()
                .enumerate()
                .take(max_context.div_ceil(layout.block_size))
                .skip(first_block)
                .map(|(i, &id)| {
                    (
                        i * layout.block_size,
                        layout.block_offset(id as usize, tile.kv_head as usize),
                    )
                }),
        );
        for token in first_token..=last_token {
            // Heads `kv_head * group..` of a token share this KV head, and sit side by side.
            let at = (token * self.num_heads + tile.kv_head as usize * group) * head_dim;
            let len = group * head_dim;
            let queries = QueryGroup {
                queries: &queries[at..at + len],
                head_dim,
                start: first_visible(self.batch.positions[token]),
                context: self.batch.positions[token] as usize + 1,
                runs,
                block_size: layout.block_size,
                scale: self.scale,
            };
            // SAFETY: each (token, query head) belongs to exactly one tile, and each tile
            // to one worker, so no two live chunks overlap.
            let out = unsafe { out.chunk(at, len) };
            attend_group(kernel, self.kv, &queries, scores, block, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{KvCache, KvDtype};

    /// Every kernel, on every cache type, every supported head size and block sizes of one,
    /// two and four 16-token lanes' worth, against attention computed in f64 from the same
    /// (rounded) cached values, over contexts that end inside a block, at a block edge, and
    /// past several scattered blocks, seen whole or from a window start inside a block.
    #[test]
    fn every_kernel_matches_f64_attention() {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if x86::supports(64, 16) {
            kernels.push(Kernel::Avx512);
        }
        let mut seed = 1u64;
        let mut random = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for (head_dim, dtype, block_size) in [16usize, 32, 64, 128, 24]
            .into_iter()
            .flat_map(|h| {
                [KvDtype::F16, KvDtype::F32, KvDtype::Q8, KvDtype::Fp8].map(move |d| (h, d))
            })
            .flat_map(|(h, d)| [16usize, 32, 64].map(move |b| (h, d, b)))
        {
            {
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
                cache.pools[0].write(&layout, &k, &v, &slots);
                // What the cache holds, widened: q8 rows (one per token and KV head) come back
                // as their i8 codes times the row's absmax / 127.
                let cached = |x: &[f32]| -> Vec<f64> {
                    x.chunks_exact(head_dim)
                        .flat_map(|row| {
                            let absmax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                            let scale = absmax / 127.0;
                            let fp8_scale = absmax / 448.0;
                            row.iter().map(move |&x| match dtype {
                                KvDtype::F16 => half::f16::from_f32(x).to_f32() as f64,
                                KvDtype::F32 => x as f64,
                                KvDtype::Q8 if scale == 0.0 => 0.0,
                                KvDtype::Q8 => (x / scale).round() as f64 * scale as f64,
                                KvDtype::Fp8 if fp8_scale == 0.0 => 0.0,
                                KvDtype::Fp8 => {
                                    let code = crate::e4m3::encode(x / fp8_scale);
                                    crate::e4m3::decode(code) as f64 * fp8_scale as f64
                                }
                            })
                        })
                        .collect()
                };
                let (cached_k, cached_v) = (cached(&k), cached(&v));
                let runs: Vec<(usize, usize)> = table
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| (i * block_size, layout.block_offset(b as usize, 1)))
                    .collect();
                // Five query heads: the AVX-512 kernel takes at most four (two for head size
                // 128) at once, so this also splits a group.
                const ROWS: usize = 5;
                let queries: Vec<f32> = (0..ROWS * head_dim).map(|_| random()).collect();
                let scale = 1.0 / (head_dim as f32).sqrt();
                let contexts = [1, 15, 16, 17, block_size + 20, context_max];
                let windows = contexts
                    .into_iter()
                    .flat_map(|context| [(0, context), (20.min(context - 1), context)]);
                for (start, context) in windows {
                    let at = |p: usize, d: usize| (p * 2 + 1) * head_dim + d;
                    let expected: Vec<f64> = queries
                        .chunks_exact(head_dim)
                        .flat_map(|query| {
                            let logits: Vec<f64> = (start..context)
                                .map(|p| {
                                    (0..head_dim)
                                        .map(|d| query[d] as f64 * cached_k[at(p, d)])
                                        .sum::<f64>()
                                        * scale as f64
                                })
                                .collect();
                            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let weights: Vec<f64> =
                                logits.iter().map(|l| (l - max).exp()).collect();
                            let total: f64 = weights.iter().sum();
                            (0..head_dim)
                                .map(|d| {
                                    (start..context)
                                        .map(|p| weights[p - start] * cached_v[at(p, d)])
                                        .sum::<f64>()
                                        / total
                                })
                                .collect::<Vec<f64>>()
                        })
                        .collect();
                    for &kernel in &kernels {
                        if kernel != Kernel::Portable && head_dim == 24 {
                            continue;
                        }
                        for rows in [1, 3, ROWS] {
                            let group = QueryGroup {
                                queries: &queries[..rows * head_dim],
                                head_dim,
                                start,
                                context,
                                runs: &runs,
                                block_size,
                                scale,
                            };
                            let mut scores = vec![0.0; rows * context];
                            let mut out = vec![0.0; rows * head_dim];
                            attend_group(
                                kernel,
                                &cache.pools[0],
                                &group,
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
                            "{kernel:?} {dtype:?} head {head_dim} block {block_size} keys {start}..{context} rows {rows}: off by {worst}"
                        );
                        }
                    }
                }
            }
        }
    }
}
