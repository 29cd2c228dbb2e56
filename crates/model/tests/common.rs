//! Helpers shared by the model crate's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model, fetched on first use (via pip where the Hub is unreachable).
pub fn default_model_path() -> PathBuf {
    let dir = std::env::var_os("MINSERVE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `cargo run -p minserve -- fetch` first",
        path.display()
    );
    path
}
