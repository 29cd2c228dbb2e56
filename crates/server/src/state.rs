//! What every handler shares: the options, the served models (each loaded in the background,
//! see `models.rs`), the shutdown flag and the in-flight counters.
//!
//! A model arrives after the server is already listening ([`spawn_load_model`] publishes it
//! with [`ModelSlot::set_model`]); until then, after its engine failed, and once shutdown has
//! begun, its routes answer 503. The server knows no tensors: a [`ServedModel`] is an engine
//! handle and a tokenizer, wired up by whoever loaded the model (the CLI, or a test).

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::http::StatusCode;

use crate::cpu_work::CpuWork;
use crate::error::ApiError;
use crate::models::{ModelRegistry, ModelSlot, ModelSpec, ServedModel};
use crate::options::ServerOptions;
use crate::supervision::Rebuild;
use crate::tenants::ApiKeys;

/// Everything the handlers share.
pub struct AppState {
    pub options: ServerOptions,
    /// Every served model, by name and alias.
    pub models: ModelRegistry,
    /// The tenants' keys (`--api-keys`), swapped whole when the file is reloaded.
    api_keys: RwLock<Option<Arc<ApiKeys>>>,
    shutting_down: AtomicBool,
    /// Requests being answered (for logs and shutdown; see `middleware.rs`).
    pub(crate) inflight_requests: AtomicUsize,
    /// Unix time the server started, the `created` of its model cards.
    pub started: u64,
    /// Turns true when the shutdown timeout is reached: the responses still running end at
    /// once, with an error (see `submit.rs`), instead of being dropped mid-transfer.
    cut_off: tokio::sync::watch::Sender<bool>,
    /// Where CPU-heavy request work runs (see `cpu_work.rs`).
    pub(crate) cpu_work: CpuWork,
    pub(crate) responses: Arc<crate::responses::store::ResponseStore>,
}

/// A model ready to take a request: its slot (metrics, admission counts) and its engine.
#[derive(Clone)]
pub(crate) struct ReadyModel {
    pub slot: Arc<ModelSlot>,
    pub model: Arc<ServedModel>,
}

impl Deref for ReadyModel {
    type Target = ServedModel;

    fn deref(&self) -> &ServedModel {
        &self.model
    }
}

impl AppState {
    /// A server of one model, named `options.served_model_name`.
    pub fn new(options: ServerOptions) -> Arc<Self> {
        let spec = ModelSpec::named(options.served_model_name.clone());
        Self::with_models(options, vec![spec]).expect("one model is a valid registry")
    }

    /// A server of several models, each with its own engine; the first is the default (its
    /// name is what a single-model server's `served_model_name` would be). Refused when a
    /// name or alias is given twice.
    pub fn with_models(
        options: ServerOptions,
        models: Vec<ModelSpec>,
    ) -> Result<Arc<Self>, String> {
        Ok(Arc::new(Self {
            models: ModelRegistry::new(models)?,
            api_keys: RwLock::new(None),
            shutting_down: AtomicBool::new(false),
            inflight_requests: AtomicUsize::new(0),
            started: unix_time(),
            cut_off: tokio::sync::watch::Sender::new(false),
            cpu_work: CpuWork::new(options.cpu_work_threads),
            responses: Arc::default(),
            options,
        }))
    }

    /// From now on requests need one of these keys, and are their tenant's.
    pub fn set_api_keys(&self, keys: ApiKeys) {
        *self.api_keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keys));
    }

    /// The tenants' keys, when the server has them.
    pub(crate) fn api_keys(&self) -> Option<Arc<ApiKeys>> {
        self.api_keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the keys file again and swaps the new keys in at once; on any error the old keys
    /// stay. Returns how many keys there are now.
    pub fn reload_api_keys(&self) -> Result<usize, String> {
        let current = self
            .api_keys()
            .ok_or("the server was started without --api-keys")?;
        let fresh = current.reload()?;
        let count = fresh.len();
        *self.api_keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(fresh));
        Ok(count)
    }

    /// The first model is ready (see [`ModelSlot::set_model`]).
    pub fn set_model(&self, model: ServedModel) {
        self.models.first().set_model(model);
    }

    /// How to build a new engine for the first model when the running one fails (the CLI's
    /// `--restart-engine`); see [`set_engine_rebuild_of`](Self::set_engine_rebuild_of).
    pub fn set_engine_rebuild(
        &self,
        rebuild: impl Fn() -> anyhow::Result<ServedModel> + Send + Sync + 'static,
    ) {
        self.set_engine_rebuild_of(self.models.first(), rebuild);
    }

    /// How to build a new engine for `slot` when its running one fails; without it, a failed
    /// engine makes [`serve`](crate::serve) drain and return an error.
    pub fn set_engine_rebuild_of(
        &self,
        slot: &ModelSlot,
        rebuild: impl Fn() -> anyhow::Result<ServedModel> + Send + Sync + 'static,
    ) {
        let rebuild: Rebuild<ServedModel> = Arc::new(rebuild);
        slot.engine_watch.set_rebuild(rebuild);
    }

    /// Why the first model's engine failed, until it is rebuilt.
    pub fn engine_failure(&self) -> Option<String> {
        self.models.first().engine_failure()
    }

    /// Loading the first model failed.
    pub fn set_load_error(&self, message: String) {
        self.models.first().set_load_error(message);
    }

    /// Why loading the first model failed, if it did.
    pub fn load_error(&self) -> Option<String> {
        self.models.first().load_error()
    }

    /// The first model, once loaded.
    pub fn model(&self) -> Option<Arc<ServedModel>> {
        self.models.first().model()
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

    /// The model a request names (`None`: the default one), or 404 listing the served models
    /// when no model has that id.
    pub(crate) fn find_model(&self, id: Option<&str>) -> Result<&Arc<ModelSlot>, ApiError> {
        match id {
            None => Ok(self.models.first()),
            Some(id) => self
                .models
                .find(id)
                .ok_or_else(|| ApiError::model_not_found(id, &self.models.names())),
        }
    }

    /// The model `id` names, ready; or 404 (no such model), or 503 while it loads, after it
    /// failed to load or its engine failed, or while shutting down.
    pub(crate) fn ready_model(&self, id: Option<&str>) -> Result<ReadyModel, ApiError> {
        let slot = self.find_model(id)?;
        self.readiness(slot)?;
        let model = slot.model().ok_or_else(ApiError::loading)?;
        Ok(ReadyModel {
            slot: slot.clone(),
            model,
        })
    }

    /// Whether `slot` can take requests now, or the 503 that says why not.
    pub(crate) fn readiness(&self, slot: &ModelSlot) -> Result<(), ApiError> {
        if let Some(reason) = slot.engine_failure() {
            return Err(ApiError::engine_unavailable(&reason));
        }
        if self.is_shutting_down() {
            return Err(ApiError::shutting_down());
        }
        if let Some(message) = slot.load_error() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                format!("Loading the model `{}` failed: {message}", slot.name()),
            )
            .code("model_load_failed"));
        }
        if slot.model().is_none() {
            return Err(ApiError::loading());
        }
        Ok(())
    }
}

/// Loads the first model on a blocking thread and publishes it (or the error); see
/// [`spawn_load_model`].
pub fn spawn_load<F>(state: Arc<AppState>, load: F) -> tokio::task::JoinHandle<Result<(), String>>
where
    F: FnOnce() -> anyhow::Result<ServedModel> + Send + 'static,
{
    let slot = state.models.first().clone();
    spawn_load_model(slot, load)
}

/// Loads a model on a blocking thread and publishes it (or the error) to its `slot`. The
/// returned task yields the error message if loading failed.
pub fn spawn_load_model<F>(
    slot: Arc<ModelSlot>,
    load: F,
) -> tokio::task::JoinHandle<Result<(), String>>
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
                slot.set_model(model);
                tracing::info!(
                    target: "minserve_server",
                    "model {} ready after {:.1} s",
                    slot.name(),
                    started.elapsed().as_secs_f64()
                );
                Ok(())
            }
            Err(e) => {
                let message = format!("{e:#}");
                tracing::error!(
                    target: "minserve_server",
                    "loading the model {} failed: {message}",
                    slot.name()
                );
                slot.set_load_error(message.clone());
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
