//! Checkpoints written by the reference tools (llm-compressor, GPTQModel; see
//! `tests/data/interop/README.md` and `scripts/quant-interop/`) against those tools' own logits.
//!
//! Each folder's `reference.json` holds the logits at every position of a few token sequences.
//! Our loader must reproduce them within a tolerance far below what the quantization itself
//! moved them (the fixtures record that too, and a test here keeps it so): a wrong nibble order,
//! zero point, group map, scale axis or RoPE base fails by orders of magnitude.
//!
//! A loader for a quantized format adds one `#[test]` calling [`assert_matches_reference`] with
//! its folder and the reference key/tolerance its README names.

mod common;

use std::path::{Path, PathBuf};

use minserve_model::{load_model, CacheOptions, KvDtype, ModelRunner};
use serde::Deserialize;

/// f32 summation order (torch vs our kernels) and the JSON's 4-decimal rounding, with margin.
const EXACT_TOLERANCE: f32 = 2e-3;

#[derive(Deserialize)]
struct Reference {
    sequences: Vec<Sequence>,
    #[serde(default)]
    checks: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct Sequence {
    token_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    #[serde(default)]
    logits_weight_only: Option<Vec<Vec<f32>>>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/interop")
        .join(name)
}

fn reference(folder: &Path) -> Reference {
    let text = std::fs::read_to_string(folder.join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Logits at every position of `tokens`, fed one token per step through the paged runner
/// (f32 KV cache: only the weights may differ from the reference).
fn logits_every_position(runner: &mut ModelRunner, tokens: &[u32]) -> Vec<Vec<f32>> {
    let block_table: Vec<u32> = (0..16).collect();
    (0..tokens.len())
        .map(|p| common::step_one_sequence(runner, &tokens[..=p], p, &block_table))
        .collect()
}

fn runner_for(folder: &Path) -> ModelRunner {
    let loaded = load_model(folder).unwrap_or_else(|e| panic!("{}: {e}", folder.display()));
    ModelRunner::new(
        loaded.model,
        CacheOptions {
            dtype: KvDtype::F32,
            ..CacheOptions::default()
        },
    )
}

/// Largest |ours - reference| over every position and vocabulary entry, and the number of
/// positions whose top-1 differs where the reference's top-2 margin exceeds `tolerance`.
fn compare(folder: &Path, weight_only: bool, tolerance: f32) -> (f32, usize) {
    let reference = reference(folder);
    let mut runner = runner_for(folder);
    let (mut worst, mut top1_flips) = (0.0f32, 0);
    for sequence in &reference.sequences {
        let expected = match weight_only {
            true => sequence
                .logits_weight_only
                .as_ref()
                .unwrap_or(&sequence.logits),
            false => &sequence.logits,
        };
        let ours = logits_every_position(&mut runner, &sequence.token_ids);
        assert_eq!(ours.len(), expected.len());
        for (got, want) in ours.iter().zip(expected) {
            assert_eq!(got.len(), want.len(), "vocabulary size");
            worst = worst.max(common::max_abs_diff(got, want));
            let mut sorted = want.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > tolerance && common::argmax(got) != common::argmax(want) {
                top1_flips += 1;
            }
        }
    }
    (worst, top1_flips)
}

/// The check a loader's test calls: `folder` (under tests/data/interop) loads and matches its
/// reference (`weight_only`: `logits_weight_only` where present) within `tolerance`.
pub fn assert_matches_reference(name: &str, weight_only: bool, tolerance: f32) {
    let folder = fixture(name);
    let (worst, flips) = compare(&folder, weight_only, tolerance);
    eprintln!("{name}: max |ours - reference| = {worst:.2e} (tolerance {tolerance:.0e})");
    assert!(
        worst <= tolerance,
        "{name}: logits differ from the tool's by {worst} (> {tolerance})"
    );
    assert_eq!(
        flips, 0,
        "{name}: top-1 differs where the reference is clear"
    );
}

#[test]
fn unquantized_fixture_matches_transformers() {
    assert_matches_reference("base-f16", false, EXACT_TOLERANCE);
}

/// The tolerance must be able to fail: the same folder with the RoPE base transformers 5 leaves
/// implicit in an older reader (10000 instead of the file's 100000) is far outside it.
#[test]
fn a_wrong_rope_base_is_far_outside_the_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("base-f16")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    assert_eq!(config["rope_parameters"]["rope_theta"], 100000.0);
    config["rope_parameters"]["rope_theta"] = serde_json::json!(10000.0);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (worst, _) = compare(dir.path(), false, EXACT_TOLERANCE);
    eprintln!("RoPE base 10000 instead of 100000: max |ours - reference| = {worst:.3}");
    assert!(worst > 50.0 * EXACT_TOLERANCE, "only {worst} apart");
}

/// Every quantized fixture must keep what makes it a test: the quantization moved the tool's
/// logits far more than the tolerance, so a loader that ignored the quantization (or read it
/// wrongly) could not pass by accident.
#[test]
fn fixtures_discriminate_quantization_errors() {
    let root = fixture("");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let folder = entry.unwrap().path();
        if !folder.join("reference.json").is_file() || folder.ends_with("base-f16") {
            continue;
        }
        let checks = reference(&folder).checks;
        let moved = checks
            .get("max_abs_logit_diff_tool_vs_unquantized")
            .or_else(|| checks.get("max_abs_logit_diff_weight_only_vs_unquantized"))
            .and_then(|v| v.as_f64())
            .unwrap_or_else(|| panic!("{}: no quantization figure", folder.display()));
        assert!(
            moved > 100.0 * f64::from(EXACT_TOLERANCE),
            "{}: quantization moved logits by only {moved}",
            folder.display()
        );
        seen += 1;
    }
    assert_eq!(seen, 11, "quantized fixtures under {}", root.display());
}
