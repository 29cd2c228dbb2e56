//! Measured steps read back from an engine trace (`--trace-file`, docs/trace.md), so that a
//! cost model can be fitted to a run made elsewhere: a GPU machine's `bench throughput` or a
//! production server's trace, where `simulate calibrate` itself cannot run.
//!
//! A step record holds each scheduled sequence's new tokens but not its position, which the
//! attention terms need; the position is rebuilt by following every sequence through the
//! trace: it starts at the prompt tokens it adopted from the prefix cache, grows by its new
//! tokens each step, restarts from zero when a preemption drops its KV (a swap keeps it), and a
//! sample forked from a sibling (`n > 1`) starts where that sibling stood. The one thing the
//! trace cannot say is how many of a speculative step's draft tokens were rejected (their KV is
//! rolled back): those positions run ahead by the rejected drafts, which overstates the
//! attended keys of later steps slightly.

use std::collections::{HashMap, HashSet};

use minserve_core::trace::{StepRecord, TraceRecord};

use crate::cost::StepFeatures;
use crate::fit::MeasuredStep;

/// The steps of a trace, each with the features [`StepFeatures::of`] would have read off its
/// batch and its measured duration. Steps of zero duration (none is ever written, but a
/// hand-edited trace may have one) are refused by the fit, not here.
pub fn measured_steps(records: &[TraceRecord]) -> Vec<MeasuredStep> {
    let mut positions = Positions::default();
    records
        .iter()
        .filter_map(|record| match record {
            TraceRecord::Step(step) => Some(positions.step(step)),
            _ => None,
        })
        .collect()
}

/// Every live sequence's computed tokens (its next new token's position), and the sequences
/// of each request, for forks.
#[derive(Default)]
struct Positions {
    computed: HashMap<u64, usize>,
    request_seqs: HashMap<u64, Vec<u64>>,
}

impl Positions {
    fn step(&mut self, step: &StepRecord) -> MeasuredStep {
        let mut f = StepFeatures {
            sequences: step.seqs.len(),
            ..StepFeatures::default()
        };
        // A fork starts where its sibling stood before this step, not after it.
        let before: HashMap<u64, usize> = step
            .seqs
            .iter()
            .filter_map(|s| self.computed.get(&s.id).map(|&c| (s.id, c)))
            .collect();
        for seq in &step.seqs {
            let start = match (seq.cached_tokens, before.get(&seq.id)) {
                (cached, _) if cached > 0 => cached,
                (_, Some(&computed)) => computed,
                (_, None) => self.sibling_position(seq.request, &before),
            };
            let n = seq.new_tokens;
            if n == 1 {
                f.decode_tokens += 1;
            } else {
                f.prefill_tokens += n;
            }
            f.attended_keys += n * start + n * (n + 1) / 2;
            f.context_tokens += start + n;
            f.sampled_rows += usize::from(seq.samples);
            self.computed.insert(seq.id, start + n);
            let seqs = self.request_seqs.entry(seq.request).or_default();
            if !seqs.contains(&seq.id) {
                seqs.push(seq.id);
            }
        }
        let swapped: HashSet<u64> = step.swapped_out.iter().copied().collect();
        for id in step.preempted.iter().filter(|id| !swapped.contains(id)) {
            self.computed.insert(*id, 0);
        }
        MeasuredStep {
            features: f,
            seconds: step.duration_ms / 1000.0,
        }
    }

    /// Where a sequence seen for the first time starts: a new sample of a request whose other
    /// samples are known shares their prompt (copy-on-write); anything else starts at zero.
    fn sibling_position(&self, request: u64, before: &HashMap<u64, usize>) -> usize {
        self.request_seqs
            .get(&request)
            .into_iter()
            .flatten()
            .filter_map(|id| before.get(id).or_else(|| self.computed.get(id)))
            .copied()
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minserve_core::trace::StepSeq;

    fn seq(id: u64, request: u64, new_tokens: usize, cached_tokens: usize) -> StepSeq {
        StepSeq {
            id,
            request,
            new_tokens,
            cached_tokens,
            prefill: new_tokens > 1,
            samples: true,
            draft_tokens: 0,
        }
    }

    fn step(seqs: Vec<StepSeq>, preempted: Vec<u64>, swapped_out: Vec<u64>) -> TraceRecord {
        TraceRecord::Step(StepRecord {
            step: 1,
            t_ms: 0.0,
            duration_ms: 10.0,
            seqs,
            prefill_tokens: 0,
            decode_tokens: 0,
            running: 0,
            waiting: 0,
            swapped: 0,
            blocks_used: 0,
            blocks_free: 0,
            blocks_cached: 0,
            block_copies: 0,
            prefix_hit_tokens: 0,
            preempted,
            swapped_out,
            swapped_in: vec![],
            block_tables: None,
        })
    }

    #[test]
    fn positions_follow_prefill_decode_preemption_and_forks() {
        let records = vec![
            // Request 1: a 10-token prompt, 4 of them from the prefix cache.
            step(vec![seq(1, 1, 6, 4)], vec![], vec![]),
            // Its first decode at position 10, beside request 2's 3-token prompt.
            step(vec![seq(1, 1, 1, 0), seq(2, 2, 3, 0)], vec![], vec![]),
            // Seq 3 is a second sample of request 1, starting where seq 1 stood (11).
            step(vec![seq(1, 1, 1, 0), seq(3, 1, 1, 0)], vec![1], vec![]),
            // Seq 1 was preempted (recompute): it starts again from 0 with its 12 tokens.
            step(vec![seq(1, 1, 12, 0), seq(2, 2, 1, 0)], vec![2], vec![2]),
            // Seq 2 was swapped out and back: it keeps its 4 tokens (the next is at 4).
            step(vec![seq(2, 2, 1, 0)], vec![], vec![]),
        ];
        let steps = measured_steps(&records);
        let f: Vec<StepFeatures> = steps.iter().map(|s| s.features).collect();
        // 6 new tokens at positions 4..10 attend to 5..=10 keys.
        assert_eq!(f[0].attended_keys, (5..=10).sum::<usize>());
        assert_eq!((f[0].prefill_tokens, f[0].context_tokens), (6, 10));
        assert_eq!(f[1].attended_keys, 11 + (1..=3).sum::<usize>());
        assert_eq!((f[1].decode_tokens, f[1].prefill_tokens), (1, 3));
        assert_eq!(f[2].attended_keys, 12 + 12);
        assert_eq!(f[3].attended_keys, (1..=12).sum::<usize>() + 4);
        assert_eq!(f[4].attended_keys, 5);
        assert!(steps.iter().all(|s| s.seconds == 0.01));
        assert_eq!(f[2].sequences, 2);
        assert_eq!(f[2].sampled_rows, 2);
    }
}
