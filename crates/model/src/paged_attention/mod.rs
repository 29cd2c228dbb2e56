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
//! of the tile. Each cached key or value is loaded (and widened from f16) once per item and used
//! by every query row of the tile, so a decode step streams the pool once per KV head rather
//! than once per query head, and a prompt chunk reuses each block across its tokens.
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
    /// `[query row][key]`: scores, then unnormalized softmax weights.
    scores: Vec<f32>,
    /// One block of one head widened to f32.
    block: Vec<f32>,
    /// Per query row: the sum of its softmax weights.
    sums: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl PagedAttention<'_> {
    /// `queries` and `out` are `[tokens, num_heads, head_dim]`.
    pub fn run(&self, queries: &[f32], out: &mut [f32]) {
        let out = DisjointWriter::new(out);
        crate::pool::pool().execute_chunked(self.plan.tiles.len(), |items| {
            SCRATCH.with(|scratch| {
                let scratch = &mut scratch.borrow_mut();
                for tile in &self.plan.tiles[items] {
                    match self.kv {
                        LayerKv::F16(pool) => self.attend_tile(pool, tile, queries, &out, scratch),
                        LayerKv::F32(pool) => self.attend_tile(pool, tile, queries, &out, scratch),
                    }
                }
            })
        });
    }

    /// Every query head of `tile.kv_head`'s group, for every token of the tile.
    fn attend_tile<T: KvElement>(
        &self,
        pool: &KvPool<T>,
        tile: &Tile,
        queries: &[f32],
        out: &DisjointWriter,
        scratch: &mut Scratch,
    ) {
        let layout = self.layout;
        let (head_dim, block_size) = (layout.head_dim, layout.block_size);
        let group = self.num_heads / layout.num_kv_heads;
        let block_table = &self.batch.sequences[tile.sequence as usize].block_table;
        let first_row = tile.first_row as usize;
        let rows = tile.num_rows as usize * group;
        // Query row `r` is head `kv_head * group + r % group` of token `first_row + r / group`;
        // those heads are adjacent in memory, so the tile's rows of one token are one run.
        let offset = |r: usize| {
            let token = first_row + r / group;
            (token * self.num_heads + tile.kv_head as usize * group + r % group) * head_dim
        };
        let context = |r: usize| self.batch.positions[first_row + r / group] as usize + 1;
        // Positions grow along the tile, so its last token sees the most keys.
        let stride = context(rows - 1);

        let Scratch {
            scores,
            block,
            sums,
        } = scratch;
        scores.resize(rows * stride, 0.0);
        block.resize(block_size * head_dim, 0.0);
        let blocks = || {
            block_table
                .iter()
                .take(stride.div_ceil(block_size))
                .enumerate()
                .map(|(i, &id)| {
                    let first_key = i * block_size;
                    let len = (stride - first_key).min(block_size);
                    let start = layout.block_offset(id as usize, tile.kv_head as usize);
                    (first_key, start..start + len * head_dim)
                })
        };

        for (first_key, range) in blocks() {
            let keys = T::widen(&pool.keys[range], block);
            for r in 0..rows {
                let visible = context(r).saturating_sub(first_key);
                let query = &queries[offset(r)..offset(r) + head_dim];
                let row_scores = &mut scores[r * stride + first_key..];
                for (score, key) in row_scores
                    .iter_mut()
                    .zip(keys.chunks_exact(head_dim).take(visible))
                {
                    *score = dot(query, key) * self.scale;
                }
            }
        }

        sums.clear();
        sums.resize(rows, 0.0);
        for (r, sum) in sums.iter_mut().enumerate() {
            *sum = exp_minus_max(&mut scores[r * stride..r * stride + context(r)]);
        }
        for r in 0..rows {
            // SAFETY: each (token, query head) belongs to exactly one tile, and each tile to
            // one worker, so no two live chunks overlap.
            unsafe { out.chunk(offset(r), head_dim) }.fill(0.0);
        }
        for (first_key, range) in blocks() {
            let values = T::widen(&pool.values[range], block);
            for r in 0..rows {
                if context(r) <= first_key {
                    continue;
                }
                let weights = &scores[r * stride + first_key..r * stride + context(r)];
                // SAFETY: as above.
                let acc = unsafe { out.chunk(offset(r), head_dim) };
                for (&w, value) in weights.iter().zip(values.chunks_exact(head_dim)) {
                    for (a, &v) in acc.iter_mut().zip(value) {
                        *a += w * v;
                    }
                }
            }
        }
        for (r, &sum) in sums.iter().enumerate() {
            let inverse = 1.0 / sum;
            // SAFETY: as above.
            for a in unsafe { out.chunk(offset(r), head_dim) } {
                *a *= inverse;
            }
        }
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
