//! `minserve bench serve` and `bench sweep` run as the real binary against our server started
//! in-process on a synthetic model (seeded weights, byte tokenizer: no model file needed, and
//! prompt lengths are exact).

use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use minserve_core::engine::{Engine, EngineConfig};
use minserve_core::engine_thread::EngineHandle;
use minserve_core::scheduler::SchedulerConfig;
use minserve_model::{CacheOptions, DeviceOptions, Runner, SyntheticSpec};
use minserve_server::{AppState, ServedModel, ServerOptions};
use serde_json::Value;
use tokio::sync::oneshot;

const SERVED_NAME: &str = "bench-test";

struct Server {
    base: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(model: &str) -> Self {
        let state = AppState::new(ServerOptions {
            served_model_name: SERVED_NAME.into(),
            ..ServerOptions::default()
        });
        let loaded = SyntheticSpec::parse(model)
            .unwrap()
            .unwrap()
            .load()
            .unwrap();
        let config = EngineConfig {
            scheduler: SchedulerConfig {
                max_num_seqs: 8,
                ..SchedulerConfig::default()
            },
            prefix_caching: true,
            max_model_len: loaded.model.config().max_position_embeddings,
        };
        let cache = CacheOptions {
            memory_bytes: 16 << 20,
            ..CacheOptions::default()
        };
        // As `minserve serve` wires it: model -> runner -> engine on its thread -> server.
        let tokenizer = Arc::new(loaded.tokenizer);
        let eos = tokenizer.eos_token_ids().to_vec();
        let runner = Runner::new(loaded.model, cache, DeviceOptions::default()).unwrap();
        let engine = Engine::new(runner, config, tokenizer.clone(), eos);
        state.set_model(ServedModel::new(
            EngineHandle::spawn(engine).unwrap(),
            tokenizer,
            config.scheduler.max_num_seqs,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(minserve_server::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Self {
            base,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// `minserve bench COMMAND --base-url BASE --tokenizer synthetic:tiny ARGS...`, which must
/// succeed: failed requests are part of the report, not an exit status.
async fn bench(command: &str, base: &str, args: &[&str]) -> Output {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_minserve"))
        .args(["bench", command, "--base-url", base])
        .args(["--tokenizer", "synthetic:tiny"])
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "minserve bench {command} {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A latency summary is present, positive, and its percentiles rise.
fn assert_ordered(report: &Value, key: &str) {
    let s = &report[key];
    let (p50, p90, p99) = (
        s["p50"].as_f64().unwrap(),
        s["p90"].as_f64().unwrap(),
        s["p99"].as_f64().unwrap(),
    );
    assert!(s["mean"].as_f64().unwrap() > 0.0, "{key}: {s}");
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99, "{key}: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_serve_measures_every_request_of_our_server() {
    let server = Server::start("synthetic:tiny").await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let output = bench(
        "serve",
        &server.base,
        &[
            "--num-prompts",
            "6",
            "--concurrency",
            "3",
            "--input-len",
            "24",
            "--output-len",
            "8",
            "--ignore-eos",
            "--slo",
            "60000,60000",
            "--json",
            json.to_str().unwrap(),
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Successful requests:"), "{stdout}");

    let r = read_json(&json);
    assert_eq!(r["model"], SERVED_NAME, "taken from /v1/models");
    assert_eq!(r["concurrency"], 3);
    assert_eq!(
        (r["completed"].as_u64(), r["failed"].as_u64()),
        (Some(6), Some(0))
    );
    assert_eq!(r["errors"], serde_json::json!([]));
    // The byte tokenizer makes the prompt length exact, and the server's usage counts it.
    assert_eq!(r["total_input_tokens"], 6 * 24);
    assert_eq!(r["total_output_tokens"], 6 * 8);
    for key in ["ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"] {
        assert_ordered(&r, key);
    }
    let ttft_p99 = r["ttft_ms"]["p99"].as_f64().unwrap();
    assert!(ttft_p99 <= r["e2el_ms"]["p99"].as_f64().unwrap());
    let duration = r["duration_s"].as_f64().unwrap();
    let output_throughput = r["output_throughput"].as_f64().unwrap();
    assert!((output_throughput * duration - 48.0).abs() < 1e-6);
    assert_eq!(r["good_requests"], 6, "a one-minute SLO is met by all");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_serve_chat_at_a_request_rate_on_fresh_connections() {
    let server = Server::start("synthetic:tiny").await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    bench(
        "serve",
        &format!("{}/v1/", server.base),
        &[
            "--model",
            SERVED_NAME,
            "--endpoint",
            "chat",
            "--num-prompts",
            "4",
            "--request-rate",
            "40",
            "--fresh-connection",
            "--input-len",
            "24",
            "--output-len",
            "5",
            "--ignore-eos",
            "--json",
            json.to_str().unwrap(),
        ],
    )
    .await;
    let r = read_json(&json);
    assert_eq!(r["request_rate"], 40.0);
    assert_eq!(
        (r["completed"].as_u64(), r["failed"].as_u64()),
        (Some(4), Some(0))
    );
    // The chat template wraps each prompt: `<|im_start|>user\n` (6 tokens), `<|im_end|>\n` (2),
    // `<|im_start|>assistant\n` (11).
    assert_eq!(r["total_input_tokens"], 4 * (24 + 19));
    assert_eq!(r["total_output_tokens"], 4 * 5);
    assert_ordered(&r, "ttft_ms");
    assert_eq!(r["goodput"], Value::Null, "no --slo, no goodput");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_counted_as_failures() {
    let server = Server::start("synthetic:tiny").await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let dir = tempfile::tempdir().unwrap();
    for (base, model, expect) in [
        (closed.as_str(), "any", "error sending request"),
        (server.base.as_str(), "no-such-model", "HTTP 404"),
    ] {
        let json = dir.path().join("report.json");
        bench(
            "serve",
            base,
            &[
                "--model",
                model,
                "--num-prompts",
                "3",
                "--concurrency",
                "2",
                "--input-len",
                "4",
                "--output-len",
                "2",
                "--json",
                json.to_str().unwrap(),
            ],
        )
        .await;
        let r = read_json(&json);
        assert_eq!(
            (r["completed"].as_u64(), r["failed"].as_u64()),
            (Some(0), Some(3))
        );
        let errors = r["errors"].as_array().unwrap();
        assert_eq!(
            errors.len(),
            1,
            "one message, not one per request: {errors:?}"
        );
        assert!(errors[0].as_str().unwrap().contains(expect), "{errors:?}");
        assert_eq!(r["ttft_ms"], Value::Null);
        assert_eq!(r["output_throughput"], 0.0);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_sweep_writes_table_json_and_charts() {
    let server = Server::start("synthetic:tiny").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sweep");
    bench(
        "sweep",
        &server.base,
        &[
            "--concurrencies",
            "1,3",
            "--prompts-per-concurrency",
            "1",
            "--min-prompts",
            "2",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--ignore-eos",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .await;
    let levels = read_json(&out.join("sweep.json"));
    let levels = levels.as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (level, (c, n)) in levels.iter().zip([(1, 2), (3, 3)]) {
        assert_eq!(level["concurrency"], c);
        assert_eq!(level["num_prompts"], n, "max(1 * c, 2)");
        assert_eq!(level["completed"], n);
        assert_eq!(level["total_output_tokens"], 4 * n);
    }
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(rows.len(), 3, "header and one row per level:\n{md}");
    assert!(
        rows[1].starts_with("| 1 | 2 |") && rows[2].starts_with("| 3 | 3 |"),
        "{md}"
    );
    assert!(rows[1].contains("| 1.00x |"), "{md}");
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    for label in ["TPOT p50 (ms)", "TTFT p99 (ms)", "c=1", "c=3", SERVED_NAME] {
        assert!(svg.contains(label), "{label} missing from the SVG");
    }
    let png = std::fs::read(out.join("sweep.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1200, 520));
    server.stop().await;
}
