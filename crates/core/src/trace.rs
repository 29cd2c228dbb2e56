//! The step trace: one JSON line per engine step, for reading what the scheduler did
//! (`bench throughput --trace-file`, see `docs/continuous-batching.md`, which quotes its fields).
//!
//! `blocks_free` counts every block a new allocation could take, cached-but-unused ones
//! included; `blocks_cached` is the part of those that still holds a registered prefix.

use std::io::Write;

use crate::scheduler::{ScheduledSeq, ScheduledStep, Scheduler};

pub struct StepTrace {
    out: Box<dyn Write + Send>,
}

impl StepTrace {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out }
    }

    /// Writes the record of `step`, the engine's `step_number`-th, once it has run; `scheduler`
    /// is read as the step left it.
    pub fn record(&mut self, step_number: u64, step: &ScheduledStep, scheduler: &Scheduler) {
        let blocks = scheduler.blocks();
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
            "step": step_number,
            "seqs": seqs,
            "prefill_tokens": prefill,
            "decode_tokens": decode,
            "running": scheduler.num_running(),
            "waiting": scheduler.num_waiting(),
            "blocks_used": blocks.num_blocks() - blocks.num_free_blocks(),
            "blocks_free": blocks.num_free_blocks(),
            "blocks_cached": blocks.num_cached_free_blocks(),
            "preempted": step.preempted,
            "block_copies": step.batch.block_copies.len(),
            "prefix_hit_tokens": step.seqs.iter().map(|s| s.num_cached_tokens).sum::<usize>(),
        });
        let _ = writeln!(self.out, "{record}");
    }
}
