//! How a model writes tool calls, and reading them back out of its output.
//!
//! Two formats, as the catalog's model families write them:
//!
//! - **Hermes** (Qwen 2.5/3, Hermes, SmolLM3, and every template that does not render tools
//!   itself): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call;
//! - **Llama 3 JSON** (Llama 3.1-3.3): the whole turn is `{"name": ..., "parameters": {...}}`,
//!   after an optional `<|python_tag|>`.
//!
//! - **Gemma** (Gemma 3, whose template does not render tools: minserve describes them in the
//!   system turn as Gemma's function-calling guide does): a Python call in a fenced block,
//!   `` ```tool_code\nget_weather(city="Paris")\n``` `` (also a JSON call inside it, or a bare
//!   Python list of calls, `[get_weather(city="Paris")]`, as a whole turn); results go back in
//!   `` ```tool_output `` blocks. Read and written by `python_call.rs`.
//!
//! Every format is read whichever one the model was told to write: the generic fallback takes
//! a turn that is nothing but a call object (or an array of them), with `arguments` or
//! `parameters`, naming an offered tool.
//!
//! [`CallScanner`] reads an output as it streams: text that cannot be part of a call is content
//! at once; a call that opens the usual way, `{"name": "<offered tool>", "arguments": {` (or
//! `"parameters"`), is handed out as it is written: its start (the name) once the opening is
//! complete, then its arguments' JSON text token by token, as the model writes it, up to the
//! brace that closes them. Anything else that may be a call (another key order, arguments as a
//! string, an array of calls) is held until it is complete and handed over whole, its arguments
//! written compactly. A non-streamed response runs the same scanner over the whole text, so the
//! streamed deltas always add up to the non-streamed message.

use minserve_grammar::Grammar;
use minserve_tokenizer::ChatTemplate;
use serde_json::{json, Value};

use crate::python_call::{call_lark, parse_calls, write_call};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const CODE_OPEN: &str = "```tool_code";
const CODE_CLOSE: &str = "```";

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
    Gemma,
}

impl ToolCallFormat {
    /// The names `--tool-call-parser` takes.
    pub const NAMES: [&'static str; 3] = ["hermes", "llama3_json", "gemma"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(Self::Hermes),
            "llama3_json" => Some(Self::Llama3Json),
            "gemma" => Some(Self::Gemma),
            _ => None,
        }
    }

    /// The format a chat template teaches its model: Llama 3's when it renders tools and
    /// speaks of `<|python_tag|>` or the `ipython` role; Gemma's for a Gemma template
    /// (`<start_of_turn>`) that does not render tools; Hermes otherwise (also for other
    /// templates that do not render tools: minserve then describes them in Hermes' words, see
    /// [`ToolCallFormat::system_prompt`]).
    pub fn for_template(template: &ChatTemplate) -> Self {
        let source = template.source();
        if template.renders_tools()
            && (source.contains(PYTHON_TAG) || source.contains("ipython"))
            && !source.contains(OPEN)
        {
            Self::Llama3Json
        } else if !template.renders_tools() && source.contains("<start_of_turn>") {
            Self::Gemma
        } else {
            Self::Hermes
        }
    }

    /// The key a JSON call's arguments go under.
    fn arguments_key(self) -> &'static str {
        match self {
            Self::Hermes | Self::Gemma => "arguments",
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
            Self::Gemma => {
                let mut rules = Vec::new();
                let calls: Vec<String> = tools
                    .iter()
                    .enumerate()
                    .map(|(id, tool)| {
                        let layout = &schema["x-guidance"];
                        call_lark(&tool.name, &tool.parameters, id, layout, &mut rules)
                    })
                    .collect();
                let repeat = if parallel { " (\"\\n\" call)*" } else { "" };
                format!(
                    "start: \"{CODE_OPEN}\\n\" call{repeat} \"\\n{CODE_CLOSE}\"\ncall: {}\n{}",
                    calls.join(" | "),
                    rules.join("\n")
                )
            }
        };
        Grammar::Lark(lark)
    }

    /// For templates that do not render tools: the system text that describes `definitions`
    /// (the request's `tools`) and how to call them, in this format's words (Hermes' for
    /// Llama 3, whose templates render tools themselves).
    pub(crate) fn system_prompt(self, definitions: &Value) -> String {
        if self == Self::Gemma {
            let mut text = String::from(
                "You have access to functions. If you decide to call any of them, write the \
                 call as Python, with keyword arguments, in a tool_code block:\n```tool_code\n\
                 function_name(argument_name=value)\n```\nThe result comes back in a \
                 tool_output block. The functions, in JSON:\n",
            );
            for tool in definitions.as_array().into_iter().flatten() {
                text.push_str(&tool["function"].to_string());
                text.push('\n');
            }
            return text;
        }
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
            Self::Gemma => format!("{CODE_OPEN}\n{}\n{CODE_CLOSE}", write_call(name, arguments)),
        }
    }

    /// A tool's result as this format writes it into a user turn, for templates that do not
    /// render `tool` messages themselves.
    pub(crate) fn result_text(self, result: &str) -> String {
        match self {
            Self::Gemma => format!("```tool_output\n{result}\n{CODE_CLOSE}"),
            Self::Hermes | Self::Llama3Json => {
                format!("<tool_response>\n{result}\n</tool_response>")
            }
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

/// What a piece of output turned out to be. A call comes as its start (the function's name),
/// its arguments' JSON text in one or more fragments, and its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputPiece {
    Content(String),
    CallStart(String),
    CallArguments(String),
    CallEnd,
}

/// A whole call, as the pieces that stream it.
fn push_call(out: &mut Vec<OutputPiece>, call: ParsedCall) {
    out.push(OutputPiece::CallStart(call.name));
    out.push(OutputPiece::CallArguments(call.arguments));
    out.push(OutputPiece::CallEnd);
}

/// The content and the calls of a whole output's pieces, for a response that is not
/// streamed.
pub(crate) fn gather(pieces: Vec<OutputPiece>) -> (String, Vec<ParsedCall>) {
    let mut content = String::new();
    let mut calls: Vec<ParsedCall> = Vec::new();
    for piece in pieces {
        match piece {
            OutputPiece::Content(text) => content.push_str(&text),
            OutputPiece::CallStart(name) => calls.push(ParsedCall {
                name,
                arguments: String::new(),
            }),
            OutputPiece::CallArguments(text) => {
                if let Some(call) = calls.last_mut() {
                    call.arguments.push_str(&text);
                }
            }
            OutputPiece::CallEnd => {}
        }
    }
    (content, calls)
}

/// Reads one choice's output as it grows (see the module doc).
#[derive(Debug)]
pub struct CallScanner {
    tool_names: Vec<String>,
    /// Output not handed out yet.
    pending: String,
    /// Whitespace between pieces, held until content follows (dropped around calls).
    whitespace: String,
    mode: Mode,
    calls: usize,
}

/// Where a [`CallScanner`] is in the output.
#[derive(Debug)]
enum Mode {
    /// Nothing but whitespace yet (or since a whole-turn call): whether JSON calls follow is
    /// not known.
    Start,
    /// Text, with `<tool_call>` blocks.
    Tags,
    /// A turn of JSON (or `<|python_tag|>`) that did not start as a call of an offered tool:
    /// held to the end, then read whole.
    WholeTurn,
    /// Inside a call whose start was handed out: its arguments are handed out as they arrive.
    Call {
        /// In a `<tool_call>` block (which ends at `</tool_call>`), or a whole-turn JSON object
        /// (which ends at its closing brace).
        tagged: bool,
        arguments: ValueEnd,
        /// The arguments ended; the rest of the call is skipped.
        arguments_done: bool,
    },
}

impl CallScanner {
    pub(crate) fn new(tools: &[Tool]) -> Self {
        Self {
            tool_names: tools.iter().map(|t| t.name.clone()).collect(),
            pending: String::new(),
            whitespace: String::new(),
            mode: Mode::Start,
            calls: 0,
        }
    }

    /// Takes `text`, the next piece of output; returns what is settled.
    pub fn push(&mut self, text: &str) -> Vec<OutputPiece> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        self.advance(false, &mut out);
        out
    }

    /// The output ended: what is still held, settled.
    pub fn finish(&mut self) -> Vec<OutputPiece> {
        let mut out = Vec::new();
        self.advance(true, &mut out);
        match self.mode {
            Mode::WholeTurn => {
                let text = std::mem::take(&mut self.pending);
                match self.whole_turn_calls(&text) {
                    Some(calls) => {
                        for call in calls {
                            self.calls += 1;
                            push_call(&mut out, call);
                        }
                    }
                    // Not calls after all: back to reading it as text with tags.
                    None => {
                        self.pending = text;
                        self.scan_tags(true, &mut out);
                    }
                }
            }
            // Cut off inside a call (at the length limit): it ends where the output does.
            Mode::Call { .. } => {
                self.pending.clear();
                self.end_call(&mut out);
            }
            Mode::Start | Mode::Tags => {}
        }
        if self.calls == 0 && !self.whitespace.is_empty() {
            out.push(OutputPiece::Content(std::mem::take(&mut self.whitespace)));
        }
        out
    }

    /// Hands out what `pending` settles; at the `end` of the output everything but a
    /// whole turn of JSON and an unfinished call is.
    fn advance(&mut self, end: bool, out: &mut Vec<OutputPiece>) {
        loop {
            let go_on = match self.mode {
                Mode::Start => self.start(end, out),
                Mode::Tags => self.scan_tags(end, out),
                Mode::WholeTurn => false,
                Mode::Call { .. } => self.stream_call(end, out),
            };
            if !go_on {
                return;
            }
        }
    }

    /// Decides whether the turn (or what follows a whole-turn call) is JSON calls or text;
    /// true when it did.
    fn start(&mut self, end: bool, out: &mut Vec<OutputPiece>) -> bool {
        if self.calls > 0 {
            // Llama 3 separates calls with `;`; whitespace around calls is dropped.
            let rest = self
                .pending
                .trim_start_matches(|c: char| c.is_whitespace() || c == ';')
                .len();
            self.pending.drain(..self.pending.len() - rest);
        }
        let start = self.pending.trim_start();
        // Undecided while it could still become `<|python_tag|>`.
        if !end && (start.is_empty() || (PYTHON_TAG.starts_with(start) && start != PYTHON_TAG)) {
            return false;
        }
        let json = start.strip_prefix(PYTHON_TAG).unwrap_or(start).trim_start();
        if start.starts_with('[') || start.starts_with(PYTHON_TAG) || start.starts_with('{') {
            match call_prefix(json, &self.tool_names) {
                Prefix::Incomplete if !end => return false,
                Prefix::Call { name, len } => {
                    let consumed = self.pending.len() - json.len() + len;
                    self.pending.drain(..consumed);
                    self.start_call(name, false, out);
                }
                _ => self.mode = Mode::WholeTurn,
            }
        } else {
            self.mode = Mode::Tags;
        }
        true
    }

    /// A call of `name` begins: its start is handed out, its arguments follow.
    fn start_call(&mut self, name: String, tagged: bool, out: &mut Vec<OutputPiece>) {
        self.whitespace.clear();
        out.push(OutputPiece::CallStart(name));
        self.mode = Mode::Call {
            tagged,
            arguments: ValueEnd::default(),
            arguments_done: false,
        };
    }

    fn end_call(&mut self, out: &mut Vec<OutputPiece>) {
        out.push(OutputPiece::CallEnd);
        self.calls += 1;
    }

    /// Hands out the arguments of the call being read as far as they arrived, and ends it
    /// once its block (or object) is closed; true when it ended.
    fn stream_call(&mut self, end: bool, out: &mut Vec<OutputPiece>) -> bool {
        let Mode::Call {
            tagged,
            arguments,
            arguments_done,
        } = &mut self.mode
        else {
            return false;
        };
        let tagged = *tagged;
        if !*arguments_done {
            let handed = match arguments.feed(&self.pending) {
                Fed::More => self.pending.len(),
                Fed::End(n) | Fed::Broken(n) => {
                    *arguments_done = true;
                    n
                }
            };
            if handed > 0 {
                out.push(OutputPiece::CallArguments(
                    self.pending.drain(..handed).collect(),
                ));
            }
            if !*arguments_done {
                return false;
            }
        }
        let close = if tagged {
            self.pending.find(CLOSE).map(|i| i + CLOSE.len())
        } else {
            self.pending.find('}').map(|i| i + 1)
        };
        match close {
            Some(close) => {
                self.pending.drain(..close);
                self.end_call(out);
                self.mode = if tagged { Mode::Tags } else { Mode::Start };
                true
            }
            // `finish` ends it.
            None if end => false,
            None => {
                // Nothing up to the close is output: keep only what may begin it.
                let keep = if tagged {
                    partial_suffix(&self.pending, CLOSE)
                } else {
                    0
                };
                self.pending.drain(..self.pending.len() - keep);
                false
            }
        }
    }

    /// Hands out the content and the `<tool_call>` blocks of `pending` that are settled; at
    /// the `end` everything is. True when it entered a call whose arguments stream.
    fn scan_tags(&mut self, end: bool, out: &mut Vec<OutputPiece>) -> bool {
        loop {
            let next_block = [(OPEN, CLOSE), (CODE_OPEN, CODE_CLOSE)]
                .into_iter()
                .filter_map(|(open, close)| Some((self.pending.find(open)?, open, close)))
                .min();
            match next_block {
                Some((open, open_tag, close_tag)) => {
                    let before = self.pending[..open].to_string();
                    self.content(&before, out);
                    let body_start = open + open_tag.len();
                    let prefix = match open_tag {
                        OPEN => call_prefix(&self.pending[body_start..], &self.tool_names),
                        _ => Prefix::No,
                    };
                    match prefix {
                        Prefix::Call { name, len } => {
                            self.pending.drain(..body_start + len);
                            self.start_call(name, true, out);
                            return true;
                        }
                        Prefix::Incomplete if !end => {
                            self.pending.drain(..open);
                            return false;
                        }
                        // Not a call that can stream: read whole once the block is closed.
                        _ => {}
                    }
                    let close = self.pending[body_start..].find(close_tag);
                    let (body, consumed) = match close {
                        Some(c) => (
                            &self.pending[body_start..body_start + c],
                            body_start + c + close_tag.len(),
                        ),
                        // A call cut off by the end of the output: taken if it parses.
                        None if end => (&self.pending[body_start..], self.pending.len()),
                        None => {
                            self.pending.drain(..open);
                            return false;
                        }
                    };
                    let block = self.pending[open..consumed].to_string();
                    let calls = match open_tag {
                        OPEN => self.call_from_json(body.trim()).map(|call| vec![call]),
                        _ => self
                            .whole_turn_calls(body)
                            .or_else(|| self.python_calls(body)),
                    };
                    match calls {
                        Some(calls) => {
                            self.whitespace.clear();
                            for call in calls {
                                self.calls += 1;
                                push_call(out, call);
                            }
                        }
                        None => self.content(&block, out),
                    }
                    self.pending.drain(..consumed);
                }
                None => {
                    // Hold a tail that may still open a block.
                    let keep = if end {
                        0
                    } else {
                        partial_suffix(&self.pending, OPEN)
                            .max(partial_suffix(&self.pending, CODE_OPEN))
                    };
                    let settled = self.pending.len() - keep;
                    let text = self.pending[..settled].to_string();
                    self.content(&text, out);
                    self.pending.drain(..settled);
                    return false;
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
            .or_else(|| self.python_calls(text))
    }

    /// The Python-style calls `text` holds (Gemma's), if that is all it holds.
    fn python_calls(&self, text: &str) -> Option<Vec<ParsedCall>> {
        let calls = parse_calls(text, &self.tool_names)?;
        let calls = calls.into_iter().map(|(name, arguments)| ParsedCall {
            name,
            arguments: arguments.to_string(),
        });
        Some(calls.collect())
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

/// How far a text is along a call's opening, `{"name": "<offered tool>", "arguments": `
/// (or `"parameters"`), up to the `{` that opens its arguments.
#[derive(Debug, PartialEq, Eq)]
enum Prefix {
    /// It may still become one.
    Incomplete,
    /// It cannot: another key order, an unknown tool, arguments that are not an object.
    No,
    /// It is one: the call's name, and the length of the opening (the arguments start there).
    Call { name: String, len: usize },
}

fn call_prefix(text: &str, tool_names: &[String]) -> Prefix {
    let mut at = 0;
    let skip_whitespace = |at: &mut usize| {
        *at = text.len() - text[*at..].trim_start().len();
    };
    // `literal` at `at`: moved past it, or why not.
    let literal = |at: &mut usize, literal: &str| -> Option<Prefix> {
        let rest = &text[*at..];
        if rest.starts_with(literal) {
            *at += literal.len();
            None
        } else if literal.starts_with(rest) {
            Some(Prefix::Incomplete)
        } else {
            Some(Prefix::No)
        }
    };
    for step in ["{", "\"name\"", ":"] {
        skip_whitespace(&mut at);
        if let Some(stop) = literal(&mut at, step) {
            return stop;
        }
    }
    skip_whitespace(&mut at);
    let rest = &text[at..];
    if rest.is_empty() {
        return Prefix::Incomplete;
    }
    if !rest.starts_with('"') {
        return Prefix::No;
    }
    let Some(close) = string_end(rest) else {
        return Prefix::Incomplete;
    };
    let name: String = match serde_json::from_str(&rest[..close]) {
        Ok(name) => name,
        Err(_) => return Prefix::No,
    };
    if !tool_names.contains(&name) {
        return Prefix::No;
    }
    at += close;
    skip_whitespace(&mut at);
    if let Some(stop) = literal(&mut at, ",") {
        return stop;
    }
    skip_whitespace(&mut at);
    let mut keys = ["\"arguments\"", "\"parameters\""].map(|key| {
        let mut after = at;
        (literal(&mut after, key), after)
    });
    keys.sort_by_key(|(stop, _)| match stop {
        None => 0,
        Some(Prefix::Incomplete) => 1,
        Some(_) => 2,
    });
    match &keys[0] {
        (None, after) => at = *after,
        (Some(Prefix::Incomplete), _) => return Prefix::Incomplete,
        _ => return Prefix::No,
    }
    skip_whitespace(&mut at);
    if let Some(stop) = literal(&mut at, ":") {
        return stop;
    }
    skip_whitespace(&mut at);
    match text[at..].chars().next() {
        None => Prefix::Incomplete,
        Some('{') => Prefix::Call { name, len: at },
        Some(_) => Prefix::No,
    }
}

/// The length of the JSON string literal `text` starts with (its closing quote included), if
/// it is closed.
fn string_end(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// Follows a JSON value as it arrives, to find where it ends.
#[derive(Debug, Default)]
struct ValueEnd {
    depth: usize,
    in_string: bool,
    escaped: bool,
}

/// What a piece of a JSON value held.
enum Fed {
    /// The value goes on past it.
    More,
    /// The value ends after this many bytes.
    End(usize),
    /// The value is broken off here (a `<` outside a string: a tag, never JSON).
    Broken(usize),
}

impl ValueEnd {
    fn feed(&mut self, text: &str) -> Fed {
        for (i, c) in text.char_indices() {
            if self.in_string {
                match c {
                    _ if self.escaped => self.escaped = false,
                    '\\' => self.escaped = true,
                    '"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '"' => self.in_string = true,
                '{' | '[' => self.depth += 1,
                '}' | ']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Fed::End(i + 1);
                    }
                }
                '<' => return Fed::Broken(i),
                _ => {}
            }
        }
        Fed::More
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

    /// What a scan read: content, or a whole call.
    #[derive(Debug, PartialEq, Eq)]
    enum Read {
        Content(String),
        Call(String, String),
    }

    /// What `text` fed in chunks of `chunk` chars reads as: adjacent content merged, each
    /// call's argument fragments joined.
    fn scan(text: &str, chunk: usize) -> Vec<Read> {
        let mut s = scanner();
        let mut pieces = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for part in chars.chunks(chunk) {
            pieces.extend(s.push(&part.iter().collect::<String>()));
        }
        pieces.extend(s.finish());
        let mut read: Vec<Read> = Vec::new();
        let mut open_call = false;
        for piece in pieces {
            match (read.last_mut(), piece) {
                (Some(Read::Content(a)), OutputPiece::Content(b)) => a.push_str(&b),
                (_, OutputPiece::Content(b)) => read.push(Read::Content(b)),
                (_, OutputPiece::CallStart(name)) => {
                    assert!(!open_call, "a call started inside a call");
                    open_call = true;
                    read.push(Read::Call(name, String::new()));
                }
                (Some(Read::Call(_, args)), OutputPiece::CallArguments(text)) if open_call => {
                    args.push_str(&text)
                }
                (_, OutputPiece::CallEnd) if open_call => open_call = false,
                (_, piece) => panic!("{piece:?} outside a call"),
            }
        }
        assert!(!open_call, "a call never ended");
        read
    }

    fn call(name: &str, arguments: &str) -> Read {
        Read::Call(name.into(), arguments.into())
    }

    #[test]
    fn any_chunking_reads_the_same_calls_and_content() {
        let cases = [
            (
                "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n</tool_call>",
                vec![
                    Read::Content("Let me check.".into()),
                    call("get_weather", r#"{"city": "Paris"}"#),
                    call("add", r#"{"a": 1}"#),
                ],
            ),
            // Llama 3 JSON and the generic fallback.
            (
                "<|python_tag|>{\"name\": \"add\", \"parameters\": {\"a\": 2}}",
                vec![call("add", r#"{"a": 2}"#)],
            ),
            (
                "{\"name\": \"add\", \"parameters\": {\"a\": {\"b\": [1, \"}\"]}}}; {\"name\": \"get_weather\", \"parameters\": {}}",
                vec![
                    call("add", r#"{"a": {"b": [1, "}"]}}"#),
                    call("get_weather", "{}"),
                ],
            ),
            // Gemma's tool_code blocks (Python or JSON inside), and a bare list of Python calls.
            (
                "Sure.\n```tool_code\nadd(a=1, b=2)\n```",
                vec![Read::Content("Sure.".into()), call("add", r#"{"a":1,"b":2}"#)],
            ),
            (
                "```tool_code\nget_weather(city=\"Paris\")\nadd(a=3, b=4)\n```",
                vec![call("get_weather", r#"{"city":"Paris"}"#), call("add", r#"{"a":3,"b":4}"#)],
            ),
            (
                "```tool_code\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n```",
                vec![call("add", r#"{"a":1}"#)],
            ),
            ("[add(a=1, b=2)]", vec![call("add", r#"{"a":1,"b":2}"#)]),
            (
                "Run ```python\nprint(1)\n``` or ```tool_code\nrm(x=1)\n```",
                vec![Read::Content("Run ```python\nprint(1)\n``` or ```tool_code\nrm(x=1)\n```".into())],
            ),
            // Held whole: another key order.
            (
                "<tool_call>{\"arguments\": {\"a\": 1}, \"name\": \"add\"}</tool_call> Done.",
                vec![call("add", r#"{"a":1}"#), Read::Content(" Done.".into())],
            ),
            // A tag inside a string argument is text; outside one, it breaks the call off.
            (
                "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": \"</tool_call>\"}}</tool_call>",
                vec![call("add", r#"{"a": "</tool_call>"}"#)],
            ),
            (
                "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": </tool_call>Sorry.",
                vec![call("add", r#"{"a": "#), Read::Content("Sorry.".into())],
            ),
            (
                " [{\"name\": \"add\", \"arguments\": \"{\\\"a\\\": 3}\"}]",
                vec![call("add", r#"{"a":3}"#)],
            ),
            // Not calls: an unknown tool, broken JSON, plain text with a `<` in it.
            (
                "<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>",
                vec![Read::Content("<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>".into())],
            ),
            ("{\"a\": 1", vec![Read::Content("{\"a\": 1".into())]),
            ("1 < 2 and <tool", vec![Read::Content("1 < 2 and <tool".into())]),
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
    fn arguments_stream_as_they_are_written() {
        let mut s = scanner();
        let mut pieces = s.push("<tool_call>\n{\"name\": \"get_weather\", \"arg");
        assert_eq!(pieces, []);
        pieces = s.push("uments\": {\"ci");
        assert_eq!(
            pieces,
            [
                OutputPiece::CallStart("get_weather".into()),
                OutputPiece::CallArguments("{\"ci".into())
            ]
        );
        pieces = s.push("ty\": \"Pa");
        assert_eq!(pieces, [OutputPiece::CallArguments("ty\": \"Pa".into())]);
        pieces = s.push("ris\"}}\n</tool");
        assert_eq!(pieces, [OutputPiece::CallArguments("ris\"}".into())]);
        pieces = s.push("_call>");
        assert_eq!(pieces, [OutputPiece::CallEnd]);
        assert_eq!(s.finish(), []);
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
