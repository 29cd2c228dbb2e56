//! Structured outputs for minserve: a JSON schema, a regular expression, a list of choices or
//! a Lark grammar, compiled by [llguidance] against the model's vocabulary into a
//! [`ConstraintFactory`] the engine walks token by token (see `minserve_core::constraint` and
//! `docs/constrained-decoding.md`).
//!
//! [`GrammarCompiler`] is built once per model (its token trie costs tens of milliseconds for a
//! 49k vocabulary); [`GrammarCompiler::compile`] runs once per request, on the server's CPU
//! threads, and refuses what the engine cannot follow (an invalid schema or regex, a grammar
//! over the size limits) before the request is queued.

mod vocabulary;

use std::fmt;
use std::sync::{Arc, Mutex};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use minserve_core::constraint::{Constraint, ConstraintFactory, TokenMask};
use minserve_tokenizer::Tokenizer;
use serde_json::Value;

pub use vocabulary::VocabularyError;

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// JSON valid against this schema (`{"type": "object"}` for OpenAI's `json_object`).
    JsonSchema(Value),
    /// A match of this regular expression, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A sentence of this Lark grammar (llguidance's dialect, which embeds JSON schemas with
    /// `%json`).
    Lark(String),
}

/// Why a grammar cannot be used; the message is meant for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

/// The most grammar symbols one request may bring (llguidance's default is 500,000, a few
/// megabytes of JSON schema; a request body is at most a few megabytes too, but compiling such
/// a grammar takes seconds of a shared CPU thread).
pub const MAX_GRAMMAR_SIZE: usize = 100_000;

/// Compiles grammars for one model's vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrammarCompiler").finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// Reads `tokenizer`'s vocabulary into llguidance's token trie; `vocab_size` is the
    /// model's (the rows of its logits), which may exceed the tokenizer's.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self, VocabularyError> {
        let env = vocabulary::token_env(tokenizer, vocab_size)?;
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| VocabularyError(format!("llguidance refused the vocabulary: {e}")))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            max_grammar_size: MAX_GRAMMAR_SIZE,
            // Errors name the grammar, not the parser's internal state and token history.
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Self { factory })
    }

    /// Compiles `grammar`, or says why it cannot be followed.
    pub fn compile(&self, grammar: &Grammar) -> Result<Arc<dyn ConstraintFactory>, GrammarError> {
        let top = match grammar {
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if !schema.is_object() {
                    return Err(GrammarError("a JSON schema must be an object".to_string()));
                }
                compact_json(&mut schema);
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Grammar::Choice(choices) => {
                if choices.is_empty() {
                    return Err(GrammarError("the list of choices is empty".to_string()));
                }
                TopLevelGrammar::from_lark(choice_grammar(choices))
            }
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| GrammarError(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError(e));
        }
        Ok(Arc::new(CompiledGrammar {
            start: Mutex::new(matcher),
        }))
    }
}

/// JSON without free whitespace: llguidance's default lets a model write any run of spaces and
/// newlines between tokens, which a small model at temperature 1 does until `max_tokens`. The
/// separators are Python's `json.dumps` defaults. A schema that sets `x-guidance` itself keeps
/// its own choice.
fn compact_json(schema: &mut Value) {
    if schema.get("x-guidance").is_none() {
        let options = JsonCompileOptions {
            item_separator: ", ".to_string(),
            key_separator: ": ".to_string(),
            whitespace_flexible: false,
            ..JsonCompileOptions::default()
        };
        options.apply_to(schema);
    }
}

/// A Lark grammar whose sentences are exactly `choices` (JSON string literals are Lark's).
fn choice_grammar(choices: &[String]) -> String {
    let alternatives: Vec<String> = choices
        .iter()
        .map(|c| serde_json::to_string(c).expect("a string serializes"))
        .collect();
    format!("start: {}", alternatives.join(" | "))
}

/// A compiled grammar: the parser at its start, cloned for every sample.
struct CompiledGrammar {
    start: Mutex<Matcher>,
}

impl fmt::Debug for CompiledGrammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompiledGrammar").finish_non_exhaustive()
    }
}

impl ConstraintFactory for CompiledGrammar {
    fn start(&self) -> Box<dyn Constraint> {
        let start = self.start.lock().unwrap_or_else(|e| e.into_inner());
        Box::new(GrammarWalk {
            matcher: start.deep_clone(),
        })
    }
}

/// One sample's position in its grammar.
struct GrammarWalk {
    matcher: Matcher,
}

impl Constraint for GrammarWalk {
    fn fill_mask(&mut self, mask: &mut TokenMask) -> Result<(), String> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        let words = mask.words_mut();
        let n = words.len().min(allowed.as_slice().len());
        words[..n].copy_from_slice(&allowed.as_slice()[..n]);
        Ok(())
    }

    fn commit(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}
