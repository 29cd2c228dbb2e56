//! Exporting to a Hugging Face folder and reading it back, plus the folder-reading rules.

mod common;

use std::fs;

use common::{chat_fixtures, smollm2_tokenizer, token_fixtures};
use minserve_tokenizer::{ChatMessage, Tokenizer};

#[test]
fn write_then_read_gives_the_same_tokenizer() {
    let gguf = smollm2_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    gguf.write_hf_files(dir.path()).unwrap();
    assert!(dir.path().join("tokenizer.json").is_file());
    assert!(dir.path().join("tokenizer_config.json").is_file());

    let hf = Tokenizer::from_hf_folder(dir.path()).unwrap();
    for f in token_fixtures() {
        assert_eq!(hf.encode(&f.text, false).unwrap(), f.ids, "{:?}", f.text);
        assert_eq!(
            hf.encode(&f.text, true).unwrap(),
            f.ids_with_special,
            "{:?}",
            f.text
        );
        assert_eq!(hf.decode(&f.ids, false).unwrap(), f.text);
    }
    assert_eq!(hf.vocab_size(), gguf.vocab_size());
    assert_eq!(hf.bos_token_id(), gguf.bos_token_id());
    assert_eq!(hf.bos_token(), gguf.bos_token());
    assert_eq!(hf.eos_token_ids(), gguf.eos_token_ids());
    assert_eq!(hf.eos_token(), gguf.eos_token());
    assert_eq!(hf.add_bos_token(), gguf.add_bos_token());
    assert_eq!(hf.model_max_length(), gguf.model_max_length());

    let (a, b) = (hf.chat_template().unwrap(), gguf.chat_template().unwrap());
    assert_eq!(a.source(), b.source());
    for chat in chat_fixtures().chats {
        let rendered = a
            .render(&chat.messages, chat.add_generation_prompt)
            .unwrap();
        assert_eq!(rendered, chat.rendered);
    }
}

/// A folder laid out like real Hugging Face repos: AddedToken-object specials, `add_bos_token`
/// without a post-processor, a list of named templates overridden by `chat_template.jinja`, and
/// extra stop ids in `generation_config.json`.
#[test]
fn folder_rules() {
    let dir = tempfile::tempdir().unwrap();
    smollm2_tokenizer().write_hf_files(dir.path()).unwrap();
    let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();

    write(
        "tokenizer_config.json",
        r#"{
            "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": true},
            "eos_token": "<|im_end|>",
            "add_bos_token": true,
            "model_max_length": 1000000000000000019884624838656,
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"}
            ]
        }"#,
    );
    write(
        "generation_config.json",
        r#"{"eos_token_id": [2, 0], "temperature": 0.2}"#,
    );
    let tok = Tokenizer::from_hf_folder(dir.path()).unwrap();
    assert_eq!(tok.bos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.bos_token_id(), Some(0));
    assert!(tok.add_bos_token());
    assert_eq!(tok.encode("The", true).unwrap(), [0, 504]);
    assert_eq!(tok.encode("The", false).unwrap(), [504]);
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert_eq!(tok.model_max_length(), None, "1e30 means unknown");
    let msgs = [ChatMessage::new("user", "hi")];
    assert_eq!(
        tok.chat_template().unwrap().render(&msgs, false).unwrap(),
        "<|endoftext|>[user]hi"
    );

    // The manually prepended BOS survives export as a post-processor, and extra stop ids as
    // generation_config.json (keeping its other settings).
    let out = tempfile::tempdir().unwrap();
    fs::write(
        out.path().join("generation_config.json"),
        r#"{"temperature": 0.2}"#,
    )
    .unwrap();
    tok.write_hf_files(out.path()).unwrap();
    let back = Tokenizer::from_hf_folder(out.path()).unwrap();
    assert_eq!(back.encode("The", true).unwrap(), [0, 504]);
    assert_eq!(back.eos_token_ids(), &[2, 0]);
    let generation: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(out.path().join("generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(generation["temperature"], 0.2);

    write("chat_template.jinja", "JINJA FILE WINS");
    let tok = Tokenizer::from_hf_folder(dir.path()).unwrap();
    assert_eq!(
        tok.chat_template().unwrap().render(&msgs, false).unwrap(),
        "JINJA FILE WINS"
    );
}

#[test]
fn folder_errors_name_the_file() {
    let empty = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_hf_folder(empty.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    smollm2_tokenizer().write_hf_files(dir.path()).unwrap();
    fs::write(dir.path().join("tokenizer_config.json"), "{ not json").unwrap();
    let err = Tokenizer::from_hf_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer_config.json") && err.contains("not valid JSON"),
        "{err}"
    );

    fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<nope>"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_hf_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("<nope>") && err.contains("not in the vocabulary"),
        "{err}"
    );

    fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_hf_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("chat template does not compile"), "{err}");
}
