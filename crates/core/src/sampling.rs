//! Turning one row of logits into the next token.
//!
//! Every request carries its own random stream seeded from its own seed, so the token a request
//! draws never depends on which other requests share its batch.

/// How a request wants its tokens chosen. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one.
    pub min_p: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
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

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
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
}

/// Index of the largest value; the first one on ties, so that greedy decoding is reproducible.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws a token from `logits` under `params`.
pub fn sample(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    // Candidates sorted by logit, most likely first; top-k is applied before the softmax so that
    // the sort is partial when k is small.
    let mut candidates: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l / params.temperature))
        .collect();
    let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if params.top_k > 0 && params.top_k < candidates.len() {
        candidates.select_nth_unstable_by(params.top_k - 1, by_logit_desc);
        candidates.truncate(params.top_k);
    }
    candidates.sort_unstable_by(by_logit_desc);

    let max = candidates[0].1;
    let mut total = 0.0f32;
    for c in candidates.iter_mut() {
        c.1 = (c.1 - max).exp();
        total += c.1;
    }
    let mut keep = candidates.len();
    if params.min_p > 0.0 {
        let floor = params.min_p * candidates[0].1;
        keep = candidates
            .iter()
            .take_while(|c| c.1 >= floor)
            .count()
            .max(1);
    }
    if params.top_p < 1.0 {
        let mut mass = 0.0;
        for (i, c) in candidates[..keep].iter().enumerate() {
            mass += c.1 / total;
            if mass >= params.top_p {
                keep = i + 1;
                break;
            }
        }
    }
    let kept = &candidates[..keep];
    let kept_total: f32 = kept.iter().map(|c| c.1).sum();
    let mut threshold = rng.next_f32() * kept_total;
    for c in kept {
        threshold -= c.1;
        if threshold < 0.0 {
            return c.0;
        }
    }
    kept[kept.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| sample(&logits, &params, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.9, 0.0, -1.0, -2.0];
        let mut rng = Rng::new(3);
        let top_k = SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        };
        let top_p = SamplingParams {
            top_p: 0.5,
            ..SamplingParams::default()
        };
        for _ in 0..200 {
            assert!(sample(&logits, &top_k, &mut rng) < 2);
            assert_eq!(sample(&logits, &top_p, &mut rng), 0);
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [2.0, 2.0, -5.0];
        let params = SamplingParams {
            min_p: 0.1,
            ..SamplingParams::default()
        };
        let mut rng = Rng::new(11);
        let mut seen = [0; 3];
        for _ in 0..400 {
            seen[sample(&logits, &params, &mut rng) as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 100 && seen[1] > 100, "{seen:?}");
    }
}
