//! `minserve simulate engine`: a workload (synthetic or a trace) through the real scheduler,
//! timed by a cost profile; prints what `bench serve` prints, and more.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use minserve_core::CacheGeometry;
use minserve_sim::cost::CostProfile;
use minserve_sim::engine::{simulate_replicas, Load, SimConfig, SimReport};
use minserve_sim::router::RoutingPolicy;
use minserve_sim::stats::{Slo, Summary};
use minserve_sim::workload::{read_trace, synthesize, Arrivals, Lengths};

use crate::bench::throughput::Shape;
use crate::engine_args::SchedulerArgs;

/// How requests are spread over `--replicas` (docs/simulator.md#replicas-behind-a-router).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RoutingChoice {
    /// Replica after replica.
    RoundRobin,
    /// To the replica with the fewest tokens still to compute.
    LeastOutstandingTokens,
    /// A shared prefix goes where it went before (unless that replica is overloaded).
    PrefixAware,
}

impl From<RoutingChoice> for RoutingPolicy {
    fn from(choice: RoutingChoice) -> Self {
        match choice {
            RoutingChoice::RoundRobin => RoutingPolicy::RoundRobin,
            RoutingChoice::LeastOutstandingTokens => RoutingPolicy::LeastOutstandingTokens,
            RoutingChoice::PrefixAware => RoutingPolicy::PrefixAware,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LengthChoice {
    /// Every request --input-len prompt tokens and --output-len output tokens.
    Fixed,
    /// Log-normal chat-like lengths (ShareGPT-like shape; see docs/simulator.md).
    Sharegpt,
}

/// Where the cost model comes from: a committed preset or a file.
#[derive(Args, Clone, Debug)]
pub struct ProfileArgs {
    /// A committed cost profile: default-cpu, llama-1b-h100, llama-1b-h200, llama-8b-h100,
    /// llama-8b-h200 [default: default-cpu for `engine`, llama-8b-h100 for `cluster`].
    #[arg(long, conflicts_with = "cost_model")]
    pub preset: Option<String>,
    /// A cost profile file, as `simulate calibrate` writes.
    #[arg(long)]
    pub cost_model: Option<PathBuf>,
}

impl ProfileArgs {
    /// The profile given, or the preset `default`.
    pub fn load(&self, default: &str) -> anyhow::Result<CostProfile> {
        Ok(match &self.cost_model {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                CostProfile::parse(&text, &path.display().to_string())?
            }
            None => CostProfile::preset(self.preset.as_deref().unwrap_or(default))?,
        })
    }
}

#[derive(Args)]
pub struct SimulateEngineArgs {
    #[command(flatten)]
    profile: ProfileArgs,
    /// `--num-prompts` (or `--requests`), `--input-len`, `--output-len`, `--prefix-len`; not
    /// with --trace.
    #[command(flatten)]
    shape: Shape,
    #[arg(long, value_enum, default_value_t = LengthChoice::Fixed)]
    lengths: LengthChoice,
    /// Requests from a JSON-lines trace (`arrival_s`, `prompt_len`, `output_len`, optional
    /// `prefix_group` and `prefix_len`) instead of synthetic ones.
    #[arg(long, conflicts_with_all = ["num_prompts", "input_len", "output_len", "prefix_len", "lengths"])]
    trace: Option<PathBuf>,
    /// Keep this many requests in flight (closed loop), like `bench serve --concurrency`.
    #[arg(long, conflicts_with = "request_rate")]
    concurrency: Option<usize>,
    /// Mean arrivals per second (Poisson, or gamma with --burstiness); without this or
    /// --concurrency or --trace, every request arrives at once, like `bench throughput`.
    #[arg(long)]
    request_rate: Option<f64>,
    /// Coefficient of variation of the gaps between arrivals: 1 is Poisson, above 1 burstier.
    #[arg(long, default_value_t = 1.0, requires = "request_rate")]
    burstiness: f64,
    #[command(flatten)]
    scheduler: SchedulerArgs,
    /// KV cache size in MiB [default: the profile's].
    #[arg(long)]
    kv_cache_mib: Option<usize>,
    /// Context length [default: the profile's].
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Milliseconds the server's front end spends on each request (parsing, tokenizing), one
    /// at a time, before the engine sees it: 0 models `bench throughput` (in process); a
    /// little more models requests over HTTP reaching a running engine one by one.
    #[arg(long, default_value_t = 0.0)]
    ingest_ms: f64,
    /// A service-level objective `TTFT_MS,TPOT_MS`: adds goodput.
    #[arg(long)]
    slo: Option<Slo>,
    /// Seed of the arrivals and lengths (the same stream as `bench serve --seed`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the report to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write one JSON line per simulated step (its time, features, queue and KV usage); of
    /// the first replica when there are several.
    #[arg(long)]
    step_trace: Option<PathBuf>,
    /// Replicas of the engine, each a machine of its own with the whole KV cache, behind a
    /// router.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// How the router spreads requests over the replicas.
    #[arg(long, value_enum, default_value_t = RoutingChoice::RoundRobin)]
    routing: RoutingChoice,
}

pub fn run(args: SimulateEngineArgs) -> anyhow::Result<()> {
    let profile = args.profile.load("default-cpu")?;
    let requests = match &args.trace {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            read_trace(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => {
            let shape = args.shape;
            anyhow::ensure!(shape.num_prompts > 0, "--requests must be positive");
            anyhow::ensure!(
                shape.input_len > 0 && shape.output_len > 0,
                "--input-len and --output-len must be positive"
            );
            let arrivals = match args.request_rate {
                None => Arrivals::AllAtOnce,
                Some(rate) => {
                    anyhow::ensure!(
                        rate.is_finite() && rate > 0.0,
                        "--request-rate must be a positive, finite rate"
                    );
                    anyhow::ensure!(
                        args.burstiness.is_finite() && args.burstiness > 0.0,
                        "--burstiness must be positive"
                    );
                    if args.burstiness == 1.0 {
                        Arrivals::Poisson { rate }
                    } else {
                        Arrivals::Gamma {
                            rate,
                            cv: args.burstiness,
                        }
                    }
                }
            };
            let lengths = match args.lengths {
                LengthChoice::Fixed => Lengths::Fixed {
                    input: shape.input_len,
                    output: shape.output_len,
                },
                LengthChoice::Sharegpt => Lengths::ShareGptLike,
            };
            synthesize(
                shape.num_prompts,
                arrivals,
                lengths,
                shape.prefix_len,
                args.seed,
            )
        }
    };
    let load = match args.concurrency {
        Some(0) => anyhow::bail!("--concurrency must be positive"),
        Some(concurrency) => Load::Closed { concurrency },
        None => Load::Open,
    };
    anyhow::ensure!(
        args.scheduler.block_size > 0,
        "--block-size must be positive"
    );
    let num_blocks = profile.num_blocks(
        args.scheduler.block_size,
        args.kv_cache_mib
            .map(|mib| (mib as f64) * (1u64 << 20) as f64),
    );
    anyhow::ensure!(
        num_blocks > 0,
        "a KV cache of that size holds no block of {} tokens",
        args.scheduler.block_size
    );
    let config = SimConfig {
        engine: args
            .scheduler
            .engine_config(args.max_model_len.unwrap_or(profile.max_model_len)),
        geometry: CacheGeometry {
            block_size: args.scheduler.block_size,
            num_blocks,
        },
        cost: profile.cost,
        slo: args.slo,
        ingest_s: args.ingest_ms.max(0.0) / 1e3,
    };
    let mut trace = args
        .step_trace
        .as_ref()
        .map(|path| {
            std::fs::File::create(path)
                .map(std::io::BufWriter::new)
                .with_context(|| format!("creating {}", path.display()))
        })
        .transpose()?;
    anyhow::ensure!(args.replicas > 0, "--replicas must be positive");
    let report = simulate_replicas(
        &config,
        args.replicas,
        args.routing.into(),
        &requests,
        load,
        trace.as_mut().map(|t| t as &mut dyn Write),
    )?;
    if let Some(mut trace) = trace {
        trace.flush().context("writing the step trace")?;
    }
    print(&profile, &config, load, &report);
    if let Some(path) = &args.json {
        let body = serde_json::json!({"profile": profile.name, "report": report});
        std::fs::write(path, serde_json::to_string_pretty(&body)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print(profile: &CostProfile, config: &SimConfig, load: Load, r: &SimReport) {
    let load = match load {
        Load::Open => "open (arrival times)".to_string(),
        Load::Closed { concurrency } => format!("concurrency {concurrency}"),
    };
    println!("=========== Simulated Engine Result ===========");
    println!("{:<40}{}", "Cost profile:", profile.name);
    println!(
        "{:<40}{} blocks of {} tokens",
        "KV cache:", config.geometry.num_blocks, config.geometry.block_size
    );
    println!("{:<40}{load}", "Load:");
    if r.replicas > 1 {
        println!(
            "{:<40}{} ({} routing; requests per replica {:?})",
            "Replicas:", r.replicas, r.routing, r.requests_per_replica
        );
    }
    println!("{:<40}{}", "Successful requests:", r.completed);
    println!("{:<40}{}", "Rejected requests:", r.rejected);
    if let Some(first) = &r.first_rejection {
        println!("  first: {first}");
    }
    println!("{:<40}{:.2}", "Simulated duration (s):", r.duration_s);
    println!("{:<40}{}", "Total input tokens:", r.total_input_tokens);
    println!("{:<40}{}", "Total generated tokens:", r.total_output_tokens);
    println!(
        "{:<40}{:.2}",
        "Request throughput (req/s):", r.request_throughput
    );
    println!(
        "{:<40}{:.2}",
        "Output token throughput (tok/s):", r.output_throughput
    );
    println!(
        "{:<40}{:.2}",
        "Total token throughput (tok/s):", r.total_token_throughput
    );
    if let (Some(slo), Some(goodput), Some(good)) = (r.slo, r.goodput, r.good_requests) {
        println!(
            "{:<40}{goodput:.2} ({good} met TTFT <= {} ms, TPOT <= {} ms)",
            "Goodput (req/s):", slo.ttft_ms, slo.tpot_ms
        );
    }
    for (name, summary) in [
        ("TTFT", r.ttft_ms),
        ("TPOT", r.tpot_ms),
        ("ITL", r.itl_ms),
        ("E2E latency", r.e2el_ms),
    ] {
        if let Some(Summary {
            mean,
            p50,
            p90,
            p99,
        }) = summary
        {
            println!(
                "{:<40}mean {mean:.2}  p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}",
                format!("{name} (ms):")
            );
        }
    }
    println!(
        "{:<40}{} ({} decode-only, mean batch {:.1}, {:.2} ms each)",
        "Steps:", r.steps, r.decode_steps, r.mean_decode_batch, r.decode_step_ms
    );
    println!("{:<40}{}", "Preemptions:", r.preemptions);
    println!(
        "{:<40}{} of {} prompt tokens",
        "Prefix cache hits:", r.prefix_hit_tokens, r.prefix_queried_tokens
    );
    println!(
        "{:<40}peak {:.1}%, mean {:.1}%",
        "KV usage:",
        r.peak_kv_usage * 100.0,
        r.mean_kv_usage * 100.0
    );
}
