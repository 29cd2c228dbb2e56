//! GPTQ, AWQ and compressed-tensors folders, written here byte by byte in each tool's layout
//! (see `crates/model/src/quantized_checkpoint/`) from known codes, scales and zero points:
//! the loaded weights must equal the format's formula, the packed kernels must agree with
//! dequantize-then-dot on every instruction set and be batch-invariant, the model must run as
//! its dequantized f32 twin does, and broken folders must fail naming the field or tensor.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul};
use half::f16;
use minserve_model::qmatmul::{Isa, QInput, QWeight};
use minserve_model::safetensors::load_folder_weights;
use minserve_model::weights::{Linear, LinearWeight, LlamaWeights};
use minserve_model::{CacheOptions, KvDtype, LlamaModel, ModelRunner};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

const HIDDEN: usize = 128;
const FFN: usize = 256;
const VOCAB: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;

/// The projections of a layer with their `[n, k]`.
const PROJECTIONS: [(&str, usize, usize); 7] = [
    ("self_attn.q_proj", HIDDEN, HIDDEN),
    ("self_attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
    ("self_attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
    ("self_attn.o_proj", HIDDEN, HIDDEN),
    ("mlp.gate_proj", FFN, HIDDEN),
    ("mlp.up_proj", FFN, HIDDEN),
    ("mlp.down_proj", HIDDEN, FFN),
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// One projection's known contents: `W[o, i] = scales[o][g_idx[i]] * (codes[o][i] - zeros[o][g_idx[i]])`
/// (4-bit), or `scales[o] * q[o][i]` (int8, `codes` holding `q + 128`).
#[derive(Clone)]
struct Truth {
    n: usize,
    k: usize,
    codes: Vec<u8>,
    scales: Vec<f16>,
    zeros: Vec<u8>,
    groups: usize,
    g_idx: Vec<u32>,
}

impl Truth {
    /// Random codes and f16 scales; `zero` fixed (symmetric) or random; with act-order, the
    /// groups follow the order `perm` of the inputs.
    fn int4(
        rng: &mut Rng,
        n: usize,
        k: usize,
        group: usize,
        zero: Option<u8>,
        perm: Option<&[u32]>,
    ) -> Self {
        let groups = k / group;
        let natural: Vec<u32> = (0..k as u32).collect();
        let mut g_idx = vec![0u32; k];
        for (j, &i) in perm.unwrap_or(&natural).iter().enumerate() {
            g_idx[i as usize] = (j / group) as u32;
        }
        Self {
            n,
            k,
            codes: (0..n * k).map(|_| rng.below(16) as u8).collect(),
            scales: (0..n * groups)
                .map(|_| f16::from_f32(0.002 + 0.02 * rng.unit().abs()))
                .collect(),
            zeros: (0..n * groups)
                .map(|_| zero.unwrap_or_else(|| rng.below(16) as u8))
                .collect(),
            groups,
            g_idx,
        }
    }

    /// GPTQ v1 stores `zero - 1` in 4 bits: a zero of 0 reads back as 16, as its readers do.
    fn read_as_gptq_v1(mut self) -> Self {
        for z in &mut self.zeros {
            if *z == 0 {
                *z = 16;
            }
        }
        self
    }

    fn int8(rng: &mut Rng, n: usize, k: usize) -> Self {
        Self {
            n,
            k,
            codes: (0..n * k).map(|_| rng.below(256) as u8).collect(),
            scales: (0..n)
                .map(|_| f16::from_f32(0.0005 + 0.001 * rng.unit().abs()))
                .collect(),
            zeros: vec![128; n],
            groups: 1,
            g_idx: vec![0; k],
        }
    }

    fn weights(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.n * self.k);
        for o in 0..self.n {
            for i in 0..self.k {
                let g = o * self.groups + self.g_idx[i] as usize;
                let q = self.codes[o * self.k + i] as f32 - self.zeros[g] as f32;
                w.push(self.scales[g].to_f32() * q);
            }
        }
        w
    }

    fn code(&self, o: usize, i: usize) -> u32 {
        self.codes[o * self.k + i] as u32
    }

    fn zero(&self, o: usize, g: usize) -> u32 {
        self.zeros[o * self.groups + g] as u32
    }

    fn scales_transposed(&self) -> Vec<f16> {
        (0..self.groups)
            .flat_map(|g| (0..self.n).map(move |o| (o, g)))
            .map(|(o, g)| self.scales[o * self.groups + g])
            .collect()
    }
}

/// The tensors of one layout: (name, dtype, shape, bytes).
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn i32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// GPTQ; `v2`: zero points stored as they are (v1: minus one).
    Gptq {
        v2: bool,
    },
    Awq,
    /// compressed-tensors pack-quantized.
    Packed,
    /// compressed-tensors int-quantized.
    Int8,
}

const NATURAL: [usize; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

/// `rows` x `n` 4-bit values packed 8 outputs to an int32, nibble `j` of word `c` holding
/// output `8c + order[j]` (GPTQ's `qzeros`, AWQ's `qweight` and `qzeros`).
fn pack_outputs(
    rows: usize,
    n: usize,
    order: &[usize; 8],
    value: impl Fn(usize, usize) -> u32,
) -> Vec<u32> {
    let mut words = vec![0u32; rows * n / 8];
    for r in 0..rows {
        for c in 0..n / 8 {
            for (j, &col) in order.iter().enumerate() {
                words[r * n / 8 + c] |= value(r, 8 * c + col) << (4 * j);
            }
        }
    }
    words
}

/// Writes `t` as `layout` stores a projection `base`.
fn write_projection(layout: Layout, base: &str, t: &Truth, out: &mut Tensors) {
    let (n, k, groups) = (t.n, t.k, t.groups);
    let mut push = |suffix: &str, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>| {
        out.push((format!("{base}.{suffix}"), dtype, shape, bytes))
    };
    // GPTQ's and AWQ's `qzeros` `[groups, n / 8]` and `scales` `[groups, n]`.
    let group_params = |qzeros: &[u32]| {
        [
            ("qzeros", Dtype::I32, vec![groups, n / 8], i32_bytes(qzeros)),
            (
                "scales",
                Dtype::F16,
                vec![groups, n],
                f16_bytes(&t.scales_transposed()),
            ),
        ]
    };
    match layout {
        Layout::Gptq { v2 } => {
            let mut qweight = vec![0u32; k / 8 * n];
            for r in 0..k / 8 {
                for o in 0..n {
                    for j in 0..8 {
                        qweight[r * n + o] |= t.code(o, 8 * r + j) << (4 * j);
                    }
                }
            }
            // v1 stores zero - 1 (16, from a zero of 0, as 15).
            let offset = u32::from(!v2);
            let qzeros = pack_outputs(groups, n, &NATURAL, |g, o| (t.zero(o, g) - offset) & 0xF);
            push("qweight", Dtype::I32, vec![k / 8, n], i32_bytes(&qweight));
            for (suffix, dtype, shape, bytes) in group_params(&qzeros) {
                push(suffix, dtype, shape, bytes);
            }
            push("g_idx", Dtype::I32, vec![k], i32_bytes(&t.g_idx));
        }
        Layout::Awq => {
            const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
            let qweight = pack_outputs(k, n, &ORDER, |i, o| t.code(o, i));
            let qzeros = pack_outputs(groups, n, &ORDER, |g, o| t.zero(o, g));
            push("qweight", Dtype::I32, vec![k, n / 8], i32_bytes(&qweight));
            for (suffix, dtype, shape, bytes) in group_params(&qzeros) {
                push(suffix, dtype, shape, bytes);
            }
        }
        Layout::Packed => {
            let mut packed = vec![0u32; n * k / 8];
            for o in 0..n {
                for i in 0..k {
                    packed[o * k / 8 + i / 8] |= t.code(o, i) << (4 * (i % 8));
                }
            }
            push(
                "weight_packed",
                Dtype::I32,
                vec![n, k / 8],
                i32_bytes(&packed),
            );
            let shape: Vec<u8> = [n as i64, k as i64]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            push("weight_shape", Dtype::I64, vec![2], shape);
            // In the model's float type; f32 here (holding our f16 values exactly).
            let scales: Vec<f32> = t.scales.iter().map(|s| s.to_f32()).collect();
            push(
                "weight_scale",
                Dtype::F32,
                vec![n, groups],
                f32_bytes(&scales),
            );
            if t.zeros.iter().any(|&z| z != 8) {
                let mut zp = vec![0u32; n.div_ceil(8) * groups];
                for o in 0..n {
                    for g in 0..groups {
                        zp[(o / 8) * groups + g] |= t.zero(o, g) << (4 * (o % 8));
                    }
                }
                push(
                    "weight_zero_point",
                    Dtype::I32,
                    vec![n.div_ceil(8), groups],
                    i32_bytes(&zp),
                );
            }
            if t.g_idx.windows(2).any(|w| w[0] > w[1]) {
                push("weight_g_idx", Dtype::I32, vec![k], i32_bytes(&t.g_idx));
            }
        }
        Layout::Int8 => {
            let q: Vec<u8> = t
                .codes
                .iter()
                .map(|&c| (c as i32 - 128) as i8 as u8)
                .collect();
            push("weight", Dtype::I8, vec![n, k], q);
            let scales: Vec<f32> = t.scales.iter().map(|s| s.to_f32()).collect();
            push("weight_scale", Dtype::F32, vec![n, 1], f32_bytes(&scales));
        }
    }
}

/// `quantization_config` for `layout` with `group` inputs per group.
fn quantization_config(layout: Layout, group: usize, symmetric: bool, act_order: bool) -> Value {
    match layout {
        Layout::Gptq { v2 } => json!({
            "quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
            "sym": symmetric, "checkpoint_format": if v2 { "gptq_v2" } else { "gptq" },
            "damp_percent": 0.01, "true_sequential": true
        }),
        Layout::Awq => json!({
            "quant_method": "awq", "bits": 4, "group_size": group, "zero_point": true,
            "version": "gemm", "modules_to_not_convert": null
        }),
        Layout::Packed => json!({
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"], "kv_cache_scheme": null,
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": null,
                "output_activations": null,
                "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                    "strategy": "group", "group_size": group, "dynamic": false,
                    "actorder": if act_order { json!("group") } else { Value::Null }}}}
        }),
        Layout::Int8 => json!({
            "quant_method": "compressed-tensors", "format": "int-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"],
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": true,
                    "dynamic": true, "strategy": "token"},
                "weights": {"num_bits": 8, "type": "int", "symmetric": true,
                    "strategy": "channel", "dynamic": false}}}
        }),
    }
}

/// A tiny Llama folder: known projections in `layout` (or, with `dense`, as f32 `weight`s of
/// their dequantized values), random float embeddings and norms; returns the projections.
struct Folder {
    dir: tempfile::TempDir,
    truths: HashMap<String, Truth>,
}

#[derive(Clone, Copy)]
struct Spec {
    layout: Layout,
    group: usize,
    symmetric: bool,
    act_order: bool,
}

fn write_folder(spec: Spec, dense: bool, seed: u64) -> Folder {
    let mut rng = Rng(seed);
    let mut tensors: Tensors = Vec::new();
    let mut truths = HashMap::new();
    let floats = |name: &str, shape: Vec<usize>, rng: &mut Rng, around: f32| {
        let count = shape.iter().product();
        let v: Vec<f32> = (0..count).map(|_| around + 0.1 * rng.unit()).collect();
        (name.to_string(), Dtype::F32, shape, f32_bytes(&v))
    };
    tensors.push(floats(
        "model.embed_tokens.weight",
        vec![VOCAB, HIDDEN],
        &mut rng,
        0.0,
    ));
    tensors.push(floats("model.norm.weight", vec![HIDDEN], &mut rng, 1.0));
    let permutation = |k: usize, rng: &mut Rng| {
        let mut perm: Vec<u32> = (0..k as u32).collect();
        for i in (1..k).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
        perm
    };
    for l in 0..LAYERS {
        let layer = |rest: &str| format!("model.layers.{l}.{rest}");
        // Act-order: projections that read the same input share its order, as GPTQ's Hessian
        // of that input makes them (q/k/v, gate/up).
        let orders: HashMap<&str, Vec<u32>> = [
            ("self_attn.q_proj", HIDDEN),
            ("self_attn.o_proj", HIDDEN),
            ("mlp.gate_proj", HIDDEN),
            ("mlp.down_proj", FFN),
        ]
        .into_iter()
        .map(|(p, k)| (p, permutation(k, &mut rng)))
        .collect();
        let order_of = |proj: &str| match proj {
            "self_attn.k_proj" | "self_attn.v_proj" => &orders["self_attn.q_proj"],
            "mlp.up_proj" => &orders["mlp.gate_proj"],
            other => &orders[other],
        };
        tensors.push(floats(
            &layer("input_layernorm.weight"),
            vec![HIDDEN],
            &mut rng,
            1.0,
        ));
        tensors.push(floats(
            &layer("post_attention_layernorm.weight"),
            vec![HIDDEN],
            &mut rng,
            1.0,
        ));
        for (proj, n, k) in PROJECTIONS {
            let base = layer(proj);
            let truth = match spec.layout {
                Layout::Int8 => Truth::int8(&mut rng, n, k),
                layout => {
                    let zero = spec.symmetric.then_some(8);
                    let perm = spec.act_order.then(|| order_of(proj).as_slice());
                    let truth = Truth::int4(&mut rng, n, k, spec.group, zero, perm);
                    match layout {
                        Layout::Gptq { v2: false } => truth.read_as_gptq_v1(),
                        _ => truth,
                    }
                }
            };
            if dense {
                let w = truth.weights();
                tensors.push((
                    format!("{base}.weight"),
                    Dtype::F32,
                    vec![n, k],
                    f32_bytes(&w),
                ));
            } else {
                write_projection(spec.layout, &base, &truth, &mut tensors);
            }
            truths.insert(base, truth);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    write_tensors(dir.path(), &tensors);
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
        "tie_word_embeddings": true, "torch_dtype": "float16"
    });
    if !dense {
        config["quantization_config"] =
            quantization_config(spec.layout, spec.group, spec.symmetric, spec.act_order);
    }
    write_config(dir.path(), &config);
    Folder { dir, truths }
}

fn write_tensors(dir: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn write_config(dir: &Path, config: &Value) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
}

fn projection<'a>(weights: &'a LlamaWeights, base: &str) -> &'a Linear {
    let (l, proj) = base
        .strip_prefix("model.layers.")
        .and_then(|r| r.split_once('.'))
        .unwrap();
    let layer = &weights.layers[l.parse::<usize>().unwrap()];
    match proj {
        "self_attn.q_proj" => &layer.q_proj,
        "self_attn.k_proj" => &layer.k_proj,
        "self_attn.v_proj" => &layer.v_proj,
        "self_attn.o_proj" => &layer.o_proj,
        "mlp.gate_proj" => &layer.gate_proj,
        "mlp.up_proj" => &layer.up_proj,
        "mlp.down_proj" => &layer.down_proj,
        other => panic!("no projection {other}"),
    }
}

fn packed<'a>(weights: &'a LlamaWeights, base: &str) -> &'a QWeight {
    match &projection(weights, base).weight {
        LinearWeight::Packed(w) => w,
        LinearWeight::Candle(_) => panic!("{base} is not packed"),
    }
}

/// Every layout the loader reads, with group sizes 32, 64 and 128, symmetric and not, with and
/// without act-order.
fn specs() -> Vec<Spec> {
    let spec = |layout, group, symmetric, act_order| Spec {
        layout,
        group,
        symmetric,
        act_order,
    };
    vec![
        spec(Layout::Gptq { v2: false }, 128, true, false),
        spec(Layout::Gptq { v2: false }, 64, false, true),
        spec(Layout::Gptq { v2: false }, 32, false, false),
        spec(Layout::Gptq { v2: true }, 32, true, true),
        spec(Layout::Awq, 128, false, false),
        spec(Layout::Awq, 64, false, false),
        spec(Layout::Awq, 32, false, false),
        spec(Layout::Packed, 128, true, false),
        spec(Layout::Packed, 32, false, false),
        spec(Layout::Packed, 64, true, true),
        spec(Layout::Int8, 0, true, false),
    ]
}

/// Every spec's folder (seeds from `seed`), loaded for the CPU.
fn loaded_specs(seed: u64) -> Vec<(Spec, Folder, LlamaWeights)> {
    (seed..)
        .zip(specs())
        .map(|(seed, spec)| {
            let folder = write_folder(spec, false, seed);
            let weights = load_folder_weights(folder.dir.path(), None, true).unwrap();
            (spec, folder, weights)
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn loaded_weights_equal_the_formula() {
    for (s, spec) in specs().into_iter().enumerate() {
        let folder = write_folder(spec, false, 1 + s as u64);
        let cpu = load_folder_weights(folder.dir.path(), None, true).unwrap();
        let gpu_form = load_folder_weights(folder.dir.path(), None, false).unwrap();
        for (base, truth) in &folder.truths {
            let want = truth.weights();
            let got = packed(&cpu, base).dequantize().unwrap();
            assert_eq!(
                bits(&got),
                bits(&want),
                "{:?} {base}: packed tiles",
                spec.layout
            );
            // The GPU's form: the same values, dense.
            let LinearWeight::Candle(QMatMul::Tensor(dense)) = &projection(&gpu_form, base).weight
            else {
                panic!("{base}: not dense for the GPU");
            };
            let dense: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(bits(&dense), bits(&want), "{:?} {base}: dense", spec.layout);
        }
    }
}

/// Groups that are not whole blocks of 32 (here 16) do not fit the tiles: such a matrix runs
/// dequantized in f32, with the same values.
#[test]
fn groups_smaller_than_a_block_run_in_f32() {
    let spec = Spec {
        layout: Layout::Gptq { v2: false },
        group: 16,
        symmetric: false,
        act_order: true,
    };
    let folder = write_folder(spec, false, 41);
    let weights = load_folder_weights(folder.dir.path(), None, true).unwrap();
    for (base, truth) in &folder.truths {
        let LinearWeight::Candle(QMatMul::Tensor(dense)) = &projection(&weights, base).weight
        else {
            panic!("{base}: packed with groups of 16");
        };
        let dense: Vec<f32> = dense.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(bits(&dense), bits(&truth.weights()), "{base}");
    }
}

/// `--weights-format` re-quantizes the checkpoint's dequantized values, as for any folder.
#[test]
fn weights_format_requantizes_the_dequantized_values() {
    let spec = specs()[1];
    let folder = write_folder(spec, false, 40);
    let weights = load_folder_weights(folder.dir.path(), Some(GgmlDType::Q8_0), true).unwrap();
    for (base, truth) in &folder.truths {
        let w = packed(&weights, base);
        assert_eq!(w.dtype(), Some(GgmlDType::Q8_0), "{base}");
        let want = truth.weights();
        let got = w.dequantize().unwrap();
        let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Q8_0 of the dequantized values: within half a step of amax / 127 per block.
        assert!(common::max_abs_diff(&got, &want) <= amax / 127.0, "{base}");
    }
}

/// `x W^T` in f32 from the dequantized weights.
fn reference_matmul(w: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for r in 0..m {
        for o in 0..n {
            out[r * n + o] = (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum();
        }
    }
    out
}

fn activations(rng: &mut Rng, m: usize, k: usize) -> Vec<f32> {
    (0..m * k).map(|_| rng.unit()).collect()
}

/// ggml's Q8_1 quantization of one block of 32 activations (`d = amax / 127`, codes rounded
/// half away from zero), with `d` rounded to f16 as stored.
fn quantize_block(x: &[f32]) -> (Vec<i32>, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = x.iter().map(|v| (v * id).round() as i32).collect();
    (q, f16::from_f32(d).to_f32())
}

/// Dequantize-then-dot with the kernels' activation quantization, written from the formula:
/// inputs in group order (stable), activations quantized per block of 32, and per (row, output,
/// block) `acc += (sum((q - z) * x_q) as f32 * scale) * d_x`, blocks in order.
fn reference_quantized_matmul(t: &Truth, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (t.n, t.k);
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by_key(|&i| t.g_idx[i]);
    let mut out = vec![0f32; m * n];
    for r in 0..m {
        let row: Vec<f32> = order.iter().map(|&i| x[r * k + i]).collect();
        let blocks: Vec<(Vec<i32>, f32)> = row.chunks(32).map(quantize_block).collect();
        for o in 0..n {
            let mut acc = 0f32;
            for (b, (xq, dx)) in blocks.iter().enumerate() {
                let g = o * t.groups + t.g_idx[order[32 * b]] as usize;
                let sumi: i32 = (0..32)
                    .map(|j| {
                        (t.codes[o * k + order[32 * b + j]] as i32 - t.zeros[g] as i32) * xq[j]
                    })
                    .sum();
                acc += (sumi as f32 * t.scales[g].to_f32()) * dx;
            }
            out[r * n + o] = acc;
        }
    }
    out
}

#[test]
fn packed_kernels_match_dequantize_then_dot_on_every_isa() {
    let mut rng = Rng(99);
    for (spec, folder, weights) in loaded_specs(100) {
        for (base, truth) in &folder.truths {
            let w = packed(&weights, base);
            let (n, k, m) = (truth.n, truth.k, 11);
            let x = activations(&mut rng, m, k);
            let want = reference_quantized_matmul(truth, &x, m);
            for isa in Isa::available() {
                let mut got = vec![0f32; m * n];
                w.matmul_with(isa, &x, m, &mut got);
                assert_eq!(bits(&got), bits(&want), "{:?} {base} {isa:?}", spec.layout);
            }
            // And near the f32 product: only the activations' rounding (half a step of
            // amax / 127 per value) separates them.
            let exact = reference_matmul(&truth.weights(), &x, m, n, k);
            let rms = (exact.iter().map(|v| v * v).sum::<f32>() / exact.len() as f32).sqrt();
            let err = common::max_abs_diff(&want, &exact);
            assert!(
                err < 0.05 * rms,
                "{:?} {base}: error {err} vs rms {rms}",
                spec.layout
            );
        }
    }
}

#[test]
fn packed_kernels_are_batch_invariant() {
    let mut rng = Rng(7);
    for (spec, folder, weights) in loaded_specs(200) {
        for (base, truth) in &folder.truths {
            let w = packed(&weights, base);
            let (n, k, m) = (truth.n, truth.k, 13);
            let x = activations(&mut rng, m, k);
            for isa in Isa::available() {
                let mut batch = vec![0f32; m * n];
                w.matmul_with(isa, &x, m, &mut batch);
                for r in 0..m {
                    let mut alone = vec![0f32; n];
                    w.matmul_with(isa, &x[r * k..(r + 1) * k], 1, &mut alone);
                    assert_eq!(
                        bits(&alone),
                        bits(&batch[r * n..(r + 1) * n]),
                        "{base} row {r}"
                    );
                }
            }
        }
        // q, k and v share one quantized input (one gather for act-order), as in the model.
        let layer = &weights.layers[0];
        let qkv = [&layer.q_proj, &layer.k_proj, &layer.v_proj];
        let m = 5;
        let x = activations(&mut rng, m, HIDDEN);
        let mut outs: Vec<Vec<f32>> = qkv.iter().map(|l| vec![0f32; m * packed_n(l)]).collect();
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        Linear::forward_many_into(&qkv, &x, m, &mut QInput::new(), &mut slices).unwrap();
        for (l, shared) in qkv.iter().zip(&outs) {
            let mut alone = vec![0f32; shared.len()];
            l.forward_into(&x, m, &mut QInput::new(), &mut alone)
                .unwrap();
            assert_eq!(bits(&alone), bits(shared), "{:?} shared input", spec.layout);
        }
    }
}

fn packed_n(l: &Linear) -> usize {
    match &l.weight {
        LinearWeight::Packed(w) => w.n(),
        LinearWeight::Candle(_) => panic!("not packed"),
    }
}

/// Last-position logits of a short prompt.
fn logits(weights: LlamaWeights) -> Vec<f32> {
    let cache = CacheOptions {
        dtype: KvDtype::F32,
        memory_bytes: 1 << 20,
        ..CacheOptions::default()
    };
    let mut runner = ModelRunner::new(LlamaModel::new(weights), cache);
    let tokens: Vec<u32> = (0..12).map(|i| (i * 7 % VOCAB) as u32).collect();
    common::step_one_sequence(&mut runner, &tokens, 0, &[3, 1, 2, 0])
}

#[test]
fn quantized_folders_run_like_their_dequantized_twins() {
    for (s, spec) in specs().into_iter().enumerate() {
        let seed = 300 + s as u64;
        let quantized = write_folder(spec, false, seed);
        let dense = write_folder(spec, true, seed);
        let ours = logits(load_folder_weights(quantized.dir.path(), None, true).unwrap());
        let twin = logits(load_folder_weights(dense.dir.path(), None, true).unwrap());
        let spread = twin.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = common::max_abs_diff(&ours, &twin);
        // Activations quantized to int8 blocks in 14 matmuls: measured up to 2% of the largest
        // logit; a wrong group map or order would be of the order of the logits.
        assert!(
            err < 0.05 * spread.max(1.0),
            "{:?}: max diff {err}, |logits| {spread}",
            spec.layout
        );
        // The GPU's dense form runs the same f32 arithmetic as the twin.
        let dense_form = logits(load_folder_weights(quantized.dir.path(), None, false).unwrap());
        assert_eq!(
            bits(&dense_form),
            bits(&twin),
            "{:?}: dense form",
            spec.layout
        );
    }
}

/// Loads the folder and returns the error message.
fn load_error(dir: &Path) -> String {
    match load_folder_weights(dir, None, true) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    edit(&mut config["quantization_config"]);
    write_config(dir, &config);
}

/// Rewrites the folder's tensors with `edit` applied.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Tensors)) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    write_tensors(dir, &tensors);
}

const Q: &str = "model.layers.1.self_attn.q_proj";

fn gptq_folder() -> Folder {
    let spec = Spec {
        layout: Layout::Gptq { v2: false },
        group: 64,
        symmetric: false,
        act_order: false,
    };
    write_folder(spec, false, 5)
}

#[test]
fn corrupt_qweight_shape_names_the_tensor() {
    let folder = gptq_folder();
    edit_tensors(folder.dir.path(), |t| {
        let q = t
            .iter_mut()
            .find(|(n, ..)| n == &format!("{Q}.qweight"))
            .unwrap();
        // Same bytes, transposed shape.
        q.2 = vec![q.2[1], q.2[0]];
    });
    let e = load_error(folder.dir.path());
    assert!(
        e.contains(&format!("{Q}.qweight")) && e.contains("shape"),
        "{e}"
    );
}

#[test]
fn truncated_qweight_data_names_the_tensor() {
    let folder = gptq_folder();
    edit_tensors(folder.dir.path(), |t| {
        let q = t
            .iter_mut()
            .find(|(n, ..)| n == &format!("{Q}.qweight"))
            .unwrap();
        q.2[0] /= 2;
        q.3.truncate(q.3.len() / 2);
    });
    let e = load_error(folder.dir.path());
    assert!(e.contains(&format!("{Q}.qweight")), "{e}");
}

#[test]
fn group_size_not_dividing_in_features_is_a_load_error() {
    let folder = gptq_folder();
    edit_config(folder.dir.path(), |qc| qc["group_size"] = json!(48));
    let e = load_error(folder.dir.path());
    assert!(
        e.contains("group_size = 48") && e.contains("qweight"),
        "{e}"
    );
}

#[test]
fn missing_scales_name_the_tensor() {
    let folder = gptq_folder();
    edit_tensors(folder.dir.path(), |t| {
        t.retain(|(n, ..)| n != &format!("{Q}.scales"))
    });
    let e = load_error(folder.dir.path());
    assert!(
        e.contains(&format!("{Q}.scales")) && e.contains("missing"),
        "{e}"
    );

    let spec = Spec {
        layout: Layout::Packed,
        group: 32,
        symmetric: false,
        act_order: false,
    };
    let folder = write_folder(spec, false, 6);
    let zp = format!("{Q}.weight_zero_point");
    edit_tensors(folder.dir.path(), |t| t.retain(|(n, ..)| n != &zp));
    let e = load_error(folder.dir.path());
    assert!(e.contains(&zp) && e.contains("missing"), "{e}");
}

#[test]
fn nan_scale_names_the_tensor() {
    let folder = gptq_folder();
    edit_tensors(folder.dir.path(), |t| {
        let s = t
            .iter_mut()
            .find(|(n, ..)| n == &format!("{Q}.scales"))
            .unwrap();
        s.3[10..12].copy_from_slice(&f16::NAN.to_le_bytes());
    });
    let e = load_error(folder.dir.path());
    assert!(
        e.contains(&format!("{Q}.scales")) && e.contains("not finite"),
        "{e}"
    );
}

#[test]
fn unsupported_quantization_config_values_name_field_and_value() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Layout, Edit, &str, &str)> = vec![
        (
            Layout::Gptq { v2: false },
            Box::new(|qc| qc["bits"] = json!(3)),
            "quantization_config.bits",
            "`3`",
        ),
        (
            Layout::Gptq { v2: false },
            Box::new(|qc| qc["checkpoint_format"] = json!("marlin")),
            "quantization_config.checkpoint_format",
            "`marlin`",
        ),
        (
            Layout::Gptq { v2: false },
            Box::new(|qc| qc["quant_method"] = json!("hqq")),
            "quantization_config.quant_method",
            "`hqq`",
        ),
        (
            Layout::Awq,
            Box::new(|qc| qc["version"] = json!("gemv")),
            "quantization_config.version",
            "`gemv`",
        ),
        (
            Layout::Packed,
            Box::new(|qc| qc["format"] = json!("marlin-24")),
            "quantization_config.format",
            "`marlin-24`",
        ),
        (
            Layout::Packed,
            Box::new(|qc| qc["config_groups"]["group_0"]["weights"]["num_bits"] = json!(8)),
            "quantization_config.config_groups.group_0.weights.num_bits",
            "`8`",
        ),
        (
            Layout::Int8,
            Box::new(|qc| {
                qc["config_groups"]["group_0"]["input_activations"]["dynamic"] = json!(false)
            }),
            "quantization_config.config_groups.group_0.input_activations.dynamic",
            "`false`",
        ),
        (
            Layout::Int8,
            Box::new(|qc| qc["config_groups"]["group_0"]["weights"]["type"] = json!("float")),
            "quantization_config.config_groups.group_0.weights.type",
            "`float`",
        ),
    ];
    for (layout, edit, field, value) in cases {
        let spec = Spec {
            layout,
            group: 32,
            symmetric: true,
            act_order: false,
        };
        let folder = write_folder(spec, false, 8);
        edit_config(folder.dir.path(), edit);
        let e = load_error(folder.dir.path());
        assert!(e.contains(field) && e.contains(value), "{field}: {e}");
    }
}

/// Round-to-nearest 4-bit codes of `w` (`[n, k]`) in contiguous groups: asymmetric (min/max
/// to 0..15) or symmetric (zero 8, scale amax / 7).
fn rtn_int4(w: &[f32], n: usize, k: usize, group: usize, symmetric: bool) -> Truth {
    let groups = k / group;
    let mut t = Truth {
        n,
        k,
        codes: vec![0; n * k],
        scales: vec![f16::ZERO; n * groups],
        zeros: vec![8; n * groups],
        groups,
        g_idx: (0..k).map(|i| (i / group) as u32).collect(),
    };
    for o in 0..n {
        for g in 0..groups {
            let values = &w[o * k + g * group..o * k + (g + 1) * group];
            let (lo, hi) = values
                .iter()
                .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let (scale, zero) = match symmetric {
                true => (lo.abs().max(hi) / 7.0, 8.0),
                false => {
                    let scale = (hi - lo) / 15.0;
                    (
                        scale,
                        if scale > 0.0 {
                            (-lo / scale).round()
                        } else {
                            0.0
                        },
                    )
                }
            };
            let scale = f16::from_f32(scale);
            t.scales[o * groups + g] = scale;
            t.zeros[o * groups + g] = zero as u8;
            let inv = if scale.to_f32() > 0.0 {
                1.0 / scale.to_f32()
            } else {
                0.0
            };
            for (i, &v) in values.iter().enumerate() {
                t.codes[o * k + g * group + i] = (v * inv + zero).round().clamp(0.0, 15.0) as u8;
            }
        }
    }
    t
}

/// Writes round-to-nearest GPTQ (v1, g64, symmetric), AWQ (g64) and compressed-tensors
/// pack-quantized (g64, symmetric; 64 divides the default model's 576 and 1536, 128 does not) copies of the f32 Hugging Face folder `QLOAD_SRC` (e.g.
/// `minserve export` of the default model) under `QLOAD_OUT`, for `minserve bench throughput
/// --model`. Not a check: `cargo test --test quantized_checkpoint -- --ignored write_rtn`.
#[test]
#[ignore = "writes benchmark checkpoints; needs QLOAD_SRC and QLOAD_OUT"]
fn write_rtn_checkpoints() {
    let src = std::path::PathBuf::from(std::env::var("QLOAD_SRC").expect("QLOAD_SRC"));
    let out = std::path::PathBuf::from(std::env::var("QLOAD_OUT").expect("QLOAD_OUT"));
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let layouts = [
        ("gptq-g64", Layout::Gptq { v2: false }, true),
        ("awq-g64", Layout::Awq, false),
        ("ct-w4a16-g64", Layout::Packed, true),
    ];
    for (name, layout, symmetric) in layouts {
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut tensors: Tensors = Vec::new();
        for (tensor, view) in st.tensors() {
            let base = tensor.strip_suffix(".weight").unwrap_or(&tensor);
            let is_projection = tensor.starts_with("model.layers.")
                && PROJECTIONS.iter().any(|(p, ..)| base.ends_with(p));
            if !is_projection {
                tensors.push((
                    tensor.clone(),
                    view.dtype(),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                ));
                continue;
            }
            assert_eq!(view.dtype(), Dtype::F32, "{tensor}");
            let (n, k) = (view.shape()[0], view.shape()[1]);
            let w: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let mut truth = rtn_int4(&w, n, k, 64, symmetric);
            if layout == (Layout::Gptq { v2: false }) {
                truth = truth.read_as_gptq_v1();
            }
            write_projection(layout, base, &truth, &mut tensors);
        }
        write_tensors(&dir, &tensors);
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_str().unwrap().to_string();
            if path.is_file() && !file.ends_with(".safetensors") && file != "config.json" {
                std::fs::copy(&path, dir.join(&file)).unwrap();
            }
        }
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap())
                .unwrap();
        config["quantization_config"] = quantization_config(layout, 64, symmetric, false);
        write_config(&dir, &config);
        eprintln!("wrote {}", dir.display());
    }
}
