//! Starts the server in-process on an ephemeral port, with the real default model or a tiny
//! synthetic one.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use minserve_core::engine::EngineConfig;
use minserve_core::scheduler::SchedulerConfig;
use minserve_model::{synthetic, CacheOptions, LlamaModel, LoadedModel};
use minserve_server::{AppState, ServedModel, ServerOptions};
use minserve_tokenizer::Tokenizer;
use serde_json::{json, Value};
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

fn engine_config(scheduler: SchedulerConfig, max_model_len: usize) -> EngineConfig {
    EngineConfig {
        scheduler,
        prefix_caching: true,
        max_model_len,
    }
}

/// Loads the default model (fetching it if needed).
pub fn load(scheduler: SchedulerConfig) -> anyhow::Result<ServedModel> {
    let path = minserve_hub::resolve(minserve_hub::default_model(), &Default::default())?;
    ServedModel::load(
        &path,
        cache(),
        |max_model_len| engine_config(scheduler, max_model_len),
        None,
    )
}

/// The `tiny` synthetic model (2 layers, hidden size 64, seeded random weights) with
/// [`byte_tokenizer`]: the whole HTTP path in a fraction of the real model's time, and nothing
/// to download. Its text is random bytes, so tests on it check shapes, not words.
pub fn load_synthetic(scheduler: SchedulerConfig) -> anyhow::Result<ServedModel> {
    let tokenizer = byte_tokenizer();
    let mut config = synthetic::preset("tiny").expect("the tiny preset exists");
    config.vocab_size = tokenizer.vocab_size();
    let weights = synthetic::build(&config, 7, GgmlDType::F32)?;
    let loaded = LoadedModel {
        model: LlamaModel::new(weights),
        tokenizer,
        path: PathBuf::from("synthetic:tiny"),
    };
    let max_model_len = config.max_position_embeddings;
    ServedModel::start(
        loaded,
        cache(),
        engine_config(scheduler, max_model_len),
        None,
    )
}

/// The special tokens of [`byte_tokenizer`], after the 256 bytes.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell them.
fn byte_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return byte as char;
    }
    let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + rank).unwrap()
}

/// A real byte-level BPE tokenizer without merges (token `b` is byte `b`) plus ChatML
/// specials and template, loaded through the Hugging Face folder path like any model's.
pub fn byte_tokenizer() -> Tokenizer {
    static FOLDERS: AtomicUsize = AtomicUsize::new(0);
    let vocab: serde_json::Map<String, Value> = (0..=255u8)
        .map(|b| (byte_char(b).to_string(), json!(b)))
        .collect();
    let added: Vec<Value> = (SPECIALS.iter().enumerate())
        .map(|(i, t)| {
            json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    });
    let config = json!({
        "bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "add_bos_token": false,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    });
    let dir = std::env::temp_dir().join(format!(
        "minserve-byte-tokenizer-{}-{}",
        std::process::id(),
        FOLDERS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    let loaded = Tokenizer::from_hf_folder(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    loaded.expect("the byte-level tokenizer loads")
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

    async fn start_loaded(
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

    /// One value of the Prometheus page.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, page) = self.get("/metrics").await;
        page.lines()
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
