//! The real `minserve serve` process with several models (`--config`), tenants' API keys
//! (`--api-keys`) reloaded on SIGHUP, and a config file with a mistake refused at its line.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const CONFIG: &str = r#"
kv_cache_memory = "64MiB"

[[model]]
model = "synthetic:tiny"
name = "tiny-a"
aliases = ["fast"]
kv_cache_share = 0.25

[[model]]
model = "synthetic:tiny"
name = "tiny-b"
max_num_seqs = 2
"#;

const KEYS: &str = r#"
[[tenant]]
name = "alice"
keys = ["key-alice"]

[[tenant]]
name = "bob"
keys = ["key-bob"]
weight = 2
"#;

async fn status(client: &reqwest::Client, url: &str, key: &str, model: &str) -> (u16, Value) {
    let r = client
        .post(url)
        .bearer_auth(key)
        .json(&json!({"model": model, "prompt": "Hello", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[test]
fn two_models_from_a_config_file_and_keys_reloaded_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("models.toml");
    let keys = dir.path().join("keys.toml");
    std::fs::write(&config, CONFIG).unwrap();
    std::fs::write(&keys, KEYS).unwrap();
    let mut server = common::serve(&[
        "--config",
        config.to_str().unwrap(),
        "--api-keys",
        keys.to_str().unwrap(),
    ]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    runtime.block_on(async {
        server.wait_ready(&client, Duration::from_secs(60)).await;
        let completions = server.url("/v1/completions");

        let models: Value = client
            .get(server.url("/v1/models"))
            .bearer_auth("key-alice")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let cards = models["data"].as_array().unwrap();
        assert_eq!(cards.len(), 2, "{models}");
        assert_eq!(cards[0]["id"], "tiny-a");
        assert_eq!(cards[1]["max_num_seqs"], 2, "{models}");
        // 64 MiB split 1/4 : 3/4, at 256 bytes per token of the tiny model.
        let a = cards[0]["kv_cache_tokens"].as_u64().unwrap();
        let b = cards[1]["kv_cache_tokens"].as_u64().unwrap();
        assert!(b > 2 * a, "{a} vs {b}");

        let (code, body) = status(&client, &completions, "key-alice", "fast").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["model"], "tiny-a");
        let (code, body) = status(&client, &completions, "key-bob", "tiny-b").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            status(&client, &completions, "key-eve", "tiny-b").await.0,
            401
        );

        // bob's key is revoked by editing the file and sending SIGHUP.
        std::fs::write(&keys, KEYS.replace("key-bob", "key-bob-2")).unwrap();
        let hup = Command::new("kill")
            .args(["-HUP", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
        let start = Instant::now();
        while status(&client, &completions, "key-bob", "tiny-b").await.0 != 401 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "bob's key still works"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            status(&client, &completions, "key-bob-2", "tiny-b").await.0,
            200
        );
        assert_eq!(
            status(&client, &completions, "key-alice", "tiny-a").await.0,
            200
        );
    });
    let _ = server.child.kill();
    let _ = server.child.wait();
}

/// `serve --config` with `CONFIG` edited (`from` replaced by `to`): it must fail; its stderr.
fn serve_refuses_config(from: &str, to: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("models.toml");
    std::fs::write(&config, CONFIG.replace(from, to)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_minserve"))
        .args(["serve", "--port", "0", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_with_its_line() {
    let stderr = serve_refuses_config("max_num_seqs", "max_num_seq");
    assert!(
        stderr.contains("models.toml:13:") && stderr.contains("max_num_seq"),
        "{stderr}"
    );
}

#[test]
fn kv_caches_larger_than_the_memory_available_are_refused_at_start() {
    let stderr = serve_refuses_config("\"64MiB\"", "\"4096GiB\"");
    assert!(
        stderr.contains("the KV caches of the 2 models take 4096.00 GiB together")
            && stderr.contains("tiny-a: 1048576 MiB")
            && stderr.contains("memory available"),
        "{stderr}"
    );
}

#[test]
fn repeated_model_flags_serve_each_model_under_its_name() {
    let mut server = common::serve(&[
        "--model",
        "synthetic:tiny=one",
        "--model",
        "synthetic:tiny=two",
        "--kv-cache-memory",
        "32MiB",
    ]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    runtime.block_on(async {
        server.wait_ready(&client, Duration::from_secs(60)).await;
        let models: Value = client
            .get(server.url("/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<&str> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["one", "two"], "{models}");
        assert_eq!(
            models["data"][0]["kv_cache_tokens"], models["data"][1]["kv_cache_tokens"],
            "an equal split: {models}"
        );
        for model in ["one", "two"] {
            let (code, body) = status(&client, &server.url("/v1/completions"), "", model).await;
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["model"], model);
        }
    });
    let _ = server.child.kill();
    let _ = server.child.wait();
}
