//! Turning a stream of token ids into a stream of text, one token at a time.
//!
//! The obvious way, decoding one token at a time and concatenating, is wrong twice over:
//!
//! - **Bytes are not characters.** Byte-level tokenizers (GPT-2, Llama 3, SmolLM2) have tokens
//!   that hold part of a UTF-8 character: "é" may arrive as two tokens, an emoji as up to four.
//!   Decoded alone, each part is U+FFFD, the replacement character.
//! - **Context changes the text.** SentencePiece-style decoders drop the leading space of the
//!   first token of a string, so `decode(["▁world"])` is `"world"` while
//!   `decode(["▁Hello", "▁world"])` is `"Hello world"`.
//!
//! Decoding the whole output again after every token gets both right but costs O(n) per token.
//! [`IncrementalDetokenizer`] is vLLM's middle way: it decodes a small window, a few tokens
//! already emitted (context) followed by the tokens not yet emitted, and sends the part of the
//! window's text beyond the context's text. While the window's text ends in U+FFFD, a character
//! is still incomplete, and it waits for the next token.

/// Decodes token ids into text: the one thing the core needs from a tokenizer.
///
/// Whether special tokens are skipped is the implementor's choice. Byte sequences that are not
/// valid UTF-8 must come out as U+FFFD (a lossy decode, as Hugging Face tokenizers do), never as
/// an error: an incomplete character at the end is exactly what the detokenizer looks for.
pub trait TokenDecoder: Send + Sync {
    fn decode(&self, ids: &[u32]) -> String;
}

/// Tokens of the prompt used as context before the first output token (vLLM uses 5): enough
/// for any decoder's notion of "start of string" to be behind us.
pub const PROMPT_CONTEXT_TOKENS: usize = 5;

/// Per-sequence state of the incremental detokenizer (vLLM's `prefix_offset` / `read_offset`).
///
/// It keeps only its window of ids, so its memory and the cost of each [`push`](Self::push) (two
/// decodes of a few tokens) stay constant however long the output grows.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDetokenizer {
    /// The ids still needed: `window[..read]` is context whose text was already emitted (vLLM's
    /// `prefix_offset..read_offset`), `window[read..]` is not emitted yet. Ids before the window
    /// are never decoded again, so they are dropped.
    window: Vec<u32>,
    read: usize,
}

impl IncrementalDetokenizer {
    /// A detokenizer for a sequence whose prompt ends with `prompt` (the whole prompt or just
    /// its tail; only the last [`PROMPT_CONTEXT_TOKENS`] are kept as context). The prompt's own
    /// text is never emitted.
    pub fn new(prompt: &[u32]) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(PROMPT_CONTEXT_TOKENS)..];
        Self {
            window: tail.to_vec(),
            read: tail.len(),
        }
    }

    /// Takes the next generated token and returns the text it completes, which may be empty
    /// (an incomplete character, or a token with no text such as a skipped special token).
    pub fn push(&mut self, token: u32, decoder: &dyn TokenDecoder) -> String {
        self.window.push(token);
        self.emit(decoder, false)
    }

    /// Ends the stream: returns whatever text is still held back, even an incomplete character
    /// (as U+FFFD), so that all deltas together equal the decoded output.
    pub fn finish(&mut self, decoder: &dyn TokenDecoder) -> String {
        self.emit(decoder, true)
    }

    fn emit(&mut self, decoder: &dyn TokenDecoder, at_end: bool) -> String {
        let context = decoder.decode(&self.window[..self.read]);
        let text = decoder.decode(&self.window);
        let incomplete = text.ends_with(char::REPLACEMENT_CHARACTER);
        // Compared in characters, as vLLM does: the window's text normally extends the
        // context's, and counting characters keeps the cut on a character boundary even when
        // a decoder rewrites the join.
        let context_chars = context.chars().count();
        let Some((cut, _)) = text.char_indices().nth(context_chars) else {
            return String::new(); // no new text (yet)
        };
        if incomplete && !at_end {
            return String::new();
        }
        // The tokens just emitted become the context of the next window.
        self.window.drain(..self.read);
        self.read = self.window.len();
        text[cut..].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A fake tokenizer: token `i` stands for the bytes `pieces[i]`. With `sentencepiece`, "▁"
    /// stands for a space and a string's leading space is dropped, as in Llama 2's decoder.
    struct Bytes {
        pieces: Vec<Vec<u8>>,
        sentencepiece: bool,
    }

    impl Bytes {
        fn new(pieces: &[&[u8]]) -> Self {
            Self {
                pieces: pieces.iter().map(|p| p.to_vec()).collect(),
                sentencepiece: false,
            }
        }
    }

    impl TokenDecoder for Bytes {
        fn decode(&self, ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&id| self.pieces[id as usize].iter().copied())
                .collect();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if !self.sentencepiece {
                return text;
            }
            let text = text.replace('▁', " ");
            match text.strip_prefix(' ') {
                Some(rest) => rest.to_string(),
                None => text,
            }
        }
    }

    /// Pushes `ids` one by one; returns the deltas, the last one from `finish`.
    fn stream(prompt: &[u32], ids: &[u32], decoder: &dyn TokenDecoder) -> Vec<String> {
        let mut detok = IncrementalDetokenizer::new(prompt);
        let mut deltas: Vec<String> = ids.iter().map(|&id| detok.push(id, decoder)).collect();
        deltas.push(detok.finish(decoder));
        deltas
    }

    const E_ACUTE: &[u8] = "é".as_bytes(); // C3 A9
    const CRAB: &[u8] = "🦀".as_bytes(); // F0 9F A6 80

    #[test]
    fn whole_tokens_come_out_as_they_are() {
        let decoder = Bytes::new(&[b"Hello", b" world", b"!"]);
        assert_eq!(
            stream(&[], &[0, 1, 2], &decoder),
            ["Hello", " world", "!", ""]
        );
    }

    #[test]
    fn a_character_split_over_tokens_waits_until_it_is_complete() {
        let decoder = Bytes::new(&[
            b"caf",
            &E_ACUTE[..1],
            &E_ACUTE[1..],
            &CRAB[..1],
            &CRAB[1..2],
            &CRAB[2..3],
            &CRAB[3..],
            &CRAB[..2],
            &CRAB[2..],
        ]);
        assert_eq!(
            stream(&[], &[0, 1, 2, 3, 4, 5, 6, 7, 8], &decoder),
            ["caf", "", "é", "", "", "", "🦀", "", "🦀", ""]
        );
    }

    #[test]
    fn a_token_can_finish_one_character_and_start_the_next() {
        // "éé" tokenized as C3 | A9 C3 | A9.
        let decoder = Bytes::new(&[b"\xC3", b"\xA9\xC3", b"\xA9"]);
        assert_eq!(stream(&[], &[0, 1, 2], &decoder), ["", "", "éé", ""]);
    }

    #[test]
    fn the_prompt_gives_context_but_is_never_emitted() {
        let mut decoder = Bytes::new(&[
            "▁Hello".as_bytes(),
            "▁world".as_bytes(),
            b"!",
            "▁again".as_bytes(),
        ]);
        decoder.sentencepiece = true;
        // Without context the first token's space is dropped, as decode(output) would.
        assert_eq!(stream(&[], &[1, 2], &decoder), ["world", "!", ""]);
        // After a prompt it is a word boundary and keeps its space.
        assert_eq!(
            stream(&[0], &[1, 2, 3], &decoder),
            [" world", "!", " again", ""]
        );
        let all = decoder.decode(&[0, 1, 2, 3]);
        let prompt = decoder.decode(&[0]);
        assert_eq!(
            stream(&[0], &[1, 2, 3], &decoder).concat(),
            all[prompt.len()..]
        );
    }

    #[test]
    fn finish_releases_an_incomplete_character() {
        let decoder = Bytes::new(&[b"ok", &CRAB[..3]]);
        let deltas = stream(&[], &[0, 1], &decoder);
        assert_eq!(deltas, ["ok", "", "\u{FFFD}"]);
        assert_eq!(deltas.concat(), decoder.decode(&[0, 1]));
    }

    #[test]
    fn invalid_bytes_in_the_middle_are_real_text_and_come_through() {
        // A lone continuation byte is not an incomplete character: once text follows, it is
        // part of the output like any other.
        let decoder = Bytes::new(&[b"a", b"\xA9", b"b"]);
        let deltas = stream(&[], &[0, 1, 2], &decoder);
        assert_eq!(deltas.concat(), "a\u{FFFD}b");
    }

    #[test]
    fn a_tokenless_token_emits_nothing_and_loses_nothing() {
        let decoder = Bytes::new(&[b"a", b"", b"b"]);
        assert_eq!(stream(&[], &[0, 1, 1, 2], &decoder), ["a", "", "", "b", ""]);
    }

    #[test]
    fn the_window_stays_small() {
        let decoder = Bytes::new(&[b"ab", b" ", &E_ACUTE[..1], &E_ACUTE[1..]]);
        let mut detok = IncrementalDetokenizer::new(&[0; 100]);
        assert_eq!(detok.window.len(), PROMPT_CONTEXT_TOKENS);
        for i in 0..10_000u32 {
            detok.push(i % 4, &decoder);
            assert!(detok.window.len() <= PROMPT_CONTEXT_TOKENS + 1);
        }
    }

    /// Text with multibyte characters and spaces, and a tokenization of its bytes into random
    /// pieces of 1 to 5 bytes that ignore character boundaries: the worst a byte-level
    /// tokenizer can do.
    fn tokenized_text() -> impl Strategy<Value = (String, Vec<usize>)> {
        let chars = prop::sample::select(vec!['a', 'b', ' ', 'é', '€', '🦀', '\n']);
        (
            prop::collection::vec(chars, 0..30),
            prop::collection::vec(1usize..=5, 120),
        )
            .prop_map(|(chars, lengths)| (chars.into_iter().collect(), lengths))
    }

    /// Splits `bytes` into pieces of the given lengths (cycling), returning a decoder with one
    /// token per piece and the ids in order.
    fn tokenize(bytes: &[u8], lengths: &[usize], decoder: &mut Bytes) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = bytes;
        for &len in lengths.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at(len.min(rest.len()));
            ids.push(decoder.pieces.len() as u32);
            decoder.pieces.push(piece.to_vec());
            rest = tail;
        }
        ids
    }

    proptest! {
        #[test]
        fn deltas_add_up_to_the_text_and_never_split_a_character(
            (prompt, prompt_cuts) in tokenized_text(),
            (output, output_cuts) in tokenized_text(),
        ) {
            let mut decoder = Bytes::new(&[]);
            // The prompt is tokenized on its own, so it ends on a character boundary.
            let prompt_ids = tokenize(prompt.as_bytes(), &prompt_cuts, &mut decoder);
            let output_ids = tokenize(output.as_bytes(), &output_cuts, &mut decoder);
            let deltas = stream(&prompt_ids, &output_ids, &decoder);
            for delta in &deltas {
                prop_assert!(!delta.contains('\u{FFFD}'), "delta {:?} in {:?}", delta, deltas);
            }
            prop_assert_eq!(deltas.concat(), output);
        }
    }
}
