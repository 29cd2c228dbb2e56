//! Which tokens a strided perplexity evaluation feeds the model, and which it scores.
//!
//! A text longer than the context is read in overlapping windows (Hugging Face's "strided"
//! perplexity): a window starts every `stride` tokens and holds up to `context` tokens; each
//! token is scored at most once, in the first window that reaches it, so every scored token
//! but those of the first window sees at least `context - stride` tokens before it. Only a
//! token with nothing before it in its window goes unscored: the text's first one when there
//! is no BOS, and with neither BOS nor overlap the first of every window. A smaller
//! stride gives each prediction more context (a lower, fairer perplexity) and costs more
//! forward passes: `stride == context` is the cheapest, non-overlapping reading.
//!
//! When the model's tokenizer puts a BOS token in front of a text, each window starts with it
//! (as it would in a request), and it takes one place of the context.

/// One window: the model reads `input`, and its logits at `input` index `first_scored - 1`
/// onwards predict `input[first_scored..]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub input: Vec<u32>,
    /// Index in `input` of the first token whose prediction is scored; at least 1.
    pub first_scored: usize,
}

impl Window {
    /// The tokens this window scores, in order.
    pub fn targets(&self) -> &[u32] {
        &self.input[self.first_scored..]
    }
}

/// Why a window plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    TooFewTokens,
    ContextTooSmall { context: usize },
    BadStride { stride: usize, context: usize },
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooFewTokens => write!(f, "the text has too few tokens to score (at least 2)"),
            Self::ContextTooSmall { context } => {
                write!(f, "--context {context} leaves no room for a scored token")
            }
            Self::BadStride { stride, context } => write!(
                f,
                "--stride {stride} must be between 1 and the context of text tokens per window ({context})"
            ),
        }
    }
}

impl std::error::Error for PlanError {}

/// The windows over `tokens` (the text, without BOS) for a model that reads at most `context`
/// tokens, a new window every `stride` text tokens.
pub fn plan(
    tokens: &[u32],
    bos: Option<u32>,
    context: usize,
    stride: usize,
) -> Result<Vec<Window>, PlanError> {
    let prefix: Vec<u32> = bos.into_iter().collect();
    // Text tokens per window: the context less the BOS place.
    let span = context.saturating_sub(prefix.len());
    if span < 2 {
        return Err(PlanError::ContextTooSmall { context });
    }
    if stride == 0 || stride > span {
        return Err(PlanError::BadStride {
            stride,
            context: span,
        });
    }
    if tokens.len() < 2 {
        return Err(PlanError::TooFewTokens);
    }
    let mut windows = Vec::new();
    // Text tokens scored so far: the first text token is predicted from BOS when there is
    // one, else it only serves as context.
    let mut scored_until = usize::from(prefix.is_empty());
    let mut begin = 0;
    while scored_until < tokens.len() {
        let end = (begin + span).min(tokens.len());
        let mut input = prefix.clone();
        input.extend_from_slice(&tokens[begin..end]);
        windows.push(Window {
            input,
            // Without BOS and without overlap, a window's first token has nothing before it
            // to be predicted from: it is context only, like the text's first token.
            first_scored: (scored_until - begin + prefix.len()).max(1),
        });
        scored_until = end;
        begin += stride;
    }
    Ok(windows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_targets(windows: &[Window]) -> Vec<u32> {
        windows.iter().flat_map(|w| w.targets().to_vec()).collect()
    }

    #[test]
    fn every_token_is_scored_once_with_bos() {
        let tokens: Vec<u32> = (10..30).collect();
        let windows = plan(&tokens, Some(1), 9, 4).unwrap();
        assert_eq!(all_targets(&windows), tokens);
        for w in &windows {
            assert!(w.input.len() <= 9 && w.input[0] == 1 && w.first_scored >= 1);
        }
        // After the first window, a scored token has at least span - stride = 4 tokens before
        // it in its own window, BOS aside.
        for w in &windows[1..] {
            let context_before = w.first_scored - 1;
            assert!(context_before >= 4, "{w:?}");
        }
    }

    #[test]
    fn without_bos_the_first_token_is_context_only() {
        let tokens: Vec<u32> = (10..30).collect();
        let windows = plan(&tokens, None, 8, 8).unwrap();
        let unscored = [tokens[0], tokens[8], tokens[16]];
        let expected: Vec<u32> = tokens
            .iter()
            .copied()
            .filter(|t| !unscored.contains(t))
            .collect();
        assert_eq!(all_targets(&windows), expected);
        assert_eq!(windows.len(), 3);
        // With overlap, only the text's first token is context only.
        assert_eq!(
            all_targets(&plan(&tokens, None, 8, 5).unwrap()),
            tokens[1..]
        );
    }

    #[test]
    fn a_short_text_is_one_window() {
        let windows = plan(&[5, 6, 7], Some(1), 512, 256).unwrap();
        assert_eq!(
            windows,
            vec![Window {
                input: vec![1, 5, 6, 7],
                first_scored: 1
            }]
        );
    }

    #[test]
    fn impossible_plans_are_errors() {
        assert_eq!(plan(&[5], None, 8, 4), Err(PlanError::TooFewTokens));
        assert_eq!(
            plan(&[5, 6], Some(1), 2, 1),
            Err(PlanError::ContextTooSmall { context: 2 })
        );
        assert_eq!(
            plan(&[5, 6, 7], None, 8, 9),
            Err(PlanError::BadStride {
                stride: 9,
                context: 8
            })
        );
        assert!(plan(&[5, 6, 7], None, 8, 0).is_err());
    }
}
