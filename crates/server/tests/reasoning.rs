//! `--reasoning-parser` on the real default model over HTTP. SmolLM2 does not think out loud, so
//! a regular expression (structured outputs) makes it write a `<think>` block and then an
//! answer: real tokens, detokenized and split by the server as a reasoning model's would be.

mod common;

use common::{assert_error, options, scheduler, TestServer, MODEL};
use minserve_server::{ReasoningFormat, ServerOptions};
use serde_json::{json, Value};

const THINK_THEN_ANSWER: &str = "<think>[a-z ]{8,40}</think>\n\n[A-Z][a-z ]{4,30}[.]";

async fn start(parser: Option<ReasoningFormat>) -> TestServer {
    let options = ServerOptions {
        reasoning_parser: parser,
        ..options()
    };
    TestServer::start(options, scheduler(4)).await
}

fn thinking_request(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is two plus two?"}],
        "max_tokens": 64,
        "temperature": 0,
        "structured_outputs": {"regex": THINK_THEN_ANSWER},
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn is_thought(text: &str) -> bool {
    text.len() >= 8 && text.chars().all(|c| c.is_ascii_lowercase() || c == ' ')
}

fn is_answer(text: &str) -> bool {
    text.starts_with(|c: char| c.is_ascii_uppercase()) && text.ends_with('.') && !text.contains('<')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_thinking_comes_apart_from_the_answer_streamed_or_not() {
    let s = start(Some(ReasoningFormat::Qwen3)).await;
    let (status, body) = s
        .post("/v1/chat/completions", thinking_request(json!({})))
        .await;
    assert_eq!(status, 200, "{body}");
    let message = &body["choices"][0]["message"];
    let thought = message["reasoning_content"].as_str().unwrap().to_string();
    let answer = message["content"].as_str().unwrap().to_string();
    assert!(is_thought(&thought), "{message}");
    assert!(is_answer(&answer), "{message}");

    // Streamed: the same split, thinking first, tags never shown.
    let response = s
        .client
        .post(s.url("/v1/chat/completions"))
        .json(&thinking_request(json!({"stream": true})))
        .send()
        .await
        .unwrap();
    let (events, done) = common::read_sse(response).await;
    assert!(done);
    let (mut streamed_thought, mut streamed_answer) = (String::new(), String::new());
    for delta in events.iter().filter_map(|e| e["choices"][0].get("delta")) {
        if let Some(t) = delta["reasoning_content"].as_str() {
            assert!(
                streamed_answer.is_empty(),
                "thinking after the answer started"
            );
            streamed_thought.push_str(t);
        }
        if let Some(t) = delta["content"].as_str() {
            streamed_answer.push_str(t);
        }
    }
    assert_eq!((streamed_thought, streamed_answer), (thought, answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_choose_to_keep_or_drop_the_thinking_and_bad_combinations_are_refused() {
    let s = start(Some(ReasoningFormat::Qwen3)).await;
    // SGLang's separate_reasoning: false keeps it all in content, tags included.
    let (status, body) = s
        .post(
            "/v1/chat/completions",
            thinking_request(json!({"separate_reasoning": false})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let message = &body["choices"][0]["message"];
    assert!(message["content"].as_str().unwrap().starts_with("<think>"));
    assert!(message.get("reasoning_content").is_none(), "{message}");
    // vLLM's include_reasoning: false drops it.
    let (_, body) = s
        .post(
            "/v1/chat/completions",
            thinking_request(json!({"include_reasoning": false})),
        )
        .await;
    let message = &body["choices"][0]["message"];
    assert!(is_answer(message["content"].as_str().unwrap()), "{message}");
    assert!(message.get("reasoning_content").is_none(), "{message}");
    // A model that does not think: all answer, no reasoning.
    let (_, body) = s
        .post(
            "/v1/chat/completions",
            json!({"model": MODEL, "max_tokens": 8, "temperature": 0,
                   "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    let message = &body["choices"][0]["message"];
    assert!(message["reasoning_content"].is_null(), "{message}");
    assert!(!message["content"].as_str().unwrap().is_empty());

    for (extra, field) in [
        (json!({"stream": true, "logprobs": true}), "logprobs"),
        (
            json!({"stream": true, "stream_reasoning": false}),
            "stream_reasoning",
        ),
    ] {
        let (status, body) = s
            .post("/v1/chat/completions", thinking_request(extra))
            .await;
        assert_error(status, &body, 400, Some(field));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_parser_the_thinking_stays_in_the_content() {
    let s = start(None).await;
    let (status, body) = s
        .post("/v1/chat/completions", thinking_request(json!({})))
        .await;
    assert_eq!(status, 200, "{body}");
    let message = &body["choices"][0]["message"];
    assert!(message["content"].as_str().unwrap().starts_with("<think>"));
    assert!(message.get("reasoning_content").is_none(), "{message}");
}
