//! `GET /openapi.json`: a hand-written OpenAPI 3.1 description of the routes.

use axum::Json;
use serde_json::{json, Value};

fn error_responses() -> Value {
    let r = |d: &str| json!({"description": d, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    json!({
        "400": r("Malformed JSON, a parameter of the wrong type or out of range, an unknown or unsupported field (docs/api-fields.md), a grammar that cannot be followed, a prompt too long"),
        "401": r("Missing or wrong API key (when the server has one)"),
        "404": r("Unknown model"),
        "413": r("Request body over the limit"),
        "415": r("The body is not sent as `Content-Type: application/json`"),
        "429": r("The waiting queue is full; see Retry-After"),
        "503": r("The model is loading, its engine failed, or the server is shutting down"),
    })
}

fn generation(summary: &str, schema: &str) -> Value {
    let mut responses = error_responses();
    responses["200"] = json!({
        "description": "The completion (JSON), or with `stream: true` server-sent events \
                        (`data: {chunk}` ... `data: [DONE]`)",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        }
    });
    json!({"post": {
        "summary": summary,
        "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}},
        "responses": responses,
    }})
}

pub(crate) async fn openapi() -> Json<Value> {
    let sampling = json!({
        "model": {"type": "string"},
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "default": 1},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
        "top_k": {"type": "integer", "description": "-1 or 0: off"},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
        "seed": {"type": "integer"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "stop_token_ids": {"type": "array", "items": {"type": "integer"}},
        "n": {"type": "integer", "minimum": 1, "default": 1},
        "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
        "user": {"type": "string"},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "ignore_eos": {"type": "boolean"},
        "min_tokens": {"type": "integer", "minimum": 0},
        "priority": {"type": "integer", "description": "lower is served first with --scheduling-policy priority"},
        "structured_outputs": {"type": "object", "description": "vLLM's: one of json (a schema), regex, choice, grammar (Lark), json_object; see docs/constrained-decoding.md"},
    });
    let mut chat = sampling.clone();
    chat["messages"] = json!({"type": "array", "minItems": 1, "items": {"type": "object",
    "required": ["role"],
    "properties": {"role": {"type": "string"}, "content": {"oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}
    ]}}}});
    chat["max_completion_tokens"] = json!({"type": "integer", "minimum": 1});
    chat["logprobs"] = json!({"type": "boolean"});
    chat["top_logprobs"] = json!({"type": "integer", "minimum": 0, "maximum": 20});
    chat["response_format"] = json!({"type": "object", "description": "type: text, json_object or json_schema (with json_schema.schema)"});
    chat["tools"] = json!({"type": "array", "items": {"type": "object", "properties": {"type": {"const": "function"}, "function": {"type": "object", "required": ["name"]}}}});
    chat["tool_choice"] =
        json!({"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]});
    chat["parallel_tool_calls"] = json!({"type": "boolean", "default": true});
    chat["chat_template_kwargs"] = json!({"type": "object"});
    chat["add_generation_prompt"] = json!({"type": "boolean", "default": true});
    chat["continue_final_message"] = json!({"type": "boolean", "default": false});
    let mut completion = sampling;
    completion["prompt"] = json!({"oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    ]});
    completion["echo"] = json!({"type": "boolean", "description": "start each choice with its prompt; with max_tokens 0, return the prompt alone"});
    completion["max_tokens"] =
        json!({"type": "integer", "minimum": 0, "description": "0 only with echo"});
    completion["logprobs"] = json!({"type": "integer", "minimum": 0, "maximum": 20, "description": "not together with echo: prompt tokens get no log probabilities"});
    let responses = json!({
        "model": {"type": "string"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "description": "a message ({role, content}), a function_call or a function_call_output item"}}]},
        "instructions": {"type": "string"},
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "default": 1},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
        "stream": {"type": "boolean"},
        "text": {"type": "object", "description": "format: {type: text | json_object | json_schema (with name, schema)}"},
        "tools": {"type": "array", "items": {"type": "object", "required": ["type", "name"], "properties": {"type": {"const": "function"}, "name": {"type": "string"}, "parameters": {"type": "object"}}}},
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]},
        "parallel_tool_calls": {"type": "boolean", "default": true},
        "store": {"type": "boolean", "default": true, "description": "keep the finished response in memory (bounded) for previous_response_id"},
        "previous_response_id": {"type": "string", "description": "continue a stored response"},
    });
    let simple = |summary: &str, content: &str| json!({"get": {"summary": summary, "responses": {"200": {"description": "OK", "content": {content: {}}}}}});
    Json(json!({
        "openapi": "3.1.0",
        "info": {"title": "minserve", "version": env!("CARGO_PKG_VERSION"),
                 "description": "OpenAI-compatible API of minserve. Send `Authorization: Bearer <key>` when the server has an API key."},
        "paths": {
            "/v1/chat/completions": generation("Chat completion", "ChatCompletionRequest"),
            "/v1/completions": generation("Text completion", "CompletionRequest"),
            "/v1/responses": generation("Responses API: a response object, or with `stream: true` its typed events", "ResponsesRequest"),
            "/v1/models": simple("The served models, with their limits", "application/json"),
            "/v1/models/{model}": simple("One model", "application/json"),
            "/tokenize": {"post": {"summary": "Tokenize a prompt or chat messages", "responses": error_responses()}},
            "/detokenize": {"post": {"summary": "Token ids to text", "responses": error_responses()}},
            "/v1/chat/completions/render": {"post": {"summary": "The prompt token ids a chat request would run (vLLM's render route, for routers)", "responses": error_responses()}},
            "/health": {"get": {"summary": "200 once every model is loaded, 503 before, after a model failed to load or its engine failed, or shutting down (`?model=ID`: that model alone)", "responses": {"200": {"description": "ready"}, "503": {"description": "loading, load or engine failed (with the reason, per model) or shutting down"}}}},
            "/health/{model}": {"get": {"summary": "The health of one model, by name or alias", "responses": {"200": {"description": "ready"}, "404": {"description": "no such model"}, "503": {"description": "loading, load or engine failed (with the reason) or shutting down"}}}},
            "/metrics": simple("Prometheus metrics", "text/plain"),
            "/get_load": simple("The requests the engines hold, as `{\"load\": N}` (`?model=ID`: one model's), for LLM routers", "application/json"),
            "/openapi.json": simple("This document", "application/json"),
        },
        "components": {"schemas": {
            "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": chat},
            "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": completion},
            "ResponsesRequest": {"type": "object", "required": ["input"], "properties": responses},
            "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
        }},
    }))
}
