//! The paged, batched, chunked forward pass against a naive one on a tiny synthetic model: full
//! causal attention over contiguous K/V, written with plain candle ops, no cache at all.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Tensor, D};
use minserve_core::sampling::Rng;
use minserve_core::sequence::{Sequence, RELEASED_BLOCK};
use minserve_core::{ModelExecutor, StepBatch};
use minserve_model::config::{Activation, RopeScaling};
use minserve_model::weights::{Linear, LinearWeight, LlamaWeights};
use minserve_model::{synthetic, CacheOptions, KvDtype, LlamaModel, ModelRunner, RopeStyle};

/// `x W^T (+ b)` for a tensor `[.., in]`: the textbook form of a layer, on tensors.
fn linear(layer: &Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    let y = match &layer.weight {
        LinearWeight::Packed(w) => w.forward(x)?,
        LinearWeight::Candle(w) => w.forward(x)?,
    };
    match &layer.bias {
        Some(bias) => y.broadcast_add(bias),
        None => Ok(y),
    }
}

/// RoPE frequencies at base `theta`, stretched as Llama 3.1 publishes it, computed apart from
/// `rope.rs`.
fn reference_frequencies(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Vec<f32> {
    let plain = (0..head_dim)
        .step_by(2)
        .map(|i| 1f32 / theta.powf(i as f32 / head_dim as f32));
    match *scaling {
        RopeScaling::None => plain.collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => common::llama3_reference_frequencies(
            head_dim,
            theta as f64,
            factor as f64,
            low_freq_factor as f64,
            high_freq_factor as f64,
            original_context as f64,
        )
        .into_iter()
        .map(|f| f as f32)
        .collect(),
        ref other => panic!("the reference has no {other:?}"),
    }
}

/// Logits at every position of `tokens`, computed the textbook way: full causal attention
/// (within the window, on a sliding-window layer) over contiguous K/V, and the architecture's
/// extra norms, activation and embedding scale spelled out.
fn naive_logits(w: &LlamaWeights, tokens: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
    let c = &w.config;
    let dev = Device::Cpu;
    let t = tokens.len();
    let eps = c.rms_norm_eps as f32;
    let cos_sin = |theta: f32, scaling: &RopeScaling| -> candle_core::Result<(Tensor, Tensor)> {
        let inv = reference_frequencies(c.head_dim, theta, scaling);
        let inv = Tensor::new(inv.as_slice(), &dev)?.unsqueeze(0)?;
        let pos = Tensor::arange(0u32, t as u32, &dev)?
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let angles = pos.broadcast_mul(&inv)?;
        Ok((angles.cos()?, angles.sin()?))
    };
    let global_rope = cos_sin(c.rope_theta, &c.rope_scaling)?;
    // Query i sees key j when j <= i and, within a window of w, i - j < w.
    let mask = |window: Option<usize>| {
        let mask: Vec<f32> = (0..t * t)
            .map(|n| {
                let (i, j) = (n / t, n % t);
                if j > i || window.is_some_and(|w| i - j >= w) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(mask, (t, t), &dev)
    };
    let global_mask = mask(None)?;
    let scale = (c.block.query_pre_attn_scalar.unwrap_or(c.head_dim) as f64).sqrt();
    let heads = |x: &Tensor, n: usize| -> candle_core::Result<Tensor> {
        x.reshape((1, t, n, c.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let group = c.num_heads / c.num_kv_heads;
    let repeat = |x: Tensor| -> candle_core::Result<Tensor> {
        // [1, kv, t, d] -> [1, kv * group, t, d], each KV head serving `group` query heads.
        let (b, kv, t, d) = x.dims4()?;
        x.unsqueeze(2)?
            .expand((b, kv, group, t, d))?
            .reshape((b, kv * group, t, d))
    };

    // An optional norm: applied when the architecture has it.
    let norm = |x: Tensor, weight: &Option<Tensor>| match weight {
        Some(weight) => candle_nn::ops::rms_norm(&x, weight, eps),
        None => Ok(x),
    };

    let ids = Tensor::new(tokens, &dev)?;
    let mut x = w.embedding.dense()?.index_select(&ids, 0)?;
    if c.block.scale_embeddings {
        x = (x * (c.hidden_size as f32).sqrt() as f64)?;
    }
    for (index, layer) in w.layers.iter().enumerate() {
        // Every `pattern`-th layer (from 1) is global, the others see a window at their own base.
        let window = c
            .block
            .sliding_window
            .filter(|sw| (index + 1) % sw.pattern != 0);
        let ((cos, sin), mask) = match window {
            Some(sw) => (
                cos_sin(sw.local_rope_theta, &RopeScaling::None)?,
                mask(Some(sw.size))?,
            ),
            None => (global_rope.clone(), global_mask.clone()),
        };
        let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
        let q = norm(
            heads(&linear(&layer.q_proj, &h)?, c.num_heads)?,
            &layer.q_norm,
        )?;
        let k = norm(
            heads(&linear(&layer.k_proj, &h)?, c.num_kv_heads)?,
            &layer.k_norm,
        )?;
        let v = heads(&linear(&layer.v_proj, &h)?, c.num_kv_heads)?;
        let rope = match c.rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i,
            RopeStyle::Neox => candle_nn::rotary_emb::rope,
        };
        let q = rope(&q, &cos, &sin)?;
        let k = repeat(rope(&k, &cos, &sin)?)?;
        let v = repeat(v)?;
        let scores = (q.matmul(&k.t()?)? / scale)?.broadcast_add(&mask)?;
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
        let attn = attn
            .transpose(1, 2)?
            .reshape((t, c.num_heads * c.head_dim))?;
        x = (norm(linear(&layer.o_proj, &attn)?, &layer.post_attention_norm)? + x)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
        let gate = linear(&layer.gate_proj, &h)?;
        let gate = match c.block.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            // candle's `gelu` is the tanh approximation.
            Activation::GeluTanh => gate.gelu()?,
        };
        let down = linear(&layer.down_proj, &(gate * linear(&layer.up_proj, &h)?)?)?;
        x = (norm(down, &layer.post_ffn_norm)? + x)?;
    }
    let x = candle_nn::ops::rms_norm(&x, &w.final_norm, eps)?;
    linear(&w.lm_head, &x)?.to_vec2::<f32>()
}

fn tiny_runner(preset: &str, dtype: KvDtype, block_size: usize, num_blocks: usize) -> ModelRunner {
    let config = synthetic::preset(preset).unwrap();
    let weights = synthetic::build(&config, 42, GgmlDType::F32, true).unwrap();
    let mut runner = ModelRunner::new(
        LlamaModel::new(weights),
        CacheOptions {
            block_size,
            memory_bytes: 0,
            dtype,
        },
    );
    runner.cache =
        minserve_model::KvCache::new(runner.model.config(), dtype, block_size, num_blocks);
    runner
}

/// Llama: interleaved RoPE pairs, no bias, tied embeddings. With an f32 cache, only the order
/// of float operations differs from the naive pass.
#[test]
fn paged_attention_matches_naive_attention() {
    check_against_naive("tiny", KvDtype::F32, 1e-4);
}

/// Qwen2: q/k/v bias, NeoX RoPE pairs, separate lm_head.
#[test]
fn qwen2_variant_matches_naive_attention() {
    check_against_naive("tiny-qwen2", KvDtype::F32, 1e-4);
}

/// Llama 3's RoPE scaling, against the published formula in the naive pass.
#[test]
fn llama3_rope_scaling_matches_naive_attention() {
    check_against_naive("tiny-llama3", KvDtype::F32, 1e-4);
}

/// Gemma 3's block: GeGLU, q/k norms, post-norms, scaled embeddings, and sliding-window layers
/// (window 8) at their own RoPE base: prompts of 19 and 41 tokens run far past the window, in
/// chunks that start inside and outside it.
#[test]
fn gemma3_variant_matches_naive_attention() {
    check_against_naive("tiny-gemma3", KvDtype::F32, 1e-4);
    check_against_naive("tiny-gemma3", KvDtype::F16, 1e-4);
}

/// Qwen3: per-head q/k RMSNorm before RoPE, NeoX pairs, no bias, and heads of 32 on a hidden
/// size of 64 (query width 128: the head size is its own, not hidden / heads).
#[test]
fn qwen3_variant_matches_naive_attention() {
    let config = synthetic::preset("tiny-qwen3").unwrap();
    assert_ne!(config.num_heads * config.head_dim, config.hidden_size);
    check_against_naive("tiny-qwen3", KvDtype::F32, 1e-4);
    check_against_naive("tiny-qwen3", KvDtype::F16, 1e-4);
}

/// The default f16 cache rounds every cached value to 11 significant bits (relative error up to
/// 2^-11); on these models the logits still stay within the f32 tolerance, which also proves
/// the widening path reads the same slots.
#[test]
fn f16_cache_stays_close_to_naive_attention() {
    check_against_naive("tiny", KvDtype::F16, 1e-4);
    check_against_naive("tiny-qwen2", KvDtype::F16, 1e-4);
}

/// The q8 cache rounds every cached key and value to within half of 1/127 of its row's largest
/// magnitude, coarser than f16's 11 significant bits, so the tolerance is 10x the f16 one.
/// Measured: worst 1.2e-4 (tiny) and 3.1e-4 (tiny-qwen2) of the logits' magnitude, against
/// 6e-6 and 1.6e-5 with f16; a kernel that dropped or misplaced the scales is off by whole
/// units.
#[test]
fn q8_cache_stays_close_to_naive_attention() {
    check_against_naive("tiny", KvDtype::Q8, 1e-3);
    check_against_naive("tiny-qwen2", KvDtype::Q8, 1e-3);
}

/// The fp8 cache rounds every cached key and value to 3 mantissa bits (a relative half-step
/// of 2^-4): coarser than q8 for the large components that dominate a dot product, finer for
/// small ones. Measured: worst 5.9e-4 (tiny) and 1.9e-3 (tiny-qwen2) of the logits'
/// magnitude; a kernel that dropped or misplaced the scales is off by whole units.
#[test]
fn fp8_cache_stays_close_to_naive_attention() {
    check_against_naive("tiny", KvDtype::Fp8, 5e-3);
    check_against_naive("tiny-qwen2", KvDtype::Fp8, 5e-3);
}

/// Three sequences of lengths that are not multiples of any block size tried, prefilled in
/// chunks of different sizes in shared steps, with scattered blocks from the real block manager,
/// then decoded together; every sampled row must match the naive logits at that position. On a
/// sliding-window model, the local layers' blocks that the window has passed are released and
/// reused while the sequences run.
fn check_against_naive(preset: &str, dtype: KvDtype, tolerance: f32) {
    let lengths = [1usize, 19, 41];
    let mut rng = Rng::new(7);
    let prompts: Vec<Vec<u32>> = lengths
        .iter()
        .map(|&n| (0..n).map(|_| (rng.next_u64() % 256) as u32).collect())
        .collect();
    let decode_steps = 6usize;
    let mut worst = 0f32;
    let mut released = 0;
    for block_size in [1usize, 3, 16] {
        for chunk in [4usize, 7, 64] {
            let per_seq_blocks = (41 + decode_steps).div_ceil(block_size);
            let config = synthetic::preset(preset).unwrap();
            let groups = minserve_model::KvGroups::of(&config).num_groups();
            let num_blocks = per_seq_blocks * prompts.len() * groups + 64;
            let mut runner = tiny_runner(preset, dtype, block_size, num_blocks);
            let mut blocks = common::Blocks::scattered(&runner, rng.next_u64());
            let mut seqs: Vec<Sequence> = prompts
                .iter()
                .enumerate()
                .map(|(i, p)| Sequence::new(i as u64, p.clone(), 0, i as u64))
                .collect();
            let mut checked = 0;
            for step in 0..64 {
                let mut batch = StepBatch::new();
                let mut in_batch = Vec::new();
                for (s, seq) in seqs.iter_mut().enumerate() {
                    let n = seq.num_pending_tokens().min(chunk);
                    if n == 0 {
                        continue;
                    }
                    blocks.push(&mut batch, seq, n, true);
                    in_batch.push((s, seq.num_computed_tokens + n));
                }
                if batch.is_empty() {
                    break;
                }
                blocks.finish(&mut batch);
                let logits = runner.execute(&batch).unwrap();
                for (row, &(s, upto)) in in_batch.iter().enumerate() {
                    let seq = &mut seqs[s];
                    seq.num_computed_tokens = upto;
                    let naive = naive_logits(&runner.model.weights, &seq.tokens[..upto]).unwrap();
                    let expected = &naive[upto - 1];
                    let scale = expected.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let diff = logits
                        .row(row)
                        .iter()
                        .zip(expected)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    worst = worst.max(diff / scale);
                    assert!(
                        diff <= tolerance * scale,
                        "block {block_size}, chunk {chunk}, step {step}, seq {s} at {upto}: diff {diff}"
                    );
                    checked += 1;
                    // Once the prompt is in, extend the sequence with its greedy token.
                    if upto == seq.len() && seq.len() < prompts[s].len() + decode_steps {
                        seq.tokens
                            .push(minserve_core::sampling::argmax(logits.row(row)));
                    }
                }
            }
            released += seqs
                .iter()
                .flat_map(|s| s.block_tables.iter().flatten())
                .filter(|&&id| id == RELEASED_BLOCK)
                .count();
            assert!(
                checked >= prompts.len() * decode_steps,
                "only {checked} rows checked"
            );
        }
    }
    eprintln!("{preset} {dtype:?}: worst difference {worst:e} of the logits' magnitude, {released} blocks released");
    let windowed = synthetic::preset(preset)
        .unwrap()
        .block
        .sliding_window
        .is_some();
    assert_eq!(
        windowed,
        released > 0,
        "{preset}: released {released} blocks"
    );
}

/// A tiny Qwen3 read from a Hugging Face folder (`model_type: qwen3`, `self_attn.q_norm` /
/// `k_norm`, an explicit `head_dim`), from a GGUF of the same tensors (`qwen3.*` keys,
/// `attn_q_norm` / `attn_k_norm`, `attention.key_length`), and from that GGUF exported to a
/// folder: every config says what Qwen3 is, keeps the q/k norms as written, and every forward
/// pass matches the naive one (and the others).
#[test]
fn qwen3_loads_from_a_folder_and_a_gguf() {
    use candle_core::quantized::{gguf_file, QTensor};
    let (hidden, ff, layers, heads, kv_heads, head_dim, vocab) = (64, 128, 2, 4, 2, 32, 512);
    let mut rng = Rng::new(11);
    let mut random = |shape: &[usize], center: f32, spread: f32| {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| center + spread * ((rng.next_u64() % 2001) as f32 / 1000.0 - 1.0))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    };
    // (Hugging Face name, GGUF name, tensor)
    let mut tensors: Vec<(String, String, Tensor)> = vec![
        (
            "model.embed_tokens.weight".into(),
            "token_embd.weight".into(),
            random(&[vocab, hidden], 0.0, 0.05),
        ),
        (
            "model.norm.weight".into(),
            "output_norm.weight".into(),
            random(&[hidden], 1.0, 0.1),
        ),
    ];
    for i in 0..layers {
        let q_dim = heads * head_dim;
        let kv_dim = kv_heads * head_dim;
        let per_layer: [(&str, &str, Vec<usize>, f32); 11] = [
            ("input_layernorm", "attn_norm", vec![hidden], 1.0),
            ("self_attn.q_proj", "attn_q", vec![q_dim, hidden], 0.0),
            ("self_attn.k_proj", "attn_k", vec![kv_dim, hidden], 0.0),
            ("self_attn.v_proj", "attn_v", vec![kv_dim, hidden], 0.0),
            ("self_attn.o_proj", "attn_output", vec![hidden, q_dim], 0.0),
            ("self_attn.q_norm", "attn_q_norm", vec![head_dim], 1.0),
            ("self_attn.k_norm", "attn_k_norm", vec![head_dim], 1.0),
            ("post_attention_layernorm", "ffn_norm", vec![hidden], 1.0),
            ("mlp.gate_proj", "ffn_gate", vec![ff, hidden], 0.0),
            ("mlp.up_proj", "ffn_up", vec![ff, hidden], 0.0),
            ("mlp.down_proj", "ffn_down", vec![hidden, ff], 0.0),
        ];
        for (hf, gguf, shape, center) in per_layer {
            let spread = if center == 1.0 { 0.3 } else { 0.1 };
            tensors.push((
                format!("model.layers.{i}.{hf}.weight"),
                format!("blk.{i}.{gguf}.weight"),
                random(&shape, center, spread),
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();

    let folder = dir.path().join("qwen3");
    std::fs::create_dir(&folder).unwrap();
    let config_json = serde_json::json!({
        "model_type": "qwen3", "hidden_size": hidden, "intermediate_size": ff,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
        "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
        "attention_bias": false, "tie_word_embeddings": true,
    });
    std::fs::write(folder.join("config.json"), config_json.to_string()).unwrap();
    let by_hf_name: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(hf, _, t)| (hf.clone(), t.clone()))
        .collect();
    candle_core::safetensors::save(&by_hf_name, folder.join("model.safetensors")).unwrap();
    let config = minserve_model::ModelConfig::from_hf_config(&folder.join("config.json")).unwrap();
    synthetic::tokenizer(&config)
        .unwrap()
        .write_hf_files(&folder)
        .unwrap();

    let gguf = dir.path().join("qwen3.gguf");
    let u32_value = |v: usize| gguf_file::Value::U32(v as u32);
    // The synthetic tokenizer's keys, so that the file exports like a real one.
    let mut metadata: Vec<(&str, gguf_file::Value)> = Vec::new();
    let tokenizer_metadata = synthetic::tokenizer_metadata(&config).unwrap();
    for (key, value) in tokenizer_metadata.iter() {
        if key.starts_with("tokenizer.") {
            metadata.push((key.as_str(), value.clone()));
        }
    }
    metadata.extend([
        (
            "general.architecture",
            gguf_file::Value::String("qwen3".into()),
        ),
        ("qwen3.embedding_length", u32_value(hidden)),
        ("qwen3.feed_forward_length", u32_value(ff)),
        ("qwen3.block_count", u32_value(layers)),
        ("qwen3.attention.head_count", u32_value(heads)),
        ("qwen3.attention.head_count_kv", u32_value(kv_heads)),
        ("qwen3.attention.key_length", u32_value(head_dim)),
        ("qwen3.attention.value_length", u32_value(head_dim)),
        ("qwen3.context_length", u32_value(40960)),
        ("qwen3.rope.freq_base", gguf_file::Value::F32(1_000_000.0)),
        (
            "qwen3.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(1e-6),
        ),
    ]);
    let quantized: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(_, name, t)| (name.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let quantized: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(
        &mut std::fs::File::create(&gguf).unwrap(),
        &metadata,
        &quantized,
    )
    .unwrap();
    let content = minserve_model::gguf::read_content(&gguf).unwrap();

    let from_folder = minserve_model::load_model(&folder).unwrap().model;
    let from_gguf =
        LlamaModel::new(minserve_model::gguf::load(&gguf, &content, None, true).unwrap());
    // `minserve export` of the GGUF: a folder transformers would read as Qwen3.
    let exported = dir.path().join("exported");
    minserve_model::export::export_gguf_to_hf(&gguf, &exported, Default::default()).unwrap();
    let exported_config = std::fs::read_to_string(exported.join("config.json")).unwrap();
    let exported_config: serde_json::Value = serde_json::from_str(&exported_config).unwrap();
    assert_eq!(exported_config["architectures"][0], "Qwen3ForCausalLM");
    assert_eq!(exported_config["head_dim"], head_dim);
    let from_export = minserve_model::load_model(&exported).unwrap().model;
    let prompt: Vec<u32> = (0..23).map(|_| (rng.next_u64() % 256) as u32).collect();
    let mut last_rows = Vec::new();
    let models = [
        ("folder", from_folder),
        ("gguf", from_gguf),
        ("exported", from_export),
    ];
    for (source, model) in models {
        let c = model.config().clone();
        assert_eq!(c.architecture, "qwen3", "{source}");
        assert!(c.block.qk_norm && !c.attention_bias, "{source}");
        assert_eq!(
            (c.head_dim, c.rope_style),
            (head_dim, RopeStyle::Neox),
            "{source}"
        );
        let written = &tensors
            .iter()
            .find(|(hf, _, _)| hf.ends_with("1.self_attn.k_norm.weight"));
        let read = model.weights.layers[1]
            .k_norm
            .as_ref()
            .expect("k_norm read");
        assert_eq!(
            read.to_vec1::<f32>().unwrap(),
            written.unwrap().2.to_vec1::<f32>().unwrap(),
            "{source}"
        );
        let naive = naive_logits(&model.weights, &prompt).unwrap();
        let mut runner = ModelRunner::new(
            model,
            CacheOptions {
                block_size: 16,
                memory_bytes: 1 << 20,
                dtype: KvDtype::F32,
            },
        );
        let mut blocks = common::Blocks::new(&runner);
        let mut seq = Sequence::new(0, prompt.clone(), 0, 0);
        let mut batch = StepBatch::new();
        blocks.push(&mut batch, &mut seq, prompt.len(), true);
        blocks.finish(&mut batch);
        let logits = runner.execute(&batch).unwrap().row(0).to_vec();
        let expected = &naive[prompt.len() - 1];
        let scale = expected.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = common::max_abs_diff(&logits, expected);
        assert!(diff <= 1e-4 * scale, "{source}: {diff}");
        last_rows.push(logits);
    }
    for (source, row) in [("gguf", &last_rows[1]), ("exported", &last_rows[2])] {
        let diff = common::max_abs_diff(&last_rows[0], row);
        assert!(diff <= 1e-5, "folder and {source} differ by {diff}");
    }
}
