//! Fair share across tenants, through the whole engine: one tenant floods the queue, another
//! sends one request, and the order of `Scheduled` events says who was admitted first. The
//! model is a stub (it always predicts token 1): only the scheduling order matters here.

use std::sync::mpsc;
use std::sync::Arc;

use minserve_core::detokenize::TokenDecoder;
use minserve_core::fair_share::TenantShare;
use minserve_core::scheduler::{SchedulerConfig, SchedulingPolicy};
use minserve_core::{CacheGeometry, Logits, ModelExecutor, StepBatch};
use minserve_core::{Engine, EngineConfig, Request, RequestEvent};

const VOCAB: usize = 8;

/// Predicts token 1 for every sampled row.
struct ConstantModel;

impl ModelExecutor for ConstantModel {
    type Error = std::io::Error;

    fn cache_geometry(&self) -> CacheGeometry {
        CacheGeometry {
            block_size: 4,
            num_blocks: 512,
        }
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits, Self::Error> {
        let rows = batch.sequences.iter().filter(|s| s.sample).count();
        let row = (0..VOCAB).map(|t| if t == 1 { 1.0 } else { 0.0 });
        Ok(Logits {
            vocab_size: VOCAB,
            data: row.cycle().take(rows * VOCAB).collect(),
        })
    }
}

struct Digits;

impl TokenDecoder for Digits {
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|t| t.to_string()).collect()
    }
}

fn engine(policy: SchedulingPolicy) -> Engine<ConstantModel> {
    engine_with_seats(policy, 2)
}

fn engine_with_seats(policy: SchedulingPolicy, max_num_seqs: usize) -> Engine<ConstantModel> {
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: 256,
            max_num_seqs,
            policy,
            ..SchedulerConfig::default()
        },
        prefix_caching: true,
        max_model_len: 256,
    };
    Engine::new(ConstantModel, config, Arc::new(Digits), vec![])
}

fn request(tenant: &str, weight: u32) -> Request {
    request_of_length(tenant, weight, 8)
}

fn request_of_length(tenant: &str, weight: u32, max_tokens: usize) -> Request {
    let mut r = Request::new(vec![2, 3, 4, 5, 6, 7], max_tokens);
    r.ignore_eos = true;
    r.tenant = Some(TenantShare {
        tenant: tenant.into(),
        weight,
    });
    r
}

/// Steps the engine until every request was scheduled; returns the requests (by index into
/// `receivers`) in the order they were first scheduled.
fn admission_order(
    engine: &mut Engine<ConstantModel>,
    receivers: &[mpsc::Receiver<RequestEvent>],
) -> Vec<usize> {
    let mut order = Vec::new();
    while order.len() < receivers.len() {
        assert!(
            engine.step(),
            "the engine stopped with requests unscheduled"
        );
        for (i, rx) in receivers.iter().enumerate() {
            while let Ok(event) = rx.try_recv() {
                if let RequestEvent::Scheduled { .. } = event {
                    order.push(i);
                }
            }
        }
    }
    order
}

/// 20 requests of tenant "flood", then one of tenant "quiet"; the quiet one's place in the
/// admission order.
fn quiet_place(policy: SchedulingPolicy) -> usize {
    let mut engine = engine(policy);
    let mut receivers = Vec::new();
    for i in 0..21 {
        let (tx, rx) = mpsc::channel();
        let tenant = if i < 20 { "flood" } else { "quiet" };
        engine.submit(request(tenant, 1), Box::new(tx)).unwrap();
        receivers.push(rx);
    }
    let order = admission_order(&mut engine, &receivers);
    order.iter().position(|&i| i == 20).unwrap()
}

#[test]
fn a_flooding_tenant_delays_another_by_one_request_not_by_its_whole_burst() {
    assert_eq!(quiet_place(SchedulingPolicy::FairShare), 1);
    // The same arrivals first come, first served: the quiet request waits for all 20.
    assert_eq!(quiet_place(SchedulingPolicy::Fcfs), 20);
}

#[test]
fn competing_tenants_are_admitted_by_weight() {
    let mut engine = engine(SchedulingPolicy::FairShare);
    let mut receivers = Vec::new();
    for _ in 0..12 {
        for (tenant, weight) in [("gold", 3), ("bronze", 1)] {
            let (tx, rx) = mpsc::channel();
            engine
                .submit(request(tenant, weight), Box::new(tx))
                .unwrap();
            receivers.push(rx);
        }
    }
    let order = admission_order(&mut engine, &receivers);
    // Even indices are gold's requests.
    let gold_in_first_8 = order[..8].iter().filter(|&&i| i % 2 == 0).count();
    assert_eq!(gold_in_first_8, 6, "3:1 while both wait: {order:?}");
}

/// Whether the request behind `rx` has been scheduled, draining its events.
fn was_scheduled(rx: &mpsc::Receiver<RequestEvent>) -> bool {
    rx.try_iter()
        .any(|event| matches!(event, RequestEvent::Scheduled { .. }))
}

/// A flood holding every seat with long requests; then requests of another tenant arrive one
/// per step. Returns, per quiet request, the steps it waited before it was scheduled, and the
/// preemptions the engine made.
fn quiet_waits_behind_a_full_batch(policy: SchedulingPolicy, quiet: usize) -> (Vec<u64>, u64) {
    let mut engine = engine_with_seats(policy, 4);
    let mut flood = Vec::new();
    for _ in 0..12 {
        let (tx, rx) = mpsc::channel();
        engine
            .submit(request_of_length("flood", 1, 200), Box::new(tx))
            .unwrap();
        flood.push(rx);
    }
    for _ in 0..3 {
        assert!(engine.step());
    }
    assert_eq!(engine.stats().num_running, 4, "the flood holds every seat");
    let mut waits = Vec::new();
    for _ in 0..quiet {
        let (tx, rx) = mpsc::channel();
        engine
            .submit(request_of_length("quiet", 1, 200), Box::new(tx))
            .unwrap();
        let mut steps = 0;
        loop {
            assert!(engine.step());
            steps += 1;
            if was_scheduled(&rx) || steps == 400 {
                break;
            }
        }
        waits.push(steps);
        flood.push(rx); // a dropped receiver is a client gone: its request would be aborted
    }
    (waits, engine.stats().num_preemptions)
}

#[test]
fn a_tenant_below_its_share_of_seats_takes_one_from_a_flood_at_the_next_step() {
    // Two tenants of equal weight, four seats: "quiet" may hold two. Its first two requests
    // each take a seat from the flood at once. The third is beyond its share: it waits until
    // quiet's first request finishes (200 tokens), then takes that seat back from the flood
    // (which had refilled it in queue order). Nothing moves the other way.
    let (waits, preemptions) = quiet_waits_behind_a_full_batch(SchedulingPolicy::FairShare, 3);
    assert_eq!(&waits[..2], &[1, 1], "{waits:?}");
    assert!((150..=200).contains(&waits[2]), "{waits:?}");
    assert_eq!(preemptions, 3, "one preemption per seat taken, none back");
    // First come, first served: the quiet request waits for the whole flood.
    let (waits, preemptions) = quiet_waits_behind_a_full_batch(SchedulingPolicy::Fcfs, 1);
    assert!(waits[0] > 200, "{waits:?}");
    assert_eq!(preemptions, 0);
}
