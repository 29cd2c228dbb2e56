//! Turning a request's engine events into its choices: pure bookkeeping, no I/O, no metrics.
//!
//! A generation request has `n` choices per prompt; choice `prompt * n + index` is sample
//! `index` of prompt `prompt`. [`Choices::apply`] folds one event into them and says what it
//! changed for the client ([`ChoiceChange`]); the streaming path renders each change as a chunk,
//! the single-body path renders the finished [`Choice`]s at the end.

use minserve_core::request::{FinishReason, RequestEvent, StopReason};

/// A generated token with its log probability and the most likely alternatives.
#[derive(Debug, Clone)]
pub(crate) struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// One choice so far.
#[derive(Debug, Default)]
pub(crate) struct Choice {
    pub text: String,
    /// Tokens generated, including those whose text is still held back.
    pub tokens: usize,
    pub finish: Option<FinishReason>,
    /// The stop string or stop token id that ended it (vLLM's `stop_reason`).
    pub stop_reason: Option<StopReason>,
    /// One per token, when the request asked for logprobs.
    pub logprobs: Vec<TokenLogprob>,
    /// Tokens of the request's prediction it emitted as accepted drafts.
    pub accepted_prediction_tokens: usize,
}

/// What one event changed, as the client sees it.
#[derive(Debug)]
pub(crate) enum ChoiceChange {
    /// Nothing a client sees (scheduling, or a token whose text is still held back).
    Invisible,
    Token {
        choice: usize,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        choice: usize,
        /// Text held back until the end.
        text: String,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
    },
    /// The request failed; no more events follow.
    Failed(String),
}

/// Every choice of one request.
pub(crate) struct Choices {
    samples_per_prompt: usize,
    choices: Vec<Choice>,
    /// Prompt tokens served from the prefix cache, over all prompts.
    cached_tokens: usize,
}

impl Choices {
    pub fn new(num_prompts: usize, samples_per_prompt: usize) -> Self {
        Self {
            samples_per_prompt,
            choices: (0..num_prompts * samples_per_prompt)
                .map(|_| Choice::default())
                .collect(),
            cached_tokens: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.choices.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Choice> {
        self.choices.iter()
    }

    pub fn all_finished(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    /// Tokens generated over all choices (the `completion_tokens` of `usage`).
    pub fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens).sum()
    }

    /// Prompt tokens the prefix cache held (`usage.prompt_tokens_details.cached_tokens`).
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// With a prediction of `predicted` tokens: how many of its tokens the choices emitted as
    /// accepted drafts, and how many of each choice's copy they did not (OpenAI's
    /// `accepted_prediction_tokens`, `rejected_prediction_tokens`).
    pub fn prediction_tokens(&self, predicted: usize) -> (usize, usize) {
        self.choices.iter().fold((0, 0), |(accepted, rejected), c| {
            let a = c.accepted_prediction_tokens;
            (accepted + a, rejected + predicted.saturating_sub(a))
        })
    }

    /// Tokens of the longest choice.
    pub fn longest_choice_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.tokens).max().unwrap_or(0)
    }

    pub fn finish_reasons(&self) -> impl Iterator<Item = FinishReason> + '_ {
        self.choices.iter().filter_map(|c| c.finish)
    }

    /// Folds one event of prompt `prompt` into its choice.
    pub fn apply(&mut self, prompt: usize, event: RequestEvent) -> ChoiceChange {
        match event {
            RequestEvent::Scheduled { cached_tokens, .. } => {
                self.cached_tokens += cached_tokens;
                ChoiceChange::Invisible
            }
            RequestEvent::Token {
                index,
                token,
                text,
                logprob,
                top_logprobs,
            } => {
                let choice = prompt * self.samples_per_prompt + index;
                let Some(c) = self.choices.get_mut(choice) else {
                    return unknown_choice(choice);
                };
                c.tokens += 1;
                c.text.push_str(&text);
                let logprob = logprob.map(|logprob| TokenLogprob {
                    token,
                    logprob,
                    top: top_logprobs,
                });
                if let Some(lp) = &logprob {
                    c.logprobs.push(lp.clone());
                }
                if text.is_empty() && logprob.is_none() {
                    return ChoiceChange::Invisible;
                }
                ChoiceChange::Token {
                    choice,
                    text,
                    logprob,
                }
            }
            RequestEvent::Finished {
                index,
                reason,
                text,
                stop_reason,
                accepted_prediction_tokens,
                ..
            } => {
                let choice = prompt * self.samples_per_prompt + index;
                let Some(c) = self.choices.get_mut(choice) else {
                    return unknown_choice(choice);
                };
                c.accepted_prediction_tokens = accepted_prediction_tokens;
                c.text.push_str(&text);
                c.finish = Some(reason);
                c.stop_reason = stop_reason.clone();
                ChoiceChange::Finished {
                    choice,
                    text,
                    reason,
                    stop_reason,
                }
            }
            RequestEvent::Failed(message) => ChoiceChange::Failed(message),
        }
    }
}

fn unknown_choice(choice: usize) -> ChoiceChange {
    ChoiceChange::Failed(format!("event for unknown choice {choice}"))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn token(index: usize, text: &str) -> RequestEvent {
        RequestEvent::Token {
            index,
            token: 7,
            text: text.into(),
            logprob: None,
            top_logprobs: Vec::new(),
        }
    }

    fn finished(index: usize, text: &str) -> RequestEvent {
        RequestEvent::Finished {
            index,
            reason: FinishReason::Stop,
            text: text.into(),
            completion_tokens: 0,
            stop_reason: None,
            accepted_prediction_tokens: 0,
        }
    }

    #[test]
    fn events_of_each_prompt_land_in_that_prompts_choices() {
        let mut choices = Choices::new(2, 2);
        let at = Instant::now();
        assert!(matches!(
            choices.apply(
                0,
                RequestEvent::Scheduled {
                    at,
                    cached_tokens: 3
                }
            ),
            ChoiceChange::Invisible
        ));
        assert!(matches!(
            choices.apply(1, token(1, "a")),
            ChoiceChange::Token { choice: 3, .. }
        ));
        // A token whose text is held back counts, but shows nothing.
        assert!(matches!(
            choices.apply(1, token(1, "")),
            ChoiceChange::Invisible
        ));
        assert!(matches!(
            choices.apply(1, finished(1, "b")),
            ChoiceChange::Finished { choice: 3, .. }
        ));
        let last = choices.iter().nth(3).unwrap();
        assert_eq!((last.text.as_str(), last.tokens), ("ab", 2));
        assert_eq!(choices.completion_tokens(), 2);
        assert_eq!(choices.cached_tokens(), 3);
        assert_eq!(choices.longest_choice_tokens(), 2);
        assert!(!choices.all_finished());
        for (prompt, index) in [(0, 0), (0, 1), (1, 0)] {
            choices.apply(prompt, finished(index, ""));
        }
        assert!(choices.all_finished());
        assert_eq!(choices.finish_reasons().count(), 4);
    }

    #[test]
    fn an_event_for_a_choice_that_does_not_exist_fails_the_request() {
        let mut choices = Choices::new(1, 1);
        assert!(matches!(
            choices.apply(0, token(1, "x")),
            ChoiceChange::Failed(_)
        ));
        assert!(matches!(
            choices.apply(0, RequestEvent::Failed("boom".into())),
            ChoiceChange::Failed(m) if m == "boom"
        ));
    }
}
