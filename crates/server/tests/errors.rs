//! Every error in OpenAI's shape with the right status.

mod common;

use std::time::Duration;

use common::{assert_error, scheduler, TestServer};
use minserve_server::ServerOptions;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests() {
    let s = TestServer::start_synthetic(common::options(), scheduler(64)).await;
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };

    // Malformed JSON and a non-object body.
    for raw in ["{\"messages\": [", "[1, 2]", ""] {
        let r = s
            .client
            .post(s.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_error(status, &r.json().await.unwrap(), 400, None);
    }

    // Wrong types and out-of-range values name their parameter.
    let cases = [
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"n": 0}), "n"),
        (json!({"n": "two"}), "n"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_tokens": 2.5}), "max_tokens"),
        (
            json!({"max_completion_tokens": -3}),
            "max_completion_tokens",
        ),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"frequency_penalty": -2.5}), "frequency_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"min_p": 2}), "min_p"),
        (json!({"top_k": -5}), "top_k"),
        (json!({"stop": 5}), "stop"),
        (json!({"stop": ["ok", 3]}), "stop"),
        (json!({"seed": "x"}), "seed"),
        (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
        (json!({"logit_bias": {"5": 101}}), "logit_bias"),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
        (json!({"logprobs": "yes"}), "logprobs"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"stream": "yes"}), "stream"),
        (json!({"user": 5}), "user"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": "hi"}), "messages"),
        (json!({"messages": [{"content": "hi"}]}), "messages[0].role"),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content",
        ),
        (json!({"min_tokens": 5, "max_tokens": 2}), "min_tokens"),
        (
            json!({"chat_template_kwargs": "think"}),
            "chat_template_kwargs",
        ),
    ];
    for (extra, param) in cases {
        let (status, body) = s.post("/v1/chat/completions", chat(extra.clone())).await;
        assert_error(status, &body, 400, Some(param));
    }

    // Completions: prompt shapes and token ids.
    for (body, param) in [
        (json!({}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": [1, "a"]}), "prompt"),
        (json!({"prompt": [-1]}), "prompt"),
        (json!({"prompt": [100000000]}), "prompt"),
        (json!({"prompt": "hi", "logprobs": 21}), "logprobs"),
        (json!({"prompt": "hi", "max_tokens": 0}), "max_tokens"),
        (
            json!({"prompt": "hi", "echo": true, "logprobs": 1}),
            "logprobs",
        ),
        (
            json!({"prompt": "hi", "echo": true, "logprobs": 0, "max_tokens": 0}),
            "logprobs",
        ),
        (json!({"prompt": "hi", "echo": "yes"}), "echo"),
        (
            json!({"prompt": [[]], "echo": true, "max_tokens": 0}),
            "prompt",
        ),
        (json!({"prompt": "hi", "n": 200, "max_tokens": 1}), "n"),
        (
            json!({"prompt": ["a", "b"], "n": 100, "max_tokens": 1}),
            "n",
        ),
    ] {
        let (status, r) = s.post("/v1/completions", body).await;
        assert_error(status, &r, 400, Some(param));
    }

    // Fields minserve does not implement or know are refused by name (docs/api-fields.md);
    // the same fields asking for nothing are accepted.
    for (body, param) in [
        (chat(json!({"temprature": 0.5})), "temprature"),
        (chat(json!({"store": true})), "store"),
        (chat(json!({"modalities": ["text", "audio"]})), "modalities"),
        (chat(json!({"reasoning_effort": "low"})), "reasoning_effort"),
        (chat(json!({"functions": []})), "functions"),
        (chat(json!({"echo": true})), "echo"),
        (
            chat(json!({"include_stop_str_in_output": true})),
            "include_stop_str_in_output",
        ),
        (json!({"prompt": "hi", "best_of": 3}), "best_of"),
        (json!({"prompt": "hi", "suffix": "end"}), "suffix"),
        (json!({"prompt": "hi", "messages": []}), "messages"),
    ] {
        let path = match body.get("prompt") {
            Some(_) => "/v1/completions",
            None => "/v1/chat/completions",
        };
        let (status, r) = s.post(path, body).await;
        assert_error(status, &r, 400, Some(param));
    }
    let asks_nothing = chat(
        json!({"store": false, "modalities": ["text"], "service_tier": "auto",
        "metadata": {"k": "v"}, "skip_special_tokens": true, "frequency_penalty": null}),
    );
    let (status, r) = s.post("/v1/chat/completions", asks_nothing).await;
    assert_eq!(status, 200, "{r}");
    let best_of_n = json!({"prompt": "hi", "max_tokens": 1, "n": 2, "best_of": 2});
    let (status, r) = s.post("/v1/completions", best_of_n).await;
    assert_eq!(status, 200, "{r}");

    // Beyond the context: both lengths in the message.
    let (_, models) = s.get("/v1/models").await;
    let models: Value = serde_json::from_str(&models).unwrap();
    let context = models["data"][0]["max_model_len"].to_string();
    let too_long = |(status, r): (u16, Value), param: Option<&str>, asked: &str| {
        assert_error(status, &r, 400, param);
        let message = r["error"]["message"].as_str().unwrap().to_string();
        assert!(
            message.contains(&context) && message.contains(asked),
            "{message}"
        );
    };
    let asked = json!({"prompt": "hello", "max_tokens": 100000});
    too_long(s.post("/v1/completions", asked).await, None, "100000");
    let long: Vec<u32> = vec![28; 9000];
    let r = s.post("/v1/completions", json!({"prompt": long})).await;
    too_long(r, Some("prompt"), "9000");
    // The same with nothing to generate (echo of the prompt alone).
    let echo = json!({"prompt": long, "max_tokens": 0, "echo": true});
    too_long(
        s.post("/v1/completions", echo).await,
        Some("prompt"),
        "9000",
    );
    let chat_long = json!({"messages": [{"role": "user", "content": "hi ".repeat(9000)}]});
    let (_, counted) = s.post("/tokenize", chat_long.clone()).await;
    let prompt_tokens = counted["count"].to_string();
    let r = s.post("/v1/chat/completions", chat_long).await;
    too_long(r, Some("messages"), &prompt_tokens);

    // Unknown model, route, method.
    let (status, r) = s
        .post("/v1/chat/completions", chat(json!({"model": "gpt-4"})))
        .await;
    assert_error(status, &r, 404, Some("model"));
    assert_eq!(r["error"]["code"], "model_not_found");
    let (status, r) = s
        .post("/v1/completions", json!({"model": "gpt-4", "prompt": "x"}))
        .await;
    assert_error(status, &r, 404, Some("model"));
    let (status, body) = s.get("/v1/nothing").await;
    assert_error(status, &serde_json::from_str(&body).unwrap(), 404, None);
    // An endpoint OpenAI has and we do not: the error names it and where to go instead.
    let (status, r) = s
        .post("/v1/embeddings", json!({"model": "x", "input": "hi"}))
        .await;
    assert_error(status, &r, 404, None);
    assert_eq!(r["error"]["code"], "not_found");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("POST /v1/embeddings") && message.contains("/v1/chat/completions"),
        "{message}"
    );
    let (status, body) = s.get("/v1/chat/completions").await;
    assert_error(status, &serde_json::from_str(&body).unwrap(), 405, None);
    let (status, r) = s.post("/health", json!({})).await;
    assert_error(status, &r, 405, None);

    // The server still works.
    let (status, r) = s.post("/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(status, 200, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_body_limit_and_queue() {
    let options = ServerOptions {
        api_key: Some("sesame".into()),
        max_body_bytes: 2000,
        max_queue: 0,
        ..common::options()
    };
    // One sequence runs at a time and none may wait.
    let s = TestServer::start_synthetic(options, scheduler(1)).await;
    let body = json!({"prompt": "Once upon a time", "max_tokens": 1});

    // 401 without or with a wrong key; /health, /metrics, /openapi.json stay open.
    let (status, r) = s.post("/v1/completions", body.clone()).await;
    assert_error(status, &r, 401, None);
    assert_eq!(r["error"]["code"], "invalid_api_key");
    for key in ["Bearer nope", "sesame", "Bearer sesame2"] {
        let r = s
            .client
            .post(s.url("/v1/completions"))
            .header("authorization", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let (status, body_text) = s.get("/v1/models").await;
    assert_eq!(status, 401, "{body_text}");
    for open in ["/health", "/metrics", "/openapi.json"] {
        assert_eq!(s.get(open).await.0, 200, "{open}");
    }
    let authed = |path: &str| s.client.post(s.url(path)).bearer_auth("sesame");
    let r = authed("/v1/completions").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // 413 over the body limit.
    let big = json!({"prompt": "x".repeat(5000), "max_tokens": 1});
    let r = authed("/v1/completions").json(&big).send().await.unwrap();
    let status = r.status().as_u16();
    assert_error(status, &r.json().await.unwrap(), 413, None);

    // 429 with Retry-After while the only slot is busy and the queue holds 0.
    let long = authed("/v1/completions")
        .json(
            &json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true,
                      "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 200);
    s.metric_until("minserve_num_requests_running", |v| v == 1.0)
        .await;
    let r = authed("/v1/completions").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_error(429, &r.json().await.unwrap(), 429, None);
    assert_eq!(s.metric("minserve_request_rejected_total").await, 1.0);
    drop(long); // cancels it
    s.wait_idle(Duration::from_secs(2)).await;
    let r = authed("/v1/completions").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}
