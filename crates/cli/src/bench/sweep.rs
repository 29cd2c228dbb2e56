//! `minserve bench sweep`: `bench serve` at rising concurrency against one server, written as
//! a markdown table, JSON, and a chart of output throughput against latency — the curve that
//! shows what batching buys and what it costs each client.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use super::chart::{self, ChartPoint};
use super::serve::{write_json, LoadPattern, ServingBenchmark, ServingReport, WorkloadArgs};

#[derive(Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Concurrency levels, in the order run.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub concurrencies: Vec<usize>,
    /// Requests per level: this many per concurrent stream ...
    #[arg(long, default_value_t = 4)]
    pub prompts_per_concurrency: usize,
    /// ... but at least this many, so that low levels measure more than one or two requests.
    #[arg(long, default_value_t = 16)]
    pub min_prompts: usize,
    /// Folder for sweep.md, sweep.json, sweep.svg and sweep.png (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    if args.concurrencies.is_empty() || args.concurrencies.contains(&0) {
        bail!("--concurrencies takes positive numbers, e.g. 1,2,4,8");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let (reports, title) = runtime.block_on(async {
        let bench = ServingBenchmark::new(args.workload).await?;
        let mut reports = Vec::new();
        let mut first_prompt = 0;
        for &c in &args.concurrencies {
            let n = (c * args.prompts_per_concurrency)
                .max(args.min_prompts)
                .max(1);
            let prompts = bench.prompts(first_prompt, n)?;
            first_prompt += n;
            let report = bench.run(&prompts, LoadPattern::Concurrency(c)).await;
            eprintln!(
                "minserve: concurrency {c:>3}: {n} requests, {:.1} output tok/s, {} failed",
                report.output_throughput, report.failed
            );
            reports.push(report);
        }
        anyhow::Ok((reports, title(&bench)))
    })?;

    write_json(&args.out.join("sweep.json"), &reports)?;
    let markdown = markdown(&title, &reports);
    let md_path = args.out.join("sweep.md");
    std::fs::write(&md_path, &markdown)
        .with_context(|| format!("writing {}", md_path.display()))?;
    let points: Vec<ChartPoint> = reports.iter().filter_map(ChartPoint::of).collect();
    chart::draw(
        &title,
        &points,
        &args.out.join("sweep.svg"),
        &args.out.join("sweep.png"),
    )?;
    print!("{markdown}");
    eprintln!(
        "minserve: wrote sweep.md, sweep.json, sweep.svg and sweep.png to {}",
        args.out.display()
    );
    Ok(())
}

/// One line that says what was measured.
fn title(bench: &ServingBenchmark) -> String {
    let args = bench.args();
    let prompts = match &args.dataset {
        Some(path) => format!("prompts from {}", path.display()),
        None => format!("{} prompt tokens", args.input_len),
    };
    format!(
        "{}: {prompts}, {} output tokens{}, {} endpoint",
        bench.model(),
        args.output_len,
        if args.ignore_eos {
            " (EOS ignored)"
        } else {
            ""
        },
        args.endpoint.name(),
    )
}

fn markdown(title: &str, reports: &[ServingReport]) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let base = reports.first().map_or(0.0, |r| r.output_throughput);
    let mut out = format!("# Serving sweep\n\n{title}.\n\n");
    out.push_str(
        "| concurrency | requests | req/s | output tok/s | vs first | TTFT p50 ms | TTFT p99 ms \
         | TPOT p50 ms | TPOT p99 ms | failures |\n",
    );
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in reports {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.1} | {} | {} | {} | {} | {} | {} |",
            r.concurrency.unwrap_or_default(),
            r.num_prompts,
            r.request_throughput,
            r.output_throughput,
            if base > 0.0 {
                format!("{:.2}x", r.output_throughput / base)
            } else {
                "-".into()
            },
            ms(r.ttft_ms.map(|s| s.p50)),
            ms(r.ttft_ms.map(|s| s.p99)),
            ms(r.tpot_ms.map(|s| s.p50)),
            ms(r.tpot_ms.map(|s| s.p99)),
            r.failed,
        );
    }
    out
}
