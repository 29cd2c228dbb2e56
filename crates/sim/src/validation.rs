//! Simulated against measured: committed measurements of `bench throughput` and `bench serve`
//! runs (`crates/sim/validation/*.json`), each replayed through the simulator with the same
//! workload, and the figures compared within a stated tolerance.

use serde::{Deserialize, Serialize};

use crate::cost::CostProfile;
use crate::engine::{simulate, Load, SimConfig, SimError, SimReport};
use crate::workload::{synthesize, Arrivals, Lengths};

/// A file of measurements on one machine.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Measurements {
    /// The preset the figures are compared against.
    pub profile: String,
    pub machine: String,
    pub commit: String,
    /// How the figures were taken (commands, repeats, medians, load on the machine).
    pub method: String,
    /// Relative tolerance of every figure unless a scenario says otherwise.
    pub tolerance: f64,
    pub scenarios: Vec<Scenario>,
}

/// How a measured run released its requests.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ScenarioLoad {
    /// `bench throughput`: every request at once.
    AllAtOnce,
    Concurrency(usize),
    /// Poisson arrivals at this rate, with `bench serve --seed`'s stream.
    RequestRate(f64),
}

/// The figures compared; a scenario lists those it measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Figures {
    pub output_throughput: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub tpot_p50_ms: Option<f64>,
    /// What the scheduler did (`bench throughput` reports it): engine steps, decode-only
    /// steps and their mean batch. These do not depend on the machine's speed when every
    /// request is there from the start, so the simulator must reproduce them almost exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_steps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_decode_batch: Option<f64>,
}

/// Tolerance of the scheduler's own figures ([`Figures::steps`] and the like).
pub const SCHEDULER_TOLERANCE: f64 = 0.01;

impl Figures {
    fn of(report: &SimReport) -> Self {
        Self {
            output_throughput: Some(report.output_throughput),
            ttft_p50_ms: report.ttft_ms.map(|s| s.p50),
            tpot_p50_ms: report.tpot_ms.map(|s| s.p50),
            steps: Some(report.steps as f64),
            decode_steps: Some(report.decode_steps as f64),
            mean_decode_batch: Some(report.mean_decode_batch),
        }
    }

    /// Each figure with its name and whether it is one of the scheduler's own.
    fn named(&self) -> [(&'static str, Option<f64>, bool); 6] {
        [
            ("output_throughput", self.output_throughput, false),
            ("ttft_p50_ms", self.ttft_p50_ms, false),
            ("tpot_p50_ms", self.tpot_p50_ms, false),
            ("steps", self.steps, true),
            ("decode_steps", self.decode_steps, true),
            ("mean_decode_batch", self.mean_decode_batch, true),
        ]
    }
}

/// A figure outside the file's tolerance, with its own and the reason.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Exception {
    pub figure: String,
    pub tolerance: f64,
    pub why: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// The command measured (run `runs` times).
    pub command: String,
    pub load: ScenarioLoad,
    pub num_prompts: usize,
    pub input_len: usize,
    pub output_len: usize,
    #[serde(default)]
    pub seed: u64,
    /// The server front end's time per request before the engine sees it
    /// ([`SimConfig::ingest_s`]); 0 for `bench throughput`, which submits in process.
    #[serde(default)]
    pub ingest_ms: f64,
    /// Medians over the runs.
    pub measured: Figures,
    /// Every run's figures, in order.
    pub runs: Vec<Figures>,
    #[serde(default)]
    pub exceptions: Vec<Exception>,
}

/// One figure of one scenario, simulated and measured.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub scenario: String,
    pub figure: &'static str,
    pub measured: f64,
    pub simulated: f64,
    /// (simulated - measured) / measured.
    pub error: f64,
    pub tolerance: f64,
    pub within: bool,
}

/// Replays every scenario through the simulator under `profile` with the engine's default
/// configuration `engine`.
pub fn compare(
    measurements: &Measurements,
    profile: &CostProfile,
    engine: minserve_core::EngineConfig,
    block_size: usize,
) -> Result<Vec<Comparison>, SimError> {
    let mut out = Vec::new();
    for scenario in &measurements.scenarios {
        let arrivals = match scenario.load {
            ScenarioLoad::RequestRate(rate) => Arrivals::Poisson { rate },
            _ => Arrivals::AllAtOnce,
        };
        let load = match scenario.load {
            ScenarioLoad::Concurrency(c) => Load::Closed { concurrency: c },
            _ => Load::Open,
        };
        let requests = synthesize(
            scenario.num_prompts,
            arrivals,
            Lengths::Fixed {
                input: scenario.input_len,
                output: scenario.output_len,
            },
            0,
            scenario.seed,
        );
        let config = SimConfig {
            engine,
            geometry: minserve_core::CacheGeometry {
                block_size,
                num_blocks: profile.num_blocks(block_size, None),
            },
            cost: profile.cost,
            slo: None,
            ingest_s: scenario.ingest_ms / 1e3,
        };
        let report = simulate(&config, &requests, load, None)?;
        let simulated = Figures::of(&report);
        let pairs = scenario.measured.named().into_iter().zip(simulated.named());
        for ((figure, measured, scheduler), (_, sim, _)) in pairs {
            let (Some(measured), Some(simulated)) = (measured, sim) else {
                continue;
            };
            let default = if scheduler {
                SCHEDULER_TOLERANCE
            } else {
                measurements.tolerance
            };
            let tolerance = scenario
                .exceptions
                .iter()
                .find(|e| e.figure == figure)
                .map_or(default, |e| e.tolerance);
            let error = (simulated - measured) / measured;
            out.push(Comparison {
                scenario: scenario.name.clone(),
                figure,
                measured,
                simulated,
                error,
                tolerance,
                within: error.abs() <= tolerance,
            });
        }
    }
    Ok(out)
}
