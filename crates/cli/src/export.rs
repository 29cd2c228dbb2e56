//! `minserve export`: a GGUF model as a standard Hugging Face folder (safetensors, config.json,
//! tokenizer files), e.g. to check minserve against `transformers` on the very same weights.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use minserve_model::export::{export_gguf_to_hf, ExportDType};

#[derive(Args)]
pub struct ExportArgs {
    /// The GGUF model to export: a path or a catalog name (fetched if it is not here yet).
    #[arg(long)]
    model: String,
    /// Folder to write (created; must be empty if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Dtype of the exported tensors; f32 keeps the dequantized values exactly.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
}

/// Mirrors [`ExportDType`] so that clap lists the choices in `--help` (the model crate does not
/// depend on clap).
#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DTypeArg> for ExportDType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => ExportDType::F32,
            DTypeArg::F16 => ExportDType::F16,
            DTypeArg::Bf16 => ExportDType::BF16,
        }
    }
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let path = minserve_hub::resolve(&args.model, &minserve_hub::FetchOptions::default())?;
    let report = export_gguf_to_hf(&path, &args.out, args.dtype.into())
        .with_context(|| format!("exporting {} to {}", path.display(), args.out.display()))?;
    let c = &report.config;
    println!(
        "exported {} ({}, {} layers, hidden {}, vocab {}) as {} to {}",
        path.display(),
        c.architecture,
        c.num_layers,
        c.hidden_size,
        c.vocab_size,
        report.dtype,
        report.out_dir.display()
    );
    println!(
        "  {} tensors, {:.1} MiB{}{}",
        report.num_tensors,
        report.weights_bytes as f64 / (1 << 20) as f64,
        if report.unpermuted_qk {
            "; q/k rows un-permuted to the Hugging Face layout"
        } else {
            ""
        },
        if c.tie_word_embeddings {
            "; lm_head tied to the embeddings"
        } else {
            ""
        },
    );
    for name in &report.skipped {
        println!("  skipped {name} (not a weight; minserve does not use it)");
    }
    for file in &report.files {
        println!("  wrote {}", file.display());
    }
    Ok(())
}
