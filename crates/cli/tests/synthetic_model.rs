//! `--model synthetic:NAME[@FORMAT]` wherever a model is loaded: generate, bench throughput,
//! serve. Nothing is read from disk or the network.

mod common;

use std::process::Command;
use std::time::Duration;

fn minserve(args: &[&str]) -> (String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_minserve"))
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(output.status.success(), "minserve {args:?}:\n{stderr}");
    (stdout, stderr)
}

#[test]
fn generate_runs_a_synthetic_model() {
    let (_, stderr) = minserve(&[
        "generate",
        "--model",
        "synthetic:tiny@q8_0",
        "--prompt",
        "Hello",
        "--max-tokens",
        "6",
    ]);
    // One byte, one token; random weights may still pick EOS early.
    let generated: usize = stderr
        .split("prompt tokens: 5, generated tokens: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token counts in:\n{stderr}"));
    assert!((1..=6).contains(&generated), "{stderr}");
}

/// `bench throughput --json` of `model` on 4 prompts of 8 tokens, 3 output tokens each.
fn bench_throughput(model: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "throughput",
        "--model",
        model,
        "--num-prompts",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "3",
        "--kv-cache-mib",
        "16",
        "--json",
    ];
    args.extend(extra);
    let (stdout, _) = minserve(&args);
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn bench_throughput_runs_a_synthetic_model() {
    let report = bench_throughput("synthetic:tiny", &[]);
    assert_eq!(report["output_tokens"], 12);
    assert_eq!(report["prompt_tokens"], 32);
    assert!(report["step_breakdown"].is_null(), "{report}");
}

/// `--step-breakdown` times the phases of every forward pass of the run: here one prefill step
/// and two decode steps (4 prompts of 8 tokens admitted together, 3 tokens each).
#[test]
fn bench_throughput_breaks_the_steps_down_by_phase() {
    let report = bench_throughput("synthetic:tiny@q8_0", &["--step-breakdown"]);
    let breakdown = &report["step_breakdown"];
    assert_eq!(breakdown["forward_passes"], report["steps"], "{report}");
    let phases = breakdown["phases_s"].as_object().unwrap();
    for phase in [
        "attention",
        "qkv_projection",
        "lm_head",
        "activation_quantize",
    ] {
        assert!(phases[phase].as_f64().unwrap() > 0.0, "{phase}: {report}");
    }
    let inside: f64 = phases.values().map(|v| v.as_f64().unwrap()).sum();
    let outside = breakdown["outside_forward_s"].as_f64().unwrap();
    let elapsed = report["elapsed_s"].as_f64().unwrap();
    assert!(
        outside >= 0.0 && (inside + outside - elapsed).abs() < 1e-6,
        "{report}"
    );
}

#[test]
fn unknown_synthetic_names_list_the_presets() {
    let output = Command::new(env!("CARGO_BIN_EXE_minserve"))
        .args(["generate", "--model", "synthetic:llama-2t", "--prompt", "x"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("presets: tiny, tiny-qwen2, smollm2-135m"),
        "{stderr}"
    );
}

/// The server process on a synthetic model answers a completion with the requested tokens.
#[test]
fn serve_runs_a_synthetic_model() {
    let mut server = common::serve(&["--model", "synthetic:tiny", "--kv-cache-mib", "16"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let result = runtime.block_on(async {
        let client = reqwest::Client::new();
        server.wait_ready(&client, Duration::from_secs(60)).await;
        let body = serde_json::json!({
            "model": "synthetic:tiny",
            "prompt": "Hi there",
            "max_tokens": 4,
            "ignore_eos": true,
        });
        let response = client
            .post(server.url("/v1/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        response.json::<serde_json::Value>().await.unwrap()
    });
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    assert_eq!(result["usage"]["prompt_tokens"], 8, "{result}");
    assert_eq!(result["usage"]["completion_tokens"], 4, "{result}");
}
