//! The official `openai` Python package against the server on the default model: chat and
//! completions, streamed and not, logprobs, and errors as the SDK's exception classes.
//!
//! The package lives in a venv at `target/openai-venv` (`.ci/run` creates it); if it is
//! missing, the test creates it with `python3 -m venv` and pip.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{scheduler, TestServer, MODEL};
use minserve_server::{ApiKeys, AppState, ModelSpec, ServerOptions};

fn venv_python() -> PathBuf {
    if let Some(python) = std::env::var_os("MINSERVE_OPENAI_PYTHON") {
        return python.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/openai-venv");
    let python = venv.join("bin/python");
    let has_openai = |p: &PathBuf| {
        Command::new(p)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_openai(&python) {
        let ok = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(&python)
                .args(["-m", "pip", "install", "-q", "openai"])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && has_openai(&python),
            "could not set up the openai package; run: \
             python3 -m venv target/openai-venv && target/openai-venv/bin/pip install openai"
        );
    }
    python
}

/// Runs `script` (in `tests/`) against a server on the default model with `max_num_seqs`;
/// it must print `ok_line`.
async fn run_python_script(script: &str, max_num_seqs: usize, ok_line: &str) {
    let options = ServerOptions {
        api_key: Some("test-key".into()),
        ..common::options()
    };
    let s = TestServer::start(options, scheduler(max_num_seqs)).await;
    run_script_against(&s, script, ok_line).await;
}

/// Runs `script` with the server's `/v1` URL and [`MODEL`] as arguments; it must print
/// `ok_line`.
async fn run_script_against(s: &TestServer, script: &str, ok_line: &str) {
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let base = s.url("/v1");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&base)
        .arg(MODEL)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed:\n{stdout}\n{stderr}",
        script.display()
    );
    assert!(stdout.contains(ok_line), "{stdout}");
    println!("{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client() {
    run_python_script("openai_client.py", 16, "openai client OK").await;
}

/// 50 of 50 seeded samples at temperature 1 follow their schema, regex or choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client_structured_outputs() {
    run_python_script("openai_structured.py", 64, "openai structured OK").await;
}

/// A tool-calling round trip, streamed and not; a named `tool_choice` always calls that tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client_tool_calls() {
    run_python_script("openai_tools.py", 32, "openai tools OK").await;
}

/// The Responses API: `responses.create` (text, messages, instructions), `.parse` with a
/// Pydantic schema, `.stream` reassembling to the non-streamed response, a function-tool round
/// trip, bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client_responses() {
    run_python_script("openai_responses.py", 32, "openai responses OK").await;
}

/// Two models and two tenants through the SDK: each model by name, an unknown one as
/// `NotFoundError`, a tenant over its concurrency as `RateLimitError` with `Retry-After`, a
/// session's second turn cached (`tests/openai_tenants.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_client_models_and_tenants() {
    let state = AppState::with_models(
        common::options(),
        vec![
            ModelSpec {
                name: MODEL.into(),
                aliases: vec!["chat".into()],
            },
            ModelSpec::named("tiny"),
        ],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        "[[tenant]]\nname = \"a\"\nkeys = [\"key-a\"]\nmax_concurrent_requests = 1\n\n\
         [[tenant]]\nname = \"b\"\nkeys = [\"key-b\"]\n",
    )
    .unwrap();
    state.set_api_keys(ApiKeys::load(&keys).unwrap());
    let (real, tiny) = tokio::join!(
        tokio::task::spawn_blocking(|| common::load(scheduler(4))),
        tokio::task::spawn_blocking(|| common::load_synthetic(scheduler(2))),
    );
    state
        .models
        .find(MODEL)
        .unwrap()
        .set_model(real.unwrap().unwrap());
    state
        .models
        .find("tiny")
        .unwrap()
        .set_model(tiny.unwrap().unwrap());
    let s = TestServer::start_with(state).await;
    run_script_against(&s, "openai_tenants.py", "openai tenants OK").await;
}
