//! The Responses API (`POST /v1/responses`) on the default model over HTTP: the streamed
//! events in OpenAI's order, numbered, adding up to the response that was not streamed; a
//! response cut off at `max_output_tokens` is `incomplete`; every bad input is a 400 naming its
//! field and the server keeps serving. (The official SDK's `responses.create`, `.parse` and
//! `.stream` and a function-tool round trip are in openai_python.rs.)

mod common;

use common::{assert_error, scheduler, TestServer, MODEL};
use serde_json::{json, Value};

/// The events of a streamed response, with their SSE `event:` names.
async fn stream(s: &TestServer, mut body: Value) -> Vec<(String, Value)> {
    body["stream"] = json!(true);
    let response = reqwest::Client::new()
        .post(s.url("/v1/responses"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let mut events = Vec::new();
    let mut name = None;
    for line in text.lines() {
        if let Some(event) = line.strip_prefix("event: ") {
            name = Some(event.to_string());
        } else if let Some(data) = line.strip_prefix("data: ") {
            let value: Value = serde_json::from_str(data).unwrap();
            events.push((name.take().expect("an event name"), value));
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_in_order_and_match_the_single_body() {
    let s = TestServer::start(common::options(), scheduler(8)).await;
    let request = json!({
        "model": MODEL,
        "instructions": "You are terse.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}],
        "temperature": 0, "max_output_tokens": 12,
    });
    let (status, whole) = s.post("/v1/responses", request.clone()).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "response");
    assert!(whole["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(whole["instructions"], "You are terse.");
    let usage = &whole["usage"];
    let output_tokens = usage["output_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&output_tokens), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["input_tokens"].as_u64().unwrap() + output_tokens
    );
    assert!(usage["input_tokens_details"]["cached_tokens"].is_u64());
    let message = &whole["output"][0];
    assert_eq!(
        (&message["type"], &message["role"]),
        (&json!("message"), &json!("assistant"))
    );
    let text = message["content"][0]["text"].as_str().unwrap().to_string();
    match whole["status"].as_str().unwrap() {
        "completed" => assert!(whole["incomplete_details"].is_null()),
        "incomplete" => {
            assert_eq!(output_tokens, 12);
            assert_eq!(whole["incomplete_details"]["reason"], "max_output_tokens");
        }
        other => panic!("status {other}"),
    }

    let events = stream(&s, request).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    for (i, (kind, event)) in events.iter().enumerate() {
        assert_eq!(event["type"], kind.as_str());
        assert_eq!(event["sequence_number"], i, "{event}");
    }
    let deltas = kinds
        .iter()
        .filter(|k| **k == "response.output_text.delta")
        .count();
    let mut want = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    want.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    want.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        whole["status"]
            .as_str()
            .map(|s| {
                if s == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                }
            })
            .unwrap(),
    ]);
    assert_eq!(kinds, want);
    let streamed: String = events
        .iter()
        .filter(|(k, _)| k == "response.output_text.delta")
        .map(|(_, e)| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    let last = &events.last().unwrap().1["response"];
    assert_eq!(last["output"][0]["content"][0]["text"], text.as_str());
    assert_eq!(last["usage"]["output_tokens"], output_tokens);
    assert_eq!(events[0].1["response"]["status"], "in_progress");

    // Cut off: incomplete, and so is its message.
    let (status, cut) = s
        .post(
            "/v1/responses",
            json!({"input": "Write a long story about a dragon.", "max_output_tokens": 3,
                   "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{cut}");
    assert_eq!(cut["status"], "incomplete");
    assert_eq!(cut["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(cut["output"][0]["status"], "incomplete");
    assert_eq!(cut["usage"]["output_tokens"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_responses_requests_are_400s_naming_the_field() {
    let s = TestServer::start(common::options(), scheduler(4)).await;
    let tool = json!({"type": "function", "name": "add", "parameters": {"type": "object"}});
    let call =
        json!({"type": "function_call", "call_id": "call_1", "name": "add", "arguments": "{}"});
    for (body, param) in [
        (json!({}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": 3}), "input"),
        (
            json!({"input": "hi", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (
            json!({"input": "hi", "conversation": "conv_1"}),
            "conversation",
        ),
        (
            json!({"input": "hi", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (json!({"input": "hi", "max_tokens": 5}), "max_tokens"),
        (json!({"input": "hi", "n": 2}), "n"),
        (json!({"input": "hi", "background": true}), "background"),
        (
            json!({"input": "hi", "include": ["message.output_text.logprobs"]}),
            "include",
        ),
        (json!({"input": "hi", "top_logprobs": 3}), "top_logprobs"),
        (json!({"input": "hi", "truncation": "auto"}), "truncation"),
        (
            json!({"input": "hi", "reasoning": {"effort": "low"}}),
            "reasoning",
        ),
        (
            json!({"input": "hi", "text": {"format": {"type": "yaml"}}}),
            "text.format.type",
        ),
        (
            json!({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "frobnicate"}}}}),
            "text.format",
        ),
        (
            json!({"input": "hi", "text": {"verbosity": "low"}}),
            "text.verbosity",
        ),
        (
            json!({"input": [{"role": "robot", "content": "hi"}]}),
            "input[0].role",
        ),
        (json!({"input": [{"role": "user"}]}), "input[0].content"),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
            "input[0].content[0]",
        ),
        (
            json!({"input": [{"type": "reasoning", "summary": []}]}),
            "input[0].type",
        ),
        (json!({"input": ["hi"]}), "input[0]"),
        (
            json!({"input": [{"role": "user", "content": "hi"}, {"type": "function_call", "call_id": "c", "name": "add", "arguments": "{not json"}]}),
            "input[1].arguments",
        ),
        (
            json!({"input": [{"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "nope", "output": "1"}], "tools": [tool]}),
            "input[1].call_id",
        ),
        (
            json!({"input": [{"role": "user", "content": "hi"}, call, {"type": "function_call_output", "output": "1"}]}),
            "input[2].call_id",
        ),
        (
            json!({"input": "hi", "tools": [{"type": "web_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"input": "hi", "tools": [{"type": "function", "name": "bad name"}]}),
            "tools[0].name",
        ),
        (
            json!({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "frobnicate"}}]}),
            "tools[0].parameters",
        ),
        (
            json!({"input": "hi", "tools": [tool], "tool_choice": {"type": "function", "name": "absent"}}),
            "tool_choice",
        ),
        (json!({"input": "hi", "frobnicate": 1}), "frobnicate"),
    ] {
        let (status, r) = s.post("/v1/responses", body.clone()).await;
        assert_error(status, &r, 400, Some(param));
    }
    // Accepted without effect: `metadata`, echoed.
    let (status, r) = s
        .post(
            "/v1/responses",
            json!({"input": "hi", "metadata": {"a": "b"}, "max_output_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["store"], true);
    assert_eq!(r["metadata"], json!({"a": "b"}));

    // `previous_response_id` continues a stored response: its conversation comes first.
    let first_id = r["id"].as_str().unwrap();
    let first_input = r["usage"]["input_tokens"].as_u64().unwrap();
    let (status, next) = s
        .post(
            "/v1/responses",
            json!({"input": "and again", "previous_response_id": first_id, "max_output_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(next["previous_response_id"], first_id);
    assert!(
        next["usage"]["input_tokens"].as_u64().unwrap() > first_input + 2,
        "{next}"
    );
    // Not kept with `store: false`.
    let (_, unkept) = s
        .post(
            "/v1/responses",
            json!({"input": "hi", "store": false, "max_output_tokens": 2}),
        )
        .await;
    assert_eq!(unkept["store"], false);
    let (status, r) = s
        .post(
            "/v1/responses",
            json!({"input": "hi", "previous_response_id": unkept["id"]}),
        )
        .await;
    assert_error(status, &r, 400, Some("previous_response_id"));
}
