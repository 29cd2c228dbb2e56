//! Gemma's tool-call format on the real gemma3-270m: its chat template (Gemma's turns, no
//! tools) selects the format; the tools are described in Gemma's words, earlier calls and
//! results are written as `tool_code` / `tool_output` blocks, and a forced (named or required)
//! tool choice makes the model write a `tool_code` Python call that minserve reads back into a
//! valid OpenAI call, on chat and the Responses API.

mod common;

use common::{load_named, scheduler, TestServer};
use serde_json::{json, Value};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city"],
                "additionalProperties": false,
            },
        }},
        {"type": "function", "function": {
            "name": "add",
            "description": "Adds two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        }},
    ])
}

/// Tool `i` in the Responses API's flat shape.
fn flat_tool(i: usize) -> Value {
    let mut tool = tools()[i]["function"].clone();
    tool["type"] = json!("function");
    tool
}

/// A call of `name` whose arguments satisfy its schema.
fn check_call(call: &Value, name: &str) {
    assert_eq!(call["type"], "function", "{call}");
    assert_eq!(call["function"]["name"], name, "{call}");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{call}: {e}"));
    match name {
        "get_weather" => {
            let city = args["city"].as_str().expect("a city");
            assert!(city.chars().count() <= 20, "{args}");
            if let Some(unit) = args.get("unit") {
                assert!(unit == "celsius" || unit == "fahrenheit", "{args}");
            }
            if let Some(days) = args.get("days") {
                assert!((1..=7).contains(&days.as_i64().unwrap()), "{args}");
            }
        }
        _ => assert!(args["a"].is_i64() && args["b"].is_i64(), "{args}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma_writes_tool_code_calls_that_are_read_back() {
    let s = TestServer::start_loaded(common::options(), || {
        load_named("gemma3-270m", scheduler(16))
    })
    .await;

    // A named choice at temperature 1: always a valid call of that function.
    let requests = (0..4).map(|seed| {
        let name = ["get_weather", "add"][seed % 2];
        let body = json!({
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": tools(),
            "tool_choice": {"type": "function", "function": {"name": name}},
            "temperature": 1, "seed": seed, "max_tokens": 60,
        });
        let s = &s;
        async move { (name, s.post("/v1/chat/completions", body).await) }
    });
    for (name, (status, r)) in futures_util::future::join_all(requests).await {
        assert_eq!(status, 200, "{r}");
        let choice = &r["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{r}");
        check_call(&calls[0], name);
        println!("named {name}: {}", calls[0]["function"]["arguments"]);
    }

    // `required`, streamed: the call comes as delta.tool_calls, nothing in content.
    let response = s
        .client
        .post(s.url("/v1/chat/completions"))
        .json(&json!({
            "messages": [{"role": "user", "content": "Add 2 and 3."}],
            "tools": tools(), "tool_choice": "required", "parallel_tool_calls": false,
            "temperature": 0, "max_tokens": 60, "stream": true,
        }))
        .send()
        .await
        .unwrap();
    let (events, _) = common::read_sse(response).await;
    let mut name = String::new();
    let mut arguments = String::new();
    for event in &events {
        let delta = &event["choices"][0]["delta"];
        assert!(
            delta["content"].as_str().unwrap_or("").is_empty(),
            "{event}"
        );
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            name.push_str(call["function"]["name"].as_str().unwrap_or(""));
            arguments.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    check_call(
        &json!({"type": "function", "function": {"name": name, "arguments": arguments}}),
        &name,
    );

    // The Responses API, same format.
    let (status, r) = s
        .post(
            "/v1/responses",
            json!({"input": "Weather in Rome?", "tools": [flat_tool(0)],
                   "tool_choice": "required", "temperature": 0, "max_output_tokens": 60}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let call = &r["output"][0];
    assert_eq!(call["type"], "function_call", "{r}");
    check_call(
        &json!({"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}),
        "get_weather",
    );

    // A round trip's prompt: the tools in Gemma's words, the call as tool_code, the result as
    // tool_output, in alternating turns.
    let (status, t) = s
        .post(
            "/tokenize",
            json!({"messages": [
                {"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
            ], "tools": tools()}),
        )
        .await;
    assert_eq!(status, 200, "{t}");
    let (_, d) = s.post("/detokenize", json!({"tokens": t["tokens"]})).await;
    let prompt = d["prompt"].as_str().unwrap();
    for part in [
        "```tool_code",
        "get_weather(city=\"Paris\")",
        "<start_of_turn>user\n```tool_output\n18 degrees\n```",
        "<start_of_turn>model\n",
    ] {
        assert!(prompt.contains(part), "{part:?} not in {prompt:?}");
    }
}
