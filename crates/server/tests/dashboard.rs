//! The live dashboard (`GET /dashboard`, docs/dashboard.md): its events over HTTP on the tiny
//! synthetic model, and the page itself in a real headless Chromium, driven over the W3C
//! WebDriver protocol, against the default model under load.
//!
//! The browser test needs `chromium` and `chromedriver` (Debian: `chromium`,
//! `chromium-driver`). Without them it is skipped with a message, unless
//! `MINSERVE_REQUIRE_BROWSER` is set (`.ci/run` sets it): then their absence fails it.
//! `MINSERVE_DASHBOARD_SCREENSHOT=PATH` saves a screenshot of the page under load
//! (docs/img/dashboard.png was taken so).

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{scheduler, TestServer, MODEL};
use minserve_server::{AppState, ServerOptions};
use serde_json::{json, Value};

const KEY: &str = "dashboard-key";

fn options_with_key() -> ServerOptions {
    ServerOptions {
        api_key: Some(KEY.into()),
        ..common::options()
    }
}

/// The server-sent events of an open `/dashboard/events` response, read as they come.
struct EventReader {
    response: reqwest::Response,
    buffer: String,
}

impl EventReader {
    /// The next event's name and data; panics after `within`.
    async fn next(&mut self, within: Duration) -> (String, Value) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let text: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(n) = line.strip_prefix("event:") {
                        name = n.trim().to_string();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return (name, serde_json::from_str(&data).unwrap());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.response.chunk())
                .await
                .expect("no event in time")
                .unwrap()
                .expect("the stream ended");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// A completion request with the key.
async fn complete(s: &TestServer, body: Value) -> reqwest::Response {
    s.client
        .post(s.url("/v1/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn open_events(s: &TestServer, query: &str) -> EventReader {
    let response = s
        .client
        .get(s.url(&format!("/dashboard/events{query}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    EventReader {
        response,
        buffer: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_public_and_its_events_need_the_key() {
    let s = TestServer::start_synthetic(options_with_key(), scheduler(4)).await;
    for (path, content_type) in [
        ("/dashboard", "text/html"),
        ("/dashboard/dashboard.js", "text/javascript"),
        ("/dashboard/dashboard.css", "text/css"),
    ] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let header = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(header.starts_with(content_type), "{path}: {header}");
        assert!(!r.text().await.unwrap().is_empty());
    }
    let r = s
        .client
        .get(s.url("/dashboard/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    let r = s
        .client
        .get(s.url("/dashboard/events"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .get(s.url("/dashboard/events?model=nope"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains(MODEL),
        "the 404 lists the served models: {body}"
    );
}

/// One events stream is one watcher: the engine publishes steps, request events and block
/// maps to it, and stops when it goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_carry_the_engines_steps_while_someone_watches() {
    let s = TestServer::start_synthetic(options_with_key(), scheduler(4)).await;
    let model = s.state.model().unwrap();
    let feed = model.engine.live_feed().clone();
    assert_eq!(feed.watchers(), 0);
    let mut events = open_events(&s, &format!("?model={MODEL}")).await;
    let (name, hello) = events.next(Duration::from_secs(10)).await;
    assert_eq!(name, "hello");
    assert_eq!(hello["model"], MODEL);
    assert_eq!(hello["models"], json!([MODEL]));
    assert_eq!(hello["pool"]["version"], 2);
    let num_blocks = hello["pool"]["num_blocks"].as_u64().unwrap();
    assert!(num_blocks > 0);
    assert_eq!(feed.watchers(), 1);

    // A watcher arriving at an idle engine gets the pool's map without a step (the first
    // update may come before the engine thread took the request for it).
    let map = loop {
        let (name, update) = events.next(Duration::from_secs(10)).await;
        assert_eq!(name, "update");
        if !update["block_map"].is_null() {
            break update["block_map"].clone();
        }
    };
    let cells: u64 = map["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run[1].as_u64().unwrap())
        .sum();
    assert_eq!(cells, num_blocks, "{map}");

    let r = complete(
        &s,
        json!({"model": MODEL, "prompt": "watch me", "max_tokens": 8, "ignore_eos": true}),
    )
    .await;
    assert_eq!(r.status(), 200);

    let mut steps = Vec::new();
    let mut kinds = Vec::new();
    let mut generated = 0;
    while !kinds.iter().any(|k| k == "finished") || generated < 8 {
        let (name, update) = events.next(Duration::from_secs(10)).await;
        assert_eq!(name, "update");
        for record in update["records"].as_array().unwrap() {
            match record["type"].as_str().unwrap() {
                "step" => steps.push(record["step"].as_u64().unwrap()),
                "request" => kinds.push(record["event"].as_str().unwrap().to_string()),
                other => panic!("a {other} record in the live feed"),
            }
        }
        generated = update["totals"]["generation_tokens"].as_u64().unwrap();
    }
    assert_eq!(kinds, ["arrived", "scheduled", "finished"]);
    assert!(steps.len() >= 8, "a step per token at least: {steps:?}");
    assert!(steps.windows(2).all(|w| w[1] == w[0] + 1), "{steps:?}");

    drop(events);
    let start = Instant::now();
    while feed.watchers() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the watcher outlived its stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let published = feed.published();
    let r = complete(
        &s,
        json!({"model": MODEL, "prompt": "nobody looks", "max_tokens": 8}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        feed.published(),
        published,
        "published with nobody watching"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_end_when_the_server_shuts_down() {
    let mut s = TestServer::start_synthetic(options_with_key(), scheduler(4)).await;
    let mut events = open_events(&s, "").await;
    events.next(Duration::from_secs(10)).await;
    let shutdown = tokio::time::timeout(Duration::from_secs(10), s.shutdown()).await;
    assert!(
        shutdown.is_ok(),
        "an open dashboard held the shutdown up to its timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_end_when_the_engine_fails() {
    let trigger = Arc::new(AtomicBool::new(false));
    let fault = trigger.clone();
    let s = TestServer::start_loaded(options_with_key(), move || {
        common::load_synthetic_with_fault(scheduler(4), fault)
    })
    .await;
    let mut events = open_events(&s, "").await;
    events.next(Duration::from_secs(10)).await;
    trigger.store(true, Ordering::SeqCst);
    let r = complete(
        &s,
        json!({"model": MODEL, "prompt": "fail", "max_tokens": 4}),
    )
    .await;
    let _ = r.bytes().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while events.response.chunk().await.is_ok_and(|c| c.is_some()) {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its engine");
}

// ---- the browser test ----------------------------------------------------------------------

/// A program by the path in `env`, else by `name` on the PATH.
fn program(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(path.into());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A W3C WebDriver session on a chromedriver of its own: the five commands this test needs,
/// over the plain HTTP client the other tests use (no WebDriver crate; see docs/dashboard.md).
struct Browser {
    http: reqwest::Client,
    session: String,
    driver: tokio::process::Child,
}

impl Browser {
    async fn start(chromium: &std::path::Path, chromedriver: &std::path::Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromedriver");
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            let ready = match http.get(format!("{root}/status")).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["value"]["ready"] == true),
                Err(_) => false,
            };
            if ready {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1140"],
            },
        }}});
        let created = answer(http.post(format!("{root}/session")).json(&capabilities)).await;
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"));
        Self {
            http,
            session: format!("{root}/session/{id}"),
            driver,
        }
    }

    /// A command's `value`, or a panic with the driver's error.
    async fn command(&self, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.session);
        let request = match body {
            Some(body) => self.http.post(url).json(&body),
            None => self.http.get(url),
        };
        let value = answer(request).await["value"].clone();
        assert!(value.get("error").is_none(), "WebDriver {path}: {value}");
        value
    }

    async fn open(&self, url: &str) {
        self.command("/url", Some(json!({ "url": url }))).await;
    }

    async fn eval(&self, script: &str) -> Value {
        self.command("/execute/sync", Some(json!({"script": script, "args": []})))
            .await
    }

    async fn screenshot_png(&self) -> Vec<u8> {
        let encoded = self.command("/screenshot", None).await;
        decode_base64(encoded.as_str().unwrap())
    }

    async fn quit(mut self) {
        let _ = self.http.delete(&self.session).send().await;
        let _ = self.driver.kill().await;
    }
}

/// The JSON a WebDriver request is answered with.
async fn answer(request: reqwest::RequestBuilder) -> Value {
    let response = request.send().await.expect("chromedriver answers");
    response.json().await.expect("a JSON answer")
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|c| {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &d)| n | (d as u32) << (18 - 6 * i));
            let bytes = n.to_be_bytes();
            bytes[1..c.len()].to_vec()
        })
        .collect()
}

/// What the test reads of the page: its counters, the block map's data attributes, and the
/// block map's pixels.
const READ_PAGE: &str = r#"
const map = document.getElementById("block-map");
return {
  last_step_drawn: Number(document.getElementById("batch-chart").dataset.lastStep),
  updates: Number(document.body.dataset.updates),
  steps: Number(document.getElementById("stat-steps").textContent),
  generated: Number(document.getElementById("stat-generated").textContent),
  status: document.getElementById("status").textContent,
  map_draws: Number(map.dataset.draws),
  map_step: Number(map.dataset.step),
  map_used: Number(map.dataset.used),
  map_pixels: map.toDataURL(),
};
"#;

/// What must grow between two reads of the page under load.
const MOVING_FIELDS: [&str; 6] = [
    "updates",
    "steps",
    "generated",
    "last_step_drawn",
    "map_draws",
    "map_step",
];

/// The longest the test waits for them to grow: generous, for a loaded CI machine.
const MOVE_WITHIN: Duration = Duration::from_secs(30);

/// Requests with a shared prefix of more than two blocks and outputs of different lengths (so
/// that they finish apart), from `workers` clients in a loop until `stop`.
fn put_load(
    s: &TestServer,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|worker| {
            let client = s.client.clone();
            let url = s.url("/v1/completions");
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let prompt = format!(
                        "You are a helpful assistant. You answer every question in one short \
                         paragraph, in plain words, without lists, and you say so when you do \
                         not know. Question {worker}.{round}: why is the sky blue on planet \
                         {worker}?"
                    );
                    let max_tokens = 40 + 24 * ((worker + round) % 4);
                    let r = client
                        .post(&url)
                        .bearer_auth(KEY)
                        .json(&json!({"model": MODEL, "prompt": prompt,
                                      "max_tokens": max_tokens, "ignore_eos": true}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect()
}

/// The page in headless Chromium against the default model under load: the counters, the
/// step chart and the block map change between two reads (two seconds apart, or up to
/// `MOVE_WITHIN` on a slow machine). If the page stopped updating (no events, a broken
/// script, an engine that no longer publishes) the second read would equal the first and the
/// test fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_updates_in_a_real_browser_under_load() {
    let (Some(chromium), Some(chromedriver)) = (
        program("MINSERVE_CHROMIUM", "chromium"),
        program("MINSERVE_CHROMEDRIVER", "chromedriver"),
    ) else {
        assert!(
            std::env::var_os("MINSERVE_REQUIRE_BROWSER").is_none(),
            "MINSERVE_REQUIRE_BROWSER is set but chromium or chromedriver is missing \
             (apt-get install chromium chromium-driver)"
        );
        eprintln!(
            "SKIPPED: chromium or chromedriver not found (apt-get install chromium \
             chromium-driver); CI sets MINSERVE_REQUIRE_BROWSER, which makes this a failure"
        );
        return;
    };
    // A pool of 39 blocks for 8 sequences that grow to up to 8 blocks each: the map fills,
    // and sequences are preempted now and then.
    let state = AppState::new(options_with_key());
    let model = tokio::task::spawn_blocking(|| common::load_with_kv(scheduler(8), 14 << 20))
        .await
        .unwrap()
        .expect("loading the default model");
    state.set_model(model);
    let s = TestServer::start_with(state).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = put_load(&s, 8, stop.clone());

    let browser = Browser::start(&chromium, &chromedriver).await;
    browser
        .open(&s.url(&format!("/dashboard?model={MODEL}#key={KEY}")))
        .await;
    let started = Instant::now();
    let first = loop {
        let page = browser.eval(READ_PAGE).await;
        if page["steps"].as_u64() > Some(0) && page["map_used"].as_u64() > Some(0) {
            break page;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the page never showed a step and a used block: {page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Read again until everything moved (2 s apart on a quiet machine), for at most
    // `MOVE_WITHIN`: a page that stopped updating never gets there.
    let number = |page: &Value, field: &str| page[field].as_u64().unwrap();
    let moved = |page: &Value| {
        MOVING_FIELDS
            .iter()
            .all(|field| number(page, field) > number(&first, field))
            && page["map_pixels"] != first["map_pixels"]
    };
    let deadline = Instant::now() + MOVE_WITHIN;
    let second = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let page = browser.eval(READ_PAGE).await;
        if moved(&page) || Instant::now() > deadline {
            break page;
        }
    };
    if let Some(path) = std::env::var_os("MINSERVE_DASHBOARD_SCREENSHOT") {
        // Long enough for the charts to fill.
        tokio::time::sleep(Duration::from_secs(15)).await;
        std::fs::write(path, browser.screenshot_png().await).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    browser.quit().await;
    for worker in load {
        worker.await.unwrap();
    }

    for field in MOVING_FIELDS {
        assert!(
            number(&second, field) > number(&first, field),
            "{field} did not move in {MOVE_WITHIN:?} under load: {} then {}",
            first[field],
            second[field]
        );
    }
    assert_ne!(
        first["map_pixels"], second["map_pixels"],
        "the block map's picture did not change"
    );
    assert!(
        first["status"].as_str().unwrap().starts_with("live"),
        "{}",
        first["status"]
    );
}
