//! `minserve bench`: the offline throughput of the engine in this process
//! ([`throughput`]), and load against any OpenAI-compatible server over HTTP ([`serve`], one
//! load; [`sweep`], rising concurrency drawn by [`chart`]; [`line_chart`], charts of results
//! gathered by scripts), with the statistics both report
//! ([`stats`]).

pub mod chart;
pub mod line_chart;
pub mod preemption;
pub mod serve;
pub use minserve_sim::stats;
pub mod sweep;
pub mod throughput;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Offline throughput: N random prompts submitted at once to the engine.
    Throughput(throughput::ThroughputArgs),
    /// Streaming load against any OpenAI-compatible server: TTFT, TPOT, ITL, throughput.
    Serve(serve::ServeBenchArgs),
    /// `bench serve` at rising concurrency: a markdown table, JSON and a chart.
    Sweep(sweep::SweepArgs),
    /// Resuming a preempted sequence: swap against recompute, by context length.
    Preemption(preemption::PreemptionArgs),
    /// Line charts (SVG and PNG) from a JSON description, e.g. of several runs' results.
    Chart(line_chart::ChartArgs),
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Throughput(args) => throughput::run(args),
        BenchCommand::Serve(args) => serve::run(args),
        BenchCommand::Sweep(args) => sweep::run(args),
        BenchCommand::Preemption(args) => preemption::run(args),
        BenchCommand::Chart(args) => line_chart::run(args),
    }
}
