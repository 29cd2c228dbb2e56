//! A response's `output`: the items built from a choice's output (an assistant `message` with
//! its `output_text`, and `function_call`s), and the stream events that build them, in the
//! order OpenAI sends them:
//!
//! ```text
//! message:       response.output_item.added, response.content_part.added,
//!                response.output_text.delta ..., response.output_text.done,
//!                response.content_part.done, response.output_item.done
//! function_call: response.output_item.added, response.function_call_arguments.delta ...,
//!                response.function_call_arguments.done, response.output_item.done
//! ```
//!
//! The non-streamed response is built by the same [`OutputItems`] (its events dropped), so a
//! stream always adds up to the response that was not streamed. Events carry no
//! `sequence_number` here: the stream numbers them as it sends them.

use serde_json::{json, Value};

use crate::render::{response_id, tool_call_id};
use crate::tool_format::{CallScanner, OutputPiece, Tool};

/// The output items of one choice, as its text arrives.
pub(crate) struct OutputItems {
    /// With tools: the output read for calls.
    scanner: Option<CallScanner>,
    done: Vec<Value>,
    open: Option<OpenItem>,
}

/// The item still receiving text.
enum OpenItem {
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// A fresh item id, OpenAI's way: `prefix_` and hex digits.
fn item_id(prefix: &str) -> String {
    format!("{prefix}_{}", &response_id("x")[2..])
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

impl OutputItems {
    /// `tools`: the functions whose calls are read out of the output, if any.
    pub fn new(tools: Option<&[Tool]>) -> Self {
        Self {
            scanner: tools.map(CallScanner::new),
            done: Vec::new(),
            open: None,
        }
    }

    /// Takes the next text of the output; returns the events it makes.
    pub fn push(&mut self, text: &str) -> Vec<Value> {
        let pieces = match &mut self.scanner {
            Some(scanner) => scanner.push(text),
            None if text.is_empty() => Vec::new(),
            None => vec![OutputPiece::Content(text.to_string())],
        };
        let mut events = Vec::new();
        for piece in pieces {
            self.piece(piece, &mut events);
        }
        events
    }

    /// Takes the output's last text; `complete` unless it was cut off (at
    /// `max_output_tokens`), which leaves its last item `incomplete`. Returns the events that
    /// end the output.
    pub fn finish(&mut self, text: &str, complete: bool) -> Vec<Value> {
        let mut events = self.push(text);
        let rest = self.scanner.as_mut().map(CallScanner::finish);
        for piece in rest.into_iter().flatten() {
            self.piece(piece, &mut events);
        }
        let status = if complete { "completed" } else { "incomplete" };
        self.close(status, &mut events);
        events
    }

    /// The items finished so far: all of them once [`OutputItems::finish`] was called.
    pub fn items(&self) -> &[Value] {
        &self.done
    }

    /// The index the open item has (or the next one will have) in `output`.
    fn index(&self) -> usize {
        self.done.len()
    }

    fn piece(&mut self, piece: OutputPiece, events: &mut Vec<Value>) {
        match piece {
            OutputPiece::Content(delta) => {
                if !matches!(self.open, Some(OpenItem::Message { .. })) {
                    self.close("completed", events);
                    let index = self.index();
                    let id = item_id("msg");
                    events.push(json!({
                        "type": "response.output_item.added", "output_index": index,
                        "item": {"type": "message", "id": id, "status": "in_progress",
                                 "role": "assistant", "content": []},
                    }));
                    events.push(json!({
                        "type": "response.content_part.added", "item_id": id,
                        "output_index": index, "content_index": 0, "part": output_text(""),
                    }));
                    self.open = Some(OpenItem::Message {
                        id,
                        text: String::new(),
                    });
                }
                let index = self.index();
                if let Some(OpenItem::Message { id, text }) = &mut self.open {
                    text.push_str(&delta);
                    events.push(json!({
                        "type": "response.output_text.delta", "item_id": id,
                        "output_index": index, "content_index": 0, "delta": delta,
                        "logprobs": [],
                    }));
                }
            }
            OutputPiece::CallStart(name) => {
                self.close("completed", events);
                let index = self.index();
                let (id, call_id) = (item_id("fc"), tool_call_id());
                events.push(json!({
                    "type": "response.output_item.added", "output_index": index,
                    "item": {"type": "function_call", "id": id, "call_id": call_id,
                             "name": name, "arguments": "", "status": "in_progress"},
                }));
                self.open = Some(OpenItem::Call {
                    id,
                    call_id,
                    name,
                    arguments: String::new(),
                });
            }
            OutputPiece::CallArguments(delta) => {
                let index = self.index();
                if let Some(OpenItem::Call { id, arguments, .. }) = &mut self.open {
                    arguments.push_str(&delta);
                    events.push(json!({
                        "type": "response.function_call_arguments.delta", "item_id": id,
                        "output_index": index, "delta": delta,
                    }));
                }
            }
            OutputPiece::CallEnd => {
                if matches!(self.open, Some(OpenItem::Call { .. })) {
                    self.close("completed", events);
                }
            }
        }
    }

    /// Ends the open item, if any, with `status`.
    fn close(&mut self, status: &str, events: &mut Vec<Value>) {
        let index = self.index();
        let item = match self.open.take() {
            None => return,
            Some(OpenItem::Message { id, text }) => {
                events.push(json!({
                    "type": "response.output_text.done", "item_id": id, "output_index": index,
                    "content_index": 0, "text": text, "logprobs": [],
                }));
                events.push(json!({
                    "type": "response.content_part.done", "item_id": id, "output_index": index,
                    "content_index": 0, "part": output_text(&text),
                }));
                json!({"type": "message", "id": id, "status": status, "role": "assistant",
                       "content": [output_text(&text)]})
            }
            Some(OpenItem::Call {
                id,
                call_id,
                name,
                arguments,
            }) => {
                events.push(json!({
                    "type": "response.function_call_arguments.done", "item_id": id,
                    "output_index": index, "name": name, "arguments": arguments,
                }));
                json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
                       "arguments": arguments, "status": status})
            }
        };
        events.push(json!({
            "type": "response.output_item.done", "output_index": index, "item": item,
        }));
        self.done.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(events: &[Value]) -> Vec<&str> {
        events.iter().map(|e| e["type"].as_str().unwrap()).collect()
    }

    #[test]
    fn text_then_a_call_make_two_items_in_openais_event_order() {
        let tools = [Tool {
            name: "add".into(),
            parameters: json!({"type": "object"}),
        }];
        let mut output = OutputItems::new(Some(&tools));
        let mut events = output.push("Sure.");
        events.extend(output.push(" <tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}"));
        events.extend(output.finish("\n</tool_call>", true));
        assert_eq!(
            types(&events),
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
            ]
        );
        let items = output.items();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["content"][0]["text"], "Sure.");
        assert_eq!(items[1]["name"], "add");
        let arguments: Value =
            serde_json::from_str(items[1]["arguments"].as_str().unwrap()).expect("JSON arguments");
        assert_eq!(arguments, json!({"a": 1}));
        assert_eq!(events[6]["output_index"], 1);
        assert_eq!(events[6]["item"]["call_id"], items[1]["call_id"]);
    }

    #[test]
    fn a_cut_off_message_is_incomplete() {
        let mut output = OutputItems::new(None);
        let deltas: Vec<Value> = ["Once", " upon"]
            .iter()
            .flat_map(|t| output.push(t))
            .collect();
        assert_eq!(types(&deltas)[2..], ["response.output_text.delta"; 2]);
        output.finish("", false);
        let item = &output.items()[0];
        assert_eq!(item["status"], "incomplete");
        assert_eq!(item["content"][0]["text"], "Once upon");
    }
}
