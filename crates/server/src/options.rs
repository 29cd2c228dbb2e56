//! The HTTP layer's settings. The engine's (batch size, KV cache, context) are the CLI's
//! business: they come already applied, inside the [`ServedModel`](crate::state::ServedModel).

use std::time::Duration;

use crate::reasoning::ReasoningFormat;
pub use crate::tool_format::ToolCallFormat;

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The model id clients pass as `model` and `/v1/models` lists.
    pub served_model_name: String,
    /// When set, every route but `/health`, `/metrics` and `/openapi.json` needs
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most sequences that may wait for a slot in the running batch; beyond it requests get 429.
    pub max_queue: usize,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// After SIGINT / SIGTERM, how long in-flight requests may take to finish.
    pub shutdown_timeout: Duration,
    /// Web origins (`https://app.example.com`, or `*` for any) whose pages may call the API
    /// from a browser (CORS). Empty, the default: no CORS headers at all, so browsers keep
    /// every other origin's scripts out.
    pub allowed_origins: Vec<String>,
    /// Most requests parsed, tokenized or serialized at once, on threads apart from those that
    /// answer HTTP (see `cpu_work.rs`); more wait their turn. Default: the number of CPUs.
    pub cpu_work_threads: usize,
    /// Most events (tokens) buffered per sequence for a client that reads its stream slower
    /// than they are generated; past it the request is aborted (`client_too_slow`).
    pub max_buffered_events: usize,
    /// How the model writes tool calls; `None` reads it from the chat template (see
    /// `tool_format.rs`).
    pub tool_call_parser: Option<ToolCallFormat>,
    /// How reasoning models mark their thinking, to return it apart from the answer
    /// (`reasoning_content`, see `reasoning.rs`); `None`: all output is `content`.
    pub reasoning_parser: Option<ReasoningFormat>,
    /// How long a conversation session's cached prefix is kept ahead of others' after its
    /// request ends (see `caller.rs`).
    pub session_ttl: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            served_model_name: "default".into(),
            api_key: None,
            max_queue: 256,
            max_body_bytes: 4 << 20,
            shutdown_timeout: Duration::from_secs(30),
            allowed_origins: Vec::new(),
            cpu_work_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_buffered_events: 1024,
            tool_call_parser: None,
            reasoning_parser: None,
            session_ttl: Duration::from_secs(600),
        }
    }
}
