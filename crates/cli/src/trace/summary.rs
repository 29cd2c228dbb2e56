//! `minserve trace summary`: one row per request, from its request events and the step records
//! (the first token is out when the step in which one of its samples first samples ends).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use minserve_core::trace::{RequestEventKind, TraceRecord};

/// A request's life as the trace tells it; times in ms since the trace started.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Timeline {
    pub prompt_tokens: Option<usize>,
    pub priority: Option<i32>,
    pub arrived_ms: Option<f64>,
    pub scheduled_ms: Option<f64>,
    pub cached_tokens: Option<usize>,
    pub first_token_ms: Option<f64>,
    pub preemptions: usize,
    pub swapped: usize,
    pub finished_ms: Option<f64>,
    pub reason: Option<String>,
    pub output_tokens: usize,
}

/// Every request's timeline, by request id.
pub fn timelines(records: &[TraceRecord]) -> BTreeMap<u64, Timeline> {
    let mut requests: BTreeMap<u64, Timeline> = BTreeMap::new();
    for record in records {
        match record {
            TraceRecord::Header(_) => {}
            TraceRecord::Step(step) => {
                let end = step.t_ms + step.duration_ms;
                for seq in step.seqs.iter().filter(|s| s.samples) {
                    let timeline = requests.entry(seq.request).or_default();
                    timeline.first_token_ms.get_or_insert(end);
                }
            }
            TraceRecord::Request(event) => {
                let timeline = requests.entry(event.request).or_default();
                match event.event {
                    RequestEventKind::Arrived => {
                        timeline.arrived_ms = Some(event.t_ms);
                        timeline.prompt_tokens = event.prompt_tokens;
                        timeline.priority = event.priority;
                    }
                    RequestEventKind::Scheduled => {
                        timeline.scheduled_ms = Some(event.t_ms);
                        timeline.cached_tokens = event.cached_tokens;
                    }
                    RequestEventKind::Preempted => {
                        timeline.preemptions += 1;
                        timeline.swapped += usize::from(event.swapped == Some(true));
                    }
                    RequestEventKind::Resumed => {}
                    RequestEventKind::Finished => {
                        // The last sample's finish ends the request.
                        timeline.finished_ms = Some(event.t_ms);
                        if timeline.reason.is_none() || event.seq.is_none() {
                            timeline.reason.clone_from(&event.reason);
                        }
                        timeline.output_tokens += event.output_tokens.unwrap_or(0);
                    }
                }
            }
        }
    }
    requests
}

pub fn markdown(records: &[TraceRecord]) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let since = |end: Option<f64>, start: Option<f64>| ms(end.zip(start).map(|(e, s)| e - s));
    let mut out = String::from(
        "| request | prompt | cached | priority | arrived ms | queue ms | TTFT ms | preempted \
         (swapped) | finished ms | e2e ms | reason | output |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|\n",
    );
    for (id, t) in timelines(records) {
        let _ = writeln!(
            out,
            "| {id} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} |",
            t.prompt_tokens.map_or("-".into(), |n| n.to_string()),
            t.cached_tokens.map_or("-".into(), |n| n.to_string()),
            t.priority.map_or("-".into(), |p| p.to_string()),
            ms(t.arrived_ms),
            since(t.scheduled_ms, t.arrived_ms),
            since(t.first_token_ms, t.arrived_ms),
            t.preemptions,
            t.swapped,
            ms(t.finished_ms),
            since(t.finished_ms, t.arrived_ms),
            t.reason.as_deref().unwrap_or("-"),
            t.output_tokens,
        );
    }
    out
}
