//! `minserve simulate`: minserve's own scheduler and block manager without a model.
//!
//! - [`cost`]: what a step costs, from its batch's features ([`cost::StepFeatures`]) through a
//!   fitted linear model or a device's roofline; committed presets.
//! - [`fit`]: least squares from measured steps to a linear cost model; [`trace_steps`]: the
//!   measured steps of an engine trace, to fit a run made elsewhere.
//! - [`workload`]: arrivals, lengths, shared prefixes, JSON-lines traces.
//! - [`engine`]: the real [`minserve_core::Engine`] stepped on a virtual clock, one replica or
//!   several behind a [`router`].
//! - [`stats`]: percentiles and goodput, shared with `bench serve`.
//!
//! See docs/simulator.md.

pub mod cluster;
pub mod cost;
pub mod engine;
pub mod fit;
pub mod router;
pub mod stats;
pub mod trace_steps;
pub mod validation;
pub mod workload;
