//! Watching the engine thread: a failed engine is never hidden behind a green `/health`.
//!
//! When the engine thread fails (a panic: see `minserve_core::engine_thread`), the requests in
//! flight end with an `engine_failed` error, every model route and `/health` answer 503 with
//! the reason, and `minserve_engine_up` drops to 0. Then [`supervise`] either rebuilds the
//! engine (when the server was given a way to, `AppState::set_engine_rebuild`, the CLI's
//! `--restart-engine`), counting the restart, or returns the reason, and
//! [`serve`](crate::serve) drains the server and returns it as an error, so that the process
//! exits non-zero and its supervisor (systemd, Kubernetes) starts a fresh one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use minserve_core::engine_thread::EngineHandle;
use tokio::sync::Notify;

use crate::metrics::Exposition;

/// Builds a fresh `M` (the served model: an engine and its tokenizer) to replace one whose
/// engine failed.
pub(crate) type Rebuild<M> = Arc<dyn Fn() -> anyhow::Result<M> + Send + Sync>;

/// What the server knows about its engine's health; `M` is what a rebuild makes.
pub(crate) struct EngineWatch<M> {
    /// Why the current engine failed, until it is replaced.
    failure: Mutex<Option<String>>,
    failed: Notify,
    failures: AtomicU64,
    restarts: AtomicU64,
    rebuild: Mutex<Option<Rebuild<M>>>,
}

impl<M> Default for EngineWatch<M> {
    fn default() -> Self {
        Self {
            failure: Mutex::default(),
            failed: Notify::new(),
            failures: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            rebuild: Mutex::default(),
        }
    }
}

impl<M> EngineWatch<M> {
    /// Watches `engine` from now on (it replaces the one watched before).
    pub fn watch(self: &Arc<Self>, engine: &EngineHandle)
    where
        M: 'static,
    {
        *self.lock_failure() = None;
        let watch = self.clone();
        engine.on_failure(move |reason| watch.record_failure(reason));
    }

    fn record_failure(&self, reason: String) {
        tracing::error!(target: "minserve_server", "{reason}");
        *self.lock_failure() = Some(reason);
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.failed.notify_one();
    }

    fn lock_failure(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the engine failed, while it has not been replaced.
    pub fn failure(&self) -> Option<String> {
        self.lock_failure().clone()
    }

    pub fn set_rebuild(&self, rebuild: Rebuild<M>) {
        *self.rebuild.lock().unwrap_or_else(|e| e.into_inner()) = Some(rebuild);
    }

    fn rebuild(&self) -> Option<Rebuild<M>> {
        self.rebuild
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The engine's series of `/metrics` for `model`; `loaded` whether an engine was ever set.
    pub fn render(&self, page: &mut Exposition, model: &str, loaded: bool) {
        let up = loaded && self.failure().is_none();
        page.series(
            (
                "minserve_engine_up",
                "gauge",
                "1 while the engine thread runs, 0 while the model loads or after the engine \
                 failed.",
            ),
            model,
            "",
            u8::from(up),
        );
        page.series(
            (
                "minserve_engine_failures_total",
                "counter",
                "Engine thread failures (panics).",
            ),
            model,
            "",
            self.failures.load(Ordering::Relaxed),
        );
        page.series(
            (
                "minserve_engine_restarts_total",
                "counter",
                "Engines rebuilt after a failure (--restart-engine).",
            ),
            model,
            "",
            self.restarts.load(Ordering::Relaxed),
        );
    }
}

/// Runs for as long as the engine can be kept up: after each failure it rebuilds the engine if
/// it can and hands the result to `install`; it returns the reason once it cannot (no rebuild
/// configured, or the rebuild failed).
pub(crate) async fn supervise<M: Send + 'static>(
    watch: Arc<EngineWatch<M>>,
    install: impl Fn(M),
) -> String {
    loop {
        watch.failed.notified().await;
        let Some(reason) = watch.failure() else {
            continue;
        };
        let Some(rebuild) = watch.rebuild() else {
            return reason;
        };
        tracing::warn!(target: "minserve_server", "rebuilding the engine after: {reason}");
        match tokio::task::spawn_blocking(move || rebuild()).await {
            Ok(Ok(model)) => {
                install(model);
                watch.restarts.fetch_add(1, Ordering::Relaxed);
                tracing::info!(target: "minserve_server", "engine rebuilt");
            }
            Ok(Err(e)) => return format!("{reason}; rebuilding the engine failed: {e:#}"),
            Err(e) => return format!("{reason}; rebuilding the engine panicked: {e}"),
        }
    }
}
