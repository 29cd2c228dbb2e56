//! What is sent to a simulated engine: one [`RequestSpec`] per request (when, how long a
//! prompt, how many tokens out, which shared prefix), made up from an arrival process and a
//! length distribution, or read from a JSON-lines trace.

use minserve_core::sampling::Rng;
use serde::{Deserialize, Serialize};

/// Token ids of simulated prompts stay below this; the simulated executor claims this
/// vocabulary so that the engine's validation accepts them.
pub const SIM_VOCAB: usize = 1 << 24;

/// One request of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RequestSpec {
    /// Seconds from the start of the run (ignored under a closed loop, where a client sends its
    /// next request when the previous one ends).
    pub arrival_s: f64,
    /// Prompt tokens, the shared prefix included.
    pub prompt_len: usize,
    /// Tokens generated (EOS ignored).
    pub output_len: usize,
    /// Requests of one group start with the same `prefix_len` tokens (a system prompt, a
    /// document asked several questions): what prefix caching finds.
    pub prefix_group: Option<u64>,
    pub prefix_len: usize,
}

/// When requests are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Every request at time 0 (`bench throughput`).
    AllAtOnce,
    /// Exponential gaps at a mean rate per second, the first request at 0: the arrival times
    /// `bench serve --request-rate` draws from the same seed.
    Poisson { rate: f64 },
    /// Gamma-distributed gaps at a mean rate, burstier than Poisson when the coefficient of
    /// variation `cv` is above 1 (Poisson is `cv = 1`).
    Gamma { rate: f64, cv: f64 },
}

/// How long prompts and outputs are.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lengths {
    Fixed {
        input: usize,
        output: usize,
    },
    /// Log-normal prompt and output lengths with the shape of chat traffic (ShareGPT-like: a
    /// median prompt of 90 tokens and output of 200, long right tails); an assumption of
    /// shape, not a fit to that data set (see docs/simulator.md).
    ShareGptLike,
}

/// Medians and log-space spreads of [`Lengths::ShareGptLike`], and the clamps that keep a
/// request inside a small model's context.
const CHAT_PROMPT: (f64, f64, usize, usize) = (90.0, 1.1, 4, 4096);
const CHAT_OUTPUT: (f64, f64, usize, usize) = (200.0, 0.9, 1, 2048);

impl Lengths {
    fn draw(&self, rng: &mut Rng) -> (usize, usize) {
        match *self {
            Lengths::Fixed { input, output } => (input, output),
            Lengths::ShareGptLike => {
                let draw = |rng: &mut Rng, (median, sigma, lo, hi): (f64, f64, usize, usize)| {
                    let v = median * (sigma * standard_normal(rng)).exp();
                    (v.round() as usize).clamp(lo, hi)
                };
                (draw(rng, CHAT_PROMPT), draw(rng, CHAT_OUTPUT))
            }
        }
    }
}

/// A standard normal draw (Box-Muller).
fn standard_normal(rng: &mut Rng) -> f64 {
    let u1 = 1.0 - rng.next_f64();
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A Gamma(shape, 1) draw (Marsaglia and Tsang; shapes below 1 boosted by `u^(1/shape)`).
fn gamma(rng: &mut Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = 1.0 - rng.next_f64();
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.next_f64();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// `n` requests of `lengths` at `arrivals`, every one starting with the same `prefix_len`
/// tokens when that is not 0 (like `bench throughput --prefix-len`). Seeded: the same seed
/// gives the same workload.
pub fn synthesize(
    n: usize,
    arrivals: Arrivals,
    lengths: Lengths,
    prefix_len: usize,
    seed: u64,
) -> Vec<RequestSpec> {
    // The stream `bench serve` draws its Poisson gaps from.
    let mut arrival_rng = Rng::new(seed ^ 0xA5A5_A5A5_A5A5_A5A5);
    let mut length_rng = Rng::new(seed.wrapping_add(0x5EED));
    let mut at = 0.0;
    (0..n)
        .map(|i| {
            if i > 0 {
                at += match arrivals {
                    Arrivals::AllAtOnce => 0.0,
                    Arrivals::Poisson { rate } => -(1.0 - arrival_rng.next_f64()).ln() / rate,
                    Arrivals::Gamma { rate, cv } => {
                        let shape = 1.0 / (cv * cv);
                        gamma(&mut arrival_rng, shape) / (shape * rate)
                    }
                };
            }
            let (input, output) = lengths.draw(&mut length_rng);
            RequestSpec {
                arrival_s: at,
                prompt_len: prefix_len + input,
                output_len: output,
                prefix_group: (prefix_len > 0).then_some(0),
                prefix_len,
            }
        })
        .collect()
}

/// A line of a trace that cannot be used; `line` counts from 1.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {message}")]
pub struct TraceError {
    pub line: usize,
    pub message: String,
}

/// Reads a JSON-lines trace: one object per line with `arrival_s` (seconds, not decreasing),
/// `prompt_len` and `output_len` (positive), and optionally `prefix_group` (a whole number)
/// with `prefix_len` (at most `prompt_len`). Blank lines are skipped.
pub fn read_trace(text: &str) -> Result<Vec<RequestSpec>, TraceError> {
    let mut specs: Vec<RequestSpec> = Vec::new();
    let mut previous: Option<(usize, f64)> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let fail = |message: String| TraceError { line, message };
        let value: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| fail(format!("not JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| fail("expected a JSON object".to_string()))?;
        for key in object.keys() {
            if ![
                "arrival_s",
                "prompt_len",
                "output_len",
                "prefix_group",
                "prefix_len",
            ]
            .contains(&key.as_str())
            {
                return Err(fail(format!(
                    "unknown field `{key}` (expected arrival_s, prompt_len, output_len, \
                     prefix_group, prefix_len)"
                )));
            }
        }
        let arrival_s = match object.get("arrival_s").and_then(|v| v.as_f64()) {
            Some(t) if t.is_finite() && t >= 0.0 => t,
            Some(t) => return Err(fail(format!("`arrival_s` is {t}; it must be 0 or more"))),
            None => return Err(fail("`arrival_s` is missing or not a number".to_string())),
        };
        if let Some((previous_line, previous_at)) = previous {
            if arrival_s < previous_at {
                return Err(fail(format!(
                    "`arrival_s` {arrival_s} is before line {previous_line}'s {previous_at}: \
                     a trace must be sorted by arrival time"
                )));
            }
        }
        previous = Some((line, arrival_s));
        let count = |key: &str, minimum: i64| -> Result<Option<usize>, TraceError> {
            match object.get(key) {
                None => Ok(None),
                Some(v) => match v.as_i64() {
                    Some(n) if n >= minimum => Ok(Some(n as usize)),
                    _ => Err(fail(format!(
                        "`{key}` is {v}; it must be a whole number of at least {minimum}"
                    ))),
                },
            }
        };
        let required = |key: &str| -> Result<usize, TraceError> {
            count(key, 1)?.ok_or_else(|| fail(format!("`{key}` is missing")))
        };
        let prompt_len = required("prompt_len")?;
        let output_len = required("output_len")?;
        let prefix_group = match object.get("prefix_group") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                fail(format!(
                    "`prefix_group` is {v}; it must be a whole number of 0 or more"
                ))
            })?),
        };
        let prefix_len = count("prefix_len", 0)?.unwrap_or(0);
        if prefix_len > prompt_len {
            return Err(fail(format!(
                "`prefix_len` {prefix_len} is longer than `prompt_len` {prompt_len}"
            )));
        }
        if prefix_len > 0 && prefix_group.is_none() {
            return Err(fail("`prefix_len` needs a `prefix_group`".to_string()));
        }
        specs.push(RequestSpec {
            arrival_s,
            prompt_len,
            output_len,
            prefix_group,
            prefix_len,
        });
    }
    Ok(specs)
}

/// The tokens of a request's prompt: its group's prefix (the same ids for every request of the
/// group) and then ids no other request has, so that only real shared prefixes hit the cache.
/// Ids stay below [`SIM_VOCAB`].
pub fn prompt_tokens(spec: &RequestSpec, request_index: usize) -> Vec<u32> {
    let vocab = SIM_VOCAB as u64;
    let mut tokens = Vec::with_capacity(spec.prompt_len);
    if let Some(group) = spec.prefix_group {
        let mut rng = Rng::new(Rng::new(group ^ 0x9E37_79B9_7F4A_7C15).next_u64());
        tokens.extend((0..spec.prefix_len).map(|_| (1 + rng.next_u64() % (vocab - 1)) as u32));
    }
    let mut rng = Rng::new(Rng::new(request_index as u64).next_u64() ^ 0x1234_5678);
    tokens
        .extend((tokens.len()..spec.prompt_len).map(|_| (1 + rng.next_u64() % (vocab - 1)) as u32));
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_and_gamma_arrivals_have_their_mean_rate() {
        for arrivals in [
            Arrivals::Poisson { rate: 4.0 },
            Arrivals::Gamma { rate: 4.0, cv: 2.0 },
            Arrivals::Gamma { rate: 4.0, cv: 0.5 },
        ] {
            let specs = synthesize(
                20_000,
                arrivals,
                Lengths::Fixed {
                    input: 8,
                    output: 8,
                },
                0,
                1,
            );
            assert_eq!(specs[0].arrival_s, 0.0);
            assert!(specs.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
            let rate = (specs.len() - 1) as f64 / specs.last().unwrap().arrival_s;
            assert!((rate - 4.0).abs() < 0.2, "{arrivals:?}: {rate}");
        }
        let all = synthesize(
            5,
            Arrivals::AllAtOnce,
            Lengths::Fixed {
                input: 3,
                output: 2,
            },
            4,
            0,
        );
        assert!(all
            .iter()
            .all(|s| s.arrival_s == 0.0 && s.prompt_len == 7 && s.prefix_len == 4));
    }

    #[test]
    fn chat_lengths_have_long_tails_within_their_clamps() {
        let specs = synthesize(5_000, Arrivals::AllAtOnce, Lengths::ShareGptLike, 0, 3);
        let mut prompts: Vec<usize> = specs.iter().map(|s| s.prompt_len).collect();
        prompts.sort();
        let median = prompts[prompts.len() / 2];
        let mean = prompts.iter().sum::<usize>() as f64 / prompts.len() as f64;
        assert!((80..100).contains(&median), "{median}");
        assert!(
            mean > median as f64 * 1.4,
            "a right tail: mean {mean}, median {median}"
        );
        assert!(specs.iter().all(|s| (4..=4096).contains(&s.prompt_len)));
        assert!(specs.iter().all(|s| (1..=2048).contains(&s.output_len)));
    }

    #[test]
    fn a_trace_is_read_and_its_mistakes_are_named_by_line() {
        let ok = "{\"arrival_s\": 0, \"prompt_len\": 10, \"output_len\": 5}\n\n\
                  {\"arrival_s\": 0.5, \"prompt_len\": 20, \"output_len\": 1, \"prefix_group\": 7, \"prefix_len\": 16}\n";
        let specs = read_trace(ok).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].prefix_group, Some(7));
        let first = "{\"arrival_s\": 1, \"prompt_len\": 10, \"output_len\": 5}\n";
        let cases = [
            ("{\"arrival_s\": 1, \"prompt_len\": -3, \"output_len\": 5}", "line 2: `prompt_len` is -3"),
            ("{\"arrival_s\": 0.5, \"prompt_len\": 3, \"output_len\": 5}", "line 2: `arrival_s` 0.5 is before line 1's 1"),
            ("{\"arrival_s\": 2, \"prompt_len\": 3}", "line 2: `output_len` is missing"),
            ("{\"arrival_s\": 2, \"prompt_len\": 3, \"output_len\": 0}", "line 2: `output_len` is 0"),
            ("{\"arrival_s\": 2, \"prompt_len\": 3, \"output_len\": 2, \"prefix_len\": 4, \"prefix_group\": 1}", "line 2: `prefix_len` 4 is longer"),
            ("{\"arrival_s\": 2, \"prompt_len\": 3, \"output_len\": 2, \"prefix_len\": 2}", "line 2: `prefix_len` needs"),
            ("{\"arrival\": 2}", "line 2: unknown field `arrival`"),
            ("[1, 2]", "line 2: expected a JSON object"),
            ("{oops", "line 2: not JSON"),
            ("{\"arrival_s\": -1, \"prompt_len\": 3, \"output_len\": 2}", "line 2: `arrival_s` is -1"),
        ];
        for (line, expected) in cases {
            let e = read_trace(&format!("{first}{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(expected), "{line}: {e}");
        }
    }

    #[test]
    fn prompts_share_exactly_their_group_prefix() {
        let spec = |group| RequestSpec {
            arrival_s: 0.0,
            prompt_len: 40,
            output_len: 1,
            prefix_group: Some(group),
            prefix_len: 32,
        };
        let (a, b, c) = (
            prompt_tokens(&spec(1), 0),
            prompt_tokens(&spec(1), 1),
            prompt_tokens(&spec(2), 2),
        );
        assert_eq!(a.len(), 40);
        assert_eq!(a[..32], b[..32]);
        assert_ne!(a[32..], b[32..]);
        assert_ne!(a[..32], c[..32]);
    }
}
