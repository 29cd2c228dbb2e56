//! The official `openai` Python package against the server on the default model: chat and
//! completions, streamed and not, logprobs, and errors as the SDK's exception classes.
//!
//! The package lives in a venv at `target/openai-venv` (`.ci/run` creates it); if it is
//! missing, the test creates it with `python3 -m venv` and pip.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{scheduler, TestServer, MODEL};
use minserve_server::ServerOptions;

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
    let python = tokio::task::spawn_blocking(venv_python).await.unwrap();
    let options = ServerOptions {
        api_key: Some("test-key".into()),
        ..common::options()
    };
    let s = TestServer::start(options, scheduler(max_num_seqs)).await;
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
