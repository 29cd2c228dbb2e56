//! Qwen3's chat template (as its GGUFs and `tokenizer_config.json` carry it, in
//! `fixtures/qwen3_chat_template.jinja`) renders here as `transformers` renders it, including
//! its `<think>` handling: `enable_thinking: false` (vLLM's `chat_template_kwargs`) closes an
//! empty think block after the generation prompt, and earlier assistant turns lose their
//! reasoning.

use minserve_tokenizer::{ChatMessage, ChatTemplate, RenderOptions};

fn template() -> ChatTemplate {
    let source = include_str!("fixtures/qwen3_chat_template.jinja");
    ChatTemplate::new(source, None, Some("<|im_end|>")).unwrap()
}

fn kwargs(json: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    json.as_object().unwrap().clone()
}

fn render(
    t: &ChatTemplate,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    extra: &serde_json::Map<String, serde_json::Value>,
) -> String {
    let options = RenderOptions {
        add_generation_prompt,
        extra: Some(extra),
        ..RenderOptions::default()
    };
    t.render_with(messages, &options).unwrap()
}

#[test]
fn thinking_is_on_unless_the_request_turns_it_off() {
    let t = template();
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "What is 2+2?"),
    ];
    let head = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(t.render(&messages, true).unwrap(), head);
    let on = kwargs(serde_json::json!({"enable_thinking": true}));
    assert_eq!(render(&t, &messages, true, &on), head);
    let off = kwargs(serde_json::json!({"enable_thinking": false}));
    assert_eq!(
        render(&t, &messages, true, &off),
        format!("{head}<think>\n\n</think>\n\n")
    );
    // Without a generation prompt, the switch changes nothing.
    assert_eq!(
        render(&t, &messages, false, &off),
        t.render(&messages, false).unwrap()
    );
}

#[test]
fn earlier_turns_keep_their_answer_and_lose_their_reasoning() {
    let messages = [
        ChatMessage::new("user", "What is 2+2?"),
        ChatMessage::new(
            "assistant",
            "<think>\nTwo and two make four.\n</think>\n\nIt is 4.",
        ),
        ChatMessage::new("user", "And 3+3?"),
    ];
    assert_eq!(
        template().render(&messages, true).unwrap(),
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\nIt is 4.<|im_end|>\n\
         <|im_start|>user\nAnd 3+3?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}
