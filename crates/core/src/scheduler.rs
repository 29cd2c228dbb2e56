//! The continuous-batching scheduler.
//!
//! Every step spends a budget of `max_num_batched_tokens` over at most `max_num_seqs`
//! sequences (vLLM v1 style, no separate prefill and decode phases):
//!
//! 1. **Running sequences first**, in priority order. Each asks for the tokens it has not
//!    computed: one for a decoding sequence, the rest of its prompt (as much as the budget
//!    allows: *chunked prefill*) for one whose prompt was split. If the block manager has no
//!    room for them, the **lowest-priority, newest** running sequence is **preempted**
//!    (`Scheduler::make_room`, `Scheduler::preempt`): its blocks are freed and it goes back to
//!    the waiting queue keeping every token it generated; it will recompute them later (its
//!    prefix may still be cached), or, under `PreemptionMode::Swap`, its K/V wait in the
//!    runner's host pool (`swap.rs`). It rejoins the queue where its order says: under FCFS at the
//!    front (it arrived before everything waiting), under priority behind every more urgent
//!    waiting sequence.
//! 2. **Then waiting sequences**, in FCFS or priority order, while budget, sequence slots and
//!    blocks last. A newcomer first adopts the longest cached prefix of its prompt (prefix
//!    caching), then schedules as much of the rest as fits. The queue's head blocks those
//!    behind it, so that a long prompt is not starved by short ones (with `backfill`, up to
//!    that many may pass it: `backfill.rs`; with `priority_preemption`, it may first preempt
//!    less urgent running sequences: `Scheduler::admit_waiting`; under fair share, a request
//!    of a tenant below its share of seats takes one from the tenant furthest above its share:
//!    `Scheduler::admit_by_fair_share`). The `n` samples of one
//!    request are admitted together: the first one alone computes the prompt, and counts for
//!    all `n` against `max_num_seqs`. Under `Batching::Static` nothing is admitted while a
//!    batch runs (`static_batch.rs`).
//! 3. **Forks** (after the step ran, [`Scheduler::fork_samples`]): once a request's first
//!    sample has computed its prompt, the others are forked from it, sharing its blocks
//!    (copy-on-write, see `block_manager.rs`), and run as ordinary sequences from then on.
//!
//! The result is a [`ScheduledStep`]: the model's [`StepBatch`] and, per scheduled sequence,
//! how many tokens it computes and whether it samples.
//!
//! The scheduler owns the [`BlockManager`] and every unfinished [`Sequence`]: a sequence's
//! blocks change only here, and a sequence leaves ([`Scheduler::remove`]) with its blocks.

use std::collections::{HashMap, VecDeque};

use crate::backfill::Backfill;
use crate::batch::StepBatch;
use crate::block_manager::BlockManager;
use crate::fair_share::{tenant_of, FairQueue, SeatShares};
use crate::sequence::{SeqId, Sequence};
use crate::static_batch::StaticBatch;
use crate::swap::{SwapIn, SwapSpace};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulingPolicy {
    /// First come, first served.
    #[default]
    Fcfs,
    /// Lowest `priority` value first, then arrival order.
    Priority,
    /// Weighted fair queuing across tenants: lowest virtual start tag first, then arrival
    /// order (see `fair_share.rs`).
    FairShare,
}

/// When waiting sequences may join the running batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Batching {
    /// At every step (Orca's iteration-level scheduling).
    #[default]
    Continuous,
    /// Only once the running batch has emptied (see `static_batch.rs`).
    Static,
}

/// What happens to a preempted sequence's K/V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PreemptionMode {
    /// Dropped; recomputed (as one prefill, partly from the prefix cache) when resumed.
    #[default]
    Recompute,
    /// Copied to the runner's host pool and back when resumed (see `swap.rs`); recomputed when
    /// the host pool is full.
    Swap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens computed per step at most (prompt chunks and decode tokens together).
    pub max_num_batched_tokens: usize,
    /// Sequences in a step at most.
    pub max_num_seqs: usize,
    pub policy: SchedulingPolicy,
    pub batching: Batching,
    /// Waiting sequences that may be admitted ahead of a queue head that does not fit, per
    /// head (see `backfill.rs`); 0: the head blocks everything behind it.
    pub backfill: usize,
    /// Whether a waiting sequence that does not fit may preempt running sequences of a lower
    /// priority (a greater `priority` value) to make room.
    pub priority_preemption: bool,
    pub preemption_mode: PreemptionMode,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            policy: SchedulingPolicy::Fcfs,
            batching: Batching::Continuous,
            backfill: 0,
            priority_preemption: false,
            preemption_mode: PreemptionMode::Recompute,
        }
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub id: SeqId,
    pub num_new_tokens: usize,
    /// Whether this step computes the sequence's last pending token, so it samples next.
    pub samples: bool,
    /// Prompt tokens served from the prefix cache when the sequence was admitted this step.
    pub num_cached_tokens: usize,
    /// Whether the tokens are (part of) a prompt, or a recomputation after preemption, rather
    /// than a decode step.
    pub is_prefill: bool,
    /// Of `num_new_tokens`, draft tokens to verify (speculative decoding): they follow the
    /// sequence's pending token, and the step returns logits for each of them and for it.
    pub num_draft_tokens: usize,
}

#[derive(Debug, Clone, Default)]
pub struct ScheduledStep {
    pub batch: StepBatch,
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences pushed back to the waiting queue during this step.
    pub preempted: Vec<SeqId>,
    /// Of those, the ones whose K/V went to the host pool (the others recompute).
    pub swapped_out: Vec<SeqId>,
    /// Sequences resumed this step from the host pool.
    pub swapped_in: Vec<SeqId>,
}

impl ScheduledStep {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    /// Every unfinished sequence, running or waiting, by id.
    seqs: HashMap<SeqId, Sequence>,
    /// Admitted sequences in priority order (FCFS: arrival order); the last is preempted first.
    running: Vec<SeqId>,
    /// Sequences waiting for admission, the next to admit at the front.
    waiting: VecDeque<SeqId>,
    /// Samples of a request not forked yet, by the sequence they will be forked from (which
    /// computes the prompt for all of them).
    unforked: HashMap<SeqId, Vec<Sequence>>,
    num_preemptions: u64,
    /// Tenants' virtual finish tags, under the fair-share policy.
    fair: FairQueue,
    static_batch: StaticBatch,
    backfill: Backfill,
    swap: SwapSpace,
}

impl Scheduler {
    /// A scheduler that allocates the KV cache blocks of `blocks`.
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Self::with_swap_space(config, blocks, 0)
    }

    /// A scheduler whose swap preemption (`PreemptionMode::Swap`) may use `host_blocks` blocks
    /// of the runner's host pool.
    pub fn with_swap_space(
        config: SchedulerConfig,
        blocks: BlockManager,
        host_blocks: usize,
    ) -> Self {
        let host_blocks = match config.preemption_mode {
            PreemptionMode::Swap => host_blocks,
            PreemptionMode::Recompute => 0,
        };
        Self {
            config,
            blocks,
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            unforked: HashMap::new(),
            num_preemptions: 0,
            fair: FairQueue::default(),
            static_batch: StaticBatch::default(),
            backfill: Backfill::new(config.backfill),
            swap: SwapSpace::new(host_blocks),
        }
    }

    /// The host pool's bookkeeping, for statistics and traces.
    pub fn swap_space(&self) -> &SwapSpace {
        &self.swap
    }

    /// How many waiting sequences have been admitted ahead of `id` by backfill.
    pub fn times_overtaken(&self, id: SeqId) -> usize {
        self.backfill.times_overtaken(id)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The KV cache bookkeeping, for statistics, traces and invariant checks.
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Queues the samples of one request, all with the same prompt: the first is scheduled
    /// now, the others are forked from it once it has computed the prompt.
    pub fn add_samples(&mut self, mut samples: Vec<Sequence>) {
        if samples.is_empty() {
            return;
        }
        let mut forks = samples.split_off(1);
        let mut first = samples.pop().expect("one sample is left");
        self.assign_fair_tag(&mut first);
        for fork in &mut forks {
            fork.fair_tag = first.fair_tag;
        }
        if !forks.is_empty() {
            self.unforked.insert(first.id, forks);
        }
        self.enqueue(first);
    }

    pub fn add(&mut self, mut seq: Sequence) {
        self.assign_fair_tag(&mut seq);
        self.enqueue(seq);
    }

    /// Under the fair-share policy, the sequence's virtual start tag, from the head of the
    /// waiting queue (the virtual time) and its tenant's share.
    fn assign_fair_tag(&mut self, seq: &mut Sequence) {
        if self.config.policy == SchedulingPolicy::FairShare {
            let head = self.waiting.front().map(|w| self.seqs[w].fair_tag);
            seq.fair_tag = self.fair.start_tag(seq.fair_claim(), head);
        }
    }

    fn enqueue(&mut self, seq: Sequence) {
        let at = self.waiting_position(&seq, false);
        self.waiting.insert(at, seq.id);
        self.seqs.insert(seq.id, seq);
    }

    /// Where `seq` joins the waiting queue. Under FCFS a newcomer goes to the back and a
    /// preempted sequence to the front: it was admitted, so it arrived before everything
    /// waiting. Under priority order both go behind every waiting sequence with a smaller
    /// [`order_key`](Sequence::order_key). Under fair share both go by their virtual start tag,
    /// which a preempted sequence keeps: it is usually among the smallest.
    fn waiting_position(&self, seq: &Sequence, preempted: bool) -> usize {
        match self.config.policy {
            SchedulingPolicy::Fcfs if preempted => 0,
            SchedulingPolicy::Fcfs => self.waiting.len(),
            SchedulingPolicy::Priority => {
                let key = seq.order_key();
                self.waiting
                    .partition_point(|w| self.seqs[w].order_key() <= key)
            }
            SchedulingPolicy::FairShare => {
                let key = (seq.fair_tag, seq.arrival);
                self.waiting.partition_point(|w| {
                    let waiting = &self.seqs[w];
                    (waiting.fair_tag, waiting.arrival) <= key
                })
            }
        }
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        self.seqs.get_mut(&id)
    }

    /// Running sequences, in priority order.
    pub fn running(&self) -> impl Iterator<Item = &Sequence> {
        self.running.iter().map(|id| &self.seqs[id])
    }

    /// Removes a sequence wherever it is (finished or aborted) and frees its blocks at once;
    /// samples still waiting to be forked from it go with it.
    pub fn remove(&mut self, id: SeqId) -> Option<Sequence> {
        self.remove_freeing(id, BlockManager::free)
    }

    /// Like [`remove`](Self::remove), for a sequence whose step failed: the blocks that step
    /// was to write hold nothing trustworthy, so they also leave the prefix cache.
    pub fn remove_failed(&mut self, id: SeqId) -> Option<Sequence> {
        self.remove_freeing(id, BlockManager::free_and_forget)
    }

    fn remove_freeing(
        &mut self,
        id: SeqId,
        free: fn(&mut BlockManager, &mut Sequence),
    ) -> Option<Sequence> {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return self.remove_unforked(id);
        };
        self.unforked.remove(&id);
        self.swap.discard(id);
        self.backfill.forget(id);
        if let Some(i) = self.running.iter().position(|&r| r == id) {
            self.running.remove(i);
        } else if let Some(i) = self.waiting.iter().position(|&w| w == id) {
            self.waiting.remove(i);
        }
        free(&mut self.blocks, &mut seq);
        Some(seq)
    }

    fn remove_unforked(&mut self, id: SeqId) -> Option<Sequence> {
        let (&parent, forks) = self
            .unforked
            .iter_mut()
            .find(|(_, forks)| forks.iter().any(|f| f.id == id))?;
        let i = forks.iter().position(|f| f.id == id)?;
        let seq = forks.remove(i);
        if forks.is_empty() {
            self.unforked.remove(&parent);
        }
        Some(seq)
    }

    /// Plans the next step. See the module documentation for the policy.
    pub fn schedule(&mut self) -> ScheduledStep {
        let mut step = ScheduledStep::default();
        let mut budget = self.config.max_num_batched_tokens;
        self.swap.begin_step();

        // 1. Running sequences, highest priority first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let num_new = self.seqs[&id].num_pending_tokens().min(budget);
            if num_new == 0 {
                i += 1; // sampled last step; waits for the engine to append its token
                continue;
            }
            let num_drafts = self.allocate_drafts(id, budget - num_new);
            if num_drafts == 0 && !self.make_room(i, num_new, &mut step) {
                break; // sequence `i` itself was preempted; so is everything after it
            }
            let seq = &self.seqs[&id];
            step.seqs.push(ScheduledSeq {
                id,
                num_new_tokens: num_new + num_drafts,
                samples: seq.num_computed_tokens + num_new == seq.len(),
                num_cached_tokens: 0,
                is_prefill: seq.num_computed_tokens + 1 < seq.len(),
                num_draft_tokens: num_drafts,
            });
            budget -= num_new + num_drafts;
            i += 1;
        }

        // 2. Waiting sequences, unless this step had to preempt (no room to spare). A request's
        // samples run together once forked, so its first one takes seats for all of them.
        let mut seats = self.running.len() + self.num_unforked(&self.running);
        let may_admit = match self.config.batching {
            Batching::Continuous => true,
            Batching::Static => self.static_batch.begin_admission(
                self.running.is_empty(),
                self.waiting.iter().map(|id| &self.seqs[id]),
            ),
        };
        if may_admit && step.preempted.is_empty() {
            self.admit_waiting(&mut step, &mut budget, &mut seats);
        }
        if self.config.batching == Batching::Static {
            self.static_batch.end_admission(budget == 0);
        }

        step.batch = self.build_batch(&step.seqs);
        step.batch.block_copies = self.blocks.take_block_copies();
        // A step with nothing to run is not executed, so its swaps wait for the next one,
        // which makes them first; nothing writes a block in between.
        if !step.seqs.is_empty() {
            (step.batch.swap_out, step.batch.swap_in) = self.swap.take_swaps();
        }
        if cfg!(debug_assertions) {
            self.blocks.check_step(&step.batch);
        }
        step
    }

    /// Admits waiting sequences in queue order while budget, seats and blocks last. The first
    /// that does not fit is the *blocked head*: with priority preemption it may first preempt
    /// less urgent running sequences; under fair share, a request of a tenant below its share
    /// of seats may take one from a tenant above its share (see `fair_share.rs`); then, with
    /// backfill, sequences behind it that fit may go first, as many as its bound allows.
    fn admit_waiting(&mut self, step: &mut ScheduledStep, budget: &mut usize, seats: &mut usize) {
        let mut blocked_head: Option<SeqId> = None;
        let mut admitted = Vec::new();
        let mut shares: Option<SeatShares> = None;
        let mut i = 0;
        while *budget > 0 && i < self.waiting.len() {
            let blocked = *seats >= self.config.max_num_seqs
                || blocked_head.is_some_and(|head| !self.backfill.may_overtake(head));
            if blocked {
                if blocked_head.is_none()
                    && self.admit_by_fair_share(i, &mut shares, &mut admitted, step, budget, seats)
                {
                    continue;
                }
                break;
            }
            let id = self.waiting[i];
            if self.config.batching == Batching::Static
                && !self.static_batch.admits(&self.seqs[&id])
            {
                i += 1;
                continue;
            }
            let group = 1 + self.num_unforked(&[id]);
            // A request with more samples than seats still runs, alone.
            let has_seats = *seats + group <= self.config.max_num_seqs || *seats == 0;
            if has_seats && self.admit(id, *budget, step) {
                *budget -= step.seqs.last().expect("just admitted").num_new_tokens;
                *seats += group;
                self.waiting.remove(i);
                self.insert_running(id);
                admitted.push(id);
                match blocked_head {
                    Some(head) => self.backfill.overtook(head),
                    None => self.backfill.forget(id),
                }
                continue;
            }
            if blocked_head.is_none() {
                if self.config.priority_preemption
                    && self.preempt_for(id, &admitted, step, budget, seats)
                {
                    continue; // room was made: try the head again
                }
                if self.admit_by_fair_share(i, &mut shares, &mut admitted, step, budget, seats) {
                    continue;
                }
                blocked_head = Some(id);
            }
            i += 1;
        }
    }

    /// Under fair share, once the queue is blocked from position `from` on: admits the first
    /// waiting request there whose tenant stays within its share of seats by taking them, after
    /// preempting the newest running sequence of the tenant furthest above its share (which
    /// stays at or above it). `shares` is computed on first use and kept up to date. False,
    /// changing nothing, when no such pair exists.
    fn admit_by_fair_share(
        &mut self,
        from: usize,
        shares: &mut Option<SeatShares>,
        admitted: &mut Vec<SeqId>,
        step: &mut ScheduledStep,
        budget: &mut usize,
        seats: &mut usize,
    ) -> bool {
        if self.config.policy != SchedulingPolicy::FairShare
            || self.config.batching == Batching::Static
        {
            return false;
        }
        let shares = shares.get_or_insert_with(|| self.seat_shares());
        let Some((taker, claim, group)) = self.waiting.iter().skip(from).find_map(|&id| {
            let claim = self.seqs[&id].fair_claim().cloned();
            let group = 1 + self.num_unforked(&[id]);
            shares
                .may_take(claim.as_ref(), group)
                .then_some((id, claim, group))
        }) else {
            return false;
        };
        let Some(giver) = shares.giver(group) else {
            return false;
        };
        let Some(victim) = self.running.iter().rev().copied().find(|id| {
            tenant_of(self.seqs[id].fair_claim()).0 == giver
                && !admitted.contains(id)
                && self.num_unforked(&[*id]) + 1 == group
        }) else {
            return false;
        };
        if let Some(at) = step.seqs.iter().position(|s| s.id == victim) {
            *budget += step.seqs.remove(at).num_new_tokens;
        }
        *seats -= group;
        self.running.retain(|&r| r != victim);
        self.preempt(victim, step);
        shares.move_seats(&giver, claim.as_ref(), group);
        if !self.admit(taker, *budget, step) {
            return false; // its blocks do not fit even now; the freed seat goes in queue order
        }
        *budget -= step.seqs.last().expect("just admitted").num_new_tokens;
        *seats += group;
        self.waiting.retain(|&w| w != taker);
        self.insert_running(taker);
        self.backfill.forget(taker);
        admitted.push(taker);
        true
    }

    /// Seats each tenant with work holds (running sequences and their samples to fork).
    fn seat_shares(&self) -> SeatShares {
        let mut shares = SeatShares::new(self.config.max_num_seqs);
        for id in &self.running {
            shares.add(self.seqs[id].fair_claim(), 1 + self.num_unforked(&[*id]));
        }
        for id in &self.waiting {
            shares.add(self.seqs[id].fair_claim(), 0);
        }
        shares
    }

    /// Schedules waiting sequence `id` for up to `budget` tokens: a swapped-out one comes back
    /// from the host pool, any other adopts its longest cached prefix first. False, changing
    /// nothing, when its blocks do not fit.
    fn admit(&mut self, id: SeqId, budget: usize, step: &mut ScheduledStep) -> bool {
        let seq = self.seqs.get_mut(&id).expect("waiting sequences are known");
        if let Some(computed) = self.swap.computed_tokens(id) {
            let num_new = (seq.len() - computed).min(budget);
            return match self.swap.swap_in(seq, &mut self.blocks, num_new) {
                SwapIn::Resumed => {
                    step.seqs.push(ScheduledSeq {
                        id,
                        num_new_tokens: num_new,
                        samples: computed + num_new == seq.len(),
                        num_cached_tokens: 0,
                        is_prefill: computed + 1 < seq.len(),
                        num_draft_tokens: 0,
                    });
                    step.swapped_in.push(id);
                    true
                }
                SwapIn::NoRoom | SwapIn::NotSwapped => false,
            };
        }
        let prefix = self.blocks.find_cached_prefix(seq);
        let num_cached = prefix.num_blocks() * self.blocks.block_size();
        let num_new = (seq.len() - num_cached).min(budget);
        if !self.blocks.allocate_slots(seq, num_new, Some(prefix)) {
            return false;
        }
        step.seqs.push(ScheduledSeq {
            id,
            num_new_tokens: num_new,
            samples: num_cached + num_new == seq.len(),
            num_cached_tokens: num_cached,
            is_prefill: true,
            num_draft_tokens: 0,
        });
        true
    }

    /// Priority preemption: preempts the least urgent running sequence if it is strictly less
    /// urgent than the waiting sequence `head` and was not admitted in this step (`admitted`).
    /// Its share of this step, if it had one, goes back to the budget. False when there is no
    /// such victim.
    fn preempt_for(
        &mut self,
        head: SeqId,
        admitted: &[SeqId],
        step: &mut ScheduledStep,
        budget: &mut usize,
        seats: &mut usize,
    ) -> bool {
        let Some(&victim) = self.running.last() else {
            return false;
        };
        if self.seqs[&victim].priority <= self.seqs[&head].priority || admitted.contains(&victim) {
            return false;
        }
        if let Some(at) = step.seqs.iter().position(|s| s.id == victim) {
            *budget += step.seqs.remove(at).num_new_tokens;
        }
        *seats -= 1 + self.num_unforked(&[victim]);
        self.running.pop();
        self.preempt(victim, step);
        true
    }

    /// Samples still to be forked from the sequences `ids`.
    fn num_unforked(&self, ids: &[SeqId]) -> usize {
        if self.unforked.is_empty() {
            return 0; // the common case, kept off the per-step path over all running sequences
        }
        ids.iter()
            .filter_map(|id| self.unforked.get(id))
            .map(Vec::len)
            .sum()
    }

    /// Speculative decoding: allocates blocks for running sequence `id`'s pending token and as
    /// many of its draft tokens as `spare_budget` allows, and returns how many drafts it
    /// scheduled. Drafts are a bet, never worth preempting for: 0 (the drafts dropped, nothing
    /// allocated) unless the sequence is decoding (one pending token) and the blocks are free.
    fn allocate_drafts(&mut self, id: SeqId, spare_budget: usize) -> usize {
        let seq = self.seqs.get_mut(&id).expect("running sequences are known");
        if seq.draft_tokens.is_empty() {
            return 0;
        }
        let num_drafts = match seq.num_pending_tokens() {
            1 => seq.draft_tokens.len().min(spare_budget),
            _ => 0,
        };
        seq.draft_tokens.truncate(num_drafts);
        if num_drafts == 0 || !self.blocks.allocate_slots(seq, 1 + num_drafts, None) {
            seq.draft_tokens.clear();
            return 0;
        }
        num_drafts
    }

    /// After a step that verified sequence `id`'s drafts, once the engine has appended the
    /// tokens it kept: `accepted` drafts are now computed tokens, the K/V of the others lies past
    /// the sequence's end (the next step overwrites it), and the blocks wholly past that end go
    /// back to the pool.
    pub fn accept_drafts(&mut self, id: SeqId, accepted: usize) {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return; // finished (or aborted) on one of the step's tokens
        };
        seq.draft_tokens.clear();
        seq.num_computed_tokens += accepted;
        debug_assert!(seq.num_computed_tokens < seq.len());
        let keep = self.blocks.blocks_for(seq.len());
        self.blocks.truncate(seq, keep);
    }

    /// Allocates blocks for `num_new` tokens of `running[i]`, preempting from the back of the
    /// running list until they fit. False if `running[i]` itself had to go.
    fn make_room(&mut self, i: usize, num_new: usize, step: &mut ScheduledStep) -> bool {
        let id = self.running[i];
        loop {
            let seq = self.seqs.get_mut(&id).expect("running sequences are known");
            if self.blocks.allocate_slots(seq, num_new, None) {
                return true;
            }
            let Some(victim) = self.running.pop() else {
                return false;
            };
            self.preempt(victim, step);
            if victim == id {
                return false;
            }
        }
    }

    /// Frees the blocks of running sequence `id` (already out of the running list), its K/V
    /// swapped to the host pool first under swap preemption, and puts it back in the waiting
    /// queue, in its place there; it keeps its tokens.
    fn preempt(&mut self, id: SeqId, step: &mut ScheduledStep) {
        let seq = self.seqs.get_mut(&id).expect("running sequences are known");
        seq.draft_tokens.clear();
        if self.swap.swap_out(seq, &mut self.blocks) {
            step.swapped_out.push(id);
        } else {
            self.blocks.free(seq);
        }
        self.num_preemptions += 1;
        step.preempted.push(id);
        let at = self.waiting_position(&self.seqs[&id], true);
        self.waiting.insert(at, id);
    }

    fn insert_running(&mut self, id: SeqId) {
        let key = self.seqs[&id].order_key();
        let at = self
            .running
            .partition_point(|r| self.seqs[r].order_key() <= key);
        self.running.insert(at, id);
    }

    fn build_batch(&self, scheduled: &[ScheduledSeq]) -> StepBatch {
        let block_size = self.blocks.block_size();
        let mut batch = StepBatch::new();
        for s in scheduled {
            let seq = &self.seqs[&s.id];
            let start = seq.num_computed_tokens;
            if s.num_draft_tokens > 0 {
                let mut tokens = seq.tokens[start..].to_vec();
                tokens.extend_from_slice(&seq.draft_tokens);
                batch.push_scored_sequence(&tokens, start, &seq.block_tables, block_size);
                continue;
            }
            batch.push_sequence_groups(
                &seq.tokens[start..start + s.num_new_tokens],
                start,
                &seq.block_tables,
                block_size,
                s.samples,
            );
        }
        batch
    }

    /// Called after the step ran: the scheduled tokens are now computed. Draft tokens are not
    /// tokens yet: those accepted are counted by [`accept_drafts`](Self::accept_drafts).
    pub fn mark_computed(&mut self, step: &ScheduledStep) {
        for s in &step.seqs {
            if let Some(seq) = self.seqs.get_mut(&s.id) {
                seq.num_computed_tokens += s.num_new_tokens - s.num_draft_tokens;
            }
        }
    }

    /// Forks the samples waiting on each sequence of `step` that has just computed its prompt
    /// (call it after [`mark_computed`](Self::mark_computed)): they share its blocks and
    /// computed tokens and run from now on. Returns `(parent, fork)` pairs; each fork draws its
    /// first token from its parent's logits row of this step.
    pub fn fork_samples(&mut self, step: &ScheduledStep) -> Vec<(SeqId, SeqId)> {
        let mut forked = Vec::new();
        for s in step.seqs.iter().filter(|s| s.samples) {
            let Some(mut forks) = self.unforked.remove(&s.id) else {
                continue;
            };
            let parent = &self.seqs[&s.id];
            debug_assert_eq!(parent.num_computed_tokens, parent.num_prompt_tokens);
            for fork in &mut forks {
                self.blocks.fork(parent, fork);
            }
            for fork in forks {
                forked.push((s.id, fork.id));
                let id = fork.id;
                self.seqs.insert(id, fork);
                self.insert_running(id);
            }
        }
        forked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_num_batched_tokens: usize, max_num_seqs: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_batched_tokens,
            max_num_seqs,
            ..SchedulerConfig::default()
        }
    }

    /// Runs a step the way the engine does: computed tokens are marked, sampling sequences
    /// get a new token.
    fn run_step(s: &mut Scheduler) -> ScheduledStep {
        let step = s.schedule();
        s.mark_computed(&step);
        let forked = s.fork_samples(&step);
        let sampled = step.seqs.iter().filter(|q| q.samples).map(|q| q.id);
        for id in sampled.chain(forked.iter().map(|&(_, fork)| fork)) {
            s.get_mut(id).unwrap().tokens.push(id as u32);
        }
        s.blocks().check_invariants(s.running());
        step
    }

    /// Found by the HTTP fuzzer (`crates/server/tests/reliability.rs`): the same prompt twice
    /// in one step. The second once adopted the block the first fills in that step as a cached
    /// prefix, and the step wrote a shared block (debug builds failed `check_step`, killing the
    /// engine thread). Blocks are registered once their step is taken, so the second computes
    /// its own copy; a third, a step later, shares the first's.
    #[test]
    fn the_same_prompt_twice_in_one_step_computes_it_twice() {
        let mut s = Scheduler::new(config(512, 8), BlockManager::new(16, 16, true));
        let prompt: Vec<u32> = (0..26).collect();
        s.add_samples(vec![Sequence::new(1, prompt.clone(), 0, 1)]);
        s.add_samples(vec![Sequence::new(2, prompt.clone(), 0, 2)]);
        let step = run_step(&mut s);
        assert_eq!(step.seqs.len(), 2);
        assert_eq!(step.seqs[1].num_cached_tokens, 0);
        let (a, b) = (s.get(1).unwrap(), s.get(2).unwrap());
        assert_ne!(a.block_tables[0][0], b.block_tables[0][0]);
        let first_block = a.block_tables[0][0];
        s.add_samples(vec![Sequence::new(3, prompt, 0, 3)]);
        let step = run_step(&mut s);
        let third = step.seqs.iter().find(|q| q.id == 3).unwrap();
        assert_eq!(third.num_cached_tokens, 16);
        assert_eq!(s.get(3).unwrap().block_tables[0][0], first_block);
    }

    /// Speculative decoding's bookkeeping: a decoding sequence's drafts are scheduled after
    /// its pending token, within the budget, with a logits row each; after the step, the
    /// accepted ones become computed tokens and the blocks only the rejected ones reached go
    /// back to the pool. A block is registered for prefix reuse only once real tokens fill
    /// it, never with drafts in it.
    #[test]
    fn drafts_are_verified_in_one_step_and_rejected_ones_rolled_back() {
        let mut s = Scheduler::new(config(6, 8), BlockManager::new(16, 4, true));
        s.add(Sequence::new(1, (0..7).collect(), 0, 1));
        // The prompt, in two chunks; then token 1 (`run_step` appends the id).
        while s.get(1).unwrap().len() < 8 {
            run_step(&mut s);
        }
        s.get_mut(1).unwrap().draft_tokens = vec![50, 51, 52, 53, 54, 55, 56];
        let step = s.schedule();
        assert_eq!(step.seqs[0].num_new_tokens, 6, "the budget caps the drafts");
        assert_eq!(step.seqs[0].num_draft_tokens, 5);
        assert_eq!(step.batch.token_ids, vec![1, 50, 51, 52, 53, 54]);
        assert_eq!(step.batch.positions, (7..13).collect::<Vec<u32>>());
        assert_eq!(step.batch.sampled_rows(), (0..6).collect::<Vec<_>>());
        assert_eq!(
            s.get(1).unwrap().num_logical_blocks(),
            4,
            "room for 13 tokens"
        );
        assert_eq!(s.blocks().num_free_blocks(), 12);
        s.mark_computed(&step);
        assert_eq!(
            s.get(1).unwrap().num_computed_tokens,
            8,
            "drafts are not tokens yet"
        );
        // Draft 50 accepted, 51 rejected: the engine appends 50 and the corrected token.
        s.get_mut(1).unwrap().tokens.extend([50, 60]);
        s.accept_drafts(1, 1);
        let seq = s.get(1).unwrap();
        assert_eq!((seq.num_computed_tokens, seq.len()), (9, 10));
        assert!(seq.draft_tokens.is_empty());
        assert_eq!(
            seq.num_logical_blocks(),
            3,
            "the block past token 10 is freed"
        );
        assert_eq!(s.blocks().num_free_blocks(), 13);
        assert_eq!(
            seq.block_hashes.len(),
            2,
            "block 2 held drafts: not registered"
        );
        s.blocks().check_invariants(s.running());

        // Decoding on without drafts fills block 2 with real tokens, and registers it: a
        // sequence with the same 12 tokens reuses all three blocks.
        while s.get(1).unwrap().len() < 13 {
            run_step(&mut s);
        }
        let tokens = s.get(1).unwrap().tokens[..12].to_vec();
        let block_2 = s.get(1).unwrap().block_tables[0][2];
        s.add(Sequence::new(2, [tokens, vec![7]].concat(), 0, 2));
        let step = run_step(&mut s);
        let second = step.seqs.iter().find(|q| q.id == 2).unwrap();
        assert_eq!(second.num_cached_tokens, 12);
        assert_eq!(s.get(2).unwrap().block_tables[0][2], block_2);
    }

    /// Drafts never preempt: without free blocks for them a sequence decodes its one token.
    #[test]
    fn drafts_without_room_are_dropped() {
        let mut s = Scheduler::new(config(64, 8), BlockManager::new(2, 4, false));
        s.add(Sequence::new(1, (0..6).collect(), 0, 1));
        run_step(&mut s);
        s.get_mut(1).unwrap().draft_tokens = vec![1, 2, 3];
        let step = s.schedule();
        assert_eq!(tokens_per_seq(&step), vec![(1, 1)]);
        assert_eq!(step.seqs[0].num_draft_tokens, 0);
        assert!(step.preempted.is_empty());
        assert!(s.get(1).unwrap().draft_tokens.is_empty());
        assert_eq!(step.batch.sampled_rows(), vec![0]);
    }

    /// With a sliding-window group, long sequences hold only their window there: two of 200
    /// tokens run side by side in a pool of 36 blocks, which would need 2 x 2 x 13 = 52 without
    /// the window (13 blocks in each group), and needs 2 x 13 + at most 2 x 2 + 2 with it.
    #[test]
    fn window_groups_let_long_sequences_share_a_small_pool() {
        let blocks = BlockManager::with_groups(36, 16, true, vec![None, Some(16)]);
        let mut s = Scheduler::new(config(64, 8), blocks);
        s.add_samples(vec![Sequence::new(1, vec![1; 40], 0, 1)]);
        s.add_samples(vec![Sequence::new(2, vec![2; 40], 0, 2)]);
        while s.get(1).unwrap().len() < 200 {
            let step = run_step(&mut s);
            assert!(step.preempted.is_empty());
            assert_eq!(s.num_running(), 2);
        }
        assert_eq!(s.num_preemptions(), 0);
        assert!(s.blocks().num_free_blocks() >= 36 - 2 * 13 - 2 * 2 - 2);
        // A step with nothing to run carries no group tables.
        s.remove(1);
        s.remove(2);
        assert!(s.schedule().is_empty());
    }

    fn samples(first_id: SeqId, n: u64, prompt_len: usize) -> Vec<Sequence> {
        (first_id..first_id + n)
            .map(|id| Sequence::new(id, vec![0; prompt_len], 0, id))
            .collect()
    }

    fn tokens_per_seq(step: &ScheduledStep) -> Vec<(SeqId, usize)> {
        step.seqs.iter().map(|q| (q.id, q.num_new_tokens)).collect()
    }

    #[test]
    fn long_prompts_are_chunked_to_the_token_budget() {
        let mut s = Scheduler::new(config(8, 4), BlockManager::new(16, 4, false));
        s.add(Sequence::new(1, vec![0; 20], 0, 1));
        let steps: Vec<_> = (0..4).map(|_| run_step(&mut s)).collect();
        assert_eq!(tokens_per_seq(&steps[0]), vec![(1, 8)]);
        assert!(
            !steps[0].seqs[0].samples,
            "a partial prompt does not sample"
        );
        assert_eq!(tokens_per_seq(&steps[1]), vec![(1, 8)]);
        assert_eq!(tokens_per_seq(&steps[2]), vec![(1, 4)]);
        assert!(steps[2].seqs[0].samples);
        assert_eq!(tokens_per_seq(&steps[3]), vec![(1, 1)], "then it decodes");
        assert!(!steps[3].seqs[0].is_prefill);
    }

    #[test]
    fn running_sequences_go_first_then_newcomers_fill_the_budget() {
        let mut s = Scheduler::new(config(10, 3), BlockManager::new(32, 4, false));
        s.add(Sequence::new(1, vec![0; 6], 0, 1));
        run_step(&mut s);
        s.add(Sequence::new(2, vec![0; 6], 0, 2));
        s.add(Sequence::new(3, vec![0; 6], 0, 3));
        s.add(Sequence::new(4, vec![0; 6], 0, 4));
        // Seq 1 decodes (1 token), seq 2 prefills 6, seq 3 gets the last 3 of the budget.
        let step = run_step(&mut s);
        assert_eq!(tokens_per_seq(&step), vec![(1, 1), (2, 6), (3, 3)]);
        // max_num_seqs = 3 keeps seq 4 waiting.
        let step = run_step(&mut s);
        assert_eq!(tokens_per_seq(&step), vec![(1, 1), (2, 1), (3, 3)]);
        assert_eq!(s.num_waiting(), 1);
        // The batch holds exactly the scheduled tokens, in order.
        assert_eq!(step.batch.num_tokens(), 5);
        assert_eq!(step.batch.sequences.len(), 3);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_which_resumes_with_its_tokens() {
        // 4 blocks of 2 tokens: two sequences of 3 tokens fit, but not once both grow to 5.
        let mut s = Scheduler::new(config(64, 8), BlockManager::new(4, 2, false));
        s.add(Sequence::new(1, vec![5; 3], 0, 1));
        s.add(Sequence::new(2, vec![6; 3], 0, 2));
        run_step(&mut s); // both prefill, each samples a 4th token
        run_step(&mut s); // both decode: 5 tokens each, needs 3 blocks each
        let mut preempted_at = None;
        for i in 0..6 {
            let step = run_step(&mut s);
            if !step.preempted.is_empty() {
                assert_eq!(step.preempted, vec![2], "the newest sequence is the victim");
                assert!(step.seqs.iter().all(|q| q.id == 1));
                preempted_at = Some(i);
                break;
            }
        }
        assert!(
            preempted_at.is_some(),
            "the pool ran out, so someone was preempted"
        );
        let victim = s.get(2).unwrap();
        assert_eq!(victim.num_computed_tokens, 0);
        assert!(victim.len() > 3, "it keeps the tokens it generated");
        assert!(victim.block_tables.is_empty());
        assert_eq!(s.num_preemptions(), 1);

        // Once sequence 1 finishes, 2 recomputes everything it had (prompt and output) at once.
        let generated = victim.len();
        s.remove(1);
        let step = run_step(&mut s);
        assert_eq!(tokens_per_seq(&step), vec![(2, generated)]);
        assert!(step.seqs[0].is_prefill && step.seqs[0].samples);
    }

    #[test]
    fn priority_policy_orders_admission_and_preemption() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                policy: SchedulingPolicy::Priority,
                ..config(4, 8)
            },
            BlockManager::new(64, 4, false),
        );
        s.add(Sequence::new(1, vec![0; 4], 5, 1));
        s.add(Sequence::new(2, vec![0; 4], -1, 2));
        s.add(Sequence::new(3, vec![0; 4], 5, 3));
        // Budget of 4 admits one prompt per step: the most urgent first, then by arrival.
        let order: Vec<SeqId> = (0..3)
            .map(|_| {
                let step = run_step(&mut s);
                step.seqs.iter().find(|q| q.is_prefill).unwrap().id
            })
            .collect();
        assert_eq!(order, vec![2, 1, 3]);
        assert_eq!(s.running().map(|q| q.id).collect::<Vec<_>>(), vec![2, 1, 3]);
    }

    /// 2 blocks of 2 tokens. Sequence 1 (3 prompt tokens, low priority) runs; sequence 2 (2
    /// tokens, urgent) arrives and waits for a block. When 1 grows to 5 tokens it needs a third
    /// block, preempts itself, and goes back to the waiting queue.
    fn preempt_one_with_another_waiting(policy: SchedulingPolicy) -> Scheduler {
        let mut s = Scheduler::new(
            SchedulerConfig {
                policy,
                ..config(64, 8)
            },
            BlockManager::new(2, 2, false),
        );
        s.add(Sequence::new(1, vec![0; 3], 5, 1));
        run_step(&mut s); // prefill: 3 tokens in 2 blocks, samples a 4th
        s.add(Sequence::new(2, vec![0; 2], -1, 2));
        let step = run_step(&mut s); // 1 writes its 4th token into its second block; 2 waits
        assert_eq!(tokens_per_seq(&step), vec![(1, 1)]);
        let step = run_step(&mut s); // 1's 5th token needs a third block
        assert_eq!(step.preempted, vec![1]);
        assert_eq!(s.num_waiting(), 2);
        s
    }

    #[test]
    fn a_preempted_sequence_waits_behind_more_urgent_ones() {
        let mut s = preempt_one_with_another_waiting(SchedulingPolicy::Priority);
        let step = run_step(&mut s);
        assert_eq!(
            tokens_per_seq(&step),
            vec![(2, 2)],
            "the urgent sequence is admitted before the preempted, less urgent one"
        );
    }

    #[test]
    fn under_fcfs_a_preempted_sequence_goes_back_to_the_front() {
        let mut s = preempt_one_with_another_waiting(SchedulingPolicy::Fcfs);
        let step = run_step(&mut s);
        assert!(
            step.is_empty(),
            "the preempted sequence heads the queue and, not fitting, blocks the newcomer"
        );
        s.remove(1);
        assert_eq!(tokens_per_seq(&run_step(&mut s)), vec![(2, 2)]);
    }

    #[test]
    fn samples_are_forked_once_the_first_has_computed_the_prompt() {
        let mut s = Scheduler::new(config(4, 8), BlockManager::new(16, 4, true));
        s.add_samples(samples(1, 3, 6));
        // Only the first sample computes the 6-token prompt, in chunks of the 4-token budget.
        let step = run_step(&mut s);
        assert_eq!(tokens_per_seq(&step), vec![(1, 4)]);
        assert_eq!(
            s.num_running(),
            1,
            "nothing to fork from before the prompt is done"
        );
        let step = run_step(&mut s);
        assert_eq!(tokens_per_seq(&step), vec![(1, 2)]);
        assert_eq!(s.running().map(|q| q.id).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(s.get(2).unwrap().num_computed_tokens, 6);

        // Each writes its 7th token into the shared partial block: the first two copy it.
        let shared = s.get(1).unwrap().block_tables[0][1];
        let step = run_step(&mut s);
        assert_eq!(tokens_per_seq(&step), vec![(1, 1), (2, 1), (3, 1)]);
        let copied: Vec<u32> = [1, 2]
            .map(|id| s.get(id).unwrap().block_tables[0][1])
            .into();
        assert_eq!(
            step.batch.block_copies,
            vec![(shared, copied[0]), (shared, copied[1])]
        );
        assert_eq!(s.get(3).unwrap().block_tables[0][1], shared);
        let full = s.get(1).unwrap().block_tables[0][0];
        assert_eq!(s.blocks().ref_count(full), 3);

        for id in 1..=3 {
            s.remove(id);
        }
        assert_eq!(s.blocks().num_free_blocks(), 16);
    }

    #[test]
    fn samples_are_admitted_only_with_room_for_all_of_them() {
        let mut s = Scheduler::new(config(64, 3), BlockManager::new(32, 4, false));
        s.add(Sequence::new(1, vec![0; 3], 0, 1));
        s.add_samples(samples(2, 3, 3));
        s.add(Sequence::new(5, vec![0; 3], 0, 5));
        run_step(&mut s);
        // 1 + 3 samples exceed max_num_seqs = 3: the group waits, and blocks those behind it.
        assert_eq!(s.running().map(|q| q.id).collect::<Vec<_>>(), vec![1]);
        s.remove(1);
        run_step(&mut s);
        assert_eq!(s.running().map(|q| q.id).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn removing_the_first_sample_before_the_fork_removes_them_all() {
        let mut s = Scheduler::new(config(4, 8), BlockManager::new(8, 4, true));
        s.add_samples(samples(1, 3, 9));
        run_step(&mut s);
        assert!(s.remove(2).is_some(), "an unforked sample can go alone");
        s.remove(1);
        assert!(s.remove(3).is_none(), "gone with the first");
        assert!(!s.has_work());
        assert_eq!(s.blocks().num_free_blocks(), 8);
    }

    #[test]
    fn a_removed_sequence_frees_its_blocks_at_once() {
        let mut s = Scheduler::new(config(64, 8), BlockManager::new(8, 4, true));
        s.add(Sequence::new(1, vec![0; 9], 0, 1));
        run_step(&mut s);
        assert_eq!(s.blocks().num_free_blocks(), 5);
        s.remove(1);
        assert_eq!(s.blocks().num_free_blocks(), 8);
        assert!(!s.has_work());
    }

    fn policy_config(max_num_batched_tokens: usize, max_num_seqs: usize) -> SchedulerConfig {
        SchedulerConfig {
            policy: SchedulingPolicy::Priority,
            ..config(max_num_batched_tokens, max_num_seqs)
        }
    }

    fn ids(step: &ScheduledStep) -> Vec<SeqId> {
        step.seqs.iter().map(|q| q.id).collect()
    }

    /// Static batching: a request that arrives while a batch runs waits until every member of
    /// the batch has left, though the budget, seats and blocks had room for it all along;
    /// under continuous batching the same request joins at once.
    #[test]
    fn static_batching_never_admits_mid_batch() {
        let run = |batching: Batching| {
            let mut s = Scheduler::new(
                SchedulerConfig {
                    batching,
                    ..config(64, 8)
                },
                BlockManager::new(64, 4, false),
            );
            s.add(Sequence::new(1, vec![1; 5], 0, 1));
            s.add(Sequence::new(2, vec![2; 5], 0, 2));
            assert_eq!(ids(&run_step(&mut s)), vec![1, 2]);
            s.add(Sequence::new(3, vec![3; 5], 0, 3));
            let mut first_step_of_3 = None;
            for step_number in 2..8 {
                if step_number == 4 {
                    s.remove(1);
                }
                if step_number == 6 {
                    s.remove(2);
                }
                let step = run_step(&mut s);
                if ids(&step).contains(&3) && first_step_of_3.is_none() {
                    first_step_of_3 = Some(step_number);
                    assert!(
                        batching == Batching::Continuous || s.num_running() == 1,
                        "joined a batch that still ran"
                    );
                }
            }
            first_step_of_3
        };
        assert_eq!(run(Batching::Continuous), Some(2));
        assert_eq!(run(Batching::Static), Some(6), "only once 1 and 2 are gone");
    }

    /// A batch of long prompts takes several steps of the token budget to form: the members
    /// waiting when it opened join as the budget allows, a later arrival does not.
    #[test]
    fn a_static_batch_forms_over_the_budget_with_its_members_only() {
        let mut s = Scheduler::new(
            SchedulerConfig {
                batching: Batching::Static,
                ..config(8, 8)
            },
            BlockManager::new(64, 4, false),
        );
        for id in 1..=3 {
            s.add(Sequence::new(id, vec![0; 6], 0, id));
        }
        assert_eq!(tokens_per_seq(&run_step(&mut s)), vec![(1, 6), (2, 2)]);
        s.add(Sequence::new(4, vec![0; 2], 0, 4));
        assert_eq!(
            tokens_per_seq(&run_step(&mut s)),
            vec![(1, 1), (2, 4), (3, 3)],
            "3 was waiting when the batch opened; 4 was not"
        );
        for _ in 0..4 {
            assert!(!ids(&run_step(&mut s)).contains(&4));
        }
        for id in 1..=3 {
            s.remove(id);
        }
        assert_eq!(tokens_per_seq(&run_step(&mut s)), vec![(4, 2)]);
    }

    /// 12 blocks of 4 tokens. Sequence 1 (20 tokens, then 21: 6 blocks) runs; the head, 2,
    /// needs 7 blocks and does not fit; 3..=6 need one each. With a bound of 2, exactly two of
    /// them go first although a third would fit too; without backfill none does. Once 1
    /// leaves, the head is admitted ahead of the rest.
    #[test]
    fn backfill_admits_behind_a_blocked_head_up_to_its_bound() {
        let run = |bound: usize| {
            let mut s = Scheduler::new(
                SchedulerConfig {
                    backfill: bound,
                    ..config(64, 8)
                },
                BlockManager::new(12, 4, false),
            );
            s.add(Sequence::new(1, vec![1; 20], 0, 1));
            run_step(&mut s);
            s.add(Sequence::new(2, vec![2; 28], 0, 2));
            for id in 3..=6 {
                s.add(Sequence::new(id, vec![id as u32; 3], 0, id));
            }
            let step = run_step(&mut s);
            (s, ids(&step))
        };
        let (_, without) = run(0);
        assert_eq!(without, vec![1], "the head blocks everything behind it");

        let (mut s, with) = run(2);
        assert_eq!(with, vec![1, 3, 4]);
        assert_eq!(s.times_overtaken(2), 2);
        assert!(
            s.blocks().num_free_blocks() >= 1,
            "6 would have fit: the bound stopped it"
        );
        assert!(!ids(&run_step(&mut s)).contains(&5), "still bounded");
        s.remove(1);
        let step = run_step(&mut s);
        assert_eq!(step.seqs[2].id, 2, "the head goes first once it fits");
        assert_eq!(step.seqs[2].num_new_tokens, 28);
        assert_eq!(s.times_overtaken(2), 0, "admitted: its count is done with");
    }

    /// 6 blocks of 4 tokens, full with three running sequences of priorities 1, 5 and 3 (two
    /// blocks each, and room to decode in them). A sequence of priority 0 arrives: the running
    /// one of priority 5, the least urgent, makes room, and its decode token leaves the step.
    #[test]
    fn priority_preemption_picks_the_lowest_priority() {
        let run = |priority_preemption: bool, arriving_priority: i32| {
            let mut s = Scheduler::new(
                SchedulerConfig {
                    priority_preemption,
                    ..policy_config(64, 8)
                },
                BlockManager::new(6, 4, false),
            );
            for (id, priority) in [(1, 1), (2, 5), (3, 3)] {
                s.add(Sequence::new(id, vec![0; 6], priority, id));
            }
            run_step(&mut s);
            s.add(Sequence::new(4, vec![4; 6], arriving_priority, 4));
            let step = run_step(&mut s);
            (s, step)
        };
        let (s, step) = run(true, 0);
        assert_eq!(step.preempted, vec![2]);
        assert_eq!(tokens_per_seq(&step), vec![(1, 1), (3, 1), (4, 6)]);
        assert_eq!(s.running().map(|q| q.id).collect::<Vec<_>>(), vec![4, 1, 3]);
        assert_eq!(s.get(2).unwrap().num_computed_tokens, 0, "recomputes later");

        let (_, step) = run(false, 0);
        assert!(step.preempted.is_empty(), "off: the newcomer waits");
        let (_, step) = run(true, 5);
        assert!(
            step.preempted.is_empty(),
            "an equally urgent running sequence is not preempted"
        );
    }

    fn swap_config(host_blocks: usize) -> Scheduler {
        Scheduler::with_swap_space(
            SchedulerConfig {
                preemption_mode: PreemptionMode::Swap,
                ..config(64, 8)
            },
            BlockManager::new(4, 2, false),
            host_blocks,
        )
    }

    /// Two sequences of 3 tokens in 4 blocks of 2 and swap preemption into `host_blocks` host
    /// blocks, run until the pool runs out and one is preempted.
    fn swap_until_preempted(host_blocks: usize) -> (Scheduler, ScheduledStep) {
        let mut s = swap_config(host_blocks);
        s.add(Sequence::new(1, vec![5; 3], 0, 1));
        s.add(Sequence::new(2, vec![6; 3], 0, 2));
        loop {
            let step = run_step(&mut s);
            if !step.preempted.is_empty() {
                return (s, step);
            }
        }
    }

    /// The pool of `out_of_blocks_preempts_the_newest_which_resumes_with_its_tokens`, with swap
    /// preemption: sequence 2's computed blocks go to the host pool, and when it resumes they
    /// come back to fresh device blocks and it decodes one token instead of recomputing.
    #[test]
    fn a_swapped_sequence_resumes_where_it_stopped() {
        let (mut s, step) = swap_until_preempted(8);
        assert_eq!(step.swapped_out, vec![2]);
        let computed = s.swap_space().computed_tokens(2).unwrap();
        assert_eq!(step.batch.swap_out.len(), computed.div_ceil(2));
        assert_eq!(s.swap_space().num_free_blocks(), 8 - computed.div_ceil(2));
        let hosts: Vec<u32> = step.batch.swap_out.iter().map(|&(_, h)| h).collect();

        s.remove(1);
        let step = run_step(&mut s);
        assert_eq!(step.swapped_in, vec![2]);
        assert_eq!(tokens_per_seq(&step), vec![(2, 1)], "one decode token");
        assert!(!step.seqs[0].is_prefill && step.seqs[0].samples);
        let back: Vec<u32> = step.batch.swap_in.iter().map(|&(h, _)| h).collect();
        assert_eq!(back, hosts);
        let table = &s.get(2).unwrap().block_tables[0];
        for (&(_, device), &block) in step.batch.swap_in.iter().zip(table) {
            assert_eq!(device, block);
        }
        assert_eq!(s.swap_space().num_swapped(), 0);
        assert_eq!(s.swap_space().counts(), (1, 1));
        // Host blocks read by this step's swap-ins are free from the next step on.
        assert_eq!(s.swap_space().num_free_blocks(), 8 - hosts.len());
        run_step(&mut s);
        assert_eq!(s.swap_space().num_free_blocks(), 8);
    }

    #[test]
    fn a_full_host_pool_falls_back_to_recompute() {
        let (mut s, step) = swap_until_preempted(1);
        assert_eq!(step.preempted, vec![2]);
        assert!(step.swapped_out.is_empty() && step.batch.swap_out.is_empty());
        s.remove(1);
        let step = run_step(&mut s);
        assert!(step.seqs[0].is_prefill, "recomputed");
    }

    /// A sequence aborted while swapped out gives its host blocks back.
    #[test]
    fn removing_a_swapped_sequence_frees_its_host_blocks() {
        let (mut s, step) = swap_until_preempted(8);
        assert_eq!(step.swapped_out, vec![2]);
        assert!(s.swap_space().num_free_blocks() < 8);
        s.remove(2);
        run_step(&mut s);
        assert_eq!(s.swap_space().num_free_blocks(), 8);
        assert_eq!(s.swap_space().num_swapped(), 0);
    }
}
