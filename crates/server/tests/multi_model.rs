//! Several models behind one API in one process (real HTTP): each answers by its name or
//! alias, an unknown model is a 404 that lists the served ones, `/v1/models` shows each with
//! its limits, `/metrics` labels every series with its model, and a model that failed to load
//! is reported by name while the others serve.

mod common;

use std::sync::Arc;

use common::{assert_error, options, scheduler, TestServer};
use minserve_server::{AppState, ModelSpec};
use serde_json::{json, Value};

fn spec(name: &str, aliases: &[&str]) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
    }
}

/// The real default model as `small` (alias `chat`, 4 sequences at once) and the tiny
/// synthetic one as `tiny` (2 sequences), each on its own engine.
async fn two_models() -> TestServer {
    let state = AppState::with_models(options(), vec![spec("small", &["chat"]), spec("tiny", &[])])
        .unwrap();
    let small = state.models.find("small").unwrap().clone();
    let tiny = state.models.find("tiny").unwrap().clone();
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(|| common::load(scheduler(4))),
        tokio::task::spawn_blocking(|| common::load_synthetic(scheduler(2))),
    );
    small.set_model(a.unwrap().unwrap());
    tiny.set_model(b.unwrap().unwrap());
    TestServer::start_with(state).await
}

async fn complete(s: &TestServer, model: &str) -> (u16, Value) {
    s.post(
        "/v1/completions",
        json!({"model": model, "prompt": "The capital of France is", "max_tokens": 4,
               "temperature": 0, "ignore_eos": true}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_answer_by_name_and_an_unknown_one_is_a_404_listing_them() {
    let s = two_models().await;
    for (asked, served) in [("small", "small"), ("chat", "small"), ("tiny", "tiny")] {
        let (status, body) = complete(&s, asked).await;
        assert_eq!(status, 200, "{asked}: {body}");
        assert_eq!(body["model"], served, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    }
    // Different models, different text for the same greedy prompt.
    let (_, small) = complete(&s, "small").await;
    let (_, tiny) = complete(&s, "tiny").await;
    assert_ne!(small["choices"][0]["text"], tiny["choices"][0]["text"]);

    let (status, body) = complete(&s, "gpt-4o").await;
    assert_error(status, &body, 404, Some("model"));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("gpt-4o") && message.contains("small, tiny"),
        "{message}"
    );

    let (status, page) = s.get("/v1/models").await;
    assert_eq!(status, 200, "{page}");
    let list: Value = serde_json::from_str(&page).unwrap();
    let cards = list["data"].as_array().unwrap();
    assert_eq!(cards.len(), 2, "{list}");
    assert_eq!(cards[0]["id"], "small");
    assert_eq!(cards[0]["aliases"], json!(["chat"]));
    assert_eq!(cards[0]["max_num_seqs"], 4);
    assert_eq!(cards[1]["id"], "tiny");
    assert_eq!(cards[1]["max_num_seqs"], 2);
    for card in cards {
        assert_eq!(card["status"], "ready");
        assert!(card["max_model_len"].as_u64().unwrap() > 0, "{card}");
        assert!(card["kv_cache_tokens"].as_u64().unwrap() > 0, "{card}");
    }
    let (status, card) = s.get("/v1/models/chat").await;
    assert_eq!(status, 200);
    assert!(card.contains("\"id\":\"small\""), "{card}");

    let (_, metrics) = s.get("/metrics").await;
    for model in ["small", "tiny"] {
        // Each answered at least two requests of 4 tokens (the engine publishes its counters
        // after each step, maybe just after the response: one request's are there for sure).
        let line = format!("minserve_generation_tokens_total{{model=\"{model}\"}} ");
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line)?.parse().ok())
            .unwrap_or_else(|| panic!("{line} in\n{metrics}"));
        assert!(value >= 4.0, "{line}{value}");
    }
    // Every series carries its model; each family is described once.
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains("{model=\""), "{line}");
    }
    let helps = metrics
        .lines()
        .filter(|l| l.starts_with("# HELP minserve_engine_up "))
        .count();
    assert_eq!(helps, 1, "{metrics}");

    for path in [
        "/health",
        "/health/small",
        "/health/chat",
        "/health?model=tiny",
    ] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, _) = s.get("/health/nope").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_failed_to_load_is_reported_by_name_and_the_others_serve() {
    let state =
        AppState::with_models(options(), vec![spec("good", &[]), spec("broken", &[])]).unwrap();
    let good = state.models.find("good").unwrap().clone();
    let model = tokio::task::spawn_blocking(|| common::load_synthetic(scheduler(2)))
        .await
        .unwrap()
        .unwrap();
    good.set_model(model);
    let loading =
        minserve_server::spawn_load_model(state.models.find("broken").unwrap().clone(), || {
            anyhow::bail!("no such file: broken.gguf")
        });
    assert!(loading.await.unwrap().is_err());
    let s = TestServer::start_with(Arc::clone(&state)).await;

    let (status, body) = complete(&s, "good").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = complete(&s, "broken").await;
    assert_error(status, &body, 503, None);
    assert_eq!(body["error"]["code"], "model_load_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`broken`") && message.contains("broken.gguf"),
        "{message}"
    );

    let (status, health) = s.get("/health").await;
    assert_eq!(status, 503, "{health}");
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["models"]["good"], "ready", "{health}");
    assert_eq!(
        health["models"]["broken"]["code"], "model_load_failed",
        "{health}"
    );
    assert_eq!(s.get("/health/good").await.0, 200);
    assert_eq!(s.get("/health/broken").await.0, 503);

    let (status, list) = s.get("/v1/models").await;
    assert_eq!(status, 200, "{list}");
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["data"][1]["status"], "unavailable", "{list}");
}
