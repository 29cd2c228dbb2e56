//! Shared helpers for the integration tests: locating the default model and reading fixtures.
//!
//! The model is never skipped when missing: a test that silently passes without its input
//! proves nothing, so it is fetched, and a failure to fetch fails the test.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use minserve_tokenizer::{ChatMessage, Tokenizer};
use serde::Deserialize;

/// The default model (SmolLM2-135M-Instruct Q4_1), fetched on first use like the binary does:
/// a fresh clone's `cargo test` needs no manual step.
pub fn smollm2_path() -> PathBuf {
    minserve_hub::resolve(
        minserve_hub::default_model(),
        &minserve_hub::FetchOptions::default(),
    )
    .unwrap_or_else(|e| panic!("the default model is needed by this test: {e}"))
}

/// The GGUF header (metadata and tensor index; tensor data is not read).
pub fn smollm2_content() -> gguf_file::Content {
    let path = smollm2_path();
    let mut file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    gguf_file::Content::read(&mut file)
        .unwrap_or_else(|e| panic!("cannot parse GGUF {}: {e}", path.display()))
}

pub fn smollm2_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&smollm2_content()).expect("SmolLM2 GGUF tokenizer builds")
}

#[derive(Debug, Deserialize)]
pub struct TokenFixture {
    pub text: String,
    pub ids: Vec<u32>,
    pub ids_with_special: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatFixtures {
    pub bos_token: String,
    pub eos_token: String,
    pub template: String,
    pub chats: Vec<ChatFixture>,
}

#[derive(Debug, Deserialize)]
pub struct ChatFixture {
    pub name: String,
    pub messages: Vec<ChatMessage>,
    pub add_generation_prompt: bool,
    pub rendered: String,
    pub ids: Vec<u32>,
}

fn read_fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read fixture {}: {e} (regenerate with crates/tokenizer/scripts/gen_fixtures.py)",
            path.display()
        )
    })
}

pub fn token_fixtures() -> Vec<TokenFixture> {
    token_fixtures_of("smollm2_tokens.json")
}

/// The token fixtures in `tests/fixtures/<name>`.
pub fn token_fixtures_of(name: &str) -> Vec<TokenFixture> {
    let fixtures: Vec<TokenFixture> =
        serde_json::from_str(&read_fixture(name)).expect("valid token fixtures");
    assert!(fixtures.len() >= 30, "token fixtures look truncated");
    fixtures
}

pub fn chat_fixtures() -> ChatFixtures {
    serde_json::from_str(&read_fixture("smollm2_chat.json")).expect("valid chat fixtures")
}

/// Every fixture whose ids (without, then with special tokens) differ from `tok`'s, described
/// for an assertion message.
pub fn id_mismatches(tok: &Tokenizer, fixtures: &[TokenFixture]) -> Vec<String> {
    let mut mismatches = Vec::new();
    for f in fixtures {
        let ids = tok.encode(&f.text, false).unwrap();
        if ids != f.ids {
            mismatches.push(format!(
                "{:?}\n  ours:      {ids:?}\n  llama.cpp: {:?}",
                f.text, f.ids
            ));
        }
        let with_special = tok.encode(&f.text, true).unwrap();
        if with_special != f.ids_with_special {
            mismatches.push(format!(
                "{:?} (add_special_tokens)\n  ours:      {with_special:?}\n  llama.cpp: {:?}",
                f.text, f.ids_with_special
            ));
        }
    }
    mismatches
}
