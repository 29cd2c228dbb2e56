//! The engine on its own thread.
//!
//! One thread owns the model, the KV cache and the scheduler; everything else (HTTP handlers,
//! benchmarks) talks to it through an [`EngineHandle`]: requests go in over a channel, and each
//! request's events come back through its own [`EventSink`]. Adding a request never waits for
//! a model step: the handle validates the request against the engine's limits
//! ([`EngineHandle::validate`], the one place a request is validated) and picks its id itself.
//!
//! **Failure.** The engine has invariant checks that panic. A panic ends the thread, but not
//! silently: the engine (with every request's sink) is dropped as the thread unwinds, so each
//! request in flight sees its events end; [`EngineHandle::failure`] says why from then on, and
//! the callback given to [`EngineHandle::on_failure`] is called once with the reason, so that a
//! server can stop reporting itself healthy and restart or exit. Requests added after that are
//! dropped with their sinks at once.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::engine::{Engine, EngineStats};
use crate::executor::ModelExecutor;
use crate::live::{LiveFeed, LiveWatch};
use crate::request::{EngineLimits, EventSink, Request, RequestError, RequestId, ValidatedRequest};

enum Command {
    Add(RequestId, Box<ValidatedRequest>, Box<dyn EventSink>),
    Abort(RequestId),
    /// A live watcher arrived: publish the block map now, even if idle.
    PublishBlockMap,
}

/// Called once, with the reason, when the engine thread fails.
type FailureCallback = Box<dyn FnOnce(String) + Send>;

/// Whether the engine thread failed, and who to tell when it does (one lock, so that a
/// callback registered at the moment the thread fails is still called exactly once).
#[derive(Default)]
struct Supervision {
    state: Mutex<(Option<String>, Option<FailureCallback>)>,
}

impl Supervision {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<String>, Option<FailureCallback>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, reason: String) {
        let callback = {
            let mut state = self.lock();
            state.0 = Some(reason.clone());
            state.1.take()
        };
        if let Some(callback) = callback {
            callback(reason);
        }
    }
}

pub struct EngineHandle {
    commands: Option<Sender<Command>>,
    limits: EngineLimits,
    next_request_id: AtomicU64,
    stats: Arc<Mutex<EngineStats>>,
    supervision: Arc<Supervision>,
    live: Arc<LiveFeed>,
    thread: Option<JoinHandle<()>>,
}

impl EngineHandle {
    /// Moves `engine` onto a new thread and runs it until the handle is dropped.
    pub fn spawn<E: ModelExecutor + Send + 'static>(engine: Engine<E>) -> std::io::Result<Self> {
        let (commands, inbox) = mpsc::channel();
        let limits = engine.limits();
        let live = engine.live_feed();
        let stats = Arc::new(Mutex::new(engine.stats()));
        let published = stats.clone();
        let supervision = Arc::new(Supervision::default());
        let watched = supervision.clone();
        let thread = std::thread::Builder::new()
            .name("minserve-engine".into())
            .spawn(move || {
                let mut engine = engine;
                let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    run(&mut engine, &inbox, &published)
                }));
                if let Err(panic) = run {
                    // Recorded before the engine is dropped: a response that sees its events
                    // end can already tell why.
                    watched.fail(panic_message(panic.as_ref()));
                }
            })?;
        Ok(Self {
            commands: Some(commands),
            limits,
            next_request_id: AtomicU64::new(1),
            stats,
            supervision,
            live,
            thread: Some(thread),
        })
    }

    /// Why the engine thread failed (its panic message), once it has.
    pub fn failure(&self) -> Option<String> {
        self.supervision.lock().0.clone()
    }

    /// Calls `callback` with the reason when the engine thread fails (at once if it already
    /// has). Replaces the callback registered before, if any.
    pub fn on_failure(&self, callback: impl FnOnce(String) + Send + 'static) {
        let failure = {
            let mut state = self.supervision.lock();
            if state.0.is_none() {
                state.1 = Some(Box::new(callback));
                return;
            }
            state.0.clone()
        };
        if let Some(reason) = failure {
            callback(reason);
        }
    }

    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    /// Says at once why `request` can never be served, or makes it a [`ValidatedRequest`]
    /// for [`add_request`](Self::add_request).
    pub fn validate(&self, request: Request) -> Result<ValidatedRequest, RequestError> {
        self.limits.validate(request)
    }

    /// Queues a request; its events go to `sink`.
    pub fn add_request(&self, request: ValidatedRequest, sink: Box<dyn EventSink>) -> RequestId {
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        self.send(Command::Add(id, Box::new(request), sink));
        id
    }

    /// Drops a request; its blocks are freed before the next step.
    pub fn abort(&self, id: RequestId) {
        self.send(Command::Abort(id));
    }

    /// Starts watching the engine live (see `live.rs`): from now on, until the watch is
    /// dropped, the engine publishes its step and request records and its block map.
    pub fn watch_live(&self) -> LiveWatch {
        let watch = self.live.watch();
        self.send(Command::PublishBlockMap);
        watch
    }

    /// The live feed, for its header and its watcher count.
    pub fn live_feed(&self) -> &Arc<LiveFeed> {
        &self.live
    }

    /// The counters as of the last step.
    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, command: Command) {
        if let Some(commands) = &self.commands {
            // The engine thread only stops once the handle is dropped, so this fails only after
            // it panicked: the command comes back and is dropped here, and an added request's
            // sink with it, which ends that request at once (its response sees the failure).
            let _ = commands.send(command);
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.commands.take(); // closes the channel: the thread finishes its step and exits
        if let Some(thread) = self.thread.take() {
            // The last handle can be dropped on the engine thread itself (with a request's
            // sink that held the server's state): it exits on its own, it cannot join itself.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

fn run<E: ModelExecutor>(
    engine: &mut Engine<E>,
    inbox: &Receiver<Command>,
    stats: &Mutex<EngineStats>,
) {
    loop {
        // Idle: sleep until a command arrives. Busy: take whatever is queued, then step.
        if !engine.has_work() {
            engine.publish_block_map();
            match inbox.recv() {
                Ok(command) => apply(engine, command),
                Err(_) => return,
            }
        }
        loop {
            match inbox.try_recv() {
                Ok(command) => apply(engine, command),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        engine.step();
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = engine.stats();
    }
}

/// The message a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    format!("the engine thread panicked: {message}")
}

fn apply<E: ModelExecutor>(engine: &mut Engine<E>, command: Command) {
    match command {
        Command::Add(id, request, sink) => engine.add_request_with_id(id, *request, sink),
        Command::Abort(id) => engine.abort(id),
        Command::PublishBlockMap => engine.publish_block_map(),
    }
}
