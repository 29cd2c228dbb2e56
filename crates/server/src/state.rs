//! What every handler shares: the options, the served model once it is loaded, the shutdown
//! flag, the metrics and the in-flight counters.
//!
//! The model arrives after the server is already listening ([`spawn_load`] publishes it with
//! [`AppState::set_model`]); until then, and again once shutdown has begun, every model route
//! answers 503. The server knows no tensors: a [`ServedModel`] is an engine handle and a
//! tokenizer, wired up by whoever loaded the model (the CLI, or a test).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use minserve_core::engine_thread::EngineHandle;
use minserve_tokenizer::Tokenizer;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::options::ServerOptions;

/// The model behind the API: the engine running on its own thread, and the tokenizer that
/// turns prompts into its token ids and its token ids back into text.
pub struct ServedModel {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// Most sequences the engine runs at once: admission counts those beyond it as waiting.
    pub max_num_seqs: usize,
}

impl ServedModel {
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
    model: OnceLock<Arc<ServedModel>>,
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
}

impl AppState {
    pub fn new(options: ServerOptions) -> Arc<Self> {
        Arc::new(Self {
            options,
            model: OnceLock::new(),
            load_error: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            metrics: Metrics::default(),
            inflight_seqs: AtomicUsize::new(0),
            inflight_requests: AtomicUsize::new(0),
            started: unix_time(),
        })
    }

    /// The model is ready: `/health` turns 200.
    pub fn set_model(&self, model: ServedModel) {
        let _ = self.model.set(Arc::new(model));
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

    pub fn model(&self) -> Option<&Arc<ServedModel>> {
        self.model.get()
    }

    /// From now on every model route and `/health` answer 503; [`serve`](crate::serve) calls
    /// it when its shutdown signal fires, before it stops accepting connections.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Requests currently being answered.
    pub fn inflight_requests(&self) -> usize {
        self.inflight_requests.load(Ordering::SeqCst)
    }

    /// The model, or 503 while loading / shutting down.
    pub(crate) fn ready_model(&self) -> Result<Arc<ServedModel>, ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::shutting_down());
        }
        self.model.get().cloned().ok_or_else(ApiError::loading)
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
