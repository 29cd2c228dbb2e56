//! The engine end to end on the real default model: continuous batching must not change what
//! a request generates, whatever else is in the batch and however small the KV cache is.

mod common;

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use candle_core::quantized::GgmlDType;
use minserve_core::draft_model::DraftModel;
use minserve_core::sampling::SamplingParams;
use minserve_core::scheduler::{PreemptionMode, SchedulerConfig};
use minserve_core::speculative::{Drafter, SpeculativeConfig};
use minserve_core::trace::{read_trace, RequestEventKind, TraceOptions, TraceRecord};
use minserve_core::{Engine, EngineConfig, FinishReason, Request, RequestEvent};
use minserve_model::{
    load_model, load_model_with, synthetic, CacheOptions, LlamaModel, LoadOptions, ModelRunner,
};
use minserve_tokenizer::Tokenizer;

struct Setup {
    engine: Engine<ModelRunner>,
    tokenizer: Tokenizer,
}

fn setup(kv_cache_bytes: usize, max_num_seqs: usize, max_num_batched_tokens: usize) -> Setup {
    let loaded = load_model(&common::default_model_path()).expect("load");
    let limits = (kv_cache_bytes, max_num_seqs, max_num_batched_tokens);
    engine(loaded.model, loaded.tokenizer, limits, true)
}

/// An engine over `model` with a KV pool of `kv_cache_bytes`, `max_num_seqs` and
/// `max_num_batched_tokens`.
fn engine(
    model: LlamaModel,
    tokenizer: Tokenizer,
    (kv_cache_bytes, max_num_seqs, max_num_batched_tokens): (usize, usize, usize),
    prefix_caching: bool,
) -> Setup {
    let scheduler = SchedulerConfig {
        max_num_batched_tokens,
        max_num_seqs,
        ..SchedulerConfig::default()
    };
    engine_with(
        model,
        tokenizer,
        kv_cache_bytes,
        scheduler,
        prefix_caching,
        0,
    )
}

/// An engine over `model` with a KV pool of `kv_cache_bytes`, a host swap pool of
/// `swap_bytes`, and `scheduler`.
fn engine_with(
    model: LlamaModel,
    tokenizer: Tokenizer,
    kv_cache_bytes: usize,
    scheduler: SchedulerConfig,
    prefix_caching: bool,
    swap_bytes: usize,
) -> Setup {
    let max_model_len = model.config().max_position_embeddings;
    let mut runner = ModelRunner::new(
        model,
        CacheOptions {
            block_size: 16,
            memory_bytes: kv_cache_bytes,
            ..CacheOptions::default()
        },
    );
    runner.set_swap_space(swap_bytes);
    let config = EngineConfig {
        scheduler,
        prefix_caching,
        max_model_len,
    };
    let eos = tokenizer.eos_token_ids().to_vec();
    Setup {
        engine: Engine::new(runner, config, Arc::new(tokenizer.clone()), eos),
        tokenizer,
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Output {
    tokens: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
}

/// Submits all requests, runs the engine dry, and collects each request's (first sample's)
/// output.
fn generate(engine: &mut Engine<ModelRunner>, requests: Vec<Request>) -> Vec<Output> {
    let receivers: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let (tx, rx) = mpsc::channel();
            engine.submit(r, Box::new(tx)).expect("accepted");
            rx
        })
        .collect();
    while engine.step() {}
    receivers
        .iter()
        .map(|rx| outputs(rx).swap_remove(0))
        .collect()
}

/// Every sample's output from a request's events, by index.
fn outputs(rx: &mpsc::Receiver<RequestEvent>) -> Vec<Output> {
    let mut outs: Vec<Output> = Vec::new();
    for event in rx.try_iter() {
        let index = match &event {
            RequestEvent::Token { index, .. } | RequestEvent::Finished { index, .. } => *index,
            RequestEvent::Failed(e) => panic!("request failed: {e}"),
            RequestEvent::Scheduled { .. } => continue,
        };
        if outs.len() <= index {
            outs.resize(index + 1, Output::default());
        }
        let out = &mut outs[index];
        match event {
            RequestEvent::Token { token, text, .. } => {
                out.tokens.push(token);
                out.text.push_str(&text);
            }
            RequestEvent::Finished { reason, text, .. } => {
                out.text.push_str(&text);
                out.finish = Some(reason);
            }
            _ => {}
        }
    }
    outs
}

fn prompts(tokenizer: &Tokenizer) -> Vec<Vec<u32>> {
    [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        "def fibonacci(n):",
        "List three colors:",
        "The history of the printing press begins in",
        "Water boils at",
    ]
    .iter()
    .map(|p| tokenizer.encode(p, false).unwrap())
    .collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    let mut r = Request::new(prompt, max_tokens);
    r.params = SamplingParams::greedy();
    r.ignore_eos = true;
    r
}

#[test]
fn batched_greedy_outputs_equal_one_at_a_time() {
    let mut s = setup(64 << 20, 64, 512);
    let prompts = prompts(&s.tokenizer);
    let alone: Vec<Output> = prompts
        .iter()
        .map(|p| generate(&mut s.engine, vec![greedy(p.clone(), 24)]).remove(0))
        .collect();
    let batched = generate(
        &mut s.engine,
        prompts.iter().map(|p| greedy(p.clone(), 24)).collect(),
    );
    assert_eq!(alone, batched);
    for out in &alone {
        assert_eq!(out.tokens.len(), 24);
        assert_eq!(out.finish, Some(FinishReason::Length));
        assert_eq!(out.text, s.tokenizer.decode(&out.tokens, true).unwrap());
    }
}

/// Speculative decoding (prompt lookup, drafting at every chance) changes no greedy token, in
/// a batch where some rows verify drafts and others may not speculate (a repetition
/// penalty), and a text that repeats itself is generated in fewer steps.
#[test]
fn speculative_decoding_keeps_greedy_outputs() {
    let mut s = setup(64 << 20, 64, 512);
    let mut prompts = prompts(&s.tokenizer);
    let repetitive = "Copy the list exactly. List: apples, pears, plums, cherries, grapes, \
                      lemons, apples, pears, plums, cherries, grapes, lemons, apples, pears,";
    prompts.push(s.tokenizer.encode(repetitive, false).unwrap());
    let requests = |prompts: &[Vec<u32>]| -> Vec<Request> {
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut r = greedy(p.clone(), 32);
                if i == 2 {
                    r.params.repetition_penalty = 1.2;
                }
                r
            })
            .collect()
    };
    let plain = generate(&mut s.engine, requests(&prompts));
    let plain_steps = s.engine.stats().steps;
    let alone = generate(&mut s.engine, requests(&prompts[prompts.len() - 1..]));
    let alone_steps = s.engine.stats().steps - plain_steps;

    s.engine.set_speculative(SpeculativeConfig {
        min_acceptance: 0.0,
        min_acceptance_per_seq: 0.0,
        ..SpeculativeConfig::ngram(4)
    });
    let before = s.engine.stats();
    assert_eq!(generate(&mut s.engine, requests(&prompts)), plain);
    let after = s.engine.stats();
    let accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens;
    let drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens;
    assert!(
        accepted > 0 && drafted > accepted,
        "{accepted} of {drafted}"
    );
    let steps = s.engine.stats().steps;
    let spec_alone = generate(&mut s.engine, requests(&prompts[prompts.len() - 1..]));
    assert_eq!(spec_alone, alone);
    let spec_alone_steps = s.engine.stats().steps - steps;
    assert!(
        spec_alone_steps * 3 < alone_steps * 2,
        "{spec_alone_steps} steps with drafts, {alone_steps} without"
    );
    assert_eq!(s.engine.stats().kv_usage, 0.0);
}

/// A request's prediction (OpenAI's predicted outputs) drafts its tokens with speculative
/// decoding off: a right prediction gives the same greedy text in far fewer steps, a wrong one
/// the same text too, beside a request without one.
#[test]
fn a_prediction_drafts_with_speculative_decoding_off_and_keeps_greedy_outputs() {
    let mut s = setup(64 << 20, 64, 512);
    let prompts = prompts(&s.tokenizer);
    let steps = |s: &Setup| s.engine.stats().steps;
    let plain = generate(&mut s.engine, vec![greedy(prompts[1].clone(), 48)]);
    let plain_steps = steps(&s);

    let mut predicted = greedy(prompts[1].clone(), 48);
    predicted.prediction = plain[0].tokens.clone();
    let before = s.engine.stats();
    assert_eq!(generate(&mut s.engine, vec![predicted]), plain);
    let predicted_steps = steps(&s) - before.steps;
    let accepted = s.engine.stats().spec_num_accepted_tokens - before.spec_num_accepted_tokens;
    assert!(
        predicted_steps * 3 < plain_steps,
        "{predicted_steps} steps with the prediction, {plain_steps} without ({accepted} accepted)"
    );

    // A prediction of other text, beside a request without one.
    let mut wrong = greedy(prompts[1].clone(), 48);
    wrong.prediction = s
        .tokenizer
        .encode(" and then the sky turned green", false)
        .unwrap();
    let other = greedy(prompts[0].clone(), 16);
    let other_alone = generate(&mut s.engine, vec![other.clone()]);
    assert_eq!(
        generate(&mut s.engine, vec![wrong, other]),
        [plain[0].clone(), other_alone[0].clone()]
    );
    assert_eq!(s.engine.stats().kv_usage, 0.0);
}

/// The default model behind a draft runner with a 32 MiB cache; `format` re-quantizes its
/// projections at load (a draft that differs from the target), `None` keeps them.
fn draft_of_default_model(format: Option<GgmlDType>) -> Box<dyn Drafter> {
    let options = LoadOptions {
        weights_format: format,
        ..LoadOptions::default()
    };
    let model = load_model_with(&common::default_model_path(), &options)
        .expect("load")
        .model;
    let (vocab, max_len) = (
        model.config().vocab_size,
        model.config().max_position_embeddings,
    );
    let runner = ModelRunner::new(
        model,
        CacheOptions {
            block_size: 16,
            memory_bytes: 32 << 20,
            ..CacheOptions::default()
        },
    );
    Box::new(DraftModel::new(runner, vocab, max_len).expect("same vocabulary"))
}

/// Drafting with a second model on the real one. A draft identical to the target proposes
/// exactly the target's greedy tokens, so every draft is accepted: that holds only if the
/// draft's paged cache holds each sequence's tokens at the right positions, and if a row's
/// logits do not depend on how many rows its step had (the target verifies five tokens per
/// step, the draft runs one). A draft re-quantized to Q4_0 is rejected now and then, and the
/// greedy text is still the plain engine's.
#[test]
fn a_draft_model_keeps_greedy_outputs_and_an_identical_one_is_always_right() {
    let mut s = setup(64 << 20, 64, 512);
    let requests = |prompts: &[Vec<u32>]| -> Vec<Request> {
        prompts.iter().map(|p| greedy(p.clone(), 32)).collect()
    };
    let prompts = prompts(&s.tokenizer);
    let plain = generate(&mut s.engine, requests(&prompts));
    let plain_steps = s.engine.stats().steps;
    let always = |config: SpeculativeConfig| SpeculativeConfig {
        min_acceptance: 0.0,
        min_acceptance_per_seq: 0.0,
        disable_by_batch_size: None,
        ..config
    };

    s.engine.set_draft_model(
        always(SpeculativeConfig::draft_model(4)),
        draft_of_default_model(None),
    );
    let before = s.engine.stats();
    assert_eq!(generate(&mut s.engine, requests(&prompts)), plain);
    let after = s.engine.stats();
    let drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens;
    let accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens;
    assert!(drafted > 50, "{after:?}");
    assert_eq!(accepted, drafted, "an identical draft is always right");
    assert!(after.steps - before.steps < plain_steps / 2);

    let mut s = setup(64 << 20, 64, 512);
    s.engine.set_draft_model(
        always(SpeculativeConfig::draft_model(4)),
        draft_of_default_model(Some(GgmlDType::Q4_0)),
    );
    assert_eq!(generate(&mut s.engine, requests(&prompts)), plain);
    let stats = s.engine.stats();
    assert!(
        stats.spec_num_accepted_tokens > 0
            && stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens,
        "{stats:?}"
    );
    assert_eq!(stats.kv_usage, 0.0);
}

/// `n` samples of `max_tokens` tokens at temperature 0.9 and top-p 0.95, EOS ignored.
fn seeded_request(prompt: &[u32], max_tokens: usize, n: usize, seed: u64) -> Request {
    let mut r = Request::new(prompt.to_vec(), max_tokens);
    r.params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    r.ignore_eos = true;
    r.n = n;
    r
}

#[test]
fn seeded_sampling_is_batch_invariant() {
    let mut s = setup(64 << 20, 64, 512);
    let prompts = prompts(&s.tokenizer);
    let sampled = |p: &Vec<u32>, seed| seeded_request(p, 20, 1, seed);
    let alone = generate(&mut s.engine, vec![sampled(&prompts[1], 42)]).remove(0);
    let mut crowd: Vec<Request> = prompts.iter().map(|p| sampled(p, 7)).collect();
    crowd.insert(3, sampled(&prompts[1], 42));
    let batched = generate(&mut s.engine, crowd).remove(3);
    assert_eq!(alone, batched);
}

/// A `Write` into a buffer the test keeps, for the engine's step trace.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The `n` samples of a request compute its prompt once and share its blocks (copy-on-write),
/// yet each draws exactly what it drew when every sample computed the prompt itself: what a
/// request with `n = 1` and the seed the engine derives for that sample draws.
#[test]
fn forked_samples_equal_separate_requests_and_compute_the_prompt_once() {
    let mut s = setup(64 << 20, 64, 512);
    let prompt = prompts(&s.tokenizer)[1].clone();
    assert_ne!(prompt.len() % 16, 0, "the prompt ends inside a block");
    let sampled = |n: usize, seed: u64| seeded_request(&prompt, 16, n, seed);
    let (n, seed) = (4u64, 1234u64);
    let separately: Vec<Output> = (0..n)
        .map(|i| generate(&mut s.engine, vec![sampled(1, seed + i * 0x9E37_79B9)]).remove(0))
        .collect();

    let mut forked = setup(64 << 20, 64, 512);
    let trace = SharedBuffer::default();
    forked
        .engine
        .set_trace(Box::new(trace.clone()), TraceOptions::default());
    let (tx, rx) = mpsc::channel();
    forked
        .engine
        .submit(sampled(n as usize, seed), Box::new(tx))
        .unwrap();
    while forked.engine.step() {}
    assert_eq!(outputs(&rx), separately);
    assert_ne!(separately[0].tokens, separately[1].tokens);
    assert_eq!(forked.engine.stats().kv_usage, 0.0);

    let steps: Vec<serde_json::Value> = String::from_utf8(trace.0.lock().unwrap().clone())
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|record| record["type"] == "step")
        .collect();
    let total = |key: &str| steps.iter().map(|s| s[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        total("prefill_tokens"),
        prompt.len() as u64,
        "prompt computed once"
    );
    assert_eq!(
        total("block_copies"),
        n - 1,
        "all but the last writer copy its partial block"
    );
}

/// A workload needing about four times the KV pool completes, with the same greedy outputs as
/// with a large pool, by preempting and recomputing.
#[test]
fn a_small_pool_preempts_but_outputs_do_not_change() {
    let mut big = setup(64 << 20, 64, 512);
    let prompts = prompts(&big.tokenizer);
    let requests = || {
        prompts
            .iter()
            .map(|p| greedy(p.clone(), 40))
            .collect::<Vec<_>>()
    };
    let expected = generate(&mut big.engine, requests());

    // 6 sequences x ~55 tokens need ~24 blocks of 16; give the pool 8.
    let mut small = setup(8 * BYTES_PER_BLOCK, 64, 512);
    let got = generate(&mut small.engine, requests());
    assert!(
        small.engine.stats().num_preemptions > 0,
        "the pool was meant to run out"
    );
    assert_eq!(expected, got);
}

/// K and V of one 16-token block of the default model: 30 layers, 3 KV heads of 64 f16 values.
const BYTES_PER_BLOCK: usize = 2 * 30 * 3 * 64 * 2 * 16;

/// The default model with a pool of 8 blocks (the workloads below need about 4 times that),
/// swap preemption into a host pool of 64 blocks, and prefix caching off, so that nothing a
/// resumed sequence reads can come from anywhere but the host pool.
fn swapping_engine() -> Setup {
    let loaded = load_model(&common::default_model_path()).expect("load");
    let scheduler = SchedulerConfig {
        preemption_mode: PreemptionMode::Swap,
        ..SchedulerConfig::default()
    };
    let (kv, host) = (8 * BYTES_PER_BLOCK, 64 * BYTES_PER_BLOCK);
    engine_with(loaded.model, loaded.tokenizer, kv, scheduler, false, host)
}

/// Swap preemption: sequences are copied to the host pool and back instead of recomputed, and
/// every output, greedy and seeded, is what an unpreempted run (a pool large enough for all)
/// gives.
#[test]
fn swapped_sequences_resume_with_unchanged_output() {
    let mut big = setup(64 << 20, 64, 512);
    let prompts = prompts(&big.tokenizer);
    let requests = || {
        let greedy_ones = prompts.iter().map(|p| greedy(p.clone(), 40));
        let seeded = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| seeded_request(p, 40, 1, 100 + i as u64));
        greedy_ones.chain(seeded).collect::<Vec<_>>()
    };
    let expected = generate(&mut big.engine, requests());
    assert_eq!(big.engine.stats().num_preemptions, 0);

    let mut small = swapping_engine();
    let trace = SharedBuffer::default();
    small
        .engine
        .set_trace(Box::new(trace.clone()), TraceOptions::default());
    let got = generate(&mut small.engine, requests());
    let stats = small.engine.stats();
    assert!(stats.num_swapped_out > 0, "the pool was meant to run out");
    assert_eq!(stats.num_swapped_in, stats.num_swapped_out);
    assert_eq!(
        stats.num_preemptions, stats.num_swapped_out,
        "none recomputed"
    );
    assert_eq!(expected, got);

    // A resumed sequence decodes on: no step recomputes anything but prompts.
    let records = read_trace(&trace.0.lock().unwrap()[..]).unwrap();
    let prefill: usize = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Step(step) => Some(step.prefill_tokens),
            _ => None,
        })
        .sum();
    let prompt_tokens: usize = 2 * prompts.iter().map(Vec::len).sum::<usize>();
    assert_eq!(prefill, prompt_tokens);
}

/// A real run's trace (a small pool, so that it preempts; block tables on) reads back as
/// schema version 2, and its records agree with each other and with the engine's counters.
#[test]
fn a_real_trace_reads_back_to_the_schema() {
    let mut s = setup(8 * BYTES_PER_BLOCK, 64, 64);
    let trace = SharedBuffer::default();
    let options = TraceOptions { block_tables: true };
    s.engine.set_trace(Box::new(trace.clone()), options);
    let prompts = prompts(&s.tokenizer);
    let outputs = generate(
        &mut s.engine,
        prompts.iter().map(|p| greedy(p.clone(), 40)).collect(),
    );
    let records = read_trace(&trace.0.lock().unwrap()[..]).unwrap();
    let TraceRecord::Header(header) = &records[0] else {
        panic!("no header first")
    };
    assert_eq!((header.block_size, header.num_blocks), (16, 8));

    let steps: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            TraceRecord::Step(step) => Some(step),
            _ => None,
        })
        .collect();
    assert_eq!(steps.len() as u64, s.engine.stats().steps);
    for pair in steps.windows(2) {
        assert_eq!(pair[1].step, pair[0].step + 1);
        assert!(pair[1].t_ms >= pair[0].t_ms + pair[0].duration_ms * 0.999);
    }
    for step in &steps {
        assert!(step.prefill_tokens + step.decode_tokens <= 64, "the budget");
        assert_eq!(step.blocks_used + step.blocks_free, 8);
        assert!(
            step.seqs.iter().all(|seq| seq.request > 0),
            "every sequence names its request, also in the step it finishes"
        );
        let tables = step.block_tables.as_ref().expect("--trace-blocks");
        assert_eq!(tables.len(), step.seqs.len());
        for (seq, blocks) in step.seqs.iter().zip(tables) {
            assert_eq!(seq.id, blocks.id);
            assert!(!blocks.tables[0].is_empty());
        }
    }
    let preempted: usize = steps.iter().map(|s| s.preempted.len()).sum();
    assert!(preempted > 0);
    assert_eq!(preempted as u64, s.engine.stats().num_preemptions);

    let events = |kind: RequestEventKind| {
        records
            .iter()
            .filter(|r| matches!(r, TraceRecord::Request(e) if e.event == kind))
            .count()
    };
    assert_eq!(events(RequestEventKind::Arrived), prompts.len());
    assert_eq!(events(RequestEventKind::Scheduled), prompts.len());
    assert_eq!(events(RequestEventKind::Preempted), preempted);
    assert_eq!(events(RequestEventKind::Resumed), preempted);
    assert_eq!(events(RequestEventKind::Finished), prompts.len());
    for record in &records {
        if let TraceRecord::Request(e) = record {
            if e.event == RequestEventKind::Finished {
                assert_eq!(e.reason.as_deref(), Some("length"));
                assert_eq!(e.output_tokens, Some(40));
            }
        }
    }
    assert!(outputs.iter().all(|o| o.tokens.len() == 40));
}

#[test]
fn stop_strings_end_generation_and_are_never_emitted() {
    let mut s = setup(64 << 20, 64, 512);
    let prompt = s
        .tokenizer
        .encode("Count: 1, 2, 3, 4, 5, 6,", false)
        .unwrap();
    let free_run = generate(&mut s.engine, vec![greedy(prompt.clone(), 30)]).remove(0);
    // Stop on a piece of text that the free run produces after a few tokens.
    let cut = free_run
        .text
        .char_indices()
        .nth(6)
        .map_or(free_run.text.len(), |(i, _)| i);
    let stop: String = free_run.text[cut..].chars().take(3).collect();
    assert!(!stop.is_empty(), "free run: {:?}", free_run.text);
    let mut request = greedy(prompt, 30);
    request.stop = vec![stop.clone()];
    let stopped = generate(&mut s.engine, vec![request]).remove(0);
    assert_eq!(stopped.finish, Some(FinishReason::Stop));
    let expected_text = &free_run.text[..free_run.text.find(&stop).unwrap()];
    assert_eq!(stopped.text, expected_text, "stop string {stop:?}");
}

#[test]
fn prefix_caching_reuses_shared_prompt_blocks() {
    let mut s = setup(64 << 20, 64, 512);
    let shared =
        "You are a helpful assistant. Answer briefly and precisely, and never make things up. "
            .repeat(4);
    let a = s
        .tokenizer
        .encode(&format!("{shared}What is rust?"), false)
        .unwrap();
    let b = s
        .tokenizer
        .encode(&format!("{shared}What is iron?"), false)
        .unwrap();
    let first = generate(&mut s.engine, vec![greedy(a, 4)]);
    let hits_before = s.engine.stats().prefix_hit_tokens;
    generate(&mut s.engine, vec![greedy(b.clone(), 4)]);
    let hits = s.engine.stats().prefix_hit_tokens - hits_before;
    assert!(hits >= 48, "only {hits} prompt tokens came from the cache");
    assert_eq!(first.len(), 1);

    // And a cached prefix gives the same output as computing it.
    let mut cold = setup(64 << 20, 64, 512);
    let cold_out = generate(&mut cold.engine, vec![greedy(b.clone(), 8)]);
    let warm_out = generate(&mut s.engine, vec![greedy(b, 8)]);
    assert_eq!(cold_out, warm_out);
}

#[test]
fn dropping_the_receiver_aborts_and_frees_blocks() {
    let mut s = setup(64 << 20, 64, 512);
    let prompt = s
        .tokenizer
        .encode("Tell me a long story about dragons.", false)
        .unwrap();
    let (tx, rx) = mpsc::channel();
    s.engine.submit(greedy(prompt, 200), Box::new(tx)).unwrap();
    s.engine.step();
    s.engine.step();
    assert!(s.engine.stats().kv_usage > 0.0);
    drop(rx);
    s.engine.step(); // the send fails: the request is aborted at once
    assert!(!s.engine.has_work());
    assert_eq!(s.engine.stats().kv_usage, 0.0);
}

#[test]
fn impossible_requests_are_rejected_up_front() {
    let mut s = setup(4 << 20, 64, 512); // 11 blocks of 16 tokens
    let (tx, _rx) = mpsc::channel();
    let err = s
        .engine
        .submit(greedy(vec![100; 10], 1000), Box::new(tx.clone()))
        .unwrap_err();
    assert!(err.to_string().contains("could never complete"), "{err}");
    let err = s
        .engine
        .submit(greedy(vec![100; 9000], 1), Box::new(tx))
        .unwrap_err();
    assert!(
        err.to_string().contains("maximum context length is 8192"),
        "{err}"
    );
}

/// A sliding-window model (synthetic Gemma 3 shape: window 8, every third layer global)
/// through the engine, whose local KV groups release the blocks their window has passed: a
/// pool too small for the workload (preemptions), and prefixes reused from the cache (a
/// window group adopts only the blocks the window reaches), give the greedy outputs of a large
/// pool without prefix caching.
#[test]
fn a_sliding_window_model_gives_the_same_outputs_whatever_the_pool_and_cache() {
    let config = synthetic::preset("tiny-gemma3").unwrap();
    let build = |limits, prefix_caching| {
        let weights =
            synthetic::build(&config, 5, candle_core::quantized::GgmlDType::Q8_0, true).unwrap();
        let tokenizer = synthetic::tokenizer(&config).unwrap();
        engine(LlamaModel::new(weights), tokenizer, limits, prefix_caching)
    };
    let shared: Vec<u32> = (0..70).map(|i| (i * 7 + 3) % 250).collect();
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|p| {
            let mut prompt = shared.clone();
            prompt.extend((0..5 + 3 * p).map(|i| (i * 11 + p * 31) % 250));
            prompt
        })
        .collect();
    let requests = || -> Vec<Request> { prompts.iter().map(|p| greedy(p.clone(), 30)).collect() };

    let mut reference = build((64 << 20, 64, 512), false);
    let expected = generate(&mut reference.engine, requests());

    // tiny-gemma3's 3 layers make 3 KV groups of one layer (1 global, 2 local), so a block
    // holds one layer's 16 tokens; 24 blocks are far less than 6 sequences of up to 115 tokens
    // need even with the windows (each about 8 global blocks and 2 x 2 local ones), and 64-token
    // chunks make the prefills cross the window.
    let groups = minserve_model::KvGroups::of(&config);
    let block_bytes = minserve_model::KvCache::bytes_per_block(
        &config,
        &groups,
        minserve_model::KvDtype::F16,
        16,
    );
    let mut small = build((24 * block_bytes, 64, 64), true);
    // One request first, so the others find its prefix in the cache.
    let first = generate(&mut small.engine, vec![requests().remove(0)]);
    let rest = generate(&mut small.engine, requests().split_off(1));
    let stats = small.engine.stats();
    assert!(stats.prefix_hit_tokens > 0, "no prefix was reused");
    assert!(stats.num_preemptions > 0, "the pool was meant to run out");
    assert_eq!(expected[0], first[0]);
    assert_eq!(expected[1..], rest[..]);
}
