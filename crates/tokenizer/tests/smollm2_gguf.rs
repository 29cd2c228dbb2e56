//! The GGUF-built SmolLM2 tokenizer against llama.cpp's (fixtures from scripts/gen_fixtures.py).

mod common;

use common::{chat_fixtures, id_mismatches, smollm2_tokenizer, token_fixtures};
use minserve_tokenizer::ChatMessage;

/// The case candle 0.11.1's `TokenizerFromGguf` gets wrong (it yields 378 "ĠThe" first).
#[test]
fn the_quick_brown_fox_has_no_leading_space() {
    let tok = smollm2_tokenizer();
    assert_eq!(
        tok.encode("The quick brown fox", false).unwrap(),
        [504, 2365, 6354, 16438]
    );
    assert_eq!(
        tok.encode("The quick brown fox", true).unwrap(),
        [504, 2365, 6354, 16438],
        "SmolLM2's GGUF has add_bos_token = false"
    );
    assert_eq!(tok.id_to_token(504).as_deref(), Some("The"));
}

#[test]
fn ids_match_llama_cpp_on_every_fixture() {
    let tok = smollm2_tokenizer();
    let mismatches = id_mismatches(&tok, &token_fixtures());
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn decode_inverts_encode_on_every_fixture() {
    let tok = smollm2_tokenizer();
    for f in token_fixtures() {
        let decoded = tok.decode(&f.ids, false).unwrap();
        assert_eq!(decoded, f.text, "decode(llama.cpp ids) for {:?}", f.text);
        let ours = tok
            .decode(&tok.encode(&f.text, false).unwrap(), false)
            .unwrap();
        assert_eq!(ours, f.text, "decode(encode(x)) for {:?}", f.text);
    }
}

#[test]
fn special_tokens_encode_to_single_ids_and_can_be_skipped() {
    let tok = smollm2_tokenizer();
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
}

#[test]
fn metadata_is_read() {
    let tok = smollm2_tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert!(!tok.add_bos_token());
    assert_eq!(tok.model_max_length(), Some(8192));
    assert!(tok.chat_template().is_some());
    assert_eq!(tok.inner().get_vocab_size(true), 49152);
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let tok = smollm2_tokenizer();
    let err = tok.decode(&[504, 49152], false).unwrap_err();
    assert!(err.to_string().contains("49152"), "{err}");
}

#[test]
fn chat_template_renders_like_jinja2_and_tokenizes_like_llama_cpp() {
    let tok = smollm2_tokenizer();
    let fixtures = chat_fixtures();
    let template = tok.chat_template().expect("SmolLM2 has a chat template");
    assert_eq!(template.source(), fixtures.template);
    assert_eq!(tok.bos_token(), Some(fixtures.bos_token.as_str()));
    assert_eq!(tok.eos_token(), Some(fixtures.eos_token.as_str()));
    assert!(fixtures.chats.len() >= 4);
    for chat in &fixtures.chats {
        let rendered = template
            .render(&chat.messages, chat.add_generation_prompt)
            .unwrap();
        assert_eq!(
            rendered, chat.rendered,
            "{} (add_generation_prompt = {})",
            chat.name, chat.add_generation_prompt
        );
        assert_eq!(
            tok.encode(&rendered, false).unwrap(),
            chat.ids,
            "ids of the {} prompt",
            chat.name
        );
    }
}

#[test]
fn user_only_chat_gets_the_default_system_prompt() {
    let tok = smollm2_tokenizer();
    let template = tok.chat_template().unwrap();
    let prompt = template
        .render(&[ChatMessage::new("user", "Hi")], true)
        .unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}
