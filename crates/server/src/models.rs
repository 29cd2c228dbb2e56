//! The models one server serves, each behind its own engine (its own thread and KV pool), found
//! by the `model` field of a request: its name or one of its aliases.
//!
//! A [`ModelSlot`] is what the server knows of one model whether or not it has loaded: its
//! names, the [`ServedModel`] once ready, why loading failed, its engine's health, its metrics
//! and its admitted sequences. Models load in the background each on its own; one that fails
//! to load answers 503 with the reason, under its name, while the others serve.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use minserve_core::engine_thread::EngineHandle;
use minserve_grammar::GrammarCompiler;
use minserve_tokenizer::Tokenizer;

use crate::metrics::Metrics;
use crate::supervision::EngineWatch;

/// The model behind the API: the engine running on its own thread, and the tokenizer that
/// turns prompts into its token ids and its token ids back into text.
pub struct ServedModel {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    /// Most sequences the engine runs at once: admission counts those beyond it as waiting.
    pub max_num_seqs: usize,
    /// Built on the first request with a grammar (its token trie takes a moment), or why the
    /// vocabulary cannot take grammars.
    grammars: OnceLock<Result<GrammarCompiler, String>>,
}

impl ServedModel {
    pub fn new(engine: EngineHandle, tokenizer: Arc<Tokenizer>, max_num_seqs: usize) -> Self {
        Self {
            engine,
            tokenizer,
            max_num_seqs,
            grammars: OnceLock::new(),
        }
    }

    /// The compiler of structured-output grammars for this model's vocabulary.
    pub(crate) fn grammars(&self) -> Result<&GrammarCompiler, &str> {
        self.grammars
            .get_or_init(|| {
                GrammarCompiler::new(&self.tokenizer, self.vocab_size()).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(String::as_str)
    }

    /// Longest prompt plus generation the model accepts.
    pub fn max_model_len(&self) -> usize {
        self.engine.limits().max_model_len
    }

    pub fn vocab_size(&self) -> usize {
        self.engine.limits().vocab_size
    }

    /// Longest prompt plus generation that the engine could ever hold: the context, or the
    /// whole KV cache if that is smaller.
    pub fn max_total_tokens(&self) -> usize {
        let limits = self.engine.limits();
        limits
            .max_model_len
            .min(limits.num_blocks * limits.block_size)
    }
}

/// A model's names, as the operator configured them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The id `/v1/models` lists.
    pub name: String,
    /// Other ids requests may use for it.
    pub aliases: Vec<String>,
}

impl ModelSpec {
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            aliases: Vec::new(),
        }
    }
}

/// One served model, loaded or not.
pub struct ModelSlot {
    spec: ModelSpec,
    /// Replaced when a failed engine is rebuilt.
    model: RwLock<Option<Arc<ServedModel>>>,
    load_error: Mutex<Option<String>>,
    /// Its engine's health (see `supervision.rs`).
    pub(crate) engine_watch: Arc<EngineWatch<ServedModel>>,
    pub metrics: Metrics,
    /// Sequences admitted to its engine whose response has not ended yet (for the queue
    /// limit; see `admission.rs`).
    pub(crate) inflight_seqs: AtomicUsize,
}

impl ModelSlot {
    fn new(spec: ModelSpec) -> Self {
        Self {
            spec,
            model: RwLock::new(None),
            load_error: Mutex::new(None),
            engine_watch: Arc::default(),
            metrics: Metrics::default(),
            inflight_seqs: AtomicUsize::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn aliases(&self) -> &[String] {
        &self.spec.aliases
    }

    fn answers_to(&self, id: &str) -> bool {
        self.spec.name == id || self.spec.aliases.iter().any(|a| a == id)
    }

    /// The model is ready: its `/health` turns 200. Its engine is watched from now on; a later
    /// call replaces it.
    pub fn set_model(&self, model: ServedModel) {
        self.engine_watch.watch(&model.engine);
        *self.model.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(model));
    }

    pub fn model(&self) -> Option<Arc<ServedModel>> {
        self.model.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loading failed: the model's routes and health answer 503 and say why.
    pub fn set_load_error(&self, message: String) {
        *self.load_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
    }

    pub fn load_error(&self) -> Option<String> {
        self.load_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Why the engine failed, until it is rebuilt.
    pub fn engine_failure(&self) -> Option<String> {
        self.engine_watch.failure()
    }
}

/// Every served model, in the order configured; the first is the default one (the single
/// model of a one-model server).
pub struct ModelRegistry {
    slots: Vec<Arc<ModelSlot>>,
}

impl ModelRegistry {
    /// Refuses no models, and a name or alias used twice.
    pub fn new(specs: Vec<ModelSpec>) -> Result<Self, String> {
        if specs.is_empty() {
            return Err("no model to serve".into());
        }
        let mut seen: Vec<&str> = Vec::new();
        for spec in &specs {
            for id in std::iter::once(&spec.name).chain(&spec.aliases) {
                if seen.contains(&id.as_str()) {
                    return Err(format!("the model id `{id}` is given to two models"));
                }
                seen.push(id);
            }
        }
        Ok(Self {
            slots: specs
                .into_iter()
                .map(|s| Arc::new(ModelSlot::new(s)))
                .collect(),
        })
    }

    /// The model `id` names (its name or an alias).
    pub fn find(&self, id: &str) -> Option<&Arc<ModelSlot>> {
        self.slots.iter().find(|s| s.answers_to(id))
    }

    pub fn first(&self) -> &Arc<ModelSlot> {
        &self.slots[0]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<ModelSlot>> {
        self.slots.iter()
    }

    /// Every model's name, for the error that lists them.
    pub fn names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, aliases: &[&str]) -> ModelSpec {
        ModelSpec {
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
        }
    }

    #[test]
    fn models_are_found_by_name_or_alias() {
        let registry =
            ModelRegistry::new(vec![spec("a", &["fast"]), spec("b", &["big", "b2"])]).unwrap();
        assert_eq!(registry.find("a").unwrap().name(), "a");
        assert_eq!(registry.find("fast").unwrap().name(), "a");
        assert_eq!(registry.find("b2").unwrap().name(), "b");
        assert!(registry.find("c").is_none());
        assert_eq!(registry.names(), ["a", "b"]);
        assert_eq!(registry.first().name(), "a");
    }

    #[test]
    fn an_id_given_twice_is_refused() {
        let error = ModelRegistry::new(vec![spec("a", &["x"]), spec("b", &["x"])])
            .err()
            .unwrap();
        assert!(error.contains("`x`"), "{error}");
        assert!(ModelRegistry::new(vec![spec("a", &[]), spec("a", &[])]).is_err());
        assert!(ModelRegistry::new(vec![]).is_err());
    }
}
