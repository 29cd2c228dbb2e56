//! The GGUF -> Hugging Face export and the safetensors loader, on the real default model:
//! the exported folder must run in candle-transformers' own (non-paged) `llama` exactly as it
//! runs in ours, must agree with the GGUF it came from, and broken folders must fail with errors
//! that name the file and the tensor.

mod common;

use common::{argmax, max_abs_diff, mean_abs_diff};

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use minserve_model::export::{export_gguf_to_hf, ExportDType};
use minserve_model::{load_model, CacheOptions, KvDtype, ModelRunner};

const PROMPT: &str = "The history of the printing press begins";
/// Prompt step plus 32 decode steps.
const STEPS: usize = 33;

fn export(dtype: ExportDType) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let report = export_gguf_to_hf(&common::default_model_path(), dir.path(), dtype).unwrap();
    eprintln!(
        "exported {} tensors, {} bytes, as {dtype}",
        report.num_tensors, report.weights_bytes
    );
    assert!(report.unpermuted_qk, "SmolLM2 is a Llama GGUF");
    dir
}

/// Something that gives last-position logits for `tokens[computed..]` given `computed` cached.
trait Step {
    fn step(&mut self, tokens: &[u32], computed: usize) -> Vec<f32>;
}

/// Ours: the paged runner, one sequence, scattered blocks (as reference_equivalence does).
struct Ours(ModelRunner);

impl Ours {
    fn load(path: &Path) -> (Self, Vec<u32>) {
        let loaded = load_model(path).expect("load");
        let prompt = loaded.tokenizer.encode(PROMPT, false).unwrap();
        (
            // An f32 cache: this compares weight loading, so nothing else may round.
            Self(ModelRunner::new(
                loaded.model,
                CacheOptions {
                    dtype: KvDtype::F32,
                    ..CacheOptions::default()
                },
            )),
            prompt,
        )
    }
}

impl Step for Ours {
    fn step(&mut self, tokens: &[u32], computed: usize) -> Vec<f32> {
        let block_table: Vec<u32> = (0..8).rev().collect();
        common::step_one_sequence(&mut self.0, tokens, computed, &block_table)
    }
}

/// candle-transformers' Llama, reading the folder as any Hugging Face checkpoint.
struct Candle(Llama, Cache);

impl Candle {
    fn load(dir: &Path) -> Self {
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let config: LlamaConfig = serde_json::from_str(&text).unwrap();
        let config = config.into_config(false);
        let files = [dir.join("model.safetensors")];
        // SAFETY: the files are ours, in a tempdir nobody else writes.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }
            .unwrap();
        let model = Llama::load(vb, &config).unwrap();
        let cache = Cache::new(true, DType::F32, &config, &Device::Cpu).unwrap();
        Self(model, cache)
    }
}

impl Step for Candle {
    fn step(&mut self, tokens: &[u32], computed: usize) -> Vec<f32> {
        let input = Tensor::new(&tokens[computed..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        self.0
            .forward(&input, computed, &mut self.1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }
}

struct Comparison {
    worst_max: f32,
    worst_mean: f32,
    top1_agree: usize,
}

/// Teacher-forced: both models see the reference's greedy token at every step, so one early
/// disagreement cannot make the rest of the comparison meaningless.
fn compare(ours: &mut dyn Step, reference: &mut dyn Step, prompt: &[u32]) -> Comparison {
    let mut tokens = prompt.to_vec();
    let mut new = prompt.len();
    let mut c = Comparison {
        worst_max: 0.0,
        worst_mean: 0.0,
        top1_agree: 0,
    };
    for step in 0..STEPS {
        let computed = tokens.len() - new;
        let a = ours.step(&tokens, computed);
        let b = reference.step(&tokens, computed);
        assert_eq!(a.len(), b.len());
        let (max, mean) = (max_abs_diff(&a, &b), mean_abs_diff(&a, &b));
        c.worst_max = c.worst_max.max(max);
        c.worst_mean = c.worst_mean.max(mean);
        let (ta, tb) = (argmax(&a), argmax(&b));
        c.top1_agree += usize::from(ta == tb);
        eprintln!("step {step}: |diff| max {max:.2e} mean {mean:.2e}, top-1 {ta} vs {tb}");
        tokens.push(tb as u32);
        new = 1;
    }
    eprintln!(
        "worst max {:.3e}, worst mean {:.3e}, top-1 {} of {STEPS}",
        c.worst_max, c.worst_mean, c.top1_agree
    );
    c
}

fn compare_with_candle_llama(dtype: ExportDType) -> Comparison {
    let dir = export(dtype);
    let (mut ours, prompt) = Ours::load(dir.path());
    let mut candle = Candle::load(dir.path());
    compare(&mut ours, &mut candle, &prompt)
}

// Both sides run the same f32 weights through plain f32 math; they differ only in summation
// order (our paged 8-lane attention kernel vs candle's gemm; 2-D vs batched matmuls) and in how
// the RoPE tables are computed. Those are rounding-level differences (~1e-7 relative per op)
// that 30 layers amplify a little. Measured on logits of magnitude ~20: max |diff| 3.4e-5, mean
// 1.3e-5 for both the f32 and the f16 folder, top-1 33 of 33. The bounds leave ~15x headroom for
// other CPUs' gemm blocking and SIMD widths; a real bug (q/k left permuted, a wrong norm, a
// missed tie, a wrong RoPE pairing) moves logits by whole units.
const CANDLE_MAX_TOL: f32 = 5e-4;
const CANDLE_MEAN_TOL: f32 = 2e-4;

#[test]
fn exported_f32_folder_matches_candle_llama() {
    let c = compare_with_candle_llama(ExportDType::F32);
    assert!(c.worst_max < CANDLE_MAX_TOL, "max diff {}", c.worst_max);
    assert!(c.worst_mean < CANDLE_MEAN_TOL, "mean diff {}", c.worst_mean);
    assert_eq!(c.top1_agree, STEPS, "top-1 must agree at every step");
}

#[test]
fn exported_f16_folder_matches_candle_llama() {
    // f16 rounding applies to the weights both sides read, so the comparison is as tight as f32.
    let c = compare_with_candle_llama(ExportDType::F16);
    assert!(c.worst_max < CANDLE_MAX_TOL, "max diff {}", c.worst_max);
    assert!(c.worst_mean < CANDLE_MEAN_TOL, "mean diff {}", c.worst_mean);
    assert_eq!(c.top1_agree, STEPS, "top-1 must agree at every step");
}

#[test]
fn exported_f32_folder_agrees_with_the_gguf() {
    let dir = export(ExportDType::F32);
    let (mut folder, prompt) = Ours::load(dir.path());
    let (mut gguf, gguf_prompt) = Ours::load(&common::default_model_path());
    assert_eq!(
        prompt, gguf_prompt,
        "the exported tokenizer must encode identically"
    );
    // The GGUF path multiplies Q4_1 weights by activations quantized to Q8_1; the folder holds
    // the same weights dequantized, multiplied by exact f32 activations. The activation rounding
    // shifts logits by up to ~1, so only top-1 agreement is meaningful here. Measured: max
    // |diff| 1.58, mean 0.35, top-1 32 of 33 (97%).
    let c = compare(&mut folder, &mut gguf, &prompt);
    assert!(
        c.top1_agree * 100 >= STEPS * 90,
        "top-1 agreed on only {} of {STEPS} steps",
        c.top1_agree
    );
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let single = export(ExportDType::F16);
    let sharded = tempfile::tempdir().unwrap();
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(single.path().join(name), sharded.path().join(name)).unwrap();
    }
    let all = candle_core::safetensors::load(single.path().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    // Split as transformers does: by name, each tensor in exactly one shard.
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (name, tensor) in all {
        let shard = usize::from(name.contains("mlp") || name == "model.norm.weight");
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        weight_map.insert(name.clone(), file.into());
        shards[shard].insert(name, tensor);
    }
    for (i, shard) in shards.iter().enumerate() {
        let file = sharded
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", i + 1));
        candle_core::safetensors::save(shard, file).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let (mut a, prompt) = Ours::load(single.path());
    let (mut b, _) = Ours::load(sharded.path());
    assert_eq!(
        a.step(&prompt, 0),
        b.step(&prompt, 0),
        "same weights, same math"
    );
}

// ---- Broken folders: each must be an error that says what is wrong, never a panic. ----

/// A tiny Llama: 1 layer, hidden 8, 2 heads of 4, 1 KV head, vocab 32, tied embeddings.
fn tiny_config(model_type: &str) -> serde_json::Value {
    serde_json::json!({
        "model_type": model_type,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 32,
        "tie_word_embeddings": true,
    })
}

fn tiny_tensors() -> HashMap<String, Tensor> {
    let shapes: &[(&str, &[usize])] = &[
        ("model.embed_tokens.weight", &[32, 8]),
        ("model.layers.0.input_layernorm.weight", &[8]),
        ("model.layers.0.self_attn.q_proj.weight", &[8, 8]),
        ("model.layers.0.self_attn.k_proj.weight", &[4, 8]),
        ("model.layers.0.self_attn.v_proj.weight", &[4, 8]),
        ("model.layers.0.self_attn.o_proj.weight", &[8, 8]),
        ("model.layers.0.post_attention_layernorm.weight", &[8]),
        ("model.layers.0.mlp.gate_proj.weight", &[16, 8]),
        ("model.layers.0.mlp.up_proj.weight", &[16, 8]),
        ("model.layers.0.mlp.down_proj.weight", &[8, 16]),
        ("model.norm.weight", &[8]),
    ];
    shapes
        .iter()
        .map(|(name, shape)| {
            let t = Tensor::ones(*shape, DType::F32, &Device::Cpu).unwrap();
            (name.to_string(), t)
        })
        .collect()
}

fn tiny_folder(
    config: Option<serde_json::Value>,
    tensors: &HashMap<String, Tensor>,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if let Some(config) = config {
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    }
    candle_core::safetensors::save(tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    match load_model(dir) {
        Ok(_) => panic!("{} loaded, but it is broken", dir.display()),
        Err(e) => {
            let message = e.to_string();
            eprintln!("{message}");
            message
        }
    }
}

#[test]
fn folder_without_config_json_is_an_error() {
    let dir = tiny_folder(None, &tiny_tensors());
    let message = load_error(dir.path());
    assert!(message.contains("no config.json"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
}

#[test]
fn unsupported_model_type_is_an_error() {
    let dir = tiny_folder(Some(tiny_config("gpt2")), &tiny_tensors());
    let message = load_error(dir.path());
    assert!(message.contains("config.json"), "{message}");
    assert!(message.contains("`gpt2` is not supported"), "{message}");
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let mut tensors = tiny_tensors();
    tensors.remove("model.layers.0.mlp.up_proj.weight");
    let dir = tiny_folder(Some(tiny_config("llama")), &tensors);
    let message = load_error(dir.path());
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(
        message.contains("`model.layers.0.mlp.up_proj.weight`: missing"),
        "{message}"
    );
}

#[test]
fn wrong_shape_is_an_error_naming_tensor_and_shapes() {
    let mut tensors = tiny_tensors();
    let wrong = Tensor::ones((8, 8), DType::F32, &Device::Cpu).unwrap();
    tensors.insert("model.layers.0.self_attn.k_proj.weight".into(), wrong);
    let dir = tiny_folder(Some(tiny_config("llama")), &tensors);
    let message = load_error(dir.path());
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(
        message.contains("`model.layers.0.self_attn.k_proj.weight`: shape [8, 8]"),
        "{message}"
    );
    assert!(message.contains("[4, 8]"), "{message}");
}

#[test]
fn unsupported_dtype_is_an_error() {
    let mut tensors = tiny_tensors();
    let ints = Tensor::zeros((8, 8), DType::I64, &Device::Cpu).unwrap();
    tensors.insert("model.layers.0.self_attn.q_proj.weight".into(), ints);
    let dir = tiny_folder(Some(tiny_config("llama")), &tensors);
    let message = load_error(dir.path());
    assert!(message.contains("q_proj.weight`: dtype I64"), "{message}");
}

#[test]
fn unreadable_weights_are_errors() {
    let dir = tiny_folder(Some(tiny_config("llama")), &tiny_tensors());
    let weights = dir.path().join("model.safetensors");
    std::fs::write(&weights, b"definitely not safetensors").unwrap();
    let message = load_error(dir.path());
    assert!(
        message.contains("not a readable safetensors file"),
        "{message}"
    );

    std::fs::remove_file(&weights).unwrap();
    let message = load_error(dir.path());
    assert!(message.contains("no model.safetensors"), "{message}");

    // A shard index naming a shard that is not there.
    let index = serde_json::json!({ "weight_map": { "model.norm.weight": "model-00001-of-00001.safetensors" } });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let message = load_error(dir.path());
    assert!(
        message.contains("model-00001-of-00001.safetensors"),
        "{message}"
    );
}

#[test]
fn export_refuses_a_non_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
    let err = export_gguf_to_hf(&common::default_model_path(), dir.path(), ExportDType::F32)
        .expect_err("a non-empty folder must be refused");
    assert!(err.to_string().contains("not empty"), "{err}");
    assert!(dir.path().join("keep.txt").exists());
}

/// Llama 3's RoPE scaling, as llama.cpp's converter stores it (`rope_freqs.weight`, one divisor
/// per frequency, no parameters), through the whole path: the GGUF loads with it, the export
/// writes it as `config.json`'s `rope_scaling`, and candle-transformers' own Llama (an
/// independent implementation of the llama3 formula) reads that folder exactly as ours does.
/// The parameters (factor 8, frequency factors 1 and 4, original context 1024) put four of the
/// default model's 32 frequencies on the ramp.
#[test]
fn llama3_rope_scaling_survives_export_and_matches_candle_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let scaled = tmp.path().join("scaled.gguf");
    let theta = with_llama3_divisors(&common::default_model_path(), &scaled, 8.0, 1024.0);
    let dir = tmp.path().join("hf");
    let report = export_gguf_to_hf(&scaled, &dir, ExportDType::F32).unwrap();
    assert_eq!(report.skipped, ["rope_freqs.weight"]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let scaling = &config["rope_scaling"];
    assert_eq!(scaling["rope_type"], "llama3", "{config}");
    assert_eq!(scaling["factor"], 8.0);
    assert_eq!(scaling["low_freq_factor"], 1.0);
    assert_eq!(scaling["original_max_position_embeddings"], 1024);
    let high = scaling["high_freq_factor"].as_f64().unwrap();
    assert!((high - 4.0).abs() < 1e-3, "{high}");
    assert_eq!(config["rope_theta"].as_f64().unwrap() as f32, theta);

    let (mut ours, prompt) = Ours::load(&dir);
    let mut candle = Candle::load(&dir);
    let c = compare(&mut ours, &mut candle, &prompt);
    assert!(c.worst_max < CANDLE_MAX_TOL, "max diff {}", c.worst_max);
    assert!(c.worst_mean < CANDLE_MEAN_TOL, "mean diff {}", c.worst_mean);
    assert_eq!(c.top1_agree, STEPS, "top-1 must agree at every step");

    // The scaling is not a no-op: the unscaled folder is far from candle's scaled model.
    let plain = export(ExportDType::F32);
    let (mut unscaled, _) = Ours::load(plain.path());
    let mut candle = Candle::load(&dir);
    let c = compare(&mut unscaled, &mut candle, &prompt);
    assert!(
        c.worst_max > 100.0 * CANDLE_MAX_TOL,
        "max diff {}",
        c.worst_max
    );
}

/// Copies the GGUF at `src` to `dst` with a `rope_freqs.weight` for Llama 3 scaling by
/// `factor` (frequency factors 1 and 4) over `original` positions, computed with the published
/// formula in f64 as llama.cpp's converter does. Returns the model's RoPE base.
fn with_llama3_divisors(src: &Path, dst: &Path, factor: f64, original: f64) -> f32 {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    let content = minserve_model::gguf::read_content(src).unwrap();
    let theta = match content.metadata.get("llama.rope.freq_base") {
        Some(v) => v.to_f32().unwrap(),
        None => 10_000.0,
    };
    let config = minserve_model::ModelConfig::from_gguf(&content, src).unwrap();
    let head_dim = config.head_dim;
    let plain =
        common::llama3_reference_frequencies(head_dim, theta as f64, 1.0, 1.0, 4.0, original);
    let scaled =
        common::llama3_reference_frequencies(head_dim, theta as f64, factor, 1.0, 4.0, original);
    let divisors: Vec<f32> = plain
        .iter()
        .zip(&scaled)
        .map(|(p, s)| (p / s) as f32)
        .collect();
    let mut reader = std::io::BufReader::new(std::fs::File::open(src).unwrap());
    let mut tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            (
                name.clone(),
                content.tensor(&mut reader, name, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let freqs = Tensor::new(divisors.as_slice(), &Device::Cpu).unwrap();
    tensors.push((
        "rope_freqs.weight".into(),
        QTensor::quantize(&freqs, GgmlDType::F32).unwrap(),
    ));
    let metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
    theta
}
