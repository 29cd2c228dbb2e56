//! What one engine step costs, without running a model: the features of a [`StepBatch`] that
//! drive its time ([`StepFeatures`]) and the cost models that turn them into seconds
//! ([`CostModel`]): a linear one fitted from measurements (`minserve simulate calibrate`,
//! [`crate::fit`]) or a roofline of a device nobody here has.

use minserve_core::StepBatch;
use serde::{Deserialize, Serialize};

/// What a step's time depends on, read off the batch the scheduler built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepFeatures {
    /// New tokens of sequences computing more than one token this step (prompts, prompt
    /// chunks): they go through the matmuls together.
    pub prefill_tokens: usize,
    /// Sequences computing one token: decoding (or a one-token prompt remainder, which costs
    /// the same).
    pub decode_tokens: usize,
    /// Keys attended, summed over every new token (a token at position `p` attends to `p + 1`):
    /// the attention arithmetic, quadratic in a prompt chunk, linear in a decode's context.
    pub attended_keys: usize,
    /// Tokens in cache over the step's sequences: the KV bytes a kernel reads once per
    /// sequence per step.
    pub context_tokens: usize,
    /// Sequences in the batch.
    pub sequences: usize,
    /// Sequences that want logits: lm_head rows and sampling.
    pub sampled_rows: usize,
}

impl StepFeatures {
    pub fn of(batch: &StepBatch) -> Self {
        let mut f = Self {
            sequences: batch.sequences.len(),
            sampled_rows: batch.num_sampled(),
            ..Self::default()
        };
        for seq in &batch.sequences {
            let n = seq.num_new_tokens;
            if n == 1 {
                f.decode_tokens += 1;
            } else {
                f.prefill_tokens += n;
            }
            // Positions start..start + n attend to start + 1 ..= start + n keys.
            f.attended_keys += n * seq.start_position() + n * (n + 1) / 2;
            f.context_tokens += seq.context_len;
        }
        f
    }

    pub fn tokens(&self) -> usize {
        self.prefill_tokens + self.decode_tokens
    }

    /// The value of one feature; [`Feature::Constant`] is 1.
    pub fn get(&self, feature: Feature) -> f64 {
        (match feature {
            Feature::Constant => 1,
            Feature::PrefillTokens => self.prefill_tokens,
            Feature::DecodeTokens => self.decode_tokens,
            Feature::AttendedKeys => self.attended_keys,
            Feature::ContextTokens => self.context_tokens,
            Feature::Sequences => self.sequences,
            Feature::SampledRows => self.sampled_rows,
        }) as f64
    }
}

/// One term of a linear cost model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Constant,
    PrefillTokens,
    DecodeTokens,
    AttendedKeys,
    ContextTokens,
    Sequences,
    SampledRows,
}

impl Feature {
    pub const ALL: [Feature; 7] = [
        Feature::Constant,
        Feature::PrefillTokens,
        Feature::DecodeTokens,
        Feature::AttendedKeys,
        Feature::ContextTokens,
        Feature::Sequences,
        Feature::SampledRows,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Constant => "constant",
            Feature::PrefillTokens => "prefill_tokens",
            Feature::DecodeTokens => "decode_tokens",
            Feature::AttendedKeys => "attended_keys",
            Feature::ContextTokens => "context_tokens",
            Feature::Sequences => "sequences",
            Feature::SampledRows => "sampled_rows",
        }
    }
}

/// Seconds per unit of each feature; a step costs their weighted sum. Fitted by
/// [`crate::fit::fit_linear`]; features a fit left out stay 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearCost {
    #[serde(default)]
    pub constant: f64,
    #[serde(default)]
    pub prefill_tokens: f64,
    #[serde(default)]
    pub decode_tokens: f64,
    #[serde(default)]
    pub attended_keys: f64,
    #[serde(default)]
    pub context_tokens: f64,
    #[serde(default)]
    pub sequences: f64,
    #[serde(default)]
    pub sampled_rows: f64,
}

impl LinearCost {
    pub fn coefficient(&self, feature: Feature) -> f64 {
        let mut copy = *self;
        *copy.coefficient_mut(feature)
    }

    pub fn coefficient_mut(&mut self, feature: Feature) -> &mut f64 {
        match feature {
            Feature::Constant => &mut self.constant,
            Feature::PrefillTokens => &mut self.prefill_tokens,
            Feature::DecodeTokens => &mut self.decode_tokens,
            Feature::AttendedKeys => &mut self.attended_keys,
            Feature::ContextTokens => &mut self.context_tokens,
            Feature::Sequences => &mut self.sequences,
            Feature::SampledRows => &mut self.sampled_rows,
        }
    }

    pub fn step_seconds(&self, f: &StepFeatures) -> f64 {
        Feature::ALL
            .iter()
            .map(|&feature| self.coefficient(feature) * f.get(feature))
            .sum()
    }
}

/// A step on a device known only by its datasheet: the slower of streaming the bytes it reads
/// (weights once, each sequence's KV cache once) and doing its arithmetic, each at a fraction
/// of the peak, plus fixed host time per step and per sampled row (scheduling, sampling,
/// launching kernels).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RooflineCost {
    /// Weights (count): 2 flops per weight per token.
    pub parameters: f64,
    /// Bytes of weights read per step.
    pub weight_bytes: f64,
    /// K and V bytes per cached token over all layers.
    pub kv_bytes_per_token: f64,
    /// Flops per attended key over all layers (QK^T and PV: 4 x layers x query heads x head
    /// size).
    pub attention_flops_per_key: f64,
    /// Bytes per second from device memory at peak.
    pub memory_bandwidth: f64,
    /// Flops per second at peak in the weights' number format.
    pub peak_flops: f64,
    /// Fractions of the peaks a step reaches.
    pub bandwidth_efficiency: f64,
    pub compute_efficiency: f64,
    /// Seconds per step outside the device's arithmetic.
    pub step_overhead_s: f64,
    /// Seconds per sampled row on the host.
    pub per_sampled_row_s: f64,
}

impl RooflineCost {
    pub fn step_seconds(&self, f: &StepFeatures) -> f64 {
        let bytes = self.weight_bytes + self.kv_bytes_per_token * f.context_tokens as f64;
        let flops = 2.0 * self.parameters * f.tokens() as f64
            + self.attention_flops_per_key * f.attended_keys as f64;
        let memory_s = bytes / (self.memory_bandwidth * self.bandwidth_efficiency);
        let compute_s = flops / (self.peak_flops * self.compute_efficiency);
        self.step_overhead_s
            + self.per_sampled_row_s * f.sampled_rows as f64
            + memory_s.max(compute_s)
    }

    fn check(&self) -> Result<(), String> {
        let positive = [
            ("parameters", self.parameters),
            ("weight_bytes", self.weight_bytes),
            ("kv_bytes_per_token", self.kv_bytes_per_token),
            ("memory_bandwidth", self.memory_bandwidth),
            ("peak_flops", self.peak_flops),
        ];
        for (name, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!(
                    "`cost.{name}` is {value}; it must be a positive number"
                ));
            }
        }
        for (name, value) in [
            ("bandwidth_efficiency", self.bandwidth_efficiency),
            ("compute_efficiency", self.compute_efficiency),
        ] {
            if !(value > 0.0 && value <= 1.0) {
                return Err(format!("`cost.{name}` is {value}; it must be in (0, 1]"));
            }
        }
        for (name, value) in [
            ("attention_flops_per_key", self.attention_flops_per_key),
            ("step_overhead_s", self.step_overhead_s),
            ("per_sampled_row_s", self.per_sampled_row_s),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(format!("`cost.{name}` is {value}; it must be 0 or more"));
            }
        }
        Ok(())
    }
}

/// Seconds per step as a function of [`StepFeatures`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CostModel {
    Linear(LinearCost),
    Roofline(RooflineCost),
}

impl CostModel {
    pub fn step_seconds(&self, f: &StepFeatures) -> f64 {
        match self {
            CostModel::Linear(c) => c.step_seconds(f),
            CostModel::Roofline(c) => c.step_seconds(f),
        }
    }

    fn check(&self) -> Result<(), String> {
        match self {
            CostModel::Linear(c) => {
                for feature in Feature::ALL {
                    let value = c.coefficient(feature);
                    if !value.is_finite() {
                        return Err(format!("`cost.{}` is {value}", feature.name()));
                    }
                }
                // A negative coefficient may still be fine where it applies; a step that costs
                // nothing or less is not.
                let empty = c.step_seconds(&StepFeatures {
                    decode_tokens: 1,
                    sequences: 1,
                    sampled_rows: 1,
                    context_tokens: 1,
                    attended_keys: 1,
                    ..StepFeatures::default()
                });
                if empty <= 0.0 {
                    return Err(format!(
                        "a one-token decode step costs {empty} s under `cost`; it must take time"
                    ));
                }
                Ok(())
            }
            CostModel::Roofline(c) => c.check(),
        }
    }
}

/// A cost model with the KV cache it comes with: what `--preset` names and `--cost-model`
/// reads (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostProfile {
    pub name: String,
    /// The model and device, and where the figures come from.
    pub description: String,
    /// K and V bytes per token over all layers: turns `--kv-cache-mib` into blocks.
    pub kv_bytes_per_token: f64,
    /// The KV cache the real engine gets by default on this device.
    pub default_kv_cache_bytes: f64,
    /// The model's context length.
    pub max_model_len: usize,
    pub cost: CostModel,
    /// How the profile was made: machine, commit, command, fit quality. Kept, not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{source_name}: {message}")]
    Invalid {
        source_name: String,
        message: String,
    },
    #[error("unknown preset `{0}` (known: {known})", known = PRESETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))]
    UnknownPreset(String),
}

/// Profiles committed with the code (`crates/sim/presets/`); how each was made is in its
/// `provenance` and in docs/simulator.md.
pub const PRESETS: [(&str, &str); 5] = [
    ("default-cpu", include_str!("../presets/default-cpu.json")),
    (
        "llama-1b-h100",
        include_str!("../presets/llama-1b-h100.json"),
    ),
    (
        "llama-1b-h200",
        include_str!("../presets/llama-1b-h200.json"),
    ),
    (
        "llama-8b-h100",
        include_str!("../presets/llama-8b-h100.json"),
    ),
    (
        "llama-8b-h200",
        include_str!("../presets/llama-8b-h200.json"),
    ),
];

impl CostProfile {
    pub fn preset(name: &str) -> Result<Self, ProfileError> {
        let (_, text) = PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| ProfileError::UnknownPreset(name.to_string()))?;
        Self::parse(text, &format!("preset {name}"))
    }

    /// Reads a profile from JSON; `source_name` (a file name) prefixes any error, which names
    /// the field (and serde's line and column) at fault.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, ProfileError> {
        let invalid = |message: String| ProfileError::Invalid {
            source_name: source_name.to_string(),
            message,
        };
        let profile: Self = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for (name, value) in [
            ("kv_bytes_per_token", profile.kv_bytes_per_token),
            ("default_kv_cache_bytes", profile.default_kv_cache_bytes),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(invalid(format!("`{name}` is {value}; it must be positive")));
            }
        }
        if profile.max_model_len == 0 {
            return Err(invalid("`max_model_len` must be positive".to_string()));
        }
        profile.cost.check().map_err(invalid)?;
        Ok(profile)
    }

    /// Blocks of `block_size` tokens in a cache of `bytes` (the default one when `None`).
    pub fn num_blocks(&self, block_size: usize, bytes: Option<f64>) -> usize {
        let bytes = bytes.unwrap_or(self.default_kv_cache_bytes);
        (bytes / (self.kv_bytes_per_token * block_size as f64)) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_count_prefill_decode_and_attention() {
        let mut batch = StepBatch::new();
        // A 4-token prompt chunk after 2 cached tokens: positions 2..6 attend to 3+4+5+6 keys.
        batch.push_sequence(&[1, 2, 3, 4], 2, &[0, 1], 4, false);
        // One decode token at position 9: 10 keys.
        batch.push_sequence(&[5], 9, &[2, 3, 4], 4, true);
        let f = StepFeatures::of(&batch);
        assert_eq!(
            f,
            StepFeatures {
                prefill_tokens: 4,
                decode_tokens: 1,
                attended_keys: 18 + 10,
                context_tokens: 6 + 10,
                sequences: 2,
                sampled_rows: 1,
            }
        );
    }

    #[test]
    fn every_preset_parses_and_costs_a_step() {
        for (name, _) in PRESETS {
            let profile = CostProfile::preset(name).unwrap();
            let decode = StepFeatures {
                decode_tokens: 1,
                attended_keys: 100,
                context_tokens: 100,
                sequences: 1,
                sampled_rows: 1,
                ..StepFeatures::default()
            };
            let t = profile.cost.step_seconds(&decode);
            assert!(t > 0.0 && t < 1.0, "{name}: {t}");
            assert!(profile.num_blocks(16, None) > 100, "{name}");
        }
        assert!(matches!(
            CostProfile::preset("nope"),
            Err(ProfileError::UnknownPreset(_))
        ));
    }

    #[test]
    fn a_file_of_the_wrong_shape_names_the_field() {
        let base = r#"{"name": "x", "description": "", "kv_bytes_per_token": 100,
            "default_kv_cache_bytes": 1e6, "max_model_len": 100, "cost": COST}"#;
        let error = |cost: &str| {
            CostProfile::parse(&base.replace("COST", cost), "x.json")
                .unwrap_err()
                .to_string()
        };
        let e = error(r#"{"kind": "linear", "constant": 0.01, "tokens": 0.001}"#);
        assert!(
            e.starts_with("x.json: ") && e.contains("unknown field `tokens`"),
            "{e}"
        );
        let e = error(r#"{"kind": "cubic"}"#);
        assert!(e.contains("unknown variant `cubic`"), "{e}");
        let e = error(r#"{"kind": "linear", "constant": -1}"#);
        assert!(e.contains("must take time"), "{e}");
        let e = error(r#"{"kind": "linear", "constant": "fast"}"#);
        assert!(e.contains("invalid type") && e.contains("line 2"), "{e}");
        let e = error(r#"{"kind": "roofline", "parameters": 1e9}"#);
        assert!(e.contains("missing field `weight_bytes`"), "{e}");
        let missing = r#"{"name": "x", "description": "", "kv_bytes_per_token": 100,
            "max_model_len": 100, "cost": {"kind": "linear", "constant": 0.01}}"#;
        let e = CostProfile::parse(missing, "y.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `default_kv_cache_bytes`"), "{e}");
        let zero = base
            .replace("COST", r#"{"kind": "linear", "constant": 0.01}"#)
            .replace("100,\n", "0,\n");
        let e = CostProfile::parse(&zero, "z.json").unwrap_err().to_string();
        assert!(e.contains("kv_bytes_per_token"), "{e}");
    }
}
