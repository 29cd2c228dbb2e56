//! The engine core of minserve, free of any tensor library so that it can be read, tested and
//! simulated on its own.
//!
//! The model runner (crate `minserve-model`) implements [`ModelExecutor`]; the engine builds one
//! [`StepBatch`] per step and hands it over.

pub mod batch;
pub mod block_manager;
pub mod detokenize;
pub mod engine;
pub mod engine_thread;
pub mod executor;
pub mod math;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod stop;

pub use batch::{SequenceChunk, StepBatch};
pub use executor::{CacheGeometry, Logits, ModelExecutor};
