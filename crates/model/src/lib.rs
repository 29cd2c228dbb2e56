//! The model runner of minserve: a Llama-family forward pass over a ragged batch of sequences,
//! reading and writing a paged KV cache, with weights from GGUF or safetensors.
//!
//! Three concerns, three files: [`load`] turns a model on disk into weights and a tokenizer
//! (GGUF through [`gguf`], Hugging Face folders through [`safetensors`]; [`synthetic`] builds
//! models in memory instead); [`device`] settles where the model runs (`--device auto`); and
//! [`runner`] holds the executors the engine drives ([`ModelRunner`] on the CPU, [`Runner`] over
//! whichever device). The forward pass itself is [`llama`], on the paged [`kv_cache`], with
//! [`paged_attention`] and the quantized matmuls of [`qmatmul`].

pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dense;
pub mod device;
pub mod e4m3;
pub mod error;
pub mod export;
pub mod gguf;
pub mod hf_norms;
pub mod kv_cache;
pub mod llama;
pub mod load;
pub mod math;
pub mod observer;
pub mod paged_attention;
pub mod pool;
pub mod qmatmul;
pub mod quantized_checkpoint;
pub mod rope;
pub mod runner;
pub mod safetensors;
pub mod step_profile;
pub mod synthetic;
mod tensor_util;
pub mod weights;

pub use config::{ModelConfig, RopeStyle};
pub use device::{DeviceChoice, DeviceOptions};
pub use error::{ModelError, Result};
pub use kv_cache::{KvCache, KvDtype, KvGroups};
pub use llama::LlamaModel;
pub use load::{
    load_config, load_model, load_model_with, load_tokenizer, LoadOptions, LoadedModel,
};
pub use observer::{ActivationObserver, ProjectionSite};
pub use runner::{CacheOptions, ModelRunner, Runner};
pub use synthetic::SyntheticSpec;
