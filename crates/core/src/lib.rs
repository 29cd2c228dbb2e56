//! The engine core of minserve, free of any tensor library so that it can be read, tested and
//! simulated on its own.
//!
//! The model runner (crate `minserve-model`) implements [`ModelExecutor`]; the engine builds one
//! [`StepBatch`] per step and hands it over.

pub mod backfill;
pub mod batch;
pub mod block_manager;
pub mod constraint;
pub mod detokenize;
pub mod draft_model;
pub mod engine;
pub mod engine_thread;
pub mod executor;
pub mod fair_share;
pub mod live;
pub mod math;
pub mod output;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod speculative;
pub mod static_batch;
pub mod stop;
pub mod swap;
pub mod trace;

pub use batch::{BlockCopy, BlockSwap, SequenceChunk, StepBatch};
pub use engine::{Engine, EngineConfig, EngineStats};
pub use engine_thread::EngineHandle;
pub use executor::{CacheGeometry, Logits, ModelExecutor};
pub use request::{
    EngineLimits, EventSink, FinishReason, Request, RequestError, RequestEvent, RequestId, Session,
    ValidatedRequest,
};
