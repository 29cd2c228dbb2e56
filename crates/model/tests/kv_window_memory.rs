//! KV memory per token of a Gemma 3 270M-shaped model (18 layers: 15 with a 512-position
//! window, 3 global; 1 KV head of 256; f16 cache) at a 4k context, with and without KV groups
//! (window-aware freeing), measured on the real scheduler and block manager: a 4,000-token
//! prompt prefilled in the default 512-token chunks, then decoded to 4,096 tokens. The blocks
//! held at each step times the bytes of a block of that cache layout are the K/V memory the
//! sequence pins. No forward pass is needed: which blocks are held depends on the allocator
//! only, and the bytes per block come from the cache layout the runner builds.
//!
//! `cargo test -p minserve-model --test kv_window_memory -- --nocapture` prints the figures
//! that docs/gemma3.md and docs/paged-attention.md quote.

use minserve_core::block_manager::BlockManager;
use minserve_core::scheduler::{Scheduler, SchedulerConfig};
use minserve_core::sequence::Sequence;
use minserve_model::{synthetic, KvCache, KvDtype, KvGroups};

const CONTEXT: usize = 4096;
const BLOCK_SIZE: usize = 16;

/// (bytes per token held at 4k, peak bytes per token over the run) for `groups`.
fn bytes_per_token(groups: &KvGroups) -> (f64, f64) {
    let config = synthetic::preset("gemma3-270m").unwrap();
    let bytes_per_block = KvCache::bytes_per_block(&config, groups, KvDtype::F16, BLOCK_SIZE);
    let num_blocks = 4 * CONTEXT / BLOCK_SIZE * groups.num_groups();
    let blocks = BlockManager::with_groups(num_blocks, BLOCK_SIZE, true, groups.windows.clone());
    let mut scheduler = Scheduler::new(SchedulerConfig::default(), blocks);
    scheduler.add(Sequence::new(
        0,
        (0..4000).map(|t| t % 1000).collect(),
        0,
        0,
    ));
    let mut peak = 0;
    loop {
        let step = scheduler.schedule();
        assert!(!step.is_empty() && step.preempted.is_empty());
        let held = num_blocks - scheduler.blocks().num_free_blocks();
        peak = peak.max(held);
        scheduler.mark_computed(&step);
        let seq = scheduler.get_mut(0).unwrap();
        if seq.num_computed_tokens == CONTEXT {
            let per_token = |blocks: usize| (blocks * bytes_per_block) as f64 / CONTEXT as f64;
            return (per_token(held), per_token(peak));
        }
        if seq.num_computed_tokens == seq.len() {
            seq.tokens.push(1);
        }
    }
}

#[test]
fn window_aware_groups_cut_kv_memory_per_token_at_4k() {
    let config = synthetic::preset("gemma3-270m").unwrap();
    let (single, single_peak) = bytes_per_token(&KvGroups::single(&config));
    let groups = KvGroups::of(&config);
    let (grouped, grouped_peak) = bytes_per_token(&groups);
    eprintln!(
        "gemma3-270m shape, f16, {CONTEXT} tokens: one group {single:.0} B/token \
         (peak {single_peak:.0}); {} groups of {} layers {grouped:.0} B/token (peak \
         {grouped_peak:.0}); {:.2}x less",
        groups.num_groups(),
        groups.layers_per_group,
        single / grouped
    );
    // 18 layers x 2 (K, V) x 256 x 2 bytes.
    assert_eq!(single, 18_432.0);
    assert_eq!((groups.num_groups(), groups.layers_per_group), (6, 3));
    // 3 global layers keep every token (3,072 B); 15 local layers keep only the blocks the
    // window of the next token (position 4,096: 3,585..=4,096) still reads, 32 at this
    // position (33 where the window does not start on a block boundary): 15 x 1,024 x 32 x
    // 16 / 4,096 = 1,920 B.
    assert_eq!(grouped, 3_072.0 + 1_920.0);
    // While a 512-token chunk is prefilled, each local group holds the chunk and the window
    // before it.
    assert!(grouped_peak < single / 2.0);
}
