//! Scoring windows of a text with a model: the log-likelihood of each scored token and the
//! model's top-1 guess for it.
//!
//! The windows go through the same paged KV cache and ragged steps the engine uses: several
//! windows share a step (the batched kernels are what make this fast), a window longer than the
//! step's token budget is fed in chunks, as chunked prefill does, and only the rows that predict
//! a scored token reach the lm_head ([`StepBatch::push_scored_sequence`]).

use minserve_core::{ModelExecutor, StepBatch};

use super::windows::Window;

/// What the model made of one scored token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenScore {
    /// `-ln p(token | the tokens before it in its window)`.
    pub nll: f64,
    /// The token the model found most likely at that place.
    pub argmax: u32,
}

/// How much one step may carry.
#[derive(Debug, Clone, Copy)]
pub struct StepLimits {
    /// Tokens per step, over all windows (a GPU runner is sized for a fixed step).
    pub tokens: usize,
    /// Rows of logits per step: `rows x vocabulary` floats are held at once.
    pub logit_rows: usize,
    /// Windows read side by side (each holds its own cache blocks).
    pub windows: usize,
}

impl StepLimits {
    /// Room for `step_tokens` tokens a step and about `logits_bytes` of logits.
    pub fn new(step_tokens: usize, logits_bytes: usize, vocab: usize, windows: usize) -> Self {
        Self {
            tokens: step_tokens.max(1),
            logit_rows: (logits_bytes / (vocab * std::mem::size_of::<f32>())).max(1),
            windows: windows.max(1),
        }
    }
}

/// Scores every window's targets, in window order; `progress` hears the number of windows done.
pub fn score_windows<E: ModelExecutor>(
    executor: &mut E,
    windows: &[Window],
    limits: StepLimits,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<Vec<TokenScore>> {
    let geometry = executor.cache_geometry();
    let groups = executor.kv_group_windows().len();
    let longest = windows.iter().map(|w| w.input.len()).max().unwrap_or(0);
    let blocks_per_window = longest.div_ceil(geometry.block_size).max(1);
    let side_by_side = limits
        .windows
        .min(geometry.num_blocks / (blocks_per_window * groups))
        .min(windows.len().max(1));
    anyhow::ensure!(
        side_by_side > 0,
        "the KV cache ({} blocks of {}) cannot hold one window of {longest} tokens; give it more memory",
        geometry.num_blocks,
        geometry.block_size
    );
    let mut scores = Vec::with_capacity(windows.iter().map(|w| w.targets().len()).sum());
    let mut done = 0;
    for group in windows.chunks(side_by_side) {
        let tables: Vec<Vec<Vec<u32>>> = (0..group.len())
            .map(|slot| window_tables(slot, groups, blocks_per_window))
            .collect();
        score_group(executor, group, &tables, limits, &mut scores)?;
        done += group.len();
        progress(done);
    }
    Ok(scores)
}

/// Feeds `group` step by step until every window is read, window `w` in the blocks of
/// `tables[w]` (one table per KV group).
fn score_group<E: ModelExecutor>(
    executor: &mut E,
    group: &[Window],
    tables: &[Vec<Vec<u32>>],
    limits: StepLimits,
    scores: &mut Vec<TokenScore>,
) -> anyhow::Result<()> {
    let block_size = executor.cache_geometry().block_size;
    // Tokens of each window already in the cache. The last input token is never fed: nothing
    // after it is predicted.
    let mut fed = vec![0usize; group.len()];
    let mut per_window: Vec<Vec<TokenScore>> = group
        .iter()
        .map(|w| Vec::with_capacity(w.targets().len()))
        .collect();
    loop {
        let mut batch = StepBatch::new();
        // (window, first input position whose logits this step returns, rows)
        let mut scored_pieces = Vec::new();
        let (mut tokens_left, mut rows_left) = (limits.tokens, limits.logit_rows);
        for (w, window) in group.iter().enumerate() {
            let feed_end = window.input.len() - 1;
            if fed[w] == feed_end || tokens_left == 0 {
                continue;
            }
            let start = fed[w];
            let first_predicting = window.first_scored - 1;
            if start < first_predicting {
                let end = first_predicting.min(start + tokens_left);
                batch.push_sequence_groups(
                    &window.input[start..end],
                    start,
                    &tables[w],
                    block_size,
                    false,
                );
                tokens_left -= end - start;
                fed[w] = end;
            } else if rows_left > 0 {
                let end = feed_end.min(start + tokens_left.min(rows_left));
                batch.push_scored_sequence(
                    &window.input[start..end],
                    start,
                    &tables[w],
                    block_size,
                );
                scored_pieces.push((w, start, end - start));
                tokens_left -= end - start;
                rows_left -= end - start;
                fed[w] = end;
            }
        }
        if batch.is_empty() {
            break;
        }
        let logits = executor.execute(&batch)?;
        anyhow::ensure!(
            logits.num_rows() == batch.num_sampled(),
            "the model returned {} rows of logits for {} scored tokens",
            logits.num_rows(),
            batch.num_sampled()
        );
        let mut row = 0;
        for (w, start, rows) in scored_pieces {
            for position in start..start + rows {
                let target = group[w].input[position + 1];
                per_window[w].push(score_row(logits.row(row), target));
                row += 1;
            }
        }
    }
    scores.extend(per_window.into_iter().flatten());
    Ok(())
}

/// The block tables (one per KV group) of the `slot`-th window read side by side: windows are
/// short, so even a sliding-window group keeps all its blocks, each window its own.
pub(super) fn window_tables(slot: usize, kv_groups: usize, blocks: usize) -> Vec<Vec<u32>> {
    (0..kv_groups)
        .map(|g| {
            let first = (slot * kv_groups + g) * blocks;
            (first as u32..(first + blocks) as u32).collect()
        })
        .collect()
}

/// `-log_softmax(logits)[target]`, in f64 so that a 262k-entry sum loses nothing, and the
/// argmax (the first of equal maxima, as greedy sampling picks).
fn score_row(logits: &[f32], target: u32) -> TokenScore {
    let (argmax, max) = logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        });
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    TokenScore {
        nll: sum.ln() - f64::from(logits[target as usize] - max),
        argmax: argmax as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_scores_its_target_by_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0];
        let z: f64 = logits.iter().map(|&v| f64::from(v).exp()).sum();
        let s = score_row(&logits, 2);
        assert!((s.nll - (z.ln() - 2.0)).abs() < 1e-12);
        assert_eq!(s.argmax, 1);
    }
}
