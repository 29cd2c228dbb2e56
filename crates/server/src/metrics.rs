//! `GET /metrics`: engine counters plus latency histograms measured in the handlers, in the
//! Prometheus text format. Each served model has its own [`Metrics`]; every series carries
//! its `model` label, and [`Exposition`] writes each family once with the series of every
//! model under it (as the format requires).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use minserve_core::engine::EngineStats;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5,
];

pub struct Histogram {
    name: &'static str,
    help: &'static str,
    bounds: &'static [f64],
    /// Per-bucket counts (not cumulative), sum, count.
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(name: &'static str, help: &'static str, bounds: &'static [f64]) -> Self {
        Self {
            name,
            help,
            bounds,
            inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, value: f64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            inner.0[i] += 1;
        }
        inner.1 += value;
        inner.2 += 1;
    }

    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).2
    }

    fn render(&self, page: &mut Exposition, model: &str) {
        let (buckets, sum, count) = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let family = page.family(self.name, "histogram", self.help);
        let labels = model_label(model);
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&buckets) {
            cumulative += n;
            family.push(format!(
                "{}_bucket{{{labels},le=\"{bound}\"}} {cumulative}",
                self.name
            ));
        }
        family.push(format!(
            "{}_bucket{{{labels},le=\"+Inf\"}} {count}",
            self.name
        ));
        family.push(format!("{}_sum{{{labels}}} {sum}", self.name));
        family.push(format!("{}_count{{{labels}}} {count}", self.name));
    }
}

/// Why the server ended a generation before it finished (its client going away is counted
/// apart, in `minserve_request_aborted_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// The shutdown timeout was reached while it ran.
    ShutdownTimeout,
    /// Its client read the stream so slowly that the events waiting for it reached the
    /// per-request cap (see `submit.rs`).
    ClientTooSlow,
    /// The engine stopped (its thread failed) before it finished.
    EngineFailed,
}

impl Interruption {
    const ALL: [Interruption; 3] = [
        Interruption::ShutdownTimeout,
        Interruption::ClientTooSlow,
        Interruption::EngineFailed,
    ];

    /// The `reason` label of `minserve_request_interrupted_total`.
    pub fn label(self) -> &'static str {
        match self {
            Interruption::ShutdownTimeout => "shutdown_timeout",
            Interruption::ClientTooSlow => "client_too_slow",
            Interruption::EngineFailed => "engine_failed",
        }
    }
}

pub struct Metrics {
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_latency: Histogram,
    pub queue_time: Histogram,
    pub success_stop: AtomicU64,
    pub success_length: AtomicU64,
    pub aborted: AtomicU64,
    pub rejected: AtomicU64,
    /// 429s for a tenant over its limits (`tenants.rs`).
    pub rate_limited: AtomicU64,
    /// Per [`Interruption`], in the order of `Interruption::ALL`.
    interrupted: [AtomicU64; 3],
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            time_to_first_token: Histogram::new(
                "minserve_time_to_first_token_seconds",
                "Seconds from a request's arrival to its first generated token.",
                LATENCY_BUCKETS,
            ),
            time_per_output_token: Histogram::new(
                "minserve_time_per_output_token_seconds",
                "Mean seconds between generated tokens after the first, per request.",
                TOKEN_LATENCY_BUCKETS,
            ),
            e2e_latency: Histogram::new(
                "minserve_e2e_request_latency_seconds",
                "Seconds from a request's arrival to its last token.",
                LATENCY_BUCKETS,
            ),
            queue_time: Histogram::new(
                "minserve_request_queue_time_seconds",
                "Seconds from a request's arrival until the engine first scheduled it (its \
                 first prompt, for several); requests cancelled while waiting are not counted.",
                LATENCY_BUCKETS,
            ),
            success_stop: AtomicU64::new(0),
            success_length: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            interrupted: Default::default(),
        }
    }
}

/// A `/metrics` page being written: metric families in the order first written, each with
/// the series of every model.
#[derive(Default)]
pub struct Exposition {
    families: Vec<Family>,
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    series: Vec<String>,
}

impl Family {
    fn push(&mut self, line: String) {
        self.series.push(line);
    }
}

impl Exposition {
    /// The family `name`, created on first use.
    fn family(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
    ) -> &mut Family {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family {
                    name,
                    kind,
                    help,
                    series: Vec::new(),
                });
                self.families.len() - 1
            }
        };
        &mut self.families[i]
    }

    /// One series of `name` for `model`, with its other labels (`reason="x"`) if any.
    pub(crate) fn series(
        &mut self,
        (name, kind, help): (&'static str, &'static str, &'static str),
        model: &str,
        labels: &str,
        value: impl std::fmt::Display,
    ) {
        let mut all = model_label(model);
        if !labels.is_empty() {
            all.push(',');
            all.push_str(labels);
        }
        self.family(name, kind, help)
            .push(format!("{name}{{{all}}} {value}"));
    }

    pub fn finish(self) -> String {
        let mut out = String::new();
        for f in self.families {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for line in f.series {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }
}

/// Draft tokens accepted over draft tokens verified since start; 0 before any.
pub(crate) fn spec_acceptance(stats: &EngineStats) -> f64 {
    match stats.spec_num_draft_tokens {
        0 => 0.0,
        drafted => stats.spec_num_accepted_tokens as f64 / drafted as f64,
    }
}

/// `model="NAME"`.
fn model_label(model: &str) -> String {
    format!("model=\"{}\"", label_value(model))
}

/// A label's value escaped as the text format wants (backslash, quote, newline).
pub(crate) fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub(crate) fn count_interruption(&self, reason: Interruption) {
        let i = Interruption::ALL.iter().position(|&r| r == reason);
        if let Some(counter) = i.and_then(|i| self.interrupted.get(i)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The series of `model`; `stats` is `None` while it loads.
    pub fn render(&self, page: &mut Exposition, model: &str, stats: Option<EngineStats>) {
        let s = stats.unwrap_or_default();
        let gauges: [(&str, &str, String); 3] = [
            (
                "minserve_num_requests_running",
                "Sequences in the running batch.",
                s.num_running.to_string(),
            ),
            (
                "minserve_num_requests_waiting",
                "Sequences waiting to be scheduled.",
                s.num_waiting.to_string(),
            ),
            (
                "minserve_kv_cache_usage_ratio",
                "KV cache blocks held by live requests over all blocks (cached blocks no request holds count as free).",
                s.kv_usage.to_string(),
            ),
        ];
        for (name, help, value) in gauges {
            page.series((name, "gauge", help), model, "", value);
        }
        let counters = [
            (
                "minserve_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
                s.prefix_hit_tokens,
            ),
            (
                "minserve_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_queried_tokens,
            ),
            (
                "minserve_prompt_tokens_total",
                "Prompt tokens accepted (times n).",
                s.prompt_tokens,
            ),
            (
                "minserve_generation_tokens_total",
                "Tokens generated.",
                s.generation_tokens,
            ),
            (
                "minserve_num_preemptions_total",
                "Sequences preempted (recomputed later) for lack of KV cache.",
                s.num_preemptions,
            ),
            ("minserve_engine_steps_total", "Engine steps run.", s.steps),
            (
                "minserve_spec_decode_num_drafts_total",
                "Speculative decoding: verifications (one sequence's drafts checked in one step).",
                s.spec_num_drafts,
            ),
            (
                "minserve_spec_decode_num_draft_tokens_total",
                "Speculative decoding: draft tokens verified.",
                s.spec_num_draft_tokens,
            ),
            (
                "minserve_spec_decode_num_accepted_tokens_total",
                "Speculative decoding: draft tokens accepted.",
                s.spec_num_accepted_tokens,
            ),
            (
                "minserve_spec_decode_draft_failures_total",
                "Speculative decoding: draft model failures (each turns drafting off).",
                s.spec_draft_failures,
            ),
        ];
        for (name, help, value) in counters {
            page.series((name, "counter", help), model, "", value);
        }
        page.series(
            (
                "minserve_spec_decode_draft_seconds_total",
                "counter",
                "Speculative decoding: seconds spent proposing drafts (prompt lookup, or the draft model).",
            ),
            model,
            "",
            s.spec_draft_seconds,
        );
        page.series(
            (
                "minserve_spec_decode_acceptance_ratio",
                "gauge",
                "Speculative decoding: draft tokens accepted over draft tokens verified, since \
                 start (0 before any).",
            ),
            model,
            "",
            spec_acceptance(&s),
        );
        const SUCCESS: (&str, &str, &str) = (
            "minserve_request_success_total",
            "counter",
            "Requests finished, by finish reason.",
        );
        for (reason, counter) in [
            ("stop", &self.success_stop),
            ("length", &self.success_length),
        ] {
            let labels = format!("finished_reason=\"{reason}\"");
            page.series(SUCCESS, model, &labels, counter.load(Ordering::Relaxed));
        }
        page.series(
            (
                "minserve_request_aborted_total",
                "counter",
                "Requests whose client went away before they finished.",
            ),
            model,
            "",
            self.aborted.load(Ordering::Relaxed),
        );
        page.series(
            (
                "minserve_request_rejected_total",
                "counter",
                "Requests answered 429 because the waiting queue was full.",
            ),
            model,
            "",
            self.rejected.load(Ordering::Relaxed),
        );
        page.series(
            (
                "minserve_request_rate_limited_total",
                "counter",
                "Requests answered 429 because their tenant was over its concurrency or \
                 tokens-per-minute limit.",
            ),
            model,
            "",
            self.rate_limited.load(Ordering::Relaxed),
        );
        for (reason, counter) in Interruption::ALL.iter().zip(&self.interrupted) {
            page.series(
                (
                    "minserve_request_interrupted_total",
                    "counter",
                    "Requests the server ended before they finished, by reason.",
                ),
                model,
                &format!("reason=\"{}\"", reason.label()),
                counter.load(Ordering::Relaxed),
            );
        }
        for h in [
            &self.time_to_first_token,
            &self.time_per_output_token,
            &self.e2e_latency,
            &self.queue_time,
        ] {
            h.render(page, model);
        }
    }

    /// [`render`](Self::render) alone on a page.
    pub fn page(&self, model: &str, stats: Option<EngineStats>) -> String {
        let mut page = Exposition::default();
        self.render(&mut page, model, stats);
        page.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speculative_decoding_counters_and_acceptance() {
        let stats = EngineStats {
            spec_num_drafts: 10,
            spec_num_draft_tokens: 40,
            spec_num_accepted_tokens: 30,
            spec_draft_seconds: 1.5,
            spec_draft_failures: 1,
            ..EngineStats::default()
        };
        let page = Metrics::default().page("m", Some(stats));
        for (name, value) in [
            ("minserve_spec_decode_num_drafts_total", "10"),
            ("minserve_spec_decode_num_draft_tokens_total", "40"),
            ("minserve_spec_decode_num_accepted_tokens_total", "30"),
            ("minserve_spec_decode_acceptance_ratio", "0.75"),
            ("minserve_spec_decode_draft_seconds_total", "1.5"),
            ("minserve_spec_decode_draft_failures_total", "1"),
        ] {
            assert!(
                page.contains(&format!("\n{name}{{model=\"m\"}} {value}\n")),
                "{page}"
            );
        }
        let idle = Metrics::default().page("m", None);
        assert!(idle.contains("\nminserve_spec_decode_acceptance_ratio{model=\"m\"} 0\n"));
    }
}
