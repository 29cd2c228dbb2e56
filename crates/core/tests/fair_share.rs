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
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: 256,
            max_num_seqs: 2,
            policy,
            ..SchedulerConfig::default()
        },
        prefix_caching: true,
        max_model_len: 256,
    };
    Engine::new(ConstantModel, config, Arc::new(Digits), vec![])
}

fn request(tenant: &str, weight: u32) -> Request {
    let mut r = Request::new(vec![2, 3, 4, 5, 6, 7], 8);
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
