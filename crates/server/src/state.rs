//! What every handler shares: the options, the served model once it is loaded, the shutdown
//! flag, the metrics and the in-flight counters.
//!
//! The model arrives after the server is already listening ([`spawn_load`] publishes it with
//! [`AppState::set_model`]); until then, after its engine failed, and once shutdown has begun,
//! every model route answers 503. The server knows no tensors: a [`ServedModel`] is an engine handle and a
//! tokenizer, wired up by whoever loaded the model (the CLI, or a test).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use minserve_core::engine_thread::EngineHandle;
use minserve_grammar::GrammarCompiler;
use minserve_tokenizer::Tokenizer;

use crate::cpu_work::CpuWork;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::options::ServerOptions;
use crate::supervision::{EngineWatch, Rebuild};

/// The model behind the API: the engine running on its own thread, and the tokenizer that
/// turns prompts into its token ids and its token ids back into text.
pub struct ServedModel {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// Most sequences the engine runs at once: admission counts those beyond it as waiting.
    pub max_num_seqs: usize,
    /// Built on the first request with a grammar (its token trie takes a moment), or why the
    /// vocabulary cannot take grammars.
    grammars: OnceLock<Result<GrammarCompiler, String>>,
}

impl ServedModel {
    pub fn new(engine: EngineHandle, tokenizer: Arc<Tokenizer>, max_num_seqs: usize) -> Self {
        Self {
            engine,
            tokenizer,
            max_num_seqs,
            grammars: OnceLock::new(),
        }
    }

    /// The compiler of structured-output grammars for this model's vocabulary.
    pub(crate) fn grammars(&self) -> Result<&GrammarCompiler, &str> {
        self.grammars
            .get_or_init(|| {
                GrammarCompiler::new(&self.tokenizer, self.vocab_size()).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// Longest prompt plus generation the model accepts.
    pub fn max_model_len(&self) -> usize {
        self.engine.limits().max_model_len
    }

    pub fn vocab_size(&self) -> usize {
        self.engine.limits().vocab_size
    }

    /// Longest prompt plus generation that the engine could ever hold: the context, or the
    /// whole KV cache if that is smaller.
    pub fn max_total_tokens(&self) -> usize {
        let limits = self.engine.limits();
        limits
            .max_model_len
            .min(limits.num_blocks * limits.block_size)
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub options: ServerOptions,
    /// The model being served; replaced when a failed engine is rebuilt.
    model: RwLock<Option<Arc<ServedModel>>>,
    /// The engine's health (see `supervision.rs`).
    pub(crate) engine_watch: Arc<EngineWatch<ServedModel>>,
    load_error: Mutex<Option<String>>,
    shutting_down: AtomicBool,
    pub metrics: Metrics,
    /// Sequences admitted whose response has not ended yet (for the queue limit; see
    /// `admission.rs`).
    pub(crate) inflight_seqs: AtomicUsize,
    /// Requests being answered (for logs and shutdown; see `middleware.rs`).
    pub(crate) inflight_requests: AtomicUsize,
    /// Unix time the server started, the `created` of its model card.
    pub started: u64,
    /// Turns true when the shutdown timeout is reached: the responses still running end at
    /// once, with an error (see `submit.rs`), instead of being dropped mid-transfer.
    cut_off: tokio::sync::watch::Sender<bool>,
    /// Where CPU-heavy request work runs (see `cpu_work.rs`).
    pub(crate) cpu_work: CpuWork,
    pub(crate) responses: Arc<crate::responses::store::ResponseStore>,
}

impl AppState {
    pub fn new(options: ServerOptions) -> Arc<Self> {
        Arc::new(Self {
            model: RwLock::new(None),
            engine_watch: Arc::default(),
            load_error: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            metrics: Metrics::default(),
            inflight_seqs: AtomicUsize::new(0),
            inflight_requests: AtomicUsize::new(0),
            started: unix_time(),
            cut_off: tokio::sync::watch::Sender::new(false),
            cpu_work: CpuWork::new(options.cpu_work_threads),
            responses: Arc::default(),
            options,
        })
    }

    /// The model is ready: `/health` turns 200. Its engine is watched from now on (see
    /// `supervision.rs`); a later call replaces it.
    pub fn set_model(&self, model: ServedModel) {
        self.engine_watch.watch(&model.engine);
        *self.model.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(model));
    }

    /// How to build a new engine when the running one fails (the CLI's `--restart-engine`);
    /// without it, a failed engine makes [`serve`](crate::serve) drain and return an error.
    pub fn set_engine_rebuild(
        &self,
        rebuild: impl Fn() -> anyhow::Result<ServedModel> + Send + Sync + 'static,
    ) {
        let rebuild: Rebuild<ServedModel> = Arc::new(rebuild);
        self.engine_watch.set_rebuild(rebuild);
    }

    /// Why the engine failed, until it is rebuilt.
    pub fn engine_failure(&self) -> Option<String> {
        self.engine_watch.failure()
    }

    /// Loading failed: `/health` stays 503 and says why.
    pub fn set_load_error(&self, message: String) {
        *self.load_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
    }

    /// Why loading the model failed, if it did.
    pub fn load_error(&self) -> Option<String> {
        self.load_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn model(&self) -> Option<Arc<ServedModel>> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// From now on every model route and `/health` answer 503; [`serve`](crate::serve) calls
    /// it when its shutdown signal fires, before it stops accepting connections.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Ends every response still running with an error: the shutdown timeout is reached.
    pub fn cut_off_responses(&self) {
        self.cut_off.send_replace(true);
    }

    /// Turns true once [`cut_off_responses`](Self::cut_off_responses) was called.
    pub(crate) fn cut_off_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.cut_off.subscribe()
    }

    /// Requests currently being answered.
    pub fn inflight_requests(&self) -> usize {
        self.inflight_requests.load(Ordering::SeqCst)
    }

    /// The model, or 503 while loading, after the engine failed, or shutting down.
    pub(crate) fn ready_model(&self) -> Result<Arc<ServedModel>, ApiError> {
        if let Some(reason) = self.engine_failure() {
            return Err(ApiError::engine_unavailable(&reason));
        }
        if self.is_shutting_down() {
            return Err(ApiError::shutting_down());
        }
        self.model().ok_or_else(ApiError::loading)
    }
}

/// Loads the model on a blocking thread and publishes it (or the error) to `state`. The
/// returned task yields the error message if loading failed.
pub fn spawn_load<F>(state: Arc<AppState>, load: F) -> tokio::task::JoinHandle<Result<(), String>>
where
    F: FnOnce() -> anyhow::Result<ServedModel> + Send + 'static,
{
    tokio::spawn(async move {
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(load)
            .await
            .map_err(|e| anyhow::anyhow!("the loading thread panicked: {e}"))
            .and_then(|r| r);
        match result {
            Ok(model) => {
                state.set_model(model);
                tracing::info!(
                    target: "minserve_server",
                    "model {} ready after {:.1} s",
                    state.options.served_model_name,
                    started.elapsed().as_secs_f64()
                );
                Ok(())
            }
            Err(e) => {
                let message = format!("{e:#}");
                state.set_load_error(message.clone());
                Err(message)
            }
        }
    })
}

/// Seconds since the Unix epoch (the `created` field of OpenAI objects).
pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
