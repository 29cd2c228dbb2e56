//! `quantize_gguf` end to end on a small Llama GGUF written here: every method writes a folder
//! whose config and tensors are those of its layout, and bad requests fail with errors that
//! name the option or tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use minserve_model::export::ExportDType;
use minserve_model::{synthetic, ProjectionSite};
use minserve_quant::grid::Symmetry;
use minserve_quant::{quantize_gguf, Method, QuantizeOptions};
use safetensors::{Dtype, SafeTensors};

const HIDDEN: usize = 64;
const FF: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;

/// A GGUF of the synthetic preset `preset` (`tiny`, a Llama, unless a test says otherwise) with
/// seeded random f32 weights and the synthetic byte-level tokenizer, tensors and metadata named
/// as llama.cpp names them for its architecture.
fn write_gguf(dir: &Path, preset: &str) -> PathBuf {
    let config = synthetic::preset(preset).unwrap();
    let arch = config.architecture.as_str();
    let (hidden, ff, layers) = (
        config.hidden_size,
        config.intermediate_size,
        config.num_layers,
    );
    let (heads, kv_heads, head_dim) = (config.num_heads, config.num_kv_heads, config.head_dim);
    if preset == "tiny" {
        assert_eq!((hidden, ff, layers), (HIDDEN, FF, LAYERS));
        assert_eq!((heads, kv_heads), (HEADS, KV_HEADS));
    }
    let vocab = config.vocab_size;
    let mut state = 7u64;
    let mut random = |shape: &[usize], center: f32, spread: f32| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                center + spread * ((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    };
    let mut tensors = vec![
        (
            "token_embd.weight".to_string(),
            random(&[vocab, hidden], 0.0, 1.0),
        ),
        (
            "output_norm.weight".to_string(),
            random(&[hidden], 1.0, 0.2),
        ),
    ];
    let gemma = arch == "gemma3";
    for i in 0..layers {
        let mut names = vec![
            ("attn_norm", vec![hidden], 1.0),
            ("attn_q", vec![heads * head_dim, hidden], 0.0),
            ("attn_k", vec![kv_heads * head_dim, hidden], 0.0),
            ("attn_v", vec![kv_heads * head_dim, hidden], 0.0),
            ("attn_output", vec![hidden, heads * head_dim], 0.0),
            ("ffn_norm", vec![hidden], 1.0),
            ("ffn_gate", vec![ff, hidden], 0.0),
            ("ffn_up", vec![ff, hidden], 0.0),
            ("ffn_down", vec![hidden, ff], 0.0),
        ];
        if gemma {
            names.extend([
                ("attn_q_norm", vec![head_dim], 1.0),
                ("attn_k_norm", vec![head_dim], 1.0),
                ("post_attention_norm", vec![hidden], 1.0),
                ("post_ffw_norm", vec![hidden], 1.0),
            ]);
        }
        for (name, shape, center) in names {
            let spread = if center == 1.0 { 0.2 } else { 0.15 };
            let mut t = random(&shape, center, spread);
            if gemma && matches!(name, "attn_norm" | "ffn_norm") {
                // Gemma's norms before the projections have outlier channels (the real
                // model's multipliers reach tens), where AWQ's scales matter.
                let outliers: Vec<f32> = (0..hidden)
                    .map(|c| if c % 16 == 3 { 6.0 } else { 1.0 })
                    .collect();
                t = (t * Tensor::new(outliers.as_slice(), &Device::Cpu).unwrap()).unwrap();
            }
            tensors.push((format!("blk.{i}.{name}.weight"), t));
        }
    }
    let u32_value = |v: usize| gguf_file::Value::U32(v as u32);
    let mut metadata: Vec<(String, gguf_file::Value)> = synthetic::tokenizer_metadata(&config)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    let key = |name: &str| format!("{arch}.{name}");
    metadata.extend([
        (
            "general.architecture".into(),
            gguf_file::Value::String(arch.into()),
        ),
        (key("embedding_length"), u32_value(hidden)),
        (key("feed_forward_length"), u32_value(ff)),
        (key("block_count"), u32_value(layers)),
        (key("attention.head_count"), u32_value(heads)),
        (key("attention.head_count_kv"), u32_value(kv_heads)),
        (key("attention.key_length"), u32_value(head_dim)),
        (key("context_length"), u32_value(2048)),
        (key("rope.dimension_count"), u32_value(head_dim)),
        (
            key("rope.freq_base"),
            gguf_file::Value::F32(config.rope_theta),
        ),
        (
            key("attention.layer_norm_rms_epsilon"),
            gguf_file::Value::F32(config.rms_norm_eps as f32),
        ),
    ]);
    if let Some(window) = config.block.sliding_window {
        metadata.extend([
            (key("attention.sliding_window"), u32_value(window.size)),
            (
                key("attention.sliding_window_pattern"),
                u32_value(window.pattern),
            ),
        ]);
    }
    let quantized: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let quantized: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let path = dir.join("tiny.gguf");
    gguf_file::write(
        &mut std::fs::File::create(&path).unwrap(),
        &metadata,
        &quantized,
    )
    .unwrap();
    path
}

/// English-like text of the synthetic tokenizer's byte tokens (one byte, one token).
fn calibration_text() -> String {
    let words = [
        "the",
        "quantized",
        "model",
        "reads",
        "every",
        "layer",
        "of",
        "its",
        "input",
        "and",
        "weights",
        "scale",
        "error",
        "column",
        "group",
        "with",
        "activation",
        "channel",
    ];
    (0..3000)
        .map(|i| words[(i * 7 + i / 5) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn options(method: Method, bits: u32) -> QuantizeOptions {
    QuantizeOptions {
        method,
        bits,
        group_size: 32,
        symmetry: None,
        act_order: false,
        damp: 0.01,
        calib_tokens: 1024,
        calib_window: 128,
        dtype: ExportDType::F16,
        dequantized_twin: None,
    }
}

struct Written {
    _dir: tempfile::TempDir,
    /// The GGUF the folder was made from.
    gguf: PathBuf,
    out: PathBuf,
    report: minserve_quant::QuantizeReport,
}

fn run(options: &QuantizeOptions) -> Written {
    run_preset(options, "tiny")
}

fn run_preset(options: &QuantizeOptions, preset: &str) -> Written {
    let layers = synthetic::preset(preset).unwrap().num_layers;
    let dir = tempfile::tempdir().unwrap();
    let gguf = write_gguf(dir.path(), preset);
    let out = dir.path().join("out");
    let text = calibration_text();
    let mut layers_seen = Vec::new();
    let report = quantize_gguf(&gguf, &out, options, Some(&text), &mut |p| {
        layers_seen.push(p.layers_done)
    })
    .unwrap();
    assert_eq!(
        layers_seen,
        (1..=layers).collect::<Vec<_>>(),
        "progress after each layer"
    );
    Written {
        _dir: dir,
        gguf,
        out,
        report,
    }
}

fn config(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
}

/// `(dtype, shape)` of every tensor in the folder.
fn tensors(out: &Path) -> HashMap<String, (Dtype, Vec<usize>)> {
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.dtype(), view.shape().to_vec())))
        .collect()
}

fn assert_tensor(
    all: &HashMap<String, (Dtype, Vec<usize>)>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) {
    let got = all
        .get(name)
        .unwrap_or_else(|| panic!("no `{name}` in {:?}", all.keys()));
    assert_eq!((got.0, got.1.as_slice()), (dtype, shape), "{name}");
}

/// Float tensors other than projections are there as `minserve export` writes them.
fn assert_rest_is_float(all: &HashMap<String, (Dtype, Vec<usize>)>) {
    assert_tensor(all, "model.embed_tokens.weight", Dtype::F16, &[512, HIDDEN]);
    assert_tensor(all, "model.norm.weight", Dtype::F16, &[HIDDEN]);
    assert_tensor(
        all,
        "model.layers.1.input_layernorm.weight",
        Dtype::F16,
        &[HIDDEN],
    );
    assert!(!all.contains_key("model.layers.0.self_attn.q_proj.weight"));
}

#[test]
fn gptq_writes_the_gptq_v1_layout_and_beats_round_to_nearest() {
    for act_order in [false, true] {
        let mut o = options(Method::Gptq, 4);
        o.act_order = act_order;
        let w = run(&o);
        let q = &config(&w.out)["quantization_config"];
        assert_eq!(q["quant_method"], "gptq");
        assert_eq!(q["bits"], 4);
        assert_eq!(q["group_size"], 32);
        assert_eq!(q["desc_act"], act_order);
        assert_eq!(q["sym"], true);
        assert_eq!(q["checkpoint_format"], "gptq");
        let standalone: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(w.out.join("quantize_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(&standalone, q);
        let all = tensors(&w.out);
        assert_rest_is_float(&all);
        let p = "model.layers.0.mlp.down_proj";
        assert_tensor(&all, &format!("{p}.qweight"), Dtype::I32, &[FF / 8, HIDDEN]);
        assert_tensor(
            &all,
            &format!("{p}.qzeros"),
            Dtype::I32,
            &[FF / 32, HIDDEN / 8],
        );
        assert_tensor(&all, &format!("{p}.scales"), Dtype::F16, &[FF / 32, HIDDEN]);
        assert_tensor(&all, &format!("{p}.g_idx"), Dtype::I32, &[FF]);
        let p = "model.layers.1.self_attn.k_proj";
        assert_tensor(&all, &format!("{p}.qweight"), Dtype::I32, &[HIDDEN / 8, 32]);
        assert_eq!(w.report.calibration_tokens, 1024);
        let (error, rtn) = w.report.site_errors.iter().fold((0.0, 0.0), |(e, r), s| {
            (e + s.error, r + s.error_round_to_nearest)
        });
        assert_eq!(w.report.site_errors.len(), 4 * LAYERS);
        assert!(
            error < 0.9 * rtn,
            "act_order={act_order}: GPTQ {error} vs RTN {rtn}"
        );
    }
}

#[test]
fn awq_writes_the_autoawq_gemm_layout_and_folds_scales_into_the_norms() {
    let w = run(&options(Method::Awq, 4));
    let q = &config(&w.out)["quantization_config"];
    assert_eq!(q["quant_method"], "awq");
    assert_eq!(q["version"], "gemm");
    assert_eq!(q["zero_point"], true);
    assert_eq!(q["group_size"], 32);
    let all = tensors(&w.out);
    assert_rest_is_float(&all);
    let p = "model.layers.0.mlp.gate_proj";
    assert_tensor(&all, &format!("{p}.qweight"), Dtype::I32, &[HIDDEN, FF / 8]);
    assert_tensor(
        &all,
        &format!("{p}.qzeros"),
        Dtype::I32,
        &[HIDDEN / 32, FF / 8],
    );
    assert_tensor(&all, &format!("{p}.scales"), Dtype::F16, &[HIDDEN / 32, FF]);
    assert!(!all.contains_key(&format!("{p}.g_idx")));
    let errors = &w.report.site_errors;
    assert!(errors
        .iter()
        .all(|s| s.error <= s.error_round_to_nearest * (1.0 + 1e-6)));
}

/// Asymmetric GPTQ is written as llm-compressor writes it: compressed-tensors pack-quantized
/// with zero points, and with act-order the group of every input (`weight_g_idx`,
/// `actorder: "group"`). GPTQ v1 cannot store a zero point of 0.
#[test]
fn asymmetric_gptq_writes_compressed_tensors_with_zero_points_and_g_idx() {
    for act_order in [false, true] {
        let mut o = options(Method::Gptq, 4);
        o.symmetry = Some(Symmetry::Asymmetric);
        o.act_order = act_order;
        let w = run(&o);
        let q = &config(&w.out)["quantization_config"];
        assert_eq!(q["quant_method"], "compressed-tensors");
        assert_eq!(q["format"], "pack-quantized");
        let weights = &q["config_groups"]["group_0"]["weights"];
        assert_eq!(weights["symmetric"], false);
        let expected_order = if act_order {
            serde_json::json!("group")
        } else {
            serde_json::Value::Null
        };
        assert_eq!(weights["actorder"], expected_order);
        assert!(!w.out.join("quantize_config.json").exists());
        let all = tensors(&w.out);
        assert_rest_is_float(&all);
        let p = "model.layers.0.mlp.down_proj";
        assert_tensor(
            &all,
            &format!("{p}.weight_zero_point"),
            Dtype::I32,
            &[HIDDEN / 8, FF / 32],
        );
        assert_eq!(all.contains_key(&format!("{p}.weight_g_idx")), act_order);
        let (error, rtn) = w.report.site_errors.iter().fold((0.0, 0.0), |(e, r), s| {
            (e + s.error, r + s.error_round_to_nearest)
        });
        assert!(
            error < 0.9 * rtn,
            "act_order={act_order}: GPTQ {error} vs RTN {rtn}"
        );
    }
}

#[test]
fn round_to_nearest_and_fp8_write_compressed_tensors() {
    let w = run(&options(Method::Rtn, 4));
    let q = &config(&w.out)["quantization_config"];
    assert_eq!(q["quant_method"], "compressed-tensors");
    assert_eq!(q["format"], "pack-quantized");
    let weights = &q["config_groups"]["group_0"]["weights"];
    assert_eq!(weights["strategy"], "group");
    assert_eq!(weights["symmetric"], false);
    assert_eq!(q["ignore"], serde_json::json!(["lm_head"]));
    let all = tensors(&w.out);
    assert_rest_is_float(&all);
    let p = "model.layers.1.mlp.up_proj";
    assert_tensor(
        &all,
        &format!("{p}.weight_packed"),
        Dtype::I32,
        &[FF, HIDDEN / 8],
    );
    assert_tensor(
        &all,
        &format!("{p}.weight_scale"),
        Dtype::F16,
        &[FF, HIDDEN / 32],
    );
    assert_tensor(
        &all,
        &format!("{p}.weight_zero_point"),
        Dtype::I32,
        &[FF / 8, HIDDEN / 32],
    );
    assert_tensor(&all, &format!("{p}.weight_shape"), Dtype::I64, &[2]);
    assert_eq!(w.report.calibration_tokens, 0);

    let w = run(&options(Method::Rtn, 8));
    let q = &config(&w.out)["quantization_config"];
    assert_eq!(q["format"], "int-quantized");
    let group = &q["config_groups"]["group_0"];
    assert_eq!(group["input_activations"]["dynamic"], true);
    assert_eq!(group["input_activations"]["strategy"], "token");
    let all = tensors(&w.out);
    assert_tensor(
        &all,
        "model.layers.0.self_attn.o_proj.weight",
        Dtype::I8,
        &[HIDDEN, HIDDEN],
    );
    assert_tensor(
        &all,
        "model.layers.0.self_attn.o_proj.weight_scale",
        Dtype::F16,
        &[HIDDEN, 1],
    );

    let w = run(&options(Method::Fp8, 8));
    let q = &config(&w.out)["quantization_config"];
    assert_eq!(q["format"], "float-quantized");
    assert_eq!(q["config_groups"]["group_0"]["weights"]["type"], "float");
    assert!(q["config_groups"]["group_0"]["input_activations"].is_null());
    let all = tensors(&w.out);
    assert_tensor(
        &all,
        "model.layers.0.mlp.down_proj.weight",
        Dtype::F8_E4M3,
        &[HIDDEN, FF],
    );
    assert_tensor(
        &all,
        "model.layers.0.mlp.down_proj.weight_scale",
        Dtype::F32,
        &[HIDDEN, 1],
    );
}

fn error_of(options: &QuantizeOptions, calibration: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let gguf = write_gguf(dir.path(), "tiny");
    let out = dir.path().join("out");
    let err = quantize_gguf(&gguf, &out, options, calibration, &mut |_| {}).expect_err("must fail");
    assert!(!out.exists(), "nothing is written for a bad request");
    err.to_string()
}

#[test]
fn bad_requests_fail_naming_what_is_wrong() {
    let text = calibration_text();
    let mut o = options(Method::Rtn, 4);
    o.group_size = 48;
    let e = error_of(&o, None);
    assert!(
        e.contains("--group-size 48") && e.contains("q_proj.weight") && e.contains("32, 64"),
        "{e}"
    );
    let e = error_of(&options(Method::Rtn, 3), None);
    assert!(e.contains("--bits 3") && e.contains("4 or 8"), "{e}");
    let e = error_of(&options(Method::Awq, 8), Some(&text));
    assert!(e.contains("--bits 8") && e.contains("awq"), "{e}");
    let e = error_of(&options(Method::Fp8, 4), None);
    assert!(e.contains("--bits 4") && e.contains("fp8"), "{e}");
    let e = error_of(&options(Method::Gptq, 4), None);
    assert!(e.contains("--calib"), "{e}");
    let mut o = options(Method::Awq, 4);
    o.act_order = true;
    let e = error_of(&o, Some(&text));
    assert!(e.contains("--act-order"), "{e}");
    let mut o = options(Method::Gptq, 4);
    o.calib_tokens = 1 << 20;
    let e = error_of(&o, Some(&text));
    assert!(e.contains("--calib-tokens"), "{e}");
    for (method, bits, symmetry, flag) in [
        (Method::Gptq, 8, Symmetry::Asymmetric, "--asym"),
        (Method::Awq, 4, Symmetry::Symmetric, "--sym"),
        (Method::Rtn, 8, Symmetry::Asymmetric, "--asym"),
        (Method::Fp8, 8, Symmetry::Symmetric, "--sym"),
    ] {
        let mut o = options(method, bits);
        o.symmetry = Some(symmetry);
        let e = error_of(&o, Some(&text));
        assert!(e.contains(flag), "{method} {symmetry:?}: {e}");
    }
}

/// Logits at the last of `tokens`, prefilled in one step, from the folder at `dir` loaded by
/// minserve's own loader: dequantized to f32 (`repack_for_cpu = false`, the GPU's form) or
/// packed for the CPU kernels.
fn logits_of(dir: &Path, repack_for_cpu: bool, tokens: &[u32]) -> Vec<f32> {
    use minserve_core::{ModelExecutor, StepBatch};
    use minserve_model::{CacheOptions, KvDtype, LlamaModel, ModelRunner};
    let weights =
        minserve_model::safetensors::load_folder_weights(dir, None, repack_for_cpu).unwrap();
    let cache = CacheOptions {
        dtype: KvDtype::F32,
        memory_bytes: 1 << 22,
        ..CacheOptions::default()
    };
    let mut runner = ModelRunner::new(LlamaModel::new(weights), cache);
    let block_size = runner.cache_geometry().block_size;
    // Blocks of its own for each KV group (Gemma's global and local layers).
    let per_group = tokens.len().div_ceil(block_size) as u32;
    let tables: Vec<Vec<u32>> = (0..runner.kv_group_windows().len() as u32)
        .map(|g| (g * per_group..(g + 1) * per_group).collect())
        .collect();
    let mut batch = StepBatch::new();
    batch.push_sequence_groups(tokens, 0, &tables, block_size, true);
    runner.execute(&batch).unwrap().row(0).to_vec()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// What `minserve quantize` writes, minserve loads: every method's folder, read back by the
/// checkpoint loader, is the model its dequantized twin (the quantizer's own f32 values of the
/// same codes) describes. Dequantized, they agree to f32 rounding; on the packed CPU kernels,
/// which also quantize activations (int8 blocks, or bf16 for FP8), to that rounding's size.
#[test]
fn every_written_folder_loads_in_minserve_as_its_dequantized_twin() {
    check_folders_load_as_their_twins("tiny");
}

/// The same for Gemma 3's block: four norms per layer (gate/up read `pre_feedforward_layernorm`,
/// not `post_attention_layernorm`), all stored as `w` of `1 + w`, GeGLU, q/k norms, sliding
/// windows. The twin check alone would pass with AWQ's scales folded into the wrong norm, or
/// into `w` rather than `1 + w` (both folders would hold the same wrong norms); the folded
/// products catch both (measured: AWQ 0.056, round-to-nearest 0.069; folded into `w` 0.146,
/// into `post_attention_layernorm` 0.338).
#[test]
fn gemma3_folders_load_in_minserve_as_their_dequantized_twins() {
    check_folders_load_as_their_twins("tiny-gemma3");
}

/// AWQ divides a norm's multipliers by its scales and multiplies the next projections' input
/// columns by them: the product `W diag(m)` is what the model applies to the normalized input,
/// and it must stay the float model's up to quantization error, scales or not. The largest
/// relative (Frobenius) error of that product over the q/k/v and gate projections of every
/// layer: a scale folded into the wrong norm, or into Gemma's stored `w` instead of `1 + w`,
/// leaves columns off by up to `|1 - s|`, beyond 4-bit rounding.
fn folded_product_error(folder: &Path, float: &Path, preset: &str) -> f32 {
    let config = synthetic::preset(preset).unwrap();
    let norms = minserve_model::hf_norms::HfNorms::of(&config);
    let (a, b) = (std::fs::read(folder), std::fs::read(float));
    let (a, b) = (a.unwrap(), b.unwrap());
    let (a, b) = (
        SafeTensors::deserialize(&a).unwrap(),
        SafeTensors::deserialize(&b).unwrap(),
    );
    let values = |file: &SafeTensors, name: &str| -> Vec<f32> {
        let view = file.tensor(name).unwrap();
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        view.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let mut worst = 0f32;
    for layer in 0..config.num_layers {
        for site in [ProjectionSite::Attention, ProjectionSite::Mlp] {
            let norm = format!(
                "model.layers.{layer}.{}.weight",
                norms.before(site).unwrap()
            );
            let multipliers = |file| -> Vec<f32> {
                let stored = values(file, &norm);
                stored.iter().map(|&w| norms.multiplier(w)).collect()
            };
            let (ma, mb) = (multipliers(&a), multipliers(&b));
            // up_proj's rows also carry down_proj's scales (divided out of them): gate_proj
            // alone stands for the site.
            for p in site.projections().iter().filter(|p| **p != "mlp.up_proj") {
                let name = format!("model.layers.{layer}.{p}.weight");
                let (wa, wb) = (values(&a, &name), values(&b, &name));
                let cols = ma.len();
                let (mut diff, mut size) = (0f32, 0f32);
                for (i, (x, y)) in wa.iter().zip(&wb).enumerate() {
                    let (x, y) = (x * ma[i % cols], y * mb[i % cols]);
                    diff += (x - y) * (x - y);
                    size += y * y;
                }
                worst = worst.max((diff / size).sqrt());
            }
        }
    }
    worst
}

/// Writes every method's folder of `preset`, with its dequantized twin, and checks that minserve
/// loads the folder as the twin, and that AWQ's norm-times-projection products stay as close to
/// the float model's (the GGUF exported to f32) as round-to-nearest's (see
/// [`folded_product_error`]).
fn check_folders_load_as_their_twins(preset: &str) {
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 200).collect();
    let with_symmetry = |mut o: QuantizeOptions, symmetry| {
        o.symmetry = Some(symmetry);
        o
    };
    let cases = [
        ("gptq", options(Method::Gptq, 4), false),
        ("gptq act-order", options(Method::Gptq, 4), true),
        (
            "gptq asymmetric",
            with_symmetry(options(Method::Gptq, 4), Symmetry::Asymmetric),
            true,
        ),
        (
            "rtn 4-bit symmetric",
            with_symmetry(options(Method::Rtn, 4), Symmetry::Symmetric),
            false,
        ),
        ("awq", options(Method::Awq, 4), false),
        ("rtn 4-bit", options(Method::Rtn, 4), false),
        ("rtn 8-bit", options(Method::Rtn, 8), false),
        ("fp8", options(Method::Fp8, 8), false),
    ];
    let mut distance = HashMap::new();
    for (name, mut options, act_order) in cases {
        let twin = tempfile::tempdir().unwrap();
        options.act_order = act_order;
        options.dtype = ExportDType::F32;
        options.dequantized_twin = Some(twin.path().join("twin"));
        let written = run_preset(&options, preset);
        let float = twin.path().join("float");
        minserve_model::export::export_gguf_to_hf(&written.gguf, &float, ExportDType::F32).unwrap();
        let float_logits = logits_of(&float, false, &tokens);
        let twin_logits = logits_of(&twin.path().join("twin"), false, &tokens);
        let scale = twin_logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        let dense = max_abs_diff(&logits_of(&written.out, false, &tokens), &twin_logits);
        let packed = max_abs_diff(&logits_of(&written.out, true, &tokens), &twin_logits);
        let from_float = max_abs_diff(&twin_logits, &float_logits);
        let twin_weights = twin.path().join("twin").join("model.safetensors");
        let product_error =
            folded_product_error(&twin_weights, &float.join("model.safetensors"), preset);
        let alphas: Vec<f32> = written
            .report
            .site_errors
            .iter()
            .filter_map(|e| e.alpha)
            .collect();
        eprintln!(
            "{preset} {name}: dequantized {dense:.2e}, packed {packed:.2e} (logits up to \
             {scale:.2}); from the float model: logits {from_float:.3}, folded products \
             {product_error:.3}; AWQ alphas {alphas:?}"
        );
        assert!(
            dense <= 1e-4 * scale.max(1.0),
            "{name}: dequantized off by {dense}"
        );
        assert!(
            packed <= 0.05 * scale.max(1.0),
            "{name}: packed off by {packed}"
        );
        distance.insert(name, product_error);
    }
    let (awq, rtn) = (distance["awq"], distance["rtn 4-bit"]);
    assert!(
        awq <= 1.5 * rtn,
        "{preset}: AWQ's folded products are {awq} from the float model's, round-to-nearest's {rtn}"
    );
}
