//! Starts the server in-process on an ephemeral port, with the real default model or a tiny
//! synthetic one.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use minserve_core::engine::{Engine, EngineConfig};
use minserve_core::engine_thread::EngineHandle;
use minserve_core::scheduler::SchedulerConfig;
use minserve_core::speculative::SpeculativeConfig;
use minserve_core::{CacheGeometry, Logits, ModelExecutor, StepBatch};
use minserve_model::{load_model, CacheOptions, DeviceOptions, LoadedModel, Runner, SyntheticSpec};
use minserve_server::{AppState, ServedModel, ServerOptions};
use serde_json::Value;
use tokio::sync::oneshot;

pub const MODEL: &str = "test-model";

pub fn options() -> ServerOptions {
    ServerOptions {
        served_model_name: MODEL.into(),
        ..ServerOptions::default()
    }
}

pub fn scheduler(max_num_seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        ..SchedulerConfig::default()
    }
}

/// A 64 MiB KV cache: room for every test, and quick to allocate.
fn cache() -> CacheOptions {
    CacheOptions {
        memory_bytes: 64 << 20,
        ..CacheOptions::default()
    }
}

/// What the CLI does for `minserve serve`: the model on a runner, the runner in an engine, the
/// engine on its thread, served with its tokenizer.
pub fn serve_loaded(
    loaded: LoadedModel,
    scheduler: SchedulerConfig,
) -> anyhow::Result<ServedModel> {
    serve_wrapped(loaded, scheduler, cache(), |runner| runner)
}

/// [`serve_loaded`] with the runner inside `wrap` (a test's own executor around it).
fn serve_wrapped<E: ModelExecutor + Send + 'static>(
    loaded: LoadedModel,
    scheduler: SchedulerConfig,
    cache: CacheOptions,
    wrap: impl FnOnce(Runner) -> E,
) -> anyhow::Result<ServedModel> {
    serve_speculating(loaded, scheduler, cache, wrap, None)
}

/// [`serve_wrapped`], with speculative decoding when `speculative` is given.
fn serve_speculating<E: ModelExecutor + Send + 'static>(
    loaded: LoadedModel,
    scheduler: SchedulerConfig,
    cache: CacheOptions,
    wrap: impl FnOnce(Runner) -> E,
    speculative: Option<SpeculativeConfig>,
) -> anyhow::Result<ServedModel> {
    let config = EngineConfig {
        scheduler,
        prefix_caching: true,
        max_model_len: loaded.model.config().max_position_embeddings,
    };
    let tokenizer = Arc::new(loaded.tokenizer);
    let eos = tokenizer.eos_token_ids().to_vec();
    let runner = Runner::new(loaded.model, cache, DeviceOptions::default())?;
    let mut engine = Engine::new(wrap(runner), config, tokenizer.clone(), eos);
    if let Some(speculative) = speculative {
        engine.set_speculative(speculative);
    }
    Ok(ServedModel::new(
        EngineHandle::spawn(engine)?,
        tokenizer,
        scheduler.max_num_seqs,
    ))
}

/// An executor that panics in the first step after its trigger is set: the engine thread's
/// failure, injected from a test (no such hook exists outside the tests).
/// A runner that calls `before_step` ahead of every step: how a test injects a fault or slows
/// the engine down without a model of its own.
pub struct BeforeEachStep<E> {
    inner: E,
    before_step: Box<dyn FnMut() + Send>,
}

impl<E: ModelExecutor> ModelExecutor for BeforeEachStep<E> {
    type Error = E::Error;

    fn cache_geometry(&self) -> CacheGeometry {
        self.inner.cache_geometry()
    }

    fn kv_group_windows(&self) -> Vec<Option<usize>> {
        self.inner.kv_group_windows()
    }

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits, Self::Error> {
        (self.before_step)();
        self.inner.execute(batch)
    }

    fn for_each_index(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.inner.for_each_index(n, f)
    }
}

fn load_synthetic_before_each_step(
    scheduler: SchedulerConfig,
    before_step: impl FnMut() + Send + 'static,
) -> anyhow::Result<ServedModel> {
    serve_wrapped(synthetic_tiny()?, scheduler, cache(), |inner| {
        BeforeEachStep {
            inner,
            before_step: Box::new(before_step),
        }
    })
}

/// The tiny synthetic model ([`load_synthetic`]) whose engine panics once `trigger` is set.
pub fn load_synthetic_with_fault(
    scheduler: SchedulerConfig,
    trigger: Arc<AtomicBool>,
) -> anyhow::Result<ServedModel> {
    load_synthetic_before_each_step(scheduler, move || {
        if trigger.swap(false, Ordering::SeqCst) {
            panic!("injected engine failure");
        }
    })
}

/// The tiny synthetic model with every step lasting at least `step`: a timing test's spans
/// then dwarf the noise of a busy machine (the bare model runs a step in a fraction of a ms).
pub fn load_synthetic_paced(
    scheduler: SchedulerConfig,
    step: Duration,
) -> anyhow::Result<ServedModel> {
    load_synthetic_before_each_step(scheduler, move || std::thread::sleep(step))
}

/// The tiny synthetic model with a KV cache of `memory_bytes` (its tokens take 256 bytes
/// each: 1 KiB of cache holds 4 tokens).
pub fn load_synthetic_with_kv(
    scheduler: SchedulerConfig,
    memory_bytes: usize,
) -> anyhow::Result<ServedModel> {
    let cache = CacheOptions {
        memory_bytes,
        ..cache()
    };
    serve_wrapped(synthetic_tiny()?, scheduler, cache, |runner| runner)
}

/// The default model with a KV cache of `memory_bytes` (23,040 bytes per token in f16).
pub fn load_with_kv(
    scheduler: SchedulerConfig,
    memory_bytes: usize,
) -> anyhow::Result<ServedModel> {
    let path = minserve_hub::resolve(minserve_hub::default_model(), &Default::default())?;
    let cache = CacheOptions {
        memory_bytes,
        ..cache()
    };
    serve_wrapped(load_model(&path)?, scheduler, cache, |runner| runner)
}

/// Loads the default model (fetching it if needed).
pub fn load(scheduler: SchedulerConfig) -> anyhow::Result<ServedModel> {
    load_named(minserve_hub::default_model(), scheduler)
}

/// Loads the default model, served with speculative decoding.
pub fn load_speculative(
    scheduler: SchedulerConfig,
    speculative: SpeculativeConfig,
) -> anyhow::Result<ServedModel> {
    let path = minserve_hub::resolve(minserve_hub::default_model(), &Default::default())?;
    serve_speculating(
        load_model(&path)?,
        scheduler,
        cache(),
        |runner| runner,
        Some(speculative),
    )
}

/// Loads the catalog's model `name` (fetching it if needed).
pub fn load_named(name: &str, scheduler: SchedulerConfig) -> anyhow::Result<ServedModel> {
    let path = minserve_hub::resolve(name, &Default::default())?;
    serve_loaded(load_model(&path)?, scheduler)
}

/// The `tiny` synthetic model (2 layers, hidden size 64, seeded random weights, f32) with its
/// byte-level tokenizer: the whole HTTP path in a fraction of the real model's time, and
/// nothing to download. Its text is random, so tests on it check shapes, not words.
pub fn load_synthetic(scheduler: SchedulerConfig) -> anyhow::Result<ServedModel> {
    serve_loaded(synthetic_tiny()?, scheduler)
}

fn synthetic_tiny() -> anyhow::Result<LoadedModel> {
    let spec = SyntheticSpec::parse("synthetic:tiny@f32")?.expect("a synthetic spec");
    Ok(spec.load()?)
}

pub struct TestServer {
    pub base: String,
    pub state: Arc<AppState>,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Serves `state` (model loaded or not) through [`minserve_server::serve`].
    pub async fn start_with(state: Arc<AppState>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(minserve_server::serve(
            listener,
            state.clone(),
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            base,
            state,
            client: reqwest::Client::new(),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A ready server on the default model.
    pub async fn start(options: ServerOptions, scheduler: SchedulerConfig) -> Self {
        Self::start_loaded(options, move || load(scheduler)).await
    }

    /// A ready server on the tiny synthetic model ([`load_synthetic`]).
    pub async fn start_synthetic(options: ServerOptions, scheduler: SchedulerConfig) -> Self {
        Self::start_loaded(options, move || load_synthetic(scheduler)).await
    }

    pub async fn start_loaded(
        options: ServerOptions,
        load: impl FnOnce() -> anyhow::Result<ServedModel> + Send + 'static,
    ) -> Self {
        let state = AppState::new(options);
        let model = tokio::task::spawn_blocking(load)
            .await
            .unwrap()
            .expect("loading the model");
        state.set_model(model);
        Self::start_with(state).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The value of series `name` (with its labels but the `model` one, which is
    /// [`MODEL`]'s) on `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, page) = self.get("/metrics").await;
        unlabelled(&page)
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{page}"))
    }

    /// Polls `/metrics` until `name` satisfies `ok` (the engine publishes its counters after
    /// each step, which may be just after a response went out); panics after 2 s.
    pub async fn metric_until(&self, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let start = Instant::now();
        loop {
            let v = self.metric(name).await;
            if ok(v) {
                return v;
            }
            assert!(start.elapsed() < Duration::from_secs(2), "{name} = {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until running, waiting and KV usage are all 0; panics after `within`.
    pub async fn wait_idle(&self, within: Duration) {
        let start = Instant::now();
        loop {
            let running = self.metric("minserve_num_requests_running").await;
            let waiting = self.metric("minserve_num_requests_waiting").await;
            let kv = self.metric("minserve_kv_cache_usage_ratio").await;
            if running == 0.0 && waiting == 0.0 && kv == 0.0 {
                return;
            }
            assert!(
                start.elapsed() < within,
                "still busy after {within:?}: running {running}, waiting {waiting}, kv {kv}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Triggers the graceful shutdown and waits for `serve` to return.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

/// An error in OpenAI's shape with status `want_status`, naming `param` when given.
pub fn assert_error(status: u16, body: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("code").is_some() && e.get("param").is_some(),
        "{body}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
}

/// Reads a whole SSE response: the JSON of every `data:` event, and whether `[DONE]` ended it.
pub async fn read_sse(response: reqwest::Response) -> (Vec<Value>, bool) {
    let text = response.text().await.unwrap();
    let mut events = Vec::new();
    let mut done = false;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        assert!(!done, "data after [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    (events, done)
}

/// A `/metrics` page with [`MODEL`]'s `model` label taken out of every series, so that tests
/// of one model can name series as a single-model page would.
pub fn unlabelled(page: &str) -> String {
    let label = format!("model=\"{MODEL}\"");
    page.replace(&format!("{{{label}}}"), "")
        .replace(&format!("{{{label},"), "{")
}
