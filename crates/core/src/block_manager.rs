//! The KV block manager: which physical cache blocks each sequence uses, shared where prompts
//! share a prefix.
//!
//! The model's KV cache is a fixed pool of blocks of `block_size` tokens (PagedAttention). This
//! module only does the bookkeeping; it never touches tensors.
//!
//! * **Reference counts.** A block is used by as many sequences as have it in their block
//!   table. A block whose count drops to zero joins the free queue.
//! * **Automatic prefix caching.** Once a block is full its content is fixed, so it is
//!   registered under a hash of its tokens chained with its parent block's hash: equal hashes
//!   mean equal prefixes up to and including that block. A new sequence reuses the registered
//!   blocks of its longest cached prefix instead of computing them again (tokens are compared
//!   too, so a hash collision can never serve wrong K/V).
//! * **LRU eviction.** Freed blocks keep their content and registration while they wait in the
//!   free queue, so a later request can still hit them. A fresh block is always taken from the
//!   front of the queue, the block freed longest ago, and loses its registration then.
//! * **Shared blocks are never written.** Only full, registered blocks are ever shared; a
//!   sequence writes only into blocks past its cached prefix, which it owns alone. The `n`
//!   samples of one request share their prompt this way too (as in vLLM v1), so no
//!   copy-on-write of block contents is ever needed: each sample recomputes only the prompt's
//!   last, partial block.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use crate::sequence::Sequence;

/// Hash of a full block's tokens chained with its parent's hash.
pub type BlockHash = u64;

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
    /// Position in the free queue while `ref_count == 0`.
    free_since: Option<u64>,
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
    /// Free blocks by the time they were freed: the first is the least recently used.
    free_queue: BTreeMap<u64, u32>,
    next_tick: u64,
    /// Registered full blocks by content hash.
    cached: HashMap<BlockHash, u32>,
    prefix_caching: bool,
    stats: PrefixCacheStats,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let mut manager = Self {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            free_queue: BTreeMap::new(),
            next_tick: 0,
            cached: HashMap::new(),
            prefix_caching,
            stats: PrefixCacheStats::default(),
        };
        for id in 0..num_blocks as u32 {
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
        self.free_queue.len()
    }

    /// Free blocks that still hold a registered prefix.
    pub fn num_cached_free_blocks(&self) -> usize {
        self.free_queue
            .values()
            .filter(|&&id| self.blocks[id as usize].hash.is_some())
            .count()
    }

    /// Fraction of blocks held by live sequences (cached but unused blocks count as free).
    pub fn usage(&self) -> f64 {
        let used = self.blocks.len() - self.free_queue.len();
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
    /// blocks yet. Registers every block that these tokens fill.
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
        // Reused blocks that sit in the free queue leave it, so they do not count as room.
        let reused_free = prefix
            .blocks
            .iter()
            .filter(|&&id| self.blocks[id as usize].ref_count == 0)
            .count();
        if needed > self.free_queue.len() - reused_free {
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
        for _ in 0..needed {
            let id = self.take_fresh_block();
            seq.block_table.push(id);
        }
        self.register_full_blocks(seq, computed + num_new_tokens);
        true
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
        if let Some(tick) = block.free_since.take() {
            self.free_queue.remove(&tick);
        }
        block.ref_count += 1;
    }

    /// Takes the least recently freed block, evicting whatever prefix it still held.
    fn take_fresh_block(&mut self) -> u32 {
        let (_, id) = self
            .free_queue
            .pop_first()
            .expect("allocate_slots checked that enough blocks are free");
        self.blocks[id as usize].free_since = None;
        self.unregister(id);
        self.blocks[id as usize].ref_count = 1;
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
        self.free_queue.insert(self.next_tick, id);
        self.blocks[id as usize].free_since = Some(self.next_tick);
        self.next_tick += 1;
    }

    /// Checks every invariant of the bookkeeping against the live sequences; for tests.
    pub fn check_invariants<'a>(&self, live: impl IntoIterator<Item = &'a Sequence>) {
        let mut refs = vec![0u32; self.blocks.len()];
        for seq in live {
            assert!(
                seq.block_table.len() * self.block_size >= seq.num_computed_tokens,
                "sequence {} has computed tokens outside its blocks",
                seq.id
            );
            for &id in &seq.block_table {
                refs[id as usize] += 1;
            }
        }
        for (id, block) in self.blocks.iter().enumerate() {
            assert_eq!(block.ref_count, refs[id], "block {id}: reference count");
            assert_eq!(
                block.free_since.is_some(),
                block.ref_count == 0,
                "block {id}: in the free queue exactly when unused"
            );
            if block.ref_count > 1 {
                assert!(
                    block.hash.is_some(),
                    "block {id} is shared but not a full cached block"
                );
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
        assert_eq!(
            self.free_queue.len() + refs.iter().filter(|&&r| r > 0).count(),
            self.blocks.len(),
            "free + used = total"
        );
        for (&hash, &id) in &self.cached {
            assert_eq!(
                self.blocks[id as usize].hash,
                Some(hash),
                "stale registration"
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

    #[test]
    fn disabled_prefix_caching_never_shares() {
        let mut bm = BlockManager::new(8, 2, false);
        let mut a = seq(1, &[1, 2, 3, 4, 5]);
        assert!(bm.allocate_slots(&mut a, 5, None));
        let b = seq(2, &[1, 2, 3, 4, 5]);
        assert!(bm.find_cached_prefix(&b).blocks.is_empty());
    }
}
