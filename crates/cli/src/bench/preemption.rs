//! `minserve bench preemption`: what resuming a preempted sequence costs, by context length,
//! under each `--preemption-mode`. Recompute runs the sequence's tokens through the model
//! again (a prefill in steps of `--max-num-batched-tokens`, prefix cache cold); swap copies its
//! blocks to the host pool and back (`KvCache::swap_blocks`, what the runner does for
//! `StepBatch::swap_out` / `swap_in`). Both on the same runner, each a median of `--repeats`.
//! The crossover is the shortest context from which swapping costs less than recomputing.

use std::time::Instant;

use anyhow::bail;
use clap::Args;
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::{CacheOptions, KvCache, KvDtype, ModelRunner};
use minserve_sim::stats::percentile;

#[derive(Args)]
pub struct PreemptionArgs {
    /// Model: a path, a catalog alias, or `synthetic:NAME[@FORMAT]`.
    #[arg(long, default_value_t = minserve_hub::default_model().to_string())]
    model: String,
    #[command(flatten)]
    weights: crate::model_source::WeightsArgs,
    /// Context lengths (tokens computed when the sequence was preempted).
    #[arg(long, value_delimiter = ',', default_value = "16,64,256,1024,2048")]
    contexts: Vec<usize>,
    /// Tokens per recompute step, as the scheduler's budget cuts a prefill.
    #[arg(long, default_value_t = 512)]
    max_num_batched_tokens: usize,
    #[arg(long, default_value = "f16")]
    kv_cache_dtype: KvDtype,
    /// Measurements per context length; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

const BLOCK_SIZE: usize = 16;

/// One row of the report.
struct Row {
    context: usize,
    blocks: usize,
    swap_ms: f64,
    recompute_ms: f64,
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    percentile(&samples, 50.0).unwrap_or(0.0)
}

pub fn run(args: PreemptionArgs) -> anyhow::Result<()> {
    let longest = args.contexts.iter().copied().max().unwrap_or(0);
    if longest == 0 || args.contexts.contains(&0) || args.repeats == 0 {
        bail!("--contexts takes positive lengths, e.g. 64,256,1024; --repeats must be positive");
    }
    if args.max_num_batched_tokens == 0 {
        bail!("--max-num-batched-tokens must be positive");
    }
    let loaded = crate::model_source::load(&args.model, &args.weights)?;
    let config = loaded.model.config().clone();
    if longest > config.max_position_embeddings {
        bail!(
            "--contexts go up to {longest} tokens; the model's context is {}",
            config.max_position_embeddings
        );
    }
    let blocks = longest.div_ceil(BLOCK_SIZE);
    let groups = minserve_model::KvGroups::of(&config);
    let block_bytes = KvCache::bytes_per_block(&config, &groups, args.kv_cache_dtype, BLOCK_SIZE);
    let pool_bytes = block_bytes * blocks * groups.num_groups();
    let mut runner = ModelRunner::new(
        loaded.model,
        CacheOptions {
            block_size: BLOCK_SIZE,
            memory_bytes: pool_bytes,
            dtype: args.kv_cache_dtype,
        },
    );
    runner.set_swap_space(pool_bytes);
    let vocab = config.vocab_size as u32;
    let tokens: Vec<u32> = (0..longest as u32)
        .map(|i| vocab / 4 + i % (vocab / 2))
        .collect();
    let mut rows = Vec::new();
    for &context in &args.contexts {
        let logical = context.div_ceil(BLOCK_SIZE);
        // One table per group, each its own run of blocks.
        let tables: Vec<Vec<u32>> = (0..groups.num_groups())
            .map(|g| ((g * blocks) as u32..(g * blocks + logical) as u32).collect())
            .collect();
        let mut recompute = Vec::new();
        let mut swap = Vec::new();
        for _ in 0..args.repeats + 1 {
            let started = Instant::now();
            let mut done = 0;
            while done < context {
                let chunk = (context - done).min(args.max_num_batched_tokens);
                let mut batch = StepBatch::new();
                let last = done + chunk == context;
                batch.push_sequence_groups(
                    &tokens[done..done + chunk],
                    done,
                    &tables,
                    BLOCK_SIZE,
                    last,
                );
                runner.execute(&batch)?;
                done += chunk;
            }
            recompute.push(started.elapsed().as_secs_f64() * 1e3);

            let pairs: Vec<(u32, u32)> = tables.iter().flatten().map(|&b| (b, b)).collect();
            let host = runner.host.as_mut().expect("swap space was set");
            let started = Instant::now();
            KvCache::swap_blocks(&runner.cache, host, &pairs)?;
            KvCache::swap_blocks(host, &mut runner.cache, &pairs)?;
            swap.push(started.elapsed().as_secs_f64() * 1e3);
        }
        // The first round warms caches and touches the pools' pages; it is not kept.
        rows.push(Row {
            context,
            blocks: logical * groups.num_groups(),
            swap_ms: median(swap.split_off(1)),
            recompute_ms: median(recompute.split_off(1)),
        });
    }
    print!("{}", markdown(&args, &rows, block_bytes));
    Ok(())
}

fn markdown(args: &PreemptionArgs, rows: &[Row], block_bytes: usize) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "Resuming a preempted sequence of {}: swap (out and back in) against recompute \
         (prefill in steps of {} tokens), medians of {} runs.\n\n\
         | context | blocks | KV MiB | swap ms | recompute ms | recompute / swap |\n\
         |---:|---:|---:|---:|---:|---:|\n",
        args.model, args.max_num_batched_tokens, args.repeats
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.3} | {:.1} | {:.0}x |",
            r.context,
            r.blocks,
            (r.blocks * block_bytes) as f64 / (1 << 20) as f64,
            r.swap_ms,
            r.recompute_ms,
            r.recompute_ms / r.swap_ms.max(1e-9),
        );
    }
    let crossover = rows.iter().find(|r| r.swap_ms < r.recompute_ms);
    let _ = match crossover {
        Some(r) if r.context == rows[0].context => writeln!(
            out,
            "\nSwap is cheaper at every context measured (from {} tokens).",
            r.context
        ),
        Some(r) => writeln!(out, "\nSwap is cheaper from {} tokens on.", r.context),
        None => writeln!(out, "\nRecompute is cheaper at every context measured."),
    };
    out
}
