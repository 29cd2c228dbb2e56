//! `minserve trace`: reading an engine trace (`--trace-file`, schema in docs/trace.md) back.
//! [`plot`] draws what the scheduler did step by step; [`summary`] prints each request's
//! timeline.

pub mod plot;
pub mod summary;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use minserve_core::trace::{read_trace, TraceRecord};

#[derive(Subcommand)]
pub enum TraceCommand {
    /// Charts of a trace: KV usage, running and waiting sequences, prefill and decode tokens
    /// and step time per step, with preemptions marked (trace.svg and trace.png).
    Plot(PlotArgs),
    /// Each request's timeline: arrival, queue time, first token, preemptions, finish.
    Summary(SummaryArgs),
}

#[derive(Args)]
pub struct PlotArgs {
    /// A trace written with --trace-file.
    pub trace: PathBuf,
    /// Folder for trace.svg and trace.png (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct SummaryArgs {
    /// A trace written with --trace-file.
    pub trace: PathBuf,
}

pub fn run(command: TraceCommand) -> anyhow::Result<()> {
    match command {
        TraceCommand::Plot(args) => {
            let records = load(&args.trace)?;
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?;
            let title = args
                .trace
                .file_name()
                .map_or("trace".into(), |n| n.to_string_lossy().into_owned());
            plot::draw(&title, &records, &args.out)?;
            eprintln!(
                "minserve: wrote trace.svg and trace.png to {}",
                args.out.display()
            );
            Ok(())
        }
        TraceCommand::Summary(args) => {
            let records = load(&args.trace)?;
            print!("{}", summary::markdown(&records));
            Ok(())
        }
    }
}

fn load(path: &Path) -> anyhow::Result<Vec<TraceRecord>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    read_trace(std::io::BufReader::new(file)).with_context(|| format!("reading {}", path.display()))
}
