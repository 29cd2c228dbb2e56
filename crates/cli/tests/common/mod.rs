//! Runs the `minserve` binary as a server, as a user would.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `minserve serve` process on a free port.
pub struct Server {
    pub child: Child,
    /// `host:port`, as the server printed it.
    pub addr: String,
    /// The server's stderr after the address line, one line per message. A thread keeps
    /// reading the pipe, so the server never blocks on it, and ends the channel at exit.
    pub log: mpsc::Receiver<String>,
}

/// Starts `minserve serve --port 0 ARGS` and waits for the line with its address.
pub fn serve(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_minserve"))
        .args(["serve", "--port", "0"])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, log) = mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = log
        .recv_timeout(Duration::from_secs(60))
        .expect("the server prints its address");
    let addr = first
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    Server { child, addr, log }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Polls `/health` until the model is loaded; panics after `within`.
    pub async fn wait_ready(&self, client: &reqwest::Client, within: Duration) {
        let start = Instant::now();
        while client
            .get(self.url("/health"))
            .send()
            .await
            .map_or(true, |r| !r.status().is_success())
        {
            assert!(start.elapsed() < within, "not ready after {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs `minserve ARGS` to completion: (success, stdout, stderr).
pub fn minserve(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_minserve"))
        .args(args)
        .output()
        .expect("running minserve");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
