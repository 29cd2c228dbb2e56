//! Property tests of the block manager: random interleavings of admitting prompts (with prefix
//! lookups), decoding, preempting and finishing sequences never break its bookkeeping.

use minserve_core::block_manager::BlockManager;
use minserve_core::sequence::Sequence;
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
    /// Free live sequence `i % live` (finished, aborted or preempted).
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
        any::<usize>().prop_map(|i| Op::Free { i }),
    ]
}

/// Every block holding a position in `range` must be owned by `seq` alone: a block shared with
/// another sequence (or the prefix cache's other users) must never be written.
fn assert_private(bm: &BlockManager, seq: &Sequence, range: std::ops::Range<usize>) {
    for pos in range {
        let id = seq.block_table[pos / bm.block_size()];
        assert_eq!(
            bm.ref_count(id),
            1,
            "sequence {} would write shared block {id}",
            seq.id
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn bookkeeping_survives_any_interleaving(
        num_blocks in 1usize..24,
        block_size in 1usize..6,
        caching in any::<bool>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut bm = BlockManager::new(num_blocks, block_size, caching);
        let mut live: Vec<Sequence> = Vec::new();
        let mut next_id = 0;
        for op in ops {
            match op {
                Op::Admit { len, alphabet, seed } => {
                    let tokens = (0..len as u32).map(|i| (i.wrapping_mul(seed | 1) >> 3) % alphabet).collect();
                    let mut seq = Sequence::new(next_id, tokens, 0, next_id);
                    next_id += 1;
                    let prefix = bm.find_cached_prefix(&seq);
                    let cached = prefix.blocks.len() * block_size;
                    prop_assert!(cached < seq.len(), "the last token is always computed");
                    let free_before = bm.num_free_blocks();
                    if bm.allocate_slots(&mut seq, len - cached, Some(prefix)) {
                        prop_assert_eq!(seq.num_computed_tokens, cached);
                        assert_private(&bm, &seq, cached..len);
                        seq.num_computed_tokens = len;
                        live.push(seq);
                    } else {
                        prop_assert_eq!(bm.num_free_blocks(), free_before, "a refusal changes nothing");
                        prop_assert!(seq.block_table.is_empty());
                    }
                }
                Op::Decode { i, token } if !live.is_empty() => {
                    let n = live.len();
                    let seq = &mut live[i % n];
                    seq.tokens.push(token);
                    if bm.allocate_slots(seq, 1, None) {
                        let pos = seq.len() - 1;
                        assert_private(&bm, seq, pos..pos + 1);
                        seq.num_computed_tokens += 1;
                    } else {
                        // Out of blocks: what the scheduler does is preempt; here, free it.
                        let mut seq = live.swap_remove(i % n);
                        bm.free(&mut seq);
                    }
                }
                Op::Free { i } if !live.is_empty() => {
                    let n = live.len();
                    let mut seq = live.swap_remove(i % n);
                    bm.free(&mut seq);
                    prop_assert!(seq.block_table.is_empty());
                }
                _ => {}
            }
            bm.check_invariants(live.iter());
        }
        for mut seq in live.drain(..) {
            bm.free(&mut seq);
        }
        bm.check_invariants([]);
        prop_assert_eq!(bm.num_free_blocks(), num_blocks, "no block leaks");
    }
}
