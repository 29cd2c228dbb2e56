//! The one error type of this crate.
//!
//! Every variant names the file, metadata key or template that caused it, because the person
//! reading the message usually has several model folders around and needs to know which one
//! to fix (or re-download).

use std::path::PathBuf;

/// Everything that can go wrong while building a tokenizer, encoding / decoding, or rendering a
/// chat template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A GGUF file lacks a key the tokenizer cannot be built without.
    #[error("GGUF metadata has no `{key}`: this file does not carry a usable tokenizer")]
    MissingMetadata {
        /// The missing metadata key, e.g. `tokenizer.ggml.tokens`.
        key: String,
    },

    /// A GGUF metadata value exists but has the wrong type or an impossible value.
    #[error("GGUF metadata `{key}` should be {expected}, found {found}")]
    BadMetadata {
        /// The offending metadata key.
        key: String,
        /// What the key should hold, in words.
        expected: String,
        /// A short description of what it holds instead.
        found: String,
    },

    /// `tokenizer.ggml.model` names a tokenizer family we cannot build.
    #[error(
        "unsupported tokenizer model `{model}` in GGUF metadata `tokenizer.ggml.model` \
         (supported: `gpt2` byte-level BPE, `llama` SentencePiece BPE)"
    )]
    UnsupportedModel {
        /// The value found in `tokenizer.ggml.model`.
        model: String,
    },

    /// The `tokenizers` crate refused a component we assembled (bad merges, bad regex, ...).
    #[error("cannot build the tokenizer ({what}): {source}")]
    Build {
        /// Which component was being built.
        what: String,
        /// The underlying `tokenizers` error.
        #[source]
        source: tokenizers::Error,
    },

    /// Encoding a piece of text failed.
    #[error("cannot encode text: {source}")]
    Encode {
        /// The underlying `tokenizers` error.
        #[source]
        source: tokenizers::Error,
    },

    /// Decoding a sequence of ids failed.
    #[error("cannot decode token ids: {source}")]
    Decode {
        /// The underlying `tokenizers` error.
        #[source]
        source: tokenizers::Error,
    },

    /// An id passed to `decode` is outside the vocabulary. The `tokenizers` crate would silently
    /// drop it, which hides sampler or model/vocabulary mismatches, so we refuse instead.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    UnknownTokenId {
        /// The offending id.
        id: u32,
        /// Number of ids the tokenizer knows (added tokens included).
        vocab_size: usize,
    },

    /// A file could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// `read` or `write`, for the message.
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file of a Hugging Face folder is not valid JSON.
    #[error("{} is not valid JSON: {source}", path.display())]
    Json {
        /// The file concerned.
        path: PathBuf,
        /// The parse error, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// A Hugging Face `tokenizer.json` could not be loaded or saved by the `tokenizers` crate.
    #[error("cannot {action} tokenizer file {}: {source}", path.display())]
    TokenizerFile {
        /// `load` or `save`, for the message.
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying `tokenizers` error.
        #[source]
        source: tokenizers::Error,
    },

    /// A Hugging Face config file parses as JSON but a field has an unexpected shape.
    #[error("{}: {message}", path.display())]
    BadConfig {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A chat template has a syntax error (or uses syntax minijinja does not support).
    #[error("chat template does not compile: {source}")]
    TemplateCompile {
        /// The minijinja error, which carries the line number.
        #[source]
        source: minijinja::Error,
    },

    /// A chat template compiled but failed while rendering (including `raise_exception`).
    #[error("chat template failed to render: {source}")]
    TemplateRender {
        /// The minijinja error, which carries the line number and message.
        #[source]
        source: minijinja::Error,
    },
}

/// Shorthand used across the crate.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
