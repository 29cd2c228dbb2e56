//! Turning one row of logits into the next token.
//!
//! [`Sampler::sample_token`] runs the same pipeline as vLLM, in the same order:
//!
//! 1. **logit bias**: the request's per-token offsets are added to the raw logits;
//! 2. **penalties**: repetition (prompt and output), then frequency and presence (output only);
//! 3. **logprobs**: if asked for, they are the log-softmax of these *processed* logits, before
//!    temperature, top-k, min-p and top-p (see [`SampledToken`] for why);
//! 4. **choice**: the argmax when greedy, otherwise a draw after temperature, top-k, min-p and
//!    top-p have narrowed the distribution.
//!
//! Every request carries its own random stream ([`Rng`]) seeded from its own seed, so the token a
//! request draws never depends on which other requests share its batch.
//!
//! The vocabulary is large (49,152 entries for SmolLM2, 128,256 for Llama 3) and this runs once
//! per sequence per step, so nothing here sorts the whole vocabulary: top-k, top-p and the top
//! logprobs all use partial selection, and the penalties count the token history (by sorting it) rather
//! than building a vocabulary-sized histogram.

use std::cmp::Ordering;

use crate::math::exp;

/// Most alternatives a request may ask for with `logprobs` (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;

/// Temperatures below this are treated as greedy. Dividing logits by a near-zero temperature
/// overflows `f32`, and the distribution it describes is a point mass on the argmax anyway.
/// vLLM uses the same threshold.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// How a request wants its tokens chosen. `Default` is OpenAI's default: plain sampling at
/// temperature 1 with nothing else switched on.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before the draw: below 1 sharpens the distribution, above 1 flattens
    /// it. `0` (anything below [`GREEDY_TEMPERATURE`]) means greedy.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0: all; 1: greedy).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f32,
    /// Hugging Face / vLLM repetition penalty (1: off). Every token that appears in the prompt or
    /// the output has its logit divided by this if positive and multiplied by it if negative, so
    /// values above 1 always make a seen token less likely, however often it was seen.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty, in `[-2, 2]`: subtracted once from the logit of every token that
    /// appears in the output so far. Positive values push the model towards new topics.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty, in `[-2, 2]`: subtracted from a token's logit once per time it
    /// appears in the output so far. Positive values discourage verbatim repetition.
    pub frequency_penalty: f32,
    /// `(token id, bias)` pairs added to the raw logits before anything else; +100 all but forces
    /// a token and -100 all but bans it. Ids outside the vocabulary are ignored; a repeated id
    /// gets the sum of its biases.
    pub logit_bias: Vec<(u32, f32)>,
    /// `None`: report no logprobs. `Some(n)`: report the chosen token's logprob and the `n` most
    /// likely tokens' (`Some(0)`: only the chosen token's).
    pub logprobs: Option<usize>,
    /// Seed of the request's own random stream; `None` lets the engine pick one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            logprobs: None,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether the choice is the argmax: a temperature of (almost) 0, or top-k of 1.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE || self.top_k == 1
    }

    /// Checks every field against the range the API accepts. The error is a sentence meant for
    /// the client (an HTTP 400 body), naming the field and the value it got. `logprobs` is the
    /// exception: its limit ([`MAX_LOGPROBS`]) is refused by
    /// [`EngineLimits::validate`](crate::request::EngineLimits::validate) as an error of its own,
    /// since APIs name that parameter differently (chat's `top_logprobs`).
    ///
    /// The sampler itself never panics on out-of-range values (it degrades to something sensible,
    /// e.g. greedy), but they are almost always a client bug worth reporting.
    pub fn validate(&self) -> Result<(), String> {
        // Written as `!(in range)` so that NaN, which fails every comparison, is rejected too.
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "top_p must be greater than 0 and at most 1, got {}",
                self.top_p
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be between 0 and 1, got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(format!("{name} must be between -2 and 2, got {value}"));
            }
        }
        for &(token, bias) in &self.logit_bias {
            if !(-100.0..=100.0).contains(&bias) {
                return Err(format!(
                    "logit_bias for token {token} must be between -100 and 100, got {bias}"
                ));
            }
        }
        Ok(())
    }
}

/// The outcome of one sampling step.
///
/// Logprob convention: logprobs are the log-softmax, over the whole vocabulary, of the logits
/// *after* logit bias and penalties but *before* temperature, top-k, min-p and top-p. This is what
/// OpenAI reports and what vLLM calls `processed_logprobs` (vLLM's default is the raw model
/// output). It describes what the request asked the model to believe, independent of how the
/// draw was narrowed: a token chosen under top-p still shows its full-distribution logprob, and
/// the values do not change with temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub token: u32,
    /// The chosen token's logprob; `Some` exactly when the request asked for logprobs.
    pub logprob: Option<f32>,
    /// The `n` most likely tokens and their logprobs, most likely first (ties: lower id first, as
    /// [`argmax`] breaks them, so a greedy token is always first). A token the model ruled out
    /// has `f32::NEG_INFINITY`, which JSON cannot carry: the API layer must map it (vLLM sends
    /// -9999.0).
    pub top_logprobs: Vec<(u32, f32)>,
}

/// A small, fast, seedable generator (SplitMix64): statistical quality is ample for sampling and
/// it keeps the core free of dependencies.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[0, 1)`, with the 53 bits of precision an `f64` holds: a draw over a
    /// 100k-token vocabulary needs finer steps than `f32`'s 24 bits to reach its rarest tokens.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest value; the first one on ties, so that greedy decoding is reproducible.
/// NaN never wins (it compares false with everything).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples one token with the full pipeline (see the module docs), for callers that sample
/// rarely. It allocates vocabulary-sized buffers on every call; an engine keeps a [`Sampler`]
/// and calls [`Sampler::sample_token`] instead.
pub fn sample_token(
    logits: &mut [f32],
    params: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
    rng: &mut Rng,
) -> SampledToken {
    Sampler::new().sample_token(logits, params, prompt, output, rng)
}

/// Draws a token from a read-only row with no token history, so repetition, presence and
/// frequency penalties have nothing to act on. A convenience for single-sequence tools; it
/// copies the row.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    let mut row = logits.to_vec();
    sample_token(&mut row, params, &[], &[], rng).token
}

/// Reusable scratch space for sampling, so that a step allocates nothing once the buffers have
/// grown to the vocabulary size. It holds no state between calls that could affect the result:
/// one `Sampler` can serve every sequence of a batch, in any order.
#[derive(Debug, Clone, Default)]
pub struct Sampler {
    /// `(token id, value)` pairs still in the running; the value is a logit, then a weight.
    candidates: Vec<(u32, f32)>,
    /// The candidates' weights, contiguous, so that computing and walking them vectorizes.
    weights: Vec<f32>,
    /// Token ids of the history, sorted so that they can be deduplicated or counted.
    history: Vec<u32>,
}

impl Sampler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Chooses the next token from one row of `logits` (vocabulary-sized).
    ///
    /// `prompt` and `output` are the sequence's token ids so far; they feed the penalties. On
    /// return `logits` holds the processed logits (bias and penalties applied, NaN turned into
    /// `-inf`), the values the logprobs were computed from.
    ///
    /// Never panics on what a request controls: parameters outside [`SamplingParams::validate`]'s
    /// ranges degrade to something sensible, token ids outside the vocabulary are ignored, and
    /// a NaN logit counts as `-inf` (a token that cannot be chosen).
    ///
    /// # Panics
    /// If `logits` is empty: a model with no vocabulary is a bug, not user input.
    pub fn sample_token(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        prompt: &[u32],
        output: &[u32],
        rng: &mut Rng,
    ) -> SampledToken {
        self.sample_token_with_draft(logits, params, prompt, output, None, rng)
    }

    /// [`sample_token`](Self::sample_token) at a position where speculative decoding proposed
    /// `draft` (see `speculative.rs`): the token returned is `draft` exactly when the draft is
    /// accepted, and it is distributed as `sample_token`'s would be, whatever the draft.
    ///
    /// The proposal is a point mass on `draft` (a prompt-lookup draft has no distribution), so
    /// standard speculative rejection sampling reduces to: accept with probability `p(draft)`
    /// under the request's final distribution (after temperature, top-k, min-p and top-p);
    /// otherwise draw from that distribution with `draft` removed, renormalised (the residual
    /// `max(0, p - q)`). Then `P(x) = p(draft)` for the draft and `(1 - p(draft)) * p(x) / (1 -
    /// p(draft)) = p(x)` for any other token. Greedy requests accept exactly when the draft is
    /// the argmax, and the token is the argmax either way.
    pub fn sample_token_with_draft(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        prompt: &[u32],
        output: &[u32],
        draft: Option<u32>,
        rng: &mut Rng,
    ) -> SampledToken {
        assert!(!logits.is_empty(), "cannot sample from an empty logits row");
        apply_logit_bias(logits, &params.logit_bias);
        self.apply_penalties(logits, params, prompt, output);
        sanitize(logits);

        let token = if params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits, params, rng, draft)
        };

        let (logprob, top_logprobs) = match params.logprobs {
            None => (None, Vec::new()),
            Some(n) => {
                let softmax = LogSoftmax::of(logits);
                let chosen = softmax.logprob(logits[token as usize]);
                (Some(chosen), self.top_logprobs(logits, n, &softmax))
            }
        };
        SampledToken {
            token,
            logprob,
            top_logprobs,
        }
    }

    /// Applies the repetition penalty (over prompt and output), then the frequency and presence
    /// penalties (over the output only), in vLLM's order.
    ///
    /// The cost is O(n log n) in the history length `n`, independent of the vocabulary size:
    /// early in a generation the output is a handful of tokens, and scanning a 128k-entry
    /// histogram for them every step would dominate.
    fn apply_penalties(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        prompt: &[u32],
        output: &[u32],
    ) {
        let penalty = params.repetition_penalty;
        if penalty != 1.0 {
            // Each distinct token is penalised once, however often it appeared.
            self.history.clear();
            self.history.extend_from_slice(prompt);
            self.history.extend_from_slice(output);
            self.history.sort_unstable();
            self.history.dedup();
            for &token in &self.history {
                if let Some(logit) = logits.get_mut(token as usize) {
                    // Dividing a negative logit would make the token *more* likely.
                    *logit = if *logit > 0.0 {
                        *logit / penalty
                    } else {
                        *logit * penalty
                    };
                }
            }
        }

        let (presence, frequency) = (params.presence_penalty, params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            self.history.clear();
            self.history.extend_from_slice(output);
            self.history.sort_unstable();
            // Runs of equal ids: one run per distinct token, its length the token's count.
            for run in self.history.chunk_by(|a, b| a == b) {
                if let Some(logit) = logits.get_mut(run[0] as usize) {
                    *logit -= presence + frequency * run.len() as f32;
                }
            }
        }
    }

    /// Draws a token after temperature, top-k, min-p and top-p. `logits` must be sanitized.
    ///
    /// Top-k and min-p both keep a set of most likely tokens, so they commute; top-p then works
    /// on what they left, renormalised (as vLLM does). The costly part of a step is the `exp` of
    /// every candidate, so the filters that can be decided on logits alone (top-k, min-p) run
    /// before it, and top-p discards hopeless candidates before its selection.
    ///
    /// With a `draft`, the draw first accepts it with its probability, and otherwise draws
    /// from the rest (see [`sample_token_with_draft`](Self::sample_token_with_draft)).
    fn draw(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        rng: &mut Rng,
        draft: Option<u32>,
    ) -> u32 {
        let candidates = &mut self.candidates;
        let k = params.top_k;
        if k > 0 && k < logits.len() {
            select_top_k(logits, k, candidates);
        } else {
            // Tokens at -inf (masked, or NaN) stay in: they weigh 0 below and are never drawn,
            // and a plain copy is ten times faster than a filtered one.
            candidates.clear();
            candidates.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        }

        // Temperature scales the gap to the most likely candidate, whose weight is therefore
        // exactly 1: `exp` cannot overflow, and every weight is in [0, 1].
        let max = candidates
            .iter()
            .map(|&(_, logit)| logit)
            .fold(f32::NEG_INFINITY, f32::max);
        let inv_temperature = params.temperature.recip();
        let scaled_gap = |logit: f32| (logit - max) * inv_temperature;

        // Min-p keeps weights >= min_p (times the top weight, 1), i.e. scaled gaps >=
        // ln(min_p): compared in log space, the tokens it drops never need an `exp`.
        if params.min_p > 0.0 {
            let min_gap = params.min_p.min(1.0).ln();
            candidates.retain(|&(_, logit)| scaled_gap(logit) >= min_gap);
        }

        // Weights in a contiguous buffer, through a polynomial `exp`, summed in one f64 per
        // lane: the compiler vectorizes all of it. Over a whole vocabulary, libm's `expf`, the
        // (token, weight) layout and a serial f64 sum were most of the sampler's time.
        let weights = &mut self.weights;
        weights.resize(candidates.len(), 0.0);
        for (weight, &(_, logit)) in weights.iter_mut().zip(candidates.iter()) {
            // A NaN gap (only with out-of-range parameters: a NaN temperature) weighs nothing.
            *weight = exp(scaled_gap(logit));
        }
        let mut total = sum_f64(weights);

        if params.top_p < 1.0 {
            for (candidate, &weight) in candidates.iter_mut().zip(weights.iter()) {
                candidate.1 = weight;
            }
            let keep = top_p_len(candidates, params.top_p, total);
            candidates.truncate(keep);
            weights.clear();
            weights.extend(candidates.iter().map(|&(_, weight)| weight));
            total = sum_f64(weights);
        }

        if total <= 0.0 {
            // Every weight is 0: only reachable with out-of-range parameters (a NaN temperature).
            return argmax(logits);
        }
        if let Some(draft) = draft {
            if let Some(at) = candidates.iter().position(|&(token, _)| token == draft) {
                let weight = f64::from(weights[at]);
                if rng.next_f64() * total < weight {
                    return draft;
                }
                weights[at] = 0.0;
                total = sum_f64(weights);
                if total <= 0.0 {
                    // Only rounding can leave nothing beside a draft that was not accepted.
                    return draft;
                }
            } else {
                // The draft is outside what the filters keep: rejected without a draw, as its
                // probability is 0 (the generator still advances, so that a seed's stream does
                // not depend on where the draft fell).
                rng.next_f64();
            }
        }
        // Inverse-CDF draw over the survivors, in whatever order they are in: that order is a
        // deterministic function of the logits, so a seed still reproduces its tokens.
        match inverse_cdf(weights, rng.next_f64() * total) {
            Some(index) => candidates[index].0,
            // No positive weight despite a positive total: unreachable but for rounding.
            None => argmax(logits),
        }
    }

    /// The `n` most likely tokens with their logprobs, most likely first.
    fn top_logprobs(&mut self, logits: &[f32], n: usize, softmax: &LogSoftmax) -> Vec<(u32, f32)> {
        if n == 0 {
            return Vec::new();
        }
        let candidates = &mut self.candidates;
        select_top_k(logits, n, candidates);
        candidates.sort_unstable_by(more_likely);
        candidates
            .iter()
            .map(|&(token, logit)| (token, softmax.logprob(logit)))
            .collect()
    }
}

/// Orders candidates most likely first, lower token id first on ties: a total order, so every
/// selection and sort below is deterministic.
fn more_likely(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Fills `out` with the `k` most likely `(token, logit)` pairs of `logits` (all of them if `k`
/// is larger), in no particular order. `logits` must hold no NaN.
///
/// A partial selection (`select_nth_unstable`) over the whole vocabulary is O(V) but makes
/// several passes, swapping as it goes, mostly over tokens nowhere near the top. So a floor is
/// found first, from a strided sample of `64 * k` logits: the k-th largest logit of a sample can
/// only be *lower* than the k-th largest of the whole row, so no top-k token lies below it.
/// Filtering by that floor is one comparison per token and leaves about V / 64 survivors; the
/// exact selection runs on those. Correctness never depends on the sample, only speed does.
fn select_top_k(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    if k == 0 {
        return;
    }
    let sample_len = k.saturating_mul(64);
    if sample_len < logits.len() / 2 {
        let stride = logits.len() / sample_len;
        out.extend((0..sample_len).map(|i| ((i * stride) as u32, logits[i * stride])));
        out.select_nth_unstable_by(k - 1, more_likely);
        let floor = out[k - 1].1;
        out.clear();
        out.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, &logit)| logit >= floor)
                .map(|(i, &logit)| (i as u32, logit)),
        );
    } else {
        out.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
    }
    if k < out.len() {
        out.select_nth_unstable_by(k - 1, more_likely);
        out.truncate(k);
    }
}

fn apply_logit_bias(logits: &mut [f32], bias: &[(u32, f32)]) {
    for &(token, offset) in bias {
        if let Some(logit) = logits.get_mut(token as usize) {
            *logit += offset;
        }
    }
}

/// Makes the row safe for the arithmetic that follows: NaN (a numerical accident, or a bad
/// bias) becomes `-inf`, i.e. impossible; `+inf` becomes the largest finite value so that
/// `logit - max` stays a number; and a row with nothing possible left carries no preference at
/// all, so it becomes uniform rather than an error mid-generation.
fn sanitize(logits: &mut [f32]) {
    let mut any_possible = false;
    for logit in logits.iter_mut() {
        if logit.is_nan() {
            *logit = f32::NEG_INFINITY;
        } else if *logit == f32::INFINITY {
            *logit = f32::MAX;
        }
        any_possible |= *logit > f32::NEG_INFINITY;
    }
    if !any_possible {
        logits.fill(0.0);
    }
}

/// Lanes of the vectorized sums below.
const LANES: usize = 8;

/// Sum of `weights` in f64, one partial sum per lane (vectorizes; the order is fixed, so the
/// result is deterministic).
fn sum_f64(weights: &[f32]) -> f64 {
    let mut partial = [0.0f64; LANES];
    let chunks = weights.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&w| f64::from(w)).sum();
    for chunk in chunks {
        for (partial, &w) in partial.iter_mut().zip(chunk) {
            *partial += f64::from(w);
        }
    }
    partial.iter().sum::<f64>() + tail
}

/// The index where the running sum of `weights` first exceeds `target` (the inverse CDF of a
/// draw), or the last positive weight if rounding leaves the target unreached. Whole chunks are
/// skipped on their (vectorized) sums; only the chunk holding the answer is walked one by one.
fn inverse_cdf(weights: &[f32], target: f64) -> Option<usize> {
    const CHUNK: usize = 256;
    let mut remaining = target;
    let mut last_positive = None;
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        let mass = sum_f64(chunk);
        if mass <= 0.0 {
            continue;
        }
        if remaining >= mass {
            remaining -= mass;
            last_positive = chunk.iter().rposition(|&w| w > 0.0).map(|i| c * CHUNK + i);
            continue;
        }
        for (i, &w) in chunk.iter().enumerate() {
            if w > 0.0 {
                remaining -= f64::from(w);
                last_positive = Some(c * CHUNK + i);
                if remaining < 0.0 {
                    break;
                }
            }
        }
        return last_positive;
    }
    last_positive
}

/// Length of the smallest set of most likely candidates whose weight reaches `top_p` of
/// `total` (the candidates' summed weight), after moving that set to the front of `candidates`
/// in no particular order. At least one candidate is always kept, even for `top_p <= 0`.
///
/// Sorting the vocabulary and summing from the top would be O(V log V) every step. Instead:
///
/// 1. Discard the hopeless. Say the nucleus ends with a token of weight `w`. The nucleus
///    without it weighs less than `top_p * total`, so that token and all less likely ones weigh
///    more than `(1 - top_p) * total`; they are at most V tokens, none heavier than `w`, so
///    `w > (1 - top_p) * total / V`. Lighter tokens can never be in the nucleus, and with a real
///    model's peaked distribution that is nearly all of them. (Half that bound is used, to stay
///    clear of rounding.)
/// 2. Quickselect on *mass*: split the undecided range in half with a partial selection, and
///    keep the half where the cumulative mass crosses the target. Each round costs the size of
///    the range and halves it, so the search is O(V).
fn top_p_len(candidates: &mut Vec<(u32, f32)>, top_p: f32, total: f64) -> usize {
    let top_p = f64::from(top_p).clamp(0.0, 1.0);
    let target = top_p * total;
    let hopeless = 0.5 * (1.0 - top_p) * total / candidates.len() as f64;
    if candidates.len() > 1 && hopeless > 0.0 {
        candidates.retain(|&(_, w)| f64::from(w) > hopeless);
    }
    // Invariant: `candidates[..lo]` are the `lo` most likely candidates and weigh `mass_lo`,
    // which is below the target; the answer lies in `lo + 1..=hi`; `candidates[lo..hi]` are the
    // next most likely ones.
    let (mut lo, mut hi, mut mass_lo) = (0, candidates.len(), 0.0f64);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        candidates[lo..hi].select_nth_unstable_by(mid - lo, more_likely);
        let head: f64 = candidates[lo..mid].iter().map(|&(_, w)| f64::from(w)).sum();
        if mass_lo + head >= target {
            hi = mid;
        } else {
            mass_lo += head;
            lo = mid;
        }
    }
    hi
}

/// The normaliser of a log-softmax, computed once per row: `logprob(l) = l - max - ln(sum)`.
/// Subtracting the max first keeps `exp` in range; the sum is accumulated in `f64` because it
/// adds up tens of thousands of terms.
struct LogSoftmax {
    max: f32,
    log_sum: f32,
}

impl LogSoftmax {
    fn of(logits: &[f32]) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
        Self {
            max,
            log_sum: sum.ln() as f32,
        }
    }

    fn logprob(&self, logit: f32) -> f32 {
        (logit - self.max) - self.log_sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    // Named imports: proptest's prelude has an `Rng` trait that would clash with ours.
    use proptest::prelude::{
        any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest, Just, Strategy,
    };

    /// Logits whose softmax is exactly `probs`.
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    /// How often each token is drawn in `draws` samples of `logits` under `params`.
    fn histogram(logits: &[f32], params: &SamplingParams, draws: usize, seed: u64) -> Vec<usize> {
        let mut sampler = Sampler::new();
        let mut rng = Rng::new(seed);
        let mut seen = vec![0; logits.len()];
        for _ in 0..draws {
            let mut row = logits.to_vec();
            let t = sampler.sample_token(&mut row, params, &[], &[], &mut rng);
            seen[t.token as usize] += 1;
        }
        seen
    }

    fn assert_frequencies(seen: &[usize], expected: &[f64], tolerance: f64) {
        let draws: usize = seen.iter().sum();
        for (i, (&n, &p)) in seen.iter().zip(expected).enumerate() {
            let freq = n as f64 / draws as f64;
            assert!(
                (freq - p).abs() <= tolerance,
                "token {i}: frequency {freq:.3}, expected {p:.3} ({seen:?})"
            );
        }
    }

    /// Verifying a draft: accepted as often as the model would draw it, and on rejection the
    /// token comes from the rest of the distribution, so the draws follow the softmax whatever
    /// the draft; greedy accepts exactly the argmax.
    #[test]
    fn a_verified_draft_keeps_the_distribution() {
        let probs = [0.1, 0.5, 0.3, 0.1];
        let logits = logits_of(&probs);
        let mut sampler = Sampler::new();
        for draft in 0..4u32 {
            let mut rng = Rng::new(11 + u64::from(draft));
            let mut seen = vec![0; 4];
            for _ in 0..20_000 {
                let mut row = logits.clone();
                let params = SamplingParams::default();
                let t = sampler.sample_token_with_draft(
                    &mut row,
                    &params,
                    &[],
                    &[],
                    Some(draft),
                    &mut rng,
                );
                seen[t.token as usize] += 1;
            }
            let expected: Vec<f64> = probs.iter().map(|&p| f64::from(p)).collect();
            assert_frequencies(&seen, &expected, 0.012);
        }
        let greedy = SamplingParams::greedy();
        for (draft, accepted) in [(1, true), (2, false)] {
            let mut row = logits.clone();
            let t = sampler.sample_token_with_draft(
                &mut row,
                &greedy,
                &[],
                &[],
                Some(draft),
                &mut Rng::new(0),
            );
            assert_eq!(t.token, 1);
            assert_eq!(t.token == draft, accepted);
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(
            sample(
                &[0.1, 3.0, 2.0],
                &SamplingParams::greedy(),
                &mut Rng::new(1)
            ),
            1
        );
        let top_k_one = SamplingParams {
            top_k: 1,
            ..SamplingParams::default()
        };
        let seen = histogram(&[0.1, 3.0, 2.9], &top_k_one, 200, 5);
        assert_eq!(seen, vec![0, 200, 0]);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams {
            seed: Some(7),
            top_p: 0.9,
            frequency_penalty: 0.5,
            ..SamplingParams::default()
        };
        // The same seed must replay the same tokens even when another sampler (i.e. another
        // request in the batch) is interleaved with it, sharing the scratch buffers.
        let draw = |seed, interleave: bool| {
            let mut sampler = Sampler::new();
            let mut rng = Rng::new(seed);
            let mut other_rng = Rng::new(99);
            let mut output = Vec::new();
            for _ in 0..30 {
                if interleave {
                    let mut other = vec![1.0; 7];
                    sampler.sample_token(&mut other, &params, &[1], &[2], &mut other_rng);
                }
                let mut row = logits.clone();
                let t = sampler.sample_token(&mut row, &params, &[3, 4], &output, &mut rng);
                output.push(t.token);
            }
            output
        };
        assert_eq!(draw(7, false), draw(7, false));
        assert_eq!(draw(7, false), draw(7, true));
        assert_ne!(draw(7, false), draw(8, false));
    }

    #[test]
    fn plain_sampling_follows_the_softmax() {
        let probs = [0.6, 0.3, 0.1];
        let seen = histogram(&logits_of(&probs), &SamplingParams::default(), 10_000, 1);
        assert_frequencies(&seen, &[0.6, 0.3, 0.1], 0.02);

        // Temperature 0.5 squares the probabilities before renormalising.
        let half = SamplingParams {
            temperature: 0.5,
            ..SamplingParams::default()
        };
        let seen = histogram(&logits_of(&probs), &half, 10_000, 2);
        assert_frequencies(&seen, &[0.36 / 0.46, 0.09 / 0.46, 0.01 / 0.46], 0.02);
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        let logits = [5.0, 4.9, 0.0, -1.0, -2.0];
        let params = SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        };
        let seen = histogram(&logits, &params, 2_000, 3);
        assert_eq!(&seen[2..], &[0, 0, 0]);
        assert!(seen[0] > 800 && seen[1] > 800, "{seen:?}");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // 0.5 alone is short of 0.75; 0.5 + 0.3 reaches it. The two are renormalised to 5/8, 3/8.
        let probs = [0.05, 0.5, 0.1, 0.3, 0.05];
        let params = SamplingParams {
            top_p: 0.75,
            ..SamplingParams::default()
        };
        let seen = histogram(&logits_of(&probs), &params, 10_000, 4);
        assert_frequencies(&seen, &[0.0, 0.625, 0.0, 0.375, 0.0], 0.02);
        assert_eq!(seen[0] + seen[2] + seen[4], 0);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [2.0, 2.0, -5.0];
        let params = SamplingParams {
            min_p: 0.1,
            ..SamplingParams::default()
        };
        let seen = histogram(&logits, &params, 400, 11);
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 100 && seen[1] > 100, "{seen:?}");

        // The floor is 0.3 * 0.4 = 0.12: the 0.1 token goes, the others keep their ratios.
        let params = SamplingParams {
            min_p: 0.3,
            ..SamplingParams::default()
        };
        let seen = histogram(&logits_of(&[0.4, 0.3, 0.2, 0.1]), &params, 10_000, 12);
        assert_frequencies(&seen, &[4.0 / 9.0, 3.0 / 9.0, 2.0 / 9.0, 0.0], 0.02);
        assert_eq!(seen[3], 0);
    }

    /// A vocabulary-sized row: top-k and top-p must agree with the obvious full-sort definition.
    #[test]
    fn filters_match_a_full_sort_on_a_real_sized_vocabulary() {
        let vocab = 49_152;
        let mut rng = Rng::new(21);
        let logits: Vec<f32> = (0..vocab).map(|_| rng.next_f32() * 12.0).collect();
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));

        let top_k = SamplingParams {
            top_k: 40,
            ..SamplingParams::default()
        };
        let top_p = SamplingParams {
            top_p: 0.5,
            ..SamplingParams::default()
        };
        let allowed_k: std::collections::HashSet<u32> = order[..40].iter().copied().collect();
        let max = logits[order[0] as usize];
        let total: f64 = logits.iter().map(|&l| f64::from((l - max).exp())).sum();
        let mut mass = 0.0;
        let nucleus = order
            .iter()
            .take_while(|&&t| {
                let below = mass < 0.5 * total;
                mass += f64::from((logits[t as usize] - max).exp());
                below
            })
            .count();
        let allowed_p: std::collections::HashSet<u32> = order[..nucleus].iter().copied().collect();

        let mut sampler = Sampler::new();
        for i in 0..200 {
            let mut row = logits.clone();
            let t = sampler
                .sample_token(&mut row, &top_k, &[], &[], &mut rng)
                .token;
            assert!(allowed_k.contains(&t), "draw {i}: {t} outside the top 40");
            let mut row = logits.clone();
            let t = sampler
                .sample_token(&mut row, &top_p, &[], &[], &mut rng)
                .token;
            assert!(allowed_p.contains(&t), "draw {i}: {t} outside the nucleus");
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut row = vec![2.0, -2.0, 1.0, 0.5];
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        // Token 0 is in the prompt, token 1 in the output three times: each is penalised once.
        let t = sample_token(&mut row, &params, &[0, 9_999], &[1, 1, 1], &mut Rng::new(0));
        assert_eq!(row, vec![1.0, -4.0, 1.0, 0.5]);
        // 0 and 2 now tie at 1.0; greedy takes the first.
        assert_eq!(t.token, 0);

        let mut row = vec![2.0, -2.0, 1.5, 0.5];
        let t = sample_token(&mut row, &params, &[0], &[], &mut Rng::new(0));
        assert_eq!(
            t.token, 2,
            "the penalty moves greedy off the repeated token"
        );
    }

    #[test]
    fn presence_and_frequency_penalties_count_output_tokens_only() {
        let mut row = vec![1.0; 5];
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        // Token 3 is only in the prompt: untouched. Token 1 was output twice, token 2 once.
        let t = sample_token(&mut row, &params, &[3], &[1, 2, 1, 77], &mut Rng::new(0));
        assert_eq!(row, vec![1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0, 1.0]);
        assert_eq!(t.token, 0);

        // A negative presence penalty encourages the tokens already used.
        let mut row = vec![1.0; 5];
        let params = SamplingParams {
            presence_penalty: -1.0,
            ..SamplingParams::greedy()
        };
        let t = sample_token(&mut row, &params, &[], &[4], &mut Rng::new(0));
        assert_eq!(t.token, 4);
    }

    #[test]
    fn logit_bias_can_force_or_ban_a_token() {
        let logits = [3.0, 2.0, 1.0, 0.0];
        let forced = SamplingParams {
            // An id outside the vocabulary is ignored.
            logit_bias: vec![(3, 100.0), (1_000_000, 5.0)],
            ..SamplingParams::default()
        };
        assert_eq!(histogram(&logits, &forced, 1_000, 6), vec![0, 0, 0, 1_000]);

        let banned = SamplingParams {
            logit_bias: vec![(0, -100.0)],
            ..SamplingParams::greedy()
        };
        let mut row = logits.to_vec();
        let t = sample_token(&mut row, &banned, &[], &[], &mut Rng::new(0));
        assert_eq!(t.token, 1);
    }

    #[test]
    fn logprobs_are_a_log_softmax_of_the_processed_logits() {
        let logits = [1.0, 3.0, -2.0, 0.5, 3.0, -1.0];
        let params = SamplingParams {
            logprobs: Some(6),
            ..SamplingParams::greedy()
        };
        let mut row = logits.to_vec();
        let t = sample_token(&mut row, &params, &[], &[], &mut Rng::new(0));
        let total: f32 = t.top_logprobs.iter().map(|&(_, lp)| lp.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "probabilities sum to {total}");
        let log_z = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
        for &(token, lp) in &t.top_logprobs {
            assert!((lp - (logits[token as usize] - log_z)).abs() < 1e-5);
        }
        // Sorted, ties by id, and the greedy choice (the first maximum) comes first.
        let order: Vec<u32> = t.top_logprobs.iter().map(|&(id, _)| id).collect();
        assert_eq!(order, vec![1, 4, 0, 3, 5, 2]);
        assert_eq!(t.token, 1);
        assert_eq!(t.logprob, Some(t.top_logprobs[0].1));

        // Some(0): the chosen token's logprob only. None: nothing.
        let only_chosen = SamplingParams {
            logprobs: Some(0),
            ..SamplingParams::greedy()
        };
        let t = sample_token(
            &mut logits.to_vec(),
            &only_chosen,
            &[],
            &[],
            &mut Rng::new(0),
        );
        assert!(t.logprob.is_some() && t.top_logprobs.is_empty());
        let t = sample_token(
            &mut logits.to_vec(),
            &SamplingParams::greedy(),
            &[],
            &[],
            &mut Rng::new(0),
        );
        assert!(t.logprob.is_none() && t.top_logprobs.is_empty());
    }

    #[test]
    fn logprobs_see_bias_and_penalties_but_not_temperature_or_truncation() {
        let logits = [2.0, 1.0, 0.0];
        let base = SamplingParams {
            logprobs: Some(3),
            logit_bias: vec![(2, 1.0)],
            frequency_penalty: 1.0,
            ..SamplingParams::default()
        };
        // Processed logits: [2 - 1, 1, 0 + 1] = [1, 1, 1] (token 0 was output once).
        let reported = |params: &SamplingParams| {
            let mut row = logits.to_vec();
            sample_token(&mut row, params, &[], &[0], &mut Rng::new(3)).top_logprobs
        };
        let uniform = -(3.0f32).ln();
        for &(_, lp) in &reported(&base) {
            assert!((lp - uniform).abs() < 1e-6);
        }
        let narrowed = SamplingParams {
            temperature: 0.3,
            top_k: 1,
            top_p: 0.2,
            ..base.clone()
        };
        assert_eq!(reported(&base), reported(&narrowed));
    }

    #[test]
    fn the_chosen_token_is_in_the_top_list_when_it_is_the_argmax() {
        let mut rng = Rng::new(13);
        let params = SamplingParams {
            logprobs: Some(3),
            temperature: 0.7,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new();
        for _ in 0..500 {
            let logits: Vec<f32> = (0..50).map(|_| rng.next_f32() * 4.0).collect();
            let t = sampler.sample_token(&mut logits.clone(), &params, &[], &[], &mut rng);
            let top = &t.top_logprobs;
            assert_eq!(top.len(), 3);
            assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
            if t.token == argmax(&logits) {
                assert_eq!(top[0], (t.token, t.logprob.unwrap()));
            }
        }
    }

    #[test]
    fn nan_counts_as_impossible_and_a_hopeless_row_as_uniform() {
        let nan = f32::NAN;
        let logits = [nan, 1.0, nan, 0.5];
        let greedy = SamplingParams::greedy();
        assert_eq!(sample(&logits, &greedy, &mut Rng::new(0)), 1);
        let seen = histogram(&logits, &SamplingParams::default(), 1_000, 8);
        assert_eq!(seen[0] + seen[2], 0);

        let hopeless = [f32::NEG_INFINITY, nan, f32::NEG_INFINITY];
        let params = SamplingParams {
            logprobs: Some(3),
            ..SamplingParams::default()
        };
        let t = sample_token(&mut hopeless.to_vec(), &params, &[], &[], &mut Rng::new(0));
        assert!(t.token < 3);
        assert!((t.logprob.unwrap() + (3.0f32).ln()).abs() < 1e-6);
    }

    #[test]
    fn validate_names_the_field_and_value() {
        assert_eq!(SamplingParams::default().validate(), Ok(()));
        assert_eq!(SamplingParams::greedy().validate(), Ok(()));
        let cases: [(SamplingParams, &str); 9] = [
            (
                SamplingParams {
                    temperature: -0.5,
                    ..Default::default()
                },
                "temperature must be a finite number >= 0, got -0.5",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature must be a finite number >= 0, got NaN",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p must be greater than 0 and at most 1, got 0",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p must be greater than 0 and at most 1, got 1.5",
            ),
            (
                SamplingParams {
                    min_p: -0.1,
                    ..Default::default()
                },
                "min_p must be between 0 and 1, got -0.1",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty must be a finite number > 0, got 0",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..Default::default()
                },
                "presence_penalty must be between -2 and 2, got 2.5",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..Default::default()
                },
                "frequency_penalty must be between -2 and 2, got -3",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(5, 0.0), (7, 101.0)],
                    ..Default::default()
                },
                "logit_bias for token 7 must be between -100 and 100, got 101",
            ),
        ];
        for (params, message) in cases {
            assert_eq!(params.validate(), Err(message.to_string()));
        }
    }

    /// A logit as a model might produce it, with the accidents a sampler must survive.
    fn any_logit() -> impl Strategy<Value = f32> {
        prop_oneof![
            6 => -30.0f32..30.0,
            1 => Just(0.0f32),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NAN),
            1 => prop_oneof![Just(f32::MAX), Just(-f32::MAX), Just(1e30f32)],
        ]
    }

    /// Parameters anywhere inside `validate()`'s ranges, including their edges.
    fn valid_params() -> impl Strategy<Value = SamplingParams> {
        let temperature = prop_oneof![Just(0.0f32), Just(1e-6f32), 0.0f32..5.0, Just(1e6f32)];
        let top_p = prop_oneof![Just(1.0f32), Just(f32::MIN_POSITIVE), 0.0001f32..=1.0];
        let min_p = prop_oneof![Just(0.0f32), Just(1.0f32), 0.0f32..=1.0];
        let repetition = prop_oneof![Just(1.0f32), 0.01f32..5.0];
        let bias = prop::collection::vec((0u32..80, -100.0f32..=100.0), 0..4);
        (
            (temperature, top_p, 0usize..70, min_p),
            (repetition, -2.0f32..=2.0, -2.0f32..=2.0),
            (bias, prop::option::of(0usize..=MAX_LOGPROBS)),
        )
            .prop_map(
                |(
                    (temperature, top_p, top_k, min_p),
                    (repetition_penalty, presence_penalty, frequency_penalty),
                    (logit_bias, logprobs),
                )| SamplingParams {
                    temperature,
                    top_p,
                    top_k,
                    min_p,
                    repetition_penalty,
                    presence_penalty,
                    frequency_penalty,
                    logit_bias,
                    logprobs,
                    seed: None,
                },
            )
    }

    proptest! {
        #[test]
        fn sampling_never_panics_and_stays_in_the_vocabulary(
            logits in prop_oneof![
                prop::collection::vec(any_logit(), 1..64),
                (1usize..64, any_logit()).prop_map(|(n, l)| vec![l; n]),
            ],
            params in valid_params(),
            prompt in prop::collection::vec(0u32..80, 0..10),
            output in prop::collection::vec(0u32..80, 0..10),
            seed in any::<u64>(),
        ) {
            prop_assert_eq!(params.validate(), Ok(()));
            let vocab = logits.len();
            let mut row = logits.clone();
            let t = sample_token(&mut row, &params, &prompt, &output, &mut Rng::new(seed));
            prop_assert!((t.token as usize) < vocab);
            prop_assert!(row.iter().all(|l| !l.is_nan()));
            match params.logprobs {
                None => prop_assert!(t.logprob.is_none() && t.top_logprobs.is_empty()),
                Some(n) => {
                    let lp = t.logprob.unwrap();
                    prop_assert!(!lp.is_nan() && lp <= 1e-5, "logprob {}", lp);
                    prop_assert_eq!(t.top_logprobs.len(), n.min(vocab));
                    prop_assert!(t.top_logprobs.iter().all(|&(id, lp)| (id as usize) < vocab && !lp.is_nan()));
                    prop_assert!(t.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
                }
            }
        }

        /// The sampled floor never loses a top-k token, ties included (few distinct values).
        #[test]
        fn top_k_selection_matches_sorting(
            logits in prop::collection::vec((-8i8..8).prop_map(f32::from), 1..3_000),
            k in 1usize..12,
        ) {
            let mut expected: Vec<(u32, f32)> =
                logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
            expected.sort_by(more_likely);
            expected.truncate(k);
            let mut selected = Vec::new();
            select_top_k(&logits, k, &mut selected);
            selected.sort_by(more_likely);
            prop_assert_eq!(selected, expected);
        }

        /// The mass quickselect finds exactly the nucleus that sorting and summing would.
        /// Integer weights keep the sums exact, so boundaries compare equal in both.
        #[test]
        fn top_p_selection_matches_sorting(
            weights in prop::collection::vec(0u32..20, 1..200),
            top_p in 0.0f32..=1.0,
        ) {
            let mut candidates: Vec<(u32, f32)> =
                weights.iter().enumerate().map(|(i, &w)| (i as u32, w as f32)).collect();
            let mut sorted = candidates.clone();
            sorted.sort_by(more_likely);
            let target = f64::from(top_p) * weights.iter().map(|&w| f64::from(w)).sum::<f64>();
            let mut mass = 0.0;
            let mut expected = sorted.len();
            for (i, &(_, w)) in sorted.iter().enumerate() {
                mass += f64::from(w);
                if mass >= target {
                    expected = i + 1;
                    break;
                }
            }
            let total = weights.iter().map(|&w| f64::from(w)).sum();
            let keep = top_p_len(&mut candidates, top_p, total);
            prop_assert_eq!(keep, expected);
            let mut kept: Vec<(u32, f32)> = candidates[..keep].to_vec();
            kept.sort_by(more_likely);
            prop_assert_eq!(kept, sorted[..keep].to_vec());
        }
    }
}
