//! Where the forward pass spends a step, phase by phase (`bench throughput --step-breakdown`).
//!
//! Off by default, and then a phase boundary costs one relaxed atomic load. When on, the
//! thread that runs the pass marks each boundary: the time since the previous mark goes to the
//! phase that just ended. Only the calling thread marks, and the pool's workers finish every
//! parallel section before it returns, so a phase's time covers its work on all cores.
//! Process-wide rather than per model: a profile answers "where does this process's time go",
//! and it keeps the instrument out of every signature on the hot path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The parts of a step, in the order the pass runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Embedding,
    /// Every RMSNorm: before attention and the MLP, on queries and keys, after the
    /// sub-layers, and the final one.
    Norms,
    /// Quantizing a matmul's input rows to the activation format of its weights. With packed
    /// weights this includes making the rows: the RMSNorm before attention and the MLP with
    /// the residual add before it, and the activation function, fused into the quantization
    /// (`llama.rs` `project_rows`); [`Phase::Norms`], [`Phase::Residual`] and
    /// [`Phase::ActivationFunction`] then keep only what is not fused.
    ActivationQuantize,
    QkvProjection,
    Rope,
    KvWrite,
    Attention,
    OutputProjection,
    /// Adding a sub-layer's output into the residual stream.
    Residual,
    GateUpProjection,
    /// SiLU or GELU times the up projection.
    ActivationFunction,
    DownProjection,
    LmHead,
}

impl Phase {
    pub const ALL: [Phase; 13] = [
        Phase::Embedding,
        Phase::Norms,
        Phase::ActivationQuantize,
        Phase::QkvProjection,
        Phase::Rope,
        Phase::KvWrite,
        Phase::Attention,
        Phase::OutputProjection,
        Phase::Residual,
        Phase::GateUpProjection,
        Phase::ActivationFunction,
        Phase::DownProjection,
        Phase::LmHead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Embedding => "embedding",
            Phase::Norms => "rms_norms",
            Phase::ActivationQuantize => "activation_quantize",
            Phase::QkvProjection => "qkv_projection",
            Phase::Rope => "rope",
            Phase::KvWrite => "kv_write",
            Phase::Attention => "attention",
            Phase::OutputProjection => "output_projection",
            Phase::Residual => "residual_adds",
            Phase::GateUpProjection => "gate_up_projection",
            Phase::ActivationFunction => "activation_function",
            Phase::DownProjection => "down_projection",
            Phase::LmHead => "lm_head",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static LAST_MARK_NANOS: AtomicU64 = AtomicU64::new(0);
static STEPS: AtomicU64 = AtomicU64::new(0);
static PHASE_NANOS: [AtomicU64; Phase::ALL.len()] = [const { AtomicU64::new(0) }; Phase::ALL.len()];

fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Switches profiling on or off for the whole process (counts are kept until [`take`]).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The start of a step's forward pass: nothing before it is counted.
pub(crate) fn start_step() {
    if is_enabled() {
        LAST_MARK_NANOS.store(now_nanos(), Ordering::Relaxed);
        STEPS.fetch_add(1, Ordering::Relaxed);
    }
}

/// The end of `phase`: the time since the previous mark is its.
#[inline]
pub(crate) fn mark(phase: Phase) {
    if is_enabled() {
        let now = now_nanos();
        let since = now.saturating_sub(LAST_MARK_NANOS.swap(now, Ordering::Relaxed));
        PHASE_NANOS[phase as usize].fetch_add(since, Ordering::Relaxed);
    }
}

/// Seconds per phase over the forward passes since the last `take`, and how many passes.
#[derive(Clone, Debug, PartialEq)]
pub struct StepProfile {
    pub steps: u64,
    pub seconds: Vec<(Phase, f64)>,
}

impl StepProfile {
    pub fn total_seconds(&self) -> f64 {
        self.seconds.iter().map(|(_, s)| s).sum()
    }
}

/// The counts so far, which start again from zero.
pub fn take() -> StepProfile {
    let seconds = Phase::ALL
        .iter()
        .map(|&p| {
            let nanos = PHASE_NANOS[p as usize].swap(0, Ordering::Relaxed);
            (p, nanos as f64 * 1e-9)
        })
        .collect();
    StepProfile {
        steps: STEPS.swap(0, Ordering::Relaxed),
        seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_indexed_in_the_order_listed() {
        for (i, p) in Phase::ALL.iter().enumerate() {
            assert_eq!(*p as usize, i, "{p:?}");
        }
    }
}
