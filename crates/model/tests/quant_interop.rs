//! Checkpoints written by the reference tools (llm-compressor for compressed-tensors, GPTQModel
//! for GPTQ and AWQ GEMM; `tests/data/interop/README.md` says how) load in minserve and give the
//! tool's own logits: exactly (to f32 summation order) where the weights are dequantized to f32
//! (the GPU's form, `repack_for_cpu = false`), and within a measured tolerance on the packed CPU
//! kernels, which also quantize activations (to 8-bit blocks of 32 for integer weights, to bf16
//! or per-token E4M3 for FP8 ones).

mod common;

use std::path::{Path, PathBuf};

use minserve_model::safetensors::load_folder_weights;
use minserve_model::{CacheOptions, KvDtype, LlamaModel, ModelRunner};
use serde_json::Value;

/// f32 summation order and the reference's 4-decimal rounding (the README's bound).
const EXACT: f32 = 2e-3;
/// The packed kernels' int8 activations (W4A8 / W8A8 per block of 32) against the tool's
/// weight-only f32 forward: measured 0.0x on these models (logits within +-5), see `measured`.
const PACKED: f32 = 0.25;

fn folder(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/interop")
        .join(name)
}

fn reference(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

/// Logits at every position of `tokens`, one decode step per token on an f32 KV cache.
fn all_logits(dir: &Path, repack_for_cpu: bool, tokens: &[u32]) -> Vec<Vec<f32>> {
    let weights = load_folder_weights(dir, None, repack_for_cpu).unwrap();
    let cache = CacheOptions {
        dtype: KvDtype::F32,
        memory_bytes: 1 << 22,
        ..CacheOptions::default()
    };
    let mut runner = ModelRunner::new(LlamaModel::new(weights), cache);
    (1..=tokens.len())
        .map(|p| common::step_one_sequence(&mut runner, &tokens[..p], p - 1, &[2, 0, 1]))
        .collect()
}

/// The largest difference from `key`'s logits over every sequence, position and entry.
fn max_diff(dir: &Path, reference: &Value, repack_for_cpu: bool, key: &str) -> f32 {
    let mut worst = 0f32;
    for seq in reference["sequences"].as_array().unwrap() {
        let tokens: Vec<u32> = seq["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let ours = all_logits(dir, repack_for_cpu, &tokens);
        for (p, row) in seq[key].as_array().unwrap().iter().enumerate() {
            let theirs: Vec<f32> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            worst = worst.max(common::max_abs_diff(&ours[p], &theirs));
        }
    }
    worst
}

/// Every quantized folder of the fixtures.
const FOLDERS: [&str; 11] = [
    "gptq-g32",
    "gptq-g32-asym-desc-act",
    "awq-gemm-g32",
    "w4a16-gptq-g64",
    "w4a16-gptq-actorder-weight-g32-bf16",
    "w4a16-asym-g32",
    "w4a16-awq-g32",
    "w8a8-int",
    "fp8-w8a16-channel",
    "fp8-tensor-w8a16",
    "fp8-dynamic",
];

#[test]
fn reference_tool_checkpoints_give_the_tools_logits() {
    let mut worst = Vec::new();
    for name in FOLDERS {
        let dir = folder(name);
        let reference = reference(&dir);
        // The quantization moves the logits by far more than the tolerances: a wrong nibble
        // order, zero point or group map cannot pass.
        let moved = reference["checks"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| k.starts_with("max_abs_logit_diff") && k.contains("unquantized"))
            .map(|(_, v)| v.as_f64().unwrap() as f32)
            .unwrap();
        assert!(moved > 100.0 * EXACT, "{name}: {moved}");
        // Weight-only: the f32 forward of the dequantized weights; `logits` where the tool's
        // own forward is that already.
        let key = match reference["sequences"][0].get("logits_weight_only") {
            Some(_) => "logits_weight_only",
            None => "logits",
        };
        let dense = max_diff(&dir, &reference, false, key);
        // Dynamic FP8 activations per token are the tool's own scheme and ours: the packed
        // kernels meet its forward with them. Our int8 activations are per block of 32, not
        // per token, so the int8 folders' packed path is held to the weight-only forward.
        let packed_key = match name {
            "fp8-dynamic" => "logits",
            _ => key,
        };
        let packed = max_diff(&dir, &reference, true, packed_key);
        eprintln!("{name}: dequantized {dense:.5} (vs {key}), packed kernels {packed:.5} (vs {packed_key}); quantization moved {moved:.3}");
        worst.push((name, dense, packed));
    }
    for (name, dense, packed) in worst {
        assert!(dense <= EXACT, "{name}: dequantized weights off by {dense}");
        assert!(packed <= PACKED, "{name}: packed kernels off by {packed}");
    }
}

#[test]
fn the_unquantized_base_matches_too() {
    let dir = folder("base-f16");
    let diff = max_diff(&dir, &reference(&dir), true, "logits");
    assert!(diff <= EXACT, "base-f16 off by {diff}");
}

/// The tolerance must be able to fail: the same folder with the RoPE base an older reader of
/// transformers 5's `rope_parameters` fell back to (10000 instead of the file's 100000) is far
/// outside it.
#[test]
fn a_wrong_rope_base_is_far_outside_the_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(folder("base-f16")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    assert_eq!(config["rope_parameters"]["rope_theta"], 100000.0);
    config["rope_parameters"]["rope_theta"] = serde_json::json!(10000.0);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let worst = max_diff(dir.path(), &reference(&folder("base-f16")), true, "logits");
    assert!(worst > 50.0 * EXACT, "only {worst} apart");
}
