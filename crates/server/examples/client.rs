//! A Rust client for a running `minserve serve`: a chat completion, then the same one streamed.
//!
//! ```text
//! minserve serve &
//! cargo run -p minserve-server --example client -- "Write a haiku about the sea."
//! ```
//!
//! `MINSERVE_BASE_URL` (default `http://127.0.0.1:8000/v1`) and `MINSERVE_API_KEY` apply.

use futures_util::StreamExt;
use serde_json::{json, Value};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = std::env::var("MINSERVE_BASE_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:8000/v1".to_string());
    let key = std::env::var("MINSERVE_API_KEY").unwrap_or_else(|_| "unused".to_string());
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Write a haiku about the sea.".to_string());
    let client = reqwest::Client::new();

    let models: Value = client
        .get(format!("{base}/models"))
        .bearer_auth(&key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let model = models["data"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    let request = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 64,
        "temperature": 0,
    });
    let reply: Value = client
        .post(format!("{base}/chat/completions"))
        .bearer_auth(&key)
        .json(&request)
        .send()
        .await?
        .json()
        .await?;
    if let Some(error) = reply.get("error") {
        anyhow::bail!("server error: {error}");
    }
    println!(
        "{}",
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
    );
    println!("usage: {}\n", reply["usage"]);

    // Streamed: server-sent events, one `data: {json}` per chunk, then `data: [DONE]`.
    let mut request = request;
    request["stream"] = json!(true);
    let response = client
        .post(format!("{base}/chat/completions"))
        .bearer_auth(&key)
        .json(&request)
        .send()
        .await?
        .error_for_status()?;
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(bytes) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&bytes?));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                println!();
                return Ok(());
            }
            let chunk: Value = serde_json::from_str(data)?;
            if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
                print!("{text}");
                use std::io::Write;
                std::io::stdout().flush()?;
            }
        }
    }
    Ok(())
}
