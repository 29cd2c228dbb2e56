//! Calls written as Python, the way Gemma writes tool calls: `get_weather(city="Paris",
//! days=3)`, keyword arguments only, their values Python literals (strings in either quote,
//! numbers, `True` / `False` / `None`, lists, dicts) or JSON ones. Read into JSON arguments,
//! written back for a prompt, and described as a grammar for a forced call.

use serde_json::{json, Map, Number, Value};

/// A call read: the function's name and its arguments as a JSON object.
pub(crate) type Call = (String, Value);

/// The calls in `text`: one per line (or separated by `;`), or a Python list of calls
/// (`[f(a=1), g()]`); each must name one of `tool_names`. `None` unless all of it reads as
/// calls.
pub(crate) fn parse_calls(text: &str, tool_names: &[String]) -> Option<Vec<Call>> {
    let mut reader = Reader { text, at: 0 };
    reader.skip_whitespace();
    let bracketed = reader.eat('[');
    let mut calls = Vec::new();
    loop {
        reader.skip_whitespace();
        if bracketed && reader.eat(']') {
            break;
        }
        if !bracketed && reader.at_end() {
            break;
        }
        let call = reader.call()?;
        if !tool_names.contains(&call.0) {
            return None;
        }
        calls.push(call);
        reader.skip_whitespace();
        if !(reader.eat(',') || reader.eat(';')) && bracketed && !reader.peek_is(']') {
            return None;
        }
    }
    reader.skip_whitespace();
    (reader.at_end() && !calls.is_empty()).then_some(calls)
}

/// `name(key=value, ...)` with the values written as compact JSON (which the reader takes
/// back), for a call the model made earlier.
pub(crate) fn write_call(name: &str, arguments: &Value) -> String {
    let arguments: Vec<String> = arguments
        .as_object()
        .into_iter()
        .flatten()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    format!("{name}({})", arguments.join(", "))
}

/// A Lark expression whose sentences are calls of function `name` with valid arguments
/// (`parameters`, their JSON schema): its declared
/// parameters in their order, the required ones always, the others optional, each value
/// written by `%json` with the parameter's schema in `layout` (the compact JSON layout). The
/// rules it needs are added to `rules`, named after `id`.
pub(crate) fn call_lark(
    name: &str,
    parameters: &Value,
    id: usize,
    layout: &Value,
    rules: &mut Vec<String>,
) -> String {
    let properties: Vec<(&String, &Value)> = parameters
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    let required: Vec<&str> = parameters
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut arguments = Arguments {
        id,
        layout,
        properties,
        required,
        rules,
    };
    let open = json!(format!("{name}("));
    match arguments.properties.is_empty() {
        true => format!("{open} \")\""),
        false => format!("{open} {} \")\"", arguments.from(0, true)),
    }
}

/// Builds the grammar of one call's keyword arguments.
struct Arguments<'a> {
    id: usize,
    layout: &'a Value,
    properties: Vec<(&'a String, &'a Value)>,
    required: Vec<&'a str>,
    rules: &'a mut Vec<String>,
}

impl Arguments<'_> {
    /// The name of the rule for the arguments from `j` on (`first`: none written before them),
    /// defined in `rules` the first time it is asked for.
    fn rule(&mut self, j: usize, first: bool) -> String {
        let name = format!("a{}_{j}_{}", self.id, if first { "f" } else { "r" });
        let defined = format!("{name}: ");
        if !self.rules.iter().any(|r| r.starts_with(&defined)) {
            // Reserved before it is built: the expression refers to later rules only.
            self.rules.push(defined.clone());
            let body = self.from(j, first);
            let slot = self
                .rules
                .iter_mut()
                .find(|r| **r == defined)
                .expect("reserved");
            slot.push_str(&body);
        }
        name
    }

    /// The expression for the arguments from `j` on.
    fn from(&mut self, j: usize, first: bool) -> String {
        let (name, schema) = self.properties[j];
        let mut schema = if schema.is_object() {
            schema.clone()
        } else {
            json!({})
        };
        schema["x-guidance"] = self.layout.clone();
        let separator = if first { "" } else { ", " };
        let pair = format!("{} %json {schema}", json!(format!("{separator}{name}=")));
        let more = j + 1 < self.properties.len();
        let required = self.required.contains(&name.as_str());
        match (required, more) {
            (true, true) => format!("{pair} {}", self.rule(j + 1, false)),
            (true, false) => pair,
            (false, true) => {
                let written = self.rule(j + 1, false);
                let skipped = self.rule(j + 1, first);
                format!("({pair} {written} | {skipped})")
            }
            (false, false) => format!("({pair})?"),
        }
    }
}

/// Reads Python source from `at`.
struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl Reader<'_> {
    fn rest(&self) -> &str {
        &self.text[self.at..]
    }

    fn at_end(&self) -> bool {
        self.at == self.text.len()
    }

    fn peek_is(&self, c: char) -> bool {
        self.rest().starts_with(c)
    }

    fn skip_whitespace(&mut self) {
        self.at = self.text.len() - self.rest().trim_start().len();
    }

    fn eat(&mut self, c: char) -> bool {
        let found = self.peek_is(c);
        if found {
            self.at += c.len_utf8();
        }
        found
    }

    fn identifier(&mut self) -> Option<&str> {
        let start = self.at;
        let len = self
            .rest()
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '.'))
            .unwrap_or(self.rest().len());
        let word = &self.text[start..start + len];
        if word.is_empty() || word.starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        self.at += len;
        Some(word)
    }

    /// `name(key=value, ...)`.
    fn call(&mut self) -> Option<Call> {
        let name = self.identifier()?.to_string();
        self.skip_whitespace();
        if !self.eat('(') {
            return None;
        }
        let mut arguments = Map::new();
        loop {
            self.skip_whitespace();
            if self.eat(')') {
                break;
            }
            let key = self.identifier()?.to_string();
            self.skip_whitespace();
            if !self.eat('=') {
                return None;
            }
            self.skip_whitespace();
            let value = self.value()?;
            arguments.insert(key, value);
            self.skip_whitespace();
            if !self.eat(',') && !self.peek_is(')') {
                return None;
            }
        }
        Some((name, Value::Object(arguments)))
    }

    fn value(&mut self) -> Option<Value> {
        self.skip_whitespace();
        match self.rest().chars().next()? {
            '"' | '\'' => self.string().map(Value::String),
            '[' | '(' => {
                let close = if self.eat('[') {
                    ']'
                } else {
                    self.eat('(').then_some(')')?
                };
                let mut items = Vec::new();
                loop {
                    self.skip_whitespace();
                    if self.eat(close) {
                        return Some(Value::Array(items));
                    }
                    items.push(self.value()?);
                    self.skip_whitespace();
                    if !self.eat(',') && !self.peek_is(close) {
                        return None;
                    }
                }
            }
            '{' => {
                self.eat('{');
                let mut map = Map::new();
                loop {
                    self.skip_whitespace();
                    if self.eat('}') {
                        return Some(Value::Object(map));
                    }
                    let key = match self.value()? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    self.skip_whitespace();
                    if !self.eat(':') {
                        return None;
                    }
                    map.insert(key, self.value()?);
                    self.skip_whitespace();
                    if !self.eat(',') && !self.peek_is('}') {
                        return None;
                    }
                }
            }
            _ => {
                let len = self
                    .rest()
                    .find(|c: char| !(c.is_alphanumeric() || "+-._".contains(c)))
                    .unwrap_or(self.rest().len());
                let word = &self.text[self.at..self.at + len];
                self.at += len;
                match word {
                    "True" | "true" => Some(Value::Bool(true)),
                    "False" | "false" => Some(Value::Bool(false)),
                    "None" | "null" => Some(Value::Null),
                    number => number_value(number),
                }
            }
        }
    }

    /// A string in single or double quotes, with Python's common escapes.
    fn string(&mut self) -> Option<String> {
        let quote = self.rest().chars().next()?;
        self.at += 1;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                _ if c == quote => {
                    self.at += i + 1;
                    return Some(out);
                }
                '\\' => {
                    let (_, escaped) = chars.next()?;
                    match escaped {
                        'n' => out.push('\n'),
                        't' => out.push('\t'),
                        'r' => out.push('\r'),
                        'u' => {
                            let hex: String = (0..4)
                                .filter_map(|_| chars.next())
                                .map(|(_, c)| c)
                                .collect();
                            out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                        }
                        other => out.push(other),
                    }
                }
                other => out.push(other),
            }
        }
        None
    }
}

/// A Python or JSON number.
fn number_value(text: &str) -> Option<Value> {
    let text = text.replace('_', "");
    if let Ok(i) = text.parse::<i64>() {
        return Some(Value::Number(i.into()));
    }
    let f: f64 = text.parse().ok()?;
    Number::from_f64(f).map(Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "add".into()]
    }

    fn read(text: &str) -> Option<Vec<(String, Value)>> {
        parse_calls(text, &names())
    }

    #[test]
    fn python_calls_read_as_json_arguments() {
        assert_eq!(
            read("get_weather(city=\"Paris\", unit='celsius')"),
            Some(vec![(
                "get_weather".into(),
                json!({"city": "Paris", "unit": "celsius"})
            )])
        );
        assert_eq!(
            read("[add(a=1, b=-2.5), get_weather(city=\"It's\\n\", opts={'x': [True, None]})]"),
            Some(vec![
                ("add".into(), json!({"a": 1, "b": -2.5})),
                (
                    "get_weather".into(),
                    json!({"city": "It's\n", "opts": {"x": [true, null]}})
                ),
            ])
        );
        assert_eq!(
            read("add(a=1)\nadd(b=2)"),
            Some(vec![
                ("add".into(), json!({"a": 1})),
                ("add".into(), json!({"b": 2}))
            ])
        );
        // Written back, read the same.
        let args = json!({"city": "Paris \"2\"", "n": [1, true, null]});
        assert_eq!(
            read(&write_call("get_weather", &args)),
            Some(vec![("get_weather".into(), args)])
        );
        // Not calls: unknown function, positional arguments, trailing text, unclosed.
        for text in [
            "nope(a=1)",
            "add(1, 2)",
            "add(a=1) and more",
            "add(a=1",
            "",
            "print",
        ] {
            assert_eq!(read(text), None, "{text:?}");
        }
    }
}
