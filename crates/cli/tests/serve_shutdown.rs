//! Graceful shutdown of the real `minserve serve` process: SIGTERM while a response streams
//! lets that response finish, closes the listener, and exits 0.

mod common;

use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

const MAX_TOKENS: usize = 200;

fn wait_with_timeout(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sigterm_finishes_the_stream_in_flight_refuses_new_connections_and_exits_0() {
    // The default model, which `serve` without --model loads.
    let server = common::serve(&["--shutdown-timeout", "120", "--kv-cache-memory", "64MiB"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let outcome = runtime.block_on(async {
        server.wait_ready(&client, Duration::from_secs(120)).await;
        let response = client
            .post(server.url("/v1/completions"))
            .json(&serde_json::json!({
                "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "ignore_eos": true,
                "stream": true, "stream_options": {"include_usage": true},
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let mut text = String::from_utf8(body.next().await.unwrap().unwrap().to_vec()).unwrap();

        let kill = Command::new("kill")
            .args(["-TERM", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        // The listener closes while the stream is still open.
        let start = Instant::now();
        while TcpStream::connect(&server.addr).is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "still accepting connections after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        while let Some(chunk) = body.next().await {
            text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        }
        text
    });

    let mut child = server.child;
    let status = wait_with_timeout(&mut child, Duration::from_secs(30));
    if status.is_none() {
        let _ = child.kill();
    }
    // The process is gone, so its stderr is closed and the reader thread ends the channel.
    let log: Vec<String> = server.log.iter().collect();
    let log = log.join("\n");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit status; log:\n{log}"
    );

    // The request was in flight when the signal came, and still got every token.
    assert!(
        log.contains("shutting down: waiting up to 120s for 1 in-flight requests"),
        "{log}"
    );
    let events: Vec<&str> = outcome
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{outcome}");
    let usage: serde_json::Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], MAX_TOKENS, "{usage}");
    assert!(log.contains("minserve: shut down"), "{log}");
}
