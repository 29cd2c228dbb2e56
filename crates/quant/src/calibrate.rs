//! Calibration inputs: windows of a text's tokens, run through minserve's own forward pass in
//! one step so that every layer sees all of them before it is quantized (see
//! [`crate::observe`]).

use minserve_core::StepBatch;
use minserve_model::{ActivationObserver, KvCache, KvDtype, KvGroups, LlamaModel};

use crate::QuantError;

/// `count` windows of `window` tokens spread evenly over `tokens` (first at the start, last at
/// the end), so that calibration sees the whole text rather than its first chapter.
pub fn windows(tokens: &[u32], window: usize, count: usize) -> Result<Vec<Vec<u32>>, QuantError> {
    let needed = window * count;
    if count == 0 || window < 2 {
        return Err(QuantError::Invalid(format!(
            "--calib-tokens: at least 2 tokens per window and one window are needed, got {count} \
             windows of {window}"
        )));
    }
    if tokens.len() < needed {
        return Err(QuantError::Invalid(format!(
            "--calib: the calibration text has {} tokens, fewer than the {needed} asked for \
             (--calib-tokens); give a longer text or fewer tokens",
            tokens.len()
        )));
    }
    let last_start = tokens.len() - window;
    Ok((0..count)
        .map(|k| {
            let start = match count {
                1 => 0,
                _ => k * last_start / (count - 1),
            };
            tokens[start..start + window].to_vec()
        })
        .collect())
}

/// Runs every window through `model` in one forward pass with `observer` watching.
pub fn run(
    model: &LlamaModel,
    windows: &[Vec<u32>],
    observer: &mut dyn ActivationObserver,
) -> Result<(), QuantError> {
    let block_size = 16;
    let blocks_per_window = windows
        .iter()
        .map(|w| w.len().div_ceil(block_size))
        .max()
        .unwrap_or(0);
    // One KV group for all layers (sliding-window layers still attend only to their window):
    // the windows' block tables then serve every layer.
    let mut cache = KvCache::with_groups(
        model.config(),
        KvGroups::single(model.config()),
        KvDtype::F16,
        block_size,
        (blocks_per_window * windows.len()).max(1),
    );
    let mut batch = StepBatch::new();
    for (i, window) in windows.iter().enumerate() {
        let first = (i * blocks_per_window) as u32;
        let table: Vec<u32> = (first..first + blocks_per_window as u32).collect();
        batch.push_sequence(window, 0, &table, block_size, false);
    }
    model.forward_observed(&batch, &mut cache, Some(observer))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_text_evenly() {
        let tokens: Vec<u32> = (0..100).collect();
        let w = windows(&tokens, 10, 3).unwrap();
        assert_eq!(w[0][0], 0);
        assert_eq!(w[1][0], 45);
        assert_eq!(w[2], (90..100).collect::<Vec<_>>());
        let err = windows(&tokens, 60, 2).unwrap_err().to_string();
        assert!(err.contains("100 tokens"), "{err}");
    }
}
