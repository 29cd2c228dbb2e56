//! Chat templates: the Jinja programs shipped with instruct models that turn a list of chat
//! messages into the exact prompt text the model was fine-tuned on.
//!
//! Templates are written for Python's `jinja2` as configured by Hugging Face `transformers`, so
//! the environment here mirrors that one rather than minijinja's defaults: `trim_blocks` and
//! `lstrip_blocks` on, Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...)
//! through `minijinja_contrib::pycompat`, a `raise_exception(msg)` function, and a `tojson`
//! filter that writes JSON the way Python's `json.dumps(..., ensure_ascii=False)` does (minijinja's
//! built-in `tojson` escapes `<`, `>`, `&` and `'` for HTML, which would change the prompt).

use std::collections::BTreeMap;
use std::fmt;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TokenizerError};

/// Name under which the template is stored in its environment; it shows up in error messages
/// as `(in chat_template:LINE)`.
const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation, as the OpenAI API and chat templates see it. Fields a
/// message does not have are left out of what the template sees (templates test them with
/// `is defined`), as Hugging Face's `apply_chat_template` passes the messages it is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, ... (templates decide which roles they accept).
    pub role: String,
    /// The message text.
    pub content: String,
    /// An assistant's calls: `{"id", "type": "function", "function": {"name", "arguments"}}`,
    /// the arguments as a JSON object (templates write them with `tojson`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` message: the function that answered (templates that show it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// Convenience constructor, mostly for tests and examples.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// What a template is rendered with besides the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions<'a> {
    /// Append the header that opens the assistant's turn.
    pub add_generation_prompt: bool,
    /// The request's tools (`[{"type": "function", "function": {...}}]`), as `tools`.
    pub tools: Option<&'a serde_json::Value>,
    /// More variables (a request's `chat_template_kwargs`, e.g. `enable_thinking`); the
    /// variables above and the special tokens take precedence.
    pub extra: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

/// A compiled chat template.
///
/// Compiling once at load time means a broken template is reported when the model is loaded,
/// not on the first chat request, and rendering does not re-parse the template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The environment is opaque and the source can be kilobytes long: show what identifies it.
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` / `eos_token` are the strings templates see as
    /// `bos_token` / `eos_token`; `None` leaves the variable undefined (it renders as an empty
    /// string), which is what `transformers` does for a tokenizer without that token.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        // Hugging Face compiles templates with these two options; without them the whitespace
        // around `{% ... %}` tags leaks into the prompt.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|source| TokenizerError::TemplateCompile { source })?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.map(str::to_owned),
            eos_token: eos_token.map(str::to_owned),
        })
    }

    /// Whether the template reads the `tools` variable (renders tool definitions itself).
    pub fn renders_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// The template text, as given to [`ChatTemplate::new`] (used when exporting it again).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` into a prompt. With `add_generation_prompt` the template appends the
    /// header that opens the assistant's turn (e.g. `<|im_start|>assistant\n`), which is what a
    /// server wants before generating a reply.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let options = RenderOptions {
            add_generation_prompt,
            ..RenderOptions::default()
        };
        self.render_with(messages, &options)
    }

    /// Renders `messages` with `options`: tools and extra variables, as `transformers`'
    /// `apply_chat_template(..., tools=..., **kwargs)` and vLLM's `chat_template_kwargs` pass
    /// them: Qwen3's template reads `enable_thinking` (false closes an empty
    /// `<think></think>` block after the generation prompt, so the model answers without
    /// reasoning).
    pub fn render_with(&self, messages: &[ChatMessage], options: &RenderOptions) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|source| TokenizerError::TemplateRender { source })?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        for (key, value) in options.extra.into_iter().flatten() {
            ctx.insert(key.as_str(), Value::from_serialize(value));
        }
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert(
            "add_generation_prompt",
            Value::from(options.add_generation_prompt),
        );
        if let Some(tools) = options.tools {
            ctx.insert("tools", Value::from_serialize(tools));
        }
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token", Value::from(eos.as_str()));
        }
        template
            .render(ctx)
            .map_err(|source| TokenizerError::TemplateRender { source })
    }
}

/// Templates call this to reject conversations they cannot format (e.g. roles that do not
/// alternate); the message must reach the API caller, so it becomes the render error's detail.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as Hugging Face defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(n) = v.as_i64() {
                Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
            } else if let Some(s) = v.as_str() {
                Some(s.to_owned())
            } else {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        }
    };
    // Python's defaults: no indent -> (", ", ": "), with indent -> (",", ": ").
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair (item_separator, key_separator)",
            ))
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let writer = JsonWriter {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    writer.write(&value, 0, &mut out)?;
    Ok(Value::from(out))
}

/// A small JSON writer that reproduces Python's `json.dumps` layout, which `serde_json` cannot
/// (it has no `", "` separators and sorts or reorders map keys depending on features).
struct JsonWriter {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl JsonWriter {
    fn write(
        &self,
        value: &Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined => Err(Error::new(
                ErrorKind::UndefinedError,
                "tojson: cannot serialize an undefined value",
            )),
            ValueKind::None => {
                out.push_str("null");
                Ok(())
            }
            ValueKind::Bool => {
                out.push_str(if value.is_true() { "true" } else { "false" });
                Ok(())
            }
            ValueKind::Number => {
                write_number(value, out);
                Ok(())
            }
            ValueKind::String => {
                self.write_str(value.as_str().unwrap_or_default(), out);
                Ok(())
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                let entries = keys
                    .into_iter()
                    .map(|k| {
                        let v = value.get_item(&k)?;
                        Ok((k, v))
                    })
                    .collect::<std::result::Result<Vec<_>, Error>>()?;
                self.write_container(&entries, '{', '}', level, out, |(k, v), out| {
                    // JSON object keys are strings; Python stringifies numbers, bools and None.
                    match k.kind() {
                        ValueKind::String => self.write_str(k.as_str().unwrap_or_default(), out),
                        ValueKind::None => self.write_str("null", out),
                        ValueKind::Bool => {
                            self.write_str(if k.is_true() { "true" } else { "false" }, out)
                        }
                        _ => self.write_str(&k.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(v, level + 1, out)
                })
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(&items, '[', ']', level, out, |v, out| {
                    self.write(v, level + 1, out)
                })
            }
            _ => {
                // Anything else (bytes, plain objects) has no JSON form in Python either; use its
                // string form rather than failing the whole prompt.
                self.write_str(&value.to_string(), out);
                Ok(())
            }
        }
    }

    fn write_container<T>(
        &self,
        items: &[T],
        open: char,
        close: char,
        level: usize,
        out: &mut String,
        mut write_item: impl FnMut(&T, &mut String) -> std::result::Result<(), Error>,
    ) -> std::result::Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(level + 1));
            }
            write_item(item, out)?;
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
        out.push(close);
        Ok(())
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Numbers the way Python prints them: integers as-is, floats always with a fraction or exponent
/// (`1.0`, not `1`), non-finite floats as `NaN` / `Infinity`.
fn write_number(value: &Value, out: &mut String) {
    if value.is_integer() {
        out.push_str(&value.to_string());
        return;
    }
    match f64::try_from(value.clone()) {
        Ok(f) if f.is_nan() => out.push_str("NaN"),
        Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" }),
        Ok(f) if f.fract() == 0.0 && f.abs() < 1e16 => out.push_str(&format!("{f:.1}")),
        Ok(f) => out.push_str(&format!("{f}")),
        Err(_) => out.push_str(&value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_expr(expr: &str) -> String {
        let t = ChatTemplate::new(expr, None, None).expect("compiles");
        t.render(&[], false).expect("renders")
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        assert_eq!(
            render_expr(r#"{{ {"a": 1, "b": [true, none, "x<y>'&\"\n"], "c": 1.5} | tojson }}"#),
            r#"{"a": 1, "b": [true, null, "x<y>'&\"\n"], "c": 1.5}"#
        );
        assert_eq!(
            render_expr(r#"{{ {"b": 1, "a": [1, 2]} | tojson(indent=2, sort_keys=true) }}"#),
            "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": 1\n}"
        );
        assert_eq!(render_expr(r#"{{ "é😀" | tojson }}"#), "\"é😀\"");
        assert_eq!(
            render_expr(r#"{{ "é😀" | tojson(ensure_ascii=true) }}"#),
            r#""\u00e9\ud83d\ude00""#
        );
        assert_eq!(render_expr(r#"{{ [] | tojson }}{{ {} | tojson }}"#), "[]{}");
    }

    #[test]
    fn python_string_methods_work() {
        assert_eq!(
            render_expr(r#"{{ "  hi  ".strip() }}|{{ "abc".startswith("ab") }}"#),
            "hi|True"
        );
    }

    #[test]
    fn bos_and_eos_are_visible_and_undefined_when_absent() {
        let t = ChatTemplate::new("[{{ bos_token }}|{{ eos_token }}]", Some("<s>"), None)
            .expect("compiles");
        assert_eq!(t.render(&[], false).expect("renders"), "[<s>|]");
    }

    #[test]
    fn blocks_are_trimmed_like_hugging_face() {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, None, None).expect("compiles");
        let out = t
            .render(
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                false,
            )
            .expect("renders");
        assert_eq!(out, "a\nb\n");
    }
}
