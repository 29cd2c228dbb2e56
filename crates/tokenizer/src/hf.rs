//! Reading and writing Hugging Face tokenizer folders (`tokenizer.json`,
//! `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`).
//!
//! Writing exists so a GGUF model can be exported to a folder that `transformers` (and
//! [`Tokenizer::from_hf_folder`]) read back with identical ids, specials and chat template.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Result, TokenizerError};
use crate::special_tokens::SpecialTokens;
use crate::tokenizer::{Tokenizer, TokenizerParts};

impl Tokenizer {
    /// Loads a Hugging Face tokenizer folder.
    ///
    /// `tokenizer.json` is required. `tokenizer_config.json` (optional) gives the BOS/EOS token
    /// strings, `add_bos_token`, `model_max_length` and the chat template (a string, or a list of
    /// named templates of which `default` is used). A `chat_template.jinja` file (or
    /// `chat_template.json`) overrides the config's template, as in recent `transformers`.
    /// `generation_config.json` (optional) contributes its `eos_token_id` (an int or a list) as
    /// extra stop ids, which is how e.g. Llama 3 declares `<|eot_id|>`.
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|source| {
            TokenizerError::TokenizerFile {
                action: "load",
                path: tokenizer_path.clone(),
                source,
            }
        })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_object(&config_path)?.unwrap_or_default();
        let generation_path = dir.join("generation_config.json");
        let generation = read_json_object(&generation_path)?.unwrap_or_default();

        let token_field = |key: &str| -> Result<Option<String>> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                // Older configs serialise AddedToken objects: {"content": "<s>", ...}.
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(bad_config(
                        &config_path,
                        format!("`{key}` has no string `content`"),
                    )),
                },
                Some(other) => Err(bad_config(
                    &config_path,
                    format!("`{key}` should be a string, found {other}"),
                )),
            }
        };
        let id_of = |token: &str, key: &str| -> Result<u32> {
            inner.token_to_id(token).ok_or_else(|| {
                bad_config(
                    &config_path,
                    format!("`{key}` = {token:?} is not in the vocabulary of tokenizer.json"),
                )
            })
        };

        let bos_id = match token_field("bos_token")? {
            Some(bos) => Some(id_of(&bos, "bos_token")?),
            // Some folders only give the id, in generation_config.json.
            None => id_list(&generation, "bos_token_id", &generation_path)?
                .into_iter()
                .next(),
        };
        let mut eos_ids = Vec::new();
        if let Some(eos) = token_field("eos_token")? {
            eos_ids.push(id_of(&eos, "eos_token")?);
        }
        for id in id_list(&generation, "eos_token_id", &generation_path)? {
            if inner.id_to_token(id).is_none() {
                return Err(bad_config(
                    &generation_path,
                    format!("eos_token_id {id} is outside the vocabulary of tokenizer.json"),
                ));
            }
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let specials = SpecialTokens::from_ids(bos_id, eos_ids, |id| inner.id_to_token(id));

        let add_bos_token = match config.get("add_bos_token") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                return Err(bad_config(
                    &config_path,
                    format!("`add_bos_token` should be a boolean, found {other}"),
                ))
            }
        };

        let chat_template = read_chat_template(dir, &config, &config_path)?;

        // transformers writes a huge float (1e30) for "unknown"; only keep real lengths.
        let model_max_length = match config.get("model_max_length") {
            Some(Value::Number(n)) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f < 1e15)
                    .map(|f| f as u64)
            }),
            _ => None,
        };

        Tokenizer::assemble(TokenizerParts {
            inner,
            specials,
            add_bos_token,
            chat_template,
            model_max_length,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created if needed), so
    /// that [`Tokenizer::from_hf_folder`] and `transformers` read back the same tokenizer.
    ///
    /// If there are stop ids beyond the primary EOS (e.g. `eot_token_id` in a GGUF), they only
    /// survive through `generation_config.json`, so its `eos_token_id` is set too (merged into an
    /// existing file, whose other settings are kept).
    pub fn write_hf_files(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(|source| TokenizerError::Io {
            action: "create directory",
            path: dir.to_owned(),
            source,
        })?;

        let tokenizer_path = dir.join("tokenizer.json");
        self.inner_for_export()?
            .save(&tokenizer_path, false)
            .map_err(|source| TokenizerError::TokenizerFile {
                action: "save",
                path: tokenizer_path.clone(),
                source,
            })?;

        let mut config = Map::new();
        // The generic fast tokenizer class loads tokenizer.json as-is; clean-up would change
        // decoded text (" ." -> "."), which the GGUF tokenizer never does.
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        config.insert("add_bos_token".into(), json!(self.add_bos_token()));
        if let Some(bos) = self.bos_token() {
            config.insert("bos_token".into(), json!(bos));
        }
        if let Some(eos) = self.eos_token() {
            config.insert("eos_token".into(), json!(eos));
        }
        if let Some(template) = self.chat_template() {
            config.insert("chat_template".into(), json!(template.source()));
        }
        if let Some(max) = self.model_max_length() {
            config.insert("model_max_length".into(), json!(max));
        }
        write_json(&dir.join("tokenizer_config.json"), &Value::Object(config))?;

        if self.eos_token_ids().len() > 1 {
            let path = dir.join("generation_config.json");
            let mut generation = read_json_object(&path)?.unwrap_or_default();
            generation.insert("eos_token_id".into(), json!(self.eos_token_ids()));
            if let Some(bos) = self.bos_token_id() {
                generation.insert("bos_token_id".into(), json!(bos));
            }
            write_json(&path, &Value::Object(generation))?;
        }
        Ok(())
    }
}

/// The chat template, by precedence: `chat_template.jinja`, `chat_template.json`, then the
/// `chat_template` field of `tokenizer_config.json`.
fn read_chat_template(
    dir: &Path,
    config: &Map<String, Value>,
    config_path: &Path,
) -> Result<Option<String>> {
    let jinja_path = dir.join("chat_template.jinja");
    if let Some(text) = read_optional(&jinja_path)? {
        return Ok(Some(text));
    }
    let json_path = dir.join("chat_template.json");
    if let Some(object) = read_json_object(&json_path)? {
        match object.get("chat_template") {
            Some(Value::String(s)) => return Ok(Some(s.clone())),
            _ => {
                return Err(bad_config(
                    &json_path,
                    "has no string field `chat_template`".into(),
                ))
            }
        }
    }
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        // Multiple named templates ("default", "tool_use", "rag", ...); chat uses "default".
        Some(Value::Array(list)) => {
            for entry in list {
                let name = entry.get("name").and_then(Value::as_str);
                let template = entry.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_owned())),
                    (Some(_), Some(_)) => {}
                    _ => {
                        return Err(bad_config(
                            config_path,
                            "`chat_template` list entries need string `name` and `template`".into(),
                        ))
                    }
                }
            }
            tracing::warn!(
                path = %config_path.display(),
                "chat_template lists named templates but none called \"default\"; no chat template"
            );
            Ok(None)
        }
        Some(other) => Err(bad_config(
            config_path,
            format!("`chat_template` should be a string or a list, found {other}"),
        )),
    }
}

/// An `int` or a list of ints (the two shapes `generation_config.json` uses for token ids).
fn id_list(object: &Map<String, Value>, key: &str, path: &Path) -> Result<Vec<u32>> {
    let as_id = |v: &Value| -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad_config(path, format!("`{key}` should hold token ids, found {v}")))
    };
    match object.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(single) => Ok(vec![as_id(single)?]),
    }
}

fn bad_config(path: &Path, message: String) -> TokenizerError {
    TokenizerError::BadConfig {
        path: path.to_owned(),
        message,
    }
}

/// The file's text, or `None` if it does not exist (any other I/O error is reported).
fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

/// A JSON object file, or `None` if it does not exist.
fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    match serde_json::from_str(&text) {
        Ok(Value::Object(object)) => Ok(Some(object)),
        Ok(_) => Err(bad_config(path, "should hold a JSON object".into())),
        Err(source) => Err(TokenizerError::Json {
            path: PathBuf::from(path),
            source,
        }),
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| TokenizerError::Json {
        path: path.to_owned(),
        source,
    })?;
    fs::write(path, text + "\n").map_err(|source| TokenizerError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    })
}
