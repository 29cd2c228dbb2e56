//! The OpenAI routes end to end on the default model: shapes, parameters, streaming.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{read_sse, scheduler, TestServer, MODEL};
use serde_json::{json, Value};

fn text_of(v: &Value, i: usize) -> &str {
    v["choices"][i]["text"].as_str().unwrap()
}

/// The id of the first token of `text`, without special tokens.
async fn first_token(s: &TestServer, text: &str) -> u64 {
    let (_, t) = s
        .post(
            "/tokenize",
            json!({"prompt": text, "add_special_tokens": false}),
        )
        .await;
    t["tokens"][0].as_u64().unwrap()
}

/// A chat request whose greedy answer meets one of its stop strings.
fn counting_with_stops() -> Value {
    json!({"messages": [{"role": "user", "content": "Count: 1, 2, 3, 4"}],
           "max_tokens": 30, "temperature": 0, "stop": [" ", ",", "\n", "."]})
}

fn content_of(v: &Value, i: usize) -> &str {
    v["choices"][i]["message"]["content"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions() {
    let s = TestServer::start(common::options(), scheduler(64)).await;

    // Shape, usage, finish_reason length, content as text parts.
    let (status, r) = s
        .post(
            "/v1/chat/completions",
            json!({
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
                ],
                "max_tokens": 4, "temperature": 0, "user": "tester", "priority": 3,
            }),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], MODEL);
    assert!(r["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &r["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "length");
    assert!(choice["logprobs"].is_null());
    assert_eq!(r["usage"]["completion_tokens"], 4);
    let prompt_tokens = r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 5);
    assert_eq!(r["usage"]["total_tokens"], prompt_tokens + 4);
    assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let greedy = content_of(&r, 0).to_string();
    assert!(!greedy.is_empty());

    // The same conversation as plain strings renders the same prompt.
    let (_, r2) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hi"},
            ], "max_completion_tokens": 4, "temperature": 0}),
        )
        .await;
    assert_eq!(content_of(&r2, 0), greedy);
    assert_eq!(r2["usage"]["prompt_tokens"], prompt_tokens);
    // Its prompt's full blocks come from the prefix cache.
    let cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached > 0 && cached < prompt_tokens,
        "{cached} of {prompt_tokens}"
    );

    // n, seed (reproducible), logprobs + top_logprobs.
    let body = json!({
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 3, "n": 2, "seed": 42, "temperature": 1.0, "top_p": 0.9, "top_k": 40,
        "min_p": 0.01, "presence_penalty": 0.5, "frequency_penalty": 0.5,
        "repetition_penalty": 1.1, "logprobs": true, "top_logprobs": 2,
    });
    let (status, a) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = s.post("/v1/chat/completions", body).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    for i in 0..2 {
        assert_eq!(a["choices"][i]["index"], i);
        assert_eq!(content_of(&a, i), content_of(&b, i), "seeded runs differ");
        let lp = a["choices"][i]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(lp.len(), 3);
        for entry in lp {
            assert!(entry["token"].is_string());
            assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
            assert!(entry["bytes"].is_array());
            assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 2);
        }
    }
    assert_eq!(a["usage"]["completion_tokens"], 6);

    // Stop strings end with finish_reason "stop" and are not emitted.
    let (_, r) = s.post("/v1/chat/completions", counting_with_stops()).await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    let text = content_of(&r, 0);
    assert!(!text.contains([' ', ',', '\n', '.']), "{text:?}");

    // Streaming: role first, the same greedy text, finish chunk, usage chunk, [DONE].
    let response = s
        .client
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say hi"},
            ], "max_tokens": 4, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (events, done) = read_sse(response).await;
    assert!(done);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let id = events[0]["id"].as_str().unwrap();
    let mut streamed = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["id"], id);
        assert!(e["usage"].is_null());
        let c = &e["choices"][0];
        streamed += c["delta"]["content"].as_str().unwrap_or("");
        if !c["finish_reason"].is_null() {
            finish = Some(c["finish_reason"].clone());
        }
    }
    assert_eq!(streamed, greedy);
    assert_eq!(finish.unwrap(), "length");
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 4);
    assert_eq!(last["usage"]["prompt_tokens"], prompt_tokens);

    // Without include_usage there is no usage chunk.
    let response = s
        .client
        .post(s.url("/v1/chat/completions"))
        .json(
            &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                      "stream": true, "logprobs": true}),
        )
        .send()
        .await
        .unwrap();
    let (events, done) = read_sse(response).await;
    assert!(done);
    assert!(events.iter().all(|e| e.get("usage").is_none()));
    assert!(events
        .iter()
        .any(|e| e["choices"][0]["logprobs"]["content"].is_array()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions() {
    let s = TestServer::start(common::options(), scheduler(64)).await;
    let prompt = "The capital of France is";

    let (status, r) = s
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 3);
    let greedy = text_of(&r, 0).to_string();

    // The same prompt as token ids (from /tokenize) gives the same text.
    let (status, t) = s
        .post("/tokenize", json!({"prompt": prompt, "model": MODEL}))
        .await;
    assert_eq!(status, 200, "{t}");
    let ids = t["tokens"].clone();
    assert_eq!(t["count"], ids.as_array().unwrap().len());
    assert_eq!(r["usage"]["prompt_tokens"], t["count"]);
    let (_, d) = s.post("/detokenize", json!({"tokens": ids})).await;
    assert_eq!(d["prompt"], prompt);
    let (_, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": ids, "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(text_of(&r, 0), greedy);

    // Several prompts (strings, then token-id lists) x n: choices indexed prompt * n + i.
    let (_, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": [prompt, "One, two,"], "max_tokens": 2, "n": 2, "temperature": 0}),
        )
        .await;
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    assert_eq!(text_of(&r, 0), text_of(&r, 1)); // greedy
    assert!(greedy.starts_with(text_of(&r, 0)));
    assert_eq!(r["usage"]["completion_tokens"], 8);
    let (_, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": [ids, [28, 29, 30]], "max_tokens": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(r["choices"].as_array().unwrap().len(), 2);
    assert!(greedy.starts_with(text_of(&r, 0)));

    // echo: the prompt, then the completion; logprobs cover the generated tokens, with offsets
    // into the choice's text.
    let (status, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": true}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert!(text_of(&r, 0).starts_with(prompt));
    assert!(greedy.starts_with(&text_of(&r, 0)[prompt.len()..]));
    assert!(r["choices"][0]["logprobs"].is_null());
    let (_, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 3}),
        )
        .await;
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3, "{lp}");
    let joined: String = (0..3).map(|i| lp["tokens"][i].as_str().unwrap()).collect();
    assert_eq!(joined, greedy);
    for i in 0..3 {
        assert!(lp["token_logprobs"][i].as_f64().unwrap() <= 0.0);
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 3, "{lp}");
    }
    let first_len = lp["tokens"][0].as_str().unwrap().len();
    assert_eq!(
        lp["text_offset"],
        json!([
            0,
            first_len,
            first_len + lp["tokens"][1].as_str().unwrap().len()
        ])
    );

    // echo with max_tokens 0: the prompt alone, the engine untouched, nothing generated.
    // The engine publishes its counters after each step, which may be just after the last
    // response went out: wait for the step that finished it.
    s.wait_idle(Duration::from_secs(2)).await;
    let generated_before = s.metric("minserve_generation_tokens_total").await;
    let (status, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": [prompt, prompt], "max_tokens": 0, "echo": true, "n": 2}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"].as_array().unwrap().len(), 4);
    for i in 0..4 {
        assert_eq!(text_of(&r, i), prompt, "{r}");
        assert_eq!(r["choices"][i]["finish_reason"], "length");
    }
    assert_eq!(r["usage"]["completion_tokens"], 0);
    assert_eq!(
        r["usage"]["prompt_tokens"],
        t["count"].as_u64().unwrap() * 2
    );
    let (_, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": ids, "max_tokens": 0, "echo": true}),
        )
        .await;
    assert_eq!(text_of(&r, 0), prompt, "{r}");
    let response = s
        .client
        .post(s.url("/v1/completions"))
        .json(
            &json!({"prompt": prompt, "max_tokens": 0, "echo": true, "stream": true,
                      "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    let (events, done) = read_sse(response).await;
    assert!(done);
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0]["choices"][0]["text"], prompt);
    assert_eq!(events[1]["choices"][0]["finish_reason"], "length");
    assert_eq!(events[2]["usage"]["completion_tokens"], 0);
    assert_eq!(
        s.metric("minserve_generation_tokens_total").await,
        generated_before
    );

    // logit_bias forces a token; ignore_eos + min_tokens run to max_tokens.
    let forced = first_token(&s, " hello").await;
    let (_, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 3, "logit_bias": {forced.to_string(): 100},
                   "ignore_eos": true, "min_tokens": 3, "seed": 1}),
        )
        .await;
    let (_, d) = s
        .post("/detokenize", json!({"tokens": [forced, forced, forced]}))
        .await;
    assert_eq!(text_of(&r, 0), d["prompt"].as_str().unwrap(), "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length");

    // Stop string.
    let (_, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": "1, 2, 3, 4,", "max_tokens": 10, "temperature": 0, "stop": ","}),
        )
        .await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert!(!text_of(&r, 0).contains(','));

    // Streaming with echo and usage.
    let response = s
        .client
        .post(s.url("/v1/completions"))
        .json(
            &json!({"prompt": prompt, "max_tokens": 3, "temperature": 0, "stream": true,
                      "echo": true, "stream_options": {"include_usage": true}}),
        )
        .send()
        .await
        .unwrap();
    let (events, done) = read_sse(response).await;
    assert!(done);
    let mut text = String::new();
    let mut ids = HashSet::new();
    for e in &events[..events.len() - 1] {
        assert_eq!(e["object"], "text_completion");
        ids.insert(e["id"].as_str().unwrap().to_string());
        text += e["choices"][0]["text"].as_str().unwrap();
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(text, format!("{prompt}{greedy}"));
    assert_eq!(
        events[events.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 3);

    // Streamed logprobs: one token each, offsets running on through the text.
    let response = s
        .client
        .post(s.url("/v1/completions"))
        .json(
            &json!({"prompt": prompt, "max_tokens": 3, "temperature": 0, "stream": true,
                      "logprobs": 0}),
        )
        .send()
        .await
        .unwrap();
    let (events, _) = read_sse(response).await;
    let mut offsets = Vec::new();
    let mut text = String::new();
    for e in &events {
        let c = &e["choices"][0];
        if let Some(lp) = c["logprobs"].as_object() {
            assert_eq!(lp["tokens"].as_array().unwrap().len(), 1);
            assert!(lp["top_logprobs"][0].as_object().unwrap().is_empty());
            offsets.push(lp["text_offset"][0].as_u64().unwrap() as usize);
            assert_eq!(offsets.last(), Some(&text.len()));
            text += lp["tokens"][0].as_str().unwrap();
        }
    }
    assert_eq!(offsets.len(), 3);
    assert_eq!(text, greedy);

    // Chat-formatted tokenize.
    let (status, t) = s
        .post(
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(t["count"].as_u64().unwrap() > 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_metrics_openapi() {
    let s = TestServer::start_synthetic(common::options(), scheduler(64)).await;
    let (status, body) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");
    let (status, _) = s.get(&format!("/v1/models/{MODEL}")).await;
    assert_eq!(status, 200);
    let (status, _) = s.get("/v1/models/other").await;
    assert_eq!(status, 404);

    let (status, r) = s
        .post(
            "/v1/completions",
            json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let (status, page) = s.get("/metrics").await;
    assert_eq!(status, 200);
    // Every series is labelled with its model; without the label, the names as before.
    let page = common::unlabelled(&page);
    for name in [
        "minserve_num_requests_running",
        "minserve_num_requests_waiting",
        "minserve_kv_cache_usage_ratio",
        "minserve_prefix_cache_hits_total",
        "minserve_prefix_cache_queries_total",
        "minserve_prompt_tokens_total",
        "minserve_generation_tokens_total",
        "minserve_num_preemptions_total",
    ] {
        assert!(page.contains(&format!("\n{name} ")), "{name} missing");
    }
    for h in [
        "minserve_time_to_first_token_seconds",
        "minserve_time_per_output_token_seconds",
        "minserve_e2e_request_latency_seconds",
        "minserve_request_queue_time_seconds",
    ] {
        assert!(page.contains(&format!("# TYPE {h} histogram")), "{h}");
        assert_eq!(s.metric(&format!("{h}_count")).await, 1.0, "{h}");
        assert!(
            page.contains(&format!("{h}_bucket{{le=\"+Inf\"}} 1")),
            "{h}"
        );
    }
    s.metric_until("minserve_generation_tokens_total", |v| v == 3.0)
        .await;
    s.metric_until("minserve_prompt_tokens_total", |v| v >= 1.0)
        .await;
    assert_eq!(
        s.metric("minserve_request_success_total{finished_reason=\"length\"}")
            .await,
        1.0
    );

    // The same prompt again hits the prefix cache only for full blocks; a long shared prompt
    // does.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    for _ in 0..2 {
        s.post("/v1/completions", json!({"prompt": long, "max_tokens": 1}))
            .await;
    }
    s.metric_until("minserve_prefix_cache_hits_total", |v| v >= 16.0)
        .await;

    let (status, body) = s.get("/openapi.json").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }
}

/// What the vLLM router reads of a worker (docs/scale-out.md): `/get_load`, the render route,
/// `vllm:` metrics, and requests as it forwards them, with SGLang's fields added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_llm_routers_read_of_a_worker() {
    let s = TestServer::start_synthetic(common::options(), scheduler(64)).await;
    let (status, load) = s.get("/get_load").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&load).unwrap(),
        json!({"load": 0})
    );

    let messages = json!([{"role": "user", "content": "hi there"}]);
    let (status, rendered) = s
        .post(
            "/v1/chat/completions/render",
            json!({"model": MODEL, "messages": messages, "max_tokens": 5}),
        )
        .await;
    assert_eq!(status, 200, "{rendered}");
    let (_, tokenized) = s.post("/tokenize", json!({"messages": messages})).await;
    assert_eq!(rendered["token_ids"], tokenized["tokens"]);
    assert!(!rendered["token_ids"].as_array().unwrap().is_empty());

    // A chat request as vllm-router 0.1.17 forwards it.
    let forwarded = json!({
        "model": MODEL, "messages": messages, "stream": false, "max_tokens": 2,
        "logprobs": false, "no_stop_trim": false, "ignore_eos": false,
        "continue_final_message": false, "skip_special_tokens": true,
        "separate_reasoning": true, "stream_reasoning": true, "return_hidden_states": false,
        "include_reasoning": true,
    });
    let (status, r) = s.post("/v1/chat/completions", forwarded.clone()).await;
    assert_eq!(status, 200, "{r}");
    // A value that asks for something minserve does not do is still refused by name.
    for (field, value) in [("no_stop_trim", true), ("return_hidden_states", true)] {
        let mut body = forwarded.clone();
        body[field] = json!(value);
        let (status, e) = s.post("/v1/chat/completions", body).await;
        assert_eq!(status, 400, "{field}: {e}");
        assert_eq!(e["error"]["param"], field);
    }

    let label = format!("{{model_name=\"{MODEL}\"}}");
    assert_eq!(
        s.metric(&format!("vllm:num_requests_waiting{label}")).await,
        0.0
    );
    s.metric_until(&format!("vllm:generation_tokens_total{label}"), |v| {
        v == 2.0
    })
    .await;
    // The engine publishes its counters after the step that finished the request.
    s.metric_until(&format!("vllm:kv_cache_usage_perc{label}"), |v| v == 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_time_lasts_until_the_engine_schedules_the_request() {
    // One sequence runs at a time: a second request waits for the first to finish. Paced steps
    // make the first take about a second, so a loaded machine's delays are small beside it.
    let s = TestServer::start_loaded(common::options(), || {
        common::load_synthetic_paced(scheduler(1), Duration::from_millis(2))
    })
    .await;
    let first = s
        .client
        .post(s.url("/v1/completions"))
        .json(&json!({"prompt": "Once", "max_tokens": 400, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    s.metric_until("minserve_num_requests_running", |v| v == 1.0)
        .await;
    let client = s.client.clone();
    let url = s.url("/v1/completions");
    let second = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"prompt": "Twice", "max_tokens": 1}))
            .send()
            .await
            .unwrap()
    });
    s.metric_until("minserve_num_requests_waiting", |v| v == 1.0)
        .await;
    // The second request is queued by now, so it waits at least from here to the first's end.
    let seen_waiting = Instant::now();
    let (_, done) = read_sse(first).await;
    assert!(done);
    let first_took = seen_waiting.elapsed().as_secs_f64();
    assert_eq!(second.await.unwrap().status(), 200);

    assert_eq!(
        s.metric("minserve_request_queue_time_seconds_count").await,
        2.0
    );
    // The first request hardly waited; the second waited for all of the first's tokens (the
    // client hears of the first's end a little after the engine moved on: hence 0.8).
    let waited = s.metric("minserve_request_queue_time_seconds_sum").await;
    assert!(
        waited >= first_took * 0.8,
        "queue time {waited:.3} s, but the second request waited {first_took:.3} s"
    );
    assert!(waited <= first_took + 1.0, "{waited} vs {first_took}");
}

/// vLLM's `stop_reason`: the stop string or stop token id that ended a choice, null at EOS and
/// at the length limit; in the body and in the streamed finish chunk, on both APIs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_reason_names_the_stop_string_or_token() {
    let s = TestServer::start(common::options(), scheduler(8)).await;
    let counting = json!({"prompt": "1, 2, 3, 4,", "max_tokens": 10, "temperature": 0});
    let with = |extra: Value| {
        let mut body = counting.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };

    // A stop string: the one that matched.
    let (_, r) = s
        .post("/v1/completions", with(json!({"stop": ["7", ","]})))
        .await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert_eq!(r["choices"][0]["stop_reason"], ",", "{r}");

    // A stop token id: the id.
    let comma = first_token(&s, ",").await;
    let (_, r) = s
        .post("/v1/completions", with(json!({"stop_token_ids": [comma]})))
        .await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert_eq!(r["choices"][0]["stop_reason"], comma, "{r}");

    // The length limit: null.
    let (_, r) = s
        .post("/v1/completions", with(json!({"max_tokens": 1})))
        .await;
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    assert!(r["choices"][0]["stop_reason"].is_null(), "{r}");

    // Streamed, chat: the finish chunk carries it.
    let mut streamed = counting_with_stops();
    streamed["stream"] = json!(true);
    let response = s
        .client
        .post(s.url("/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let (events, _) = read_sse(response).await;
    let finish = events
        .iter()
        .find(|e| e["choices"][0]["finish_reason"].is_string())
        .unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop", "{finish}");
    let reason = finish["choices"][0]["stop_reason"].as_str().unwrap();
    assert!([" ", ",", "\n", "."].contains(&reason), "{finish}");
    // Not streamed, the same reason.
    let (_, r) = s.post("/v1/chat/completions", counting_with_stops()).await;
    assert_eq!(r["choices"][0]["stop_reason"], reason, "{r}");

    // EOS: null.
    let (_, r) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 200,
                   "temperature": 0}),
        )
        .await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert!(r["choices"][0]["stop_reason"].is_null(), "{r}");
}

/// With speculative decoding on, a repetitive chat request gets the same greedy text as without
/// it, streamed and not, and `/metrics` counts the drafts it verified.
#[tokio::test]
async fn speculative_decoding_serves_the_same_greedy_text_and_counts_drafts() {
    use minserve_core::speculative::SpeculativeConfig;
    let plain = TestServer::start(common::options(), common::scheduler(8)).await;
    let speculating = TestServer::start_loaded(common::options(), || {
        common::load_speculative(common::scheduler(8), SpeculativeConfig::ngram(4))
    })
    .await;
    let body = json!({
        "model": common::MODEL,
        "messages": [{"role": "user", "content": "Repeat exactly: the cat sat on the mat, \
            the dog sat on the log, the cat sat on the mat, the dog sat on the log."}],
        "max_tokens": 40,
        "temperature": 0,
    });
    let (status, expected) = plain.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{expected}");
    let (status, answer) = speculating.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(text(&answer), text(&expected));
    assert_eq!(answer["usage"], expected["usage"]);

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let response = speculating
        .client
        .post(speculating.url("/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let (chunks, done) = common::read_sse(response).await;
    assert!(done);
    let streamed_text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed_text, text(&expected));

    let accepted = speculating
        .metric("minserve_spec_decode_num_accepted_tokens_total")
        .await;
    let drafted = speculating
        .metric("minserve_spec_decode_num_draft_tokens_total")
        .await;
    assert!(
        accepted > 0.0 && drafted >= accepted,
        "{accepted} of {drafted}"
    );
    assert_eq!(
        plain
            .metric("minserve_spec_decode_num_draft_tokens_total")
            .await,
        0.0
    );
}

/// Chat's `prediction` (OpenAI's predicted outputs) on a server without `--speculative`: the
/// greedy text is the same with a right prediction, a wrong one and none, `/metrics` counts
/// the drafts the right one gave, and a malformed prediction is a 400 naming its part.
#[tokio::test]
async fn a_prediction_drafts_without_changing_the_greedy_text() {
    let s = TestServer::start(common::options(), common::scheduler(8)).await;
    let body = json!({
        "model": common::MODEL,
        "messages": [{"role": "user", "content": "Write two sentences about the sea."}],
        "max_tokens": 40,
        "temperature": 0,
    });
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (status, expected) = s.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{expected}");
    assert_eq!(
        s.metric("minserve_spec_decode_num_draft_tokens_total")
            .await,
        0.0
    );

    let with = |prediction: Value| {
        let mut body = body.clone();
        body["prediction"] = prediction;
        body
    };
    let right = with(json!({"type": "content", "content": text(&expected)}));
    let (status, answer) = s.post("/v1/chat/completions", right).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(text(&answer), text(&expected));
    // The second request finds its prompt in the prefix cache: only the cached count differs.
    assert_eq!(
        answer["usage"]["completion_tokens"],
        expected["usage"]["completion_tokens"]
    );
    // The engine publishes its counters after the step whose tokens end the request, so the
    // metric may not have the last step's drafts yet: only that it counts some.
    let accepted = s
        .metric("minserve_spec_decode_num_accepted_tokens_total")
        .await;
    assert!(accepted > 0.0, "{accepted} drafted tokens accepted");
    // OpenAI's account of the prediction: accepted + rejected = its length.
    let details = &answer["usage"]["completion_tokens_details"];
    let predicted = details["accepted_prediction_tokens"].as_u64().unwrap();
    let rejected = details["rejected_prediction_tokens"].as_u64().unwrap();
    assert!(predicted >= 20, "{details}");
    let (status, tokenized) = s
        .post(
            "/tokenize",
            json!({"prompt": text(&expected), "add_special_tokens": false}),
        )
        .await;
    assert_eq!(status, 200, "{tokenized}");
    assert_eq!(
        Some(predicted + rejected),
        tokenized["count"].as_u64(),
        "{details}"
    );
    assert!(expected["usage"].get("completion_tokens_details").is_none());

    // Text parts, and a prediction of something else: the same text.
    let parts = json!({"type": "content", "content": [
        {"type": "text", "text": "The tide rolls in over the grey stones."}]});
    let (status, answer) = s.post("/v1/chat/completions", with(parts)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(text(&answer), text(&expected));
    // (It may share a word with the answer, but not a sentence.)
    let details = &answer["usage"]["completion_tokens_details"];
    let accepted = details["accepted_prediction_tokens"].as_u64().unwrap();
    assert!(accepted < 5, "{details}");

    for (prediction, param) in [
        (json!("the text"), "prediction"),
        (json!({"type": "text", "content": "x"}), "prediction.type"),
        (json!({"type": "content"}), "prediction.content"),
        (
            json!({"type": "content", "content": 5}),
            "prediction.content",
        ),
        (
            json!({"type": "content", "content": [{"type": "image_url"}]}),
            "prediction.content",
        ),
    ] {
        let (status, r) = s.post("/v1/chat/completions", with(prediction)).await;
        common::assert_error(status, &r, 400, Some(param));
    }
    let mut completion = json!({"model": common::MODEL, "prompt": "Hi", "max_tokens": 2});
    completion["prediction"] = json!({"type": "content", "content": "x"});
    let (status, r) = s.post("/v1/completions", completion).await;
    common::assert_error(status, &r, 400, Some("prediction"));
}
