//! The KV block manager: which physical cache blocks each sequence uses, shared where prompts
//! share a prefix or a request's samples share their prompt.
//!
//! The model's KV cache is a fixed pool of blocks of `block_size` tokens (PagedAttention). This
//! module only does the bookkeeping; it never touches tensors. When a sequence needs a block's
//! contents duplicated (copy-on-write, below), it records the copy and the model performs it.
//!
//! * **Reference counts.** A block is used by as many sequences as have it in their block
//!   table. A block whose count drops to zero becomes free.
//! * **Automatic prefix caching.** Once a block is full its content is fixed, so it is
//!   registered under a hash of its tokens chained with its parent block's hash: equal hashes
//!   mean equal prefixes up to and including that block. A new sequence reuses the registered
//!   blocks of its longest cached prefix instead of computing them again (tokens are compared
//!   too, so a hash collision can never serve wrong K/V).
//! * **LRU eviction.** Freed blocks keep their content and registration while they wait in the
//!   free queue, so a later request can still hit them. When a fresh block is needed and no
//!   block without a cached prefix is free, it is taken from the front of the queue, the
//!   block freed longest ago, which loses its registration then.
//! * **Most recently freed first, for blocks without a cached prefix.** A free block that holds
//!   no registered prefix (a partial block, a block of a failed step, any block with prefix
//!   caching off) has nothing worth keeping: these are reused before any cached block is
//!   evicted, the one freed last first. The same few blocks then serve request after request,
//!   so the pages of the KV pool that are ever touched stay few (the pool is allocated up front
//!   but the operating system only backs the pages written), and a server's memory stays near
//!   what its peak load needed instead of creeping up to the whole pool.
//! * **Forking and copy-on-write (vLLM v0).** The `n` samples of one request share their whole
//!   prompt: once the first sample has computed it, [`fork`](BlockManager::fork) gives each
//!   other sample the same block table, the last, partial block included. Full blocks are never
//!   written again, so they stay shared. The partial block is where every sample writes its
//!   next token, so [`allocate_slots`](BlockManager::allocate_slots) gives a sequence about to
//!   write into a block that others still use a fresh block of its own and records a copy
//!   `(src, dst)`; the scheduler hands the step's copies to the model
//!   ([`StepBatch::block_copies`]), which performs them, in order, before it writes any K/V. The
//!   last sample to write finds the block its own and writes in place.
//! * **Shared blocks are never written.** Whatever shares a block (a cached prefix, a fork),
//!   no step writes into a block whose reference count is above one
//!   ([`check_step`](BlockManager::check_step)), with one exception: a block handed out fresh
//!   in this step and filled by it is registered at once, so a sequence admitted later in the
//!   same step (the same prompt twice in one batch) may already adopt it as a cached prefix.
//!   That is sound: the adopter only reads it, and the model writes every K/V of a step before
//!   its attention reads any.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use crate::batch::{BlockCopy, StepBatch};
use crate::sequence::{BlockHash, Sequence};

fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut hasher = DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

#[derive(Debug, Clone, Default)]
struct Block {
    ref_count: u32,
    /// Set while the block is registered in the prefix cache (it is full).
    hash: Option<BlockHash>,
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
}

/// A cached prefix found for a sequence: blocks to reuse, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CachedPrefix {
    pub blocks: Vec<u32>,
    pub hashes: Vec<BlockHash>,
}

/// Counters for metrics and traces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up in the prefix cache.
    pub queried_tokens: u64,
    /// Of those, tokens found cached.
    pub hit_tokens: u64,
}

pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks holding a cached prefix, by the time they were freed: the first is the least
    /// recently used.
    free_queue: BTreeMap<u64, u32>,
    /// Free blocks holding no cached prefix; the last was freed most recently.
    free_uncached: Vec<u32>,
    next_tick: u64,
    /// Registered full blocks by content hash.
    cached: HashMap<BlockHash, u32>,
    prefix_caching: bool,
    stats: PrefixCacheStats,
    /// Copy-on-write copies made since the scheduler last took them, in the order made.
    pending_copies: Vec<BlockCopy>,
    /// Blocks handed out since the scheduler last took the copies, and those of the step it
    /// took them for: the blocks [`check_step`](Self::check_step) lets others share while the
    /// step writes them (see the module documentation).
    fresh_blocks: Vec<u32>,
    step_fresh_blocks: Vec<u32>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let mut manager = Self {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            free_queue: BTreeMap::new(),
            free_uncached: Vec::with_capacity(num_blocks),
            next_tick: 0,
            cached: HashMap::new(),
            prefix_caching,
            stats: PrefixCacheStats::default(),
            pending_copies: Vec::new(),
            fresh_blocks: Vec::new(),
            step_fresh_blocks: Vec::new(),
        };
        // Block 0 on top: a fresh pool hands its blocks out in order.
        for id in (0..num_blocks as u32).rev() {
            manager.push_free(id);
        }
        manager
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks a new allocation can take (including cached blocks nobody uses).
    pub fn num_free_blocks(&self) -> usize {
        self.free_queue.len() + self.free_uncached.len()
    }

    /// Free blocks that still hold a registered prefix.
    pub fn num_cached_free_blocks(&self) -> usize {
        self.free_queue.len()
    }

    /// Fraction of blocks held by live sequences (cached but unused blocks count as free).
    pub fn usage(&self) -> f64 {
        let used = self.blocks.len() - self.num_free_blocks();
        used as f64 / self.blocks.len().max(1) as f64
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

    /// The longest run of the sequence's leading full blocks that is already in the cache.
    ///
    /// At least the last prompt token is always left out, even when the whole prompt is
    /// cached: the model must compute something to produce logits to sample from.
    pub fn find_cached_prefix(&mut self, seq: &Sequence) -> CachedPrefix {
        let mut prefix = CachedPrefix::default();
        if !self.prefix_caching {
            return prefix;
        }
        let cacheable_blocks = seq.len().saturating_sub(1) / self.block_size;
        let mut parent = None;
        for chunk in seq.tokens.chunks(self.block_size).take(cacheable_blocks) {
            let hash = hash_block(parent, chunk);
            match self.cached.get(&hash) {
                Some(&id) if self.blocks[id as usize].tokens == chunk => {
                    prefix.blocks.push(id);
                    prefix.hashes.push(hash);
                    parent = Some(hash);
                }
                _ => break,
            }
        }
        prefix
    }

    /// Makes room for `num_new_tokens` more tokens of `seq`, after first adopting `prefix`
    /// (from [`find_cached_prefix`](Self::find_cached_prefix)) for a sequence that has no
    /// blocks yet. A block these tokens land in that other sequences still use is first
    /// replaced by a private copy (copy-on-write; the copy is recorded for the model, see
    /// [`take_block_copies`](Self::take_block_copies)). Registers every block that these
    /// tokens fill.
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
        debug_assert!(prefix.blocks.is_empty() || seq.block_table.is_empty());
        let computed = seq
            .num_computed_tokens
            .max(prefix.blocks.len() * self.block_size);
        let table_len = seq.block_table.len() + prefix.blocks.len();
        let needed = self
            .blocks_for(computed + num_new_tokens)
            .saturating_sub(table_len);
        let written = self.held_blocks_written(seq, computed, num_new_tokens);
        let to_copy = written
            .clone()
            .filter(|&i| self.is_shared(seq.block_table[i]))
            .count();
        // Reused blocks that sit in the free queue leave it, so they do not count as room.
        let reused_free = prefix
            .blocks
            .iter()
            .filter(|&&id| self.blocks[id as usize].ref_count == 0)
            .count();
        if needed + to_copy > self.num_free_blocks() - reused_free {
            return false;
        }

        if is_admission {
            self.stats.queried_tokens += seq.len() as u64;
            self.stats.hit_tokens += (prefix.blocks.len() * self.block_size) as u64;
        }
        for (&id, &hash) in prefix.blocks.iter().zip(&prefix.hashes) {
            self.acquire(id);
            seq.block_table.push(id);
            seq.block_hashes.push(hash);
        }
        seq.num_computed_tokens = computed;
        for i in written {
            if self.is_shared(seq.block_table[i]) {
                self.copy_on_write(seq, i);
            }
        }
        for _ in 0..needed {
            let id = self.take_fresh_block();
            seq.block_table.push(id);
        }
        self.register_full_blocks(seq, computed + num_new_tokens);
        true
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
            .min(seq.block_table.len());
        first..end.max(first)
    }

    fn is_shared(&self, id: u32) -> bool {
        self.blocks[id as usize].ref_count > 1
    }

    /// Gives `seq` a private copy of its shared logical block `i`. Its K/V are only copied by
    /// the model, before the step writes, so the copy is queued for the scheduler to hand over.
    fn copy_on_write(&mut self, seq: &mut Sequence, i: usize) {
        let src = seq.block_table[i];
        let dst = self.take_fresh_block();
        // Shared, so others still hold it: it never reaches the free queue here.
        self.blocks[src as usize].ref_count -= 1;
        seq.block_table[i] = dst;
        self.pending_copies.push((src, dst));
    }

    /// The block copies that copy-on-write recorded since the last call, in the order they
    /// must be performed: a block freed after being copied from can be reused, as the
    /// destination of a later copy, within the same step. Called once per scheduled step, it
    /// also ends the step for [`check_step`](Self::check_step).
    pub fn take_block_copies(&mut self) -> Vec<BlockCopy> {
        std::mem::swap(&mut self.step_fresh_blocks, &mut self.fresh_blocks);
        self.fresh_blocks.clear();
        std::mem::take(&mut self.pending_copies)
    }

    /// Makes `child`, a sample of the same request as `parent` whose tokens so far are the
    /// same, share all of `parent`'s blocks and computed tokens: nothing is computed or copied
    /// now; the first write into a shared block copies it ([`allocate_slots`]).
    ///
    /// [`allocate_slots`]: Self::allocate_slots
    pub fn fork(&mut self, parent: &Sequence, child: &mut Sequence) {
        assert!(
            child.block_table.is_empty(),
            "sequence {} is forked but already holds blocks",
            child.id
        );
        let computed = parent.num_computed_tokens;
        debug_assert_eq!(
            child.tokens.get(..computed),
            Some(&parent.tokens[..computed]),
            "a fork starts from its parent's computed tokens"
        );
        for &id in &parent.block_table {
            self.acquire(id);
        }
        child.block_table.clone_from(&parent.block_table);
        child.block_hashes.clone_from(&parent.block_hashes);
        child.num_computed_tokens = computed;
    }

    /// Returns all of a sequence's blocks. Blocks nobody else uses join the free queue, the
    /// sequence's last block first, so that the tail of a prefix is evicted before its head
    /// (heads are what other requests share).
    pub fn free(&mut self, seq: &mut Sequence) {
        for &id in seq.block_table.iter().rev() {
            let block = &mut self.blocks[id as usize];
            block.ref_count -= 1;
            if block.ref_count == 0 {
                self.push_free(id);
            }
        }
        seq.block_table.clear();
        seq.block_hashes.clear();
        seq.num_computed_tokens = 0;
    }

    /// Like [`free`](Self::free), but also forgets the registrations of blocks written by a
    /// step that failed, whose contents can no longer be trusted.
    pub fn free_and_forget(&mut self, seq: &mut Sequence) {
        for &id in &seq.block_table {
            if self.blocks[id as usize].ref_count == 1 {
                self.unregister(id);
            }
        }
        self.free(seq);
    }

    /// Registers the blocks of `seq` that are full once its first `num_tokens` are computed.
    fn register_full_blocks(&mut self, seq: &mut Sequence, num_tokens: usize) {
        let full = (num_tokens / self.block_size).min(seq.block_table.len());
        while seq.block_hashes.len() < full {
            let i = seq.block_hashes.len();
            let tokens = &seq.tokens[i * self.block_size..(i + 1) * self.block_size];
            let hash = hash_block(seq.block_hashes.last().copied(), tokens);
            seq.block_hashes.push(hash);
            let id = seq.block_table[i];
            // A duplicate of an already registered block (two sequences computing the same
            // prefix at once) stays private; the first registration wins.
            if self.prefix_caching && !self.cached.contains_key(&hash) {
                self.cached.insert(hash, id);
                let block = &mut self.blocks[id as usize];
                block.hash = Some(hash);
                block.tokens = tokens.to_vec();
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
            None => {}
        }
        block.ref_count += 1;
    }

    /// Takes the most recently freed block that holds no cached prefix, or else the least
    /// recently freed cached one, evicting its prefix.
    fn take_fresh_block(&mut self) -> u32 {
        let id = match self.free_uncached.pop() {
            Some(id) => id,
            None => {
                self.free_queue
                    .pop_first()
                    .expect("allocate_slots checked that enough blocks are free")
                    .1
            }
        };
        self.blocks[id as usize].free = None;
        self.unregister(id);
        self.blocks[id as usize].ref_count = 1;
        self.fresh_blocks.push(id);
        id
    }

    fn unregister(&mut self, id: u32) {
        let block = &mut self.blocks[id as usize];
        if let Some(hash) = block.hash.take() {
            block.tokens.clear();
            if self.cached.get(&hash) == Some(&id) {
                self.cached.remove(&hash);
            }
        }
    }

    fn push_free(&mut self, id: u32) {
        let block = &mut self.blocks[id as usize];
        if block.hash.is_some() {
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
        // The computed tokens each block holds for the first sequence seen using it: every
        // other user must agree with them where both have computed.
        let mut contents: HashMap<u32, &[u32]> = HashMap::new();
        for seq in live {
            assert!(
                seq.block_table.len() * self.block_size >= seq.num_computed_tokens,
                "sequence {} has computed tokens outside its blocks",
                seq.id
            );
            let computed = &seq.tokens[..seq.num_computed_tokens];
            for (&id, held) in seq.block_table.iter().zip(computed.chunks(self.block_size)) {
                let seen = *contents.entry(id).or_insert(held);
                let common = seen.len().min(held.len());
                assert_eq!(
                    seen[..common],
                    held[..common],
                    "block {id} is shared by sequences that disagree on its tokens"
                );
            }
            for &id in &seq.block_table {
                refs[id as usize] += 1;
            }
        }
        let (mut used, mut free, mut cached) = (0, 0, 0);
        for (id, block) in self.blocks.iter().enumerate() {
            assert_eq!(block.ref_count, refs[id], "block {id}: reference count");
            match (block.free, block.ref_count) {
                (None, r) if r > 0 => used += 1,
                (Some(FreeList::Cached(tick)), 0) => {
                    assert_eq!(self.free_queue.get(&tick), Some(&(id as u32)));
                    assert!(block.hash.is_some(), "block {id}: cached without a prefix");
                    cached += 1;
                }
                (Some(FreeList::Uncached), 0) => {
                    assert!(
                        self.free_uncached.contains(&(id as u32)),
                        "block {id}: missing from the free stack"
                    );
                    assert!(
                        block.hash.is_none(),
                        "block {id}: a prefix on the free stack"
                    );
                    free += 1;
                }
                _ => panic!("block {id}: free exactly when unused"),
            }
            if let Some(hash) = block.hash {
                assert_eq!(
                    self.cached.get(&hash),
                    Some(&(id as u32)),
                    "block {id}: registration"
                );
                assert_eq!(
                    block.tokens.len(),
                    self.block_size,
                    "block {id}: cached tokens"
                );
            }
        }
        assert_eq!(self.free_queue.len(), cached, "free queue length");
        assert_eq!(self.free_uncached.len(), free, "free stack length");
        assert_eq!(
            free + used + cached,
            self.blocks.len(),
            "free + used + cached = total"
        );
        for (&hash, &id) in &self.cached {
            assert_eq!(
                self.blocks[id as usize].hash,
                Some(hash),
                "stale registration"
            );
        }
    }

    /// Checks that a scheduled step writes no shared block: neither the slots of its new
    /// tokens nor the destinations of its copies lie in a block anyone else uses, but for
    /// blocks the step itself fills first (adopted in the same step as a cached prefix; see the
    /// module documentation). Run by the scheduler in debug builds, after
    /// [`take_block_copies`](Self::take_block_copies).
    pub fn check_step(&self, batch: &StepBatch) {
        for &slot in &batch.slot_mapping {
            let id = slot as usize / self.block_size;
            if self.step_fresh_blocks.contains(&(id as u32)) {
                continue;
            }
            assert_eq!(
                self.blocks[id].ref_count, 1,
                "the step writes slot {slot} of block {id}, which is not private"
            );
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
    use super::*;

    fn seq(id: u64, tokens: &[u32]) -> Sequence {
        Sequence::new(id, tokens.to_vec(), 0, id)
    }

    #[test]
    fn allocates_and_frees_whole_blocks() {
        let mut bm = BlockManager::new(4, 4, true);
        let mut s = seq(1, &[1, 2, 3, 4, 5]);
        assert!(bm.allocate_slots(&mut s, 5, None));
        assert_eq!(s.block_table.len(), 2);
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
            assert_eq!(s.block_table, [0, 1], "sequence {id}");
            bm.check_invariants([&s]);
            bm.free(&mut s);
        }
        // A cached prefix is kept while blocks holding nothing can be taken instead.
        let mut bm = BlockManager::new(4, 4, true);
        let mut a = seq(1, &[1, 2, 3, 4, 5]);
        assert!(bm.allocate_slots(&mut a, 5, None));
        let (full, partial) = (a.block_table[0], a.block_table[1]);
        bm.free(&mut a);
        let mut b = seq(2, &[9; 8]);
        assert!(bm.allocate_slots(&mut b, 8, None));
        assert_eq!(
            b.block_table[0], partial,
            "the freed partial block is reused first"
        );
        assert!(!b.block_table.contains(&full));
        bm.check_invariants([&b]);
        let a_again = seq(3, &[1, 2, 3, 4, 5]);
        assert_eq!(bm.find_cached_prefix(&a_again).blocks, [full]);
    }

    #[test]
    fn refuses_without_changing_anything() {
        let mut bm = BlockManager::new(2, 4, true);
        let mut s = seq(1, &[0; 9]);
        assert!(!bm.allocate_slots(&mut s, 9, None));
        assert!(s.block_table.is_empty());
        assert_eq!(bm.num_free_blocks(), 2);
    }

    #[test]
    fn equal_prefixes_share_full_blocks_and_recompute_the_last_token() {
        let mut bm = BlockManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..8).collect();
        let mut a = seq(1, &prompt);
        assert!(bm.allocate_slots(&mut a, 8, None));
        a.num_computed_tokens = 8;

        // Same 8 tokens: only the first block may be reused, so that one token is computed.
        let mut b = seq(2, &prompt);
        let prefix = bm.find_cached_prefix(&b);
        assert_eq!(prefix.blocks, vec![a.block_table[0]]);
        assert!(bm.allocate_slots(&mut b, 4, Some(prefix)));
        assert_eq!(b.num_computed_tokens, 4);
        assert_eq!(b.block_table[0], a.block_table[0]);
        assert_ne!(b.block_table[1], a.block_table[1]);
        bm.check_invariants([&a, &b]);
    }

    #[test]
    fn freed_prefixes_stay_cached_until_evicted_lru() {
        let mut bm = BlockManager::new(3, 2, true);
        let mut a = seq(1, &[1, 2, 3, 4, 5]);
        assert!(bm.allocate_slots(&mut a, 5, None));
        bm.free(&mut a);
        assert_eq!(bm.num_cached_free_blocks(), 2);

        let mut b = seq(2, &[1, 2, 3, 4, 9]);
        let prefix = bm.find_cached_prefix(&b);
        assert_eq!(prefix.blocks.len(), 2, "both full blocks are still cached");
        assert!(bm.allocate_slots(&mut b, 1, Some(prefix)));
        bm.check_invariants([&b]);
        bm.free(&mut b);

        // A different prompt needing all three blocks evicts them.
        let mut c = seq(3, &[7, 7, 7, 7, 7, 7]);
        assert!(bm.find_cached_prefix(&c).blocks.is_empty());
        assert!(bm.allocate_slots(&mut c, 6, None));
        assert_eq!(bm.num_cached_free_blocks(), 0);
        let d = seq(4, &[1, 2, 3, 4, 5]);
        assert!(bm.find_cached_prefix(&d).blocks.is_empty());
        bm.check_invariants([&c]);
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
            assert_eq!(fork.block_table, parent.block_table);
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
        let [full, partial] = [parent.block_table[0], parent.block_table[1]];
        assert_eq!((bm.ref_count(full), bm.ref_count(partial)), (3, 3));
        assert_eq!(bm.num_free_blocks(), 6, "forking takes no block");
        bm.check_invariants([&parent, &a, &b]);

        // Each writes its 7th token into the partial block: the first two writers copy it.
        for (s, token) in [(&mut a, 10), (&mut parent, 11), (&mut b, 12)] {
            s.tokens.push(token);
            assert!(bm.allocate_slots(s, 1, None));
            s.num_computed_tokens += 1;
        }
        let copy_of_a = a.block_table[1];
        let copy_of_parent = parent.block_table[1];
        assert_eq!(
            bm.take_block_copies(),
            vec![(partial, copy_of_a), (partial, copy_of_parent)]
        );
        assert!(bm.take_block_copies().is_empty(), "taken once");
        assert_eq!(
            b.block_table[1], partial,
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
        let table = a.block_table.clone();
        assert!(!bm.allocate_slots(&mut a, 1, None));
        assert_eq!(a.block_table, table);
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
        batch.push_sequence(&[10], 6, &a.block_table, 4, true);
        bm.check_step(&batch);
    }

    #[test]
    fn disabled_prefix_caching_never_shares() {
        let mut bm = BlockManager::new(8, 2, false);
        let mut a = seq(1, &[1, 2, 3, 4, 5]);
        assert!(bm.allocate_slots(&mut a, 5, None));
        let b = seq(2, &[1, 2, 3, 4, 5]);
        assert!(bm.find_cached_prefix(&b).blocks.is_empty());
    }
}
