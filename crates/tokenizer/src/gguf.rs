//! Building a tokenizer from the `tokenizer.ggml.*` metadata of a GGUF file.
//!
//! GGUF stores the vocabulary, merges and a *name* for the pre-tokenizer (`tokenizer.ggml.pre`),
//! not the pre-tokenizer itself: llama.cpp maps each name to hard-coded split regexes. We map the
//! same names to the `tokenizers` components of the model's original `tokenizer.json`, so that
//! the result encodes exactly like both llama.cpp and Hugging Face. candle's own
//! `TokenizerFromGguf` gets this wrong for `smollm` (it prepends a space and does not split
//! digits), which is why this module exists.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, NormalizerWrapper, SplitDelimiterBehavior};

use crate::builtin_templates;
use crate::error::{Result, TokenizerError};
use crate::special_tokens::{bos_eos_template, SpecialTokens};
use crate::tokenizer::{Tokenizer, TokenizerParts};

/// `llama_token_type` values stored in `tokenizer.ggml.token_type`.
mod token_type {
    pub const NORMAL: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const CONTROL: u32 = 3;
    pub const USER_DEFINED: u32 = 4;
}

/// The split regex of Llama 3's `tokenizer.json` (digits in groups of up to three).
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex of Qwen2's `tokenizer.json` (every digit on its own).
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's metadata.
    ///
    /// Supports `tokenizer.ggml.model = "gpt2"` (byte-level BPE; the pre-tokenizer is chosen from
    /// `tokenizer.ggml.pre`, unknown names fall back to GPT-2's with a warning) and `"llama"`
    /// (SentencePiece BPE with byte fallback, merges derived from the token scores). Control
    /// tokens become special added tokens, so `<|im_start|>` in a prompt encodes to its single id.
    /// The chat template (`tokenizer.chat_template`) is compiled here, so a broken one is an
    /// error at load time.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let model = as_str(
            "tokenizer.ggml.model",
            get(content, "tokenizer.ggml.model")?,
        )?;
        let tokens = string_array(content, "tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(bad(
                "tokenizer.ggml.tokens",
                "a non-empty array of strings",
                "an empty array",
            ));
        }
        let token_types = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => {
                let types = u32_array("tokenizer.ggml.token_type", v)?;
                if types.len() != tokens.len() {
                    return Err(bad(
                        "tokenizer.ggml.token_type",
                        &format!("one entry per token ({})", tokens.len()),
                        &format!("{} entries", types.len()),
                    ));
                }
                types
            }
            // Old conversions omit the types; treat everything as normal text.
            None => vec![token_type::NORMAL; tokens.len()],
        };

        let bos_id = opt_token_id(content, "tokenizer.ggml.bos_token_id", tokens.len())?;
        let mut eos_ids = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = opt_token_id(content, key, tokens.len())? {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        for (id, token) in tokens.iter().enumerate() {
            let id = id as u32;
            if builtin_templates::END_OF_TURN_TOKENS.contains(&token.as_str())
                && token_types[id as usize] == token_type::CONTROL
                && !eos_ids.contains(&id)
            {
                eos_ids.push(id);
            }
        }
        let specials =
            SpecialTokens::from_ids(bos_id, eos_ids, |id| tokens.get(id as usize).cloned());

        let (mut inner, default_add_bos) = match model {
            "gpt2" => (build_byte_level_bpe(content, &tokens)?, false),
            "llama" => (
                build_sentencepiece_bpe(content, &tokens, &token_types)?,
                true,
            ),
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    model: other.to_owned(),
                })
            }
        };

        // Added tokens are matched on the raw text before pre-tokenization, which is what makes
        // `<|im_start|>` a single id instead of `<`, `|`, `im`, ... Control tokens are special
        // (dropped by `decode(.., skip_special_tokens = true)`); user-defined ones are plain
        // added tokens, as in the original `tokenizer.json`, so they survive decoding.
        let mut special = Vec::new();
        let mut added = Vec::new();
        for (id, (token, ty)) in tokens.iter().zip(&token_types).enumerate() {
            let is_stop_or_bos =
                specials.bos_id == Some(id as u32) || specials.eos_ids.contains(&(id as u32));
            match *ty {
                token_type::CONTROL | token_type::UNKNOWN => {
                    special.push(AddedToken::from(token.clone(), true))
                }
                _ if is_stop_or_bos => special.push(AddedToken::from(token.clone(), true)),
                token_type::USER_DEFINED => {
                    added.push(AddedToken::from(token.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&added);

        let add_bos = opt_bool(content, "tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
        let add_eos = opt_bool(content, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let (bos, eos) = (specials.bos(), specials.eos());
        if let Some(template) = bos_eos_template(
            bos.as_ref().filter(|_| add_bos),
            eos.as_ref().filter(|_| add_eos),
        )? {
            let processor = match inner.get_post_processor().cloned() {
                Some(existing) => ProcessorSequence::new(vec![existing, template.into()]).into(),
                None => PostProcessorWrapper::from(template),
            };
            inner.with_post_processor(Some(processor));
        }

        let architecture = match content.metadata.get("general.architecture") {
            Some(Value::String(arch)) => Some(arch.as_str()),
            _ => None,
        };
        let chat_template = match content.metadata.get("tokenizer.chat_template") {
            Some(v) => Some(as_str("tokenizer.chat_template", v)?.to_owned()),
            None => architecture
                .and_then(builtin_templates::for_architecture)
                .map(str::to_owned),
        };
        let model_max_length = match content.metadata.get("general.architecture") {
            Some(Value::String(arch)) => {
                let key = format!("{arch}.context_length");
                match content.metadata.get(&key) {
                    Some(v) => Some(as_u64(&key, v)?),
                    None => None,
                }
            }
            _ => None,
        };

        Tokenizer::assemble(TokenizerParts {
            inner,
            specials,
            add_bos_token: Some(add_bos),
            chat_template,
            model_max_length,
        })
    }
}

/// `tokenizer.ggml.model = "gpt2"`: byte-level BPE from `tokens` + `merges`.
fn build_byte_level_bpe(content: &Content, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let merges = string_array(content, "tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, merge)| match merge.split_once(' ') {
            Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
            None => Err(bad(
                "tokenizer.ggml.merges",
                "strings of the form \"left right\"",
                &format!("entry {i} = {merge:?}"),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let pre = match content.metadata.get("tokenizer.ggml.pre") {
        Some(v) => as_str("tokenizer.ggml.pre", v)?,
        None => "default",
    };
    let pipeline = byte_level_pipeline(pre)?;

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pipeline.ignore_merges)
        .build()
        .map_err(|source| TokenizerError::Build {
            what: "byte-level BPE from tokenizer.ggml.tokens / merges".into(),
            source,
        })?;

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_normalizer(pipeline.normalizer);
    tokenizer.with_pre_tokenizer(Some(pipeline.pre_tokenizer));
    // The post-processor only fixes offsets (ids are untouched), but it is what the original
    // tokenizer.json files carry, so keep it for exported files to look like theirs.
    tokenizer.with_post_processor(Some(ByteLevel::new(true, false, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// The normalizer / pre-tokenizer pair for a `tokenizer.ggml.pre` name.
struct ByteLevelPipeline {
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: PreTokenizerWrapper,
    ignore_merges: bool,
}

/// Maps llama.cpp's pre-tokenizer names to the `tokenizers` components of the corresponding
/// Hugging Face `tokenizer.json`.
fn byte_level_pipeline(pre: &str) -> Result<ByteLevelPipeline> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|source| TokenizerError::Build {
            what: format!("pre-tokenizer regex for tokenizer.ggml.pre = {pre:?}"),
            source,
        })?;
        // The regex has done the splitting; ByteLevel only maps bytes to its printable alphabet.
        Ok(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    // GPT-2's pattern without a leading space: `add_prefix_space = true` is exactly the candle bug
    // that turns "The" into "ĠThe".
    let gpt2 = || -> PreTokenizerWrapper { ByteLevel::new(false, true, true).into() };

    Ok(match pre {
        // StarCoder-family vocabularies (SmolLM among them) put every digit in its own word,
        // then apply GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            ByteLevelPipeline {
                normalizer: None,
                pre_tokenizer: PreTokenizerSequence::new(vec![Digits::new(true).into(), gpt2()])
                    .into(),
                ignore_merges: false,
            }
        }
        "gpt2" | "default" | "mpt" | "olmo" | "jais" => ByteLevelPipeline {
            normalizer: None,
            pre_tokenizer: gpt2(),
            ignore_merges: false,
        },
        // Llama 3 looks whole words up in the vocabulary before merging (`ignore_merges`).
        "llama-bpe" | "llama3" | "smaug-bpe" | "dbrx" => ByteLevelPipeline {
            normalizer: None,
            pre_tokenizer: split(REGEX_LLAMA3)?,
            ignore_merges: true,
        },
        "qwen2" | "stablelm2" => ByteLevelPipeline {
            normalizer: Some(NFC.into()),
            pre_tokenizer: split(REGEX_QWEN2)?,
            ignore_merges: false,
        },
        other => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre; falling back to GPT-2's pre-tokenizer, \
                 token ids may differ from the model's own tokenizer"
            );
            ByteLevelPipeline {
                normalizer: None,
                pre_tokenizer: gpt2(),
                ignore_merges: false,
            }
        }
    })
}

/// `tokenizer.ggml.model = "llama"`: SentencePiece BPE, as in Llama 1/2 and Mistral.
///
/// GGUF keeps SentencePiece's scores, not merges. SentencePiece merges the adjacent pair whose
/// concatenation is the highest-scoring vocabulary piece, so ranking every `(left, right)` split
/// of every piece by that piece's score gives a merge list that the `tokenizers` BPE replays
/// identically (this is also how Hugging Face converts these vocabularies).
fn build_sentencepiece_bpe(
    content: &Content,
    tokens: &[String],
    token_types: &[u32],
) -> Result<tokenizers::Tokenizer> {
    let scores = match content.metadata.get("tokenizer.ggml.scores") {
        Some(v) => {
            let scores = f32_array("tokenizer.ggml.scores", v)?;
            if scores.len() != tokens.len() {
                return Err(bad(
                    "tokenizer.ggml.scores",
                    &format!("one score per token ({})", tokens.len()),
                    &format!("{} scores", scores.len()),
                ));
            }
            scores
        }
        // Without scores, earlier pieces win, as in a merge-ordered vocabulary.
        None => (0..tokens.len()).map(|i| -(i as f32)).collect(),
    };

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    let mergeable = |id: u32| token_types[id as usize] == token_type::NORMAL;
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !mergeable(id as u32) {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                if mergeable(l) && mergeable(r) {
                    ranked.push((scores[id], id as u32, l, r));
                }
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = ranked
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect::<Vec<_>>();

    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = opt_token_id(content, "tokenizer.ggml.unknown_token_id", tokens.len())? {
        builder = builder.unk_token(tokens[unk as usize].clone());
    }
    let bpe = builder.build().map_err(|source| TokenizerError::Build {
        what: "SentencePiece BPE from tokenizer.ggml.tokens / scores".into(),
        source,
    })?;

    let add_space_prefix = opt_bool(content, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|source| TokenizerError::Build {
            what: format!("replace {from:?} -> {to:?}"),
            source,
        })
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".into()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NormalizerSequence::new(normalizers)));
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

// ---------------------------------------------------------------------------------------------
// Typed access to metadata values, with errors that name the key.

fn get<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| TokenizerError::MissingMetadata {
            key: key.to_owned(),
        })
}

fn bad(key: &str, expected: &str, found: &str) -> TokenizerError {
    TokenizerError::BadMetadata {
        key: key.to_owned(),
        expected: expected.to_owned(),
        found: found.to_owned(),
    }
}

/// A short description of a value for error messages (never the whole 50k-entry array).
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) if s.len() > 40 => format!("a string ({} bytes)", s.len()),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(a) => format!("an array of {} values", a.len()),
        other => format!("{:?}", other),
    }
}

fn as_str<'a>(key: &str, value: &'a Value) -> Result<&'a str> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(bad(key, "a string", &describe(other))),
    }
}

fn as_u64(key: &str, value: &Value) -> Result<u64> {
    let n: Option<u64> = match *value {
        Value::U8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::U32(v) => Some(v.into()),
        Value::U64(v) => Some(v),
        Value::I8(v) => u64::try_from(v).ok(),
        Value::I16(v) => u64::try_from(v).ok(),
        Value::I32(v) => u64::try_from(v).ok(),
        Value::I64(v) => u64::try_from(v).ok(),
        _ => None,
    };
    n.ok_or_else(|| bad(key, "a non-negative integer", &describe(value)))
}

fn as_u32(key: &str, value: &Value) -> Result<u32> {
    let n = as_u64(key, value)?;
    u32::try_from(n).map_err(|_| bad(key, "an integer below 2^32", &n.to_string()))
}

/// A token id that must point into the vocabulary; `None` if the key is absent.
fn opt_token_id(content: &Content, key: &str, vocab_len: usize) -> Result<Option<u32>> {
    let Some(value) = content.metadata.get(key) else {
        return Ok(None);
    };
    let id = as_u32(key, value)?;
    if id as usize >= vocab_len {
        return Err(bad(
            key,
            &format!("a token id below the vocabulary size {vocab_len}"),
            &id.to_string(),
        ));
    }
    Ok(Some(id))
}

fn opt_bool(content: &Content, key: &str) -> Result<Option<bool>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        // Some converters wrote flags as integers.
        Some(Value::U8(0)) | Some(Value::I32(0)) | Some(Value::U32(0)) => Ok(Some(false)),
        Some(Value::U8(1)) | Some(Value::I32(1)) | Some(Value::U32(1)) => Ok(Some(true)),
        Some(other) => Err(bad(key, "a boolean", &describe(other))),
    }
}

fn string_array(content: &Content, key: &str) -> Result<Vec<String>> {
    match get(content, key)? {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad(
                    key,
                    "an array of strings",
                    &format!("entry {i} = {}", describe(other)),
                )),
            })
            .collect(),
        other => Err(bad(key, "an array of strings", &describe(other))),
    }
}

fn u32_array(key: &str, value: &Value) -> Result<Vec<u32>> {
    match value {
        Value::Array(items) => items.iter().map(|v| as_u32(key, v)).collect(),
        other => Err(bad(key, "an array of integers", &describe(other))),
    }
}

fn f32_array(key: &str, value: &Value) -> Result<Vec<f32>> {
    match value {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match *v {
                Value::F32(f) => Ok(f),
                Value::F64(f) => Ok(f as f32),
                ref other => Err(bad(
                    key,
                    "an array of floats",
                    &format!("entry {i} = {}", describe(other)),
                )),
            })
            .collect(),
        other => Err(bad(key, "an array of floats", &describe(other))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::quantized::gguf_file::VersionedMagic;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    use super::*;

    fn pieces(pre: &str, text: &str) -> Vec<String> {
        let pipeline = byte_level_pipeline(pre).expect("pipeline builds");
        let mut pretokenized = PreTokenizedString::from(text);
        pipeline
            .pre_tokenizer
            .pre_tokenize(&mut pretokenized)
            .expect("pre-tokenizes");
        pretokenized
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_owned())
            .collect()
    }

    const SAMPLE: &str = "I'M here 12345\n\n  x";

    #[test]
    fn smollm_splits_digits_and_adds_no_prefix_space() {
        assert_eq!(
            pieces("smollm", SAMPLE),
            ["I", "'", "M", "Ġhere", "Ġ", "1", "2", "3", "4", "5", "ĊĊĠ", "Ġx"]
        );
        assert_eq!(pieces("smollm", "The"), ["The"]);
    }

    #[test]
    fn llama3_groups_digits_by_three_and_ignores_case_in_contractions() {
        assert_eq!(
            pieces("llama-bpe", SAMPLE),
            ["I", "'M", "Ġhere", "Ġ", "123", "45", "ĊĊ", "Ġ", "Ġx"]
        );
    }

    #[test]
    fn qwen2_splits_every_digit() {
        assert_eq!(
            pieces("qwen2", SAMPLE),
            ["I", "'M", "Ġhere", "Ġ", "1", "2", "3", "4", "5", "ĊĊ", "Ġ", "Ġx"]
        );
    }

    #[test]
    fn gpt2_keeps_numbers_together() {
        assert_eq!(
            pieces("gpt2", SAMPLE),
            ["I", "'", "M", "Ġhere", "Ġ12345", "ĊĊĠ", "Ġx"]
        );
    }

    #[test]
    fn every_named_pre_tokenizer_builds() {
        for pre in [
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
            "gpt2",
            "default",
            "mpt",
            "olmo",
            "jais",
            "llama-bpe",
            "llama3",
            "smaug-bpe",
            "dbrx",
            "qwen2",
            "stablelm2",
            "something-new",
        ] {
            assert!(byte_level_pipeline(pre).is_ok(), "{pre}");
        }
    }

    /// A SentencePiece vocabulary in miniature: specials, the 256 byte pieces, and a few words
    /// whose scores make "▁hello" assemble through he / ll / hell / hello.
    fn tiny_llama() -> Content {
        let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
        let mut types = vec![
            token_type::UNKNOWN,
            token_type::CONTROL,
            token_type::CONTROL,
        ];
        let mut scores = vec![0.0f32; 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (piece, score) in [
            ("▁hello", -1.0),
            ("hello", -2.0),
            ("hell", -3.0),
            ("he", -4.0),
            ("ll", -5.0),
            ("▁", -10.0),
            ("h", -11.0),
            ("e", -12.0),
            ("l", -13.0),
            ("o", -14.0),
        ] {
            tokens.push(piece.to_owned());
            types.push(token_type::NORMAL);
            scores.push(score);
        }
        let metadata = HashMap::from([
            (
                "tokenizer.ggml.model".to_owned(),
                Value::String("llama".into()),
            ),
            (
                "tokenizer.ggml.tokens".to_owned(),
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.token_type".to_owned(),
                Value::Array(types.into_iter().map(|t| Value::I32(t as i32)).collect()),
            ),
            (
                "tokenizer.ggml.scores".to_owned(),
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            ("tokenizer.ggml.unknown_token_id".to_owned(), Value::U32(0)),
            ("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(2)),
        ]);
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let tok = Tokenizer::from_gguf(&tiny_llama()).expect("builds");
        let id = |t: &str| tok.token_to_id(t).expect("in vocab");
        // No add_bos_token key: Llama-style vocabularies add BOS by default.
        assert!(tok.add_bos_token());
        assert_eq!(tok.encode("hello", true).unwrap(), [1, id("▁hello")]);
        assert_eq!(tok.encode("hello", false).unwrap(), [id("▁hello")]);
        let ids = tok.encode("hé", false).unwrap();
        assert_eq!(ids, [id("▁"), id("h"), id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hé");
        assert_eq!(
            tok.decode(&tok.encode("hello hello", true).unwrap(), true)
                .unwrap(),
            "hello hello"
        );
        assert_eq!(tok.eos_token(), Some("</s>"));
    }
}
