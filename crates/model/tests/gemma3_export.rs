//! Gemma 3 through the Hugging Face folder: the real gemma3-270m GGUF exported by
//! `export_gguf_to_hf` (`config.json` as `gemma3_text`, norms stored as Gemma's `w` of `1 + w`)
//! and loaded back by the safetensors loader must give the logits of the GGUF it came from (its
//! tensors dequantized, run the same way), and the logits of transformers' own Gemma3ForCausalLM
//! on the same folder (fixture from `scripts/gemma3_hf_reference.py`). A folder whose norms were
//! written as the multipliers, the mistake of forgetting Gemma's convention, must be far off both.
//!
//! Measured (debug build, noisy 2-core AMD EPYC, 62 s): folder vs GGUF max |diff| 0 (every
//! `m - 1 + 1` round trip of the norms happened to be exact); folder vs transformers 5.17 max
//! |diff| 3.4e-5 over the fixture's ids, logits up to ~40 (the fixture rounds to 1e-5); the
//! norms written as multipliers: 39 from the GGUF, 33 from transformers.

mod common;

use common::max_abs_diff;

use candle_core::quantized::GgmlDType;
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::export::{export_gguf_to_hf, ExportDType};
use minserve_model::weights::{Linear, LinearWeight, LlamaWeights};
use minserve_model::{CacheOptions, KvDtype, LlamaModel, ModelConfig, ModelRunner};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    model_sha256: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    token_ids: Vec<u32>,
    rows: Vec<Row>,
}

/// transformers' logits at one position, for the ids listed.
#[derive(Deserialize)]
struct Row {
    position: usize,
    ids: Vec<u32>,
    logits: Vec<f32>,
}

/// Folder against the GGUF: the same f32 values, but for the norms' `m - 1 + 1` rounding.
const GGUF_TOLERANCE: f32 = 1e-4;
/// Folder against transformers: two f32 implementations, summing in different orders.
const TRANSFORMERS_TOLERANCE: f32 = 1e-3;

fn fixture() -> Fixture {
    let text = include_str!("fixtures/gemma3_270m_transformers.json");
    serde_json::from_str(text).expect("fixture parses")
}

/// Full logit rows at each of `case`'s checked positions: the tokens before the first one
/// prefilled in one step, then one token per step, on an f32 cache. Each KV group (Gemma's
/// global and local layers) gets blocks of its own.
fn logits_at(weights: LlamaWeights, cases: &[Case]) -> Vec<Vec<Vec<f32>>> {
    let cache = CacheOptions {
        dtype: KvDtype::F32,
        ..CacheOptions::default()
    };
    let mut runner = ModelRunner::new(LlamaModel::new(weights), cache);
    let block_size = runner.cache_geometry().block_size;
    let groups = runner.kv_group_windows().len();
    cases
        .iter()
        .map(|case| {
            let tokens = &case.token_ids;
            let per_group = tokens.len().div_ceil(block_size) as u32;
            let tables: Vec<Vec<u32>> = (0..groups as u32)
                .map(|g| (g * per_group..(g + 1) * per_group).collect())
                .collect();
            let mut computed = 0;
            case.rows
                .iter()
                .map(|row| {
                    let end = row.position + 1;
                    let mut batch = StepBatch::new();
                    batch.push_sequence_groups(
                        &tokens[computed..end],
                        computed,
                        &tables,
                        block_size,
                        true,
                    );
                    computed = end;
                    runner.execute(&batch).unwrap().row(0).to_vec()
                })
                .collect()
        })
        .collect()
}

/// Largest |ours - transformers| over every checked id of every case.
fn diff_to_transformers(ours: &[Vec<Vec<f32>>], cases: &[Case]) -> f32 {
    let mut worst = 0f32;
    for (rows, case) in ours.iter().zip(cases) {
        for (logits, reference) in rows.iter().zip(&case.rows) {
            for (&id, &expected) in reference.ids.iter().zip(&reference.logits) {
                worst = worst.max((logits[id as usize] - expected).abs());
            }
        }
    }
    worst
}

fn diff_between(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max)
}

/// The GGUF's own tensors dequantized: projections dense f32 (`weights_format` f32), and the
/// tied lm_head dense too (the GGUF path keeps it in the file's type, whose matmul would
/// round the activations).
fn gguf_dequantized(path: &std::path::Path) -> LlamaWeights {
    let content = minserve_model::gguf::read_content(path).unwrap();
    let mut weights =
        minserve_model::gguf::load(path, &content, Some(GgmlDType::F32), false).unwrap();
    assert!(weights.config.tie_word_embeddings);
    weights.lm_head = Linear {
        weight: LinearWeight::dense(weights.embedding.dense().unwrap()),
        bias: None,
    };
    weights
}

#[test]
fn exported_gemma3_folder_matches_the_gguf_and_transformers() {
    let fixture = fixture();
    let (_, entry) = minserve_hub::catalog().get("gemma3-270m").unwrap();
    assert_eq!(
        Some(fixture.model_sha256.as_str()),
        entry.sha256.as_deref(),
        "the fixture was made from the catalog's file"
    );
    let gguf = common::catalog_model_path("gemma3-270m");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hf");
    let report = export_gguf_to_hf(&gguf, &dir, ExportDType::F32).unwrap();
    assert!(
        !report.unpermuted_qk,
        "Gemma's GGUF keeps Hugging Face's RoPE pairs"
    );

    let content = minserve_model::gguf::read_content(&gguf).unwrap();
    let gguf_config = ModelConfig::from_gguf(&content, &gguf).unwrap();
    let folder_config = ModelConfig::from_hf_config(&dir.join("config.json")).unwrap();
    assert_eq!(
        folder_config, gguf_config,
        "config.json reads back as the GGUF's"
    );

    let cases = &fixture.cases;
    let reference = logits_at(gguf_dequantized(&gguf), cases);
    let folder = minserve_model::safetensors::load_folder_weights(&dir, None, false).unwrap();
    let ours = logits_at(folder, cases);
    let to_gguf = diff_between(&ours, &reference);
    let to_transformers = diff_to_transformers(&ours, cases);
    let gguf_to_transformers = diff_to_transformers(&reference, cases);
    eprintln!(
        "max |diff|: folder vs GGUF {to_gguf:.2e}, folder vs transformers {to_transformers:.2e}, \
         GGUF vs transformers {gguf_to_transformers:.2e}"
    );
    assert!(to_gguf <= GGUF_TOLERANCE, "folder vs GGUF: {to_gguf}");
    assert!(
        to_transformers <= TRANSFORMERS_TOLERANCE,
        "folder vs transformers: {to_transformers}"
    );

    // Norms written as multipliers (no `- 1`), as a converter that forgot Gemma's convention
    // would: the loader adds 1 to each, which is what adding 1 after loading does here.
    let mut wrong = minserve_model::safetensors::load_folder_weights(&dir, None, false).unwrap();
    let plus_one = |t: &mut candle_core::Tensor| *t = t.affine(1.0, 1.0).unwrap();
    for layer in &mut wrong.layers {
        plus_one(&mut layer.attn_norm);
        plus_one(&mut layer.ffn_norm);
        for norm in [
            &mut layer.q_norm,
            &mut layer.k_norm,
            &mut layer.post_attention_norm,
            &mut layer.post_ffn_norm,
        ] {
            plus_one(norm.as_mut().expect("Gemma has all four"));
        }
    }
    plus_one(&mut wrong.final_norm);
    let short = &cases[..1];
    let wrong_logits = logits_at(wrong, short);
    let wrong_to_gguf = diff_between(&wrong_logits, &reference[..1]);
    let wrong_to_transformers = diff_to_transformers(&wrong_logits, short);
    eprintln!(
        "norms stored as multipliers: vs GGUF {wrong_to_gguf:.2}, vs transformers \
         {wrong_to_transformers:.2}"
    );
    assert!(wrong_to_gguf > 100.0 * GGUF_TOLERANCE, "{wrong_to_gguf}");
    assert!(
        wrong_to_transformers > 100.0 * TRANSFORMERS_TOLERANCE,
        "{wrong_to_transformers}"
    );
}

/// Gemma 3's `config.json` as transformers 4 wrote it and as transformers 5 writes it (one
/// `rope_parameters` object per layer type) reads to the same model; what the forward pass does
/// not implement is an error naming the key.
#[test]
fn gemma3_text_config_reads_both_rope_spellings_and_names_what_it_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let read = |extra: serde_json::Value| {
        let mut json = serde_json::json!({
            "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "vocab_size": 262144, "max_position_embeddings": 32768, "sliding_window": 512,
            "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
        });
        json.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let path = dir.path().join("config.json");
        std::fs::write(&path, json.to_string()).unwrap();
        ModelConfig::from_hf_config(&path).map_err(|e| e.to_string())
    };
    let old = read(serde_json::json!({
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 6,
    }))
    .unwrap();
    let types = minserve_model::config::layer_types(18, 6);
    let new = read(serde_json::json!({
        "layer_types": types,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    }))
    .unwrap();
    assert_eq!(old, new);
    assert_eq!(
        old,
        minserve_model::synthetic::preset("gemma3-270m").unwrap()
    );
    assert_eq!(old.layer_window(5), None, "layer 6 of 6 is global");
    assert_eq!(old.layer_window(4), Some(512));

    // Linear scaling of the global layers, in either spelling.
    let scaled = read(serde_json::json!({"rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }}))
    .unwrap();
    let scaled_old = read(serde_json::json!({
        "rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    }))
    .unwrap();
    assert_eq!(scaled, scaled_old);
    assert_eq!(
        scaled.rope_scaling,
        minserve_model::config::RopeScaling::Linear { factor: 8.0 }
    );

    let mut irregular = types.clone();
    irregular.swap(5, 6);
    for (case, needles) in [
        (
            serde_json::json!({"final_logit_softcapping": 30.0}),
            &["final_logit_softcapping", "30"][..],
        ),
        (
            serde_json::json!({"attn_logit_softcapping": 50.0}),
            &["attn_logit_softcapping"],
        ),
        (
            serde_json::json!({"hidden_activation": "silu"}),
            &["hidden_activation", "gelu_pytorch_tanh"],
        ),
        (
            serde_json::json!({"layer_types": irregular}),
            &["layer_types", "[6, 11, 17]"],
        ),
        (
            serde_json::json!({"rope_parameters": {
                "sliding_attention": {"rope_type": "linear", "factor": 2.0}}}),
            &["rope_parameters.sliding_attention.rope_type", "linear"],
        ),
        (
            serde_json::json!({"rope_parameters": {"rope_theta": 1e6}}),
            &["rope_parameters", "rope_theta", "layer type"],
        ),
        (
            serde_json::json!({"sliding_window": null}),
            &["sliding_window", "null"],
        ),
    ] {
        let err = read(case.clone()).expect_err("must be refused");
        assert!(needles.iter().all(|n| err.contains(n)), "{case}: {err}");
    }
    let err = read(serde_json::json!({"model_type": "gemma3"})).unwrap_err();
    assert!(
        err.contains("`gemma3`") && err.contains("gemma3_text"),
        "{err}"
    );
}
