//! Tenants and sessions on the real default model over real HTTP: API keys from a file, 429
//! with `Retry-After` over a tenant's limit, keys revoked by a reload, fair scheduling when one
//! tenant floods, and a conversation session's prefix kept cached through other traffic.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{assert_error, options, scheduler, TestServer};
use minserve_core::scheduler::{SchedulerConfig, SchedulingPolicy};
use minserve_server::{ApiKeys, AppState, ServedModel};
use serde_json::{json, Value};

const KEYS: &str = r#"
[[tenant]]
name = "solo"
keys = ["key-solo"]
max_concurrent_requests = 1

[[tenant]]
name = "flood"
keys = ["key-flood"]

[[tenant]]
name = "quiet"
keys = ["key-quiet"]
"#;

async fn start(
    keys: &Path,
    load: impl FnOnce() -> anyhow::Result<ServedModel> + Send + 'static,
) -> TestServer {
    let state = AppState::new(options());
    state.set_api_keys(ApiKeys::load(keys).unwrap());
    let model = tokio::task::spawn_blocking(load).await.unwrap().unwrap();
    state.set_model(model);
    TestServer::start_with(state).await
}

fn request(s: &TestServer, key: &str, body: Value) -> reqwest::RequestBuilder {
    s.client
        .post(s.url("/v1/completions"))
        .bearer_auth(key)
        .json(&body)
}

async fn status_of(s: &TestServer, key: &str) -> (u16, Value, Option<String>) {
    let r = request(s, key, json!({"prompt": "Hi", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, r.json().await.unwrap_or(Value::Null), retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_limit_gets_429_and_a_revoked_key_stops_working_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, KEYS).unwrap();
    let s = start(&path, || common::load(scheduler(4))).await;

    // solo's one request in flight: its next one is refused, others' are not.
    let long = request(
        &s,
        "key-solo",
        json!({"prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": true,
               "stream": true}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(long.status(), 200);
    let (status, body, retry) = status_of(&s, "key-solo").await;
    assert_error(status, &body, 429, None);
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(status_of(&s, "key-quiet").await.0, 200);
    drop(long);
    assert_eq!(s.metric("minserve_request_rate_limited_total").await, 1.0);

    assert_eq!(status_of(&s, "key-nobody").await.0, 401);

    // quiet's key is revoked; a broken file afterwards changes nothing.
    std::fs::write(
        &path,
        KEYS.replace("keys = [\"key-quiet\"]", "keys = [\"key-new\"]"),
    )
    .unwrap();
    assert_eq!(s.state.reload_api_keys(), Ok(3));
    assert_eq!(status_of(&s, "key-quiet").await.0, 401);
    assert_eq!(status_of(&s, "key-new").await.0, 200);
    std::fs::write(
        &path,
        "[[tenant]]\nname = \"x\"\nkeys = [\"key-x\"]\nwieght = 2\n",
    )
    .unwrap();
    let error = s.state.reload_api_keys().unwrap_err();
    assert!(error.contains("4:") && error.contains("wieght"), "{error}");
    assert_eq!(status_of(&s, "key-new").await.0, 200, "the old keys stay");
    assert_eq!(status_of(&s, "key-x").await.0, 401);
}

/// Tenant `flood` sends 12 long requests at once to an engine that runs 2 sequences at a
/// time; then tenant `quiet` sends one. Under fair share the quiet tenant is below its share
/// of the two seats, so its request takes one from the flood at the next step: it is answered
/// before any flood request but the two that held the seats (first come, first served would
/// make it wait for all 12: `crates/core/tests/fair_share.rs` shows both orders).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_flood_does_not_hold_back_another_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, KEYS).unwrap();
    let fair = SchedulerConfig {
        max_num_seqs: 2,
        policy: SchedulingPolicy::FairShare,
        ..SchedulerConfig::default()
    };
    let s = start(&path, move || common::load(fair)).await;
    let flood = (0..12)
        .map(|i| {
            request(
                &s,
                "key-flood",
                json!({"prompt": format!("Story {i}: once upon a time"), "max_tokens": 24,
                       "ignore_eos": true}),
            )
            .send()
        })
        .map(tokio::spawn)
        .collect::<Vec<_>>();
    s.metric_until("minserve_num_requests_waiting", |w| w >= 10.0)
        .await;
    let (status, body, _) = status_of(&s, "key-quiet").await;
    assert_eq!(status, 200, "{body}");
    let finished = flood.iter().filter(|f| f.is_finished()).count();
    assert!(
        finished <= 2,
        "{finished} of the flood's 12 requests were answered before the quiet one"
    );
    for f in flood {
        f.abort();
    }
}

/// A small KV cache (17 blocks of 16 tokens) and other traffic between the turns of a
/// 5-turn chat: with a session id its earlier turns stay cached; without, they are evicted.
/// Returns each turn's cached tokens and turn 5's time to first token (it asks for one token:
/// its latency is its TTFT).
async fn chat_cached_tokens(session: Option<&str>) -> (Vec<u64>, Duration) {
    let s = TestServer::start_loaded(options(), || {
        common::load_with_kv(scheduler(4), 17 * 16 * 23_040)
    })
    .await;
    let mut messages = vec![json!({"role": "system", "content": "You are a terse assistant."})];
    let mut cached = Vec::new();
    let mut last_ttft = Duration::ZERO;
    for turn in 1..=5 {
        messages
            .push(json!({"role": "user", "content": format!("Question {turn}: name a colour.")}));
        let mut chat = s.client.post(s.url("/v1/chat/completions")).json(&json!({
            "messages": messages, "max_tokens": if turn == 5 { 1 } else { 8 },
            "temperature": 0, "ignore_eos": true,
        }));
        if let Some(id) = session {
            chat = chat.header("x-session-id", id);
        }
        let started = Instant::now();
        let body: Value = chat.send().await.unwrap().json().await.unwrap();
        last_ttft = started.elapsed();
        cached.push(
            body["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or_else(|| panic!("{body}")),
        );
        messages.push(body["choices"][0]["message"].clone());
        // Other traffic: three different prompts of about 100 tokens each.
        for other in 0..3 {
            let prompt = format!("Unrelated request {turn}.{other}: ").repeat(12);
            let (status, body) = s
                .post(
                    "/v1/completions",
                    json!({"prompt": prompt, "max_tokens": 1}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
    }
    (cached, last_ttft)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_later_turns_hit_the_prefix_cache_through_other_traffic() {
    let (with, _) = chat_cached_tokens(Some("conversation-1")).await;
    assert!(
        with[1..].iter().all(|&c| c >= 16),
        "turns 2 to 5 reuse the earlier turns: {with:?}"
    );
    let (without, _) = chat_cached_tokens(None).await;
    assert_eq!(
        without[4], 0,
        "without a session the churn evicted it: {without:?}"
    );
}

/// The figures of docs/tenants.md (run by hand: `cargo nextest run -p minserve-server --test
/// tenants figures --run-ignored only --no-capture`): turn 5's TTFT with and without a
/// session, and a quiet tenant's TTFT alone and while another tenant floods, under fair share
/// and FCFS.
/// Quiet requests timed alone and during the flood, for the figures.
const QUIET_SAMPLES: usize = 20;
const FLOOD_REQUESTS: usize = 64;

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn figures() {
    for session in [Some("conversation-1"), None] {
        let mut ttfts = Vec::new();
        for _ in 0..3 {
            let (cached, ttft) = chat_cached_tokens(session).await;
            assert_eq!(cached[4] > 0, session.is_some());
            ttfts.push(ttft.as_secs_f64() * 1e3);
        }
        ttfts.sort_by(f64::total_cmp);
        println!(
            "turn 5 TTFT, session {session:?}: median {:.0} ms of {ttfts:.0?}",
            ttfts[1]
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    // The flood capped below the batch by its tenant's limit: a slot stays free for others.
    let capped = KEYS.replace(
        "name = \"flood\"\n",
        "name = \"flood\"\nmax_concurrent_requests = 6\n",
    );
    for (policy, keys) in [
        (SchedulingPolicy::FairShare, KEYS),
        (SchedulingPolicy::Fcfs, KEYS),
        (SchedulingPolicy::FairShare, capped.as_str()),
    ] {
        std::fs::write(&path, keys).unwrap();
        let config = SchedulerConfig {
            max_num_seqs: 8,
            policy,
            ..SchedulerConfig::default()
        };
        let s = start(&path, move || common::load(config)).await;
        let quiet_ttft = |s: &TestServer| {
            let started = Instant::now();
            let sent = request(
                s,
                "key-quiet",
                json!({"prompt": "Hello there", "max_tokens": 1}),
            )
            .send();
            async move {
                assert_eq!(sent.await.unwrap().status(), 200);
                started.elapsed().as_secs_f64() * 1e3
            }
        };
        let mut alone = Vec::new();
        for _ in 0..QUIET_SAMPLES {
            alone.push(quiet_ttft(&s).await);
        }
        // Long enough to outlast the quiet tenant's requests (the waiting counts printed show
        // it did).
        let flood = (0..FLOOD_REQUESTS)
            .map(|i| {
                request(
                    &s,
                    "key-flood",
                    json!({"prompt": format!("Story {i}: once upon a time"),
                        "max_tokens": 64, "ignore_eos": true}),
                )
                .send()
            })
            .map(tokio::spawn)
            .collect::<Vec<_>>();
        let capped = keys != KEYS;
        s.metric_until("minserve_num_requests_running", |r| r >= 6.0)
            .await;
        let waiting = if capped { 0.0 } else { 20.0 };
        s.metric_until("minserve_num_requests_waiting", |w| w >= waiting)
            .await;
        let mut loaded = Vec::new();
        let mut flood_waiting = Vec::new();
        for _ in 0..QUIET_SAMPLES {
            loaded.push(quiet_ttft(&s).await);
            flood_waiting.push(s.metric("minserve_num_requests_waiting").await);
        }
        for f in flood {
            f.abort();
        }
        // In the order sent: under FCFS the first waits for the whole flood, and the flood
        // is over for the others.
        println!(
            "{policy:?}, flood capped at 6: {capped}: quiet TTFT alone p50 {:.0} ms max {:.0} \
             ms; during a {FLOOD_REQUESTS}-request flood p50 {:.0} ms max {:.0} ms (in the order sent: \
             {loaded:.0?} ms; flood requests waiting after each: {flood_waiting:?})",
            percentile(&alone, 0.5),
            percentile(&alone, 1.0),
            percentile(&loaded, 0.5),
            percentile(&loaded, 1.0),
        );
    }
}
