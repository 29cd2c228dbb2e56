//! Broken GGUF metadata and broken templates must give errors that say what is wrong, never
//! panic. The GGUF contents are built by hand (tiny vocabularies), so these tests need no model.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use minserve_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

fn strings(items: &[&str]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|s| Value::String((*s).to_owned()))
            .collect(),
    )
}

/// A complete, tiny byte-level vocabulary: "a", "b", "ab", a control token, and the merge.
fn tiny_gpt2() -> HashMap<String, Value> {
    HashMap::from([
        (
            "tokenizer.ggml.model".to_owned(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_owned(),
            Value::String("smollm".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_owned(),
            strings(&["<|end|>", "a", "b", "ab", "1", "Ġ"]),
        ),
        (
            "tokenizer.ggml.token_type".to_owned(),
            Value::Array([3, 1, 1, 1, 1, 1].into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".to_owned(), strings(&["a b"])),
        ("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(0)),
    ])
}

fn content(metadata: HashMap<String, Value>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

fn error_of(metadata: HashMap<String, Value>) -> String {
    match Tokenizer::from_gguf(&content(metadata)) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tiny_vocabulary_builds() {
    let tok = Tokenizer::from_gguf(&content(tiny_gpt2())).unwrap();
    assert_eq!(tok.encode("ab<|end|>ab", true).unwrap(), [3, 0, 3]);
    assert_eq!(tok.encode("11", false).unwrap(), [4, 4]);
    assert_eq!(tok.eos_token_ids(), &[0]);
    assert_eq!(tok.bos_token_id(), None);
    assert!(tok.chat_template().is_none());
}

#[test]
fn missing_tokens() {
    let mut md = tiny_gpt2();
    md.remove("tokenizer.ggml.tokens");
    let err = error_of(md);
    assert!(
        err.contains("tokenizer.ggml.tokens") && err.contains("no"),
        "{err}"
    );
}

#[test]
fn missing_model() {
    let mut md = tiny_gpt2();
    md.remove("tokenizer.ggml.model");
    assert!(error_of(md).contains("tokenizer.ggml.model"));
}

#[test]
fn missing_merges() {
    let mut md = tiny_gpt2();
    md.remove("tokenizer.ggml.merges");
    assert!(error_of(md).contains("tokenizer.ggml.merges"));
}

#[test]
fn unknown_tokenizer_model() {
    let mut md = tiny_gpt2();
    md.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    let err = error_of(md);
    assert!(err.contains("unsupported tokenizer model `bert`"), "{err}");
}

#[test]
fn tokens_of_the_wrong_type() {
    let mut md = tiny_gpt2();
    md.insert("tokenizer.ggml.tokens".into(), Value::U32(7));
    let err = error_of(md);
    assert!(
        err.contains("tokenizer.ggml.tokens") && err.contains("array of strings"),
        "{err}"
    );

    let mut md = tiny_gpt2();
    md.insert(
        "tokenizer.ggml.tokens".into(),
        Value::Array(vec![Value::String("a".into()), Value::F32(1.0)]),
    );
    let err = error_of(md);
    assert!(err.contains("entry 1"), "{err}");
}

#[test]
fn malformed_merge() {
    let mut md = tiny_gpt2();
    md.insert("tokenizer.ggml.merges".into(), strings(&["ab"]));
    let err = error_of(md);
    assert!(
        err.contains("tokenizer.ggml.merges") && err.contains("\"ab\""),
        "{err}"
    );
}

#[test]
fn merge_of_unknown_tokens() {
    let mut md = tiny_gpt2();
    md.insert("tokenizer.ggml.merges".into(), strings(&["x y"]));
    let err = error_of(md);
    assert!(err.contains("cannot build the tokenizer"), "{err}");
}

#[test]
fn special_id_outside_vocabulary() {
    let mut md = tiny_gpt2();
    md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1000));
    let err = error_of(md);
    assert!(
        err.contains("tokenizer.ggml.bos_token_id") && err.contains("1000"),
        "{err}"
    );

    let mut md = tiny_gpt2();
    md.insert("tokenizer.ggml.eos_token_id".into(), Value::I32(-1));
    let err = error_of(md);
    assert!(err.contains("tokenizer.ggml.eos_token_id"), "{err}");
}

#[test]
fn token_type_length_mismatch() {
    let mut md = tiny_gpt2();
    md.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(vec![Value::I32(1)]),
    );
    assert!(error_of(md).contains("tokenizer.ggml.token_type"));
}

#[test]
fn broken_template_in_gguf() {
    let mut md = tiny_gpt2();
    md.insert(
        "tokenizer.chat_template".into(),
        Value::String("{% if %}".into()),
    );
    let err = error_of(md);
    assert!(err.contains("chat template does not compile"), "{err}");
}

#[test]
fn unknown_pre_tokenizer_falls_back_to_gpt2() {
    let mut md = tiny_gpt2();
    md.insert("tokenizer.ggml.pre".into(), Value::String("made-up".into()));
    let tok = Tokenizer::from_gguf(&content(md)).unwrap();
    assert_eq!(tok.encode("ab", false).unwrap(), [3]);
}

#[test]
fn template_syntax_error() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", None, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("chat template does not compile"), "{msg}");
    assert!(msg.contains("syntax error"), "{msg}");
}

#[test]
fn template_raise_exception() {
    let template = ChatTemplate::new(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok",
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        template
            .render(&[ChatMessage::new("user", "x")], false)
            .unwrap(),
        "ok"
    );
    let err = template
        .render(&[ChatMessage::new("system", "x")], false)
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("chat template failed to render"), "{msg}");
    assert!(
        msg.contains("Conversation must start with a user message"),
        "{msg}"
    );
}

#[test]
fn template_runtime_error() {
    let template = ChatTemplate::new("{{ messages[0].content + 1 }}", None, None).unwrap();
    let err = template
        .render(&[ChatMessage::new("user", "x")], false)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("chat template failed to render"),
        "{err}"
    );
}
