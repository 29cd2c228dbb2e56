//! How a model writes tool calls, and reading them back out of its output.
//!
//! Two formats, as the catalog's model families write them:
//!
//! - **Hermes** (Qwen 2.5/3, Hermes, SmolLM3, and every template that does not render tools
//!   itself): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call;
//! - **Llama 3 JSON** (Llama 3.1-3.3): the whole turn is `{"name": ..., "parameters": {...}}`,
//!   after an optional `<|python_tag|>`.
//!
//! Both also take the generic JSON fallback: a turn that is nothing but a call object (or an
//! array of them), with `arguments` or `parameters`, naming an offered tool.
//!
//! [`CallScanner`] reads an output as it streams: text that cannot be part of a call is content
//! at once; a call is held until it is complete, then handed over whole. A non-streamed
//! response runs the same scanner over the whole text, so the streamed deltas always add up to
//! the non-streamed message.

use minserve_grammar::Grammar;
use minserve_tokenizer::ChatTemplate;
use serde_json::{json, Value};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

/// One function the model may call.
#[derive(Debug, Clone)]
pub(crate) struct Tool {
    pub name: String,
    /// The JSON schema of its arguments (an object schema).
    pub parameters: Value,
}

/// A model family's way of writing calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    Hermes,
    Llama3Json,
}

impl ToolCallFormat {
    /// The names `--tool-call-parser` takes.
    pub const NAMES: [&'static str; 2] = ["hermes", "llama3_json"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(Self::Hermes),
            "llama3_json" => Some(Self::Llama3Json),
            _ => None,
        }
    }

    /// The format a chat template teaches its model: Llama 3's when it speaks of
    /// `<|python_tag|>` or the `ipython` role, Hermes otherwise (also for templates that do not
    /// render tools at all: minserve then describes them in Hermes' words, see
    /// [`ToolCallFormat::system_prompt`]).
    pub fn for_template(template: &ChatTemplate) -> Self {
        let source = template.source();
        if template.renders_tools()
            && (source.contains(PYTHON_TAG) || source.contains("ipython"))
            && !source.contains(OPEN)
        {
            Self::Llama3Json
        } else {
            Self::Hermes
        }
    }

    /// The key a call's arguments go under.
    fn arguments_key(self) -> &'static str {
        match self {
            Self::Hermes => "arguments",
            Self::Llama3Json => "parameters",
        }
    }

    /// A grammar whose sentences are calls of `tools` with valid arguments: one, or with
    /// `parallel` one or more (Hermes only; Llama 3 writes one call per turn).
    pub(crate) fn call_grammar(self, tools: &[&Tool], parallel: bool) -> Grammar {
        let key = self.arguments_key();
        let calls: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, key: t.parameters},
                    "required": ["name", key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = json!({"anyOf": calls});
        // Lark's `%json` does not pass through minserve's JSON defaults: the same compact
        // layout, stated here.
        schema["x-guidance"] = json!({
            "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ",
        });
        let call = format!("%json {schema}");
        let lark = match self {
            Self::Hermes if parallel => {
                format!("start: call (\"\\n\" call)*\ncall: \"{OPEN}\\n\" {call} \"\\n{CLOSE}\"")
            }
            Self::Hermes => format!("start: \"{OPEN}\\n\" {call} \"\\n{CLOSE}\""),
            Self::Llama3Json => format!("start: {call}"),
        };
        Grammar::Lark(lark)
    }

    /// For templates that do not render tools: the system text that describes `definitions`
    /// (the request's `tools`) and how to call them, in Hermes' words.
    pub(crate) fn system_prompt(definitions: &Value) -> String {
        let mut text = String::from(
            "You may call one or more functions to answer the user. The functions are \
             described in JSON within <tools></tools>:\n<tools>\n",
        );
        for tool in definitions.as_array().into_iter().flatten() {
            text.push_str(&tool.to_string());
            text.push('\n');
        }
        text.push_str(
            "</tools>\nTo call a function, answer with its name and arguments as a JSON \
             object within <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": \
             <function-name>, \"arguments\": <arguments-json-object>}\n</tool_call>",
        );
        text
    }

    /// An assistant's earlier call as this format writes it, for templates that do not render
    /// `tool_calls` themselves.
    pub(crate) fn call_text(self, name: &str, arguments: &Value) -> String {
        let call = json!({"name": name, self.arguments_key(): arguments});
        match self {
            Self::Hermes => format!("{OPEN}\n{call}\n{CLOSE}"),
            Self::Llama3Json => call.to_string(),
        }
    }
}

/// A call read from the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments object, as JSON text.
    pub arguments: String,
}

/// What a piece of output turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputPiece {
    Content(String),
    Call(ParsedCall),
}

/// Reads one choice's output as it grows (see the module doc).
#[derive(Debug)]
pub struct CallScanner {
    tool_names: Vec<String>,
    /// Output not handed out yet.
    pending: String,
    /// Whitespace between pieces, held until content follows (dropped around calls).
    whitespace: String,
    /// The turn started with JSON or `<|python_tag|>`: all of it is held to the end.
    whole_turn: Option<bool>,
    calls: usize,
}

impl CallScanner {
    pub(crate) fn new(tools: &[Tool]) -> Self {
        Self {
            tool_names: tools.iter().map(|t| t.name.clone()).collect(),
            pending: String::new(),
            whitespace: String::new(),
            whole_turn: None,
            calls: 0,
        }
    }

    /// Takes `text`, the next piece of output; returns what is settled.
    pub fn push(&mut self, text: &str) -> Vec<OutputPiece> {
        self.pending.push_str(text);
        if self.whole_turn.is_none() {
            let start = self.pending.trim_start();
            // Undecided while it could still become `<|python_tag|>`.
            if start.is_empty() || (PYTHON_TAG.starts_with(start) && start != PYTHON_TAG) {
                return Vec::new();
            }
            let json_like =
                start.starts_with('{') || start.starts_with('[') || start.starts_with(PYTHON_TAG);
            self.whole_turn = Some(json_like);
        }
        let mut out = Vec::new();
        if self.whole_turn == Some(false) {
            self.scan_tags(false, &mut out);
        }
        out
    }

    /// The output ended: what is still held, settled.
    pub fn finish(&mut self) -> Vec<OutputPiece> {
        let mut out = Vec::new();
        if self.whole_turn == Some(true) {
            let text = std::mem::take(&mut self.pending);
            match self.whole_turn_calls(&text) {
                Some(calls) => {
                    for call in calls {
                        self.calls += 1;
                        out.push(OutputPiece::Call(call));
                    }
                }
                // Not calls after all: back to reading it as text with tags.
                None => {
                    self.pending = text;
                    self.scan_tags(true, &mut out);
                }
            }
        } else {
            self.scan_tags(true, &mut out);
        }
        if self.calls == 0 && !self.whitespace.is_empty() {
            out.push(OutputPiece::Content(std::mem::take(&mut self.whitespace)));
        }
        out
    }

    /// Hands out the content and the `<tool_call>` blocks of `pending` that are settled; at
    /// the `end` everything is.
    fn scan_tags(&mut self, end: bool, out: &mut Vec<OutputPiece>) {
        loop {
            match self.pending.find(OPEN) {
                Some(open) => {
                    let before = self.pending[..open].to_string();
                    self.content(&before, out);
                    let body_start = open + OPEN.len();
                    let close = self.pending[body_start..].find(CLOSE);
                    let (body, consumed) = match close {
                        Some(c) => (
                            &self.pending[body_start..body_start + c],
                            body_start + c + CLOSE.len(),
                        ),
                        // A call cut off by the end of the output: taken if it parses.
                        None if end => (&self.pending[body_start..], self.pending.len()),
                        None => {
                            self.pending.drain(..open);
                            return;
                        }
                    };
                    let block = self.pending[open..consumed].to_string();
                    match self.call_from_json(body.trim()) {
                        Some(call) => {
                            self.whitespace.clear();
                            self.calls += 1;
                            out.push(OutputPiece::Call(call));
                        }
                        None => self.content(&block, out),
                    }
                    self.pending.drain(..consumed);
                }
                None => {
                    // Hold a tail that may still become `<tool_call>`.
                    let keep = if end {
                        0
                    } else {
                        partial_suffix(&self.pending, OPEN)
                    };
                    let settled = self.pending.len() - keep;
                    let text = self.pending[..settled].to_string();
                    self.content(&text, out);
                    self.pending.drain(..settled);
                    return;
                }
            }
        }
    }

    /// Content, with whitespace held until something other than whitespace follows it.
    fn content(&mut self, text: &str, out: &mut Vec<OutputPiece>) {
        if text.is_empty() {
            return;
        }
        if text.trim().is_empty() {
            self.whitespace.push_str(text);
            return;
        }
        let mut piece = std::mem::take(&mut self.whitespace);
        let body = text.trim_end();
        piece.push_str(body);
        self.whitespace.push_str(&text[body.len()..]);
        match out.last_mut() {
            Some(OutputPiece::Content(last)) => last.push_str(&piece),
            _ => out.push(OutputPiece::Content(piece)),
        }
    }

    /// The calls of a turn that is all JSON: one object, an array, or (Llama 3) objects
    /// separated by `;`.
    fn whole_turn_calls(&self, text: &str) -> Option<Vec<ParsedCall>> {
        let text = text.trim();
        let text = text.strip_prefix(PYTHON_TAG).unwrap_or(text).trim();
        if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text) {
            return items.iter().map(|v| self.call_from_value(v)).collect();
        }
        text.split(';')
            .filter(|part| !part.trim().is_empty())
            .map(|part| self.call_from_json(part.trim()))
            .collect::<Option<Vec<_>>>()
            .filter(|calls| !calls.is_empty())
    }

    fn call_from_json(&self, text: &str) -> Option<ParsedCall> {
        self.call_from_value(&serde_json::from_str(text).ok()?)
    }

    /// `{"name": <an offered tool>, "arguments" | "parameters": {...}}`.
    fn call_from_value(&self, v: &Value) -> Option<ParsedCall> {
        let name = v.get("name")?.as_str()?;
        if !self.tool_names.iter().any(|t| t == name) {
            return None;
        }
        let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
            None => json!({}),
            // Some models write the arguments as a JSON string, as OpenAI sends them.
            Some(Value::String(s)) => serde_json::from_str(s).ok()?,
            Some(args) => args.clone(),
        };
        arguments.is_object().then(|| ParsedCall {
            name: name.to_string(),
            arguments: arguments.to_string(),
        })
    }
}

/// The length of the longest end of `text` that is a proper start of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| {
            text.len() >= n
                && text.is_char_boundary(text.len() - n)
                && tag.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanner() -> CallScanner {
        let tool = |name: &str| Tool {
            name: name.into(),
            parameters: json!({"type": "object"}),
        };
        CallScanner::new(&[tool("get_weather"), tool("add")])
    }

    /// The pieces of `text` fed in chunks of `chunk` bytes (at char boundaries), merged.
    fn scan(text: &str, chunk: usize) -> Vec<OutputPiece> {
        let mut s = scanner();
        let mut pieces = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for part in chars.chunks(chunk) {
            pieces.extend(s.push(&part.iter().collect::<String>()));
        }
        pieces.extend(s.finish());
        let mut merged: Vec<OutputPiece> = Vec::new();
        for piece in pieces {
            match (merged.last_mut(), piece) {
                (Some(OutputPiece::Content(a)), OutputPiece::Content(b)) => a.push_str(&b),
                (_, piece) => merged.push(piece),
            }
        }
        merged
    }

    fn call(name: &str, arguments: &str) -> OutputPiece {
        OutputPiece::Call(ParsedCall {
            name: name.into(),
            arguments: arguments.into(),
        })
    }

    #[test]
    fn any_chunking_reads_the_same_calls_and_content() {
        let cases = [
            (
                "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n</tool_call>",
                vec![
                    OutputPiece::Content("Let me check.".into()),
                    call("get_weather", r#"{"city":"Paris"}"#),
                    call("add", r#"{"a":1}"#),
                ],
            ),
            // Llama 3 JSON and the generic fallback.
            (
                "<|python_tag|>{\"name\": \"add\", \"parameters\": {\"a\": 2}}",
                vec![call("add", r#"{"a":2}"#)],
            ),
            (
                " [{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 3}\"}]",
                vec![call("add", r#"{"a":3}"#)],
            ),
            // Not calls: an unknown tool, broken JSON, plain text with a `<` in it.
            (
                "<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>",
                vec![OutputPiece::Content("<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>".into())],
            ),
            ("{\"a\": 1", vec![OutputPiece::Content("{\"a\": 1".into())]),
            ("1 < 2 and <tool", vec![OutputPiece::Content("1 < 2 and <tool".into())]),
            // An unclosed call at the end still counts.
            (
                "<tool_call>\n{\"name\": \"add\", \"arguments\": {}}",
                vec![call("add", "{}")],
            ),
        ];
        for (text, want) in cases {
            for chunk in [1, 3, 7, 1000] {
                assert_eq!(scan(text, chunk), want, "{text:?} in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn the_forced_call_grammar_names_the_tools() {
        let tool = Tool {
            name: "add".into(),
            parameters: json!({"type": "object", "properties": {"a": {"type": "integer"}}}),
        };
        let Grammar::Lark(lark) = ToolCallFormat::Hermes.call_grammar(&[&tool], true) else {
            panic!("a Lark grammar");
        };
        assert!(
            lark.contains("<tool_call>") && lark.contains("\"const\":\"add\""),
            "{lark}"
        );
    }
}
