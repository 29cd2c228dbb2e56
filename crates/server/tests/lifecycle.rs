//! Loading, cancellation, panics and graceful shutdown.

mod common;

use std::time::{Duration, Instant};

use axum::routing::get;
use common::{scheduler, TestServer};
use futures_util::StreamExt;
use minserve_server::{AppState, ServerOptions};
use serde_json::{json, Value};

/// Tokens for a request that must still be running seconds later, even on the tiny model.
const LONG: usize = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_the_model_is_loaded() {
    let state = AppState::new(common::options());
    let s = TestServer::start_with(state.clone()).await;
    let (status, body) = s.get("/health").await;
    assert_eq!(status, 503, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["error"]["code"], "model_loading");
    let r = s.client.get(s.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    let (status, r) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 503, "{r}");
    assert_eq!(s.get("/v1/models").await.0, 503);
    assert_eq!(s.get("/metrics").await.0, 200);

    let loading =
        minserve_server::spawn_load(state.clone(), || common::load_synthetic(scheduler(8)));
    loading.await.unwrap().unwrap();
    assert_eq!(s.get("/health").await.0, 200);

    // A failed load keeps /health at 503 and says why.
    let failed = AppState::new(common::options());
    let f = TestServer::start_with(failed.clone()).await;
    let result = minserve_server::spawn_load(failed, || anyhow::bail!("no such model"))
        .await
        .unwrap();
    assert!(result.is_err());
    let (status, body) = f.get("/health").await;
    assert_eq!(status, 503);
    assert!(body.contains("no such model"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_routes_are_503_once_shutting_down() {
    let s = TestServer::start_synthetic(common::options(), scheduler(8)).await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    assert_eq!(s.post("/v1/chat/completions", chat.clone()).await.0, 200);
    // The window between the signal and the listener closing, held open: requests that
    // slip in are refused rather than started.
    s.state.begin_shutdown();
    let (status, body) = s.get("/health").await;
    assert_eq!(status, 503, "{body}");
    let (status, r) = s.post("/v1/chat/completions", chat).await;
    assert_eq!(status, 503, "{r}");
    assert_eq!(r["error"]["code"], "shutting_down");
    assert_eq!(r["error"]["type"], "service_unavailable");
    let (status, r) = s
        .post("/v1/completions", json!({"prompt": "x", "max_tokens": 1}))
        .await;
    assert_eq!(status, 503, "{r}");
    assert_eq!(s.get("/v1/models").await.0, 503);
    assert_eq!(s.get("/metrics").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_aborts_the_request() {
    let s = TestServer::start_synthetic(common::options(), scheduler(8)).await;
    let long = json!({"prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": true});

    // Streaming: read two chunks, then drop the response.
    let mut body = long.clone();
    body["stream"] = json!(true);
    let response = s
        .client
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    for _ in 0..2 {
        stream.next().await.unwrap().unwrap();
    }
    s.metric_until("minserve_num_requests_running", |v| v == 1.0)
        .await;
    assert!(s.metric("minserve_kv_cache_usage_ratio").await > 0.0);
    // The stream counts as in flight (what shutdown waits for) after its handler returned.
    assert_eq!(s.state.inflight_requests(), 1);
    drop(stream);
    let dropped = Instant::now();
    s.wait_idle(Duration::from_secs(1)).await;
    eprintln!("stream aborted after {:?}", dropped.elapsed());
    while s.state.inflight_requests() > 0 {
        assert!(
            dropped.elapsed() < Duration::from_secs(2),
            "a dropped stream still counts"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Non-streaming: the client gives up.
    let started = s
        .client
        .post(s.url("/v1/chat/completions"))
        .timeout(Duration::from_millis(800))
        .json(
            &json!({"messages": [{"role": "user", "content": "Tell me a long story"}],
                      "max_tokens": LONG, "ignore_eos": true}),
        )
        .send()
        .await;
    assert!(started.unwrap_err().is_timeout());
    s.wait_idle(Duration::from_secs(1)).await;
    s.metric_until("minserve_request_aborted_total", |v| v == 2.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_500_for_that_request_only() {
    let state = AppState::new(common::options());
    let model = tokio::task::spawn_blocking(|| common::load_synthetic(scheduler(8)))
        .await
        .unwrap()
        .unwrap();
    state.set_model(model);
    let routes = minserve_server::router(state.clone()).route(
        "/boom",
        get(|| async {
            if true {
                panic!("handler bug");
            }
            "unreachable"
        }),
    );
    let app = minserve_server::with_layers(routes, state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();

    // A generation in flight while another handler panics finishes untouched.
    let in_flight = client
        .post(format!("{base}/v1/completions"))
        .json(
            &json!({"prompt": "Once", "max_tokens": 300, "ignore_eos": true, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(in_flight.status(), 200);
    for _ in 0..2 {
        let r = client.get(format!("{base}/boom")).send().await.unwrap();
        assert_eq!(r.status(), 500);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(body["error"]["code"], "internal_error");
    }
    let (events, done) = common::read_sse(in_flight).await;
    assert!(done);
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 300);
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "Once", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let mut s = TestServer::start_synthetic(common::options(), scheduler(8)).await;
    let client = s.client.clone();
    let url = s.url("/v1/completions");
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": true}))
            .send()
            .await
            .unwrap()
    });
    s.metric_until("minserve_num_requests_running", |v| v == 1.0)
        .await;
    s.shutdown().await.unwrap();
    let response = in_flight.await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 300);
    assert!(s.state.is_shutting_down());
    assert!(
        reqwest::get(s.url("/health")).await.is_err(),
        "still accepting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_cuts_off_long_requests() {
    let options = ServerOptions {
        shutdown_timeout: Duration::from_millis(300),
        ..common::options()
    };
    let mut s = TestServer::start_synthetic(options, scheduler(8)).await;
    let response = s
        .client
        .post(s.url("/v1/completions"))
        .json(
            &json!({"prompt": "Once upon a time", "max_tokens": LONG, "ignore_eos": true,
                      "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let start = Instant::now();
    s.shutdown().await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    drop(response);
}
