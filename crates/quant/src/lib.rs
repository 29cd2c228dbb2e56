//! Making quantized checkpoints (`minserve quantize`): round-to-nearest ([`rtn`]), GPTQ
//! ([`gptq`]), AWQ ([`awq`]) and FP8 ([`fp8`]), written from their papers; calibration on
//! minserve's own forward pass ([`calibrate`], [`observe`]); and writers for the layouts other
//! tools load ([`pack`]). [`checkpoint`] ties them together.
//!
//! The numeric parts ([`grid`], [`rtn`], [`gptq`], [`awq`], [`fp8`], [`linalg`]) know nothing of
//! models or files; only [`observe`], [`calibrate`] and [`checkpoint`] use the model crate.

pub mod awq;
pub mod calibrate;
pub mod channel;
pub mod checkpoint;
pub mod fp8;
pub mod gptq;
pub mod grid;
pub mod linalg;
pub mod observe;
pub mod pack;
pub mod rtn;

use std::fmt;
use std::str::FromStr;

pub use checkpoint::{quantize_gguf, Progress, QuantizeOptions, QuantizeReport};

/// The quantization methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Round-to-nearest: int4 in asymmetric groups, or int8 per output channel.
    Rtn,
    /// GPTQ: int4 (or int8) groups with Hessian-based error compensation.
    Gptq,
    /// AWQ: activation-aware per-channel scales, then int4 groups with zero points.
    Awq,
    /// FP8 E4M3 per output channel.
    Fp8,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rtn => "rtn",
            Self::Gptq => "gptq",
            Self::Awq => "awq",
            Self::Fp8 => "fp8",
        })
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "rtn" => Ok(Self::Rtn),
            "gptq" => Ok(Self::Gptq),
            "awq" => Ok(Self::Awq),
            "fp8" => Ok(Self::Fp8),
            _ => Err(format!(
                "unknown method `{s}` (expected rtn, gptq, awq or fp8)"
            )),
        }
    }
}

/// One projection, quantized.
#[derive(Debug, Clone)]
pub enum QuantizedProjection {
    Group(grid::GroupQuantized),
    Int8(rtn::ChannelInt8),
    Fp8(fp8::ChannelFp8),
}

impl QuantizedProjection {
    /// The values the stored codes stand for, `[out, in]`.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            Self::Group(q) => q.dequantize(),
            Self::Int8(q) => q.dequantize(),
            Self::Fp8(q) => q.dequantize(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A request the method or the model cannot honour; the message names the option or tensor.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] minserve_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
