//! Stop strings over streamed text.
//!
//! A request may name strings (OpenAI's `stop`) at which generation ends. They are matched on
//! the detokenized text, not on token ids: a stop string rarely falls on token boundaries, and the
//! same text can be tokenized in many ways.
//!
//! Streaming makes this subtle. After the text `"Hello wor"` with the stop string `"world"`, the
//! tail `"wor"` may become the stop string or may not (`"Hello word"`), so it can be sent neither
//! now nor never: [`StopStrings`] holds back exactly the tail that could still grow into a stop
//! string, sends everything before it, and either releases the tail once it can no longer match
//! or drops it when the stop string completes. The client never sees any part of a stop string.

use std::sync::Arc;

/// What [`StopStrings::push`] decided about a piece of text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is now safe to send to the client (possibly empty).
    pub emit: String,
    /// A stop string has completed: generation should end, and nothing after `emit` is ever sent.
    pub stopped: bool,
}

/// Matches a request's stop strings against its text as it streams in.
///
/// The text held back never exceeds the longest stop string, so each `push` costs
/// O(stop strings × (longest stop string + delta length)), independent of how much has been
/// generated.
///
/// When several stop strings could apply, the one that *completes* first in the text wins (the
/// earliest end; on a tie, the earliest start): that is the only rule a streaming matcher can
/// follow regardless of how the text was split, because generation must stop as soon as any
/// stop string is complete. E.g. with `["abcd", "bc"]`, the text `"abcd"` stops at `"bc"` and
/// emits `"a"`.
///
/// The stop strings themselves are shared: cloning a matcher (one per sample of a request with
/// `n` samples) copies only its own progress, never the strings.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Arc<[String]>,
    /// Text received but not yet emitted: always a possible beginning of some stop string.
    pending: String,
    /// Index into `stops` of the stop string that ended generation.
    matched: Option<usize>,
}

impl StopStrings {
    /// A matcher for `stops`. Empty strings are ignored: they would match before any text, which
    /// is never what a client means.
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|s| !s.is_empty())
                .collect(),
            pending: String::new(),
            matched: None,
        }
    }

    /// Whether there is nothing to match (then `push` emits every delta unchanged).
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// The stop string that ended generation, if one did. vLLM reports it as `stop_reason`.
    pub fn matched(&self) -> Option<&str> {
        self.matched.map(|i| self.stops[i].as_str())
    }

    pub fn is_stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// Takes the next piece of generated text and returns what may be sent now.
    ///
    /// Once stopped, further deltas are ignored (and `stopped` stays true).
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.is_stopped() {
            return StopOutcome {
                emit: String::new(),
                stopped: true,
            };
        }
        self.pending.push_str(delta);

        // Everything before `pending` was emitted only once no stop string could start there,
        // so any complete stop string lies entirely inside `pending`. Only stop strings that
        // complete within this delta can be found here, since earlier ones were caught earlier.
        let first_complete = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, stop)| {
                let start = self.pending.find(stop.as_str())?;
                Some((start + stop.len(), start, i))
            })
            .min();
        if let Some((_, start, i)) = first_complete {
            self.matched = Some(i);
            self.pending.truncate(start);
            return StopOutcome {
                emit: std::mem::take(&mut self.pending),
                stopped: true,
            };
        }

        // Hold back the longest tail that is still the beginning of some stop string. Shorter
        // candidates start later, so scanning from the left finds the longest one first; tails
        // longer than the longest stop string cannot be a beginning of one.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = self.pending.len().saturating_sub(longest);
        let hold_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .skip_while(|&i| i < earliest)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let held = self.pending.split_off(hold_from);
        StopOutcome {
            emit: std::mem::replace(&mut self.pending, held),
            stopped: false,
        }
    }

    /// Ends the stream (end-of-sequence token or length limit): the held-back text turned out
    /// not to be a stop string, so it is released. Empty after a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `deltas` and returns (all emitted text including `finish`, stopped).
    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut matcher = StopStrings::new(stops.iter().copied());
        let mut text = String::new();
        for delta in deltas {
            let outcome = matcher.push(delta);
            text += &outcome.emit;
            if outcome.stopped {
                assert_eq!(matcher.finish(), "");
                return (text, true);
            }
        }
        text += &matcher.finish();
        (text, false)
    }

    /// The text a client should see: everything before the stop string that completes first.
    fn reference(text: &str, stops: &[&str]) -> (String, bool) {
        let first = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s).map(|start| (start + s.len(), start)))
            .min();
        match first {
            Some((_, start)) => (text[..start].to_string(), true),
            None => (text.to_string(), false),
        }
    }

    #[test]
    fn holds_back_a_possible_stop_string_and_releases_it_when_it_fails() {
        let mut matcher = StopStrings::new(["world"]);
        let outcome = matcher.push("Hello wor");
        assert_eq!(outcome.emit, "Hello ");
        assert!(!outcome.stopped);
        // "word" cannot become "world": release "wor" and the new text.
        let outcome = matcher.push("d!");
        assert_eq!(outcome.emit, "word!");
        assert_eq!(matcher.finish(), "");
    }

    #[test]
    fn a_stop_string_split_over_three_deltas_is_never_emitted() {
        let mut matcher = StopStrings::new(["</answer>"]);
        assert_eq!(matcher.push("42 </").emit, "42 ");
        assert_eq!(matcher.push("ans").emit, "");
        let outcome = matcher.push("wer> trailing");
        assert_eq!(
            outcome,
            StopOutcome {
                emit: String::new(),
                stopped: true
            }
        );
        assert_eq!(matcher.matched(), Some("</answer>"));
        // After the stop, nothing more comes out.
        assert!(matcher.push("more").stopped);
        assert_eq!(matcher.finish(), "");
    }

    #[test]
    fn text_before_the_stop_string_in_the_same_delta_is_emitted() {
        assert_eq!(run(&["\n\n"], &["one\n", "\ntwo"]), ("one".into(), true));
        assert_eq!(run(&["STOP"], &["abcSTOPdef"]), ("abc".into(), true));
    }

    #[test]
    fn finish_flushes_a_tail_that_never_completed() {
        let mut matcher = StopStrings::new(["###"]);
        assert_eq!(matcher.push("done ##").emit, "done ");
        assert_eq!(matcher.finish(), "##");
        assert!(!matcher.is_stopped());
    }

    #[test]
    fn the_stop_string_that_completes_first_wins() {
        assert_eq!(run(&["abcd", "bc"], &["abcd"]), ("a".into(), true));
        assert_eq!(run(&["abcd", "bc"], &["ab", "cd"]), ("a".into(), true));
        // Same end: the longer one (earlier start) cuts more.
        assert_eq!(run(&["bc", "abc"], &["xabc"]), ("x".into(), true));
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        // The stop string shares its first byte with "é" (both start with 0xC3).
        let (text, stopped) = run(&["ü!"], &["caf", "é ü", "?", " ü", "!", "x"]);
        assert_eq!((text.as_str(), stopped), ("café ü? ", true));
        let (text, stopped) = run(&["🦀🦀"], &["a🦀", "b🦀", "🦀c"]);
        assert_eq!((text.as_str(), stopped), ("a🦀b", true));
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let matcher = StopStrings::new(["", ""]);
        assert!(matcher.is_empty());
        assert_eq!(run(&[""], &["abc", "def"]), ("abcdef".into(), false));
        assert_eq!(run(&[], &["abc"]), ("abc".into(), false));
    }

    /// Text over a small alphabet (so stop strings actually occur), with multibyte characters.
    fn text_strategy(max_chars: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!['a', 'b', 'c', ' ', 'é', '🦀', '\n']),
            0..max_chars,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    /// Splits `text` at the character boundaries picked by `cuts` (some deltas may be empty).
    fn split<'a>(text: &'a str, cuts: &[prop::sample::Index]) -> Vec<&'a str> {
        let boundaries: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| *c.get(&boundaries)).collect();
        cuts.push(0);
        cuts.push(text.len());
        cuts.sort_unstable();
        cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn any_split_gives_the_text_up_to_the_first_stop_string(
            text in text_strategy(40),
            stops in prop::collection::vec(text_strategy(4), 0..4),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
            prop_assert_eq!(run(&stops, &split(&text, &cuts)), reference(&text, &stops));
        }

        /// Nothing is held back longer than necessary: the held text is always the beginning of
        /// some stop string, so the client is never kept waiting for text that cannot match.
        #[test]
        fn only_a_possible_stop_string_is_held_back(
            text in text_strategy(40),
            stops in prop::collection::vec(text_strategy(4), 0..4),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let mut matcher = StopStrings::new(stops.iter().map(String::as_str));
            for delta in split(&text, &cuts) {
                if matcher.push(delta).stopped {
                    break;
                }
                let held = &matcher.pending;
                prop_assert!(
                    held.is_empty() || matcher.stops.iter().any(|s| s.starts_with(held.as_str())),
                    "held back {:?} with stops {:?}", held, stops
                );
            }
        }
    }
}
