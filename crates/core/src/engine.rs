//! The engine: one loop that owns the model executor and the scheduler (which owns the block
//! manager), and turns requests into streams of tokens.
//!
//! ```text
//! loop { schedule -> execute -> sample -> output stage -> emit }
//! ```
//!
//! Requests arrive validated ([`ValidatedRequest`]); the engine never checks them again.
//!
//! Each piece of a sequence's state has one owner: the scheduler holds its tokens and blocks
//! ([`Sequence`]), the engine what only sampling and the output stage need ([`Sample`]: its
//! request, sample index, generator and text state), under the same [`SeqId`]; a request holds
//! its samples' ids, handed out together.
//!
//! A request with `n` samples is computed once: its first sample runs the prompt, and in the
//! step that finishes it the others are forked from it (sharing its KV blocks, copy-on-write)
//! and draw their first tokens from the same logits, each with its own generator.
//!
//! Each request carries an [`EventSink`]; the engine pushes [`RequestEvent`]s into it. A sink
//! that reports itself closed (its client went away) aborts the request, and its blocks are
//! freed before the next step is scheduled.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::block_manager::BlockManager;
use crate::constraint::{ConstrainedSample, TokenMask};
use crate::detokenize::TokenDecoder;
use crate::executor::{Logits, ModelExecutor};
use crate::fair_share::FairClaim;
use crate::live::{BlockMap, LiveFeed, BLOCK_MAP_INTERVAL};
use crate::output::{OutputStage, SampleOutput, TokenOutput};
use crate::request::FinishReason;
use crate::request::{
    EngineLimits, EventSink, Request, RequestError, RequestEvent, RequestId, ValidatedRequest,
};
use crate::sampling::{Rng, SampledToken, Sampler, SamplingParams};
use crate::scheduler::{ScheduledStep, Scheduler, SchedulerConfig};
use crate::sequence::{Owner, SeqId, Sequence};
use crate::speculative::{
    self, DraftGate, DraftMethod, DraftWant, Drafter, PromptLookup, SpeculativeConfig,
};
use crate::trace::{
    RequestEventKind, RequestRecord, StepFacts, StepRecord, Trace, TraceOptions, TraceRecord,
};

thread_local! {
    /// Scratch space for sampling, one per thread that samples (see `Engine::sample_rows`).
    static SAMPLER: RefCell<Sampler> = RefCell::new(Sampler::new());
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub prefix_caching: bool,
    pub max_model_len: usize,
}

/// Counters since start, for metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    pub steps: u64,
    pub num_running: usize,
    pub num_waiting: usize,
    /// Blocks held by live sequences over all blocks.
    pub kv_usage: f64,
    pub peak_kv_usage: f64,
    pub num_preemptions: u64,
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// Steps without any prompt token, their tokens and their time (model, sampling and
    /// emitting): the decode rate at the batch sizes seen, for rooflines. The tokens are those
    /// computed: with speculative decoding, verified drafts count, accepted or not.
    pub decode_steps: u64,
    pub decode_step_tokens: u64,
    pub decode_step_seconds: f64,
    /// Structured outputs: time spent computing grammar masks (mostly on a thread of its own,
    /// during the forward pass), and the part of it the step waited for (the masks not ready
    /// when the forward pass was, or computed inline).
    pub grammar_mask_seconds: f64,
    pub grammar_wait_seconds: f64,
    /// Swap preemption: sequences moved to the host pool and back.
    pub num_swapped_out: u64,
    pub num_swapped_in: u64,
    /// Speculative decoding: verifications (a sequence's drafts checked in one step), the
    /// draft tokens they checked, and those accepted (vLLM's `spec_decode_num_drafts`,
    /// `..._num_draft_tokens`, `..._num_accepted_tokens`).
    pub spec_num_drafts: u64,
    pub spec_num_draft_tokens: u64,
    pub spec_num_accepted_tokens: u64,
    /// Time spent proposing drafts (prompt lookup, or the draft model's passes), and draft
    /// model failures (drafting then stops).
    pub spec_draft_seconds: f64,
    pub spec_draft_failures: u64,
}

/// One sample of a request, as far as sampling and the output stage need it; its tokens and
/// blocks are the scheduler's [`Sequence`] of the same id.
struct Sample {
    request: RequestId,
    /// Which of the request's `n` samples this is.
    index: usize,
    rng: Rng,
    output: SampleOutput,
    /// The sample's walk through its request's grammar, if it has one.
    constrained: Option<ConstrainedSample>,
    /// Whether its request may speculate at all (`speculative::request_speculates`).
    speculates: bool,
    /// How its drafts have fared, deciding whether it drafts (speculative decoding).
    draft_gate: DraftGate,
    /// Whether this step's drafts came from its request's prediction.
    drafts_from_prediction: bool,
    /// Prediction tokens it accepted as drafts and emitted (`usage`'s
    /// `accepted_prediction_tokens`).
    accepted_prediction_tokens: usize,
}

/// Per-request state shared by its `n` samples.
struct RequestState {
    request: ValidatedRequest,
    sink: Box<dyn EventSink>,
    /// The ids of its samples' sequences; those still in `Engine::samples` are unfinished.
    seqs: Range<SeqId>,
    /// Whether [`RequestEvent::Scheduled`] has been sent.
    scheduled: bool,
}

/// A sequence that draws tokens in a step, and the drafts it verifies: it owns
/// `drafts.len() + 1` consecutive rows of the step's logits.
struct SamplingRows {
    id: SeqId,
    drafts: Vec<u32>,
}

impl SamplingRows {
    fn num_rows(&self) -> usize {
        self.drafts.len() + 1
    }
}

pub struct Engine<E: ModelExecutor> {
    executor: E,
    scheduler: Scheduler,
    output: OutputStage,
    limits: EngineLimits,
    samples: HashMap<SeqId, Sample>,
    requests: HashMap<RequestId, RequestState>,
    next_seq_id: SeqId,
    next_request_id: RequestId,
    stats: EngineStats,
    trace: Option<Trace>,
    /// What a live dashboard watches; published to only while someone does (`live.rs`).
    live: Arc<LiveFeed>,
    /// When the live block map was last published.
    block_map_published: Option<Instant>,
    /// While recording (a trace, or a watcher): sequences preempted and not yet resumed.
    traced_preempted: HashSet<SeqId>,
    /// Speculative decoding, when on.
    speculative: Option<Speculation>,
}

/// Drafts per step for a request with a prediction when the server's speculative decoding is
/// not prompt lookup: a prediction is usually long stretches of the output itself, so more
/// drafts than prompt lookup's default pay; the acceptance gate still stops a poor one.
const PREDICTION_DRAFTS: usize = 8;

/// The n-gram lengths prompt lookup over a prediction matches.
const PREDICTION_LOOKUP_N: (usize, usize) = (2, 4);

/// Speculative decoding's settings and what proposes the drafts.
struct Speculation {
    config: SpeculativeConfig,
    drafter: Box<dyn Drafter>,
}

impl<E: ModelExecutor> Engine<E> {
    pub fn new(
        executor: E,
        config: EngineConfig,
        decoder: Arc<dyn TokenDecoder>,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        let geometry = executor.cache_geometry();
        let group_windows = executor.kv_group_windows();
        let limits = EngineLimits {
            max_model_len: config.max_model_len,
            vocab_size: executor.vocab_size(),
            // A sequence never holds more than a full table in each KV group: what fits in
            // this share of the pool can always run, alone if need be.
            num_blocks: geometry.num_blocks / group_windows.len(),
            block_size: geometry.block_size,
        };
        let blocks = BlockManager::with_groups(
            geometry.num_blocks,
            geometry.block_size,
            config.prefix_caching,
            group_windows,
        );
        let host_blocks = executor.swap_capacity_blocks();
        let live = Arc::new(LiveFeed::new(&blocks, host_blocks));
        Self {
            scheduler: Scheduler::with_swap_space(config.scheduler, blocks, host_blocks),
            executor,
            output: OutputStage::new(decoder, eos_token_ids),
            limits,
            samples: HashMap::new(),
            requests: HashMap::new(),
            next_seq_id: 0,
            next_request_id: 0,
            stats: EngineStats::default(),
            trace: None,
            live,
            block_map_published: None,
            traced_preempted: HashSet::new(),
            speculative: None,
        }
    }

    /// The feed a live dashboard watches ([`LiveFeed::watch`]).
    pub fn live_feed(&self) -> Arc<LiveFeed> {
        self.live.clone()
    }

    /// Whether steps and request events are recorded: for a trace, or for a live watcher.
    fn recording(&self) -> bool {
        self.trace.is_some() || self.live.is_watched()
    }

    /// Publishes the KV pool's block map to live watchers now, if there are any (a watcher
    /// arrived, or the engine goes idle: the last map must show the pool as it stays).
    pub fn publish_block_map(&mut self) {
        if self.live.is_watched() {
            let now = Instant::now();
            let t_ms = self.live.clock().ms_at(now);
            self.live
                .publish_block_map(BlockMap::of(&self.scheduler, self.stats.steps, t_ms));
            self.block_map_published = Some(now);
        }
    }

    /// Turns speculative decoding by prompt lookup on (see `speculative.rs`): from the next
    /// step, decoding sequences draft tokens and verify them.
    ///
    /// # Panics
    /// If `config`'s method is [`DraftMethod::Model`]: that takes [`Engine::set_draft_model`].
    pub fn set_speculative(&mut self, config: SpeculativeConfig) {
        let DraftMethod::Ngram { min_n, max_n } = config.method else {
            panic!("a draft model is set with set_draft_model");
        };
        let drafter = Box::new(PromptLookup { min_n, max_n });
        self.speculative = Some(Speculation { config, drafter });
    }

    /// Speculative decoding with a draft model (`draft_model.rs`): `config`'s method must be
    /// [`DraftMethod::Model`].
    pub fn set_draft_model(&mut self, config: SpeculativeConfig, drafter: Box<dyn Drafter>) {
        assert_eq!(config.method, DraftMethod::Model, "a draft model drafts");
        self.speculative = Some(Speculation { config, drafter });
    }

    /// Writes the trace (one JSON line per step and per request event, `docs/trace.md`) to
    /// `out` from now on.
    pub fn set_trace(&mut self, out: Box<dyn Write + Send>, options: TraceOptions) {
        let host_blocks = self.scheduler.swap_space().num_blocks();
        self.trace = Some(Trace::new(
            out,
            options,
            self.scheduler.blocks(),
            host_blocks,
        ));
    }

    /// Records a request event, when recording.
    fn trace_request(&mut self, record: impl FnOnce() -> RequestRecord) {
        if self.recording() {
            self.record_request(record(), Instant::now(), self.stats.steps);
        }
    }

    /// Writes `record`, which happened at `at` after `steps` steps, to the trace and the live
    /// feed, whichever are on.
    fn record_request(&mut self, record: RequestRecord, at: Instant, steps: u64) {
        if self.live.is_watched() {
            let mut live = record.clone();
            live.t_ms = self.live.clock().ms_at(at);
            live.step = steps;
            self.live.publish(TraceRecord::Request(live));
        }
        if let Some(trace) = &mut self.trace {
            trace.request(record, at, steps);
        }
    }

    /// Writes the record of a step that has run to the trace and the live feed.
    fn record_step(&mut self, started: Instant, step: &ScheduledStep, requests: &[RequestId]) {
        let facts = StepFacts {
            number: self.stats.steps,
            started,
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
            step,
            requests,
        };
        if let Some(trace) = &mut self.trace {
            trace.step(&facts, &self.scheduler);
        }
        if self.live.is_watched() {
            let record = StepRecord::of(&facts, self.live.clock(), &self.scheduler, false);
            self.live.publish(TraceRecord::Step(record));
            if self
                .block_map_published
                .is_none_or(|at| at.elapsed() >= BLOCK_MAP_INTERVAL)
            {
                self.publish_block_map();
            }
        }
    }

    /// The request sequence `id` is a sample of (0 once it is gone).
    fn request_of(&self, id: SeqId) -> RequestId {
        self.samples.get(&id).map_or(0, |s| s.request)
    }

    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    /// The scheduler (and through it the block manager), read-only: for statistics and
    /// invariant checks.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn executor(&self) -> &E {
        &self.executor
    }

    pub fn executor_mut(&mut self) -> &mut E {
        &mut self.executor
    }

    /// Validates `request` against this engine's limits and queues it (see
    /// [`add_request`](Self::add_request)); a request refused is also reported to its sink, as
    /// [`RequestEvent::Failed`].
    pub fn submit(
        &mut self,
        request: Request,
        sink: Box<dyn EventSink>,
    ) -> Result<RequestId, RequestError> {
        match self.limits.validate(request) {
            Ok(request) => Ok(self.add_request(request, sink)),
            Err(e) => {
                sink.send(RequestEvent::Failed(e.to_string()));
                Err(e)
            }
        }
    }

    /// Queues a request validated against [`limits`](Self::limits); its events go to `sink`.
    pub fn add_request(
        &mut self,
        request: ValidatedRequest,
        sink: Box<dyn EventSink>,
    ) -> RequestId {
        self.next_request_id += 1;
        let id = self.next_request_id;
        self.add_request_with_id(id, request, sink);
        id
    }

    /// Like [`add_request`](Self::add_request), with an id chosen by the caller (the engine
    /// thread's handle hands ids out itself, so that adding never waits for a step).
    pub fn add_request_with_id(
        &mut self,
        request_id: RequestId,
        request: ValidatedRequest,
        sink: Box<dyn EventSink>,
    ) {
        // Without a seed, each request still gets its own stream, varied by its id.
        let base_seed = request
            .params
            .seed
            .unwrap_or_else(|| request_id.wrapping_mul(0x2545_F491_4F6C_DD1D));
        let first_seq = self.next_seq_id + 1;
        // One output state cloned for every sample: the request's stop strings are shared, not
        // copied n times.
        let new_output = self.output.new_sample(&request);
        let owner = (request.tenant.is_some() || request.session.is_some()).then(|| {
            Arc::new(Owner {
                fair_claim: request.tenant.clone().map(|share| FairClaim {
                    share,
                    expected_tokens: (request.prompt.len() + request.n * request.max_tokens) as u64,
                }),
                keep_cached: request.session.as_ref().map(|s| s.ttl),
            })
        });
        let mut samples = Vec::with_capacity(request.n);
        for index in 0..request.n {
            self.next_seq_id += 1;
            let id = self.next_seq_id;
            let arrival = id;
            let mut seq = Sequence::new(id, request.prompt.clone(), request.priority, arrival);
            seq.owner = owner.clone();
            samples.push(seq);
            self.samples.insert(
                id,
                Sample {
                    request: request_id,
                    index,
                    // Each sample draws from its own stream, derived from the request's seed,
                    // so that results never depend on what else shares the batch.
                    rng: Rng::new(base_seed.wrapping_add(index as u64 * 0x9E37_79B9)),
                    output: new_output.clone(),
                    constrained: request.constraint.as_ref().map(|grammar| {
                        ConstrainedSample::new(grammar.start(), self.limits.vocab_size)
                    }),
                    speculates: speculative::request_speculates(&request),
                    draft_gate: DraftGate::default(),
                    drafts_from_prediction: false,
                    accepted_prediction_tokens: 0,
                },
            );
        }
        // Sample 0 computes the prompt; the others are forked from it (see `step`).
        self.scheduler.add_samples(samples);
        self.trace_request(|| RequestRecord {
            prompt_tokens: Some(request.prompt.len()),
            n: Some(request.n),
            priority: Some(request.priority),
            ..RequestRecord::new(RequestEventKind::Arrived, request_id, None)
        });
        self.stats.prompt_tokens += (request.prompt.len() * request.n) as u64;
        self.requests.insert(
            request_id,
            RequestState {
                request,
                sink,
                seqs: first_seq..self.next_seq_id + 1,
                scheduled: false,
            },
        );
    }

    /// Drops a request and frees its blocks now.
    pub fn abort(&mut self, request_id: RequestId) {
        self.abort_with(request_id, "abort");
    }

    /// [`abort`](Self::abort), traced as finished for `reason`.
    fn abort_with(&mut self, request_id: RequestId, reason: &str) {
        if self.requests.contains_key(&request_id) {
            self.trace_request(|| RequestRecord {
                reason: Some(reason.to_string()),
                ..RequestRecord::new(RequestEventKind::Finished, request_id, None)
            });
        }
        if let Some(state) = self.requests.remove(&request_id) {
            for id in state.seqs {
                self.samples.remove(&id);
                self.scheduler.remove(id);
            }
        }
    }

    /// Runs one step. Returns false when there was nothing to do.
    pub fn step(&mut self) -> bool {
        self.abort_disconnected();
        let step_started = self.recording().then(Instant::now);
        self.propose_drafts();
        let step = self.scheduler.schedule();
        if step.is_empty() {
            self.refresh_stats();
            return false;
        }
        self.report_first_scheduled(&step);
        // Read now: a sample that finishes in this step is gone when its record is written.
        let step_requests: Option<Vec<RequestId>> = step_started.is_some().then(|| {
            self.trace_preemptions(&step);
            step.seqs.iter().map(|s| self.request_of(s.id)).collect()
        });
        let started = Instant::now();
        match self.execute_preparing_masks(&step) {
            Ok(mut logits) => {
                self.scheduler.mark_computed(&step);
                let mut sampling = self.sampling_rows(&step, logits.num_rows());
                let forked = self.scheduler.fork_samples(&step);
                Self::share_parent_rows(&forked, &mut sampling, &mut logits);
                let drawn = self.sample_rows(&sampling, &mut logits);
                for (row, tokens) in sampling.into_iter().zip(drawn) {
                    self.emit_all(row, tokens);
                }
            }
            Err(e) => self.fail_step(&step, &e.to_string()),
        }
        if step.seqs.iter().all(|s| !s.is_prefill) {
            self.stats.decode_steps += 1;
            self.stats.decode_step_tokens += step
                .seqs
                .iter()
                .map(|s| s.num_new_tokens as u64)
                .sum::<u64>();
            self.stats.decode_step_seconds += started.elapsed().as_secs_f64();
        }
        self.stats.steps += 1;
        self.refresh_stats();
        if let (Some(started), Some(requests)) = (step_started, step_requests) {
            self.record_step(started, &step, &requests);
        }
        true
    }

    /// Traces the step's preemptions, and the resumption of sequences preempted earlier.
    fn trace_preemptions(&mut self, step: &ScheduledStep) {
        let step_number = self.stats.steps + 1;
        let now = Instant::now();
        let mut records = Vec::new();
        for &id in &step.preempted {
            self.traced_preempted.insert(id);
            records.push(RequestRecord {
                swapped: Some(step.swapped_out.contains(&id)),
                ..RequestRecord::new(RequestEventKind::Preempted, self.request_of(id), Some(id))
            });
        }
        if !self.traced_preempted.is_empty() {
            for s in &step.seqs {
                if self.traced_preempted.remove(&s.id) {
                    records.push(RequestRecord {
                        swapped: Some(step.swapped_in.contains(&s.id)),
                        ..RequestRecord::new(
                            RequestEventKind::Resumed,
                            self.request_of(s.id),
                            Some(s.id),
                        )
                    });
                }
            }
        }
        for record in records {
            self.record_request(record, now, step_number);
        }
    }

    /// Runs the forward pass of `step` and, meanwhile, on a thread of its own, computes the
    /// token masks of the constrained samples that draw a token this step: a grammar's mask
    /// costs CPU time but needs only the tokens drawn so far, so it is off the critical path.
    /// Steps without a constrained sample spawn nothing.
    fn execute_preparing_masks(&mut self, step: &ScheduledStep) -> Result<Logits, E::Error> {
        let mut pending: Vec<(SeqId, ConstrainedSample)> = step
            .seqs
            .iter()
            .filter(|s| s.samples)
            .filter_map(|s| {
                let sample = self.samples.get_mut(&s.id)?;
                Some((s.id, sample.constrained.take()?))
            })
            .collect();
        if pending.is_empty() {
            return self.executor.execute(&step.batch);
        }
        let executor = &mut self.executor;
        let (result, pending, busy, waited) = std::thread::scope(|scope| {
            let masks = scope.spawn(move || {
                let started = Instant::now();
                for (_, sample) in &mut pending {
                    // A failure is met again, and reported, when the row is sampled.
                    let _ = sample.prepare_mask();
                }
                (pending, started.elapsed())
            });
            let result = executor.execute(&step.batch);
            let executed = Instant::now();
            let (pending, busy) = masks
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (result, pending, busy, executed.elapsed())
        });
        self.stats.grammar_mask_seconds += busy.as_secs_f64();
        self.stats.grammar_wait_seconds += waited.as_secs_f64();
        for (id, constrained) in pending {
            if let Some(sample) = self.samples.get_mut(&id) {
                sample.constrained = Some(constrained);
            }
        }
        result
    }

    /// Gives each sample forked this step a copy of its parent's logits row (rows are
    /// processed in place while sampling): a fork's first token is drawn from the same logits
    /// as its parent's, with its own generator, as if it had computed the prompt itself.
    fn share_parent_rows(
        forked: &[(SeqId, SeqId)],
        sampling: &mut Vec<SamplingRows>,
        logits: &mut Logits,
    ) {
        let vocab = logits.vocab_size;
        // New rows go right after the rows in use.
        let rows_in_use: usize = sampling.iter().map(SamplingRows::num_rows).sum();
        logits.data.truncate(rows_in_use * vocab);
        for &(parent, fork) in forked {
            // A parent has just computed its prompt, so it verifies no drafts: one row.
            let mut row = 0;
            for rows in sampling.iter() {
                if rows.id == parent {
                    logits
                        .data
                        .extend_from_within(row * vocab..(row + 1) * vocab);
                    sampling.push(SamplingRows {
                        id: fork,
                        drafts: Vec::new(),
                    });
                    break;
                }
                row += rows.num_rows();
            }
        }
    }

    /// The sequences of `step` that draw tokens from its logits (at most `num_rows` rows), in
    /// the order of their rows, each with the drafts it verifies.
    fn sampling_rows(&self, step: &ScheduledStep, num_rows: usize) -> Vec<SamplingRows> {
        let mut rows = Vec::with_capacity(step.seqs.len());
        let mut used = 0;
        for s in step.seqs.iter().filter(|s| s.samples) {
            let drafts = match s.num_draft_tokens {
                0 => Vec::new(),
                _ => self
                    .scheduler
                    .get(s.id)
                    .map_or_else(Vec::new, |seq| seq.draft_tokens.clone()),
            };
            used += drafts.len() + 1;
            if used > num_rows {
                break;
            }
            rows.push(SamplingRows { id: s.id, drafts });
        }
        rows
    }

    /// Speculative decoding: gives every running sequence that may speculate this step the
    /// tokens it drafts (see `speculative.rs`), and every other none. A drafter that fails (a
    /// draft model's device error) turns speculation off for good, with one line on stderr:
    /// it is an optimisation, and no request may fail because of it.
    fn propose_drafts(&mut self) {
        if self.speculative.is_none()
            && self
                .requests
                .values()
                .all(|r| r.request.prediction.is_empty())
        {
            return;
        }
        let step = self.stats.steps;
        let running: Vec<SeqId> = self.scheduler.running().map(|s| s.id).collect();
        for &id in &running {
            if let Some(seq) = self.scheduler.get_mut(id) {
                seq.draft_tokens.clear();
            }
            if let Some(sample) = self.samples.get_mut(&id) {
                sample.drafts_from_prediction = false;
            }
        }
        let mut wants: Vec<DraftWant<'_>> = Vec::new();
        let mut predicted: Vec<(SeqId, Vec<u32>)> = Vec::new();
        let (min_n, max_n) = PREDICTION_LOOKUP_N;
        for &id in &running {
            let (Some(sample), Some(seq)) = (self.samples.get(&id), self.scheduler.get(id)) else {
                continue;
            };
            let Some(request) = self.requests.get(&sample.request) else {
                continue;
            };
            let request = &request.request;
            let Some(config) = self.draft_config(request) else {
                continue;
            };
            let num_output = seq.len() - seq.num_prompt_tokens;
            // The step's last token is never a draft, so this leaves `max_tokens` room.
            let room = request.max_tokens.saturating_sub(num_output + 1);
            let k = config.drafts_for(room, running.len());
            if k == 0
                || !sample.speculates
                || num_output < request.min_tokens
                || seq.num_pending_tokens() != 1
                || !sample.draft_gate.open(step)
            {
                continue;
            }
            // A prediction drafts first; where it has nothing, the server's drafter, if any.
            let output = &seq.tokens[seq.num_prompt_tokens..];
            let drafts =
                speculative::propose_from_prediction(output, &request.prediction, min_n, max_n, k);
            if !drafts.is_empty() {
                predicted.push((id, drafts));
                continue;
            }
            // The server's drafter, within its own limits (a prediction's may be looser).
            let Some(server) = self.speculative.as_ref().map(|s| s.config) else {
                continue;
            };
            let k = server.drafts_for(room, running.len());
            if k > 0 {
                wants.push(DraftWant {
                    id,
                    tokens: &seq.tokens,
                    k,
                    remaining: room + 1,
                });
            }
        }
        if let Some(speculation) = self.speculative.as_mut() {
            speculation.drafter.retain(&running);
        }
        let started = Instant::now();
        let proposed = match (self.speculative.as_mut(), wants.is_empty()) {
            (Some(speculation), false) => Some(speculation.drafter.propose(&wants)),
            _ => None,
        };
        self.stats.spec_draft_seconds += started.elapsed().as_secs_f64();
        let ids: Vec<SeqId> = wants.iter().map(|w| w.id).collect();
        for (id, drafts) in predicted {
            self.scheduler.get_mut(id).expect("running").draft_tokens = drafts;
            self.samples
                .get_mut(&id)
                .expect("running")
                .drafts_from_prediction = true;
        }
        match proposed {
            None => {}
            Some(Ok(drafts)) => {
                for (id, drafts) in ids.into_iter().zip(drafts) {
                    self.scheduler.get_mut(id).expect("running").draft_tokens = drafts;
                }
            }
            Some(Err(e)) => {
                eprintln!("speculative decoding turned off: {e}");
                self.speculative = None;
                self.stats.spec_draft_failures += 1;
            }
        }
    }

    /// How `request`'s sequences draft, if they do: for a request with a prediction, from it
    /// (`speculative::propose_from_prediction`), with the server's `K` under prompt lookup and
    /// [`PREDICTION_DRAFTS`] otherwise; else the server's speculative decoding, if on.
    fn draft_config(&self, request: &Request) -> Option<SpeculativeConfig> {
        let has_prediction = !request.prediction.is_empty();
        match &self.speculative {
            Some(s) if !has_prediction || matches!(s.config.method, DraftMethod::Ngram { .. }) => {
                Some(s.config)
            }
            _ if has_prediction => {
                let (min_n, max_n) = PREDICTION_LOOKUP_N;
                Some(SpeculativeConfig {
                    method: DraftMethod::Ngram { min_n, max_n },
                    ..SpeculativeConfig::ngram(PREDICTION_DRAFTS)
                })
            }
            _ => None,
        }
    }

    /// Emits the tokens one sequence drew this step, in order, until one finishes it; then, if
    /// it verified drafts, records how they fared and rolls back what the rejected ones left.
    fn emit_all(&mut self, rows: SamplingRows, tokens: Vec<SampledToken>) {
        let id = rows.id;
        let accepted = tokens.len().saturating_sub(1);
        for (i, token) in tokens.into_iter().enumerate() {
            let Some(sample) = self.samples.get_mut(&id) else {
                break;
            };
            // The first `accepted` tokens are the drafts the model agreed with.
            if i < accepted && sample.drafts_from_prediction {
                sample.accepted_prediction_tokens += 1;
            }
            self.emit(id, token);
        }
        if rows.drafts.is_empty() {
            return;
        }
        self.stats.spec_num_drafts += 1;
        self.stats.spec_num_draft_tokens += rows.drafts.len() as u64;
        self.stats.spec_num_accepted_tokens += accepted as u64;
        let config = self
            .samples
            .get(&id)
            .and_then(|sample| self.requests.get(&sample.request))
            .and_then(|request| self.draft_config(&request.request));
        if let (Some(sample), Some(config)) = (self.samples.get_mut(&id), config) {
            let floor = config.acceptance_floor(self.scheduler.num_running());
            sample
                .draft_gate
                .record(rows.drafts.len(), accepted, self.stats.steps, floor);
        }
        self.scheduler.accept_drafts(id, accepted);
    }

    fn report_first_scheduled(&mut self, step: &ScheduledStep) {
        let now = Instant::now();
        let recording = self.recording();
        let mut records = Vec::new();
        // A sequence scheduled for the first time is always a prefill, so decode steps (the
        // bulk of all scheduled sequences) cost no lookup here.
        for s in step.seqs.iter().filter(|s| s.is_prefill) {
            let Some(sample) = self.samples.get(&s.id) else {
                continue;
            };
            // Before this step runs, what a new sequence has computed is its prefix-cache hit.
            let cached_tokens = self
                .scheduler
                .get(s.id)
                .map_or(0, |seq| seq.num_computed_tokens);
            if let Some(request) = self.requests.get_mut(&sample.request) {
                if !request.scheduled {
                    request.scheduled = true;
                    if recording {
                        records.push(RequestRecord {
                            cached_tokens: Some(cached_tokens),
                            ..RequestRecord::new(
                                RequestEventKind::Scheduled,
                                sample.request,
                                Some(s.id),
                            )
                        });
                    }
                    // A closed sink is noticed (and the request aborted) before the next step;
                    // aborting now would pull a sequence out of the batch being run.
                    request.sink.send(RequestEvent::Scheduled {
                        at: now,
                        cached_tokens,
                    });
                }
            }
        }
        for record in records {
            self.record_request(record, now, self.stats.steps + 1);
        }
    }

    fn abort_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.sink.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.abort(id);
        }
    }

    /// Draws the next tokens of every sequence in `sampling` from its rows of `logits` (in
    /// order, each sequence's rows after the previous one's), sequences in parallel on the
    /// executor's threads. Each row is processed in place (no copy of the vocabulary) and uses
    /// only its own sequence's history and random generator, so a token does not depend on how
    /// sequences are spread over threads. A sequence without drafts draws one token; one that
    /// verifies drafts draws a token per row until one differs from its draft (rejected) or the
    /// rows run out (see `speculative.rs`). Empty for a sequence that is gone.
    fn sample_rows(
        &mut self,
        sampling: &[SamplingRows],
        logits: &mut Logits,
    ) -> Vec<Vec<SampledToken>> {
        /// What drawing one sequence's rows reads, borrowed from the engine's state.
        struct Job<'a> {
            params: &'a SamplingParams,
            prompt: &'a [u32],
            output: &'a [u32],
            drafts: &'a [u32],
            /// Token ids banned for this step: EOS and stop ids until `min_tokens` are out.
            banned: Vec<u32>,
            /// The tokens its grammar allows, if it has one.
            mask: Option<&'a TokenMask>,
        }
        let ids: Vec<SeqId> = sampling.iter().map(|rows| rows.id).collect();
        self.prepare_missing_masks(&ids);
        /// What drawing one sequence's rows writes: its logits (processed in place), the
        /// sequence's generator (advanced), the tokens.
        struct Draw<'a> {
            rows: &'a mut [f32],
            rng: Rng,
            tokens: Vec<SampledToken>,
        }
        let jobs: Vec<Option<Job>> = sampling
            .iter()
            .map(|rows| {
                let sample = self.samples.get(&rows.id)?;
                let seq = self.scheduler.get(rows.id)?;
                let request = &self.requests.get(&sample.request)?.request;
                let output = seq.output_tokens();
                let banned = if output.len() < request.min_tokens {
                    self.output.stop_token_ids(request).collect()
                } else {
                    Vec::new()
                };
                Some(Job {
                    params: &request.params,
                    prompt: &seq.tokens[..seq.num_prompt_tokens],
                    output,
                    drafts: &rows.drafts,
                    banned,
                    mask: sample.constrained.as_ref().map(|c| &c.mask),
                })
            })
            .collect();
        let vocab = logits.vocab_size;
        let mut rest = logits.data.as_mut_slice();
        let draws: Vec<Mutex<Draw>> = sampling
            .iter()
            .map(|rows| {
                let (mine, others) =
                    std::mem::take(&mut rest).split_at_mut(rows.num_rows() * vocab);
                rest = others;
                Mutex::new(Draw {
                    rows: mine,
                    rng: self
                        .samples
                        .get(&rows.id)
                        .map_or(Rng::new(0), |s| s.rng.clone()),
                    tokens: Vec::new(),
                })
            })
            .collect();
        self.executor.for_each_index(jobs.len(), &|i| {
            let Some(job) = &jobs[i] else { return };
            let mut draw = draws[i].lock().unwrap_or_else(|e| e.into_inner());
            let Draw { rows, rng, tokens } = &mut *draw;
            // The history of each verified position: the output and the drafts before it
            // (copied only when drafts make it differ from the output).
            let mut history = Vec::new();
            for (position, row) in rows.chunks_mut(vocab).enumerate() {
                if let Some(mask) = job.mask {
                    mask.apply(row);
                }
                for &t in &job.banned {
                    if let Some(l) = row.get_mut(t as usize) {
                        *l = f32::NEG_INFINITY;
                    }
                }
                let draft = job.drafts.get(position).copied();
                let output = match position {
                    0 => job.output,
                    _ => {
                        if history.is_empty() {
                            history.extend_from_slice(job.output);
                        }
                        history.push(job.drafts[position - 1]);
                        &history
                    }
                };
                let token = SAMPLER.with(|sampler| {
                    sampler
                        .borrow_mut()
                        .sample_token_with_draft(row, job.params, job.prompt, output, draft, rng)
                });
                let rejected = draft != Some(token.token);
                tokens.push(token);
                if rejected {
                    break;
                }
            }
        });
        sampling
            .iter()
            .zip(draws)
            .map(|(rows, draw)| {
                let Draw { rng, tokens, .. } = draw.into_inner().unwrap_or_else(|e| e.into_inner());
                match self.samples.get_mut(&rows.id) {
                    Some(sample) if !tokens.is_empty() => {
                        sample.rng = rng;
                        tokens
                    }
                    _ => Vec::new(),
                }
            })
            .collect()
    }

    /// Computes the masks the step's forward pass did not (samples forked this step, a mask
    /// that failed); a request whose grammar fails is failed and its rows left undrawn.
    fn prepare_missing_masks(&mut self, ids: &[SeqId]) {
        let mut failed = Vec::new();
        let started = Instant::now();
        for id in ids {
            let Some(sample) = self.samples.get_mut(id) else {
                continue;
            };
            if let Some(Err(e)) = sample.constrained.as_mut().map(|c| c.prepare_mask()) {
                failed.push((sample.request, e));
            }
        }
        let inline = started.elapsed().as_secs_f64();
        self.stats.grammar_mask_seconds += inline;
        self.stats.grammar_wait_seconds += inline;
        for (request, message) in failed {
            self.fail_request(request, &format!("structured output failed: {message}"));
        }
    }

    /// Ends `request_id` with [`RequestEvent::Failed`] and frees its blocks; the others keep
    /// going.
    fn fail_request(&mut self, request_id: RequestId, message: &str) {
        if let Some(request) = self.requests.get(&request_id) {
            request.sink.send(RequestEvent::Failed(message.to_string()));
        }
        self.abort_with(request_id, "error");
    }

    /// Appends the token drawn for sequence `id`, runs it through the output stage and emits
    /// what it adds: text, and the end of the sample when it finishes.
    fn emit(&mut self, id: SeqId, sampled: SampledToken) {
        let (Some(sample), Some(seq)) = (self.samples.get_mut(&id), self.scheduler.get_mut(id))
        else {
            return;
        };
        let Some(request) = self.requests.get(&sample.request) else {
            return;
        };
        seq.tokens.push(sampled.token);
        self.stats.generation_tokens += 1;
        let num_output = seq.len() - seq.num_prompt_tokens;
        let grammar_complete = match sample.constrained.as_mut().map(|c| c.commit(sampled.token)) {
            None => false,
            Some(Ok(())) => sample
                .constrained
                .as_ref()
                .is_some_and(|c| c.constraint.is_complete()),
            Some(Err(e)) => {
                let request_id = sample.request;
                self.fail_request(request_id, &format!("structured output failed: {e}"));
                return;
            }
        };
        let TokenOutput {
            text,
            mut finish,
            mut stop_reason,
        } = self.output.push(
            &mut sample.output,
            &request.request,
            sampled.token,
            num_output,
        );
        if grammar_complete && finish != Some(FinishReason::Stop) {
            // The output is a complete sentence of the grammar, also at `max_tokens`.
            finish = Some(FinishReason::Stop);
            stop_reason = None;
        }
        let delivered = request.sink.send(RequestEvent::Token {
            index: sample.index,
            token: sampled.token,
            text,
            logprob: sampled.logprob,
            top_logprobs: sampled.top_logprobs,
        });
        if !delivered {
            let request_id = sample.request;
            self.abort(request_id);
            return;
        }
        if let Some(reason) = finish {
            request.sink.send(RequestEvent::Finished {
                index: sample.index,
                reason,
                text: self.output.held_back(&mut sample.output),
                completion_tokens: num_output,
                stop_reason,
                accepted_prediction_tokens: sample.accepted_prediction_tokens,
            });
            let request_id = sample.request;
            self.trace_request(|| RequestRecord {
                reason: Some(reason.as_str().to_string()),
                output_tokens: Some(num_output),
                ..RequestRecord::new(RequestEventKind::Finished, request_id, Some(id))
            });
            self.finish_sequence(id);
        }
    }

    fn finish_sequence(&mut self, id: SeqId) {
        self.scheduler.remove(id);
        let Some(sample) = self.samples.remove(&id) else {
            return;
        };
        let Some(request) = self.requests.get(&sample.request) else {
            return;
        };
        if !request.seqs.clone().any(|s| self.samples.contains_key(&s)) {
            self.requests.remove(&sample.request);
        }
    }

    /// A failed forward pass fails the requests it carried; the others keep going. The blocks
    /// it wrote are not trusted for prefix caching.
    fn fail_step(&mut self, step: &ScheduledStep, message: &str) {
        // A sequence swapped out by this step may not have its K/V in the host pool.
        for id in step
            .seqs
            .iter()
            .map(|s| s.id)
            .chain(step.swapped_out.iter().copied())
        {
            let Some(sample) = self.samples.get(&id) else {
                continue;
            };
            let request_id = sample.request;
            if self.requests.contains_key(&request_id) {
                self.trace_request(|| RequestRecord {
                    reason: Some("error".into()),
                    ..RequestRecord::new(RequestEventKind::Finished, request_id, None)
                });
            }
            if let Some(request) = self.requests.remove(&request_id) {
                request.sink.send(RequestEvent::Failed(format!(
                    "model execution failed: {message}"
                )));
                for id in request.seqs {
                    self.samples.remove(&id);
                    self.scheduler.remove_failed(id);
                }
            }
        }
    }

    fn refresh_stats(&mut self) {
        let blocks = self.scheduler.blocks();
        let prefix = blocks.stats();
        self.stats.num_running = self.scheduler.num_running();
        self.stats.num_waiting = self.scheduler.num_waiting();
        self.stats.kv_usage = blocks.usage();
        self.stats.peak_kv_usage = self.stats.peak_kv_usage.max(self.stats.kv_usage);
        self.stats.num_preemptions = self.scheduler.num_preemptions();
        self.stats.prefix_queried_tokens = prefix.queried_tokens;
        self.stats.prefix_hit_tokens = prefix.hit_tokens;
        (self.stats.num_swapped_out, self.stats.num_swapped_in) =
            self.scheduler.swap_space().counts();
    }
}
