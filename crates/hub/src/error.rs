//! The one error type of this crate.
//!
//! Resolution falls through several sources (models folder, Hugging Face cache, the Hub, a pip
//! package); when all of them fail the user needs to see every attempt at once, because the
//! first failure ("no network") is rarely the one they can fix ("install pip", "set HF_TOKEN").

use std::fmt;
use std::path::PathBuf;

/// One place a catalog model was looked for, and why it did not yield the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFailure {
    /// Where we looked, e.g. `Hugging Face Hub (org/repo, file.gguf)`.
    pub source: String,
    /// Why that source did not produce the model, in words meant for the user.
    pub reason: String,
}

impl SourceFailure {
    pub(crate) fn new(source: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for SourceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.reason)
    }
}

/// Why `--model` could not be turned into a local path.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The argument looks like a path (it has a `/` or ends in `.gguf`) but nothing is there.
    /// Kept apart from [`FetchError::UnknownModel`] so a typo in a path is not answered with
    /// a list of catalog names.
    #[error("model path `{}` does not exist", path.display())]
    PathNotFound {
        /// The path as given.
        path: PathBuf,
    },

    /// The path exists but is neither a GGUF file nor a Hugging Face folder.
    #[error("`{}` is not a model: {reason}", path.display())]
    NotAModel {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Neither an existing path nor a catalog alias.
    #[error(
        "unknown model `{name}`: not a file or folder, and not in the catalog (known: {}); \
         pass a .gguf file, a folder with config.json, or one of the known names",
        known.join(", ")
    )]
    UnknownModel {
        /// The name as given.
        name: String,
        /// Every alias of the catalog, sorted.
        known: Vec<String>,
    },

    /// A catalog alias, but no source could produce it.
    #[error(
        "could not get model `{alias}`; every source failed:{}",
        bullets(attempts)
    )]
    AllSourcesFailed {
        /// The catalog alias.
        alias: String,
        /// Each source in the order tried, with its failure.
        attempts: Vec<SourceFailure>,
    },

    /// The catalog (embedded or given to [`crate::Catalog::parse`]) is malformed.
    #[error("invalid model catalog: {0}")]
    Catalog(String),

    /// A local file-system operation failed (creating the models folder, locking it, ...).
    #[error("{context} `{}`: {source}", path.display())]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn bullets(attempts: &[SourceFailure]) -> String {
    attempts.iter().map(|a| format!("\n  - {a}")).collect()
}
