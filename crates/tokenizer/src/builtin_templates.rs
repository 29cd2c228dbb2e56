//! Chat templates for models whose files do not carry one.
//!
//! llama.cpp's converter copies `chat_template` from `tokenizer_config.json`, so a GGUF made
//! from a checkpoint without it (Gemma 3's pretrained releases) has none, although the model
//! was trained on its family's turn format. llama.cpp falls back to built-in formats the same
//! way. Each template here is the family's published one, in the Jinja dialect
//! `ChatTemplate` renders.

/// Gemma's turns: `<start_of_turn>user\n...<end_of_turn>\n`, the assistant called `model`, a
/// system message folded into the first user turn (Gemma has no system role), roles strictly
/// alternating.
const GEMMA: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if message['role'] == 'assistant' -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"#;

/// The template for a GGUF `general.architecture` that came without one.
pub(crate) fn for_architecture(architecture: &str) -> Option<&'static str> {
    match architecture {
        "gemma" | "gemma2" | "gemma3" => Some(GEMMA),
        _ => None,
    }
}

/// Tokens that end an assistant turn although some conversions do not list them among the
/// end-of-generation ids (Gemma's GGUFs list only `<eos>`): a chat reply would otherwise run
/// on into a made-up next turn. llama.cpp recognizes the same texts.
pub(crate) const END_OF_TURN_TOKENS: &[&str] = &["<end_of_turn>"];

#[cfg(test)]
mod tests {
    use crate::{ChatMessage, ChatTemplate};

    #[test]
    fn gemma_turns() {
        let template = ChatTemplate::new(
            super::for_architecture("gemma3").unwrap(),
            Some("<bos>"),
            Some("<eos>"),
        )
        .unwrap();
        let text = template
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", " Hi! "),
                    ChatMessage::new("assistant", "Hello."),
                    ChatMessage::new("user", "Name a colour."),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\n\
             Hello.<end_of_turn>\n<start_of_turn>user\nName a colour.<end_of_turn>\n\
             <start_of_turn>model\n"
        );
        let err = template
            .render(&[ChatMessage::new("assistant", "x")], true)
            .unwrap_err();
        assert!(err.to_string().contains("alternate"), "{err}");
    }
}
