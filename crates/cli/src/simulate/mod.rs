//! `minserve simulate`: the engine's own scheduler and block manager on a virtual clock
//! (crate `minserve-sim`), and the calibration that fits its cost model on the real model.
//! See docs/simulator.md.

pub mod calibrate;
pub mod cluster;
pub mod engine;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum SimulateCommand {
    /// One engine: the real scheduler and block manager, step times from a cost model.
    Engine(engine::SimulateEngineArgs),
    /// Fit a cost model to steps of the real model (bench throughput shapes) and write it.
    Calibrate(calibrate::CalibrateArgs),
    /// A day of a GPU cluster: online replicas and batch jobs under each scheduling policy.
    Cluster(cluster::SimulateClusterArgs),
}

pub fn run(command: SimulateCommand) -> anyhow::Result<()> {
    match command {
        SimulateCommand::Engine(args) => engine::run(args),
        SimulateCommand::Calibrate(args) => calibrate::run(args),
        SimulateCommand::Cluster(args) => cluster::run(args),
    }
}
