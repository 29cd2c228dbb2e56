//! The engine: one loop that owns the model executor, the block manager and the scheduler,
//! and turns requests into streams of tokens.
//!
//! ```text
//! loop { schedule -> execute -> sample -> detokenize -> check stops -> emit }
//! ```
//!
//! A request with `n` samples is computed once: its first sample runs the prompt, and in the
//! step that finishes it the others are forked from it (sharing its KV blocks, copy-on-write)
//! and draw their first tokens from the same logits, each with its own generator.
//!
//! Each request carries an [`EventSink`]; the engine pushes [`RequestEvent`]s into it. A sink
//! that reports itself closed (its client went away) aborts the request, and its blocks are
//! freed before the next step is scheduled.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::block_manager::BlockManager;
use crate::detokenize::{IncrementalDetokenizer, TokenDecoder};
use crate::executor::{Logits, ModelExecutor};
use crate::sampling::{Rng, SampledToken, Sampler, SamplingParams};
use crate::scheduler::{ScheduledSeq, ScheduledStep, Scheduler, SchedulerConfig};
use crate::sequence::{SeqId, Sequence};
use crate::stop::StopStrings;

thread_local! {
    /// Scratch space for sampling, one per thread that samples (see `Engine::sample_rows`).
    static SAMPLER: RefCell<Sampler> = RefCell::new(Sampler::new());
}

/// The token ids that end `request`'s sequences: EOS (unless `ignore_eos`) and its stop ids.
fn stop_token_ids<'a>(eos: &'a [u32], request: &'a Request) -> impl Iterator<Item = u32> + 'a {
    eos.iter()
        .filter(|_| !request.ignore_eos)
        .chain(&request.stop_token_ids)
        .copied()
}

/// What a client asks for, already tokenized.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    /// EOS and stop ids are suppressed until this many tokens have been generated.
    pub min_tokens: usize,
    /// Text that ends generation; never emitted itself.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (the model's EOS ids always do, unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Independent samples of the same prompt.
    pub n: usize,
    pub priority: i32,
}

impl Request {
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            params: SamplingParams::default(),
            max_tokens,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            n: 1,
            priority: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token id, or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a request's stream receives. `index` tells the `n` samples of one request apart.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestEvent {
    /// The scheduler picked the request for the first time, at `at`: its time in the queue is
    /// over. Sent once per request (not per sample, nor again after a preemption), before its
    /// first token.
    Scheduled { at: Instant },
    Token {
        index: usize,
        token: u32,
        /// New text; may be empty while a multi-byte character or a possible stop string is
        /// incomplete.
        text: String,
        logprob: Option<f32>,
        top_logprobs: Vec<(u32, f32)>,
    },
    Finished {
        index: usize,
        reason: FinishReason,
        /// Text held back until the end (a prefix of a stop string that never completed).
        text: String,
        completion_tokens: usize,
    },
    /// The request failed inside the engine; no more events follow.
    Failed(String),
}

/// Where a request's events go. Implemented by the server over its async channels; the core
/// stays free of any runtime.
pub trait EventSink: Send {
    /// False when the receiver is gone.
    fn send(&self, event: RequestEvent) -> bool;
    /// True when the receiver is gone (checked every step to abort early).
    fn is_closed(&self) -> bool;
}

impl EventSink for std::sync::mpsc::Sender<RequestEvent> {
    fn send(&self, event: RequestEvent) -> bool {
        std::sync::mpsc::Sender::send(self, event).is_ok()
    }
    fn is_closed(&self) -> bool {
        false // std's channel only tells on send; the next event will notice
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{0}")]
    InvalidParams(String),
    #[error(
        "this model's maximum context length is {max_model_len} tokens, but the request needs \
         {prompt_tokens} prompt tokens plus up to {max_tokens} generated tokens"
    )]
    TooLong {
        max_model_len: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
    #[error(
        "the request needs up to {needed} KV cache blocks ({tokens} tokens) but the cache has only \
         {available}; it could never complete (raise the KV cache size)"
    )]
    NeverFits {
        needed: usize,
        available: usize,
        tokens: usize,
    },
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },
}

/// Limits a request is checked against before it is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineLimits {
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

impl EngineLimits {
    /// Rejects up front what could never complete, with a message fit for the client.
    pub fn check(&self, request: &Request) -> Result<(), RequestError> {
        if request.prompt.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if request.n == 0 {
            return Err(RequestError::InvalidParams("n must be at least 1".into()));
        }
        if request.max_tokens == 0 {
            return Err(RequestError::InvalidParams(
                "max_tokens must be at least 1".into(),
            ));
        }
        request
            .params
            .validate()
            .map_err(RequestError::InvalidParams)?;
        if let Some(&token) = request
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.vocab_size)
        {
            return Err(RequestError::TokenOutOfRange {
                token,
                vocab_size: self.vocab_size,
            });
        }
        let tokens = request.prompt.len() + request.max_tokens;
        if tokens > self.max_model_len {
            return Err(RequestError::TooLong {
                max_model_len: self.max_model_len,
                prompt_tokens: request.prompt.len(),
                max_tokens: request.max_tokens,
            });
        }
        let needed = tokens.div_ceil(self.block_size);
        if needed > self.num_blocks {
            return Err(RequestError::NeverFits {
                needed,
                available: self.num_blocks,
                tokens,
            });
        }
        Ok(())
    }
}

pub type RequestId = u64;

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
    /// emitting): the decode rate at the batch sizes seen, for rooflines.
    pub decode_steps: u64,
    pub decode_step_tokens: u64,
    pub decode_step_seconds: f64,
}

/// Per-sequence state the scheduler does not need.
struct SeqState {
    request: RequestId,
    index: usize,
    rng: Rng,
    detokenizer: IncrementalDetokenizer,
    stop_strings: StopStrings,
}

/// Per-request state shared by its `n` sequences.
struct RequestState {
    request: Request,
    sink: Box<dyn EventSink>,
    live_seqs: Vec<SeqId>,
    /// Whether [`RequestEvent::Scheduled`] has been sent.
    scheduled: bool,
}

pub struct Engine<E: ModelExecutor> {
    executor: E,
    scheduler: Scheduler,
    blocks: BlockManager,
    decoder: Arc<dyn TokenDecoder>,
    eos_token_ids: Vec<u32>,
    limits: EngineLimits,
    seqs: HashMap<SeqId, SeqState>,
    requests: HashMap<RequestId, RequestState>,
    next_seq_id: SeqId,
    next_request_id: RequestId,
    stats: EngineStats,
    trace: Option<Box<dyn Write + Send>>,
}

impl<E: ModelExecutor> Engine<E> {
    pub fn new(
        executor: E,
        config: EngineConfig,
        decoder: Arc<dyn TokenDecoder>,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        let geometry = executor.cache_geometry();
        let limits = EngineLimits {
            max_model_len: config.max_model_len,
            vocab_size: executor.vocab_size(),
            num_blocks: geometry.num_blocks,
            block_size: geometry.block_size,
        };
        Self {
            blocks: BlockManager::new(
                geometry.num_blocks,
                geometry.block_size,
                config.prefix_caching,
            ),
            scheduler: Scheduler::new(config.scheduler),
            executor,
            decoder,
            eos_token_ids,
            limits,
            seqs: HashMap::new(),
            requests: HashMap::new(),
            next_seq_id: 0,
            next_request_id: 0,
            stats: EngineStats::default(),
            trace: None,
        }
    }

    /// Writes one JSON line per step to `out` (see `docs/continuous-batching.md`).
    pub fn set_trace(&mut self, out: Box<dyn Write + Send>) {
        self.trace = Some(out);
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

    pub fn executor(&self) -> &E {
        &self.executor
    }

    pub fn executor_mut(&mut self) -> &mut E {
        &mut self.executor
    }

    /// Queues a request; its events go to `sink`.
    pub fn add_request(
        &mut self,
        request: Request,
        sink: Box<dyn EventSink>,
    ) -> Result<RequestId, RequestError> {
        self.next_request_id += 1;
        let id = self.next_request_id;
        self.add_request_with_id(id, request, sink)?;
        Ok(id)
    }

    /// Like [`add_request`](Self::add_request), with an id chosen by the caller (the engine
    /// thread's handle hands ids out itself, so that adding never waits for a step).
    pub fn add_request_with_id(
        &mut self,
        request_id: RequestId,
        request: Request,
        sink: Box<dyn EventSink>,
    ) -> Result<(), RequestError> {
        if let Err(e) = self.limits.check(&request) {
            sink.send(RequestEvent::Failed(e.to_string()));
            return Err(e);
        }
        // Without a seed, each request still gets its own stream, varied by its id.
        let base_seed = request
            .params
            .seed
            .unwrap_or_else(|| request_id.wrapping_mul(0x2545_F491_4F6C_DD1D));
        let mut live_seqs = Vec::with_capacity(request.n);
        let mut samples = Vec::with_capacity(request.n);
        for index in 0..request.n {
            self.next_seq_id += 1;
            let id = self.next_seq_id;
            let arrival = id;
            samples.push(Sequence::new(
                id,
                request.prompt.clone(),
                request.priority,
                arrival,
            ));
            self.seqs.insert(
                id,
                SeqState {
                    request: request_id,
                    index,
                    // Each sample draws from its own stream, derived from the request's seed,
                    // so that results never depend on what else shares the batch.
                    rng: Rng::new(base_seed.wrapping_add(index as u64 * 0x9E37_79B9)),
                    detokenizer: IncrementalDetokenizer::new(&request.prompt),
                    stop_strings: StopStrings::new(&request.stop),
                },
            );
            live_seqs.push(id);
        }
        // Sample 0 computes the prompt; the others are forked from it (see `step`).
        self.scheduler.add_samples(samples);
        self.stats.prompt_tokens += (request.prompt.len() * request.n) as u64;
        self.requests.insert(
            request_id,
            RequestState {
                request,
                sink,
                live_seqs,
                scheduled: false,
            },
        );
        Ok(())
    }

    /// Drops a request and frees its blocks now.
    pub fn abort(&mut self, request_id: RequestId) {
        if let Some(state) = self.requests.remove(&request_id) {
            for id in state.live_seqs {
                self.scheduler.remove(id, &mut self.blocks);
                self.seqs.remove(&id);
            }
        }
    }

    /// Runs one step. Returns false when there was nothing to do.
    pub fn step(&mut self) -> bool {
        self.abort_disconnected();
        let step = self.scheduler.schedule(&mut self.blocks);
        if step.is_empty() {
            self.refresh_stats();
            return false;
        }
        self.report_first_scheduled(&step);
        let started = Instant::now();
        match self.executor.execute(&step.batch) {
            Ok(mut logits) => {
                self.scheduler.mark_computed(&step);
                let mut sampling: Vec<SeqId> = step
                    .seqs
                    .iter()
                    .filter(|s| s.samples)
                    .map(|s| s.id)
                    .take(logits.num_rows())
                    .collect();
                let forked = self.scheduler.fork_samples(&step, &mut self.blocks);
                Self::share_parent_rows(&forked, &mut sampling, &mut logits);
                let drawn = self.sample_rows(&sampling, &mut logits);
                for (id, token) in sampling.into_iter().zip(drawn) {
                    if let Some(token) = token {
                        self.emit(id, token);
                    }
                }
            }
            Err(e) => self.fail_step(&step, &e.to_string()),
        }
        if step.seqs.iter().all(|s| !s.is_prefill) {
            self.stats.decode_steps += 1;
            self.stats.decode_step_tokens += step.seqs.len() as u64;
            self.stats.decode_step_seconds += started.elapsed().as_secs_f64();
        }
        self.stats.steps += 1;
        self.refresh_stats();
        self.write_trace(&step);
        true
    }

    /// Gives each sample forked this step a copy of its parent's logits row (rows are
    /// processed in place while sampling): a fork's first token is drawn from the same logits
    /// as its parent's, with its own generator, as if it had computed the prompt itself.
    fn share_parent_rows(
        forked: &[(SeqId, SeqId)],
        sampling: &mut Vec<SeqId>,
        logits: &mut Logits,
    ) {
        let vocab = logits.vocab_size;
        // New rows go right after the rows in use.
        logits.data.truncate(sampling.len() * vocab);
        for &(parent, fork) in forked {
            if let Some(row) = sampling.iter().position(|&id| id == parent) {
                logits
                    .data
                    .extend_from_within(row * vocab..(row + 1) * vocab);
                sampling.push(fork);
            }
        }
    }

    fn report_first_scheduled(&mut self, step: &ScheduledStep) {
        let now = Instant::now();
        // A sequence scheduled for the first time is always a prefill, so decode steps (the
        // bulk of all scheduled sequences) cost no lookup here.
        for s in step.seqs.iter().filter(|s| s.is_prefill) {
            let Some(state) = self.seqs.get(&s.id) else {
                continue;
            };
            if let Some(request) = self.requests.get_mut(&state.request) {
                if !request.scheduled {
                    request.scheduled = true;
                    // A closed sink is noticed (and the request aborted) before the next step;
                    // aborting now would pull a sequence out of the batch being run.
                    request.sink.send(RequestEvent::Scheduled { at: now });
                }
            }
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

    /// Draws the next token of every sequence in `ids` from its row of `logits` (row `i` for
    /// `ids[i]`), rows in parallel on the executor's threads. Each row is processed in place (no
    /// copy of the vocabulary) and uses only its own sequence's history and random generator, so
    /// a token does not depend on how rows are spread over threads. `None` for a sequence that
    /// is gone.
    fn sample_rows(&mut self, ids: &[SeqId], logits: &mut Logits) -> Vec<Option<SampledToken>> {
        /// What drawing one row reads, borrowed from the engine's state.
        struct Job<'a> {
            params: &'a SamplingParams,
            prompt: &'a [u32],
            output: &'a [u32],
            /// Token ids banned for this step: EOS and stop ids until `min_tokens` are out.
            banned: Vec<u32>,
        }
        /// What drawing one row writes: its logits (processed in place), the sequence's
        /// generator (advanced), the token.
        struct Draw<'a> {
            row: &'a mut [f32],
            rng: Rng,
            token: Option<SampledToken>,
        }
        let jobs: Vec<Option<Job>> = ids
            .iter()
            .map(|id| {
                let state = self.seqs.get(id)?;
                let seq = self.scheduler.get(*id)?;
                let request = &self.requests.get(&state.request)?.request;
                let output = seq.output_tokens();
                let banned = if output.len() < request.min_tokens {
                    stop_token_ids(&self.eos_token_ids, request).collect()
                } else {
                    Vec::new()
                };
                Some(Job {
                    params: &request.params,
                    prompt: &seq.tokens[..seq.num_prompt_tokens],
                    output,
                    banned,
                })
            })
            .collect();
        let draws: Vec<Mutex<Draw>> = logits
            .data
            .chunks_mut(logits.vocab_size)
            .zip(ids)
            .map(|(row, id)| {
                Mutex::new(Draw {
                    row,
                    rng: self.seqs.get(id).map_or(Rng::new(0), |s| s.rng.clone()),
                    token: None,
                })
            })
            .collect();
        self.executor.for_each_index(jobs.len(), &|i| {
            let Some(job) = &jobs[i] else { return };
            let mut draw = draws[i].lock().unwrap_or_else(|e| e.into_inner());
            let Draw { row, rng, token } = &mut *draw;
            for &t in &job.banned {
                if let Some(l) = row.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
            *token = Some(SAMPLER.with(|sampler| {
                sampler
                    .borrow_mut()
                    .sample_token(row, job.params, job.prompt, job.output, rng)
            }));
        });
        ids.iter()
            .zip(draws)
            .map(|(id, draw)| {
                let Draw { rng, token, .. } = draw.into_inner().unwrap_or_else(|e| e.into_inner());
                let token = token?;
                self.seqs.get_mut(id)?.rng = rng;
                Some(token)
            })
            .collect()
    }

    /// Appends the token drawn for sequence `id` and emits what it adds: text (held back while
    /// it could still become a stop string), and the end of the sequence when it stops.
    fn emit(&mut self, id: SeqId, sampled: SampledToken) {
        let (Some(state), Some(seq)) = (self.seqs.get_mut(&id), self.scheduler.get_mut(id)) else {
            return;
        };
        let Some(request_state) = self.requests.get(&state.request) else {
            return;
        };
        let request = &request_state.request;
        seq.tokens.push(sampled.token);
        self.stats.generation_tokens += 1;
        let num_output = seq.len() - seq.num_prompt_tokens;

        let mut finish = None;
        let mut text = String::new();
        if stop_token_ids(&self.eos_token_ids, request).any(|t| t == sampled.token) {
            finish = Some(FinishReason::Stop);
        } else {
            let delta = state.detokenizer.push(sampled.token, self.decoder.as_ref());
            let outcome = state.stop_strings.push(&delta);
            text = outcome.emit;
            if outcome.stopped {
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() && num_output >= request.max_tokens {
            finish = Some(FinishReason::Length);
        }
        let index = state.index;
        let request_id = state.request;
        let delivered = request_state.sink.send(RequestEvent::Token {
            index,
            token: sampled.token,
            text,
            logprob: sampled.logprob,
            top_logprobs: sampled.top_logprobs,
        });
        if !delivered {
            self.abort(request_id);
            return;
        }
        if let Some(reason) = finish {
            // Text still held back (a partial character, or a prefix of a stop string that
            // never completed) is released, unless a stop string ended the sequence.
            let held_back = if state.stop_strings.is_stopped() {
                String::new()
            } else {
                let tail = state.detokenizer.finish(self.decoder.as_ref());
                let outcome = state.stop_strings.push(&tail);
                match outcome.stopped {
                    true => outcome.emit,
                    false => outcome.emit + &state.stop_strings.finish(),
                }
            };
            request_state.sink.send(RequestEvent::Finished {
                index,
                reason,
                text: held_back,
                completion_tokens: num_output,
            });
            self.finish_sequence(id);
        }
    }

    fn finish_sequence(&mut self, id: SeqId) {
        self.scheduler.remove(id, &mut self.blocks);
        let Some(state) = self.seqs.remove(&id) else {
            return;
        };
        if let Some(request) = self.requests.get_mut(&state.request) {
            request.live_seqs.retain(|&s| s != id);
            if request.live_seqs.is_empty() {
                self.requests.remove(&state.request);
            }
        }
    }

    /// A failed forward pass fails the requests it carried; the others keep going. The blocks
    /// it wrote are not trusted for prefix caching.
    fn fail_step(&mut self, step: &ScheduledStep, message: &str) {
        for s in &step.seqs {
            let Some(state) = self.seqs.get(&s.id) else {
                continue;
            };
            let request_id = state.request;
            if let Some(request) = self.requests.remove(&request_id) {
                request.sink.send(RequestEvent::Failed(format!(
                    "model execution failed: {message}"
                )));
                for id in request.live_seqs {
                    self.scheduler.remove_failed(id, &mut self.blocks);
                    self.seqs.remove(&id);
                }
            }
        }
    }

    fn refresh_stats(&mut self) {
        let prefix = self.blocks.stats();
        self.stats.num_running = self.scheduler.num_running();
        self.stats.num_waiting = self.scheduler.num_waiting();
        self.stats.kv_usage = self.blocks.usage();
        self.stats.peak_kv_usage = self.stats.peak_kv_usage.max(self.stats.kv_usage);
        self.stats.num_preemptions = self.scheduler.num_preemptions();
        self.stats.prefix_queried_tokens = prefix.queried_tokens;
        self.stats.prefix_hit_tokens = prefix.hit_tokens;
    }

    fn write_trace(&mut self, step: &ScheduledStep) {
        let Some(out) = self.trace.as_mut() else {
            return;
        };
        let seqs: Vec<serde_json::Value> = step
            .seqs
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id, "new_tokens": s.num_new_tokens, "samples": s.samples,
                    "cached_tokens": s.num_cached_tokens, "prefill": s.is_prefill,
                })
            })
            .collect();
        let (prefill, decode): (Vec<&ScheduledSeq>, Vec<&ScheduledSeq>) =
            step.seqs.iter().partition(|s| s.is_prefill);
        let prefill: usize = prefill.iter().map(|s| s.num_new_tokens).sum();
        let decode = decode.len();
        let record = serde_json::json!({
            "step": self.stats.steps,
            "seqs": seqs,
            "prefill_tokens": prefill,
            "decode_tokens": decode,
            "running": self.stats.num_running,
            "waiting": self.stats.num_waiting,
            "blocks_used": self.blocks.num_blocks() - self.blocks.num_free_blocks(),
            "blocks_free": self.blocks.num_free_blocks(),
            "blocks_cached": self.blocks.num_cached_free_blocks(),
            "preempted": step.preempted,
            "block_copies": step.batch.block_copies.len(),
            "prefix_hit_tokens": step.seqs.iter().map(|s| s.num_cached_tokens).sum::<usize>(),
        });
        let _ = writeln!(out, "{record}");
    }
}
