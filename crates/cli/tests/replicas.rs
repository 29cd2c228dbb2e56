//! `scripts/replicas`: minserve replicas behind the vLLM router (PyPI `vllm-router`), driven by
//! the openai SDK (`router_client.py`): requests through the router reach every replica, a
//! replica killed in the middle of a stream ends that stream instead of hanging it, and the
//! router answers the next requests from the replica left. docs/scale-out.md.
//!
//! The router's venv (`target/router-venv`, with vllm-router and the openai package) is made
//! by the test when missing (`.ci/run` makes it ahead).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A port such that it and the next `span - 1` ones, and the router's metrics port
/// (`port + 1000`, see the script), are free now.
fn free_ports(span: u16) -> u16 {
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut base = 20_000 + probe.local_addr().unwrap().port() % 20_000;
    drop(probe);
    loop {
        let needed = (base..base + span).chain([base + 1000]);
        if needed
            .map(|p| TcpListener::bind(("127.0.0.1", p)))
            .all(|l| l.is_ok())
        {
            return base;
        }
        base += span + 1;
    }
}

/// The router's venv, with the openai package for the client: made (or completed) here when
/// missing, as the script would make it.
fn router_venv_with_openai() -> PathBuf {
    let venv = repo_root().join("target/router-venv");
    let python = venv.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", "import openai, vllm_router"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ready() {
        let made = (python.exists()
            || Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .is_ok_and(|s| s.success()))
            && Command::new(&python)
                .args(["-m", "pip", "install", "-q", "vllm-router", "openai"])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            made && ready(),
            "could not set up target/router-venv (vllm-router and openai from PyPI)"
        );
    }
    python
}

#[test]
fn replicas_behind_the_vllm_router_survive_a_replica_killed_mid_stream() {
    let python = router_venv_with_openai();
    let router_port = free_ports(1);
    let worker_port = free_ports(2);
    let mut replicas = Command::new(repo_root().join("scripts/replicas"))
        .args(["--replicas", "2", "--policy", "round_robin"])
        .args(["--port", &router_port.to_string()])
        .args(["--worker-port", &worker_port.to_string()])
        .args(["--", "--kv-cache-memory", "64MiB"])
        .env("MINSERVE_BIN", env!("CARGO_BIN_EXE_minserve"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = replicas.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // "replicas: replica PID on URL" per replica, then the router's line.
    let mut workers = Vec::new();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(600))
            .expect("scripts/replicas did not come up");
        if let Some(rest) = line.strip_prefix("replicas: replica ") {
            let (pid, url) = rest.split_once(" on ").unwrap();
            workers.push(format!("{url}={pid}"));
        }
        if line.contains("behind the vllm-router") {
            break;
        }
    }
    assert_eq!(workers.len(), 2);

    let output = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/router_client.py"))
        .arg(format!("http://127.0.0.1:{router_port}"))
        .arg("smollm2-135m-instruct")
        .args(&workers)
        .output()
        .unwrap();
    Command::new("kill")
        .args(["-TERM", &replicas.id().to_string()])
        .status()
        .unwrap();
    replicas.wait().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success() && stdout.contains("router client OK"),
        "router_client.py failed:\n{stdout}\n{stderr}"
    );
    // Stopping the script stops its router and the replica left: nothing listens any more.
    for port in [router_port, worker_port, worker_port + 1] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still open after scripts/replicas was stopped"
        );
    }
}
