//! `minserve simulate cluster`: a day of a GPU cluster shared by online replicas and batch
//! jobs, under each scheduling policy; prints the utilization table and draws the day
//! (utilization and SLO attainment per policy) with `bench sweep`'s charting code.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use minserve_core::scheduler::SchedulerConfig;
use minserve_core::EngineConfig;
use minserve_sim::cluster::{
    batch_jobs, replica_capacity, simulate_cluster, Burst, ClusterConfig, ClusterReport,
    OnlineLoad, Policy, ReplicaTrial, TickRecord,
};
use minserve_sim::cost::CostProfile;
use minserve_sim::stats::Slo;
use minserve_sim::workload::Lengths;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::engine::ProfileArgs;
use crate::bench::chart::{render, Figure};

#[derive(Args)]
pub struct SimulateClusterArgs {
    /// The online model's replica (one engine per GPU group).
    #[command(flatten)]
    profile: ProfileArgs,
    #[arg(long, default_value_t = 1000)]
    gpus: usize,
    #[arg(long, default_value_t = 24.0)]
    hours: f64,
    /// Seconds per scheduling tick.
    #[arg(long, default_value_t = 60.0)]
    tick_s: f64,
    /// Online SLO `TTFT_MS,TPOT_MS` that sizes a replica's capacity.
    #[arg(long, default_value = "1000,50")]
    slo: Slo,
    /// GPUs per online replica.
    #[arg(long, default_value_t = 1)]
    gpus_per_replica: usize,
    /// Share of the cluster the online peak needs at the target utilization.
    #[arg(long, default_value_t = 0.6)]
    online_peak_share: f64,
    /// How far the online rate swings around its mean over the day (0 to 1).
    #[arg(long, default_value_t = 0.6)]
    amplitude: f64,
    /// Replicas run at this fraction of their SLO capacity at most (headroom for bursts).
    #[arg(long, default_value_t = 0.8)]
    target_utilization: f64,
    #[arg(long, default_value_t = 120.0)]
    replica_startup_s: f64,
    /// A flash crowd: the online rate times --burst-multiplier from this hour of the day
    /// for --burst-hours (a multiplier of 1: none).
    #[arg(long, default_value_t = 14.0)]
    burst_hour: f64,
    #[arg(long, default_value_t = 1.0)]
    burst_hours: f64,
    #[arg(long, default_value_t = 1.5)]
    burst_multiplier: f64,
    /// Mean GPU demand of arriving batch jobs, as a share of the cluster.
    #[arg(long, default_value_t = 0.7)]
    batch_demand: f64,
    /// Hours of batch demand queued at the start.
    #[arg(long, default_value_t = 4.0)]
    backlog_hours: f64,
    #[arg(long, default_value_t = 30.0)]
    checkpoint_minutes: f64,
    #[arg(long, default_value_t = 3.0)]
    restart_minutes: f64,
    /// Several online models instead of the one above, each `PRESET:PEAK_SHARE:TROUGH_HOUR`
    /// with an optional `:GPUS_PER_REPLICA` (e.g. `llama-8b-h100:0.4:4` and
    /// `llama-1b-h100:0.2:16`: two models whose daily peaks are 12 hours apart); repeatable.
    /// They share --amplitude, --target-utilization, --replica-startup-s, --slo and the burst.
    #[arg(long, value_name = "SPEC")]
    online: Vec<String>,
    /// One policy (fcfs-preempt, backfill-no-preempt, backfill-preempt) instead of all three.
    #[arg(long, value_parser = ["fcfs-preempt", "backfill-no-preempt", "backfill-preempt"])]
    policy: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write cluster.svg, cluster.png and cluster.json here.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// One online model of the day: its cost profile, the share of the cluster its peak needs,
/// the hour of its trough, GPUs per replica.
struct OnlineSpec {
    profile: CostProfile,
    peak_share: f64,
    trough_hour: f64,
    gpus_per_replica: usize,
}

impl OnlineSpec {
    /// `PRESET:PEAK_SHARE:TROUGH_HOUR[:GPUS_PER_REPLICA]`.
    fn parse(spec: &str) -> anyhow::Result<Self> {
        let parts: Vec<&str> = spec.split(':').collect();
        anyhow::ensure!(
            (3..=4).contains(&parts.len()),
            "--online {spec:?}: expected PRESET:PEAK_SHARE:TROUGH_HOUR[:GPUS_PER_REPLICA]"
        );
        let number = |what: &str, text: &str| -> anyhow::Result<f64> {
            text.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .with_context(|| format!("--online {spec:?}: {what} {text:?} is not a number"))
        };
        let peak_share = number("the peak share", parts[1])?;
        anyhow::ensure!(
            peak_share > 0.0 && peak_share <= 1.0,
            "--online {spec:?}: the peak share must be above 0 and at most 1"
        );
        let trough_hour = number("the trough hour", parts[2])?;
        anyhow::ensure!(
            trough_hour < 24.0,
            "--online {spec:?}: the trough hour must be below 24"
        );
        let gpus_per_replica = match parts.get(3) {
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|&g| g > 0)
                .with_context(|| {
                    format!("--online {spec:?}: GPUs per replica {text:?} must be a positive whole number")
                })?,
            None => 1,
        };
        Ok(Self {
            profile: CostProfile::preset(parts[0]).with_context(|| format!("--online {spec:?}"))?,
            peak_share,
            trough_hour,
            gpus_per_replica,
        })
    }

    /// The model's load, with a replica's capacity measured on the engine-level simulator.
    fn load(&self, args: &SimulateClusterArgs) -> anyhow::Result<OnlineLoad> {
        let profile = &self.profile;
        let replica = replica_capacity(
            &ReplicaTrial {
                profile,
                engine: EngineConfig {
                    scheduler: SchedulerConfig::default(),
                    prefix_caching: true,
                    max_model_len: profile.max_model_len,
                },
                block_size: 16,
                slo: args.slo,
                lengths: Lengths::ShareGptLike,
                requests: 1000,
                seed: args.seed,
            },
            0.95,
        )?;
        anyhow::ensure!(
            replica.capacity > 0.0,
            "one replica of {} meets the SLO at no request rate",
            profile.name
        );
        let replicas_at_peak = self.peak_share * args.gpus as f64 / self.gpus_per_replica as f64;
        let peak_rate = replicas_at_peak * replica.capacity * args.target_utilization;
        Ok(OnlineLoad {
            name: profile.name.clone(),
            mean_rate: peak_rate / (1.0 + args.amplitude),
            amplitude: args.amplitude,
            trough_hour: self.trough_hour,
            gpus_per_replica: self.gpus_per_replica,
            replica,
            startup_s: args.replica_startup_s,
            target_utilization: args.target_utilization,
            burst: (args.burst_multiplier != 1.0).then_some(Burst {
                start_s: args.burst_hour * 3600.0,
                duration_s: args.burst_hours * 3600.0,
                multiplier: args.burst_multiplier,
            }),
        })
    }
}

pub fn run(args: SimulateClusterArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let specs = if args.online.is_empty() {
        vec![OnlineSpec {
            profile: args.profile.load("llama-8b-h100")?,
            peak_share: args.online_peak_share,
            trough_hour: 4.0,
            gpus_per_replica: args.gpus_per_replica,
        }]
    } else {
        args.online
            .iter()
            .map(|spec| OnlineSpec::parse(spec))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let online = specs
        .iter()
        .map(|spec| spec.load(&args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let duration_s = args.hours * 3600.0;
    let jobs = batch_jobs(
        args.gpus,
        args.batch_demand,
        args.backlog_hours,
        duration_s,
        args.seed,
    );
    println!(
        "{} GPUs, {} h; batch: {} jobs",
        args.gpus,
        args.hours,
        jobs.len()
    );
    for model in &online {
        println!(
            "online {}: replicas of {} GPU, {:.2} req/s each within TTFT {} ms / TPOT {} ms \
             (engine simulation), {:.0} req/s mean, {:.0} at peak, lowest at {:.0}:00",
            model.name,
            model.gpus_per_replica,
            model.replica.capacity,
            args.slo.ttft_ms,
            args.slo.tpot_ms,
            model.mean_rate,
            model.mean_rate * (1.0 + model.amplitude),
            model.trough_hour,
        );
    }
    let policies: Vec<Policy> = match &args.policy {
        Some(name) => Policy::ALL
            .into_iter()
            .filter(|p| p.name() == name)
            .collect(),
        None => Policy::ALL.to_vec(),
    };
    let mut reports = Vec::new();
    for policy in policies {
        let config = ClusterConfig {
            gpus: args.gpus,
            tick_s: args.tick_s,
            duration_s,
            policy,
            checkpoint_interval_s: args.checkpoint_minutes * 60.0,
            restart_cost_s: args.restart_minutes * 60.0,
        };
        reports.push(simulate_cluster(&config, &online, &jobs)?);
    }
    let names: Vec<&str> = online.iter().map(|m| m.name.as_str()).collect();
    println!();
    println!(
        "| policy | GPU utilization | useful | online SLO attainment | worst hour | jobs done | \
         job wait mean / p90 (min) | preemptions | GPU-h lost / restarting |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &reports {
        println!(
            "| {} | {:.1}% | {:.1}% | {:.2}% | {:.2}% | {} of {} | {:.0} / {:.0} | {} | {:.0} / {:.0} |",
            r.policy.name(),
            r.utilization * 100.0,
            r.useful_utilization * 100.0,
            r.slo_attainment * 100.0,
            r.worst_hour_slo_attainment * 100.0,
            r.jobs_finished,
            r.jobs_submitted,
            r.job_wait_mean_s / 60.0,
            r.job_wait_p90_s / 60.0,
            r.preemptions,
            r.lost_gpu_s / 3600.0,
            r.restart_gpu_s / 3600.0,
        );
    }
    if online.len() > 1 {
        println!();
        println!("| policy | online model | SLO attainment | worst hour | peak replicas | GPU-h |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for r in &reports {
            for m in &r.models {
                println!(
                    "| {} | {} | {:.2}% | {:.2}% | {} | {:.0} |",
                    r.policy.name(),
                    m.name,
                    m.slo_attainment * 100.0,
                    m.worst_hour_slo_attainment * 100.0,
                    m.peak_replicas,
                    m.online_gpu_s / 3600.0,
                );
            }
        }
    }
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let title = format!(
            "{} GPUs over {} h: online {} + batch jobs",
            args.gpus,
            args.hours,
            names.join(" + ")
        );
        render(
            &DayChart {
                title: &title,
                reports: &reports,
            },
            &dir.join("cluster.svg"),
            &dir.join("cluster.png"),
        )?;
        write_json(&dir.join("cluster.json"), &reports)?;
        println!(
            "\nwrote cluster.svg, cluster.png, cluster.json to {}",
            dir.display()
        );
    }
    println!("simulated in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn write_json(path: &Path, reports: &[ClusterReport]) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string(reports)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// What a chart panel plots of each tick.
type TickValue = fn(&TickRecord) -> f64;

/// Utilization and SLO attainment over the day, hourly, one line per policy.
struct DayChart<'a> {
    title: &'a str,
    reports: &'a [ClusterReport],
}

impl DayChart<'_> {
    /// `(hour, mean of value)` per hour of the day.
    fn hourly(report: &ClusterReport, value: TickValue) -> Vec<(f64, f64)> {
        let per_hour = report.ticks.iter().filter(|t| t.t < 3600.0).count().max(1);
        report
            .ticks
            .chunks(per_hour)
            .enumerate()
            .map(|(h, ticks)| {
                let mean = ticks.iter().map(value).sum::<f64>() / ticks.len() as f64;
                (h as f64 + 0.5, mean * 100.0)
            })
            .collect()
    }
}

impl Figure for DayChart<'_> {
    fn draw_on<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let body = root.titled(self.title, ("sans-serif", 20))?;
        let panels = body.split_evenly((1, 2));
        let hours = self.reports.first().map_or(24.0, |r| r.duration_s / 3600.0);
        let colors = [BLUE, RED, GREEN];
        let series: [(&str, TickValue); 2] = [
            ("GPU utilization (%)", |t| t.utilization),
            ("online SLO attainment (%)", |t| t.slo_attainment),
        ];
        for (panel, (y_desc, value)) in panels.iter().zip(series) {
            let mut chart = ChartBuilder::on(panel)
                .margin(16)
                .x_label_area_size(44)
                .y_label_area_size(64)
                .build_cartesian_2d(0f64..hours, 0f64..105f64)?;
            chart
                .configure_mesh()
                .x_desc("hour of the day")
                .y_desc(y_desc)
                .label_style(("sans-serif", 14))
                .axis_desc_style(("sans-serif", 16))
                .draw()?;
            for (report, color) in self.reports.iter().zip(colors) {
                chart
                    .draw_series(LineSeries::new(
                        Self::hourly(report, value),
                        color.stroke_width(2),
                    ))?
                    .label(report.policy.name())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}
