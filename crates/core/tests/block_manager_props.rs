//! Property tests of the block manager: random interleavings of admitting prompts (with prefix
//! lookups), decoding, forking samples (copy-on-write), preempting and finishing sequences never
//! break its bookkeeping, and every sequence always reads back its own tokens; with
//! sliding-window KV groups too, where blocks the window has passed are released while the
//! sequence runs and must never be read again.

use minserve_core::block_manager::{BlockManager, RELEASED_BLOCK};
use minserve_core::sequence::Sequence;
use minserve_core::StepBatch;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// Admit a prompt built from a small alphabet (so prefixes repeat) of this length.
    Admit {
        len: usize,
        alphabet: u32,
        seed: u32,
    },
    /// Decode one token for live sequence `i % live`.
    Decode { i: usize, token: u32 },
    /// Fork live sequence `i % live`, as the engine forks a request's samples.
    Fork { i: usize },
    /// Preempt live sequence `i % live`: free it, then admit it again with every token it has
    /// (recompute), through the prefix cache; its freed blocks may be evicted in between.
    Preempt { i: usize },
    /// Free live sequence `i % live` (finished or aborted).
    Free { i: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..40, 1u32..3, any::<u32>()).prop_map(|(len, alphabet, seed)| Op::Admit {
            len,
            alphabet,
            seed
        }),
        (any::<usize>(), 0u32..3).prop_map(|(i, token)| Op::Decode { i, token }),
        any::<usize>().prop_map(|i| Op::Fork { i }),
        any::<usize>().prop_map(|i| Op::Preempt { i }),
        any::<usize>().prop_map(|i| Op::Free { i }),
    ]
}

/// A stand-in for the model's KV cache: the token whose K/V each slot holds. It performs the
/// block copies and writes the way the model does, so that a missing, misdirected or
/// misordered copy, or a write into a block someone else reads, shows up as a sequence that
/// reads back a token it does not have.
struct FakeCache {
    block_size: usize,
    slots: Vec<Option<u32>>,
}

impl FakeCache {
    /// Runs what a step does for `new` tokens of `seq` that were just allocated: checks that
    /// no shared block is written, performs the copies, writes the tokens in every KV group,
    /// then reads what attention reads (each new token's window, in every group) and checks
    /// it is the sequence's own tokens: a block released too early and reused by another
    /// sequence, or a released entry read at all, fails here.
    fn run(&mut self, bm: &mut BlockManager, seq: &Sequence, new: usize) {
        let start = seq.num_computed_tokens;
        let mut batch = StepBatch::new();
        batch.push_sequence_groups(
            &seq.tokens[start..start + new],
            start,
            &seq.block_tables,
            self.block_size,
            true,
        );
        batch.block_copies = bm.take_block_copies();
        bm.check_step(&batch);
        for &(src, dst) in &batch.block_copies {
            let (src, dst) = (
                src as usize * self.block_size,
                dst as usize * self.block_size,
            );
            self.slots.copy_within(src..src + self.block_size, dst);
        }
        for group in 0..batch.num_groups() {
            for (&slot, &token) in batch.slots(group).iter().zip(&batch.token_ids) {
                self.slots[slot as usize] = Some(token);
            }
        }
        for (group, window) in bm.group_windows().iter().enumerate() {
            for position in start..start + new {
                let first = window.map_or(0, |w| (position + 1).saturating_sub(w));
                self.assert_reads(seq, group, first..position + 1);
            }
        }
    }

    fn assert_reads(&self, seq: &Sequence, group: usize, positions: std::ops::Range<usize>) {
        for pos in positions {
            let block = seq.block_tables[group][pos / self.block_size];
            assert_ne!(
                block, RELEASED_BLOCK,
                "sequence {} reads position {pos} of group {group} from a released block",
                seq.id
            );
            assert_eq!(
                self.slots[block as usize * self.block_size + pos % self.block_size],
                Some(seq.tokens[pos]),
                "sequence {} reads a wrong token at position {pos} of group {group}",
                seq.id
            );
        }
    }

    /// Every held block of `seq` still holds its tokens.
    fn assert_reads_back(&self, seq: &Sequence) {
        for (group, table) in seq.block_tables.iter().enumerate() {
            for pos in 0..seq.num_computed_tokens {
                if table[pos / self.block_size] != RELEASED_BLOCK {
                    self.assert_reads(seq, group, pos..pos + 1);
                }
            }
        }
    }
}

/// Admits `seq` (which holds no blocks) through the prefix cache and computes all its tokens.
/// False, changing nothing, when it does not fit.
fn admit(bm: &mut BlockManager, cache: &mut FakeCache, seq: &mut Sequence) -> bool {
    let prefix = bm.find_cached_prefix(seq);
    let cached = prefix.num_blocks() * bm.block_size();
    assert!(cached < seq.len(), "the last token is always computed");
    let free_before = bm.num_free_blocks();
    let new = seq.len() - cached;
    if !bm.allocate_slots(seq, new, Some(prefix)) {
        assert_eq!(
            bm.num_free_blocks(),
            free_before,
            "a refusal changes nothing"
        );
        assert!(seq.block_tables.is_empty());
        return false;
    }
    assert_eq!(seq.num_computed_tokens, cached);
    cache.run(bm, seq, new);
    seq.num_computed_tokens = seq.len();
    true
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn bookkeeping_survives_any_interleaving(
        num_blocks in 1usize..24,
        block_size in 1usize..6,
        caching in any::<bool>(),
        groups in prop_oneof![
            Just(vec![None]),
            (1usize..12).prop_map(|w| vec![None, Some(w)]),
            (1usize..12).prop_map(|w| vec![None, Some(w), Some(w)]),
            (1usize..12).prop_map(|w| vec![Some(w), Some(w)]),
        ],
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut bm = BlockManager::with_groups(num_blocks, block_size, caching, groups);
        let mut cache = FakeCache { block_size, slots: vec![None; num_blocks * block_size] };
        let mut live: Vec<Sequence> = Vec::new();
        let mut next_id = 0;
        for op in ops {
            match op {
                Op::Admit { len, alphabet, seed } => {
                    let tokens = (0..len as u32).map(|i| (i.wrapping_mul(seed | 1) >> 3) % alphabet).collect();
                    let mut seq = Sequence::new(next_id, tokens, 0, next_id);
                    next_id += 1;
                    if admit(&mut bm, &mut cache, &mut seq) {
                        live.push(seq);
                    }
                }
                Op::Decode { i, token } if !live.is_empty() => {
                    let n = live.len();
                    let seq = &mut live[i % n];
                    seq.tokens.push(token);
                    let tables = seq.block_tables.clone();
                    if bm.allocate_slots(seq, 1, None) {
                        cache.run(&mut bm, seq, 1);
                        seq.num_computed_tokens += 1;
                    } else {
                        prop_assert_eq!(&seq.block_tables, &tables, "a refusal changes nothing");
                        prop_assert!(bm.take_block_copies().is_empty());
                        // Out of blocks: what the scheduler does is preempt; here, free it.
                        let mut seq = live.swap_remove(i % n);
                        bm.free(&mut seq);
                    }
                }
                Op::Fork { i } if !live.is_empty() => {
                    let parent = &live[i % live.len()];
                    let mut child = Sequence::new(next_id, parent.tokens.clone(), 0, next_id);
                    next_id += 1;
                    let free_before = bm.num_free_blocks();
                    bm.fork(parent, &mut child);
                    prop_assert_eq!(bm.num_free_blocks(), free_before, "a fork takes no block");
                    for &id in child.block_tables.iter().flatten().filter(|&&id| id != RELEASED_BLOCK) {
                        prop_assert!(bm.ref_count(id) > 1);
                    }
                    live.push(child);
                }
                Op::Preempt { i } if !live.is_empty() => {
                    let mut seq = live.swap_remove(i % live.len());
                    bm.free(&mut seq);
                    prop_assert!(seq.block_tables.is_empty());
                    prop_assert_eq!(seq.num_computed_tokens, 0);
                    if admit(&mut bm, &mut cache, &mut seq) {
                        live.push(seq);
                    }
                }
                Op::Free { i } if !live.is_empty() => {
                    let n = live.len();
                    let mut seq = live.swap_remove(i % n);
                    bm.free(&mut seq);
                    prop_assert!(seq.block_tables.is_empty());
                }
                _ => {}
            }
            bm.check_invariants(live.iter());
            for seq in &live {
                cache.assert_reads_back(seq);
            }
        }
        for mut seq in live.drain(..) {
            bm.free(&mut seq);
        }
        bm.check_invariants([]);
        prop_assert_eq!(bm.num_free_blocks(), num_blocks, "no block leaks");
    }
}
