//! The model runner of minserve: a Llama-family forward pass over a ragged batch of sequences,
//! reading and writing a paged KV cache, with weights from GGUF or safetensors.

pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod export;
pub mod gguf;
pub mod kv_cache;
pub mod llama;
pub mod math;
pub mod paged_attention;
pub mod pool;
pub mod qmatmul;
pub mod rope;
pub mod runner;
pub mod safetensors;
pub mod synthetic;
mod tensor_util;
pub mod weights;

pub use config::{ModelConfig, RopeStyle};
pub use error::{ModelError, Result};
pub use kv_cache::{KvCache, KvDtype};
pub use llama::LlamaModel;
pub use runner::{
    load_model, load_model_with, load_tokenizer, CacheOptions, DeviceChoice, DeviceOptions,
    LoadOptions, LoadedModel, ModelRunner, Runner,
};
pub use synthetic::SyntheticSpec;
