//! The engine trace, schema version 2: one JSON object per line, written by the engine thread
//! as it goes (`--trace-file`; `--trace-blocks` adds block tables). The schema, field by
//! field, is `docs/trace.md`; `minserve trace plot` and `minserve trace summary` read it back
//! through [`read_trace`].
//!
//! Three kinds of records, told apart by their first field, `type`:
//!
//! * `header`, the first line: the schema version and the shape of the KV pool.
//! * `step`, one per engine step once it has run: its wall time and duration, the sequences
//!   it scheduled with their new tokens, the queues and the KV pool as the step left them,
//!   preemptions and swaps (and, opt-in, every scheduled sequence's block tables).
//! * `request`, one per event in a request's life: `arrived`, `scheduled` (first time, the end
//!   of its queue time), `preempted`, `resumed`, `finished` (with its reason).
//!
//! Records are serde structs, so their fields always come in the order declared here; a field
//! that does not apply to a record is left out rather than written as `null`. Nothing here
//! runs unless a trace was asked for: the engine keeps an `Option<Trace>`.
//!
//! `blocks_free` counts every block a new allocation could take, cached-but-unused ones
//! included; `blocks_cached` is the part of those that still holds a registered prefix.

use std::io::{BufRead, Write};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::block_manager::BlockManager;
use crate::scheduler::{ScheduledStep, Scheduler};
use crate::sequence::{SeqId, RELEASED_BLOCK};

/// The schema version written in the header; [`read_trace`] refuses any other.
pub const TRACE_VERSION: u32 = 2;

/// What a trace records beyond the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceOptions {
    /// Every scheduled sequence's block tables in each step record (`--trace-blocks`): large.
    pub block_tables: bool,
}

/// One line of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TraceRecord {
    Header(TraceHeader),
    Step(StepRecord),
    Request(RequestRecord),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceHeader {
    pub version: u32,
    /// Wall-clock time the trace started, in milliseconds since the Unix epoch; every `t_ms`
    /// is counted from here.
    pub started_unix_ms: u64,
    pub block_size: usize,
    /// Blocks in the device pool, shared by all KV groups.
    pub num_blocks: usize,
    pub kv_groups: usize,
    /// Blocks in the host pool of swap preemption (0: preemption recomputes).
    pub host_blocks: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRecord {
    /// The step's number, from 1.
    pub step: u64,
    /// When the step started (before scheduling), in ms since the trace started.
    pub t_ms: f64,
    /// Scheduling, the forward pass, sampling and emitting, in ms.
    pub duration_ms: f64,
    pub seqs: Vec<StepSeq>,
    /// New tokens of prefilling sequences (prompt chunks, recomputation after preemption).
    pub prefill_tokens: usize,
    /// Decoding sequences: one new token each.
    pub decode_tokens: usize,
    /// Sequences in the running batch and in the waiting queue, after the step.
    pub running: usize,
    pub waiting: usize,
    /// Of the waiting ones, those whose K/V sit in the host pool.
    pub swapped: usize,
    pub blocks_used: usize,
    pub blocks_free: usize,
    pub blocks_cached: usize,
    pub block_copies: usize,
    pub prefix_hit_tokens: usize,
    /// Sequences preempted in this step; those in `swapped_out` went to the host pool, the
    /// others will recompute.
    pub preempted: Vec<SeqId>,
    pub swapped_out: Vec<SeqId>,
    pub swapped_in: Vec<SeqId>,
    /// With `--trace-blocks`: each scheduled sequence's block tables after the step was
    /// scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_tables: Option<Vec<SeqBlocks>>,
}

/// A sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSeq {
    pub id: SeqId,
    /// The request the sequence is a sample of.
    pub request: u64,
    pub new_tokens: usize,
    /// Prompt tokens adopted from the prefix cache when it was admitted in this step.
    pub cached_tokens: usize,
    pub prefill: bool,
    pub samples: bool,
    /// Of `new_tokens`, draft tokens verified (speculative decoding); absent when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub draft_tokens: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqBlocks {
    pub id: SeqId,
    /// One table per KV group; `null` where a sliding window has released the block.
    pub tables: Vec<Vec<Option<u32>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestEventKind {
    Arrived,
    Scheduled,
    Preempted,
    Resumed,
    Finished,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRecord {
    pub event: RequestEventKind,
    pub t_ms: f64,
    /// Steps completed when it happened (for events of a step: that step's number).
    pub step: u64,
    pub request: u64,
    /// The sample's sequence (all but `arrived`, and `finished` by an abort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<SeqId>,
    /// `arrived`: prompt length, samples, priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// `scheduled`: prompt tokens found in the prefix cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<usize>,
    /// `preempted` and `resumed`: whether through the host pool (else recomputed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swapped: Option<bool>,
    /// `finished`: `stop`, `length`, `abort` (client gone) or `error`, and tokens generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<usize>,
}

impl RequestRecord {
    /// A record of `event` with no optional field set.
    pub fn new(event: RequestEventKind, request: u64, seq: Option<SeqId>) -> Self {
        Self {
            event,
            t_ms: 0.0,
            step: 0,
            request,
            seq,
            prompt_tokens: None,
            n: None,
            priority: None,
            cached_tokens: None,
            swapped: None,
            reason: None,
            output_tokens: None,
        }
    }
}

impl TraceHeader {
    /// The header of a record stream that starts now, over the pool `blocks` (and a host pool
    /// of `host_blocks` for swap preemption).
    pub fn starting_now(blocks: &BlockManager, host_blocks: usize) -> Self {
        let started_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            version: TRACE_VERSION,
            started_unix_ms,
            block_size: blocks.block_size(),
            num_blocks: blocks.num_blocks(),
            kv_groups: blocks.num_groups(),
            host_blocks,
        }
    }
}

/// What a step record says of the step it describes, beyond the scheduler's state.
pub struct StepFacts<'a> {
    /// The engine's `number`-th step, which started at `started` and ran for `duration_ms`.
    pub number: u64,
    pub started: Instant,
    pub duration_ms: f64,
    pub step: &'a ScheduledStep,
    /// The request of each of the step's sequences, in batch order.
    pub requests: &'a [u64],
}

impl StepRecord {
    /// The record of a step that has run, timed by `clock`, with `scheduler` read as the step
    /// left it; with `block_tables`, every scheduled sequence's block tables too. Shared by
    /// the trace file and the live feed (`live.rs`), so both speak this one schema.
    pub fn of(
        facts: &StepFacts,
        clock: &RecordClock,
        scheduler: &Scheduler,
        block_tables: bool,
    ) -> Self {
        let StepFacts { step, requests, .. } = facts;
        let blocks = scheduler.blocks();
        let seqs = step
            .seqs
            .iter()
            .zip(requests.iter())
            .map(|(s, &request)| StepSeq {
                id: s.id,
                request,
                new_tokens: s.num_new_tokens,
                cached_tokens: s.num_cached_tokens,
                prefill: s.is_prefill,
                samples: s.samples,
                draft_tokens: s.num_draft_tokens,
            })
            .collect();
        let block_tables = block_tables.then(|| {
            step.batch
                .sequences
                .iter()
                .zip(&step.seqs)
                .map(|(chunk, s)| SeqBlocks {
                    id: s.id,
                    tables: (0..step.batch.num_groups())
                        .map(|g| {
                            let table = chunk.table(g);
                            table
                                .iter()
                                .map(|&b| (b != RELEASED_BLOCK).then_some(b))
                                .collect()
                        })
                        .collect(),
                })
                .collect()
        });
        Self {
            step: facts.number,
            t_ms: clock.ms_at(facts.started),
            duration_ms: facts.duration_ms,
            seqs,
            prefill_tokens: step
                .seqs
                .iter()
                .filter(|s| s.is_prefill)
                .map(|s| s.num_new_tokens)
                .sum(),
            decode_tokens: step
                .seqs
                .iter()
                .filter(|s| !s.is_prefill)
                .map(|s| s.num_new_tokens)
                .sum(),
            running: scheduler.num_running(),
            waiting: scheduler.num_waiting(),
            swapped: scheduler.swap_space().num_swapped(),
            blocks_used: blocks.num_blocks() - blocks.num_free_blocks(),
            blocks_free: blocks.num_free_blocks(),
            blocks_cached: blocks.num_cached_free_blocks(),
            block_copies: step.batch.block_copies.len(),
            prefix_hit_tokens: step.seqs.iter().map(|s| s.num_cached_tokens).sum(),
            preempted: step.preempted.clone(),
            swapped_out: step.swapped_out.clone(),
            swapped_in: step.swapped_in.clone(),
            block_tables,
        }
    }
}

/// A clock for the times of a record stream: milliseconds since it started.
#[derive(Debug, Clone, Copy)]
pub struct RecordClock {
    started: Instant,
}

impl RecordClock {
    pub fn starting_now() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    /// Milliseconds from the start to `at`.
    pub fn ms_at(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64() * 1e3
    }
}

/// The writer the engine holds while tracing.
pub struct Trace {
    out: Box<dyn Write + Send>,
    options: TraceOptions,
    clock: RecordClock,
}

impl Trace {
    /// Starts a trace into `out` with its header.
    pub fn new(
        mut out: Box<dyn Write + Send>,
        options: TraceOptions,
        blocks: &BlockManager,
        host_blocks: usize,
    ) -> Self {
        let header = TraceHeader::starting_now(blocks, host_blocks);
        write_record(&mut out, &TraceRecord::Header(header));
        Self {
            out,
            options,
            clock: RecordClock::starting_now(),
        }
    }

    /// Milliseconds from the start of the trace to `at`.
    pub fn ms_since_start(&self, at: Instant) -> f64 {
        self.clock.ms_at(at)
    }

    /// Writes the record of a step that has run, with `scheduler` read as the step left it.
    pub fn step(&mut self, facts: &StepFacts, scheduler: &Scheduler) {
        let record = StepRecord::of(facts, &self.clock, scheduler, self.options.block_tables);
        write_record(&mut self.out, &TraceRecord::Step(record));
    }

    /// Writes a request event that happened at `at`, after `steps` steps.
    pub fn request(&mut self, mut record: RequestRecord, at: Instant, steps: u64) {
        record.t_ms = self.ms_since_start(at);
        record.step = steps;
        write_record(&mut self.out, &TraceRecord::Request(record));
    }
}

fn write_record(out: &mut dyn Write, record: &TraceRecord) {
    // A trace that cannot be written (disk full) must not stop the engine.
    if serde_json::to_writer(&mut *out, record).is_ok() {
        let _ = out.write_all(b"\n");
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("reading the trace: {0}")]
    Io(#[from] std::io::Error),
    #[error("line {line}: {message}")]
    Record { line: usize, message: String },
    #[error("the trace has no header line: it was written by a minserve before trace version 2")]
    NoHeader,
    #[error("trace version {0}; this minserve reads version {TRACE_VERSION}")]
    Version(u32),
}

/// Reads a trace written by [`Trace`]: every line must be a record of the current schema.
pub fn read_trace(input: impl BufRead) -> Result<Vec<TraceRecord>, TraceError> {
    let mut records = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record: TraceRecord = serde_json::from_str(&line).map_err(|e| TraceError::Record {
            line: i + 1,
            message: e.to_string(),
        })?;
        match (&record, records.is_empty()) {
            (TraceRecord::Header(h), true) if h.version != TRACE_VERSION => {
                return Err(TraceError::Version(h.version))
            }
            (TraceRecord::Header(_), true) => {}
            (_, true) => return Err(TraceError::NoHeader),
            (TraceRecord::Header(_), false) => {
                return Err(TraceError::Record {
                    line: i + 1,
                    message: "a second header".into(),
                })
            }
            _ => {}
        }
        records.push(record);
    }
    if records.is_empty() {
        return Err(TraceError::NoHeader);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_their_field_order_and_read_back() {
        let mut arrived = RequestRecord::new(RequestEventKind::Arrived, 7, None);
        arrived.prompt_tokens = Some(12);
        let line = serde_json::to_string(&TraceRecord::Request(arrived.clone())).unwrap();
        assert_eq!(
            line,
            r#"{"type":"request","event":"arrived","t_ms":0.0,"step":0,"request":7,"prompt_tokens":12}"#
        );
        let header = TraceRecord::Header(TraceHeader {
            version: TRACE_VERSION,
            started_unix_ms: 1,
            block_size: 16,
            num_blocks: 8,
            kv_groups: 1,
            host_blocks: 0,
        });
        let text = format!("{}\n{line}\n", serde_json::to_string(&header).unwrap());
        let records = read_trace(text.as_bytes()).unwrap();
        assert_eq!(records, vec![header, TraceRecord::Request(arrived)]);
    }

    #[test]
    fn old_or_malformed_traces_are_refused_with_the_line() {
        let v1 = r#"{"step":1,"seqs":[],"prefill_tokens":0}"#;
        assert!(read_trace(v1.as_bytes()).is_err());
        let header = r#"{"type":"header","version":3,"started_unix_ms":0,"block_size":16,"num_blocks":1,"kv_groups":1,"host_blocks":0}"#;
        assert!(matches!(
            read_trace(header.as_bytes()),
            Err(TraceError::Version(3))
        ));
        let unknown = format!(
            "{}\n{}\n",
            header.replace("\"version\":3", "\"version\":2"),
            r#"{"type":"request","event":"arrived","t_ms":0.0,"step":0,"request":1,"colour":1}"#
        );
        let err = read_trace(unknown.as_bytes()).unwrap_err().to_string();
        assert!(
            err.starts_with("line 2:") && err.contains("colour"),
            "{err}"
        );
    }
}
