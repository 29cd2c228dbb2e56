//! Reasoning models' thinking, split from their answer: `--reasoning-parser` (vLLM's flag and
//! names). Qwen3 and DeepSeek-R1 write their chain of thought between `<think>` and `</think>`
//! before the answer; with a parser, chat responses carry it in `message.reasoning_content`
//! (streamed as `delta.reasoning_content`) and `content` holds only the answer, which is what
//! tool-call parsing then reads. The field name is the one DeepSeek's API, SGLang and vLLM use.
//!
//! The two formats differ in where the thinking starts:
//! - `qwen3`: the model writes `<think>` itself (thinking on), or the template already closed
//!   an empty think block (`enable_thinking: false`) and the output is all answer. Output that
//!   does not open with `<think>` is answer.
//! - `deepseek_r1`: the template ends the prompt with `<think>`, so the output starts inside the
//!   thinking (an opening `<think>` the model writes anyway is dropped), up to `</think>`.
//!   Output that never closes it is all thinking, as vLLM reads it.
//!
//! The splitter is incremental: text arrives in token-sized pieces, and a tag may be cut
//! anywhere, so a tail that could still become a tag is held back until it is decided.

use std::fmt;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningFormat {
    Qwen3,
    DeepSeekR1,
}

impl ReasoningFormat {
    pub const NAMES: &'static [&'static str] = &["qwen3", "deepseek_r1"];

    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "qwen3" => Ok(Self::Qwen3),
            "deepseek_r1" => Ok(Self::DeepSeekR1),
            other => Err(format!(
                "unknown reasoning parser `{other}`: {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

impl fmt::Display for ReasoningFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Qwen3 => "qwen3",
            Self::DeepSeekR1 => "deepseek_r1",
        })
    }
}

/// A settled piece of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReasoningPiece {
    Reasoning(String),
    Content(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before anything but whitespace: the output may still open with `<think>`.
    Start,
    Thinking,
    /// Just past `</think>`: the newlines the model writes before its answer are dropped.
    AnswerStart,
    Answering,
}

/// Splits one choice's output as it streams.
#[derive(Debug)]
pub struct ReasoningSplitter {
    format: ReasoningFormat,
    state: State,
    /// Text not settled yet: leading whitespace at the start, or a tail that may begin a tag.
    held: String,
}

impl ReasoningSplitter {
    pub fn new(format: ReasoningFormat) -> Self {
        Self {
            format,
            state: State::Start,
            held: String::new(),
        }
    }

    /// Takes the next piece of text; returns what is now settled, in order.
    pub fn push(&mut self, text: &str) -> Vec<ReasoningPiece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.held.trim_start();
                    if let Some(after) = trimmed.strip_prefix(OPEN) {
                        self.held = after.to_string();
                        self.state = State::Thinking;
                    } else if OPEN.starts_with(trimmed) {
                        return out; // empty, whitespace, or a cut `<think>`: undecided
                    } else {
                        self.state = match self.format {
                            ReasoningFormat::Qwen3 => State::Answering,
                            ReasoningFormat::DeepSeekR1 => State::Thinking,
                        };
                    }
                }
                State::Thinking => {
                    if let Some(at) = self.held.find(CLOSE) {
                        let thought = self.held[..at].to_string();
                        self.held = self.held[at + CLOSE.len()..].to_string();
                        push_piece(&mut out, ReasoningPiece::Reasoning(thought));
                        self.state = State::AnswerStart;
                        continue;
                    }
                    let keep = partial_tag_len(&self.held, CLOSE);
                    let settled = self.held[..self.held.len() - keep].to_string();
                    self.held.drain(..self.held.len() - keep);
                    push_piece(&mut out, ReasoningPiece::Reasoning(settled));
                    return out;
                }
                State::AnswerStart => {
                    self.held = self.held.trim_start_matches('\n').to_string();
                    if self.held.is_empty() {
                        return out;
                    }
                    self.state = State::Answering;
                }
                State::Answering => {
                    push_piece(
                        &mut out,
                        ReasoningPiece::Content(std::mem::take(&mut self.held)),
                    );
                    return out;
                }
            }
        }
    }

    /// The end of the output: whatever was held back, settled.
    pub fn finish(&mut self) -> Vec<ReasoningPiece> {
        let rest = std::mem::take(&mut self.held);
        let mut out = Vec::new();
        match self.state {
            State::Thinking => push_piece(&mut out, ReasoningPiece::Reasoning(rest)),
            State::Start if self.format == ReasoningFormat::DeepSeekR1 => {
                push_piece(&mut out, ReasoningPiece::Reasoning(rest))
            }
            State::Start | State::AnswerStart | State::Answering => {
                push_piece(&mut out, ReasoningPiece::Content(rest))
            }
        }
        out
    }
}

fn push_piece(out: &mut Vec<ReasoningPiece>, piece: ReasoningPiece) {
    let empty = match &piece {
        ReasoningPiece::Reasoning(t) | ReasoningPiece::Content(t) => t.is_empty(),
    };
    if !empty {
        out.push(piece);
    }
}

/// The length of the longest tail of `text` that is a proper prefix of `tag`.
fn partial_tag_len(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

/// A whole output split at once: (reasoning, answer); `None` when there was no reasoning.
pub fn split(format: ReasoningFormat, text: &str) -> (Option<String>, String) {
    let mut splitter = ReasoningSplitter::new(format);
    let mut pieces = splitter.push(text);
    pieces.extend(splitter.finish());
    let (mut reasoning, mut content) = (None::<String>, String::new());
    for piece in pieces {
        match piece {
            ReasoningPiece::Reasoning(t) => reasoning.get_or_insert_with(String::new).push_str(&t),
            ReasoningPiece::Content(t) => content.push_str(&t),
        }
    }
    (reasoning, content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReasoningFormat::*;

    /// `text` fed in pieces of `size` bytes (on char boundaries), the pieces merged by kind.
    fn streamed(format: ReasoningFormat, text: &str, size: usize) -> (String, String) {
        let mut splitter = ReasoningSplitter::new(format);
        let mut pieces = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = size.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            pieces.extend(splitter.push(&rest[..cut]));
            rest = &rest[cut..];
        }
        pieces.extend(splitter.finish());
        let (mut reasoning, mut content) = (String::new(), String::new());
        for piece in pieces {
            match piece {
                ReasoningPiece::Reasoning(t) => reasoning.push_str(&t),
                ReasoningPiece::Content(t) => content.push_str(&t),
            }
        }
        (reasoning, content)
    }

    #[test]
    fn thinking_and_answer_are_split_wherever_the_stream_cuts_the_tags() {
        let text = "<think>\nLet me add: 2 + 2 = 4. Ünïcode < and </thin fine.\n</think>\n\nThe answer is 4.";
        for size in 1..=text.len() {
            let (reasoning, content) = streamed(Qwen3, text, size);
            assert_eq!(
                reasoning, "\nLet me add: 2 + 2 = 4. Ünïcode < and </thin fine.\n",
                "pieces of {size}"
            );
            assert_eq!(content, "The answer is 4.", "pieces of {size}");
        }
    }

    #[test]
    fn qwen3_output_without_thinking_is_all_answer() {
        for text in ["Hello <think> there", "  plain answer", "<thin", ""] {
            for size in [1, 3, 100] {
                assert_eq!(
                    streamed(Qwen3, text, size),
                    (String::new(), text.to_string())
                );
            }
        }
        assert_eq!(split(Qwen3, "just this"), (None, "just this".into()));
        // Thinking cut short by max_tokens: all of it is reasoning, no answer yet.
        assert_eq!(
            split(Qwen3, "<think>still thinking"),
            (Some("still thinking".into()), String::new())
        );
    }

    #[test]
    fn deepseek_r1_starts_inside_the_thinking() {
        for size in [1, 2, 5, 100] {
            assert_eq!(
                streamed(DeepSeekR1, "Hmm, 3.</think>Three.", size),
                ("Hmm, 3.".into(), "Three.".into())
            );
            // An opening tag the model writes anyway is not part of the thought.
            assert_eq!(
                streamed(DeepSeekR1, "<think>Hmm.</think>Yes", size),
                ("Hmm.".into(), "Yes".into())
            );
            // Never closed: all thinking.
            assert_eq!(
                streamed(DeepSeekR1, "no end", size),
                ("no end".into(), String::new())
            );
        }
    }

    #[test]
    fn unknown_names_list_the_parsers() {
        assert_eq!(ReasoningFormat::parse("qwen3"), Ok(Qwen3));
        let err = ReasoningFormat::parse("r1").unwrap_err();
        assert!(err.contains("qwen3, deepseek_r1"), "{err}");
    }
}
