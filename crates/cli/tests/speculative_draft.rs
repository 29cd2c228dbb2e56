//! `--speculative draft:MODEL` from the command line: the draft model is loaded beside the
//! target and its drafts are verified through a real server; a draft whose tokenizer is not the target's, and a
//! `draft:` without a model, are refused before anything runs.

mod common;

use std::time::Duration;

use common::minserve;

const MODEL: &str = "smollm2-135m-instruct";

/// The greedy text of a chat request to `minserve serve ARGS`, and the server's
/// `(drafted, accepted)` speculative counters after it.
fn chat_once(args: &[&str]) -> (String, (u64, u64)) {
    let mut server = common::serve(args);
    let client = reqwest::Client::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let answer = runtime.block_on(async {
        server.wait_ready(&client, Duration::from_secs(120)).await;
        let body = serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a short story about a dragon who learns to cook."}],
            "max_tokens": 48,
            "temperature": 0,
        });
        let answer: serde_json::Value = client
            .post(server.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let metrics = client
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let counter = |name: &str| -> u64 {
            metrics
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
        };
        let text = answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("{answer}"))
            .to_string();
        (
            text,
            (
                counter("minserve_spec_decode_num_draft_tokens_total"),
                counter("minserve_spec_decode_num_accepted_tokens_total"),
            ),
        )
    });
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    answer
}

/// The default model drafting for itself through `serve`: the greedy text is the plain
/// server's, and every draft is accepted (the draft is the target, and a row's logits do not
/// depend on its batch).
#[test]
fn serve_with_a_draft_model_gives_the_plain_greedy_text() {
    let (plain, (drafted, _)) = chat_once(&["--model", MODEL]);
    assert_eq!(drafted, 0);
    let draft = format!("draft:{MODEL}");
    let (speculated, (drafted, accepted)) = chat_once(&[
        "--model",
        MODEL,
        "--speculative",
        &draft,
        "--draft-kv-cache-mib",
        "16",
    ]);
    assert_eq!(speculated, plain);
    assert!(drafted >= 20, "{drafted} drafted");
    assert_eq!(accepted, drafted);
}

#[test]
fn a_draft_model_with_another_tokenizer_or_none_is_refused() {
    let (ok, _, stderr) = minserve(&[
        "bench",
        "throughput",
        "--model",
        MODEL,
        "--num-prompts",
        "1",
        "--speculative",
        "draft:synthetic:tiny",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("draft model") && stderr.contains("tokenizer"),
        "{stderr}"
    );
    let (ok, _, stderr) = minserve(&[
        "bench",
        "throughput",
        "--model",
        MODEL,
        "--speculative",
        "draft:",
    ]);
    assert!(!ok);
    assert!(stderr.contains("needs a model"), "{stderr}");
}
