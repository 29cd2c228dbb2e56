//! The model's vocabulary as llguidance needs it: every token id's bytes in a token trie, the
//! ids that end a sequence, and a way to tokenize text the grammar forces.

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use minserve_tokenizer::Tokenizer;

/// The vocabulary could not be read into a token trie (a tokenizer whose pieces are neither
/// byte-level nor byte-fallback, say); structured outputs are then unavailable for the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VocabularyError(pub String);

/// Our tokenizer behind llguidance's tokenizer interface.
struct MinserveTokEnv {
    tokenizer: Tokenizer,
    trie: TokTrie,
}

impl TokenizerEnv for MinserveTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The tokenizer's own encoding of valid UTF-8; the trie's greedy split of anything else
    /// (a grammar may force a partial character).
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode(text, false)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// The token environment of `tokenizer` for a model with `vocab_size` logits per row.
pub(crate) fn token_env(
    tokenizer: &Tokenizer,
    vocab_size: usize,
) -> Result<TokEnv, VocabularyError> {
    // llguidance reads the pieces' bytes from the `tokenizer.json` layout (byte-level BPE's
    // alphabet, byte fallback's `<0xNN>` and `▁`), which the tokenizer writes of itself whether
    // it was loaded from a Hugging Face folder or from GGUF metadata.
    let json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| VocabularyError(format!("could not serialize the tokenizer: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&json)
        .map_err(|e| VocabularyError(format!("could not read the tokenizer back: {e}")))?;
    // The reader asserts on pieces it does not expect; a vocabulary it cannot read must not
    // take the server down.
    let words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
        .map_err(|_| VocabularyError("llguidance could not read the vocabulary".to_string()))?
        .map_err(|e| VocabularyError(format!("llguidance could not read the vocabulary: {e}")))?;
    let vocab_size = vocab_size.max(words.len());
    let mut words = words;
    // Ids without a piece (padding past the tokenizer's vocabulary) are never allowed.
    words.resize(vocab_size, Vec::new());
    let eos_ids = tokenizer.eos_token_ids();
    let Some(&eos) = eos_ids.first() else {
        return Err(VocabularyError(
            "the tokenizer has no end-of-sequence token, which a grammar needs to end".to_string(),
        ));
    };
    let info = TokRxInfo {
        tok_bos: tokenizer.bos_token_id(),
        ..TokRxInfo::new(vocab_size as u32, eos)
    };
    let trie = TokTrie::from(&info, &words).with_eos_tokens(eos_ids);
    Ok(Arc::new(MinserveTokEnv {
        tokenizer: tokenizer.clone(),
        trie,
    }))
}
