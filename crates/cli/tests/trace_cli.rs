//! The engine trace as users read it, and `kv-calc`: a real run of the default model writes a
//! trace that `trace plot` draws and `trace summary` tabulates; bad input is refused.

mod common;

use common::minserve;

#[test]
fn a_real_trace_is_plotted_and_summarized() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.jsonl");
    let trace = trace.to_str().unwrap();
    // A pool of 8 MiB (22 blocks of the default model) for 6 x 80 tokens (30): it preempts.
    let (ok, stdout, stderr) = minserve(&[
        "bench",
        "throughput",
        "--num-prompts",
        "6",
        "--input-len",
        "40",
        "--output-len",
        "40",
        "--kv-cache-mib",
        "8",
        "--max-num-batched-tokens",
        "64",
        "--trace-file",
        trace,
        "--trace-blocks",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let text = std::fs::read_to_string(trace).unwrap();
    assert!(
        text.starts_with(r#"{"type":"header","version":2,"#),
        "{text}"
    );
    assert!(text.contains(r#""block_tables":[{"id":"#));

    let out = dir.path().join("charts");
    let (ok, stdout, stderr) = minserve(&["trace", "plot", trace, "--out", out.to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    let png = std::fs::read(out.join("trace.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000, "a chart, not an empty image");
    let svg = std::fs::read_to_string(out.join("trace.svg")).unwrap();
    assert!(svg.contains("KV blocks") && svg.contains("preemption"));

    let (ok, stdout, stderr) = minserve(&["trace", "summary", trace]);
    assert!(ok, "{stdout}\n{stderr}");
    let rows: Vec<&str> = stdout.lines().skip(2).collect();
    assert_eq!(rows.len(), 6, "{stdout}");
    for row in rows {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[2], "40", "prompt tokens: {row}");
        assert_eq!(cells[11], "length", "{row}");
        assert_eq!(cells[12], "40", "output tokens: {row}");
        let ttft: f64 = cells[7].parse().unwrap();
        let e2e: f64 = cells[10].parse().unwrap();
        assert!(0.0 < ttft && ttft < e2e, "{row}");
    }
}

#[test]
fn bad_traces_are_refused_with_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.jsonl");
    std::fs::write(&path, "{\"step\":1,\"seqs\":[]}\n").unwrap();
    let (ok, _, stderr) = minserve(&["trace", "summary", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("line 1"), "{stderr}");
    let (ok, _, stderr) = minserve(&["trace", "summary", "/nonexistent/trace.jsonl"]);
    assert!(!ok);
    assert!(
        stderr.contains("opening /nonexistent/trace.jsonl"),
        "{stderr}"
    );
}

#[test]
fn kv_calc_prints_the_engine_figures() {
    let (ok, stdout, stderr) = minserve(&[
        "kv-calc",
        "--model",
        "llama3-8b",
        "--context",
        "8192",
        "--batch",
        "4",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("per token:            128 KiB"), "{stdout}");
    assert!(stdout.contains("512 blocks = 1.00 GiB"), "{stdout}");
    assert!(stdout.contains("2048 blocks = 4.00 GiB"), "{stdout}");

    let (ok, stdout, _) = minserve(&[
        "kv-calc",
        "--layers",
        "18",
        "--kv-heads",
        "1",
        "--head-dim",
        "256",
        "--sliding-window",
        "512",
        "--global-every",
        "6",
        "--context",
        "4096",
    ]);
    assert!(ok);
    assert!(
        stdout.contains("6 of 3 layers: 1 global, 5 with a window of 512"),
        "{stdout}"
    );

    let (ok, stdout, _) = minserve(&["kv-calc", "--context", "32768"]);
    assert!(ok);
    assert!(stdout.contains("| gemma3-27b |"), "{stdout}");

    let (ok, _, stderr) = minserve(&["kv-calc", "--model", "llama3-8b", "--context", "0"]);
    assert!(!ok);
    assert!(stderr.contains("must be positive"), "{stderr}");
}
