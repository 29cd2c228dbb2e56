//! `minserve kv-calc`: how much KV cache a model needs: bytes per token, per block and per
//! sequence at a context length, and for a batch, counted the way the engine allocates it.
//!
//! Sliding-window layers (Gemma 3) are grouped as the cache groups them (`KvGroups::of`), and
//! the blocks a sequence holds are what the engine's own block manager leaves it holding once
//! it decodes at that length (a window group keeps about `window / block_size + 1` blocks, the
//! others every block): the figure is the engine's, not a formula beside it. The "contiguous"
//! figure is the memory of a cache without paging or windows: every layer, every position.

use std::fmt::Write as _;

use anyhow::{bail, Context};
use clap::Args;
use minserve_core::block_manager::BlockManager;
use minserve_core::sequence::{Sequence, RELEASED_BLOCK};
use minserve_model::config::SlidingWindow;
use minserve_model::{synthetic, KvCache, KvDtype, KvGroups, ModelConfig};

#[derive(Args)]
pub struct KvCalcArgs {
    /// A shape name (see below), `synthetic:NAME`, or a model path or catalog alias (its
    /// config is read, not its weights). Without it and without --layers: a table of every
    /// known shape.
    #[arg(long)]
    pub model: Option<String>,
    /// Tokens per sequence (prompt and output).
    #[arg(long, default_value_t = 8192)]
    pub context: usize,
    /// Sequences.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// `f16`, `f32` or `q8`.
    #[arg(long, default_value = "f16")]
    pub kv_cache_dtype: KvDtype,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// An explicit shape instead of --model: layers ...
    #[arg(long, requires_all = ["kv_heads", "head_dim"], conflicts_with = "model")]
    pub layers: Option<usize>,
    /// ... KV heads ...
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// ... head size ...
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// ... and, for local attention, the window of the local layers ...
    #[arg(long, requires = "global_every")]
    pub sliding_window: Option<usize>,
    /// ... with every N-th layer global (Gemma 3: 6).
    #[arg(long)]
    pub global_every: Option<usize>,
}

/// A model's cache shape: name, layers, KV heads, head size, and the sliding window with its
/// global-layer period.
type Shape = (&'static str, usize, usize, usize, Option<(usize, usize)>);

/// Shapes of common models, from their published configs.
const SHAPES: &[Shape] = &[
    ("smollm2-135m", 30, 3, 64, None),
    ("llama3.2-1b", 16, 8, 64, None),
    ("llama3-8b", 32, 8, 128, None),
    ("llama3-70b", 80, 8, 128, None),
    ("qwen3-0.6b", 28, 8, 128, None),
    ("qwen3-8b", 36, 8, 128, None),
    ("qwen3-32b", 64, 8, 128, None),
    ("gemma3-270m", 18, 1, 256, Some((512, 6))),
    ("gemma3-1b", 26, 1, 256, Some((512, 6))),
    ("gemma3-4b", 34, 4, 256, Some((1024, 6))),
    ("gemma3-12b", 48, 8, 256, Some((1024, 6))),
    ("gemma3-27b", 62, 16, 128, Some((1024, 6))),
];

/// A config with only the cache's shape set (the rest is the tiny synthetic model's).
fn shape(
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<(usize, usize)>,
) -> ModelConfig {
    let mut config = synthetic::preset("tiny").expect("a built-in preset");
    config.num_layers = layers;
    config.num_kv_heads = kv_heads;
    config.head_dim = head_dim;
    config.block.sliding_window = window.map(|(size, pattern)| SlidingWindow {
        size,
        pattern,
        local_rope_theta: 10_000.0,
    });
    config
}

fn named_shape(name: &str) -> Option<ModelConfig> {
    SHAPES
        .iter()
        .find(|s| s.0 == name)
        .map(|&(_, l, h, d, w)| shape(l, h, d, w))
}

/// What one sequence of `context` tokens costs in `config`'s cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvFigures {
    /// K and V of one token in every layer.
    pub bytes_per_token: usize,
    /// The sliding window of each KV group (`None`: global).
    pub group_windows: Vec<Option<usize>>,
    pub layers_per_group: usize,
    pub bytes_per_block: usize,
    /// Blocks held while decoding at `context` tokens, all groups together.
    pub blocks_per_seq: usize,
    /// Every layer, every position, no paging: `context * bytes_per_token`.
    pub contiguous_bytes_per_seq: usize,
}

impl KvFigures {
    pub fn bytes_per_seq(&self) -> usize {
        self.blocks_per_seq * self.bytes_per_block
    }
}

pub fn figures(
    config: &ModelConfig,
    dtype: KvDtype,
    block_size: usize,
    context: usize,
) -> KvFigures {
    let groups = KvGroups::of(config);
    let num_groups = groups.num_groups();
    let logical = context.div_ceil(block_size);
    let mut blocks = BlockManager::with_groups(
        num_groups * (logical + 1),
        block_size,
        false,
        groups.windows.clone(),
    );
    // Computed up to its last token, then that token: the allocation of a decode step, which
    // releases what the windows have passed.
    let mut seq = Sequence::new(0, vec![0; context.max(1)], 0, 0);
    let last = seq.len() - 1;
    assert!(blocks.allocate_slots(&mut seq, last, None), "sized for it");
    seq.num_computed_tokens = last;
    assert!(blocks.allocate_slots(&mut seq, 1, None), "sized for it");
    let held = seq
        .block_tables
        .iter()
        .flatten()
        .filter(|&&b| b != RELEASED_BLOCK)
        .count();
    KvFigures {
        bytes_per_token: dtype.bytes_per_token(config),
        bytes_per_block: KvCache::bytes_per_block(config, &groups, dtype, block_size),
        group_windows: groups.windows,
        layers_per_group: groups.layers_per_group,
        blocks_per_seq: held,
        contiguous_bytes_per_seq: context * dtype.bytes_per_token(config),
    }
}

/// Bytes in binary units, three significant figures or so.
fn size(bytes: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if value >= 100.0 => format!("{value:.0} {}", units[unit]),
        _ => format!("{value:.2} {}", units[unit]),
    }
}

fn dtype_name(dtype: KvDtype) -> &'static str {
    match dtype {
        KvDtype::F16 => "f16",
        KvDtype::F32 => "f32",
        KvDtype::Q8 => "q8",
        KvDtype::Fp8 => "fp8",
    }
}

fn describe_groups(f: &KvFigures) -> String {
    let global = f.group_windows.iter().filter(|w| w.is_none()).count();
    let local: Vec<usize> = f.group_windows.iter().filter_map(|&w| w).collect();
    let mut text = format!(
        "{} of {} layer{}: {global} global",
        f.group_windows.len(),
        f.layers_per_group,
        if f.layers_per_group == 1 { "" } else { "s" }
    );
    if let Some(window) = local.first() {
        let _ = write!(text, ", {} with a window of {window}", local.len());
    }
    text
}

pub fn report(name: &str, config: &ModelConfig, args: &KvCalcArgs) -> String {
    let f = figures(config, args.kv_cache_dtype, args.block_size, args.context);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{name}: {} layers, {} KV heads x {}, {} cache, blocks of {} tokens",
        config.num_layers,
        config.num_kv_heads,
        config.head_dim,
        dtype_name(args.kv_cache_dtype),
        args.block_size
    );
    let _ = writeln!(out, "KV groups:            {}", describe_groups(&f));
    let _ = writeln!(
        out,
        "per token:            {} (every layer)",
        size(f.bytes_per_token)
    );
    let _ = writeln!(out, "per block:            {}", size(f.bytes_per_block));
    let _ = writeln!(
        out,
        "per sequence ({} tokens): {} blocks = {} (contiguous, every layer: {})",
        args.context,
        f.blocks_per_seq,
        size(f.bytes_per_seq()),
        size(f.contiguous_bytes_per_seq)
    );
    let _ = writeln!(
        out,
        "batch of {}:          {} blocks = {}",
        args.batch,
        f.blocks_per_seq * args.batch,
        size(f.bytes_per_seq() * args.batch)
    );
    out
}

/// Every known shape at `args`' context, batch, dtype and block size, as a markdown table.
pub fn table(args: &KvCalcArgs) -> String {
    let mut out = format!(
        "KV cache at {} tokens per sequence, batch {}, {} cache, blocks of {} tokens.\n\n\
         | model | layers | KV heads x size | per token | per sequence | batch | contiguous per sequence |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        args.context,
        args.batch,
        dtype_name(args.kv_cache_dtype),
        args.block_size
    );
    for &(name, layers, heads, head_dim, window) in SHAPES {
        let config = shape(layers, heads, head_dim, window);
        let f = figures(&config, args.kv_cache_dtype, args.block_size, args.context);
        let _ = writeln!(
            out,
            "| {name} | {layers} | {heads} x {head_dim} | {} | {} | {} | {} |",
            size(f.bytes_per_token),
            size(f.bytes_per_seq()),
            size(f.bytes_per_seq() * args.batch),
            size(f.contiguous_bytes_per_seq)
        );
    }
    out
}

fn config_of(args: &KvCalcArgs) -> anyhow::Result<Option<(String, ModelConfig)>> {
    if let Some(layers) = args.layers {
        let (heads, head_dim) = (args.kv_heads.unwrap_or(0), args.head_dim.unwrap_or(0));
        if layers == 0 || heads == 0 || head_dim == 0 {
            bail!("--layers, --kv-heads and --head-dim must be positive");
        }
        let window = args.sliding_window.zip(args.global_every);
        if window.is_some_and(|(w, p)| w == 0 || p == 0) {
            bail!("--sliding-window and --global-every must be positive");
        }
        let name = format!("{layers} layers x {heads} KV heads x {head_dim}");
        return Ok(Some((name, shape(layers, heads, head_dim, window))));
    }
    let Some(model) = &args.model else {
        return Ok(None);
    };
    if let Some(config) = named_shape(model) {
        return Ok(Some((model.clone(), config)));
    }
    if let Some(spec) = minserve_model::SyntheticSpec::parse(model)? {
        return Ok(Some((model.clone(), spec.config())));
    }
    let path = minserve_hub::resolve(model, &minserve_hub::FetchOptions::default()).with_context(
        || {
            let names: Vec<&str> = SHAPES.iter().map(|s| s.0).collect();
            format!("`{model}` is not a known shape ({})", names.join(", "))
        },
    )?;
    let config = minserve_model::load_config(&path)?;
    Ok(Some((model.clone(), config)))
}

pub fn run(args: KvCalcArgs) -> anyhow::Result<()> {
    if args.context == 0 || args.batch == 0 || args.block_size == 0 {
        bail!("--context, --batch and --block-size must be positive");
    }
    match config_of(&args)? {
        Some((name, config)) => print!("{}", report(&name, &config, &args)),
        None => print!("{}", table(&args)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn llama3_8b_holds_128_kib_per_token() {
        let config = named_shape("llama3-8b").unwrap();
        // 2 (K, V) x 32 layers x 8 heads x 128 values x 2 bytes.
        let f = figures(&config, KvDtype::F16, 16, 8192);
        assert_eq!(f.bytes_per_token, 2 * 32 * 8 * 128 * 2);
        assert_eq!(f.bytes_per_token, 128 << 10);
        assert_eq!(f.blocks_per_seq, 8192 / 16);
        assert_eq!(f.bytes_per_seq(), 1 << 30, "1 GiB at 8k tokens");
        assert_eq!(f.contiguous_bytes_per_seq, 1 << 30);
        // q8: 128 bytes and one 4-byte scale per row.
        let q8 = figures(&config, KvDtype::Q8, 16, 8192);
        assert_eq!(q8.bytes_per_token, 2 * 32 * 8 * (128 + 4));
        // A partial last block is a whole block.
        assert_eq!(figures(&config, KvDtype::F16, 16, 8193).blocks_per_seq, 513);
    }

    /// Gemma 3 27B: 10 global layers (every 6th of 62) and 52 local ones with a window of 1024,
    /// in groups of gcd(10, 52) = 2 layers. At 32k tokens the global layers hold every
    /// position: 10 x 2 x 16 x 128 x 2 B = 80 KiB per token, 2.5 GiB; the local ones hold their
    /// last 64 blocks of 16 (positions 31,744..32,767), 1024 tokens: 52 x 8 KiB x 1024 = 416 MiB.
    #[test]
    fn gemma3_27b_local_layers_hold_their_window_only() {
        let config = named_shape("gemma3-27b").unwrap();
        let f = figures(&config, KvDtype::F16, 16, 32768);
        assert_eq!(f.layers_per_group, 2);
        assert_eq!(f.group_windows.len(), 31);
        assert_eq!(f.bytes_per_block, 2 * 2 * 16 * 128 * 2 * 16);
        let global = 10 * 2 * 16 * 128 * 2 * 32768;
        let local = 52 * 2 * 16 * 128 * 2 * 1024;
        assert_eq!(global, 2560 * MIB);
        assert_eq!(local, 416 * MIB);
        assert_eq!(f.bytes_per_seq(), global + local);
        assert_eq!(f.contiguous_bytes_per_seq, 62 * 2 * 16 * 128 * 2 * 32768);
        // Shorter than the window: nothing is released.
        let short = figures(&config, KvDtype::F16, 16, 1000);
        assert_eq!(short.blocks_per_seq, 31 * 1000usize.div_ceil(16));
    }

    #[test]
    fn the_default_model_matches_its_pool_sizing() {
        let config = synthetic::preset("smollm2-135m").unwrap();
        let f = figures(&config, KvDtype::F16, 16, 100);
        // The figure of docs/kv-cache.md: 2 x 30 x 3 x 64 x 2 bytes per token.
        assert_eq!(f.bytes_per_token, 23_040);
        assert_eq!(f.blocks_per_seq, 7);
        assert_eq!(f.bytes_per_seq(), 7 * 16 * 23_040);
    }
}
