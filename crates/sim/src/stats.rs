//! The statistics of `minserve bench serve` and `minserve simulate`: percentiles as numpy
//! computes them (vLLM's benchmark_serving reports them so, and figures are compared against it)
//! and goodput under a service-level objective. One module for both, so that a simulated figure
//! and a measured one are the same computation.

use serde::Serialize;

/// The `p`-th percentile (0..=100) of ascending `sorted` values, interpolating linearly between
/// the two nearest ranks (numpy's default). `None` for no values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = p.clamp(0.0, 100.0) / 100.0 * last as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

/// Mean and percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Summary {
    /// `None` for no values (every request failed, or none produced two tokens).
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Self {
            mean: sorted.iter().sum::<f64>() / sorted.len().max(1) as f64,
            p50: percentile(&sorted, 50.0)?,
            p90: percentile(&sorted, 90.0)?,
            p99: percentile(&sorted, 99.0)?,
        })
    }
}

/// A service-level objective: the most a request may take to its first token, and per output
/// token after it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Slo {
    pub ttft_ms: f64,
    pub tpot_ms: f64,
}

impl std::str::FromStr for Slo {
    type Err = String;

    /// `TTFT_MS,TPOT_MS`, e.g. `1500,50`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |v: &str| -> Result<f64, String> {
            match v.trim().parse::<f64>() {
                Ok(ms) if ms.is_finite() && ms > 0.0 => Ok(ms),
                _ => Err(format!("`{v}` is not a positive number of milliseconds")),
            }
        };
        let (ttft, tpot) = s
            .split_once(',')
            .ok_or_else(|| format!("expected TTFT_MS,TPOT_MS, got `{s}`"))?;
        Ok(Self {
            ttft_ms: parse(ttft)?,
            tpot_ms: parse(tpot)?,
        })
    }
}

impl Slo {
    /// Whether a successful request met the objective. A request with a single output token
    /// has no time per output token, so only its first token counts (as in vLLM).
    pub fn is_met(&self, ttft_ms: f64, tpot_ms: Option<f64>) -> bool {
        ttft_ms <= self.ttft_ms && tpot_ms.is_none_or(|t| t <= self.tpot_ms)
    }
}

/// Time per output token after the first: the decode speed one client sees. `None` below two
/// tokens.
pub fn tpot_ms(latency_ms: f64, ttft_ms: f64, output_tokens: usize) -> Option<f64> {
    (output_tokens > 1).then(|| (latency_ms - ttft_ms) / (output_tokens - 1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        // numpy.percentile([1, 2, 3, 4, 10], [50, 90, 99]) = [3.0, 7.6, 9.76]
        let values = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!(percentile(&values, 50.0), Some(3.0));
        assert!((percentile(&values, 90.0).unwrap() - 7.6).abs() < 1e-12);
        assert!((percentile(&values, 99.0).unwrap() - 9.76).abs() < 1e-12);
        assert_eq!(percentile(&values, 0.0), Some(1.0));
        assert_eq!(percentile(&values, 100.0), Some(10.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_its_input_and_orders_its_percentiles() {
        let s = Summary::of(&[10.0, 4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.mean, 4.0);
        assert_eq!(s.p50, 3.0);
        assert!(s.p50 <= s.p90 && s.p90 <= s.p99 && s.p99 <= 10.0);
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn goodput_counts_requests_within_both_limits() {
        let slo: Slo = "100,20".parse().unwrap();
        assert_eq!(
            slo,
            Slo {
                ttft_ms: 100.0,
                tpot_ms: 20.0
            }
        );
        // 100 ms to the first of 11 tokens, then 10 more in 150 ms: 15 ms each.
        let tpot = tpot_ms(250.0, 100.0, 11);
        assert_eq!(tpot, Some(15.0));
        assert!(slo.is_met(100.0, tpot));
        assert!(!slo.is_met(100.1, tpot));
        assert!(!slo.is_met(50.0, Some(20.5)));
        assert_eq!(tpot_ms(80.0, 80.0, 1), None);
        assert!(slo.is_met(80.0, None));
        for bad in ["100", "100,-1", "x,2", "100,inf"] {
            assert!(bad.parse::<Slo>().is_err(), "{bad}");
        }
    }
}
