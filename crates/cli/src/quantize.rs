//! `minserve quantize`: a GGUF model as a quantized Hugging Face folder in a standard layout
//! (GPTQ, AWQ, compressed-tensors), made by our own RTN, GPTQ, AWQ or FP8 (see
//! docs/quantization.md, "Making quantized checkpoints").

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use minserve_model::export::ExportDType;
use minserve_quant::grid::Symmetry;
use minserve_quant::{quantize_gguf, Method, Progress, QuantizeOptions};

#[derive(Args)]
pub struct QuantizeArgs {
    /// The GGUF model to quantize (a path or a catalog name); its weights are dequantized to
    /// f32 first, as `minserve export` writes them.
    #[arg(long)]
    model: String,
    /// rtn (int4 groups or int8 channels), gptq, awq (calibrated, int4) or fp8 (E4M3 channels).
    #[arg(long, value_enum)]
    method: MethodArg,
    /// Bits per weight: 4 or 8 for rtn and gptq, 4 for awq, 8 for fp8. Default: 4, fp8's 8.
    #[arg(long)]
    bits: Option<u32>,
    /// Inputs sharing one scale (4-bit methods). Must divide every projection's inputs:
    /// SmolLM2-135M's 576 takes 32 or 64, not 128.
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Symmetric integer grids (zero point in the middle, no zero points stored): GPTQ's
    /// default; for rtn int4 too. Not for awq, whose layout stores zero points.
    #[arg(long, conflicts_with = "asym")]
    sym: bool,
    /// Asymmetric integer grids (a zero point per group, from its minimum and maximum): rtn
    /// int4's and awq's default; for gptq too.
    #[arg(long)]
    asym: bool,
    /// GPTQ: quantize columns in descending order of their Hessian diagonal (desc_act).
    #[arg(long)]
    act_order: bool,
    /// GPTQ: dampening added to the Hessian's diagonal, as a fraction of its mean.
    #[arg(long, default_value_t = 0.01)]
    damp: f64,
    /// Calibration text for gptq and awq (plain UTF-8); `scripts/calib-text` fetches the one
    /// the docs' figures use.
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Calibration tokens, in windows of --calib-window spread over the text.
    #[arg(long, default_value_t = 16_384)]
    calib_tokens: usize,
    /// Tokens per calibration window (one sequence of the forward pass).
    #[arg(long, default_value_t = 512)]
    calib_window: usize,
    /// The dtype of everything left in float (embeddings, norms, lm_head) and of the
    /// compressed-tensors integer scales. GPTQ/AWQ scales are f16 and FP8 scales f32 whatever
    /// this says, as their layouts have them.
    #[arg(long, value_enum, default_value_t = DTypeArg::F16)]
    dtype: DTypeArg,
    /// Folder to write (created; must be empty if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Also write the quantized weights dequantized to a plain f32 folder (what a loader of
    /// --out would multiply by), e.g. for `minserve eval perplexity` on any build.
    #[arg(long)]
    dequantized_twin: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Rtn,
    Gptq,
    Awq,
    Fp8,
}

/// Mirrors [`ExportDType`] for `--help` (the model crate does not depend on clap).
#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

pub fn run(args: QuantizeArgs) -> anyhow::Result<()> {
    let method = match args.method {
        MethodArg::Rtn => Method::Rtn,
        MethodArg::Gptq => Method::Gptq,
        MethodArg::Awq => Method::Awq,
        MethodArg::Fp8 => Method::Fp8,
    };
    let options = QuantizeOptions {
        method,
        bits: args
            .bits
            .unwrap_or(if method == Method::Fp8 { 8 } else { 4 }),
        group_size: args.group_size,
        symmetry: match (args.sym, args.asym) {
            (true, _) => Some(Symmetry::Symmetric),
            (_, true) => Some(Symmetry::Asymmetric),
            _ => None,
        },
        act_order: args.act_order,
        damp: args.damp,
        calib_tokens: args.calib_tokens,
        calib_window: args.calib_window,
        dtype: match args.dtype {
            DTypeArg::F32 => ExportDType::F32,
            DTypeArg::F16 => ExportDType::F16,
            DTypeArg::Bf16 => ExportDType::BF16,
        },
        dequantized_twin: args.dequantized_twin.clone(),
    };
    // Cheap checks before a model is resolved (and perhaps fetched) or a text read.
    options.check()?;
    let calibration = match (&args.calib, options.needs_calibration()) {
        (Some(path), true) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--calib: reading {}", path.display()))?,
        ),
        (None, true) => anyhow::bail!(
            "--method {method} calibrates on a text: give one with --calib FILE \
             (scripts/calib-text fetches the default one)"
        ),
        (_, false) => None,
    };
    let path = minserve_hub::resolve(&args.model, &minserve_hub::FetchOptions::default())?;
    anyhow::ensure!(
        path.is_file(),
        "--model {}: quantize reads a GGUF file, and {} is a folder",
        args.model,
        path.display()
    );
    let mut progress = |p: Progress| {
        let left = p
            .remaining()
            .map_or("?".to_string(), |d| format!("{:.0}s", d.as_secs_f64()));
        eprint!(
            "\r{method}: {}/{} layers, {:.0}s elapsed, about {left} left   ",
            p.layers_done,
            p.layers,
            p.elapsed.as_secs_f64()
        );
        let _ = std::io::stderr().flush();
        if p.layers_done == p.layers {
            eprintln!();
        }
    };
    let report = quantize_gguf(
        &path,
        &args.out,
        &options,
        calibration.as_deref(),
        &mut progress,
    )
    .with_context(|| format!("quantizing {} to {}", path.display(), args.out.display()))?;

    println!(
        "quantized {} with {method} ({} bits{}) as {} to {}",
        path.display(),
        options.bits,
        if report.layout.contains("groups") || matches!(method, Method::Gptq | Method::Awq) {
            format!(", groups of {}", options.group_size)
        } else {
            String::new()
        },
        report.layout,
        report.out_dir.display()
    );
    println!(
        "  {} projections, {:.1} MiB of weights, {:.1}s{}",
        report.projections,
        report.weights_bytes as f64 / (1 << 20) as f64,
        report.elapsed.as_secs_f64(),
        if report.calibration_tokens > 0 {
            format!(", {} calibration tokens", report.calibration_tokens)
        } else {
            String::new()
        }
    );
    if !report.site_errors.is_empty() {
        let (error, rtn): (f64, f64) = report.site_errors.iter().fold((0.0, 0.0), |(e, r), s| {
            (e + s.error, r + s.error_round_to_nearest)
        });
        println!(
            "  layer output error on the calibration inputs: {:.4} of round-to-nearest's \
             (summed over every projection)",
            error / rtn
        );
    }
    for file in &report.files {
        println!("  wrote {}", file.display());
    }
    Ok(())
}
