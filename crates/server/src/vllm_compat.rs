//! What routers and gateways written for vLLM and SGLang workers read from a worker, so that
//! minserve replicas can sit behind them unchanged (docs/scale-out.md):
//!
//! - `GET /get_load`: `{"load": N}`, the requests the engine holds (running and waiting). The
//!   vLLM router's `power_of_two` policy sends a request to the less loaded of two workers by
//!   it.
//! - `vllm:`-prefixed metrics beside minserve's own: the queue and KV gauges that the vLLM
//!   router, the Gateway API Inference Extension's endpoint picker and KEDA / Prometheus-adapter
//!   autoscaling rules are written against, labelled with `model_name` as vLLM labels them.

use minserve_core::engine::EngineStats;

use crate::metrics::{label_value, Exposition};

/// The requests an engine holds, as `/get_load` reports them.
pub(crate) fn load(stats: &EngineStats) -> usize {
    stats.num_running + stats.num_waiting
}

/// Adds the `vllm:` series of the model served as `model_name` to a `/metrics` page; they
/// carry vLLM's `model_name` label beside minserve's `model`.
pub(crate) fn render_metrics(page: &mut Exposition, model_name: &str, stats: &EngineStats) {
    let label = format!("model_name=\"{}\"", label_value(model_name));
    let series: [(&str, &str, &str, String); 10] = [
        (
            "vllm:num_requests_running",
            "gauge",
            "Sequences in the running batch (as minserve_num_requests_running).",
            stats.num_running.to_string(),
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Sequences waiting to be scheduled (as minserve_num_requests_waiting).",
            stats.num_waiting.to_string(),
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV cache usage, 1 meaning full (as minserve_kv_cache_usage_ratio; vLLM's name says perc \
             but holds a fraction too).",
            stats.kv_usage.to_string(),
        ),
        (
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache.",
            stats.prefix_queried_tokens.to_string(),
        ),
        (
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the prefix cache.",
            stats.prefix_hit_tokens.to_string(),
        ),
        (
            "vllm:prompt_tokens_total",
            "counter",
            "Prompt tokens accepted.",
            stats.prompt_tokens.to_string(),
        ),
        (
            "vllm:generation_tokens_total",
            "counter",
            "Tokens generated.",
            stats.generation_tokens.to_string(),
        ),
        (
            "vllm:spec_decode_num_drafts_total",
            "counter",
            "Speculative decoding: verifications (one sequence's drafts checked in one step).",
            stats.spec_num_drafts.to_string(),
        ),
        (
            "vllm:spec_decode_num_draft_tokens_total",
            "counter",
            "Speculative decoding: draft tokens verified.",
            stats.spec_num_draft_tokens.to_string(),
        ),
        (
            "vllm:spec_decode_num_accepted_tokens_total",
            "counter",
            "Speculative decoding: draft tokens accepted.",
            stats.spec_num_accepted_tokens.to_string(),
        ),
    ];
    for (name, kind, help, value) in series {
        page.series((name, kind, help), model_name, &label, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_the_model_label_and_the_engine_figures() {
        let stats = EngineStats {
            num_running: 3,
            num_waiting: 5,
            kv_usage: 0.25,
            prefix_hit_tokens: 32,
            prefix_queried_tokens: 64,
            spec_num_draft_tokens: 40,
            spec_num_accepted_tokens: 30,
            ..EngineStats::default()
        };
        let mut page = Exposition::default();
        render_metrics(&mut page, "m\"x", &stats);
        let page = page.finish();
        let labels = r#"{model="m\"x",model_name="m\"x"}"#;
        for (name, value) in [
            ("vllm:num_requests_running", "3"),
            ("vllm:num_requests_waiting", "5"),
            ("vllm:kv_cache_usage_perc", "0.25"),
            ("vllm:prefix_cache_hits_total", "32"),
            ("vllm:spec_decode_num_draft_tokens_total", "40"),
            ("vllm:spec_decode_num_accepted_tokens_total", "30"),
        ] {
            assert!(
                page.contains(&format!("\n{name}{labels} {value}\n")),
                "{page}"
            );
        }
        assert_eq!(load(&stats), 8);
    }
}
