//! Structured outputs on the default model over HTTP: a constrained request's seeded output
//! does not depend on its batch, an unconstrained one is not changed by constrained
//! neighbours, and every grammar that cannot be followed is a 400 naming its field while the
//! server keeps serving. (The 50-of-50 checks with the official SDK are in
//! openai_python.rs.)

mod common;

use common::{assert_error, scheduler, TestServer};
use futures_util::future::join_all;
use serde_json::{json, Value};

fn pet_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
        },
        "required": ["name", "age"],
        "additionalProperties": false,
    })
}

fn constrained(seed: u64) -> Value {
    json!({
        "messages": [{"role": "user", "content": "Describe a pet as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": pet_schema()}},
        "temperature": 1, "seed": seed, "max_tokens": 60,
    })
}

fn free(seed: u64) -> Value {
    json!({
        "messages": [{"role": "user", "content": "Tell me about cats."}],
        "temperature": 1, "seed": seed, "max_tokens": 24,
    })
}

/// The text and finish reason of a chat completion.
async fn chat(s: &TestServer, body: Value) -> (String, String) {
    let (status, r) = s.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    (
        choice["message"]["content"].as_str().unwrap().to_string(),
        choice["finish_reason"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grammars_keep_batch_invariance_and_bad_grammars_are_refused() {
    let s = TestServer::start(common::options(), scheduler(32)).await;

    // Alone.
    let (json_alone, finish) = chat(&s, constrained(11)).await;
    assert_eq!(finish, "stop", "{json_alone}");
    let pet: Value = serde_json::from_str(&json_alone).unwrap();
    assert!(
        pet["age"].as_i64().is_some_and(|a| (0..=30).contains(&a)),
        "{pet}"
    );
    let (free_alone, _) = chat(&s, free(12)).await;

    // In a busy batch of constrained and unconstrained neighbours.
    let mut bodies = vec![constrained(11), free(12)];
    for i in 0..12 {
        bodies.push(if i % 2 == 0 {
            constrained(100 + i)
        } else {
            free(100 + i)
        });
    }
    let results = join_all(bodies.into_iter().map(|b| chat(&s, b))).await;
    assert_eq!(
        results[0].0, json_alone,
        "a constrained output changed in a batch"
    );
    assert_eq!(
        results[1].0, free_alone,
        "an unconstrained output changed next to grammars"
    );
    for (i, (text, finish)) in results.iter().enumerate().skip(2).step_by(2) {
        assert_eq!(finish, "stop", "{i}: {text}");
        serde_json::from_str::<Value>(text).unwrap_or_else(|e| panic!("{i}: {e}: {text}"));
    }

    // What cannot be followed is refused up front, naming the field.
    let chat_with = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let huge_schema = json!({
        "type": "object",
        "properties": (0..20_000)
            .map(|i| (format!("p{i}"), json!({"type": "string", "pattern": format!("x{i}[a-z]+y")})))
            .collect::<serde_json::Map<_, _>>(),
    });
    for (extra, param) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
        ),
        (
            json!({"response_format": {"type": "json_schema"}}),
            "response_format.json_schema",
        ),
        (
            json!({"structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs.regex",
        ),
        (
            json!({"structured_outputs": {"choice": []}}),
            "structured_outputs.choice",
        ),
        (
            json!({"structured_outputs": {"choice": "red"}}),
            "structured_outputs.choice",
        ),
        (
            json!({"structured_outputs": {"grammar": "start: nowhere"}}),
            "structured_outputs.grammar",
        ),
        (
            json!({"structured_outputs": {"json": "{not json"}}),
            "structured_outputs.json",
        ),
        (
            json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}),
            "structured_outputs",
        ),
        (json!({"structured_outputs": {}}), "structured_outputs"),
        (
            json!({"structured_outputs": {"whitespace_pattern": " "}}),
            "structured_outputs.whitespace_pattern",
        ),
        (
            json!({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"json": huge_schema}}),
            "structured_outputs.json",
        ),
    ] {
        let (status, r) = s
            .post("/v1/chat/completions", chat_with(extra.clone()))
            .await;
        assert_error(status, &r, 400, Some(param));
    }
    let (status, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": "x", "structured_outputs": {"regex": "[z-a]"}}),
        )
        .await;
    assert_error(status, &r, 400, Some("structured_outputs.regex"));

    // Still serving, grammars included.
    let (text, finish) = chat(&s, constrained(5)).await;
    assert_eq!(finish, "stop");
    serde_json::from_str::<Value>(&text).unwrap();
}
