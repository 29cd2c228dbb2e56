//! RoPE frequency scaling: our frequencies against the published formulas (Hugging Face
//! `transformers`' `modeling_rope_utils`), written again here in f64 apart from `rope.rs`;
//! reading it from config.json and GGUF; refusing the types that are not implemented.

mod common;

use std::f64::consts::PI;

use common::llama3_reference_frequencies;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use minserve_model::config::RopeScaling;
use minserve_model::rope::{inverse_frequencies, llama3_parameters};
use minserve_model::ModelConfig;

/// `_compute_yarn_parameters` (with `truncate`), frequencies only.
fn yarn_reference(
    head_dim: usize,
    theta: f64,
    factor: f64,
    original: f64,
    beta_fast: f64,
    beta_slow: f64,
) -> Vec<f64> {
    let dim = head_dim as f64;
    let correction_dim =
        |rotations: f64| dim * (original / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln());
    let low = correction_dim(beta_fast).floor().max(0.0);
    let mut high = correction_dim(beta_slow).ceil().min(dim - 1.0);
    if low == high {
        high += 0.001;
    }
    (0..head_dim / 2)
        .map(|i| {
            let pos_freq = theta.powf((2 * i) as f64 / dim);
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (factor * pos_freq);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}

fn assert_close(ours: &[f32], reference: &[f64], what: &str) {
    assert_eq!(ours.len(), reference.len(), "{what}");
    for (i, (&a, &b)) in ours.iter().zip(reference).enumerate() {
        let relative = (a as f64 - b).abs() / b.abs();
        assert!(relative < 2e-6, "{what}: frequency {i}: {a} vs {b}");
    }
}

/// Llama 3.2 1B / 3B: head size 64, base 500,000, factor 32, frequency factors 1 and 4,
/// original context 8192.
#[test]
fn llama3_frequencies_follow_the_published_formula() {
    let scaling = RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context: 8192,
    };
    let ours = inverse_frequencies(64, 500_000.0, &scaling);
    let reference = llama3_reference_frequencies(64, 500_000.0, 32.0, 1.0, 4.0, 8192.0);
    assert_close(&ours, &reference, "llama3");
    // All three regimes occur, so the ramp is covered: kept, divided by 32, in between.
    let plain = inverse_frequencies(64, 500_000.0, &RopeScaling::None);
    let ratios: Vec<f32> = plain.iter().zip(&ours).map(|(p, o)| p / o).collect();
    let kept = ratios.iter().filter(|&&r| (r - 1.0).abs() < 1e-6).count();
    let divided = ratios.iter().filter(|&&r| (r - 32.0).abs() < 1e-4).count();
    assert!(kept > 0 && divided > 0 && kept + divided < 32, "{ratios:?}");
}

#[test]
fn yarn_and_linear_frequencies_follow_the_published_formulas() {
    // Qwen3's documented YaRN setting: factor 4 over an original 32,768 positions.
    let scaling = RopeScaling::Yarn {
        factor: 4.0,
        original_context: 32_768,
        beta_fast: 32.0,
        beta_slow: 1.0,
        attention_factor: 1.0,
    };
    let ours = inverse_frequencies(128, 1_000_000.0, &scaling);
    assert_close(
        &ours,
        &yarn_reference(128, 1e6, 4.0, 32768.0, 32.0, 1.0),
        "yarn",
    );

    let ours = inverse_frequencies(128, 10_000.0, &RopeScaling::Linear { factor: 8.0 });
    let reference: Vec<f64> = (0..64)
        .map(|i| 1.0 / 10_000f64.powf(2.0 * i as f64 / 128.0) / 8.0)
        .collect();
    assert_close(&ours, &reference, "linear");
}

/// llama.cpp's converter keeps only per-frequency divisors (`rope_freqs.weight`); exporting
/// to config.json recovers Llama 3.2's parameters from them.
#[test]
fn llama3_parameters_come_back_from_gguf_divisors() {
    let plain: Vec<f64> = (0..32)
        .map(|i| 1.0 / 500_000f64.powf(2.0 * i as f64 / 64.0))
        .collect();
    let scaled = llama3_reference_frequencies(64, 500_000.0, 32.0, 1.0, 4.0, 8192.0);
    let divisors: Vec<f32> = plain
        .iter()
        .zip(&scaled)
        .map(|(p, s)| (p / s) as f32)
        .collect();
    let (factor, low, high, original) =
        llama3_parameters(&divisors, 64, 500_000.0).expect("Llama 3 divisors");
    assert_eq!((factor, low, original), (32.0, 1.0, 8192));
    assert!((high - 4.0).abs() < 1e-3, "{high}");
    // Divisors of no Llama 3 shape are not passed off as one.
    let mut odd = divisors.clone();
    odd[3] = 7.0;
    assert!(llama3_parameters(&odd, 64, 500_000.0).is_none());
}

fn hf_config(dir: &Path, rope_scaling: serde_json::Value) -> std::path::PathBuf {
    let path = dir.join("config.json");
    let json = serde_json::json!({
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "rope_scaling": rope_scaling,
    });
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

#[test]
fn config_json_scaling_is_read_or_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = hf_config(
        dir.path(),
        serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    );
    let config = ModelConfig::from_hf_config(&path).unwrap();
    assert_eq!(
        config.rope_scaling,
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192
        }
    );
    // The older spelling `type`, and what the export writes back.
    let path = hf_config(
        dir.path(),
        serde_json::json!({"type": "linear", "factor": 2.0}),
    );
    let config = ModelConfig::from_hf_config(&path).unwrap();
    assert_eq!(config.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    let json = minserve_model::export::hf_config_json(&config, "float32").unwrap();
    assert_eq!(json["rope_scaling"]["rope_type"], "linear");

    for kind in ["dynamic", "longrope"] {
        let path = hf_config(
            dir.path(),
            serde_json::json!({"rope_type": kind, "factor": 2.0}),
        );
        let err = ModelConfig::from_hf_config(&path).unwrap_err().to_string();
        assert!(
            err.contains("rope_scaling.rope_type") && err.contains(kind) && err.contains("llama3"),
            "{err}"
        );
    }
}

/// transformers 5 writes `rope_parameters` (base and scaling in one object) and no top-level
/// `rope_theta`: the base must come from there, not from the 10000 default.
#[test]
fn config_json_rope_parameters_give_the_base_and_the_scaling() {
    let dir = tempfile::tempdir().unwrap();
    let write = |extra: serde_json::Value| {
        let mut json = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512, "max_position_embeddings": 131072,
        });
        json.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let path = dir.path().join("config.json");
        std::fs::write(&path, json.to_string()).unwrap();
        ModelConfig::from_hf_config(&path)
    };
    let config = write(serde_json::json!({
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}
    }))
    .unwrap();
    assert_eq!(config.rope_theta, 100000.0);
    assert_eq!(config.rope_scaling, RopeScaling::None);

    let config = write(serde_json::json!({"rope_parameters": {
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    .unwrap();
    assert_eq!(config.rope_theta, 500000.0);
    assert!(matches!(config.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));

    // Gemma 3's per-layer-type objects, a conflicting base, an unknown type: errors by name.
    let nested = serde_json::json!({"rope_parameters": {
        "full_attention": {"rope_theta": 1e6, "rope_type": "default"}}});
    let conflicting = serde_json::json!({"rope_theta": 10000.0,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}});
    let unknown =
        serde_json::json!({"rope_parameters": {"rope_theta": 1e4, "rope_type": "longrope"}});
    for (case, needle) in [
        (nested, "rope_theta"),
        (conflicting, "differs"),
        (unknown, "rope_parameters.rope_type"),
    ] {
        let err = write(case).unwrap_err().to_string();
        assert!(
            err.contains("rope_parameters") && err.contains(needle),
            "{err}"
        );
    }
}

/// A GGUF header with a tiny Llama's keys, `extra` metadata and `tensors`.
fn write_gguf(path: &Path, extra: &[(&str, Value)], tensors: &[(&str, QTensor)]) {
    let mut metadata = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(64)),
        ("llama.feed_forward_length", Value::U32(128)),
        ("llama.block_count", Value::U32(1)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.vocab_size", Value::U32(512)),
        ("llama.rope.freq_base", Value::F32(500_000.0)),
    ];
    metadata.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

fn gguf_config(path: &Path) -> minserve_model::Result<ModelConfig> {
    let content = minserve_model::gguf::read_content(path)?;
    ModelConfig::from_gguf(&content, path)
}

#[test]
fn gguf_scaling_is_read_or_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let divisors: Vec<f32> = (0..8).map(|i| 1.0 + i as f32).collect();
    let tensor = Tensor::new(divisors.as_slice(), &Device::Cpu).unwrap();
    let tensor = QTensor::quantize(&tensor, GgmlDType::F32).unwrap();
    write_gguf(&path, &[], &[("rope_freqs.weight", tensor)]);
    assert_eq!(
        gguf_config(&path).unwrap().rope_scaling,
        RopeScaling::Divisors(divisors)
    );

    write_gguf(
        &path,
        &[
            ("llama.rope.scaling.type", Value::String("linear".into())),
            ("llama.rope.scaling.factor", Value::F32(4.0)),
        ],
        &[],
    );
    assert_eq!(
        gguf_config(&path).unwrap().rope_scaling,
        RopeScaling::Linear { factor: 4.0 }
    );

    write_gguf(
        &path,
        &[
            ("llama.rope.scaling.type", Value::String("longrope".into())),
            ("llama.rope.scaling.factor", Value::F32(4.0)),
        ],
        &[],
    );
    let err = gguf_config(&path).unwrap_err().to_string();
    assert!(
        err.contains("llama.rope.scaling.type") && err.contains("longrope") && err.contains("yarn"),
        "{err}"
    );
}
