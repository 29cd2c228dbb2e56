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
