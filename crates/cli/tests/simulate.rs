//! `minserve simulate` as users run it: calibrating on a (synthetic) model, simulating with the
//! profile it wrote, and the errors of bad input.

mod common;

use common::minserve;

#[test]
fn calibrate_writes_a_profile_that_simulate_engine_reads() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("tiny.json");
    let profile = profile.to_str().unwrap();
    let (ok, stdout, stderr) = minserve(&[
        "simulate",
        "calibrate",
        "--model",
        "synthetic:tiny",
        "--quick",
        "--kv-cache-mib",
        "16",
        "--name",
        "tiny",
        "--output",
        profile,
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("fitted"), "{stdout}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(profile).unwrap()).unwrap();
    assert_eq!(written["name"], "tiny");
    assert_eq!(written["cost"]["kind"], "linear");
    assert!(written["provenance"]["commit"].is_string());
    let (ok, stdout, stderr) = minserve(&[
        "simulate",
        "engine",
        "--cost-model",
        profile,
        "--requests",
        "8",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--concurrency",
        "2",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("Successful requests:                    8"),
        "{stdout}"
    );
}

/// The default model's shape with random weights: its prompt tokens cost clearly more than its
/// decode steps' fixed part, so the fit has a prefill cost to find even on a busy machine (on
/// the tiny model every step took microseconds, and noise could hand prefill's share to the
/// other terms).
const CALIBRATED_MODEL: &str = "synthetic:smollm2-135m";

#[test]
fn calibrate_fits_a_trace_written_by_bench_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("run.jsonl");
    let trace = trace.to_str().unwrap();
    let (ok, stdout, stderr) = minserve(&[
        "bench",
        "throughput",
        "--model",
        CALIBRATED_MODEL,
        "--num-prompts",
        "24",
        "--input-len",
        "48",
        "--output-len",
        "12",
        "--max-num-seqs",
        "8",
        "--kv-cache-mib",
        "32",
        "--trace-file",
        trace,
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let profile = dir.path().join("from-trace.json");
    let (ok, stdout, stderr) = minserve(&[
        "simulate",
        "calibrate",
        "--model",
        CALIBRATED_MODEL,
        "--from-trace",
        trace,
        "--name",
        "from-trace",
        "--output",
        profile.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("fitted"), "{stdout}");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&profile).unwrap()).unwrap();
    assert_eq!(written["provenance"]["traces"][0], trace);
    // Every step of the run was read: 24 prompts of 48 tokens under a 512-token budget and 8
    // sequences take at least 24 * 12 / 8 decode steps.
    assert!(written["provenance"]["steps_measured"].as_u64().unwrap() >= 36);
    // A fit of the trace's own steps accounts for their total time.
    let ratio = written["provenance"]["fit"]["total_time_ratio"]
        .as_f64()
        .unwrap();
    assert!((0.8..1.25).contains(&ratio), "{written}");
    let cost = &written["cost"];
    assert!(
        cost["prefill_tokens"].as_f64().unwrap() > 0.0
            || cost["sampled_rows"].as_f64().unwrap() > 0.0,
        "{cost}"
    );

    let broken = dir.path().join("broken.jsonl");
    let mut text = std::fs::read_to_string(trace).unwrap();
    text.push_str("{\"type\": \"step\", \"step\": \"x\"}\n");
    std::fs::write(&broken, text).unwrap();
    let (ok, _, stderr) = minserve(&[
        "simulate",
        "calibrate",
        "--model",
        CALIBRATED_MODEL,
        "--from-trace",
        broken.to_str().unwrap(),
        "--output",
        dir.path().join("x.json").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("broken.jsonl") && stderr.contains("line"),
        "{stderr}"
    );
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    std::fs::write(
        &trace,
        "{\"arrival_s\": 1, \"prompt_len\": 10, \"output_len\": 5}\n\
         {\"arrival_s\": 0.5, \"prompt_len\": 10, \"output_len\": 5}\n",
    )
    .unwrap();
    let (ok, _, stderr) = minserve(&["simulate", "engine", "--trace", trace.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("line 2: `arrival_s` 0.5 is before line 1's 1"),
        "{stderr}"
    );
    let model = dir.path().join("model.json");
    std::fs::write(&model, r#"{"name": "x", "cost": {"kind": "linear"}}"#).unwrap();
    let (ok, _, stderr) = minserve(&[
        "simulate",
        "engine",
        "--cost-model",
        model.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("model.json: missing field"), "{stderr}");
}

#[test]
fn a_cluster_serves_two_models_and_replicas_sit_behind_a_router() {
    let (ok, stdout, stderr) = minserve(&[
        "simulate",
        "cluster",
        "--gpus",
        "64",
        "--hours",
        "4",
        "--policy",
        "backfill-preempt",
        "--online",
        "llama-1b-h100:0.3:4",
        "--online",
        "llama-8b-h100:0.3:16:2",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("| backfill-preempt | llama-1b-h100 |")
            && stdout.contains("| backfill-preempt | llama-8b-h100 |"),
        "{stdout}"
    );
    for (spec, error) in [
        (
            "llama-1b-h100:1.5:4",
            "the peak share must be above 0 and at most 1",
        ),
        (
            "llama-1b-h100:0.3",
            "expected PRESET:PEAK_SHARE:TROUGH_HOUR",
        ),
        ("no-such-preset:0.3:4", "no-such-preset"),
    ] {
        let (ok, _, stderr) = minserve(&["simulate", "cluster", "--online", spec]);
        assert!(!ok);
        assert!(stderr.contains(error), "{spec}: {stderr}");
    }

    let (ok, stdout, stderr) = minserve(&[
        "simulate",
        "engine",
        "--requests",
        "48",
        "--input-len",
        "32",
        "--prefix-len",
        "64",
        "--output-len",
        "8",
        "--concurrency",
        "6",
        "--replicas",
        "3",
        "--routing",
        "prefix-aware",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("3 (prefix-aware routing; requests per replica"),
        "{stdout}"
    );
}
