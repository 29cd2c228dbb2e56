//! The `response` object: a response's id, status, output and usage, with the request's
//! settings as OpenAI echoes them back.

use std::sync::Arc;

use minserve_core::request::FinishReason;
use minserve_tokenizer::ChatMessage;
use serde_json::{json, Map, Value};

use super::output::OutputItems;
use super::store::{assistant_turn, ResponseStore};
use crate::choices::Choices;
use crate::json_body::JsonBody;
use crate::params::GenerationParams;
use crate::render::response_id;
use crate::state::unix_time;
use crate::tool_format::Tool;

/// What every `response` object of one request carries besides its status, output and usage.
pub(crate) struct ResponseShell {
    id: String,
    created_at: u64,
    /// With `store`: where the finished response is kept, and its conversation so far.
    keep: Option<(Arc<ResponseStore>, Vec<ChatMessage>)>,
    /// The settings echoed back, in OpenAI's field order.
    settings: Map<String, Value>,
    /// The functions whose calls are read out of the output.
    tools: Option<Vec<Tool>>,
}

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    InProgress,
    Completed,
    /// Cut off at `max_output_tokens` (or the end of the context).
    Incomplete,
}

impl Status {
    pub fn of(reason: Option<FinishReason>) -> Self {
        match reason {
            None => Status::InProgress,
            Some(FinishReason::Length) => Status::Incomplete,
            Some(FinishReason::Stop) => Status::Completed,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Incomplete => "incomplete",
        }
    }

    /// The type of the stream's last event.
    pub fn final_event(self) -> &'static str {
        match self {
            Status::Incomplete => "response.incomplete",
            _ => "response.completed",
        }
    }
}

impl ResponseShell {
    pub fn new(
        body: &JsonBody,
        served_model_name: &str,
        params: &GenerationParams,
        keep: Option<(Arc<ResponseStore>, Vec<ChatMessage>)>,
    ) -> Self {
        let sent = |name: &str, default: Value| body.get(name).cloned().unwrap_or(default);
        let mut settings = Map::new();
        settings.insert("model".into(), json!(served_model_name));
        for (name, value) in [
            ("instructions", sent("instructions", Value::Null)),
            ("max_output_tokens", json!(params.max_tokens.asked)),
            (
                "parallel_tool_calls",
                sent("parallel_tool_calls", json!(true)),
            ),
            (
                "previous_response_id",
                sent("previous_response_id", Value::Null),
            ),
            ("temperature", json!(params.sampling.temperature)),
            ("top_p", json!(params.sampling.top_p)),
            ("tool_choice", sent("tool_choice", json!("auto"))),
            ("tools", sent("tools", json!([]))),
            ("text", sent("text", json!({"format": {"type": "text"}}))),
            ("truncation", json!("disabled")),
            ("store", json!(keep.is_some())),
            ("metadata", sent("metadata", json!({}))),
            ("user", sent("user", Value::Null)),
        ] {
            settings.insert(name.into(), value);
        }
        Self {
            id: format!("resp_{}", &response_id("x")[2..]),
            created_at: unix_time(),
            keep,
            settings,
            tools: params.tool_calls.clone(),
        }
    }

    /// A fresh reader of the output's items.
    pub fn output_items(&self) -> OutputItems {
        OutputItems::new(self.tools.as_deref())
    }

    /// The response object; `usage` once it is known.
    pub fn object(&self, status: Status, output: &[Value], usage: Option<Value>) -> Value {
        let incomplete =
            (status == Status::Incomplete).then(|| json!({"reason": "max_output_tokens"}));
        let mut object = json!({
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status.as_str(), "error": null, "incomplete_details": incomplete,
        });
        let fields = object.as_object_mut().expect("an object");
        fields.extend(self.settings.clone());
        fields.insert("output".into(), Value::Array(output.to_vec()));
        fields.insert("usage".into(), usage.unwrap_or(Value::Null));
        object
    }

    /// The finished response of a request that was not streamed: its one choice's output
    /// read into items.
    pub fn finished(&self, choices: &Choices, prompt_tokens: usize) -> Value {
        let mut output = self.output_items();
        let choice = choices.iter().next();
        let status = Status::of(choice.and_then(|c| c.finish));
        output.finish(
            choice.map_or("", |c| c.text.as_str()),
            status != Status::Incomplete,
        );
        self.keep(output.items());
        self.object(status, output.items(), Some(usage(choices, prompt_tokens)))
    }

    /// The response finished with `output`: kept for `previous_response_id`, with `store`.
    pub fn keep(&self, output: &[Value]) {
        if let Some((store, conversation)) = &self.keep {
            let mut conversation = conversation.clone();
            conversation.push(assistant_turn(output));
            store.put(self.id.clone(), conversation);
        }
    }
}

/// The Responses API's `usage`. minserve writes no cache on request (its prefix cache fills
/// itself from every request), so `cache_write_tokens` is 0; there is no reasoning.
pub(crate) fn usage(choices: &Choices, prompt_tokens: usize) -> Value {
    let output_tokens = choices.completion_tokens();
    json!({
        "input_tokens": prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": choices.cached_tokens(), "cache_write_tokens": 0,
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    })
}
