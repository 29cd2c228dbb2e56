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
