//! The engine and its thread against a fake model whose next token is always "previous + 1":
//! every scheduling and streaming path runs in milliseconds, and outputs are predictable.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use minserve_core::detokenize::TokenDecoder;
use minserve_core::sampling::{Rng, SamplingParams};
use minserve_core::scheduler::SchedulerConfig;
use minserve_core::{CacheGeometry, Logits, ModelExecutor, SequenceChunk, StepBatch};
use minserve_core::{Engine, EngineConfig, EngineHandle, FinishReason, Request, RequestEvent};

const VOCAB: usize = 64;

/// Logits that make `last token + 1` the clear favourite for every sampled sequence.
///
/// The model keeps its own "KV cache" (the token each slot holds), performs the step's block
/// copies and writes as the real one does, and reads every sampled sequence's whole context
/// back through its block table: a missing or misdirected copy-on-write copy fails the step
/// (a slot never written) or, with `noisy`, changes the logits.
struct CountingModel {
    geometry: CacheGeometry,
    slots: Vec<Option<u32>>,
    /// Tokens computed over all steps.
    computed_tokens: usize,
    /// Block copies made over all steps.
    copies: usize,
    /// Pseudo-random logits drawn from a hash of the whole context instead.
    noisy: bool,
    /// Steps executed so far, and the one (counting from 1) that fails before writing anything.
    steps: usize,
    fail_at_step: Option<usize>,
    /// The step that panics instead: an invariant of the engine's thread failing.
    panic_at_step: Option<usize>,
}

impl CountingModel {
    fn context(&self, seq: &SequenceChunk) -> std::io::Result<Vec<u32>> {
        let block_size = self.geometry.block_size;
        (0..seq.context_len)
            .map(|p| {
                let slot = seq.block_table[p / block_size] as usize * block_size + p % block_size;
                self.slots[slot].ok_or_else(|| {
                    std::io::Error::other(format!("position {p} reads slot {slot}, never written"))
                })
            })
            .collect()
    }
}

impl ModelExecutor for CountingModel {
    type Error = std::io::Error;

    fn cache_geometry(&self) -> CacheGeometry {
        self.geometry
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits, Self::Error> {
        self.steps += 1;
        if Some(self.steps) == self.panic_at_step {
            panic!("injected panic");
        }
        if Some(self.steps) == self.fail_at_step {
            return Err(std::io::Error::other("injected failure"));
        }
        let block_size = self.geometry.block_size;
        for &(src, dst) in &batch.block_copies {
            let (src, dst) = (src as usize * block_size, dst as usize * block_size);
            self.slots.copy_within(src..src + block_size, dst);
        }
        self.copies += batch.block_copies.len();
        for (&slot, &token) in batch.slot_mapping.iter().zip(&batch.token_ids) {
            self.slots[slot as usize] = Some(token);
        }
        self.computed_tokens += batch.num_tokens();
        let mut data = Vec::new();
        for seq in batch.sequences.iter().filter(|s| s.sample) {
            let context = self.context(seq)?;
            if self.noisy {
                let mut hasher = DefaultHasher::new();
                context.hash(&mut hasher);
                let mut rng = Rng::new(hasher.finish());
                data.extend((0..VOCAB).map(|_| 4.0 * rng.next_f32()));
            } else {
                let next = (*context.last().expect("a context") as usize + 1) % VOCAB;
                data.extend((0..VOCAB).map(|t| if t == next { 10.0 } else { 0.0 }));
            }
        }
        Ok(Logits {
            vocab_size: VOCAB,
            data,
        })
    }
}

/// Token `t` reads as the letter `a + t % 26`.
struct Letters;

impl TokenDecoder for Letters {
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .map(|&t| (b'a' + (t % 26) as u8) as char)
            .collect()
    }
}

fn engine(num_blocks: usize) -> Engine<CountingModel> {
    engine_with(num_blocks, false)
}

fn engine_with(num_blocks: usize, noisy: bool) -> Engine<CountingModel> {
    let model = CountingModel {
        geometry: CacheGeometry {
            block_size: 4,
            num_blocks,
        },
        slots: vec![None; num_blocks * 4],
        computed_tokens: 0,
        copies: 0,
        noisy,
        steps: 0,
        fail_at_step: None,
        panic_at_step: None,
    };
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: 16,
            max_num_seqs: 8,
            ..SchedulerConfig::default()
        },
        prefix_caching: true,
        max_model_len: 256,
    };
    Engine::new(model, config, Arc::new(Letters), vec![63])
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    let mut r = Request::new(prompt, max_tokens);
    r.params = SamplingParams::greedy();
    r
}

fn collect(rx: &mpsc::Receiver<RequestEvent>) -> (String, Vec<u32>, Option<FinishReason>) {
    let (mut text, mut tokens, mut finish) = (String::new(), Vec::new(), None);
    while let Ok(event) = rx.recv_timeout(Duration::from_secs(10)) {
        match event {
            RequestEvent::Token { token, text: t, .. } => {
                tokens.push(token);
                text.push_str(&t);
            }
            RequestEvent::Finished {
                reason, text: t, ..
            } => {
                text.push_str(&t);
                finish = Some(reason);
                break;
            }
            RequestEvent::Failed(e) => panic!("failed: {e}"),
            RequestEvent::Scheduled { .. } => {}
        }
    }
    (text, tokens, finish)
}

#[test]
fn streams_tokens_through_the_engine_thread() {
    let handle = EngineHandle::spawn(engine(64)).unwrap();
    let receivers: Vec<_> = (0..5u32)
        .map(|i| {
            let (tx, rx) = mpsc::channel();
            let request = handle.validate(greedy(vec![i, i + 1], 6)).unwrap();
            handle.add_request(request, Box::new(tx));
            rx
        })
        .collect();
    for (i, rx) in receivers.iter().enumerate() {
        let (text, tokens, finish) = collect(rx);
        let first = i as u32 + 2;
        assert_eq!(tokens, (first..first + 6).collect::<Vec<_>>());
        assert_eq!(text, Letters.decode(&tokens));
        assert_eq!(finish, Some(FinishReason::Length));
    }
}

/// A panic on the engine thread is reported, not hidden: `failure` says why, the callback is
/// called once (at once when registered after the failure), the request in flight sees its
/// events end, and a request added afterwards is dropped with its sink at once.
#[test]
fn a_panic_on_the_engine_thread_is_reported() {
    let mut e = engine(64);
    e.executor_mut().panic_at_step = Some(3);
    let handle = EngineHandle::spawn(e).unwrap();
    let (reported_tx, reported) = mpsc::channel();
    handle.on_failure(move |reason| reported_tx.send(reason).unwrap());
    let (tx, rx) = mpsc::channel();
    let request = handle.validate(greedy(vec![1, 2], 50)).unwrap();
    handle.add_request(request, Box::new(tx));
    let reason = reported.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(reason.contains("injected panic"), "{reason}");
    assert_eq!(handle.failure().as_deref(), Some(reason.as_str()));
    let (_, tokens, finish) = collect(&rx);
    assert_eq!((tokens.len(), finish), (2, None), "cut after two steps");
    assert!(reported.try_recv().is_err(), "reported once");

    let (late_tx, late) = mpsc::channel();
    handle.on_failure(move |reason| late_tx.send(reason).unwrap());
    assert_eq!(late.try_recv().unwrap(), reason);
    let (tx, rx) = mpsc::channel::<RequestEvent>();
    let request = handle.validate(greedy(vec![3], 5)).unwrap();
    handle.add_request(request, Box::new(tx));
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(1)),
        Err(mpsc::RecvTimeoutError::Disconnected)
    ));
}

#[test]
fn eos_stops_unless_ignored_and_min_tokens_delays_it() {
    let mut e = engine(64);
    let run = |e: &mut Engine<CountingModel>, r: Request| {
        let (tx, rx) = mpsc::channel();
        e.submit(r, Box::new(tx)).unwrap();
        while e.step() {}
        collect(&rx)
    };
    // 61 -> 62 -> 63 (EOS): stops after 62, the EOS token itself is never text.
    let (text, tokens, finish) = run(&mut e, greedy(vec![61], 10));
    assert_eq!((tokens, finish), (vec![62, 63], Some(FinishReason::Stop)));
    assert_eq!(text, Letters.decode(&[62]));

    let mut ignoring = greedy(vec![61], 4);
    ignoring.ignore_eos = true;
    assert_eq!(run(&mut e, ignoring).1, vec![62, 63, 0, 1]);

    // With min_tokens the EOS is masked, so the model's favourite is unavailable.
    let mut patient = greedy(vec![62], 3);
    patient.min_tokens = 2;
    let (_, tokens, _) = run(&mut e, patient);
    assert_ne!(tokens[0], 63);
}

#[test]
fn stop_strings_cut_the_text() {
    let mut e = engine(64);
    let (tx, rx) = mpsc::channel();
    let mut r = greedy(vec![0], 20); // b c d e f g ...
    r.stop = vec!["ef".into()];
    e.submit(r, Box::new(tx)).unwrap();
    while e.step() {}
    let (text, _, finish) = collect(&rx);
    assert_eq!(text, "bcd");
    assert_eq!(finish, Some(FinishReason::Stop));
}

#[test]
fn decode_only_steps_are_counted_apart_from_prefill() {
    let mut e = engine(64);
    // Three prompts of 10, 7 tokens each, 16 tokens per step. Step 1: A's prompt and 6 of
    // B's (A samples); step 2: A's decode token, B's last 4, C's 10 (all three sample). Then
    // decode alone: A's 5 tokens left beside B's and C's first 5, then B's and C's last.
    let receivers: Vec<_> = (0..3u32)
        .map(|i| {
            let (tx, rx) = mpsc::channel();
            e.submit(greedy((i * 10..i * 10 + 10).collect(), 7), Box::new(tx))
                .unwrap();
            rx
        })
        .collect();
    while e.step() {}
    for rx in &receivers {
        assert_eq!(collect(rx).1.len(), 7);
    }
    let stats = e.stats();
    assert_eq!((stats.steps, stats.decode_steps), (8, 6), "{stats:?}");
    assert_eq!(stats.decode_step_tokens, 5 * 3 + 2, "{stats:?}");
    assert!(stats.decode_step_seconds > 0.0);
}

#[test]
fn a_failed_step_leaves_nothing_in_the_prefix_cache() {
    let mut e = engine(64);
    e.executor_mut().fail_at_step = Some(1);
    // Three full blocks of 4: registered in the prefix cache when the step is scheduled.
    let prompt: Vec<u32> = (0..12).collect();
    let (tx, rx) = mpsc::channel();
    e.submit(greedy(prompt.clone(), 2), Box::new(tx)).unwrap();
    while e.step() {}
    assert!(rx
        .try_iter()
        .any(|ev| matches!(ev, RequestEvent::Failed(_))));
    assert_eq!(e.stats().kv_usage, 0.0);

    // Had the failed step's blocks stayed registered, this request would reuse slots that
    // were never written (and the model would refuse to read them).
    let (tx, rx) = mpsc::channel();
    e.submit(greedy(prompt, 2), Box::new(tx)).unwrap();
    while e.step() {}
    let (_, tokens, finish) = collect(&rx);
    assert_eq!(tokens, vec![12, 13]);
    assert_eq!(finish, Some(FinishReason::Length));
    assert_eq!(e.stats().prefix_hit_tokens, 0);
}

#[test]
fn n_samples_share_the_prompt_and_finish_separately() {
    let mut e = engine(64);
    let (tx, rx) = mpsc::channel();
    let mut r = greedy((0..9).collect(), 3);
    r.n = 3;
    e.submit(r, Box::new(tx)).unwrap();
    while e.step() {}
    let events: Vec<_> = rx.try_iter().collect();
    let finished: Vec<usize> = events
        .iter()
        .filter_map(|ev| match ev {
            RequestEvent::Finished { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(finished.len(), 3);
    for i in 0..3 {
        assert!(finished.contains(&i));
    }
    // The 9-token prompt is computed once, by the first sample; the others are forked from
    // it, so none looks the prompt up in the prefix cache. Each sample then computes 2 tokens
    // (its third ends it, uncomputed), and two of the three copy the shared partial block.
    assert_eq!(e.executor().computed_tokens, 9 + 3 * 2);
    assert_eq!(e.stats().prefix_hit_tokens, 0);
    assert_eq!(e.executor().copies, 2);
    assert_eq!(e.stats().kv_usage, 0.0);
}

/// Each sample's tokens, by index, from a request's events.
fn tokens_by_sample(rx: &mpsc::Receiver<RequestEvent>, n: usize) -> Vec<Vec<u32>> {
    let mut tokens = vec![Vec::new(); n];
    for event in rx.try_iter() {
        match event {
            RequestEvent::Token { index, token, .. } => tokens[index].push(token),
            RequestEvent::Failed(e) => panic!("failed: {e}"),
            _ => {}
        }
    }
    tokens
}

fn sampled(prompt: Vec<u32>, max_tokens: usize, n: usize, seed: u64) -> Request {
    let mut r = Request::new(prompt, max_tokens);
    r.params = SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    r.ignore_eos = true;
    r.n = n;
    r
}

/// What each of `n` samples of `prompt` draws as its own request with `n = 1`, with the seed
/// the engine derives for that sample from `seed`: exactly what the samples drew before they
/// were forked, when each computed the prompt itself.
fn separately(prompt: &[u32], max_tokens: usize, n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut e = engine_with(256, true);
    (0..n as u64)
        .map(|i| {
            let (tx, rx) = mpsc::channel();
            let r = sampled(
                prompt.to_vec(),
                max_tokens,
                1,
                seed.wrapping_add(i * 0x9E37_79B9),
            );
            e.submit(r, Box::new(tx)).unwrap();
            while e.step() {}
            tokens_by_sample(&rx, 1).remove(0)
        })
        .collect()
}

#[test]
fn forked_samples_draw_what_separate_requests_with_their_seeds_draw() {
    // Prompts ending inside a block (copy-on-write of the shared partial block) and at a block
    // edge (nothing to copy: every sample starts a block of its own).
    for (prompt_len, copies) in [(10, 3), (11, 3), (8, 0)] {
        let prompt: Vec<u32> = (0..prompt_len).map(|t| t * 7 % 64).collect();
        let mut e = engine_with(64, true);
        let (tx, rx) = mpsc::channel();
        e.submit(sampled(prompt.clone(), 12, 4, 99), Box::new(tx))
            .unwrap();
        while e.step() {}
        let forked = tokens_by_sample(&rx, 4);
        assert_eq!(
            forked,
            separately(&prompt, 12, 4, 99),
            "prompt of {prompt_len}"
        );
        assert_ne!(forked[0], forked[1], "the samples are independent draws");
        assert_eq!(
            e.executor().computed_tokens,
            prompt_len as usize + 4 * 11,
            "the prompt is computed once"
        );
        assert_eq!(e.executor().copies, copies, "prompt of {prompt_len}");
        assert_eq!(e.stats().kv_usage, 0.0);
    }
}

#[test]
fn preempted_forks_recompute_and_draw_the_same_tokens() {
    // 8 blocks of 4: the 3 samples of a 10-token prompt share 2 full blocks, then each needs 3
    // of its own to reach 20 tokens: 11 in all, so samples are preempted and recompute.
    let prompt: Vec<u32> = (0..10).map(|t| t * 5 % 64).collect();
    let mut e = engine_with(8, true);
    let (tx, rx) = mpsc::channel();
    e.submit(sampled(prompt.clone(), 10, 3, 5), Box::new(tx))
        .unwrap();
    while e.step() {}
    assert!(
        e.stats().num_preemptions > 0,
        "the pool was meant to run out"
    );
    assert_eq!(tokens_by_sample(&rx, 3), separately(&prompt, 10, 3, 5));
    assert_eq!(e.stats().kv_usage, 0.0);
    assert!(!e.has_work());
}

#[test]
fn aborting_or_dropping_a_forked_request_frees_everything() {
    for (steps, drop_receiver) in [(1, false), (2, false), (3, false), (1, true), (2, true)] {
        let mut e = engine_with(64, true);
        let (tx, rx) = mpsc::channel();
        // 20 prompt tokens take two steps with a budget of 16: step 1 is before the fork.
        let id = e
            .submit(sampled((0..20).collect(), 10, 3, 1), Box::new(tx))
            .unwrap();
        for _ in 0..steps {
            e.step();
        }
        assert!(e.stats().kv_usage > 0.0);
        if drop_receiver {
            drop(rx);
        } else {
            e.abort(id);
        }
        // A dropped receiver is noticed on the next send, within a step.
        while e.step() {}
        assert_eq!(e.stats().kv_usage, 0.0, "after {steps} steps");
        assert!(!e.has_work());
    }
}

#[test]
fn aborting_frees_blocks_and_unknown_requests_are_rejected_with_a_message() {
    let mut e = engine(8);
    let (tx, rx) = mpsc::channel();
    let id = e.submit(greedy(vec![1, 2, 3], 20), Box::new(tx)).unwrap();
    e.step();
    assert!(e.stats().kv_usage > 0.0);
    e.abort(id);
    e.step();
    assert_eq!(e.stats().kv_usage, 0.0);
    assert!(!e.has_work());
    drop(rx);

    let (tx, rx) = mpsc::channel();
    let err = e.submit(greedy(vec![1; 40], 1), Box::new(tx)).unwrap_err();
    assert!(err.to_string().contains("could never complete"), "{err}");
    assert!(matches!(rx.try_recv(), Ok(RequestEvent::Failed(_))));
}

/// The `at` of every `Scheduled` event in `events`.
fn scheduled_at(events: &[RequestEvent]) -> Vec<std::time::Instant> {
    events
        .iter()
        .filter_map(|ev| match ev {
            RequestEvent::Scheduled { at, .. } => Some(*at),
            _ => None,
        })
        .collect()
}

#[test]
fn scheduled_is_reported_once_when_a_request_first_runs() {
    let mut e = engine(64);
    // The first prompt takes the whole 16-token budget of step 1, so the second waits a step.
    let (tx_a, rx_a) = mpsc::channel();
    let mut a = greedy((0..16).collect(), 3);
    a.n = 2;
    e.submit(a, Box::new(tx_a)).unwrap();
    let (tx_b, rx_b) = mpsc::channel();
    e.submit(greedy(vec![1, 2, 3, 4], 3), Box::new(tx_b))
        .unwrap();

    e.step();
    let step1_a: Vec<_> = rx_a.try_iter().collect();
    assert!(
        matches!(step1_a[0], RequestEvent::Scheduled { .. }),
        "{step1_a:?}"
    );
    assert!(
        rx_b.try_recv().is_err(),
        "the second request was not scheduled yet"
    );
    e.step();
    let step2_b: Vec<_> = rx_b.try_iter().collect();
    assert!(
        matches!(step2_b[0], RequestEvent::Scheduled { .. }),
        "{step2_b:?}"
    );
    assert!(scheduled_at(&step2_b)[0] > scheduled_at(&step1_a)[0]);

    while e.step() {}
    let rest_a: Vec<_> = rx_a.try_iter().collect();
    let rest_b: Vec<_> = rx_b.try_iter().collect();
    // Once per request, not once per sample (`n` = 2) nor per step.
    assert_eq!(
        scheduled_at(&step1_a).len() + scheduled_at(&rest_a).len(),
        1
    );
    assert_eq!(
        scheduled_at(&step2_b).len() + scheduled_at(&rest_b).len(),
        1
    );
    let finished = rest_a
        .iter()
        .filter(|ev| matches!(ev, RequestEvent::Finished { .. }))
        .count();
    assert_eq!(finished, 2);
}

#[test]
fn scheduled_is_not_repeated_after_a_preemption() {
    // 6 blocks of 4 tokens; each request grows to 16 tokens (4 blocks): they cannot both run
    // to the end, so one is preempted and scheduled again later.
    let mut e = engine(6);
    let receivers: Vec<_> = (0..2u32)
        .map(|i| {
            let (tx, rx) = mpsc::channel();
            let prompt = (i * 10..i * 10 + 8).collect();
            e.submit(greedy(prompt, 8), Box::new(tx)).unwrap();
            rx
        })
        .collect();
    while e.step() {}
    assert!(e.stats().num_preemptions > 0);
    for rx in receivers {
        let events: Vec<_> = rx.try_iter().collect();
        assert!(matches!(events[0], RequestEvent::Scheduled { .. }));
        assert_eq!(scheduled_at(&events).len(), 1, "{events:?}");
        assert!(matches!(events.last(), Some(RequestEvent::Finished { .. })));
    }
}

/// Nobody watching: the live feed gets nothing. Someone watching: every step and request
/// event of a run that preempts, in the trace's schema, and a block map that adds up.
#[test]
fn the_live_feed_is_fed_only_while_watched() {
    use minserve_core::live::{BLOCK_CACHED, BLOCK_FREE, BLOCK_SHARED};
    use minserve_core::trace::{RequestEventKind, TraceRecord};

    let run = |e: &mut Engine<CountingModel>| {
        let receivers: Vec<_> = (0..4u32)
            .map(|i| {
                let (tx, rx) = mpsc::channel();
                e.submit(greedy(vec![i; 6], 12), Box::new(tx)).unwrap();
                rx
            })
            .collect();
        while e.step() {}
        receivers
    };
    // 12 blocks of 4 for four sequences that grow to 5 blocks each: preemptions.
    let mut e = engine(12);
    let feed = e.live_feed();
    run(&mut e);
    assert!(
        e.stats().num_preemptions > 0,
        "the pool was meant to run out"
    );
    e.publish_block_map();
    assert_eq!(feed.published(), (0, 0), "published with nobody watching");

    let mut watch = feed.watch();
    let steps_before = e.stats().steps;
    let preemptions_before = e.stats().num_preemptions;
    run(&mut e);
    let update = watch.read();
    assert_eq!(update.missed, 0);
    let mut steps = Vec::new();
    let mut events = Vec::new();
    for record in &update.records {
        match record {
            TraceRecord::Step(s) => steps.push(s),
            TraceRecord::Request(r) => events.push(r),
            TraceRecord::Header(_) => panic!("a header in the live feed"),
        }
    }
    let numbers: Vec<u64> = steps.iter().map(|s| s.step).collect();
    assert_eq!(
        numbers,
        (steps_before + 1..=e.stats().steps).collect::<Vec<_>>()
    );
    let count = |kind| events.iter().filter(|r| r.event == kind).count();
    assert_eq!(count(RequestEventKind::Arrived), 4);
    assert_eq!(count(RequestEventKind::Scheduled), 4);
    assert_eq!(count(RequestEventKind::Finished), 4);
    let preempted: usize = steps.iter().map(|s| s.preempted.len()).sum();
    assert_eq!(
        preempted as u64,
        e.stats().num_preemptions - preemptions_before
    );
    assert_eq!(count(RequestEventKind::Preempted), preempted);

    // The map of a pool mid-run: each sequence's cells are its blocks.
    let (tx, _rx) = mpsc::channel();
    e.submit(greedy(vec![9; 6], 12), Box::new(tx)).unwrap();
    e.step();
    e.publish_block_map();
    let map = watch.read().block_map.expect("a block map");
    let (free, cached, used) = map.counts();
    assert_eq!(free + cached + used, 12);
    let usage = e.stats().kv_usage;
    assert_eq!(used as f64 / 12.0, usage);
    let running: u32 = map
        .runs
        .iter()
        .filter(|(cell, _)| ![BLOCK_FREE, BLOCK_CACHED, BLOCK_SHARED].contains(cell))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(running, 2, "a 6-token prompt holds 2 blocks of 4");
    assert!(cached > 0, "the finished requests' full blocks stay cached");

    drop(watch);
    let published = feed.published();
    run(&mut e);
    assert_eq!(
        feed.published(),
        published,
        "published after the watcher left"
    );
}
