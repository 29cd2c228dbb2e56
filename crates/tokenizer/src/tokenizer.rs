//! The [`Tokenizer`] type: a `tokenizers::Tokenizer` plus what a server needs around it (BOS
//! handling, every id that ends generation, the compiled chat template).

use crate::chat_template::ChatTemplate;
use crate::error::{Result, TokenizerError};
use crate::special_tokens::{bos_eos_template, SpecialTokens};

/// A model's tokenizer, built from GGUF metadata ([`Tokenizer::from_gguf`]) or a Hugging Face
/// folder ([`Tokenizer::from_hf_folder`]).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    specials: SpecialTokens,
    /// Whether `encode(.., true)` starts with BOS (by either mechanism below).
    add_bos_token: bool,
    /// `inner`'s post-processor does not add BOS although the config asks for it (a
    /// `tokenizer.json` saved without the template `transformers`' Llama class would add at load
    /// time), so `encode` prepends it itself.
    prepend_bos: bool,
    chat_template: Option<ChatTemplate>,
    model_max_length: Option<u64>,
}

/// Everything a loader has found; [`Tokenizer::assemble`] turns it into a [`Tokenizer`].
pub(crate) struct TokenizerParts {
    pub inner: tokenizers::Tokenizer,
    pub specials: SpecialTokens,
    /// `None` when the source does not say; then whatever `inner` does is taken as intended.
    pub add_bos_token: Option<bool>,
    pub chat_template: Option<String>,
    pub model_max_length: Option<u64>,
}

impl Tokenizer {
    /// Shared final step of both loaders: work out how BOS gets added and compile the template.
    pub(crate) fn assemble(parts: TokenizerParts) -> Result<Self> {
        let TokenizerParts {
            inner,
            specials,
            add_bos_token,
            chat_template,
            model_max_length,
        } = parts;
        let bos_id = specials.bos_id;

        // Ask the post-processor rather than parse it: it may be a Sequence, a Template with
        // other tokens, or something we do not know about.
        let inner_adds_bos = match bos_id {
            Some(bos) => {
                let probe = inner
                    .encode_fast("", true)
                    .map_err(|source| TokenizerError::Encode { source })?;
                probe.get_ids().first() == Some(&bos)
            }
            None => false,
        };
        let prepend_bos = add_bos_token == Some(true) && bos_id.is_some() && !inner_adds_bos;
        if add_bos_token == Some(false) && inner_adds_bos {
            tracing::debug!(
                "the tokenizer's post-processor adds BOS although add_bos_token is false; \
                 keeping the post-processor's behaviour, as transformers does"
            );
        }

        let chat_template = chat_template
            .map(|source| {
                ChatTemplate::new(
                    source,
                    specials.bos_token.as_deref(),
                    specials.eos_token.as_deref(),
                )
            })
            .transpose()?;

        Ok(Self {
            inner,
            specials,
            add_bos_token: inner_adds_bos || prepend_bos,
            prepend_bos,
            chat_template,
            model_max_length,
        })
    }

    /// Encodes `text`. With `add_special_tokens`, BOS (and EOS, for the rare models that want
    /// it) is added as the model's configuration says; special-token text such as
    /// `<|im_start|>` is always encoded to its single id, which chat prompts rely on.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|source| TokenizerError::Encode { source })?;
        let ids = encoding.get_ids();
        match (add_special_tokens && self.prepend_bos, self.specials.bos_id) {
            (true, Some(bos)) => {
                let mut with_bos = Vec::with_capacity(ids.len() + 1);
                with_bos.push(bos);
                with_bos.extend_from_slice(ids);
                Ok(with_bos)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Decodes `ids` to text. Ids outside the vocabulary are an error rather than silently
    /// dropped. Note that decoding a prefix of a sequence can end in the middle of a UTF-8
    /// character (shown as U+FFFD); streaming callers should decode growing windows.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.vocab_size(),
            });
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|source| TokenizerError::Decode { source })
    }

    /// The vocabulary string of `id` (in the model's own alphabet, e.g. `Ġthe` for byte-level
    /// BPE), or `None` outside the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary string (special tokens included), if there is one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids, added tokens included. The model's embedding matrix may be larger
    /// (padded); ids past this are never produced by `encode`.
    /// Costly: the `tokenizers` crate builds the whole vocabulary map to count it, so keep
    /// this off hot paths (the engine decodes every generated token).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS id, if the model has one (whether or not `encode` adds it).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.specials.bos_id
    }

    /// The primary EOS id (the first of [`Tokenizer::eos_token_ids`]).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.specials.eos_ids.first().copied()
    }

    /// Every id that ends generation: EOS plus end-of-turn / end-of-message ids.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.specials.eos_ids
    }

    /// The BOS token's text, e.g. `<|im_start|>`.
    pub fn bos_token(&self) -> Option<&str> {
        self.specials.bos_token.as_deref()
    }

    /// The primary EOS token's text, e.g. `<|im_end|>`.
    pub fn eos_token(&self) -> Option<&str> {
        self.specials.eos_token.as_deref()
    }

    /// Whether `encode(.., add_special_tokens = true)` puts BOS in front.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// The model's chat template, compiled, if it ships one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The context length the tokenizer was configured for, if known.
    pub fn model_max_length(&self) -> Option<u64> {
        self.model_max_length
    }

    /// The underlying `tokenizers` tokenizer, e.g. for `decode_stream`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// `inner`, with a BOS post-processor added if `encode` has to prepend BOS by hand: files
    /// written from it then add BOS on their own, in Python as well as here.
    pub(crate) fn inner_for_export(&self) -> Result<tokenizers::Tokenizer> {
        let mut inner = self.inner.clone();
        if let (true, Some(bos)) = (self.prepend_bos, self.specials.bos()) {
            if let Some(template) = bos_eos_template(Some(&bos), None)? {
                let processor: tokenizers::PostProcessorWrapper = match inner.get_post_processor() {
                    Some(existing) => tokenizers::processors::sequence::Sequence::new(vec![
                        existing.clone(),
                        template.into(),
                    ])
                    .into(),
                    None => template.into(),
                };
                inner.with_post_processor(Some(processor));
            }
        }
        Ok(inner)
    }
}

/// The engine's view of a tokenizer: decoding for streamed text. Special tokens are skipped
/// (they are control markers, not text), and a failure decodes to nothing rather than
/// stopping the stream, since the ids come from the model itself.
impl minserve_core::detokenize::TokenDecoder for Tokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        Tokenizer::decode(self, ids, true).unwrap_or_default()
    }
}
