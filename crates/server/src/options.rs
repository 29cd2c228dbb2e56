//! The HTTP layer's settings. The engine's (batch size, KV cache, context) are the CLI's
//! business: they come already applied, inside the [`ServedModel`](crate::state::ServedModel).

use std::time::Duration;

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
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            served_model_name: "default".into(),
            api_key: None,
            max_queue: 256,
            max_body_bytes: 4 << 20,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}
