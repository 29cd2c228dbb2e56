//! The responses kept for `previous_response_id`: a bounded store in memory. Each finished
//! response with `store` (OpenAI's default) keeps its conversation: the input it was given
//! (after its own previous response's, without `instructions`, which OpenAI does not carry
//! over) and its output as an assistant turn. The oldest are dropped past [`MAX_BYTES`] of
//! text; nothing survives a restart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use minserve_tokenizer::ChatMessage;
use serde_json::{json, Value};

/// Most text kept, over all stored conversations (a conversation repeats its predecessors', so
/// a long agent loop fills it fastest).
pub(crate) const MAX_BYTES: usize = 64 << 20;

/// A stored conversation.
pub(crate) type Conversation = Arc<Vec<ChatMessage>>;

#[derive(Default)]
pub(crate) struct ResponseStore {
    /// Oldest first: (response id, conversation, its size in bytes).
    entries: Mutex<VecDeque<(String, Conversation, usize)>>,
}

impl ResponseStore {
    pub fn get(&self, id: &str) -> Option<Conversation> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .find(|(stored, _, _)| stored == id)
            .map(|(_, conversation, _)| conversation.clone())
    }

    /// Keeps `conversation` under `id`, dropping the oldest ones past [`MAX_BYTES`].
    pub fn put(&self, id: String, conversation: Vec<ChatMessage>) {
        let size: usize = conversation.iter().map(message_bytes).sum();
        if size > MAX_BYTES {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut total: usize = entries.iter().map(|(_, _, bytes)| bytes).sum::<usize>() + size;
        while total > MAX_BYTES {
            let Some((_, _, bytes)) = entries.pop_front() else {
                break;
            };
            total -= bytes;
        }
        entries.push_back((id, Arc::new(conversation), size));
    }
}

fn message_bytes(message: &ChatMessage) -> usize {
    let calls = message.tool_calls.iter().flatten();
    message.content.len() + calls.map(|c| c.to_string().len()).sum::<usize>()
}

/// A response's output items as the assistant turn a later request continues from: its text,
/// and its function calls with their `call_id`s.
pub(crate) fn assistant_turn(items: &[Value]) -> ChatMessage {
    let mut turn = ChatMessage::new("assistant", "");
    for item in items {
        match item["type"].as_str() {
            Some("message") => {
                for part in item["content"].as_array().into_iter().flatten() {
                    turn.content
                        .push_str(part["text"].as_str().unwrap_or_default());
                }
            }
            Some("function_call") => {
                let arguments: Value = item["arguments"]
                    .as_str()
                    .and_then(|a| serde_json::from_str(a).ok())
                    .unwrap_or_else(|| json!({}));
                turn.tool_calls.get_or_insert_with(Vec::new).push(json!({
                    "id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": arguments},
                }));
            }
            _ => {}
        }
    }
    turn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_conversations_go_first() {
        let store = ResponseStore::default();
        let big = "x".repeat(MAX_BYTES / 3);
        for id in ["a", "b", "c", "d"] {
            store.put(id.into(), vec![ChatMessage::new("user", big.clone())]);
        }
        assert!(store.get("a").is_none());
        for id in ["b", "c", "d"] {
            assert_eq!(store.get(id).unwrap()[0].content.len(), big.len());
        }
        let turn = assistant_turn(&[
            json!({"type": "message", "content": [{"type": "output_text", "text": "Hi."}]}),
            json!({"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{\"a\": 1}"}),
        ]);
        assert_eq!(turn.content, "Hi.");
        assert_eq!(
            turn.tool_calls.unwrap()[0]["function"]["arguments"],
            json!({"a": 1})
        );
    }
}
