//! Speculative decoding through the whole engine, against a small Markov model that reads every
//! context back through the paged cache (so a wrong K/V slot, a draft left in the cache where a
//! real token belongs, or a block reused with the wrong tokens changes its logits):
//!
//! - greedy output is identical with and without drafts, for a batch mixing requests that
//!   speculate with requests that may not, under preemption, and from the prefix cache;
//! - seeded sampling keeps the model's distribution (chi-square against the exact marginals);
//! - no block leaks once everything is done;
//! - all of that again with a draft model (`draft_model.rs`, a second Markov model with its own
//!   paged cache and noise, so it agrees with the target only sometimes), which also survives a
//!   draft pool too small for every sequence and a draft model that fails.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use minserve_core::detokenize::TokenDecoder;
use minserve_core::draft_model::DraftModel;
use minserve_core::sampling::{Rng, SamplingParams};
use minserve_core::scheduler::SchedulerConfig;
use minserve_core::sequence::SeqId;
use minserve_core::speculative::{DraftMethod, DraftWant, Drafter, SpeculativeConfig};
use minserve_core::{CacheGeometry, Logits, ModelExecutor, SequenceChunk, StepBatch};
use minserve_core::{Engine, EngineConfig, Request, RequestEvent};

const VOCAB: usize = 8;
const BLOCK_SIZE: usize = 4;

/// P(next | last): the cycle's next token likely, the one after it less, the rest rare.
fn transition(last: u32) -> [f64; VOCAB] {
    let last = last as usize % VOCAB;
    let mut p = [0.03; VOCAB];
    p[(last + 1) % VOCAB] = 0.55;
    p[(last + 2) % VOCAB] = 0.2;
    p[last] = 0.1;
    p
}

/// A Markov chain over [`transition`], plus, with `noise`, pseudo-random offsets drawn from a
/// hash of the whole context (so greedy paths depend on every earlier token). It keeps the
/// token each cache slot holds, performs the step's block copies and writes as a real model
/// does, and reads each logits row's context back through the block table.
struct MarkovModel {
    num_blocks: usize,
    slots: Vec<Option<u32>>,
    noise: f32,
    /// Fails every step from this one on (1-based), as a broken device would.
    fail_from_step: Option<usize>,
    steps: usize,
}

impl MarkovModel {
    fn new(num_blocks: usize, noise: f32) -> Self {
        Self {
            num_blocks,
            slots: vec![None; num_blocks * BLOCK_SIZE],
            noise,
            fail_from_step: None,
            steps: 0,
        }
    }

    fn context(&self, seq: &SequenceChunk, position: usize) -> Vec<u32> {
        (0..=position)
            .map(|p| {
                let slot = seq.block_table[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE;
                self.slots[slot].unwrap_or_else(|| panic!("position {p}: slot {slot} unwritten"))
            })
            .collect()
    }

    fn logits(&self, context: &[u32]) -> Vec<f32> {
        let p = transition(*context.last().expect("a context"));
        let mut hasher = DefaultHasher::new();
        context.hash(&mut hasher);
        let mut rng = Rng::new(hasher.finish());
        p.iter()
            .map(|&p| p.ln() as f32 + self.noise * rng.next_f32())
            .collect()
    }
}

impl ModelExecutor for MarkovModel {
    type Error = std::io::Error;

    fn cache_geometry(&self) -> CacheGeometry {
        CacheGeometry {
            block_size: BLOCK_SIZE,
            num_blocks: self.num_blocks,
        }
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits, Self::Error> {
        self.steps += 1;
        if self.fail_from_step.is_some_and(|step| self.steps >= step) {
            return Err(std::io::Error::other("injected failure"));
        }
        for &(src, dst) in &batch.block_copies {
            let (src, dst) = (src as usize * BLOCK_SIZE, dst as usize * BLOCK_SIZE);
            self.slots.copy_within(src..src + BLOCK_SIZE, dst);
        }
        for (&slot, &token) in batch.slot_mapping.iter().zip(&batch.token_ids) {
            self.slots[slot as usize] = Some(token);
        }
        let mut data = Vec::new();
        for seq in &batch.sequences {
            let rows = seq.num_logit_rows();
            for position in seq.context_len - rows..seq.context_len {
                data.extend(self.logits(&self.context(seq, position)));
            }
        }
        Ok(Logits {
            vocab_size: VOCAB,
            data,
        })
    }
}

struct Digits;

impl TokenDecoder for Digits {
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|t| t.to_string()).collect()
    }
}

fn engine(
    num_blocks: usize,
    noise: f32,
    speculative: Option<SpeculativeConfig>,
) -> Engine<MarkovModel> {
    let model = MarkovModel::new(num_blocks, noise);
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            ..SchedulerConfig::default()
        },
        prefix_caching: true,
        max_model_len: 256,
    };
    let mut engine = Engine::new(model, config, Arc::new(Digits), vec![]);
    if let Some(config) = speculative {
        engine.set_speculative(config);
    }
    engine
}

/// Prompt lookup with `k` drafts that never switches itself off, so that every test exercises
/// verification however its drafts fare.
fn always_drafting(k: usize) -> SpeculativeConfig {
    SpeculativeConfig {
        method: DraftMethod::Ngram { min_n: 1, max_n: 3 },
        num_speculative_tokens: k,
        min_acceptance: 0.0,
        min_acceptance_per_seq: 0.0,
        disable_by_batch_size: None,
    }
}

/// A drafter the test can still look into once the engine owns it; it also records how many
/// sequences were running at each step it was asked for drafts.
#[derive(Clone)]
struct SharedDrafter(
    Arc<Mutex<DraftModel<MarkovModel>>>,
    Arc<Mutex<(usize, Vec<usize>)>>,
);

impl Drafter for SharedDrafter {
    fn propose(&mut self, wants: &[DraftWant<'_>]) -> Result<Vec<Vec<u32>>, String> {
        let mut seen = self.1.lock().unwrap();
        let running = seen.0;
        seen.1.push(running);
        self.0.lock().unwrap().propose(wants)
    }

    fn retain(&mut self, live: &[SeqId]) {
        self.1.lock().unwrap().0 = live.len();
        self.0.lock().unwrap().retain(live)
    }
}

/// [`engine`] drafting with a Markov draft model of `draft_blocks` blocks and its own `noise`,
/// `k` drafts per step, never switching itself off.
fn draft_engine(
    num_blocks: usize,
    noise: f32,
    k: usize,
    draft: MarkovModel,
) -> (Engine<MarkovModel>, SharedDrafter) {
    let config = SpeculativeConfig {
        min_acceptance: 0.0,
        min_acceptance_per_seq: 0.0,
        disable_by_batch_size: None,
        ..SpeculativeConfig::draft_model(k)
    };
    draft_engine_with(num_blocks, noise, config, draft)
}

/// [`draft_engine`] with the speculative settings given.
fn draft_engine_with(
    num_blocks: usize,
    noise: f32,
    config: SpeculativeConfig,
    draft: MarkovModel,
) -> (Engine<MarkovModel>, SharedDrafter) {
    let mut engine = engine(num_blocks, noise, None);
    let drafter = SharedDrafter(
        Arc::new(Mutex::new(
            DraftModel::new(draft, VOCAB, 256).expect("same vocabulary"),
        )),
        Arc::default(),
    );
    engine.set_draft_model(config, Box::new(drafter.clone()));
    (engine, drafter)
}

/// Runs `requests` to the end, all submitted at once, checking the block manager's
/// invariants after every step; returns each request's tokens.
fn run(engine: &mut Engine<MarkovModel>, requests: Vec<Request>) -> Vec<Vec<u32>> {
    let receivers: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let (tx, rx) = mpsc::channel();
            engine.submit(request, Box::new(tx)).expect("valid");
            rx
        })
        .collect();
    while engine.step() {
        let scheduler = engine.scheduler();
        scheduler.blocks().check_invariants(scheduler.running());
    }
    assert_eq!(engine.stats().kv_usage, 0.0, "every block is given back");
    receivers
        .iter()
        .map(|rx| {
            rx.try_iter()
                .filter_map(|event| match event {
                    RequestEvent::Token { token, .. } => Some(token),
                    RequestEvent::Failed(e) => panic!("failed: {e}"),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    let mut request = Request::new(prompt, max_tokens);
    request.params = SamplingParams::greedy();
    request
}

/// Prompts that repeat (the cycle, so prompt lookup finds matches) and prompts that do not,
/// requests that speculate and requests that may not (a repetition penalty), long and short
/// limits, a stop string.
fn mixed_requests() -> Vec<Request> {
    let cycle = |start: u32, len: usize| -> Vec<u32> {
        (0..len as u32)
            .map(|i| (start + i) % VOCAB as u32)
            .collect()
    };
    let mut requests = Vec::new();
    for i in 0..12u32 {
        let prompt = match i % 3 {
            0 => cycle(i, 10 + i as usize),
            1 => vec![i % 8, 5, 2, 7, 7, 1],
            _ => [cycle(i, 6), cycle(i + 3, 6)].concat(),
        };
        let mut request = greedy(prompt, 20 + 5 * i as usize);
        if i % 4 == 3 {
            request.params.repetition_penalty = 1.3;
            request.max_tokens = 12;
        }
        requests.push(request);
    }
    requests.push(greedy(vec![1, 2, 3, 1, 2, 3], 1));
    requests.push(greedy(vec![1, 2, 3, 1, 2, 3], 2));
    let mut stopped = greedy(vec![0, 1, 2, 3, 0, 1, 2, 3], 40);
    stopped.stop = vec!["67".into()];
    requests.push(stopped);
    requests
}

#[test]
fn greedy_output_is_identical_with_and_without_drafts() {
    let mut plain = engine(256, 1.5, None);
    let expected = run(&mut plain, mixed_requests());
    let plain_steps = plain.stats().steps;

    let mut speculating = engine(256, 1.5, Some(always_drafting(4)));
    assert_eq!(run(&mut speculating, mixed_requests()), expected);
    let stats = speculating.stats();
    assert!(stats.spec_num_accepted_tokens > 20, "{stats:?}");
    assert!(
        stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens,
        "some drafts are rejected: {stats:?}"
    );
    assert!(
        stats.steps < plain_steps,
        "{} vs {plain_steps} steps",
        stats.steps
    );
    assert_eq!(stats.generation_tokens, plain.stats().generation_tokens);

    // Again, from the prefix cache that the verifying steps filled.
    let hits_before = stats.prefix_hit_tokens;
    assert_eq!(run(&mut speculating, mixed_requests()), expected);
    assert!(speculating.stats().prefix_hit_tokens > hits_before);
}

/// Eight greedy requests of 40 tokens after 12 of the cycle, each starting elsewhere in it.
fn eight_cycles() -> Vec<Request> {
    (0..8u32)
        .map(|i| greedy((0..12).map(|t| (t + i) % 8).collect(), 40))
        .collect()
}

/// A pool too small for the batch: sequences are preempted (some right after verifying
/// drafts) and recomputed; the output is still the plain engine's.
#[test]
fn greedy_output_survives_preemption() {
    let expected = run(&mut engine(256, 1.5, None), eight_cycles());
    let mut small = engine(40, 1.5, Some(always_drafting(4)));
    assert_eq!(run(&mut small, eight_cycles()), expected);
    assert!(small.stats().num_preemptions > 0);
    assert!(small.stats().spec_num_accepted_tokens > 0);
}

#[test]
fn a_draft_model_keeps_greedy_output() {
    let mut plain = engine(256, 1.5, None);
    let expected = run(&mut plain, mixed_requests());

    // The draft sees the same chain with different noise: right often, wrong often.
    let draft = MarkovModel::new(512, 1.0);
    let (mut speculating, drafter) = draft_engine(256, 1.5, 4, draft);
    assert_eq!(run(&mut speculating, mixed_requests()), expected);
    let stats = speculating.stats();
    assert!(stats.spec_num_accepted_tokens > 20, "{stats:?}");
    assert!(
        stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens + 10,
        "many drafts are rejected: {stats:?}"
    );
    assert!(stats.steps < plain.stats().steps);
    assert!(stats.spec_draft_seconds > 0.0);
    let drafter = drafter.0.lock().unwrap();
    assert_eq!(
        drafter.num_free_blocks(),
        512,
        "the draft cache is given back once its sequences are done"
    );
}

/// A draft model identical to the target proposes exactly what the target picks, as long as its
/// cache holds exactly the sequence's tokens: any stale or misplaced K/V (a rejected draft left
/// where an accepted token belongs, a position off by one) changes the context it reads back,
/// and with it the draft.
#[test]
fn a_draft_model_identical_to_the_target_is_always_right() {
    let expected = run(&mut engine(256, 1.5, None), mixed_requests());
    let (mut speculating, _) = draft_engine(256, 1.5, 4, MarkovModel::new(512, 1.5));
    assert_eq!(run(&mut speculating, mixed_requests()), expected);
    let stats = speculating.stats();
    assert!(stats.spec_num_draft_tokens > 100, "{stats:?}");
    assert_eq!(
        stats.spec_num_accepted_tokens, stats.spec_num_draft_tokens,
        "{stats:?}"
    );
}

/// A target pool that preempts and a draft pool that holds only a few sequences at a time:
/// those without draft blocks run without drafts, and the output is unchanged.
#[test]
fn a_draft_model_survives_preemption_and_a_small_draft_pool() {
    let expected = run(&mut engine(256, 1.5, None), eight_cycles());
    // 30 blocks of 4: a 52-token sequence needs 13, so two draft at a time.
    let (mut small, drafter) = draft_engine(40, 1.5, 4, MarkovModel::new(30, 0.5));
    assert_eq!(run(&mut small, eight_cycles()), expected);
    assert!(small.stats().num_preemptions > 0);
    assert!(small.stats().spec_num_accepted_tokens > 0);
    assert_eq!(drafter.0.lock().unwrap().num_free_blocks(), 30);
}

/// A draft model that fails mid-run turns drafting off; every request still completes with the
/// plain engine's output.
#[test]
fn a_failing_draft_model_turns_drafting_off_and_loses_nothing() {
    let expected = run(&mut engine(256, 1.5, None), mixed_requests());
    let mut draft = MarkovModel::new(512, 1.0);
    draft.fail_from_step = Some(30);
    let (mut speculating, _) = draft_engine(256, 1.5, 4, draft);
    assert_eq!(run(&mut speculating, mixed_requests()), expected);
    let stats = speculating.stats();
    assert_eq!(stats.spec_draft_failures, 1, "{stats:?}");
    assert!(stats.spec_num_draft_tokens > 0, "it drafted before failing");
}

/// Above `disable_by_batch_size` running sequences nobody drafts (a draft model's passes would
/// delay the whole batch); once the batch shrinks to it, drafting resumes.
#[test]
fn no_drafts_in_a_batch_larger_than_the_limit() {
    // Three short requests and three long ones: six run at first, three after a dozen steps.
    let requests = || -> Vec<Request> {
        [10, 12, 14, 150, 160, 170]
            .into_iter()
            .enumerate()
            .map(|(i, max_tokens)| greedy((0..6).map(|t| (t + i as u32) % 8).collect(), max_tokens))
            .collect()
    };
    let expected = run(&mut engine(256, 1.5, None), requests());
    let config = SpeculativeConfig {
        min_acceptance: 0.0,
        min_acceptance_per_seq: 0.0,
        disable_by_batch_size: Some(3),
        ..SpeculativeConfig::draft_model(4)
    };
    let (mut limited, drafter) = draft_engine_with(256, 1.5, config, MarkovModel::new(512, 1.0));
    assert_eq!(run(&mut limited, requests()), expected);
    let running_when_drafting = drafter.1.lock().unwrap().1.clone();
    assert!(!running_when_drafting.is_empty(), "it drafts at the end");
    assert!(
        running_when_drafting.iter().all(|&n| n <= 3),
        "{running_when_drafting:?}"
    );
    assert!(limited.stats().spec_num_accepted_tokens > 0);
}

/// A draft model first computes the whole context it has not seen; a sequence whose context
/// is longer than what it may still generate does not draft (the drafts could not earn that
/// back), one with room enough does.
#[test]
fn no_drafts_when_the_catch_up_outweighs_what_is_left_to_generate() {
    let prompt: Vec<u32> = (0..100).map(|t| (t * 3 % 8) as u32).collect();
    let drafted = |max_tokens: usize| {
        let (mut e, _) = draft_engine(256, 1.5, 4, MarkovModel::new(512, 1.0));
        let expected = run(
            &mut engine(256, 1.5, None),
            vec![greedy(prompt.clone(), max_tokens)],
        );
        assert_eq!(
            run(&mut e, vec![greedy(prompt.clone(), max_tokens)]),
            expected
        );
        e.stats().spec_num_draft_tokens
    };
    assert_eq!(
        drafted(60),
        0,
        "100 tokens to catch up, at most 60 to win back"
    );
    assert!(drafted(120) > 0);
}

#[test]
fn a_draft_model_must_share_the_vocabulary() {
    let error = DraftModel::new(MarkovModel::new(8, 0.0), VOCAB + 1, 256)
        .err()
        .expect("refused");
    assert!(error.contains("vocabulary"), "{error}");
}

/// The distribution after temperature and top-k, as the sampler defines it.
fn filtered(p: &[f64; VOCAB], temperature: f64, top_k: usize) -> [f64; VOCAB] {
    let mut order: Vec<usize> = (0..VOCAB).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let mut q = [0.0; VOCAB];
    for &t in order.iter().take(if top_k == 0 { VOCAB } else { top_k }) {
        q[t] = p[t].powf(1.0 / temperature);
    }
    let total: f64 = q.iter().sum();
    q.map(|x| x / total)
}

/// The exact distribution of each of the first `n` output tokens after `last`.
fn marginals(last: u32, n: usize, temperature: f64, top_k: usize) -> Vec<[f64; VOCAB]> {
    let mut state = [0.0; VOCAB];
    state[last as usize] = 1.0;
    (0..n)
        .map(|_| {
            let mut next = [0.0; VOCAB];
            for (from, &weight) in state.iter().enumerate() {
                let q = filtered(&transition(from as u32), temperature, top_k);
                for (to, &q) in q.iter().enumerate() {
                    next[to] += weight * q;
                }
            }
            state = next;
            state
        })
        .collect()
}

/// Pearson's chi-square of `seen` against `expected` probabilities (cells expecting fewer
/// than 5 draws pooled), and the 0.1% critical value for its degrees of freedom
/// (Wilson-Hilferty).
fn chi_square(seen: &[usize], expected: &[f64]) -> (f64, f64) {
    let draws: usize = seen.iter().sum();
    let (mut statistic, mut cells) = (0.0, 0);
    let (mut pooled_seen, mut pooled_expected) = (0.0, 0.0);
    for (&n, &p) in seen.iter().zip(expected) {
        let e = p * draws as f64;
        if e < 5.0 {
            pooled_seen += n as f64;
            pooled_expected += e;
            continue;
        }
        statistic += (n as f64 - e).powi(2) / e;
        cells += 1;
    }
    if pooled_expected > 0.0 {
        statistic += (pooled_seen - pooled_expected).powi(2) / pooled_expected.max(1e-9);
        cells += 1;
    }
    let df = (cells - 1) as f64;
    let z = 3.09;
    let h = 2.0 / (9.0 * df);
    (statistic, df * (1.0 - h + z * h.sqrt()).powi(3))
}

/// 3,000 seeded requests sample 4 tokens each after a prompt that prompt lookup continues
/// (the cycle), so most positions are drafted and about half the drafts accepted. Each
/// position's tokens follow the exact marginal of the Markov chain, and the first two
/// together follow the exact joint distribution; the same statistic rejects the marginals
/// of a slightly different temperature, so it would see a verifier that skews the draw.
#[test]
fn seeded_sampling_keeps_the_model_distribution() {
    const REQUESTS: u64 = 3000;
    const TOKENS: usize = 4;
    let prompt: Vec<u32> = (0..12).map(|t| t % VOCAB as u32).collect();
    let last = *prompt.last().unwrap();
    for (temperature, top_k) in [(1.0, 0), (0.7, 3)] {
        let requests_after = |prompt: &[u32], seed_base: u64| -> Vec<Request> {
            (0..REQUESTS)
                .map(|i| {
                    let mut request = Request::new(prompt.to_vec(), TOKENS);
                    request.params.temperature = temperature as f32;
                    request.params.top_k = top_k;
                    request.params.seed = Some(seed_base + i);
                    request
                })
                .collect()
        };
        let requests = |seed_base: u64| requests_after(&prompt, seed_base);
        let mut e = engine(2048, 0.0, Some(always_drafting(3)));
        let outputs = run(&mut e, requests(0));
        let stats = e.stats();
        assert!(
            stats.spec_num_accepted_tokens > REQUESTS / 2,
            "drafts were verified: {stats:?}"
        );
        assert!(stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens);
        // The same requests drafted by a (noisy) draft model, after the prompt's last two
        // tokens only (the chain's next token depends on the last one alone): a draft model
        // computes the whole context first, and drafts only when that is no more than the
        // tokens still to come.
        let (mut e, _) = draft_engine(2048, 0.0, 3, MarkovModel::new(4096, 1.0));
        let drafted = run(
            &mut e,
            requests_after(&prompt[prompt.len() - 2..], REQUESTS),
        );
        let stats = e.stats();
        assert!(stats.spec_num_accepted_tokens > REQUESTS / 2, "{stats:?}");
        assert!(stats.spec_num_draft_tokens > stats.spec_num_accepted_tokens);

        let exact = marginals(last, TOKENS, temperature, top_k);
        for (position, expected) in exact.iter().enumerate() {
            let mut seen = [0; VOCAB];
            for output in &outputs {
                seen[output[position] as usize] += 1;
            }
            let mut seen_drafted = [0; VOCAB];
            for output in &drafted {
                seen_drafted[output[position] as usize] += 1;
            }
            let (statistic, critical) = chi_square(&seen_drafted, expected);
            assert!(
                statistic < critical,
                "draft model, T={temperature} top_k={top_k}, token {position}: chi-square \
                 {statistic:.1} >= {critical:.1}; seen {seen_drafted:?}, expected {expected:?}"
            );
            let (statistic, critical) = chi_square(&seen, expected);
            assert!(
                statistic < critical,
                "T={temperature} top_k={top_k}, token {position}: chi-square {statistic:.1} >= \
                 {critical:.1}; seen {seen:?}, expected {expected:?}"
            );
            if position == 1 && top_k == 0 {
                let skewed = &marginals(last, TOKENS, 0.85, 0)[position];
                let (statistic, critical) = chi_square(&seen, skewed);
                assert!(statistic > critical, "the test has power: {statistic:.1}");
            }
        }
        let mut joint = vec![0; VOCAB * VOCAB];
        for output in &outputs {
            joint[output[0] as usize * VOCAB + output[1] as usize] += 1;
        }
        let first = filtered(&transition(last), temperature, top_k);
        let expected: Vec<f64> = (0..VOCAB * VOCAB)
            .map(|cell| {
                let (a, b) = (cell / VOCAB, cell % VOCAB);
                first[a] * filtered(&transition(a as u32), temperature, top_k)[b]
            })
            .collect();
        let (statistic, critical) = chi_square(&joint, &expected);
        assert!(
            statistic < critical,
            "joint: {statistic:.1} >= {critical:.1}"
        );

        // A seed reproduces its tokens, drafts and all.
        let again = run(
            &mut engine(2048, 0.0, Some(always_drafting(3))),
            requests(0),
        );
        assert_eq!(again, outputs);
    }
}
