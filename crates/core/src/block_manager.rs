//! The KV block manager: which physical cache blocks each sequence uses, shared where prompts
//! share a prefix or a request's samples share their prompt.
//!
//! The model's KV cache is a fixed pool of blocks of `block_size` tokens (PagedAttention). This
//! module only does the bookkeeping; it never touches tensors. When a sequence needs a block's
//! contents duplicated (copy-on-write, below), it records the copy and the model performs it.
//!
//! * **Reference counts.** A block is used by as many sequences as have it in their block
//!   table. A block whose count drops to zero becomes free.
//! * **KV groups and sliding windows (vLLM's hybrid allocator).** The model's layers are split
//!   into *KV groups* of equally many layers, all layers of a group with the same attention
//!   span: global, or a sliding window of `w` positions (Gemma 3 270M: 18 layers = 1 group of
//!   its 3 global layers + 5 groups of 3 of its 15 local ones). A physical block holds one
//!   block of tokens for the layers of one group, so blocks of every group cost the same and
//!   come from one pool, and one free count serves admission and preemption. Each sequence has
//!   one block table per group, all of the same logical length. In a sliding-window group, a
//!   block that lies wholly before the window of the next token to compute is never read
//!   again: [`allocate_slots`](BlockManager::allocate_slots) *releases* it (back to the pool,
//!   its table entry becomes [`RELEASED_BLOCK`]), so a long sequence holds about `w /
//!   block_size + 1` blocks per local group instead of its whole length. A model without
//!   windows has one group and nothing of this shows.
//! * **Automatic prefix caching.** Once a block is full its content is fixed, so it is
//!   registered under a hash of its tokens chained with its parent block's hash (and its
//!   group): equal hashes mean equal prefixes up to and including that block. A new sequence
//!   reuses the registered blocks of its longest cached prefix instead of computing them again
//!   (tokens are compared too, so a hash collision can never serve wrong K/V). A global group
//!   needs every block of the prefix; a sliding-window group only the blocks that the window of
//!   the first token after the prefix reaches, and those must still be cached (released blocks
//!   wait in the free queue like any other, so a recent prefix often still is): the prefix
//!   reused is the longest that every group can serve.
//! * **Registered once the step is taken.** A block is registered when the step that fills it
//!   has been scheduled in full ([`take_block_copies`](BlockManager::take_block_copies) ends a
//!   step), never while the step is being assembled: a second sequence admitted in the same
//!   step (the same prompt twice in one batch) computes its own copy rather than adopting a
//!   block not yet written.
//! * **LRU eviction.** Freed blocks keep their content and registration while they wait in the
//!   free queue, so a later request can still hit them. When a fresh block is needed and no
//!   block without a cached prefix is free, it is taken from the front of the queue, the
//!   block freed longest ago, which loses its registration then.
//! * **Conversation sessions are evicted last.** The cached blocks a sessioned sequence
//!   ([`Sequence::keep_cached`]: a request with a session id) frees wait in a queue of their
//!   own, ordered by when their time to live runs out. They are evicted only once no other
//!   cached block is free, except those whose time to live has passed, which go first. So a
//!   multi-turn chat finds its earlier turns cached at its next turn although other traffic
//!   churns through the cache meanwhile (see docs/tenants.md).
//! * **Most recently freed first, for blocks without a cached prefix.** A free block that holds
//!   no registered prefix (a partial block, a block of a failed step, any block with prefix
//!   caching off) has nothing worth keeping: these are reused before any cached block is
//!   evicted, the one freed last first. The same few blocks then serve request after request,
//!   so the pages of the KV pool that are ever touched stay few (the pool is allocated up front
//!   but the operating system only backs the pages written), and a server's memory stays near
//!   what its peak load needed instead of creeping up to the whole pool.
//! * **Forking and copy-on-write (vLLM v0).** The `n` samples of one request share their whole
//!   prompt: once the first sample has computed it, [`fork`](BlockManager::fork) gives each
//!   other sample the same block tables, the last, partial block included. Full blocks are
//!   never written again, so they stay shared. The partial block is where every sample writes
//!   its next token, so [`allocate_slots`](BlockManager::allocate_slots) gives a sequence about
//!   to write into a block that others still use a fresh block of its own and records a copy
//!   `(src, dst)`; the scheduler hands the step's copies to the model
//!   ([`StepBatch::block_copies`]), which performs them, in order, before it writes any K/V. The
//!   last sample to write finds the block its own and writes in place.
//! * **Shared blocks are never written, released blocks never read.** No step writes into a
//!   block whose reference count is above one, and every block a step's attention reads (the
//!   window of each new token, in every group) is held
//!   ([`check_step`](BlockManager::check_step)).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::time::Instant;

use crate::batch::{BlockCopy, StepBatch};
pub use crate::sequence::RELEASED_BLOCK;
use crate::sequence::{BlockHash, Sequence};

fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

/// A KV group's index among the groups of a [`BlockManager`].
pub type KvGroup = usize;

#[derive(Debug, Clone, Default)]
struct Block {
    ref_count: u32,
    /// Set while the block is registered in the prefix cache (it is full): its group and hash.
    key: Option<(KvGroup, BlockHash)>,
    /// The tokens whose K/V the block holds, kept to verify prefix-cache hits.
    tokens: Vec<u32>,
    /// Where the block waits while `ref_count == 0`.
    free: Option<FreeList>,
}

/// The two lists a free block waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FreeList {
    /// Holds a cached prefix: in the LRU queue, at this position.
    Cached(u64),
    /// Holds nothing worth keeping: on the stack of blocks reused most recently freed first.
    Uncached,
    /// Holds a session's cached prefix, kept until this time: in the session queue.
    Session(Instant, u64),
}

/// What one physical block is doing, for the live block map (`live.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Free, holding nothing worth keeping.
    Free,
    /// Free, but still holding a registered prefix that a new request may hit.
    Cached,
    /// Held by this many sequences.
    Used(u32),
}

/// A cached prefix found for a sequence: blocks to reuse, in order, per KV group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CachedPrefix {
    /// One table per group, each as long as the prefix in blocks; a sliding-window group's
    /// holds [`RELEASED_BLOCK`] before the window of the first token after the prefix.
    pub tables: Vec<Vec<u32>>,
    pub hashes: Vec<BlockHash>,
}

impl CachedPrefix {
    /// Logical blocks the prefix covers.
    pub fn num_blocks(&self) -> usize {
        self.hashes.len()
    }
}

/// Counters for metrics and traces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up in the prefix cache.
    pub queried_tokens: u64,
    /// Of those, tokens found cached.
    pub hit_tokens: u64,
}

/// A block filled by the step being assembled, registered once that step is taken.
#[derive(Debug, Clone)]
struct PendingRegistration {
    group: KvGroup,
    hash: BlockHash,
    id: u32,
    tokens: Vec<u32>,
}

pub struct BlockManager {
    block_size: usize,
    /// The sliding window of each KV group, in positions; `None` for a global group.
    group_windows: Vec<Option<usize>>,
    blocks: Vec<Block>,
    /// Free blocks holding a cached prefix, by the time they were freed: the first is the least
    /// recently used.
    free_queue: BTreeMap<u64, u32>,
    /// Free blocks holding a session's cached prefix, by the end of their time to live (then
    /// the time they were freed): evicted after every block of `free_queue`, unless expired.
    session_queue: BTreeMap<(Instant, u64), u32>,
    /// Free blocks holding no cached prefix; the last was freed most recently.
    free_uncached: Vec<u32>,
    next_tick: u64,
    /// Registered full blocks by group and content hash.
    cached: HashMap<(KvGroup, BlockHash), u32>,
    prefix_caching: bool,
    stats: PrefixCacheStats,
    /// Copy-on-write copies made since the scheduler last took them, in the order made.
    pending_copies: Vec<BlockCopy>,
    /// Blocks the step being assembled fills; dropped if the block is freed before the step
    /// is taken (its sequence preempted), since its next owner writes other tokens.
    pending_registrations: Vec<PendingRegistration>,
}

impl BlockManager {
    /// A pool for a model with one KV group and no sliding window.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self::with_groups(num_blocks, block_size, prefix_caching, vec![None])
    }

    /// A pool shared by KV groups with these sliding windows (`None`: a global group), as the
    /// model's cache groups its layers.
    pub fn with_groups(
        num_blocks: usize,
        block_size: usize,
        prefix_caching: bool,
        group_windows: Vec<Option<usize>>,
    ) -> Self {
        assert!(block_size > 0, "block size must be positive");
        assert!(
            !group_windows.is_empty(),
            "a cache has at least one KV group"
        );
        assert!(
            group_windows.iter().all(|w| w != &Some(0)),
            "a sliding window covers at least one position"
        );
        let mut manager = Self {
            block_size,
            group_windows,
            blocks: vec![Block::default(); num_blocks],
            free_queue: BTreeMap::new(),
            session_queue: BTreeMap::new(),
            free_uncached: Vec::with_capacity(num_blocks),
            next_tick: 0,
            cached: HashMap::new(),
            prefix_caching,
            stats: PrefixCacheStats::default(),
            pending_copies: Vec::new(),
            pending_registrations: Vec::new(),
        };
        // Block 0 on top: a fresh pool hands its blocks out in order.
        for id in (0..num_blocks as u32).rev() {
            manager.push_free(id, None);
        }
        manager
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The sliding window of each KV group (`None`: global).
    pub fn group_windows(&self) -> &[Option<usize>] {
        &self.group_windows
    }

    pub fn num_groups(&self) -> usize {
        self.group_windows.len()
    }

    /// Blocks a new allocation can take (including cached blocks nobody uses).
    pub fn num_free_blocks(&self) -> usize {
        self.free_queue.len() + self.session_queue.len() + self.free_uncached.len()
    }

    /// Free blocks that still hold a registered prefix.
    pub fn num_cached_free_blocks(&self) -> usize {
        self.free_queue.len() + self.session_queue.len()
    }

    /// Fraction of blocks held by live sequences (cached but unused blocks count as free).
    pub fn usage(&self) -> f64 {
        let used = self.blocks.len() - self.num_free_blocks();
        used as f64 / self.blocks.len().max(1) as f64
    }

    /// Every block's state, in block order. Walks the whole pool: for a watcher's snapshot,
    /// never for scheduling.
    pub fn block_states(&self) -> impl Iterator<Item = BlockState> + '_ {
        self.blocks.iter().map(|block| match block.free {
            None => BlockState::Used(block.ref_count),
            Some(FreeList::Uncached) => BlockState::Free,
            Some(FreeList::Cached(_) | FreeList::Session(..)) => BlockState::Cached,
        })
    }

    /// How many sequences use block `id`.
    pub fn ref_count(&self, id: u32) -> u32 {
        self.blocks[id as usize].ref_count
    }

    pub fn stats(&self) -> PrefixCacheStats {
        self.stats
    }

    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// The first logical block of `group` that a token at `position` may read: the blocks
    /// before it lie wholly outside its window.
    pub fn first_needed_block(&self, group: KvGroup, position: usize) -> usize {
        match self.group_windows[group] {
            Some(window) => (position + 1).saturating_sub(window) / self.block_size,
            None => 0,
        }
    }

    /// The longest prefix of the sequence's full blocks that every KV group can serve from the
    /// cache: a global group every block of it, a sliding-window group the blocks the window of
    /// the first token after it reaches.
    ///
    /// At least the last prompt token is always left out, even when the whole prompt is
    /// cached: the model must compute something to produce logits to sample from.
    pub fn find_cached_prefix(&mut self, seq: &Sequence) -> CachedPrefix {
        if !self.prefix_caching {
            return CachedPrefix::default();
        }
        let cacheable_blocks = seq.len().saturating_sub(1) / self.block_size;
        let chunks: Vec<&[u32]> = seq
            .tokens
            .chunks(self.block_size)
            .take(cacheable_blocks)
            .collect();
        let mut hashes = Vec::with_capacity(chunks.len());
        let mut parent = None;
        for chunk in &chunks {
            let hash = hash_block(parent, chunk);
            hashes.push(hash);
            parent = Some(hash);
        }
        let lookup = |group: KvGroup, i: usize| -> Option<u32> {
            let &id = self.cached.get(&(group, hashes[i]))?;
            (self.blocks[id as usize].tokens == chunks[i]).then_some(id)
        };
        let mut hits: Vec<Vec<Option<u32>>> = Vec::with_capacity(self.num_groups());
        let mut len = chunks.len();
        for group in 0..self.num_groups() {
            let group_hits: Vec<Option<u32>> = match self.group_windows[group] {
                // A global group needs every block: its first miss ends the prefix.
                None => (0..len)
                    .map(|i| lookup(group, i))
                    .take_while(Option::is_some)
                    .collect(),
                Some(_) => (0..len).map(|i| lookup(group, i)).collect(),
            };
            if self.group_windows[group].is_none() {
                len = group_hits.len();
            }
            hits.push(group_hits);
        }
        // Shorten until each window group holds the blocks the next token reads.
        while len > 0 {
            let serves = |group: KvGroup| {
                let first = self.first_needed_block(group, len * self.block_size);
                hits[group][first..len].iter().all(Option::is_some)
            };
            if (0..self.num_groups()).all(serves) {
                break;
            }
            len -= 1;
        }
        let tables = (0..self.num_groups())
            .map(|group| {
                let first = self.first_needed_block(group, len * self.block_size);
                (0..len)
                    .map(|i| match i < first {
                        true => RELEASED_BLOCK,
                        false => hits[group][i].expect("checked above"),
                    })
                    .collect()
            })
            .collect();
        hashes.truncate(len);
        CachedPrefix { tables, hashes }
    }

    /// Makes room for `num_new_tokens` more tokens of `seq`, after first adopting `prefix`
    /// (from [`find_cached_prefix`](Self::find_cached_prefix)) for a sequence that has no
    /// blocks yet. Blocks of sliding-window groups that the window of the first new token has
    /// passed are released first (and count as room). A block these tokens land in that other
    /// sequences still use is replaced by a private copy (copy-on-write; the copy is recorded
    /// for the model, see [`take_block_copies`](Self::take_block_copies)). The blocks these
    /// tokens fill are registered for prefix reuse once the step is taken.
    ///
    /// Returns false, changing nothing, when there are not enough free blocks.
    pub fn allocate_slots(
        &mut self,
        seq: &mut Sequence,
        num_new_tokens: usize,
        prefix: Option<CachedPrefix>,
    ) -> bool {
        // Admissions (the calls that pass a prefix lookup) are what the hit rate counts; a
        // lookup for a sequence that then does not fit is not.
        let is_admission = prefix.is_some();
        let prefix = prefix.unwrap_or_default();
        debug_assert!(prefix.num_blocks() == 0 || seq.block_tables.is_empty());
        let computed = seq
            .num_computed_tokens
            .max(prefix.num_blocks() * self.block_size);
        let table_len = seq.num_logical_blocks() + prefix.num_blocks();
        let needed = self
            .blocks_for(computed + num_new_tokens)
            .saturating_sub(table_len);
        let written = self.held_blocks_written(seq, computed, num_new_tokens);
        let mut to_copy = 0;
        let mut released = 0;
        for (group, table) in seq.block_tables.iter().enumerate() {
            to_copy += written
                .clone()
                .filter(|&i| self.is_shared(table[i]))
                .count();
            released += self
                .releasable(group, table, computed)
                .filter(|&i| !self.is_shared(table[i]))
                .count();
        }
        // Reused blocks that sit in the free queue leave it, so they do not count as room.
        let reused_free = prefix
            .tables
            .iter()
            .flatten()
            .filter(|&&id| id != RELEASED_BLOCK && self.blocks[id as usize].ref_count == 0)
            .count();
        if needed * self.num_groups() + to_copy + reused_free > self.num_free_blocks() + released {
            return false;
        }

        if is_admission {
            self.stats.queried_tokens += seq.len() as u64;
            self.stats.hit_tokens += (prefix.num_blocks() * self.block_size) as u64;
        }
        if seq.block_tables.is_empty() {
            seq.block_tables = vec![Vec::new(); self.num_groups()];
        }
        for (table, prefix_table) in seq.block_tables.iter_mut().zip(&prefix.tables) {
            for &id in prefix_table {
                if id != RELEASED_BLOCK {
                    self.acquire(id);
                }
                table.push(id);
            }
        }
        seq.block_hashes.extend_from_slice(&prefix.hashes);
        seq.num_computed_tokens = computed;
        // Every group releases before any takes: what one releases is room for the others.
        for group in 0..self.num_groups() {
            for i in self.releasable(group, &seq.block_tables[group], computed) {
                let id = std::mem::replace(&mut seq.block_tables[group][i], RELEASED_BLOCK);
                self.release(id);
            }
        }
        for group in 0..self.num_groups() {
            for i in written.clone() {
                if self.is_shared(seq.block_tables[group][i]) {
                    self.copy_on_write(seq, group, i);
                }
            }
            for _ in 0..needed {
                let id = self.take_fresh_block();
                seq.block_tables[group].push(id);
            }
        }
        self.queue_full_blocks(seq, computed + num_new_tokens);
        true
    }

    /// Logical blocks of `table` (of `group`) still held that the window of the token at
    /// position `computed` has passed.
    fn releasable(&self, group: KvGroup, table: &[u32], computed: usize) -> std::ops::Range<usize> {
        let end = self.first_needed_block(group, computed).min(table.len());
        // Released blocks are always a leading run, and a step passes few new blocks: scan back.
        let start = table[..end]
            .iter()
            .rposition(|&id| id == RELEASED_BLOCK)
            .map_or(0, |last| last + 1);
        start..end
    }

    /// Logical blocks, among those `seq` already holds, that its tokens
    /// `computed..computed + num_new` are written into.
    fn held_blocks_written(
        &self,
        seq: &Sequence,
        computed: usize,
        num_new: usize,
    ) -> std::ops::Range<usize> {
        let first = computed / self.block_size;
        let end = self
            .blocks_for(computed + num_new)
            .min(seq.num_logical_blocks());
        first..end.max(first)
    }

    fn is_shared(&self, id: u32) -> bool {
        self.blocks[id as usize].ref_count > 1
    }

    /// Gives `seq` a private copy of its shared logical block `i` of `group`. Its K/V are only
    /// copied by the model, before the step writes, so the copy is queued for the scheduler to
    /// hand over.
    fn copy_on_write(&mut self, seq: &mut Sequence, group: KvGroup, i: usize) {
        let src = seq.block_tables[group][i];
        let dst = self.take_fresh_block();
        // Shared, so others still hold it: it never reaches the free queue here.
        self.blocks[src as usize].ref_count -= 1;
        seq.block_tables[group][i] = dst;
        self.pending_copies.push((src, dst));
    }

    /// The block copies that copy-on-write recorded since the last call, in the order they
    /// must be performed: a block freed after being copied from can be reused, as the
    /// destination of a later copy, within the same step. Called once per scheduled step, it
    /// also ends the step: the blocks the step fills are registered for prefix reuse now.
    pub fn take_block_copies(&mut self) -> Vec<BlockCopy> {
        for pending in std::mem::take(&mut self.pending_registrations) {
            let key = (pending.group, pending.hash);
            // A duplicate of an already registered block (two sequences computing the same
            // prefix at once) stays private; the first registration wins.
            if let std::collections::hash_map::Entry::Vacant(entry) = self.cached.entry(key) {
                entry.insert(pending.id);
                let block = &mut self.blocks[pending.id as usize];
                block.key = Some(key);
                block.tokens = pending.tokens;
            }
        }
        std::mem::take(&mut self.pending_copies)
    }

    /// The block whose contents `id` holds before this step runs: the source of a
    /// copy-on-write copy into `id` queued for this step, or `id` itself. A sequence preempted
    /// by swapping after it was scheduled in the same step has its K/V read from there, since
    /// swaps out happen before the step's copies.
    pub fn pre_step_block(&self, id: u32) -> u32 {
        self.pending_copies
            .iter()
            .rev()
            .find(|&&(_, dst)| dst == id)
            .map_or(id, |&(src, _)| src)
    }

    /// Takes `n` free blocks, each now held once (evicting cached prefixes as a new
    /// allocation would), or none when fewer are free: the device blocks a sequence swapped
    /// back in is given.
    pub fn take_blocks(&mut self, n: usize) -> Option<Vec<u32>> {
        (n <= self.num_free_blocks()).then(|| (0..n).map(|_| self.take_fresh_block()).collect())
    }

    /// Makes `child`, a sample of the same request as `parent` whose tokens so far are the
    /// same, share all of `parent`'s blocks and computed tokens: nothing is computed or copied
    /// now; the first write into a shared block copies it ([`allocate_slots`]).
    ///
    /// [`allocate_slots`]: Self::allocate_slots
    pub fn fork(&mut self, parent: &Sequence, child: &mut Sequence) {
        assert!(
            child.block_tables.is_empty(),
            "sequence {} is forked but already holds blocks",
            child.id
        );
        let computed = parent.num_computed_tokens;
        debug_assert_eq!(
            child.tokens.get(..computed),
            Some(&parent.tokens[..computed]),
            "a fork starts from its parent's computed tokens"
        );
        for &id in parent.block_tables.iter().flatten() {
            if id != RELEASED_BLOCK {
                self.acquire(id);
            }
        }
        child.block_tables.clone_from(&parent.block_tables);
        child.block_hashes.clone_from(&parent.block_hashes);
        child.num_computed_tokens = computed;
    }

    /// Returns all of a sequence's blocks. Blocks nobody else uses join the free queue, the
    /// sequence's last block first and group 0 (global, when the model has such layers) last,
    /// so that the tail of a prefix is evicted before its head (heads are what other requests
    /// share).
    pub fn free(&mut self, seq: &mut Sequence) {
        let keep_until = seq.keep_cached().map(|ttl| Instant::now() + ttl);
        for table in seq.block_tables.iter().rev() {
            for &id in table.iter().rev() {
                if id != RELEASED_BLOCK {
                    self.release_keeping(id, keep_until);
                }
            }
        }
        seq.block_tables.clear();
        seq.block_hashes.clear();
        seq.num_computed_tokens = 0;
    }

    /// Gives back the blocks of `seq` past its first `num_blocks` logical blocks, in every
    /// group: the blocks a step's rejected draft tokens were written into (speculative
    /// decoding). They were allocated by that step, so nobody else holds them and none is
    /// registered for prefix reuse (see [`queue_full_blocks`](Self::queue_full_blocks)).
    pub fn truncate(&mut self, seq: &mut Sequence, num_blocks: usize) {
        for table in &mut seq.block_tables {
            for id in table.drain(num_blocks.min(table.len())..).rev() {
                if id != RELEASED_BLOCK {
                    debug_assert!(
                        self.blocks[id as usize].key.is_none(),
                        "block {id} is cached"
                    );
                    self.release(id);
                }
            }
        }
        debug_assert!(seq.block_hashes.len() <= num_blocks);
    }

    /// Like [`free`](Self::free), but also forgets the registrations of blocks written by a
    /// step that failed, whose contents can no longer be trusted.
    pub fn free_and_forget(&mut self, seq: &mut Sequence) {
        for &id in seq.block_tables.iter().flatten() {
            if id != RELEASED_BLOCK && self.blocks[id as usize].ref_count == 1 {
                self.unregister(id);
            }
        }
        self.free(seq);
    }

    /// Queues for registration the blocks of `seq` that are full once its first `num_tokens`
    /// are computed (see [`take_block_copies`](Self::take_block_copies)).
    ///
    /// Only blocks of `seq.tokens` count: a step that verifies draft tokens (speculative
    /// decoding) writes K/V past them, and what it wrote there is only kept if the drafts are
    /// accepted, which makes them tokens; the blocks they fill are registered at the next step.
    fn queue_full_blocks(&mut self, seq: &mut Sequence, num_tokens: usize) {
        let full = (num_tokens.min(seq.len()) / self.block_size).min(seq.num_logical_blocks());
        while seq.block_hashes.len() < full {
            let i = seq.block_hashes.len();
            let tokens = &seq.tokens[i * self.block_size..(i + 1) * self.block_size];
            let hash = hash_block(seq.block_hashes.last().copied(), tokens);
            seq.block_hashes.push(hash);
            if !self.prefix_caching {
                continue;
            }
            for (group, table) in seq.block_tables.iter().enumerate() {
                if table[i] != RELEASED_BLOCK {
                    self.pending_registrations.push(PendingRegistration {
                        group,
                        hash,
                        id: table[i],
                        tokens: tokens.to_vec(),
                    });
                }
            }
        }
    }

    fn acquire(&mut self, id: u32) {
        let block = &mut self.blocks[id as usize];
        match block.free.take() {
            Some(FreeList::Cached(tick)) => {
                self.free_queue.remove(&tick);
            }
            // Only cached blocks are adopted, so this is never searched in practice.
            Some(FreeList::Uncached) => self.free_uncached.retain(|&b| b != id),
            Some(FreeList::Session(until, tick)) => {
                self.session_queue.remove(&(until, tick));
            }
            None => {}
        }
        block.ref_count += 1;
    }

    /// Drops one reference to block `id`; the last one frees it.
    fn release(&mut self, id: u32) {
        self.release_keeping(id, None);
    }

    /// [`release`](Self::release); a block freed with `keep_until` and a cached prefix is
    /// kept ahead of other cached blocks until then.
    fn release_keeping(&mut self, id: u32, keep_until: Option<Instant>) {
        let block = &mut self.blocks[id as usize];
        block.ref_count -= 1;
        if block.ref_count == 0 {
            self.push_free(id, keep_until);
        }
    }

    /// Takes the most recently freed block that holds no cached prefix, or else a session's
    /// block whose time to live has passed, or else the least recently freed cached one, or
    /// else the session block closest to its end, evicting its prefix.
    fn take_fresh_block(&mut self) -> u32 {
        let expired = self
            .session_queue
            .first_key_value()
            .is_some_and(|(&(until, _), _)| until <= Instant::now());
        let id = match self.free_uncached.pop() {
            Some(id) => id,
            None if expired => self.session_queue.pop_first().expect("checked").1,
            None => self
                .free_queue
                .pop_first()
                .map(|(_, id)| id)
                .or_else(|| self.session_queue.pop_first().map(|(_, id)| id))
                .expect("allocate_slots checked that enough blocks are free"),
        };
        self.blocks[id as usize].free = None;
        self.unregister(id);
        self.blocks[id as usize].ref_count = 1;
        id
    }

    fn unregister(&mut self, id: u32) {
        let block = &mut self.blocks[id as usize];
        if let Some(key) = block.key.take() {
            block.tokens.clear();
            if self.cached.get(&key) == Some(&id) {
                self.cached.remove(&key);
            }
        }
    }

    fn push_free(&mut self, id: u32, keep_until: Option<Instant>) {
        if !self.pending_registrations.is_empty() {
            self.pending_registrations.retain(|p| p.id != id);
        }
        // A copy into a block freed in the same step (its sequence preempted by a more urgent
        // one after being scheduled) has no reader left.
        if !self.pending_copies.is_empty() {
            self.pending_copies.retain(|&(_, dst)| dst != id);
        }
        let block = &mut self.blocks[id as usize];
        if let (Some(until), Some(_)) = (keep_until, block.key) {
            self.session_queue.insert((until, self.next_tick), id);
            block.free = Some(FreeList::Session(until, self.next_tick));
            self.next_tick += 1;
        } else if block.key.is_some() {
            self.free_queue.insert(self.next_tick, id);
            block.free = Some(FreeList::Cached(self.next_tick));
            self.next_tick += 1;
        } else {
            self.free_uncached.push(id);
            block.free = Some(FreeList::Uncached);
        }
    }

    /// Checks every invariant of the bookkeeping against the live sequences; for tests.
    pub fn check_invariants<'a>(&self, live: impl IntoIterator<Item = &'a Sequence>) {
        let mut refs = vec![0u32; self.blocks.len()];
        // The group whose tables hold each block: a block serves one group at a time.
        let mut group_of: HashMap<u32, KvGroup> = HashMap::new();
        // The computed tokens each block holds for the first sequence seen using it: every
        // other user must agree with them where both have computed.
        let mut contents: HashMap<u32, &[u32]> = HashMap::new();
        for seq in live {
            if seq.block_tables.is_empty() {
                assert_eq!(seq.num_computed_tokens, 0, "sequence {}", seq.id);
                continue;
            }
            assert_eq!(
                seq.block_tables.len(),
                self.num_groups(),
                "sequence {}",
                seq.id
            );
            assert!(
                seq.num_logical_blocks() * self.block_size >= seq.num_computed_tokens,
                "sequence {} has computed tokens outside its blocks",
                seq.id
            );
            let computed = &seq.tokens[..seq.num_computed_tokens];
            for (group, table) in seq.block_tables.iter().enumerate() {
                assert_eq!(table.len(), seq.num_logical_blocks(), "sequence {}", seq.id);
                // What the next token to compute reads must be held; only what lies wholly
                // before its window may be released.
                let first = self.first_needed_block(group, seq.num_computed_tokens);
                for (i, (&id, held)) in table
                    .iter()
                    .zip(computed.chunks(self.block_size))
                    .enumerate()
                {
                    if id == RELEASED_BLOCK {
                        assert!(
                            i < first,
                            "sequence {}: group {group} released block {i}, which its window still reads",
                            seq.id
                        );
                        continue;
                    }
                    let seen = *contents.entry(id).or_insert(held);
                    let common = seen.len().min(held.len());
                    assert_eq!(
                        seen[..common],
                        held[..common],
                        "block {id} is shared by sequences that disagree on its tokens"
                    );
                }
                for &id in table.iter().filter(|&&id| id != RELEASED_BLOCK) {
                    refs[id as usize] += 1;
                    let owner = *group_of.entry(id).or_insert(group);
                    assert_eq!(owner, group, "block {id} serves two KV groups");
                }
            }
        }
        let (mut used, mut free, mut cached) = (0, 0, 0);
        for (id, block) in self.blocks.iter().enumerate() {
            assert_eq!(block.ref_count, refs[id], "block {id}: reference count");
            match (block.free, block.ref_count) {
                (None, r) if r > 0 => used += 1,
                (Some(FreeList::Cached(tick)), 0) => {
                    assert_eq!(self.free_queue.get(&tick), Some(&(id as u32)));
                    assert!(block.key.is_some(), "block {id}: cached without a prefix");
                    cached += 1;
                }
                (Some(FreeList::Session(until, tick)), 0) => {
                    assert_eq!(self.session_queue.get(&(until, tick)), Some(&(id as u32)));
                    assert!(block.key.is_some(), "block {id}: kept without a prefix");
                    cached += 1;
                }
                (Some(FreeList::Uncached), 0) => {
                    assert!(
                        self.free_uncached.contains(&(id as u32)),
                        "block {id}: missing from the free stack"
                    );
                    assert!(
                        block.key.is_none(),
                        "block {id}: a prefix on the free stack"
                    );
                    free += 1;
                }
                _ => panic!("block {id}: free exactly when unused"),
            }
            if let Some(key) = block.key {
                assert_eq!(
                    self.cached.get(&key),
                    Some(&(id as u32)),
                    "block {id}: registration"
                );
                assert_eq!(
                    block.tokens.len(),
                    self.block_size,
                    "block {id}: cached tokens"
                );
                if let Some(&group) = group_of.get(&(id as u32)) {
                    assert_eq!(group, key.0, "block {id}: registered for another group");
                }
            }
        }
        assert_eq!(
            self.free_queue.len() + self.session_queue.len(),
            cached,
            "free queue length"
        );
        assert_eq!(self.free_uncached.len(), free, "free stack length");
        assert_eq!(
            free + used + cached,
            self.blocks.len(),
            "free + used + cached = total"
        );
        for (&key, &id) in &self.cached {
            assert_eq!(
                self.blocks[id as usize].key,
                Some(key),
                "stale registration"
            );
        }
    }

    /// Checks a scheduled step against the bookkeeping: no slot of its new tokens and no
    /// destination of its copies lies in a block anyone else uses, and every block its
    /// attention reads (in each group, from the window start of each sequence's first new
    /// token to its last) is held. Run by the scheduler in debug builds, after
    /// [`take_block_copies`](Self::take_block_copies).
    pub fn check_step(&self, batch: &StepBatch) {
        // An empty step (nothing to schedule) has no tables to carry its groups.
        if batch.sequences.is_empty() {
            assert!(batch.block_copies.is_empty(), "copies in an empty step");
            return;
        }
        assert_eq!(
            batch.num_groups(),
            self.num_groups(),
            "KV groups of the step"
        );
        for group in 0..self.num_groups() {
            for &slot in batch.slots(group) {
                let id = slot as usize / self.block_size;
                assert_eq!(
                    self.blocks[id].ref_count, 1,
                    "the step writes slot {slot} of block {id}, which is not private"
                );
            }
            for (index, seq) in batch.sequences.iter().enumerate() {
                let table = seq.table(group);
                let first = self.first_needed_block(group, seq.start_position());
                let read = &table[first..self.blocks_for(seq.context_len)];
                for (i, &id) in (first..).zip(read) {
                    assert!(
                        id != RELEASED_BLOCK && self.blocks[id as usize].ref_count > 0,
                        "sequence {index} of the step reads logical block {i} of group {group}, \
                         which it no longer holds"
                    );
                }
            }
        }
        for &(src, dst) in &batch.block_copies {
            assert_ne!(src, dst, "a block copied onto itself");
            assert_eq!(
                self.blocks[dst as usize].ref_count, 1,
                "the step copies block {src} onto block {dst}, which is not private"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn seq(id: u64, tokens: &[u32]) -> Sequence {
        Sequence::new(id, tokens.to_vec(), 0, id)
    }

    #[test]
    fn allocates_and_frees_whole_blocks() {
        let mut bm = BlockManager::new(4, 4, true);
        let mut s = seq(1, &[1, 2, 3, 4, 5]);
        assert!(bm.allocate_slots(&mut s, 5, None));
        assert_eq!(s.num_logical_blocks(), 2);
        assert_eq!(bm.num_free_blocks(), 2);
        bm.check_invariants([&s]);
        bm.free(&mut s);
        assert_eq!(bm.num_free_blocks(), 4);
        bm.check_invariants([]);
    }

    #[test]
    fn blocks_without_a_cached_prefix_are_reused_most_recently_freed_first() {
        // Nothing is cached: the same two blocks serve one sequence after another, and the
        // rest of the pool is never touched.
        let mut bm = BlockManager::new(8, 4, false);
        for id in 1..=5 {
            let mut s = seq(id, &[id as u32; 6]);
            assert!(bm.allocate_slots(&mut s, 6, None));
            assert_eq!(s.block_tables[0], [0, 1], "sequence {id}");
            bm.check_invariants([&s]);
            bm.free(&mut s);
        }
        // A cached prefix is kept while blocks holding nothing can be taken instead.
        let mut bm = BlockManager::new(4, 4, true);
        let mut a = seq(1, &[1, 2, 3, 4, 5]);
        assert!(bm.allocate_slots(&mut a, 5, None));
        bm.take_block_copies(); // the step is taken: its full block is registered
        let (full, partial) = (a.block_tables[0][0], a.block_tables[0][1]);
        bm.free(&mut a);
        let mut b = seq(2, &[9; 8]);
        assert!(bm.allocate_slots(&mut b, 8, None));
        assert_eq!(
            b.block_tables[0][0], partial,
            "the freed partial block is reused first"
        );
        assert!(!b.block_tables[0].contains(&full));
        bm.check_invariants([&b]);
        let a_again = seq(3, &[1, 2, 3, 4, 5]);
        assert_eq!(bm.find_cached_prefix(&a_again).tables[0], [full]);
    }

    #[test]
    fn refuses_without_changing_anything() {
        let mut bm = BlockManager::new(2, 4, true);
        let mut s = seq(1, &[0; 9]);
        assert!(!bm.allocate_slots(&mut s, 9, None));
        assert!(s.block_tables.is_empty());
        assert_eq!(bm.num_free_blocks(), 2);
    }

    #[test]
    fn equal_prefixes_share_full_blocks_and_recompute_the_last_token() {
        let mut bm = BlockManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..8).collect();
        let mut a = seq(1, &prompt);
        assert!(bm.allocate_slots(&mut a, 8, None));
        bm.take_block_copies();
        a.num_computed_tokens = 8;

        // Same 8 tokens: only the first block may be reused, so that one token is computed.
        let mut b = seq(2, &prompt);
        let prefix = bm.find_cached_prefix(&b);
        assert_eq!(prefix.tables[0], vec![a.block_tables[0][0]]);
        assert!(bm.allocate_slots(&mut b, 4, Some(prefix)));
        assert_eq!(b.num_computed_tokens, 4);
        assert_eq!(b.block_tables[0][0], a.block_tables[0][0]);
        assert_ne!(b.block_tables[0][1], a.block_tables[0][1]);
        bm.check_invariants([&a, &b]);
    }

    #[test]
    fn freed_prefixes_stay_cached_until_evicted_lru() {
        let mut bm = BlockManager::new(3, 2, true);
        let mut a = seq(1, &[1, 2, 3, 4, 5]);
        assert!(bm.allocate_slots(&mut a, 5, None));
        bm.take_block_copies();
        bm.free(&mut a);
        assert_eq!(bm.num_cached_free_blocks(), 2);

        let mut b = seq(2, &[1, 2, 3, 4, 9]);
        let prefix = bm.find_cached_prefix(&b);
        assert_eq!(prefix.num_blocks(), 2, "both full blocks are still cached");
        assert!(bm.allocate_slots(&mut b, 1, Some(prefix)));
        bm.check_invariants([&b]);
        bm.free(&mut b);

        // A different prompt needing all three blocks evicts them.
        let mut c = seq(3, &[7, 7, 7, 7, 7, 7]);
        assert!(bm.find_cached_prefix(&c).num_blocks() == 0);
        assert!(bm.allocate_slots(&mut c, 6, None));
        assert_eq!(bm.num_cached_free_blocks(), 0);
        let d = seq(4, &[1, 2, 3, 4, 5]);
        assert!(bm.find_cached_prefix(&d).num_blocks() == 0);
        bm.check_invariants([&c]);
    }

    /// Computes `tokens` in a fresh sequence, registers its full blocks and frees it.
    fn cache_and_free(bm: &mut BlockManager, id: u64, tokens: &[u32], keep: Option<Duration>) {
        let mut s = seq(id, tokens);
        s.owner = Some(std::sync::Arc::new(crate::sequence::Owner {
            fair_claim: None,
            keep_cached: keep,
        }));
        assert!(bm.allocate_slots(&mut s, tokens.len(), None));
        bm.take_block_copies();
        bm.free(&mut s);
    }

    fn cached_blocks(bm: &mut BlockManager, prompt: &[u32]) -> usize {
        let mut query = prompt.to_vec();
        query.push(0);
        bm.find_cached_prefix(&seq(99, &query)).num_blocks()
    }

    #[test]
    fn a_sessions_blocks_are_evicted_after_other_cached_blocks() {
        let mut bm = BlockManager::new(4, 2, true);
        // The session's blocks are freed first: plain LRU would evict them first.
        cache_and_free(&mut bm, 1, &[1, 2, 3, 4], Some(Duration::from_secs(600)));
        cache_and_free(&mut bm, 2, &[5, 6, 7, 8], None);
        assert_eq!(bm.num_cached_free_blocks(), 4);

        let mut churn = seq(3, &[9, 9, 9, 9]);
        assert!(bm.allocate_slots(&mut churn, 4, None));
        bm.take_block_copies();
        assert_eq!(
            cached_blocks(&mut bm, &[1, 2, 3, 4]),
            2,
            "the session's prefix stays"
        );
        assert_eq!(
            cached_blocks(&mut bm, &[5, 6, 7, 8]),
            0,
            "the other one went"
        );
        bm.check_invariants([&churn]);

        // With no other cached block free, the session's are evicted too.
        let mut more = seq(4, &[8, 8, 8, 8]);
        assert!(bm.allocate_slots(&mut more, 4, None));
        assert_eq!(cached_blocks(&mut bm, &[1, 2, 3, 4]), 0);
        bm.check_invariants([&churn, &more]);
    }

    #[test]
    fn a_sessions_blocks_past_their_time_to_live_are_evicted_first() {
        let mut bm = BlockManager::new(4, 2, true);
        cache_and_free(&mut bm, 1, &[5, 6, 7, 8], None);
        cache_and_free(&mut bm, 2, &[1, 2, 3, 4], Some(Duration::ZERO));
        let mut churn = seq(3, &[9, 9, 9, 9]);
        assert!(bm.allocate_slots(&mut churn, 4, None));
        assert_eq!(
            cached_blocks(&mut bm, &[1, 2, 3, 4]),
            0,
            "expired: evicted first"
        );
        assert_eq!(cached_blocks(&mut bm, &[5, 6, 7, 8]), 2);
        bm.check_invariants([&churn]);
    }

    /// A parent that has computed a 6-token prompt in blocks of 4, and two forks of it.
    fn forked_family(bm: &mut BlockManager) -> [Sequence; 3] {
        let prompt = [1, 2, 3, 4, 5, 6];
        let mut parent = seq(1, &prompt);
        assert!(bm.allocate_slots(&mut parent, 6, None));
        parent.num_computed_tokens = 6;
        let mut forks = [seq(2, &prompt), seq(3, &prompt)];
        for fork in &mut forks {
            bm.fork(&parent, fork);
            assert_eq!(fork.block_tables, parent.block_tables);
            assert_eq!(fork.block_hashes, parent.block_hashes);
            assert_eq!(fork.num_computed_tokens, 6);
        }
        let [a, b] = forks;
        [parent, a, b]
    }

    #[test]
    fn forks_share_every_block_and_writers_copy_the_shared_partial_one() {
        let mut bm = BlockManager::new(8, 4, true);
        let [mut parent, mut a, mut b] = forked_family(&mut bm);
        let [full, partial] = [parent.block_tables[0][0], parent.block_tables[0][1]];
        assert_eq!((bm.ref_count(full), bm.ref_count(partial)), (3, 3));
        assert_eq!(bm.num_free_blocks(), 6, "forking takes no block");
        bm.check_invariants([&parent, &a, &b]);

        // Each writes its 7th token into the partial block: the first two writers copy it.
        for (s, token) in [(&mut a, 10), (&mut parent, 11), (&mut b, 12)] {
            s.tokens.push(token);
            assert!(bm.allocate_slots(s, 1, None));
            s.num_computed_tokens += 1;
        }
        let copy_of_a = a.block_tables[0][1];
        let copy_of_parent = parent.block_tables[0][1];
        assert_eq!(
            bm.take_block_copies(),
            vec![(partial, copy_of_a), (partial, copy_of_parent)]
        );
        assert!(bm.take_block_copies().is_empty(), "taken once");
        assert_eq!(
            b.block_tables[0][1], partial,
            "the last writer keeps the original"
        );
        assert_eq!(
            bm.ref_count(full),
            3,
            "the full block is never written, so stays shared"
        );
        for id in [copy_of_a, copy_of_parent, partial] {
            assert_eq!(bm.ref_count(id), 1);
        }
        bm.check_invariants([&parent, &a, &b]);

        for s in [&mut parent, &mut a, &mut b] {
            bm.free(s);
        }
        bm.check_invariants([]);
        assert_eq!(bm.num_free_blocks(), 8);
    }

    #[test]
    fn copy_on_write_without_a_free_block_changes_nothing() {
        let mut bm = BlockManager::new(2, 4, true);
        let [parent, mut a, b] = forked_family(&mut bm);
        assert_eq!(bm.num_free_blocks(), 0);
        a.tokens.push(10);
        let table = a.block_tables[0].clone();
        assert!(!bm.allocate_slots(&mut a, 1, None));
        assert_eq!(a.block_tables[0], table);
        assert_eq!(a.num_computed_tokens, 6);
        assert!(bm.take_block_copies().is_empty());
        a.tokens.pop();
        bm.check_invariants([&parent, &a, &b]);
    }

    #[test]
    #[should_panic(expected = "which is not private")]
    fn writing_a_shared_block_is_caught() {
        let mut bm = BlockManager::new(8, 4, true);
        let [parent, a, b] = forked_family(&mut bm);
        bm.check_invariants([&parent, &a, &b]);
        let mut batch = StepBatch::new();
        // As if `a` wrote its 7th token without copying the shared partial block first.
        batch.push_sequence(&[10], 6, &a.block_tables[0], 4, true);
        bm.check_step(&batch);
    }

    #[test]
    fn a_block_filled_in_a_step_is_shared_only_once_the_step_is_taken() {
        let mut bm = BlockManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..9).collect();
        let mut a = seq(1, &prompt);
        assert!(bm.allocate_slots(&mut a, 9, None));
        // The same prompt admitted in the same step finds nothing: a's blocks are not written.
        let b = seq(2, &prompt);
        assert_eq!(bm.find_cached_prefix(&b).num_blocks(), 0);
        bm.take_block_copies();
        assert_eq!(bm.find_cached_prefix(&b).tables[0], a.block_tables[0][..2]);
        // A sequence freed before its step is taken registers nothing.
        let mut c = seq(3, &[7; 9]);
        assert!(bm.allocate_slots(&mut c, 9, None));
        bm.free(&mut c);
        bm.take_block_copies();
        assert_eq!(bm.find_cached_prefix(&seq(4, &[7; 9])).num_blocks(), 0);
        bm.check_invariants([&a]);
    }

    /// Group 0 global, groups 1 and 2 with a window of 6 positions, blocks of 4.
    fn windowed(num_blocks: usize) -> BlockManager {
        BlockManager::with_groups(num_blocks, 4, true, vec![None, Some(6), Some(6)])
    }

    /// Computes `tokens` of `s` one at a time, as decode steps do.
    fn decode(bm: &mut BlockManager, s: &mut Sequence, tokens: &[u32]) {
        for &token in tokens {
            s.tokens.push(token);
            assert!(bm.allocate_slots(s, 1, None));
            bm.take_block_copies();
            s.num_computed_tokens += 1;
            bm.check_invariants([&*s]);
        }
    }

    #[test]
    fn window_groups_release_the_blocks_their_window_has_passed() {
        let mut bm = windowed(64);
        let mut s = seq(1, &[1, 2, 3]);
        assert!(bm.allocate_slots(&mut s, 3, None));
        bm.take_block_copies();
        s.num_computed_tokens = 3;
        decode(&mut bm, &mut s, &[0; 37]);
        assert_eq!(s.num_computed_tokens, 40);
        // The next token (position 40) reads 35..=40: logical blocks 8.. of the window groups.
        for group in [1, 2] {
            let table = &s.block_tables[group];
            assert_eq!(table.len(), 10);
            assert!(
                table[..8].iter().all(|&id| id == RELEASED_BLOCK),
                "{table:?}"
            );
            assert!(table[8..].iter().all(|&id| id != RELEASED_BLOCK));
        }
        assert!(!s.block_tables[0].contains(&RELEASED_BLOCK));
        assert_eq!(bm.num_free_blocks(), 64 - 10 - 2 * 2);
        bm.free(&mut s);
        bm.check_invariants([]);
        assert_eq!(bm.num_free_blocks(), 64);
    }

    #[test]
    fn released_blocks_are_room_and_a_refusal_still_changes_nothing() {
        // A window of 5: position 8 reads 4..=8, so computing it releases logical block 0 of
        // each window group just as it needs a third block in every group.
        let mut bm = BlockManager::with_groups(7, 4, true, vec![None, Some(5), Some(5)]);
        let mut s = seq(1, &[5; 8]);
        assert!(bm.allocate_slots(&mut s, 8, None));
        bm.take_block_copies();
        s.num_computed_tokens = 8;
        assert_eq!(bm.num_free_blocks(), 1);
        // 1 free + 2 released = the 3 blocks position 8 needs.
        decode(&mut bm, &mut s, &[1, 2, 3, 4]);
        assert_eq!(bm.num_free_blocks(), 0);
        // Position 12 needs 3 again but releases only 2: refused.
        s.tokens.push(9);
        let tables = s.block_tables.clone();
        assert!(!bm.allocate_slots(&mut s, 1, None));
        assert_eq!(s.block_tables, tables, "a refusal changes nothing");
        assert_eq!(bm.num_free_blocks(), 0);
        s.tokens.pop();
        bm.check_invariants([&s]);
    }

    #[test]
    fn a_window_group_reuses_a_prefix_only_while_its_window_is_cached() {
        let mut bm = windowed(64);
        let prompt: Vec<u32> = (0..21).collect();
        let mut a = seq(1, &prompt);
        assert!(bm.allocate_slots(&mut a, 16, None));
        bm.take_block_copies();
        a.num_computed_tokens = 16;
        assert!(bm.allocate_slots(&mut a, 5, None));
        bm.take_block_copies();
        a.num_computed_tokens = 21;
        // a has released logical blocks 0..3 of its window groups (position 16 reads 11..).
        let held: Vec<u32> = a.block_tables[1].clone();
        assert_eq!(held[..2], [RELEASED_BLOCK; 2]);
        bm.free(&mut a);
        // Same 21 tokens again: 5 full blocks, the 6th token after the prefix (position 20)
        // reads 15..=20, logical blocks 3 and 4: still cached, so the whole prefix is reused.
        let b = seq(2, &prompt);
        let prefix = bm.find_cached_prefix(&b);
        assert_eq!(prefix.num_blocks(), 5);
        assert_eq!(prefix.tables[1][..3], [RELEASED_BLOCK; 3]);
        assert_eq!(prefix.tables[1][3..], held[3..5]);
        // Evict one window block the prefix end needs: the prefix shrinks until the window of
        // its first uncomputed token is served (4 blocks: position 16 reads blocks 2 and 3).
        let evicted = held[4];
        bm.acquire(evicted);
        bm.unregister(evicted);
        bm.release(evicted);
        bm.check_invariants([]);
        let prefix = bm.find_cached_prefix(&b);
        assert_eq!(prefix.num_blocks(), 4, "{prefix:?}");
    }

    #[test]
    fn disabled_prefix_caching_never_shares() {
        let mut bm = BlockManager::new(8, 2, false);
        let mut a = seq(1, &[1, 2, 3, 4, 5]);
        assert!(bm.allocate_slots(&mut a, 5, None));
        let b = seq(2, &[1, 2, 3, 4, 5]);
        assert!(bm.find_cached_prefix(&b).num_blocks() == 0);
    }
}
