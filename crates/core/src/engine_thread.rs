//! The engine on its own thread.
//!
//! One thread owns the model, the KV cache and the scheduler; everything else (HTTP handlers,
//! benchmarks) talks to it through an [`EngineHandle`]: requests go in over a channel, and each
//! request's events come back through its own [`EventSink`]. Adding a request never waits for
//! a model step: the handle validates the request against the engine's limits
//! ([`EngineHandle::validate`], the one place a request is validated) and picks its id itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::engine::{Engine, EngineStats};
use crate::executor::ModelExecutor;
use crate::request::{EngineLimits, EventSink, Request, RequestError, RequestId, ValidatedRequest};

enum Command {
    Add(RequestId, Box<ValidatedRequest>, Box<dyn EventSink>),
    Abort(RequestId),
}

pub struct EngineHandle {
    commands: Option<Sender<Command>>,
    limits: EngineLimits,
    next_request_id: AtomicU64,
    stats: Arc<Mutex<EngineStats>>,
    thread: Option<JoinHandle<()>>,
}

impl EngineHandle {
    /// Moves `engine` onto a new thread and runs it until the handle is dropped.
    pub fn spawn<E: ModelExecutor + Send + 'static>(engine: Engine<E>) -> std::io::Result<Self> {
        let (commands, inbox) = mpsc::channel();
        let limits = engine.limits();
        let stats = Arc::new(Mutex::new(engine.stats()));
        let published = stats.clone();
        let thread = std::thread::Builder::new()
            .name("minserve-engine".into())
            .spawn(move || run(engine, inbox, published))?;
        Ok(Self {
            commands: Some(commands),
            limits,
            next_request_id: AtomicU64::new(1),
            stats,
            thread: Some(thread),
        })
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

    /// The counters as of the last step.
    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, command: Command) {
        if let Some(commands) = &self.commands {
            // The engine thread only stops once the handle is dropped, so this cannot fail
            // while the handle exists unless the thread panicked; then there is no one to tell.
            let _ = commands.send(command);
        }
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.commands.take(); // closes the channel: the thread finishes its step and exits
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run<E: ModelExecutor>(
    mut engine: Engine<E>,
    inbox: Receiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
) {
    loop {
        // Idle: sleep until a command arrives. Busy: take whatever is queued, then step.
        if !engine.has_work() {
            match inbox.recv() {
                Ok(command) => apply(&mut engine, command),
                Err(_) => return,
            }
        }
        loop {
            match inbox.try_recv() {
                Ok(command) => apply(&mut engine, command),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        engine.step();
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = engine.stats();
    }
}

fn apply<E: ModelExecutor>(engine: &mut Engine<E>, command: Command) {
    match command {
        Command::Add(id, request, sink) => engine.add_request_with_id(id, *request, sink),
        Command::Abort(id) => engine.abort(id),
    }
}
