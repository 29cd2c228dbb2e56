//! The features `trace_steps` rebuilds from an engine trace are the ones the engine's own
//! batches had: a real engine, with prefix caching, `n > 1` forks and recompute preemption in a
//! small pool, records its trace while an executor notes `StepFeatures::of` of every batch.

use std::io::Write;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use minserve_core::detokenize::TokenDecoder;
use minserve_core::scheduler::SchedulerConfig;
use minserve_core::trace::{read_trace, TraceOptions};
use minserve_core::{
    CacheGeometry, Engine, EngineConfig, Logits, ModelExecutor, Request, StepBatch,
};
use minserve_sim::cost::StepFeatures;
use minserve_sim::trace_steps::measured_steps;

const VOCAB: usize = 64;

/// Notes the features of every batch it is given.
struct Recording {
    seen: Vec<StepFeatures>,
}

impl ModelExecutor for Recording {
    type Error = std::convert::Infallible;

    fn cache_geometry(&self) -> CacheGeometry {
        // 24 blocks of 4 tokens: too few for every request at once, so some are preempted.
        CacheGeometry {
            block_size: 4,
            num_blocks: 24,
        }
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits, Self::Error> {
        self.seen.push(StepFeatures::of(batch));
        Ok(Logits {
            vocab_size: VOCAB,
            data: vec![0.0; batch.num_sampled() * VOCAB],
        })
    }
}

struct NoText;

impl TokenDecoder for NoText {
    fn decode(&self, _ids: &[u32]) -> String {
        String::new()
    }
}

#[derive(Clone)]
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

#[test]
fn rebuilt_features_match_the_engines_batches() {
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_num_batched_tokens: 24,
            max_num_seqs: 8,
            ..SchedulerConfig::default()
        },
        prefix_caching: true,
        max_model_len: 96,
    };
    let mut engine = Engine::new(
        Recording { seen: Vec::new() },
        config,
        Arc::new(NoText),
        Vec::new(),
    );
    let buffer = SharedBuffer(Arc::new(Mutex::new(Vec::new())));
    engine.set_trace(Box::new(buffer.clone()), TraceOptions::default());
    let shared_prefix: Vec<u32> = (1..=12).collect();
    let (tx, _rx) = mpsc::channel();
    for i in 0..6u32 {
        // Prompts of 15 to 30 tokens, all but one starting with the same 12 (prefix hits).
        let mut prompt = if i == 3 {
            vec![40; 12]
        } else {
            shared_prefix.clone()
        };
        prompt.extend((0..3 * (i + 1)).map(|t| 13 + (t + i) % 40));
        let mut request = Request::new(prompt, 10 + 2 * i as usize);
        request.ignore_eos = true;
        request.n = if i % 2 == 0 { 2 } else { 1 };
        engine.submit(request, Box::new(tx.clone())).unwrap();
    }
    while engine.step() {}
    assert!(
        engine.stats().num_preemptions > 0,
        "the pool is meant to force preemptions"
    );
    assert!(engine.stats().prefix_hit_tokens > 0);

    let text = buffer.0.lock().unwrap().clone();
    let records = read_trace(text.as_slice()).unwrap();
    let rebuilt: Vec<StepFeatures> = measured_steps(&records)
        .iter()
        .map(|s| s.features)
        .collect();
    let seen = &engine.executor().seen;
    assert_eq!(rebuilt.len(), seen.len());
    for (step, (rebuilt, seen)) in rebuilt.iter().zip(seen).enumerate() {
        assert_eq!(rebuilt, seen, "step {}", step + 1);
    }
}
