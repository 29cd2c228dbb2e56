//! The special tokens both loaders settle on (BOS, and every id that ends generation), and the
//! post-processor that puts BOS / EOS around an encoding: the GGUF loader builds it from the
//! file's `add_bos_token` / `add_eos_token` flags, and `Tokenizer::inner_for_export` adds it to
//! the files it writes, so both use this one construction.

use tokenizers::processors::template::TemplateProcessing;

use crate::error::{Result, TokenizerError};

/// BOS and the ids that end generation, as a loader found them, with their text.
#[derive(Debug, Clone)]
pub(crate) struct SpecialTokens {
    pub bos_token: Option<String>,
    pub bos_id: Option<u32>,
    /// The primary EOS's text.
    pub eos_token: Option<String>,
    /// Primary EOS first, then any other end-of-turn ids; all of them stop generation.
    pub eos_ids: Vec<u32>,
}

impl SpecialTokens {
    /// Both loaders settle on ids first; `token_text` spells them in the vocabulary's alphabet.
    pub fn from_ids(
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        token_text: impl Fn(u32) -> Option<String>,
    ) -> Self {
        Self {
            bos_token: bos_id.and_then(&token_text),
            bos_id,
            eos_token: eos_ids.first().and_then(|&id| token_text(id)),
            eos_ids,
        }
    }

    /// BOS as `(text, id)`, when the model has one.
    pub fn bos(&self) -> Option<(String, u32)> {
        Some((self.bos_token.clone()?, self.bos_id?))
    }

    /// The primary EOS as `(text, id)`, when the model has one.
    pub fn eos(&self) -> Option<(String, u32)> {
        Some((self.eos_token.clone()?, *self.eos_ids.first()?))
    }
}

/// A post-processor adding BOS in front / EOS at the end, or `None` if neither is wanted. This is
/// the `TemplateProcessing` Hugging Face puts in `tokenizer.json` for such models, so exported
/// files behave the same in Python.
pub(crate) fn bos_eos_template(
    bos: Option<&(String, u32)>,
    eos: Option<&(String, u32)>,
) -> Result<Option<TemplateProcessing>> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some((token, id)) = bos {
        single.push(token.clone());
        pair.push(format!("{token}:0"));
        specials.push((token.clone(), *id));
    }
    single.push("$A:0".to_owned());
    pair.push("$A:0".to_owned());
    if let Some((token, id)) = eos {
        single.push(token.clone());
        pair.push(format!("{token}:0"));
        if !specials.iter().any(|(t, _)| t == token) {
            specials.push((token.clone(), *id));
        }
    }
    if let Some((token, _)) = bos {
        pair.push(format!("{token}:1"));
    }
    pair.push("$B:1".to_owned());
    if let Some((token, _)) = eos {
        pair.push(format!("{token}:1"));
    }
    let build_err = |e: String| TokenizerError::Build {
        what: "BOS/EOS post-processor".into(),
        source: e.into(),
    };
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(|e| build_err(e.to_string()))?
        .try_pair(pair)
        .map_err(|e| build_err(e.to_string()))?
        .special_tokens(specials)
        .build()
        .map(Some)
        .map_err(|e| build_err(e.to_string()))
}
