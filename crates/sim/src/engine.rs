//! Engine-level simulation: minserve's own [`Engine`] (its scheduler, block manager, prefix
//! cache, preemption, `n`-sample forking and output stage: the code `serve` runs) stepped by a
//! [`SimExecutor`] that computes nothing and advances a virtual clock by what a
//! [`CostModel`] says the step costs.
//!
//! The executor returns one logit per sampled row, so every draw is token 0; requests ignore
//! EOS and stop at their `output_len`, as the benchmarks' requests do. Events reach the driver
//! through a channel and are stamped with the virtual time at the end of the step that made
//! them, as a client sees a token when the step that drew it is over.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::mpsc;
use std::sync::Arc;

use minserve_core::detokenize::TokenDecoder;
use minserve_core::sampling::SamplingParams;
use minserve_core::{
    CacheGeometry, Engine, EngineConfig, EngineStats, EventSink, Logits, ModelExecutor, Request,
    RequestEvent, StepBatch,
};
use serde::Serialize;

use crate::cost::{CostModel, StepFeatures};
use crate::router::{Router, RoutingPolicy};
use crate::stats::{tpot_ms, Slo, Summary};
use crate::workload::{prompt_tokens, RequestSpec, SIM_VOCAB};

/// A model executor that only keeps time.
pub struct SimExecutor {
    cost: CostModel,
    geometry: CacheGeometry,
    /// Virtual seconds since the start of the run.
    now: f64,
    /// The features and cost of the last step executed.
    last: Option<(StepFeatures, f64)>,
}

impl SimExecutor {
    pub fn new(cost: CostModel, geometry: CacheGeometry) -> Self {
        Self {
            cost,
            geometry,
            now: 0.0,
            last: None,
        }
    }

    pub fn now(&self) -> f64 {
        self.now
    }

    /// Moves the clock forward to `t` (an idle engine waiting for its next request).
    pub fn advance_to(&mut self, t: f64) {
        self.now = self.now.max(t);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unreachable: the simulated executor never fails")]
pub struct Never;

impl ModelExecutor for SimExecutor {
    type Error = Never;

    fn cache_geometry(&self) -> CacheGeometry {
        self.geometry
    }

    fn vocab_size(&self) -> usize {
        SIM_VOCAB
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits, Never> {
        let features = StepFeatures::of(batch);
        let seconds = self.cost.step_seconds(&features);
        self.now += seconds;
        self.last = Some((features, seconds));
        Ok(Logits {
            vocab_size: 1,
            data: vec![0.0; batch.num_sampled()],
        })
    }
}

/// Simulated text is never read.
struct NoText;

impl TokenDecoder for NoText {
    fn decode(&self, _ids: &[u32]) -> String {
        String::new()
    }
}

/// What a simulated request's sink forwards to the driver.
enum SimEvent {
    Token,
    Finished,
    Failed,
}

struct SimSink {
    index: usize,
    events: mpsc::Sender<(usize, SimEvent)>,
}

impl EventSink for SimSink {
    fn send(&self, event: RequestEvent) -> bool {
        let event = match event {
            RequestEvent::Token { .. } => SimEvent::Token,
            RequestEvent::Finished { .. } => SimEvent::Finished,
            RequestEvent::Failed(_) => SimEvent::Failed,
            RequestEvent::Scheduled { .. } => return true,
        };
        let _ = self.events.send((self.index, event));
        true
    }

    fn is_closed(&self) -> bool {
        false
    }
}

/// How requests are released.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// At their `arrival_s`.
    Open,
    /// This many clients, each sending its next request when its previous one ends (the
    /// first ones at 0), like `bench serve --concurrency`.
    Closed { concurrency: usize },
}

/// The engine to simulate.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    pub engine: EngineConfig,
    pub geometry: CacheGeometry,
    pub cost: CostModel,
    pub slo: Option<Slo>,
    /// Seconds the server's front end spends on each request, one at a time, before the
    /// engine sees it (0 for requests handed to the engine in process, as `bench throughput`
    /// does). Requests sent together so reach a running engine staggered, as over HTTP.
    pub ingest_s: f64,
}

/// The server's front end: each request takes `seconds` (parsing, tokenizing) on one queue
/// before the engine sees it.
struct Ingest {
    seconds: f64,
    free_at: f64,
}

impl Ingest {
    /// When a request sent at `sent` reaches the engine.
    fn admit(&mut self, sent: f64) -> f64 {
        self.free_at = self.free_at.max(sent) + self.seconds;
        self.free_at
    }
}

/// One request as its client saw it, in virtual seconds.
#[derive(Debug, Clone, Default)]
struct Timeline {
    sent: f64,
    tokens: usize,
    first_token: Option<f64>,
    last_token: f64,
    finished: Option<f64>,
    failed: bool,
}

/// One step of the run, for `--step-trace`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub start_s: f64,
    pub duration_s: f64,
    #[serde(flatten)]
    pub features: StepFeatures,
    pub running: usize,
    pub waiting: usize,
    pub kv_usage: f64,
    pub preemptions: u64,
}

/// Everything a simulated run reports; latencies in milliseconds, throughputs per second, as
/// `bench serve` and `bench throughput` report theirs.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    pub num_requests: usize,
    /// Replicas behind the router (1: one engine, no routing).
    pub replicas: usize,
    pub routing: &'static str,
    pub requests_per_replica: Vec<usize>,
    pub completed: usize,
    /// Refused by the engine's validation (longer than the context or the whole KV cache).
    pub rejected: usize,
    pub first_rejection: Option<String>,
    /// From the first request sent to the last token.
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub ttft_ms: Option<Summary>,
    pub tpot_ms: Option<Summary>,
    pub itl_ms: Option<Summary>,
    pub e2el_ms: Option<Summary>,
    pub slo: Option<Slo>,
    pub good_requests: Option<usize>,
    pub goodput: Option<f64>,
    pub steps: u64,
    pub decode_steps: u64,
    pub mean_decode_batch: f64,
    pub decode_step_ms: f64,
    pub preemptions: u64,
    pub prefix_hit_tokens: u64,
    pub prefix_queried_tokens: u64,
    pub peak_kv_usage: f64,
    /// Time-weighted over the run.
    pub mean_kv_usage: f64,
    /// `(seconds, highest KV usage in the interval ending there)`, at most
    /// [`KV_TIMELINE_POINTS`] points.
    pub kv_usage_timeline: Vec<(f64, f64)>,
}

pub const KV_TIMELINE_POINTS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("the engine stopped making progress with {0} requests unfinished (a scheduler bug)")]
    Stalled(usize),
}

/// Runs `requests` through the real engine under `load`; `step_trace` gets one JSON line per
/// step.
pub fn simulate(
    config: &SimConfig,
    requests: &[RequestSpec],
    load: Load,
    step_trace: Option<&mut dyn Write>,
) -> Result<SimReport, SimError> {
    simulate_replicas(
        config,
        1,
        RoutingPolicy::RoundRobin,
        requests,
        load,
        step_trace,
    )
}

/// One replica: a real engine on its own virtual clock, and the figures kept of its steps.
struct Replica {
    engine: Engine<SimExecutor>,
    events_tx: mpsc::Sender<(usize, SimEvent)>,
    events: mpsc::Receiver<(usize, SimEvent)>,
    /// The step computed and not yet over: when it ends, and the events it made, which its
    /// clients see only then.
    in_flight: Option<(f64, Vec<(usize, SimEvent)>)>,
    kv_area: f64,
    kv_samples: Vec<(f64, f64)>,
    decode_seconds: f64,
}

impl Replica {
    fn new(config: &SimConfig) -> Self {
        let executor = SimExecutor::new(config.cost, config.geometry);
        let (events_tx, events) = mpsc::channel();
        Self {
            engine: Engine::new(executor, config.engine, Arc::new(NoText), Vec::new()),
            events_tx,
            events,
            in_flight: None,
            kv_area: 0.0,
            kv_samples: Vec::new(),
            decode_seconds: 0.0,
        }
    }

    /// When this replica's next step starts, if it has one to start.
    fn next_step_at(&self) -> Option<f64> {
        (self.in_flight.is_none() && self.engine.has_work()).then(|| self.engine.executor().now())
    }
}

/// What happens next in a run of several replicas, in the order ties are taken: a step's end
/// first (its finished clients may send their next request at that instant), then an arrival,
/// then the start of a step (which sees every request that arrived by then).
#[derive(Debug, Clone, Copy)]
enum Next {
    StepEnd { at: f64, replica: usize },
    Arrival { at: f64 },
    StepStart { at: f64, replica: usize },
}

impl Next {
    fn at(self) -> f64 {
        match self {
            Next::StepEnd { at, .. } | Next::Arrival { at } | Next::StepStart { at, .. } => at,
        }
    }

    fn rank(self) -> u8 {
        match self {
            Next::StepEnd { .. } => 0,
            Next::Arrival { .. } => 1,
            Next::StepStart { .. } => 2,
        }
    }
}

/// Runs `requests` through `num_replicas` real engines (independent machines, each with the
/// whole `config`), a `policy` router in front of them, under `load`. Events are taken in the
/// order of virtual time across replicas, so the router sees each replica's load as it is at
/// a request's arrival. `step_trace` gets one JSON line per step of replica 0.
pub fn simulate_replicas(
    config: &SimConfig,
    num_replicas: usize,
    policy: RoutingPolicy,
    requests: &[RequestSpec],
    load: Load,
    mut step_trace: Option<&mut dyn Write>,
) -> Result<SimReport, SimError> {
    let mut replicas: Vec<Replica> = (0..num_replicas.max(1))
        .map(|_| Replica::new(config))
        .collect();
    let mut router = Router::new(policy, replicas.len());
    // The replica each request went to.
    let mut placed = vec![0usize; requests.len()];
    let mut timelines = vec![Timeline::default(); requests.len()];
    // Requests as the router sees them: `(index, sent, reaches the router)`.
    let mut ingest = Ingest {
        seconds: config.ingest_s,
        free_at: 0.0,
    };
    let mut pending: VecDeque<(usize, f64, f64)> = match load {
        Load::Open => requests
            .iter()
            .enumerate()
            .map(|(i, r)| (i, r.arrival_s, ingest.admit(r.arrival_s)))
            .collect(),
        Load::Closed { concurrency } => (0..concurrency.min(requests.len()))
            .map(|i| (i, 0.0, ingest.admit(0.0)))
            .collect(),
    };
    let mut next_closed = pending.len();
    let mut rejected = 0;
    let mut first_rejection = None;
    let mut unfinished = requests.len();
    let mut itls = Vec::new();
    while unfinished > 0 {
        let mut next: Option<Next> = pending.front().map(|&(_, _, at)| Next::Arrival { at });
        for (r, replica) in replicas.iter().enumerate() {
            let candidate = match (&replica.in_flight, replica.next_step_at()) {
                (Some((at, _)), _) => Next::StepEnd {
                    at: *at,
                    replica: r,
                },
                (None, Some(at)) => Next::StepStart { at, replica: r },
                (None, None) => continue,
            };
            let earlier =
                next.is_none_or(|n| (candidate.at(), candidate.rank()) < (n.at(), n.rank()));
            if earlier {
                next = Some(candidate);
            }
        }
        match next {
            None if matches!(load, Load::Closed { .. }) && next_closed < requests.len() => {
                // Every client's request was refused: the next ones go now.
                let now = replicas
                    .iter()
                    .map(|r| r.engine.executor().now())
                    .fold(0.0, f64::max);
                pending.push_back((next_closed, now, ingest.admit(now)));
                next_closed += 1;
            }
            None => return Err(SimError::Stalled(unfinished)),
            Some(Next::Arrival { at }) => {
                let (index, sent, _) = pending.pop_front().expect("an arrival is pending");
                let spec = &requests[index];
                let r = router.route(spec);
                placed[index] = r;
                let replica = &mut replicas[r];
                if replica.in_flight.is_none() && !replica.engine.has_work() {
                    replica.engine.executor_mut().advance_to(at);
                }
                let mut request = Request::new(prompt_tokens(spec, index), spec.output_len);
                request.ignore_eos = true;
                request.params = SamplingParams::greedy();
                timelines[index].sent = sent;
                let sink = SimSink {
                    index,
                    events: replica.events_tx.clone(),
                };
                if let Err(e) = replica.engine.submit(request, Box::new(sink)) {
                    timelines[index].failed = true;
                    rejected += 1;
                    unfinished -= 1;
                    router.done(r, spec.prompt_len + spec.output_len);
                    first_rejection.get_or_insert_with(|| format!("request {index}: {e}"));
                }
                // Refusals were reported through the sink too; they are counted above.
                while replica.events.try_recv().is_ok() {}
            }
            Some(Next::StepStart { replica: r, .. }) => {
                let replica = &mut replicas[r];
                let start = replica.engine.executor().now();
                if !replica.engine.step() {
                    return Err(SimError::Stalled(unfinished));
                }
                let end = replica.engine.executor().now();
                let stats = replica.engine.stats();
                replica.kv_area += stats.kv_usage * (end - start);
                replica.kv_samples.push((end, stats.kv_usage));
                let last = replica.engine.executor().last;
                if let Some((features, duration_s)) = last {
                    if features.prefill_tokens == 0 {
                        replica.decode_seconds += end - start;
                    }
                    if let (0, Some(out)) = (r, step_trace.as_deref_mut()) {
                        let record = StepRecord {
                            step: stats.steps,
                            start_s: start,
                            duration_s,
                            features,
                            running: stats.num_running,
                            waiting: stats.num_waiting,
                            kv_usage: stats.kv_usage,
                            preemptions: stats.num_preemptions,
                        };
                        let _ = serde_json::to_writer(&mut *out, &record);
                        let _ = writeln!(out);
                    }
                }
                let events = replica.events.try_iter().collect();
                replica.in_flight = Some((end, events));
            }
            Some(Next::StepEnd {
                at: end,
                replica: r,
            }) => {
                let (_, events) = replicas[r].in_flight.take().expect("a step is in flight");
                for (index, event) in events {
                    let t = &mut timelines[index];
                    match event {
                        SimEvent::Token => {
                            if t.first_token.is_none() {
                                t.first_token = Some(end);
                            } else {
                                itls.push((end - t.last_token) * 1e3);
                            }
                            t.last_token = end;
                            t.tokens += 1;
                            router.done(placed[index], 1);
                        }
                        SimEvent::Finished | SimEvent::Failed => {
                            t.finished = Some(end);
                            t.failed |= matches!(event, SimEvent::Failed);
                            unfinished -= 1;
                            // Its prompt, and what it did not generate (a failure), are no
                            // longer outstanding either.
                            let spec = &requests[index];
                            let generated = t.tokens.min(spec.output_len);
                            router
                                .done(placed[index], spec.prompt_len + spec.output_len - generated);
                            if matches!(load, Load::Closed { .. }) && next_closed < requests.len() {
                                pending.push_back((next_closed, end, ingest.admit(end)));
                                next_closed += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    let all_stats: Vec<EngineStats> = replicas.iter().map(|r| r.engine.stats()).collect();
    let sum = |f: fn(&EngineStats) -> u64| all_stats.iter().map(f).sum::<u64>();
    let decode_steps = sum(|s| s.decode_steps);
    let decode_seconds: f64 = replicas.iter().map(|r| r.decode_seconds).sum();
    let mut kv_samples: Vec<(f64, f64)> = replicas
        .iter()
        .flat_map(|r| r.kv_samples.iter().copied())
        .collect();
    kv_samples.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut requests_per_replica = vec![0usize; replicas.len()];
    for &r in &placed {
        requests_per_replica[r] += 1;
    }
    let mut report = SimReport {
        num_requests: requests.len(),
        replicas: replicas.len(),
        routing: policy.name(),
        requests_per_replica,
        completed: 0,
        rejected,
        first_rejection,
        duration_s: 0.0,
        total_input_tokens: 0,
        total_output_tokens: 0,
        request_throughput: 0.0,
        output_throughput: 0.0,
        total_token_throughput: 0.0,
        ttft_ms: None,
        tpot_ms: None,
        itl_ms: Summary::of(&itls),
        e2el_ms: None,
        slo: config.slo,
        good_requests: None,
        goodput: None,
        steps: sum(|s| s.steps),
        decode_steps,
        mean_decode_batch: sum(|s| s.decode_step_tokens) as f64 / decode_steps.max(1) as f64,
        decode_step_ms: decode_seconds * 1e3 / decode_steps.max(1) as f64,
        preemptions: sum(|s| s.num_preemptions),
        prefix_hit_tokens: sum(|s| s.prefix_hit_tokens),
        prefix_queried_tokens: sum(|s| s.prefix_queried_tokens),
        peak_kv_usage: all_stats
            .iter()
            .map(|s| s.peak_kv_usage)
            .fold(0.0, f64::max),
        mean_kv_usage: 0.0,
        kv_usage_timeline: downsample(&kv_samples, KV_TIMELINE_POINTS),
    };
    let start = timelines
        .iter()
        .map(|t| t.sent)
        .fold(f64::INFINITY, f64::min);
    let end = replicas
        .iter()
        .map(|r| r.engine.executor().now())
        .fold(0.0, f64::max);
    report.duration_s = (end - start.min(end)).max(0.0);
    let kv_area: f64 = replicas.iter().map(|r| r.kv_area).sum();
    report.mean_kv_usage = kv_area / replicas.len() as f64 / report.duration_s.max(1e-12);
    let (mut ttfts, mut tpots, mut e2els) = (vec![], vec![], vec![]);
    let mut good = 0;
    for (spec, t) in requests.iter().zip(&timelines) {
        let (Some(first), Some(finished), false) = (t.first_token, t.finished, t.failed) else {
            continue;
        };
        report.completed += 1;
        report.total_input_tokens += spec.prompt_len;
        report.total_output_tokens += t.tokens;
        let ttft = (first - t.sent) * 1e3;
        let e2el = (finished - t.sent) * 1e3;
        let tpot = tpot_ms(e2el, ttft, t.tokens);
        ttfts.push(ttft);
        e2els.push(e2el);
        tpots.extend(tpot);
        good += usize::from(config.slo.is_some_and(|slo| slo.is_met(ttft, tpot)));
    }
    let per_s = |n: usize| n as f64 / report.duration_s.max(1e-12);
    report.request_throughput = per_s(report.completed);
    report.output_throughput = per_s(report.total_output_tokens);
    report.total_token_throughput = per_s(report.total_input_tokens + report.total_output_tokens);
    report.ttft_ms = Summary::of(&ttfts);
    report.tpot_ms = Summary::of(&tpots);
    report.e2el_ms = Summary::of(&e2els);
    if config.slo.is_some() {
        report.good_requests = Some(good);
        report.goodput = Some(per_s(good));
    }
    Ok(report)
}

/// At most `points` points, each the highest value of its interval.
fn downsample(samples: &[(f64, f64)], points: usize) -> Vec<(f64, f64)> {
    let Some(&(end, _)) = samples.last() else {
        return Vec::new();
    };
    let width = end / points as f64;
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(points);
    for &(t, v) in samples {
        let bucket_end = ((t / width).ceil().max(1.0)) * width;
        match out.last_mut() {
            Some(last) if (last.0 - bucket_end).abs() < width * 1e-6 => last.1 = last.1.max(v),
            _ => out.push((bucket_end, v)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::LinearCost;
    use crate::workload::{synthesize, Arrivals, Lengths};
    use minserve_core::scheduler::SchedulerConfig;

    /// 10 ms a step plus 1 ms per prompt token.
    fn config(num_blocks: usize) -> SimConfig {
        SimConfig {
            engine: EngineConfig {
                scheduler: SchedulerConfig {
                    max_num_batched_tokens: 512,
                    max_num_seqs: 64,
                    ..SchedulerConfig::default()
                },
                prefix_caching: true,
                max_model_len: 4096,
            },
            geometry: CacheGeometry {
                block_size: 16,
                num_blocks,
            },
            cost: CostModel::Linear(LinearCost {
                constant: 0.010,
                prefill_tokens: 0.001,
                ..LinearCost::default()
            }),
            slo: Some(Slo {
                ttft_ms: 50.0,
                tpot_ms: 20.0,
            }),
            ingest_s: 0.0,
        }
    }

    fn fixed(n: usize, input: usize, output: usize, arrivals: Arrivals) -> Vec<RequestSpec> {
        synthesize(n, arrivals, Lengths::Fixed { input, output }, 0, 7)
    }

    #[test]
    fn one_client_at_a_time_sees_the_cost_model_exactly() {
        let requests = fixed(5, 32, 8, Arrivals::AllAtOnce);
        let report = simulate(
            &config(100),
            &requests,
            Load::Closed { concurrency: 1 },
            None,
        )
        .unwrap();
        assert_eq!((report.completed, report.total_output_tokens), (5, 40));
        // The prompt step: 10 + 32 ms, which draws the first token; then 7 decode steps of 10.
        let ttft = report.ttft_ms.unwrap();
        let tpot = report.tpot_ms.unwrap();
        assert!((ttft.p50 - 42.0).abs() < 1e-9 && (ttft.p99 - 42.0).abs() < 1e-9);
        assert!((tpot.p50 - 10.0).abs() < 1e-9);
        assert!((report.duration_s - 5.0 * 0.112).abs() < 1e-9);
        assert_eq!(report.good_requests, Some(5));
        assert_eq!(report.steps, 40);
        assert!((report.decode_step_ms - 10.0).abs() < 1e-9);
    }

    #[test]
    fn all_at_once_batches_and_a_small_cache_preempts() {
        let requests = fixed(32, 100, 50, Arrivals::AllAtOnce);
        let roomy = simulate(&config(1000), &requests, Load::Open, None).unwrap();
        assert_eq!(roomy.completed, 32);
        assert_eq!(roomy.total_output_tokens, 32 * 50);
        assert_eq!(roomy.preemptions, 0);
        assert!(
            roomy.mean_decode_batch > 20.0,
            "{}",
            roomy.mean_decode_batch
        );
        // Each request needs 10 blocks at its end: 40 blocks hold 4 of 32.
        let mut trace = Vec::new();
        let tight = simulate(&config(40), &requests, Load::Open, Some(&mut trace)).unwrap();
        assert_eq!(tight.completed, 32);
        assert!(tight.preemptions > 0);
        assert!(tight.peak_kv_usage > 0.9 && tight.peak_kv_usage <= 1.0);
        assert!(tight.duration_s > roomy.duration_s);
        let lines: Vec<serde_json::Value> = String::from_utf8(trace)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, tight.steps);
        let total: f64 = lines
            .iter()
            .map(|l| l["duration_s"].as_f64().unwrap())
            .sum();
        assert!((total - tight.duration_s).abs() < 1e-6);
        assert!(tight.kv_usage_timeline.len() <= KV_TIMELINE_POINTS);
    }

    #[test]
    fn shared_prefixes_hit_the_cache_and_idle_time_passes() {
        let mut requests = synthesize(
            8,
            Arrivals::Poisson { rate: 2.0 },
            Lengths::Fixed {
                input: 8,
                output: 4,
            },
            64,
            1,
        );
        let report = simulate(&config(1000), &requests, Load::Open, None).unwrap();
        assert_eq!(report.completed, 8);
        // Every request after the first finds the 64-token prefix cached (4 blocks).
        assert_eq!(report.prefix_hit_tokens, 7 * 64);
        // Requests arrive seconds apart: the run lasts about as long as the arrivals.
        let last = requests.last().unwrap().arrival_s;
        assert!(report.duration_s > last && report.duration_s < last + 0.5);
        requests.iter_mut().for_each(|r| r.prefix_group = None);
        let cold = simulate(&config(1000), &requests, Load::Open, None).unwrap();
        assert_eq!(cold.prefix_hit_tokens, 0);
    }

    #[test]
    fn replicas_multiply_a_closed_loop_and_share_its_requests() {
        let requests = fixed(8, 32, 8, Arrivals::AllAtOnce);
        let load = Load::Closed { concurrency: 2 };
        let one = simulate(&config(100), &requests, load, None).unwrap();
        let two = simulate_replicas(
            &config(100),
            2,
            RoutingPolicy::RoundRobin,
            &requests,
            load,
            None,
        )
        .unwrap();
        assert_eq!((two.completed, two.replicas), (8, 2));
        assert_eq!(two.requests_per_replica, [4, 4]);
        // One client per replica: each sees the cost model exactly, as alone (42 ms TTFT),
        // while on one engine the two clients share every step.
        let ttft = two.ttft_ms.unwrap();
        assert!((ttft.p50 - 42.0).abs() < 1e-9 && (ttft.p99 - 42.0).abs() < 1e-9);
        assert!(
            (two.duration_s - 4.0 * 0.112).abs() < 1e-9,
            "{}",
            two.duration_s
        );
        assert!(one.duration_s > two.duration_s);
        assert_eq!(two.steps, 2 * 4 * 8);
    }

    #[test]
    fn a_prefix_aware_router_keeps_each_prefix_on_one_replica() {
        // 12 groups of 256-token prefixes, 8 requests each, arriving over time; each replica's
        // cache holds about 5 of the 12 prefixes.
        let mut requests = synthesize(
            96,
            Arrivals::Poisson { rate: 40.0 },
            Lengths::Fixed {
                input: 16,
                output: 4,
            },
            256,
            3,
        );
        // Groups in a scrambled order (a regular one can line up with round robin's cycle).
        for (i, r) in requests.iter_mut().enumerate() {
            r.prefix_group = Some(((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 12);
        }
        let run = |policy| {
            simulate_replicas(&config(90), 3, policy, &requests, Load::Open, None).unwrap()
        };
        let blind = run(RoutingPolicy::RoundRobin);
        let aware = run(RoutingPolicy::PrefixAware);
        let balanced = run(RoutingPolicy::LeastOutstandingTokens);
        for report in [&blind, &aware, &balanced] {
            assert_eq!(report.completed, 96);
            assert_eq!(report.requests_per_replica.iter().sum::<usize>(), 96);
            assert!(report.requests_per_replica.iter().all(|&n| n > 0));
        }
        let rate = |r: &SimReport| r.prefix_hit_tokens as f64 / r.prefix_queried_tokens as f64;
        assert!(
            rate(&aware) > rate(&blind) + 0.2,
            "prefix-aware {:.2} vs round robin {:.2}",
            rate(&aware),
            rate(&blind)
        );
        assert!(aware.ttft_ms.unwrap().p50 < blind.ttft_ms.unwrap().p50);
    }

    #[test]
    fn a_request_larger_than_the_cache_is_rejected_and_the_rest_run() {
        let mut requests = fixed(3, 10, 10, Arrivals::AllAtOnce);
        requests[1].prompt_len = 5000;
        let report = simulate(
            &config(40),
            &requests,
            Load::Closed { concurrency: 1 },
            None,
        )
        .unwrap();
        assert_eq!((report.completed, report.rejected), (2, 1));
        assert!(report.first_rejection.unwrap().starts_with("request 1:"));
    }
}
