//! Quantized matmul speed on the default model's own weights: minserve's batched `QWeight`
//! against candle's `QMatMul` on the same tensors, for the decode batch sizes that continuous
//! batching produces. Both run through `forward` on a `[m, k]` tensor (output allocated per call,
//! as in the model), alternating rounds so that both see the same machine state; medians.
//!
//! 1. Per shape, one weight called over and over (it stays in cache): kernel throughput; then the
//!    same for gemma3-270m's k-quant shapes (Q4_K attention output and MLP down, Q6_K MLP down).
//! 2. One whole decode step (every layer's projections and the lm_head, weights streaming from
//!    memory as in the model): time per token at each batch size, i.e. the batching gain.
//! 3. The checkpoint formats (issue 18's loaders) on the same two real matrices, on every
//!    instruction set this machine has: the GGUF's Q4_1 blocks against 4-bit codes with
//!    integer zero points (GPTQ/AWQ/compressed-tensors asymmetric), symmetric 4-bit (Q4_0's
//!    tiles), int8 (W8A8 on the Q8_0 kernels) and FP8 E4M3 (W8A16 bf16 and W8A8 activations).
//!
//! 4. The machine's int8 peak: independent 512-bit `vpdpbusd` chains on as many threads as the
//!    model's pool has, the ceiling every int8 kernel here is measured against. The shapes table
//!    gives each kernel's share of it (`% peak`).
//!
//! `cargo bench -p minserve-benches --bench qmatmul` (`-- shapes`, `-- gemma`, `-- model`,
//! `-- formats` or `-- peak` for one part)

use std::time::Instant;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use half::f16;
use minserve_benches::{catalog_model_path, default_model_path, median};
use minserve_model::e4m3;
use minserve_model::qmatmul::{Fp8Activations, Isa, QWeight};

const MS: [usize; 4] = [1, 8, 32, 64];
const ROUNDS: usize = 9;
/// Target time of one timed round, per implementation.
const ROUND_SECS: f64 = 0.02;

/// (label, tensor) for each distinct projection shape.
const SHAPES: [(&str, &str); 5] = [
    ("attn_q/o 576->576", "blk.0.attn_q.weight"),
    ("attn_k/v 576->192", "blk.0.attn_k.weight"),
    ("ffn_gate/up 576->1536", "blk.0.ffn_gate.weight"),
    ("ffn_down 1536->576", "blk.0.ffn_down.weight"),
    ("lm_head 576->49152", "token_embd.weight"),
];

/// gemma3-270m's k-quant matrices: (label, projection, type); the first layer storing the
/// projection in that type is measured.
const GEMMA_SHAPES: [(&str, &str, GgmlDType); 3] = [
    ("gemma o 1024->640", "attn_output", GgmlDType::Q4K),
    ("gemma down 2048->640", "ffn_down", GgmlDType::Q4K),
    ("gemma down 2048->640", "ffn_down", GgmlDType::Q6K),
];

fn main() {
    // `-- shapes`, `-- gemma` or `-- model` runs those parts only.
    let args: Vec<String> = std::env::args().skip(1).collect();
    const PARTS: [&str; 5] = ["shapes", "gemma", "model", "formats", "peak"];
    let only = |part: &str| {
        !args.iter().any(|a| PARTS.contains(&a.as_str())) || args.iter().any(|a| a == part)
    };
    let path = default_model_path();
    let mut file = std::fs::File::open(&path).expect("open model");
    let content = gguf_file::Content::read(&mut file).expect("gguf");
    let threads = minserve_model::pool::pool().num_threads();
    let peak = int8_peak::measure(threads);
    match peak {
        Some(peak) => println!(
            "int8 peak: {:.1} GFLOP/s on {threads} threads ({:.2} G vpdpbusd/s per thread; \
             2 operations per multiply-add, as the kernels' GF/s count them)",
            peak,
            peak / 128.0 / threads as f64
        ),
        None => println!("int8 peak: not measured (no AVX-512 VNNI)"),
    }
    if only("shapes") {
        let named: Vec<(String, String)> = SHAPES
            .iter()
            .map(|&(label, name)| (label.to_string(), name.to_string()))
            .collect();
        shapes(&content, &mut file, &named, peak);
    }
    if only("gemma") {
        let mut file = std::fs::File::open(catalog_model_path("gemma3-270m")).expect("open");
        let content = gguf_file::Content::read(&mut file).expect("gguf");
        let named: Vec<(String, String)> = GEMMA_SHAPES
            .iter()
            .map(|&(label, proj, dtype)| {
                let name = (0..)
                    .map(|l| format!("blk.{l}.{proj}.weight"))
                    .take_while(|name| content.tensor_infos.contains_key(name))
                    .find(|name| content.tensor_infos[name].ggml_dtype == dtype)
                    .unwrap_or_else(|| panic!("no {proj} of type {dtype:?}"));
                (label.to_string(), name)
            })
            .collect();
        shapes(&content, &mut file, &named, peak);
    }
    if only("model") {
        model_step(&content, &mut file);
    }
    if only("formats") {
        formats(&content, &mut file);
    }
}

/// `len` activations in [-0.5, 0.5) from an xorshift state, the same on every machine.
fn random_activations(seed: &mut u64, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Calls per timed round so that one round takes about [`ROUND_SECS`].
fn calls_per_round(f: &dyn Fn()) -> usize {
    f();
    let start = Instant::now();
    f();
    ((ROUND_SECS / start.elapsed().as_secs_f64()) as usize).clamp(1, 10_000)
}

/// The same real matrix in each checkpoint format's packed form: `(label, weight)`.
fn format_variants(w: &[f32], n: usize, k: usize, q4_1: QWeight) -> Vec<(&'static str, QWeight)> {
    let nb = k / 32;
    // Round-to-nearest per column and block of 32, as the 4-bit checkpoints store it.
    let mut codes = vec![0u8; n * k];
    let (mut scales, mut zeros) = (Vec::with_capacity(n * nb), Vec::with_capacity(n * nb));
    let (mut sym_codes, mut sym_scales) = (vec![0u8; n * k], Vec::with_capacity(n * nb));
    let (mut i8_codes, mut i8_scales) = (vec![0i8; n * k], Vec::with_capacity(n * nb));
    for c in 0..n {
        for b in 0..nb {
            let at = c * k + b * 32;
            let block = &w[at..at + 32];
            let lo = block.iter().fold(0f32, |m, &v| m.min(v));
            let hi = block.iter().fold(0f32, |m, &v| m.max(v));
            let scale = f16::from_f32(((hi - lo) / 15.0).max(1e-6));
            let zero = (-lo / scale.to_f32()).round().clamp(0.0, 15.0);
            for (j, &v) in block.iter().enumerate() {
                codes[at + j] = ((v / scale.to_f32()).round() + zero).clamp(0.0, 15.0) as u8;
            }
            scales.push(scale);
            zeros.push(zero as u8);
            let magnitude = hi.max(-lo).max(1e-6);
            let sym = f16::from_f32(magnitude / 7.5);
            let i8_scale = f16::from_f32(magnitude / 127.0);
            for (j, &v) in block.iter().enumerate() {
                sym_codes[at + j] = ((v / sym.to_f32()).round() + 8.0).clamp(0.0, 15.0) as u8;
                i8_codes[at + j] = (v / i8_scale.to_f32()).round().clamp(-127.0, 127.0) as i8;
            }
            sym_scales.push(sym);
            i8_scales.push(i8_scale);
        }
    }
    let column_scales: Vec<f32> = w
        .chunks_exact(k)
        .map(|col| col.iter().fold(0f32, |m, &v| m.max(v.abs())).max(1e-6) / 448.0)
        .collect();
    let e4m3: Vec<u8> = w
        .chunks_exact(k)
        .zip(&column_scales)
        .flat_map(|(col, &s)| col.iter().map(move |&v| e4m3::encode(v / s)))
        .collect();
    let fp8 = |activations| QWeight::from_e4m3(&e4m3, n, k, &column_scales, activations);
    vec![
        ("Q4_1 (GGUF)", q4_1),
        (
            "int4 zero-point",
            QWeight::from_int4(n, k, &codes, &scales, &zeros, None).expect("int4"),
        ),
        (
            "int4 symmetric",
            QWeight::from_int4(n, k, &sym_codes, &sym_scales, &vec![8; n * nb], None)
                .expect("int4"),
        ),
        (
            "int8 W8A8",
            QWeight::from_int8(n, k, &i8_codes, &i8_scales, None).expect("int8"),
        ),
        ("FP8 W8A16", fp8(Fp8Activations::Bf16).expect("fp8")),
        ("FP8 W8A8", fp8(Fp8Activations::E4m3PerToken).expect("fp8")),
    ]
}

/// Part 3: each checkpoint format on two real matrices, every instruction set, alternating
/// formats within each round.
fn formats(content: &gguf_file::Content, file: &mut std::fs::File) {
    let dev = Device::Cpu;
    println!();
    println!(
        "checkpoint formats on the default model's layer-0 MLP matrices, {} candle threads:",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<22} {:<16} {:>10} {:>3} {:>10} {:>9}",
        "shape", "format", "isa", "m", "us", "GF/s"
    );
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for (label, name) in [
        ("ffn_gate 576->1536", "blk.0.ffn_gate.weight"),
        ("ffn_down 1536->576", "blk.0.ffn_down.weight"),
    ] {
        let qt = content.tensor(file, name, &dev).expect("tensor");
        let (n, k) = qt.shape().dims2().expect("2d");
        let w: Vec<f32> = qt
            .dequantize(&dev)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("dequantize");
        let q4_1 = QWeight::from_qtensor(&qt).expect("pack").expect("type");
        let variants = format_variants(&w, n, k, q4_1);
        for isa in Isa::available() {
            for m in MS {
                let x = random_activations(&mut seed, m * k);
                let out = std::cell::RefCell::new(vec![0f32; m * n]);
                let calls: Vec<Box<dyn Fn()>> = variants
                    .iter()
                    .map(|(_, weight)| {
                        let (x, out) = (&x, &out);
                        Box::new(move || weight.matmul_with(isa, x, m, &mut out.borrow_mut()))
                            as Box<dyn Fn()>
                    })
                    .collect();
                let reps: Vec<usize> = calls.iter().map(|f| calls_per_round(f)).collect();
                let mut times = vec![Vec::with_capacity(ROUNDS); calls.len()];
                for _ in 0..ROUNDS {
                    for ((f, &reps), times) in calls.iter().zip(&reps).zip(&mut times) {
                        let start = Instant::now();
                        for _ in 0..reps {
                            f();
                        }
                        times.push(start.elapsed().as_secs_f64() / reps as f64);
                    }
                }
                let gflop = 2.0 * (m * n * k) as f64 / 1e9;
                for ((format, _), times) in variants.iter().zip(&mut times) {
                    let t = median(times);
                    println!(
                        "{:<22} {:<16} {:>10} {:>3} {:>10.1} {:>9.1}",
                        label,
                        format,
                        format!("{isa:?}"),
                        m,
                        t * 1e6,
                        gflop / t
                    );
                }
            }
        }
    }
}

/// Part 1: each (label, tensor name), one weight called over and over.
fn shapes(
    content: &gguf_file::Content,
    file: &mut std::fs::File,
    named: &[(String, String)],
    peak: Option<f64>,
) {
    let dev = Device::Cpu;
    println!("qmatmul: {:?}, {} candle threads", Isa::best(), {
        candle_core::utils::get_num_threads()
    });
    println!(
        "{:<22} {:>5} {:>3} {:>10} {:>10} {:>9} {:>9} {:>7} {:>6}",
        "shape", "type", "m", "ours us", "candle us", "ours GF/s", "cndl GF/s", "speedup", "% peak"
    );
    let mut seed = 0x2545F4914F6CDD1Du64;
    for (label, name) in named {
        let qt = content.tensor(file, name, &dev).expect("tensor");
        let (n, k) = qt.shape().dims2().expect("2d");
        let dtype = qt.dtype();
        let ours = QWeight::from_qtensor(&qt)
            .expect("pack")
            .expect("supported type");
        let theirs = QMatMul::from_qtensor(qt).expect("qmatmul");
        for m in MS {
            let x = random_activations(&mut seed, m * k);
            let x = Tensor::from_vec(x, (m, k), &dev).expect("x");
            let run_ours = || ours.forward(&x).expect("ours");
            let run_theirs = || theirs.forward(&x).expect("candle");
            // Warm-up, and the number of calls that fills a round.
            let reps = |f: &dyn Fn() -> Tensor| {
                f();
                let start = Instant::now();
                f();
                ((ROUND_SECS / start.elapsed().as_secs_f64()) as usize).clamp(1, 10_000)
            };
            let (ours_reps, theirs_reps) = (reps(&run_ours), reps(&run_theirs));
            let time = |f: &dyn Fn() -> Tensor, reps: usize| {
                let start = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(f());
                }
                start.elapsed().as_secs_f64() / reps as f64
            };
            let mut a = Vec::with_capacity(ROUNDS);
            let mut b = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                a.push(time(&run_ours, ours_reps));
                b.push(time(&run_theirs, theirs_reps));
            }
            let (ta, tb) = (median(&mut a), median(&mut b));
            let gflop = 2.0 * (m * n * k) as f64 / 1e9;
            let share = peak.map_or("-".to_string(), |p| {
                format!("{:.0}", 100.0 * gflop / ta / p)
            });
            println!(
                "{:<22} {:>5} {:>3} {:>10.1} {:>10.1} {:>9.1} {:>9.1} {:>6.2}x {:>6}",
                label,
                format!("{dtype:?}"),
                m,
                ta * 1e6,
                tb * 1e6,
                gflop / ta,
                gflop / tb,
                tb / ta,
                share
            );
        }
    }
}

/// Every matmul of one decode step of the whole model (30 layers' q, k, v, o, gate, up, down and
/// the lm_head), on the real weights in turn, so that, as in the model, they stream from memory
/// instead of staying in cache. m sequences decode one token each.
fn model_step(content: &gguf_file::Content, file: &mut std::fs::File) {
    const PROJ: [&str; 7] = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    let dev = Device::Cpu;
    let layers = content
        .metadata
        .get("llama.block_count")
        .and_then(|v| v.to_u32().ok())
        .unwrap_or(30) as usize;
    let mut ours: Vec<Vec<QWeight>> = Vec::new();
    let mut theirs: Vec<Vec<QMatMul>> = Vec::new();
    for l in 0..layers {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for p in PROJ {
            let qt = content
                .tensor(file, &format!("blk.{l}.{p}.weight"), &dev)
                .expect("tensor");
            a.push(QWeight::from_qtensor(&qt).expect("pack").expect("type"));
            b.push(QMatMul::from_qtensor(qt).expect("qmatmul"));
        }
        ours.push(a);
        theirs.push(b);
    }
    let qt = content
        .tensor(file, "token_embd.weight", &dev)
        .expect("tensor");
    let ours_head = QWeight::from_qtensor(&qt).expect("pack").expect("type");
    let theirs_head = QMatMul::from_qtensor(qt).expect("qmatmul");
    let (hidden, inter) = (ours[0][0].k(), ours[0][6].k());

    println!();
    println!(
        "one decode step, all {layers} layers' projections + lm_head on the real weights \
         (streamed from memory), per token:"
    );
    println!(
        "{:>3} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "m",
        "ours us/tok",
        "shared us/tok",
        "candle us/tok",
        "ours tok/s",
        "shrd tok/s",
        "cndl tok/s"
    );
    let mut per_token = Vec::new();
    for m in MS {
        let h = Tensor::randn(0f32, 1.0, (m, hidden), &dev).expect("h");
        let f = Tensor::randn(0f32, 1.0, (m, inter), &dev).expect("f");
        let step_ours = || {
            for l in &ours {
                for w in &l[..6] {
                    std::hint::black_box(w.forward(&h).expect("ours"));
                }
                std::hint::black_box(l[6].forward(&f).expect("ours"));
            }
            std::hint::black_box(ours_head.forward(&h).expect("ours"));
        };
        // The recommended wiring: q/k/v (and gate/up) share one quantization of their input.
        let step_shared = || {
            for l in &ours {
                let qkv = [&l[0], &l[1], &l[2]];
                std::hint::black_box(QWeight::forward_shared(&qkv, &h).expect("ours"));
                std::hint::black_box(l[3].forward(&h).expect("ours"));
                let gate_up = [&l[4], &l[5]];
                std::hint::black_box(QWeight::forward_shared(&gate_up, &h).expect("ours"));
                std::hint::black_box(l[6].forward(&f).expect("ours"));
            }
            std::hint::black_box(ours_head.forward(&h).expect("ours"));
        };
        let step_theirs = || {
            for l in &theirs {
                for w in &l[..6] {
                    std::hint::black_box(w.forward(&h).expect("candle"));
                }
                std::hint::black_box(l[6].forward(&f).expect("candle"));
            }
            std::hint::black_box(theirs_head.forward(&h).expect("candle"));
        };
        let steps = |f: &dyn Fn()| {
            f();
            let start = Instant::now();
            f();
            ((0.1 / start.elapsed().as_secs_f64()) as usize).clamp(1, 1000)
        };
        let plans: [(&dyn Fn(), usize); 3] = [
            (&step_ours, steps(&step_ours)),
            (&step_shared, steps(&step_shared)),
            (&step_theirs, steps(&step_theirs)),
        ];
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..5 {
            for (i, (f, n)) in plans.iter().enumerate() {
                let start = Instant::now();
                for _ in 0..*n {
                    f();
                }
                times[i].push(start.elapsed().as_secs_f64() / *n as f64 / m as f64);
            }
        }
        let t: Vec<f64> = times.iter_mut().map(|v| median(v)).collect();
        println!(
            "{:>3} {:>12.1} {:>12.1} {:>12.1} {:>10.0} {:>10.0} {:>10.0}",
            m,
            t[0] * 1e6,
            t[1] * 1e6,
            t[2] * 1e6,
            1.0 / t[0],
            1.0 / t[1],
            1.0 / t[2]
        );
        per_token.push(t);
    }
    let (first, last) = (&per_token[0], &per_token[per_token.len() - 1]);
    println!(
        "batching gain (time per token m=1 / m={}): ours {:.2}x, ours shared {:.2}x, candle {:.2}x; \
         at m={}: ours {:.2}x faster than candle",
        MS[MS.len() - 1],
        first[0] / last[0],
        first[1] / last[1],
        first[2] / last[2],
        MS[MS.len() - 1],
        last[2] / last[1],
    );
}

/// The int8 ceiling of the machine: how many 512-bit `vpdpbusd` (64 u8 x i8 multiply-adds
/// into 16 i32 lanes) the cores retire per second when nothing else competes and no chain waits
/// on another (24 independent accumulators per thread, more than latency x throughput).
mod int8_peak {
    use std::time::Instant;

    const CHAINS: usize = 24;
    const ITERATIONS: usize = 10_000_000;
    const ROUNDS: usize = 5;

    /// GFLOP/s (2 per multiply-add) over `threads` threads, the median of a few rounds; `None`
    /// without AVX-512 VNNI.
    pub fn measure(threads: usize) -> Option<f64> {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
            let mut rates: Vec<f64> = (0..ROUNDS)
                .map(|_| {
                    let start = Instant::now();
                    std::thread::scope(|scope| {
                        for _ in 0..threads {
                            // SAFETY: the features were detected above.
                            scope.spawn(|| std::hint::black_box(unsafe { chains(ITERATIONS) }));
                        }
                    });
                    let ops = (threads * ITERATIONS * CHAINS) as f64;
                    ops * 128.0 / start.elapsed().as_secs_f64() / 1e9
                })
                .collect();
            return Some(minserve_benches::median(&mut rates));
        }
        let _ = threads;
        None
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn chains(iterations: usize) -> i32 {
        use std::arch::x86_64::*;
        let a = _mm512_set1_epi8(std::hint::black_box(3));
        let b = _mm512_set1_epi8(std::hint::black_box(-5));
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        for _ in 0..iterations {
            for chain in acc.iter_mut() {
                *chain = _mm512_dpbusd_epi32(*chain, a, b);
            }
        }
        let mut sum = _mm512_setzero_si512();
        for chain in acc {
            sum = _mm512_add_epi32(sum, chain);
        }
        _mm512_reduce_add_epi32(sum)
    }
}
