//! `minserve serve --config FILE`: the models one process serves, from a TOML file, each with
//! its own engine settings and share of the KV cache memory.
//!
//! ```toml
//! kv_cache_memory = "2GiB"      # all models together (default: --kv-cache-memory, or 1 GiB)
//!
//! [[model]]
//! model = "smollm2-135m"        # what --model takes: a file, a folder, an alias, synthetic:
//! name = "small"                # the id clients send (default: as for --served-model-name)
//! aliases = ["default", "chat"] # more ids for it
//! kv_cache_share = 0.75         # of kv_cache_memory (default: an equal part of what is left)
//! max_num_seqs = 32             # engine flags, each as its `serve` flag (default: the flag)
//! max_num_batched_tokens = 512
//! kv_cache_dtype = "q8"
//! scheduling_policy = "fair-share"
//! speculative = "ngram"          # speculative decoding, with its draft length
//! num_speculative_tokens = 4
//!
//! [[model]]
//! model = "synthetic:tiny"
//! name = "tiny"
//! ```
//!
//! Mistakes are refused before anything loads, with the line they are on: an unknown key (a
//! typo would otherwise be silently ignored), a name or alias given twice, shares over 100%,
//! a value of the wrong type. Positions come from the TOML parser's spans.

use std::ops::Range;
use std::path::Path;

use minserve_server::config_text::at_line;
use serde::Deserialize;
use toml::Spanned;

/// One served model: where its weights come from, its ids, its share of the KV memory and
/// its engine settings (`None`: the command line's).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPlan {
    pub source: String,
    /// `None`: named from its source, as a single `--model` is.
    pub name: Option<String>,
    pub aliases: Vec<String>,
    /// Fraction of the total KV cache memory, in (0, 1].
    pub kv_cache_share: f64,
    pub engine: EngineOverrides,
}

/// Engine flags one model sets for itself.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct EngineOverrides {
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub kv_cache_dtype: Option<String>,
    pub scheduling_policy: Option<String>,
    pub speculative: Option<String>,
    pub num_speculative_tokens: Option<usize>,
}

/// What a config file asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// Bytes of KV cache for all models together, when the file says.
    pub kv_cache_memory: Option<usize>,
    pub models: Vec<ModelPlan>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    kv_cache_memory: Option<Spanned<String>>,
    #[serde(rename = "model", default)]
    models: Vec<ModelShape>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelShape {
    model: Spanned<String>,
    name: Option<Spanned<String>>,
    #[serde(default)]
    aliases: Vec<Spanned<String>>,
    kv_cache_share: Option<Spanned<f64>>,
    max_num_seqs: Option<Spanned<usize>>,
    max_num_batched_tokens: Option<Spanned<usize>>,
    kv_cache_dtype: Option<Spanned<String>>,
    scheduling_policy: Option<Spanned<String>>,
    speculative: Option<Spanned<String>>,
    num_speculative_tokens: Option<Spanned<usize>>,
}

/// A mistake in the file, at a byte range of its text.
struct Mistake {
    at: Range<usize>,
    message: String,
}

fn mistake<T>(at: Range<usize>, message: impl Into<String>) -> Result<T, Mistake> {
    Err(Mistake {
        at,
        message: message.into(),
    })
}

/// Reads and checks the file at `path`.
pub fn load(path: &Path) -> anyhow::Result<ServeConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading the config file {}: {e}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
}

/// Checks `text`; the error starts with the line (`12: ...`) and quotes it.
pub fn parse(text: &str) -> Result<ServeConfig, String> {
    let located = |m: Mistake| at_line(text, m.at, &m.message);
    let shape: FileShape = toml::from_str(text).map_err(|e| {
        located(Mistake {
            at: e.span().unwrap_or(0..0),
            message: e.message().trim().to_string(),
        })
    })?;
    check(shape).map_err(located)
}

fn check(shape: FileShape) -> Result<ServeConfig, Mistake> {
    if shape.models.is_empty() {
        return mistake(0..0, "no [[model]] table: the file names no model to serve");
    }
    let kv_cache_memory = match shape.kv_cache_memory {
        Some(size) => Some(
            crate::engine_args::parse_memory(size.get_ref())
                .or_else(|e| mistake(size.span(), e))?,
        ),
        None => None,
    };
    let mut ids: Vec<Spanned<String>> = Vec::new();
    let mut shared = 0.0;
    let mut unshared = 0;
    for m in &shape.models {
        for id in m.name.iter().chain(&m.aliases) {
            if id.get_ref().is_empty() {
                return mistake(id.span(), "a model id cannot be empty");
            }
            if ids.iter().any(|seen| seen.get_ref() == id.get_ref()) {
                return mistake(
                    id.span(),
                    format!(
                        "the model id `{}` is already taken by an earlier name or alias: each \
                         must be unique",
                        id.get_ref()
                    ),
                );
            }
            ids.push(id.clone());
        }
        match &m.kv_cache_share {
            Some(share) => {
                let value = *share.get_ref();
                if !(value > 0.0 && value <= 1.0) {
                    return mistake(
                        share.span(),
                        format!("kv_cache_share is a fraction in (0, 1], not {value}"),
                    );
                }
                shared += value;
                if shared > 1.0 + 1e-9 {
                    return mistake(
                        share.span(),
                        format!(
                            "the models' kv_cache_share add up to {:.0}% here, over 100% of \
                             kv_cache_memory",
                            shared * 100.0
                        ),
                    );
                }
            }
            None => unshared += 1,
        }
        if let Some(dtype) = &m.kv_cache_dtype {
            dtype
                .get_ref()
                .parse::<minserve_model::KvDtype>()
                .or_else(|e| mistake(dtype.span(), e))?;
        }
        if let Some(policy) = &m.scheduling_policy {
            crate::engine_args::parse_policy(policy.get_ref())
                .or_else(|e| mistake(policy.span(), e))?;
        }
        if let Some(method) = &m.speculative {
            crate::engine_args::parse_speculative(method.get_ref())
                .or_else(|e| mistake(method.span(), e))?;
        }
        for count in [
            &m.max_num_seqs,
            &m.max_num_batched_tokens,
            &m.num_speculative_tokens,
        ]
        .into_iter()
        .flatten()
        {
            if *count.get_ref() == 0 {
                return mistake(count.span(), "must be at least 1");
            }
        }
    }
    let left = (1.0 - shared).max(0.0);
    if unshared > 0 && left <= 1e-9 {
        return mistake(
            0..0,
            "the kv_cache_share of some models take all of kv_cache_memory: the models without \
             one would get none",
        );
    }
    let models = shape
        .models
        .into_iter()
        .map(|m| ModelPlan {
            source: m.model.into_inner(),
            name: m.name.map(Spanned::into_inner),
            aliases: m.aliases.into_iter().map(Spanned::into_inner).collect(),
            kv_cache_share: m
                .kv_cache_share
                .map_or(left / unshared.max(1) as f64, Spanned::into_inner),
            engine: EngineOverrides {
                max_num_seqs: m.max_num_seqs.map(Spanned::into_inner),
                max_num_batched_tokens: m.max_num_batched_tokens.map(Spanned::into_inner),
                kv_cache_dtype: m.kv_cache_dtype.map(Spanned::into_inner),
                scheduling_policy: m.scheduling_policy.map(Spanned::into_inner),
                speculative: m.speculative.map(Spanned::into_inner),
                num_speculative_tokens: m.num_speculative_tokens.map(Spanned::into_inner),
            },
        })
        .collect();
    Ok(ServeConfig {
        kv_cache_memory,
        models,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
kv_cache_memory = "2GiB"

[[model]]
model = "smollm2-135m"
name = "small"
aliases = ["default", "chat"]
kv_cache_share = 0.75
max_num_seqs = 32
kv_cache_dtype = "q8"
scheduling_policy = "fair-share"
speculative = "ngram"
num_speculative_tokens = 3

[[model]]
model = "synthetic:tiny"
name = "tiny"
"#;

    #[test]
    fn a_good_file_is_read() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.kv_cache_memory, Some(2 << 30));
        let [small, tiny] = &config.models[..] else {
            panic!("two models: {config:?}")
        };
        assert_eq!(small.source, "smollm2-135m");
        assert_eq!(small.name.as_deref(), Some("small"));
        assert_eq!(small.aliases, ["default", "chat"]);
        assert_eq!(small.kv_cache_share, 0.75);
        assert_eq!(small.engine.max_num_seqs, Some(32));
        assert_eq!(small.engine.kv_cache_dtype.as_deref(), Some("q8"));
        assert_eq!(small.engine.speculative.as_deref(), Some("ngram"));
        assert_eq!(small.engine.num_speculative_tokens, Some(3));
        assert_eq!(tiny.kv_cache_share, 0.25, "the rest");
        assert_eq!(tiny.engine, EngineOverrides::default());
    }

    /// The error for `text`, and the line it names.
    fn refused(text: &str) -> (String, usize) {
        let error = parse(text).unwrap_err();
        let line = error.split(':').next().unwrap().parse().unwrap();
        (error, line)
    }

    #[test]
    fn an_unknown_key_is_refused_at_its_line() {
        let text = GOOD.replace("max_num_seqs = 32", "max_num_seq = 32");
        let (error, line) = refused(&text);
        assert_eq!(line, 9, "{error}");
        assert!(error.contains("max_num_seq"), "{error}");
        assert!(error.contains("| max_num_seq = 32"), "{error}");
    }

    #[test]
    fn a_duplicate_alias_is_refused_at_its_line() {
        let text = GOOD.replace("name = \"tiny\"", "name = \"tiny\"\naliases = [\"chat\"]");
        let (error, line) = refused(&text);
        assert_eq!(line, 18, "{error}");
        assert!(error.contains("`chat` is already taken"), "{error}");
    }

    #[test]
    fn shares_over_100_percent_are_refused_at_the_line_that_crosses() {
        let text = GOOD.replace("name = \"tiny\"", "name = \"tiny\"\nkv_cache_share = 0.5");
        let (error, line) = refused(&text);
        assert_eq!(line, 18, "{error}");
        assert!(error.contains("125%"), "{error}");
    }

    #[test]
    fn bad_values_are_refused_at_their_line() {
        for (from, to, line) in [
            ("kv_cache_dtype = \"q8\"", "kv_cache_dtype = \"q3\"", 10),
            ("max_num_seqs = 32", "max_num_seqs = 0", 9),
            ("max_num_seqs = 32", "max_num_seqs = \"many\"", 9),
            ("kv_cache_share = 0.75", "kv_cache_share = 1.5", 8),
            (
                "scheduling_policy = \"fair-share\"",
                "scheduling_policy = \"lottery\"",
                11,
            ),
            (
                "kv_cache_memory = \"2GiB\"",
                "kv_cache_memory = \"lots\"",
                2,
            ),
            ("speculative = \"ngram\"", "speculative = \"draft:\"", 12),
            (
                "num_speculative_tokens = 3",
                "num_speculative_tokens = 0",
                13,
            ),
        ] {
            let (error, at) = refused(&GOOD.replace(from, to));
            assert_eq!(at, line, "{to}: {error}");
        }
        let (error, _) = refused("kv_cache_memory = \"1GiB\"\n");
        assert!(error.contains("no [[model]]"), "{error}");
        let all_taken = GOOD.replace("kv_cache_share = 0.75", "kv_cache_share = 1.0");
        assert!(refused(&all_taken).0.contains("none"));
    }
}
