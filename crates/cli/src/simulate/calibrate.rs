//! `minserve simulate calibrate`: runs `bench throughput` shapes on the real model, times
//! every engine step (scheduling, the forward pass, sampling, the output stage: what a client
//! waits for), and fits the linear cost model of `minserve-sim` to them; or, with
//! `--from-trace`, fits the steps of an engine trace written on another machine.
//!
//! The shapes span what the simulator is asked about: one sequence at a time (batch-1
//! decode, whole prompts alone), decode batches up to the default `--max-num-seqs`, prompt
//! chunks at the token budget next to decodes, and contexts from a hundred to over a thousand
//! tokens.

use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use minserve_core::trace::{read_trace, TraceRecord};
use minserve_core::{CacheGeometry, Logits, ModelExecutor, StepBatch};
use minserve_sim::cost::{CostModel, CostProfile, Feature, StepFeatures};
use minserve_sim::fit::{fit_linear, quality, MeasuredStep};
use minserve_sim::trace_steps;

use crate::bench::throughput::{CountingSink, Shape};
use crate::engine_args::{build_engine_with, EngineArgs};

#[derive(Args)]
pub struct CalibrateArgs {
    /// Model: a path, a catalog alias, or `synthetic:NAME[@FORMAT]`.
    #[arg(long, default_value_t = minserve_hub::default_model().to_string())]
    model: String,
    #[command(flatten)]
    weights: crate::model_source::WeightsArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// The profile's name.
    #[arg(long, default_value = "calibrated")]
    name: String,
    /// Where to write the profile (JSON).
    #[arg(long)]
    output: PathBuf,
    /// Fit the steps of this engine trace (`--trace-file` of `serve` or `bench throughput`,
    /// written on any machine, a GPU one say) instead of measuring here; `--model` and
    /// `--kv-cache-dtype` then only give the model's shape and the bytes of its KV per token.
    /// Repeat it to fit several runs' steps together (the KV pool is the first trace's).
    #[arg(long)]
    from_trace: Vec<PathBuf>,
    /// Also write every measured step (features and seconds) as JSON lines.
    #[arg(long)]
    steps_file: Option<PathBuf>,
    /// Shapes of a few seconds each instead of about a minute in all (for tests).
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The calibration runs, one after another on one engine: all of a run's prompts are
/// submitted at once, so a run of `n <= --max-num-seqs` prompts decodes at batch `n`.
fn shapes(quick: bool) -> Vec<Shape> {
    let shape = |num_prompts, input_len, output_len| Shape {
        num_prompts,
        input_len,
        output_len,
        prefix_len: 0,
    };
    if quick {
        return vec![shape(1, 32, 8), shape(8, 64, 8), shape(8, 200, 4)];
    }
    vec![
        shape(1, 128, 64),
        shape(1, 512, 32),
        shape(1, 128, 64),
        shape(4, 128, 64),
        shape(16, 256, 64),
        shape(32, 128, 96),
        shape(128, 128, 128),
        shape(64, 512, 64),
        shape(32, 1024, 32),
    ]
}

/// The runner, reporting the features of the batch it last ran.
struct FeatureProbe<E> {
    inner: E,
    last: StepFeatures,
}

impl<E: ModelExecutor> ModelExecutor for FeatureProbe<E> {
    type Error = E::Error;

    fn cache_geometry(&self) -> CacheGeometry {
        self.inner.cache_geometry()
    }

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn execute(&mut self, batch: &StepBatch) -> Result<Logits, Self::Error> {
        self.last = StepFeatures::of(batch);
        self.inner.execute(batch)
    }

    fn for_each_index(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        self.inner.for_each_index(n, f)
    }
}

/// The features a linear profile uses: the four the issue names (prompt tokens, decode
/// tokens, context, batch size as sampled rows) and a constant per step.
const FEATURES: [Feature; 5] = [
    Feature::Constant,
    Feature::PrefillTokens,
    Feature::DecodeTokens,
    Feature::AttendedKeys,
    Feature::SampledRows,
];

pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let measured = match args.from_trace.is_empty() {
        false => steps_of_traces(&args)?,
        true => measure_steps(&args)?,
    };
    let steps = measured.steps;
    if let Some(path) = &args.steps_file {
        let lines: Vec<String> = steps
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        std::fs::write(path, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let (cost, kept, dropped) = robust_fit(&steps)?;
    let fit = quality(&cost, &kept);
    let config = &measured.config;
    let mut provenance = serde_json::json!({
        "method": "least squares on relative error, non-negative coefficients, \
                   steps more than 4x the median relative error off dropped, refitted",
        "commit": git_commit(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "max_num_seqs": args.engine.scheduler.max_num_seqs,
        "max_num_batched_tokens": args.engine.scheduler.max_num_batched_tokens,
        "steps_measured": steps.len(),
        "steps_dropped_as_outliers": dropped,
        "fit": fit,
    });
    let traces: Vec<String> = args
        .from_trace
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    match traces.is_empty() {
        // The traces' machine is not this one, nor are their shapes ours.
        false => provenance["traces"] = traces.clone().into(),
        true => {
            provenance["cpu"] = cpu_model().into();
            provenance["shapes"] = serde_json::to_value(shapes(args.quick))?;
        }
    }
    let profile = CostProfile {
        name: args.name.clone(),
        description: format!(
            "{} ({} layers, hidden {}) on {}, fitted from {} measured steps",
            args.model,
            config.num_layers,
            config.hidden_size,
            match traces.is_empty() {
                false => format!("the machine that wrote {}", traces.join(", ")),
                true => cpu_model(),
            },
            kept.len()
        ),
        kv_bytes_per_token: measured.kv_bytes_per_token,
        default_kv_cache_bytes: measured.kv_cache_bytes,
        max_model_len: config.max_position_embeddings,
        cost: CostModel::Linear(cost),
        provenance: Some(provenance),
    };
    std::fs::write(&args.output, serde_json::to_string_pretty(&profile)? + "\n")
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "fitted {} steps ({dropped} outliers dropped): median error {:.1}%, p90 {:.1}%, \
         total time {:.3}x measured; written to {}",
        kept.len(),
        fit.median_relative_error * 100.0,
        fit.p90_relative_error * 100.0,
        fit.total_time_ratio,
        args.output.display()
    );
    println!("{}", serde_json::to_string_pretty(&profile.cost)?);
    Ok(())
}

/// Steps to fit, and what the profile needs to know of the model and its KV pool.
struct Measured {
    steps: Vec<MeasuredStep>,
    config: minserve_model::ModelConfig,
    kv_bytes_per_token: f64,
    kv_cache_bytes: f64,
}

/// Runs the calibration shapes on the real model and times every step.
fn measure_steps(args: &CalibrateArgs) -> anyhow::Result<Measured> {
    let loaded = crate::model_source::load(&args.model, &args.weights)?;
    let config = loaded.model.config().clone();
    let vocab = config.vocab_size as u64;
    let device = args
        .engine
        .device_options(&args.weights, args.engine.kv_cache_mib.is_some())?;
    let cache = args.engine.cache_options();
    let kv_bytes_per_token = cache.dtype.bytes_per_token(&config) as f64;
    let mut steps: Vec<MeasuredStep> = Vec::new();
    let mut engine = build_engine_with(
        loaded.model,
        Arc::new(loaded.tokenizer),
        cache,
        device,
        args.engine.engine_config(config.max_position_embeddings),
        0,
        |runner| FeatureProbe {
            inner: runner,
            last: StepFeatures::default(),
        },
    )?;
    let sink = Arc::new(AtomicUsize::new(0));
    // A first run warms the caches and touches the KV pool's pages; it is not kept.
    let warm_up = Shape {
        num_prompts: 4,
        input_len: 64,
        output_len: 8,
        prefix_len: 0,
    };
    for (run, shape) in std::iter::once(warm_up)
        .chain(shapes(args.quick))
        .enumerate()
    {
        // A new seed per run, so that no run finds the last one's prompts cached.
        for request in shape.requests(vocab, args.seed.wrapping_add(run as u64 * 1000)) {
            engine
                .submit(request, Box::new(CountingSink(sink.clone())))
                .map_err(|e| anyhow::anyhow!("calibration request rejected: {e}"))?;
        }
        let mut run_steps = 0;
        let started = Instant::now();
        loop {
            let step_start = Instant::now();
            if !engine.step() {
                break;
            }
            let seconds = step_start.elapsed().as_secs_f64();
            run_steps += 1;
            if run > 0 {
                steps.push(MeasuredStep {
                    features: engine.executor().last,
                    seconds,
                });
            }
        }
        eprintln!(
            "{} {} x ({} + {}): {run_steps} steps in {:.1} s",
            if run == 0 { "warm-up" } else { "shape" },
            shape.num_prompts,
            shape.input_len,
            shape.output_len,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(Measured {
        steps,
        config,
        kv_bytes_per_token,
        kv_cache_bytes: cache.memory_bytes as f64,
    })
}

/// The steps of engine traces written elsewhere (`--trace-file` of `serve` or `bench
/// throughput`, on a GPU machine say), with the model's shape read from its config alone and
/// the KV pool's size from the first trace's header.
fn steps_of_traces(args: &CalibrateArgs) -> anyhow::Result<Measured> {
    let config = crate::model_source::load_config(&args.model)?;
    let kv_bytes_per_token = args.engine.cache_options().dtype.bytes_per_token(&config) as f64;
    let mut steps = Vec::new();
    let mut kv_cache_bytes = None;
    for path in &args.from_trace {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let records = read_trace(std::io::BufReader::new(file))
            .with_context(|| format!("reading the trace {}", path.display()))?;
        let Some(TraceRecord::Header(header)) = records.first() else {
            unreachable!("read_trace refuses a trace without a header");
        };
        kv_cache_bytes
            .get_or_insert((header.num_blocks * header.block_size) as f64 * kv_bytes_per_token);
        let before = steps.len();
        steps.extend(trace_steps::measured_steps(&records));
        anyhow::ensure!(
            steps.len() > before,
            "the trace {} has no step records to fit",
            path.display()
        );
    }
    Ok(Measured {
        steps,
        config,
        kv_bytes_per_token,
        kv_cache_bytes: kv_cache_bytes.unwrap_or_default(),
    })
}

/// Fits, drops the steps a loaded machine slowed (relative error over 4x the median one), and
/// fits again on the rest.
fn robust_fit(
    steps: &[MeasuredStep],
) -> anyhow::Result<(minserve_sim::cost::LinearCost, Vec<MeasuredStep>, usize)> {
    let first = fit_linear(steps, &FEATURES)?;
    let limit = 4.0 * quality(&first, steps).median_relative_error;
    let kept: Vec<MeasuredStep> = steps
        .iter()
        .copied()
        .filter(|s| (first.step_seconds(&s.features) - s.seconds).abs() / s.seconds <= limit)
        .collect();
    let dropped = steps.len() - kept.len();
    Ok((fit_linear(&kept, &FEATURES)?, kept, dropped))
}

/// The CPU's name with its family and model numbers (a virtual machine may name it only
/// by brand), and the threads available.
fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name").unwrap_or_else(|| "unknown CPU".to_string());
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    match (field("cpu family"), field("model")) {
        (Some(family), Some(model)) => {
            format!("{name} (family {family}, model {model}), {threads} threads")
        }
        _ => format!("{name}, {threads} threads"),
    }
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}
