//! The batched quantized matmul (`minserve_model::qmatmul`) against candle's `QMatMul`, an f64
//! reference, itself across instruction sets, and itself across batch compositions.
//!
//! Tolerances:
//! * Q4_1: **bit-identical** to candle's `QMatMul` (candle always runs Q4_1 through ggml's
//!   generic `vec_dot`, whose per-block f32 operations this module reproduces exactly).
//! * Q8_0 / Q4_0 against an f64 reference built from the same quantized weights and activations
//!   (exact products): each block contributes `(sumi * d_w) * d_x`, two f32 roundings, and `nb`
//!   blocks are summed in order, so the error is at most `(nb + 1) u sum_j |w_j x_j|` with
//!   `u = 2^-24` (standard summation bound). We allow `(nb + 2) * f32::EPSILON * sum_j |w_j x_j|`,
//!   twice that.
//! * Q8_0 / Q4_0 against candle: candle's AVX `vec_dot` sums in another order (8 lanes with FMA,
//!   then a horizontal sum), whose error is bounded the same way; the two bounds add up to
//!   `(nb + 3) * f32::EPSILON * sum_j |w_j x_j|`. Where candle quantizes the activations to Q8_K
//!   instead (Q8_0 with `k % 256 == 0` on AVX-512) the two also differ by quantization noise,
//!   at most `sum_j |w_j| * (amax / 254 + amax / 254)` per row; that case is checked with that
//!   (loose, worst-case) bound only.
//! * Q4_K / Q6_K: the activations are quantized to Q8_K super-blocks exactly as candle does
//!   (`BlockQ8K::from_float`), then each super-block contributes
//!   `(d_w d_x) si - (dmin_w d_x) mi` (Q6_K: the first term) with `si`, `mi` exact integers,
//!   about five f32 roundings, and `nsb` super-blocks are summed in order. Against the f64
//!   product of the same quantized activations and dequantized weights we allow
//!   `(nsb + 6) * f32::EPSILON * mag`, where `mag = sum_j (|w_j| + 2 |dmin m_j|) |x_j|` bounds
//!   both terms before they cancel (`|d sc q| <= |w| + |dmin m|`). candle (its repacked x86
//!   kernel, or its AVX `vec_dot` for Q6_K at m = 1) rounds per sub-block of 32 (Q4_K) or 16
//!   (Q6_K) and uses FMAs: against it `(16 nsb + 16) * f32::EPSILON * mag`. Not bit-identical to
//!   candle, whose own m = 1 and m > 1 paths differ for Q6_K; ours are batch-invariant.
//! * ISA paths and batch compositions: **bit-identical** (the same f32 operations per element).

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use minserve_model::qmatmul::{Isa, QWeight};

mod common;

const SHAPES: [(usize, usize); 5] = [
    (576, 576),
    (576, 192),
    (576, 1536),
    (1536, 576),
    (576, 49152),
];
const MS: [usize; 7] = [1, 2, 3, 7, 16, 33, 64];

/// Deterministic pseudo-random numbers in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Roughly normal values whose scale varies from row to row (and a few outliers), so that
    /// block scales differ.
    fn matrix(&mut self, rows: usize, cols: usize, scale: f32) -> Vec<f32> {
        let mut v = Vec::with_capacity(rows * cols);
        for _ in 0..rows {
            let row_scale = scale * (0.25 + 2.0 * self.next().abs());
            for _ in 0..cols {
                let mut x = (self.next() + self.next() + self.next()) * row_scale;
                if self.next() > 0.995 {
                    x *= 8.0;
                }
                v.push(x);
            }
        }
        v
    }
}

fn quantized(rng: &mut Rng, n: usize, k: usize, dtype: GgmlDType) -> QTensor {
    let w = Tensor::from_vec(rng.matrix(n, k, 0.05), (n, k), &Device::Cpu).unwrap();
    QTensor::quantize(&w, dtype).unwrap()
}

fn ours(w: &QWeight, x: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * w.n()];
    w.matmul(x, m, &mut out);
    out
}

fn ours_with(w: &QWeight, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * w.n()];
    w.matmul_with(isa, x, m, &mut out);
    out
}

fn candle(w: &QMatMul, x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let x = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
    w.forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.to_bits() == y.to_bits(),
            "{what}: element {i}: {x:e} != {y:e}"
        );
    }
}

/// The exact product of the quantized activations and weights (in f64), and the magnitude sum
/// `sum_j |w_j x_j|` that scales the rounding bounds. `x_dtype` is the quantization candle
/// applies to the activations for this weight type.
fn reference(wq: &QTensor, x: &[f32], m: usize, x_dtype: GgmlDType) -> (Vec<f64>, Vec<f64>) {
    let (_, k) = wq.shape().dims2().unwrap();
    let x = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
    let x = QTensor::quantize(&x, x_dtype)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let w = wq
        .dequantize(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .t()
        .unwrap();
    let exact = x.matmul(&w).unwrap();
    let magnitude = x.abs().unwrap().matmul(&w.abs().unwrap()).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    (flat(exact), flat(magnitude))
}

/// `sum_j |w_j| * max_j |x_j|` per (row, column): scales the activation-quantization noise.
fn noise_scale(wq: &QTensor, x: &[f32], m: usize) -> Vec<f64> {
    let (n, k) = wq.shape().dims2().unwrap();
    let w = wq.dequantize(&Device::Cpu).unwrap();
    let col_l1: Vec<f32> = w.abs().unwrap().sum(1).unwrap().to_vec1().unwrap();
    let mut out = Vec::with_capacity(m * n);
    for r in 0..m {
        let amax = x[r * k..(r + 1) * k]
            .iter()
            .fold(0f32, |a, v| a.max(v.abs()));
        out.extend(col_l1.iter().map(|&l| l as f64 * amax as f64));
    }
    out
}

fn assert_within(got: &[f32], want: &[f64], bound: &[f64], what: &str) {
    let mut worst = 0f64;
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= b,
            "{what}: element {i}: {g:e} vs {w:e}, error {err:e} > bound {b:e}"
        );
        worst = worst.max(err / b.max(f64::MIN_POSITIVE));
    }
    eprintln!("{what}: worst error / bound = {worst:.3}");
}

/// Checks one weight type against candle for every shape and batch size.
fn check_against_candle(dtype: GgmlDType, seed: u64) {
    let mut rng = Rng(seed);
    for (k, n) in SHAPES {
        let wq = quantized(&mut rng, n, k, dtype);
        let ours_w = QWeight::from_qtensor(&wq).unwrap().expect("supported type");
        assert_eq!(
            (ours_w.n(), ours_w.k(), ours_w.dtype()),
            (n, k, Some(dtype))
        );
        let x_dtype = match dtype {
            GgmlDType::Q4_1 => GgmlDType::Q8_1,
            _ => GgmlDType::Q8_0,
        };
        let x_all = rng.matrix(64, k, 1.0);
        // Precomputed before `wq` moves into candle's QMatMul.
        let refs: Vec<_> = match dtype {
            GgmlDType::Q4_1 => Vec::new(),
            _ => MS
                .iter()
                .map(|&m| {
                    let x = &x_all[..m * k];
                    (reference(&wq, x, m, x_dtype), noise_scale(&wq, x, m))
                })
                .collect(),
        };
        let theirs_w = QMatMul::from_qtensor(wq).unwrap();
        let nb = (k / 32) as f64;
        for (i, &m) in MS.iter().enumerate() {
            let x = &x_all[..m * k];
            let got = ours(&ours_w, x, m);
            let theirs = candle(&theirs_w, x, m, k);
            let what = format!("{dtype:?} {k}->{n} m={m}");
            if dtype == GgmlDType::Q4_1 {
                assert_bits_eq(&got, &theirs, &format!("{what} vs candle"));
                continue;
            }
            let ((exact, magnitude), noise) = &refs[i];
            let eps = f32::EPSILON as f64;
            let bound: Vec<f64> = magnitude.iter().map(|s| (nb + 2.0) * eps * s).collect();
            assert_within(&got, exact, &bound, &format!("{what} vs f64 reference"));
            let candle_requantizes = dtype == GgmlDType::Q8_0 && k % 256 == 0;
            let theirs_f64: Vec<f64> = theirs.iter().map(|&v| v as f64).collect();
            let got32: Vec<f32> = got.clone();
            let bound: Vec<f64> = magnitude
                .iter()
                .zip(noise)
                .map(|(s, q)| {
                    let rounding = (nb + 3.0) * eps * s * 1.01;
                    match candle_requantizes {
                        true => rounding + q / 127.0,
                        false => rounding,
                    }
                })
                .collect();
            assert_within(&got32, &theirs_f64, &bound, &format!("{what} vs candle"));
        }
    }
}

#[test]
fn q4_1_is_bit_identical_to_candle() {
    check_against_candle(GgmlDType::Q4_1, 1);
}

#[test]
fn q8_0_matches_reference_and_candle() {
    check_against_candle(GgmlDType::Q8_0, 2);
}

#[test]
fn q4_0_matches_reference_and_candle() {
    check_against_candle(GgmlDType::Q4_0, 3);
}

/// Q5_0 runs as the Q8_0 blocks of the same values: within rounding of the f64 product of its
/// dequantized weights and Q8_0 activations (what candle's and ggml's Q5_0 dot computes), and of
/// candle's own Q5_0 matmul.
#[test]
fn q5_0_matches_reference_and_candle() {
    check_against_candle(GgmlDType::Q5_0, 6);
}

/// `dmin * m` per weight of a Q4_K tensor (the minimum each value subtracts; zeros for other
/// types): its blocks with every nibble cleared, dequantized (and negated).
fn k_quant_min_terms(wq: &QTensor) -> Tensor {
    let shape = wq.shape().clone();
    if wq.dtype() != GgmlDType::Q4K {
        return Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    }
    let mut bytes = wq.data().unwrap().into_owned();
    for blk in bytes.chunks_exact_mut(144) {
        blk[16..].fill(0);
    }
    let cleared = candle_core::quantized::ggml_file::qtensor_from_ggml(
        GgmlDType::Q4K,
        &bytes,
        shape.dims().to_vec(),
        &Device::Cpu,
    )
    .unwrap();
    cleared.dequantize(&Device::Cpu).unwrap().neg().unwrap()
}

/// The k-quant bound's `mag` (see the module docs) per (row, column).
fn k_quant_magnitude(wq: &QTensor, x: &[f32], m: usize) -> Vec<f64> {
    let (_, k) = wq.shape().dims2().unwrap();
    let x = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
    let x = QTensor::quantize(&x, GgmlDType::Q8K)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    let w = wq.dequantize(&Device::Cpu).unwrap().abs().unwrap();
    let mins = k_quant_min_terms(wq).abs().unwrap();
    let w = (w + (mins * 2.0).unwrap()).unwrap();
    let mag = x.abs().unwrap().matmul(&w.t().unwrap()).unwrap();
    mag.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Q4_K / Q6_K against the f64 product of the same quantized operands and against candle, for
/// every batch size, with the bounds of the module docs.
fn check_k_quant(dtype: GgmlDType, seed: u64) {
    let mut rng = Rng(seed);
    for (k, n) in [(256, 40), (1024, 640), (2048, 640), (512, 200)] {
        let wq = quantized(&mut rng, n, k, dtype);
        let ours_w = QWeight::from_qtensor(&wq).unwrap().expect("supported type");
        assert_eq!(
            (ours_w.n(), ours_w.k(), ours_w.dtype()),
            (n, k, Some(dtype))
        );
        let x_all = rng.matrix(64, k, 1.0);
        let refs: Vec<_> = MS
            .iter()
            .map(|&m| {
                let x = &x_all[..m * k];
                let (exact, _) = reference(&wq, x, m, GgmlDType::Q8K);
                (exact, k_quant_magnitude(&wq, x, m))
            })
            .collect();
        let theirs_w = QMatMul::from_qtensor(wq).unwrap();
        let nsb = (k / 256) as f64;
        let eps = f32::EPSILON as f64;
        for (&m, (exact, mag)) in MS.iter().zip(&refs) {
            let x = &x_all[..m * k];
            let got = ours(&ours_w, x, m);
            let what = format!("{dtype:?} {k}->{n} m={m}");
            let bound: Vec<f64> = mag.iter().map(|s| (nsb + 6.0) * eps * s).collect();
            assert_within(&got, exact, &bound, &format!("{what} vs f64 reference"));
            let theirs: Vec<f64> = candle(&theirs_w, x, m, k)
                .iter()
                .map(|&v| v as f64)
                .collect();
            let bound: Vec<f64> = mag.iter().map(|s| (16.0 * nsb + 16.0) * eps * s).collect();
            assert_within(&got, &theirs, &bound, &format!("{what} vs candle"));
        }
    }
}

#[test]
fn q4_k_matches_reference_and_candle() {
    check_k_quant(GgmlDType::Q4K, 12);
}

#[test]
fn q6_k_matches_reference_and_candle() {
    check_k_quant(GgmlDType::Q6K, 13);
}

/// Shapes the packer refuses go to candle: k-quants whose k is not a multiple of 256 (candle
/// cannot quantize those either), and the types without kernels.
#[test]
fn other_types_are_left_to_candle() {
    let mut rng = Rng(4);
    for dtype in [GgmlDType::Q2K, GgmlDType::Q5K, GgmlDType::F32] {
        let wq = quantized(&mut rng, 16, 256, dtype);
        assert!(QWeight::from_qtensor(&wq).unwrap().is_none(), "{dtype:?}");
    }
}

/// `(k, n)` shapes for a type: k-quants need k to be a multiple of 256.
fn shapes_for(
    dtype: GgmlDType,
    blocks: &[(usize, usize)],
    super_blocks: &[(usize, usize)],
) -> Vec<(usize, usize)> {
    match dtype {
        GgmlDType::Q4K | GgmlDType::Q6K => super_blocks.to_vec(),
        _ => blocks.to_vec(),
    }
}

/// Every row of a batch is bit-identical to the same row computed alone, whatever the batch
/// size, the row's position in it, or its neighbours, on every instruction set.
#[test]
fn batch_invariance() {
    let mut rng = Rng(5);
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q5_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let shapes = shapes_for(
            dtype,
            &[(576, 1536), (1536, 576), (576, 200)],
            &[(1024, 640), (2048, 640), (512, 200)],
        );
        for (k, n) in shapes {
            let w = QWeight::from_qtensor(&quantized(&mut rng, n, k, dtype))
                .unwrap()
                .unwrap();
            let x = rng.matrix(64, k, 1.0);
            for isa in Isa::available() {
                let what = format!("{dtype:?} {k}->{n} {isa:?}");
                let alone: Vec<Vec<f32>> = (0..64)
                    .map(|r| ours_with(&w, isa, &x[r * k..(r + 1) * k], 1))
                    .collect();
                let all = ours_with(&w, isa, &x, 64);
                for r in 0..64 {
                    assert_bits_eq(
                        &all[r * n..(r + 1) * n],
                        &alone[r],
                        &format!("{what}: row {r} of 64"),
                    );
                }
                for picks in [[41, 3, 17, 63, 0], [5, 5, 62, 30, 1]] {
                    let xs: Vec<f32> = picks
                        .iter()
                        .flat_map(|&r| x[r * k..(r + 1) * k].iter().copied())
                        .collect();
                    let got = ours_with(&w, isa, &xs, picks.len());
                    for (i, &r) in picks.iter().enumerate() {
                        assert_bits_eq(
                            &got[i * n..(i + 1) * n],
                            &alone[r],
                            &format!("{what}: row {r} at {i} of {picks:?}"),
                        );
                    }
                }
            }
        }
    }
}

/// The SIMD paths give exactly the scalar path's results, including partial column tiles
/// (n not a multiple of 16 or 8) and tail rows.
#[test]
fn isa_paths_agree_with_scalar() {
    let available = Isa::available();
    eprintln!("instruction sets here: {available:?}");
    let mut rng = Rng(6);
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let shapes = shapes_for(
            dtype,
            &[(64, 4), (96, 20), (576, 40), (576, 192), (1536, 72)],
            &[(256, 4), (256, 20), (512, 40), (1024, 72), (2048, 24)],
        );
        for (k, n) in shapes {
            let w = QWeight::from_qtensor(&quantized(&mut rng, n, k, dtype))
                .unwrap()
                .unwrap();
            for m in [1, 2, 3, 4, 5, 9, 33, 70] {
                let x = rng.matrix(m, k, 1.0);
                let scalar = ours_with(&w, Isa::Scalar, &x, m);
                for &isa in &available {
                    let got = ours_with(&w, isa, &x, m);
                    assert_bits_eq(&got, &scalar, &format!("{dtype:?} {k}->{n} m={m} {isa:?}"));
                }
            }
        }
    }
}

#[test]
fn edge_inputs() {
    let mut rng = Rng(7);
    let wq = quantized(&mut rng, 48, 64, GgmlDType::Q4_1);
    let w = QWeight::from_qtensor(&wq).unwrap().unwrap();
    let theirs = QMatMul::from_qtensor(wq).unwrap();
    // An all-zero row (d = 0), a constant row, mixed magnitudes, values whose f16 scale is 0.
    let mut x = vec![0f32; 4 * 64];
    x[64..128].fill(3.0);
    for (i, v) in x[128..192].iter_mut().enumerate() {
        *v = if i % 2 == 0 { 1e3 } else { -1e-30 };
    }
    for (i, v) in x[192..256].iter_mut().enumerate() {
        *v = 1e-38 * i as f32;
    }
    for isa in Isa::available() {
        let got = ours_with(&w, isa, &x, 4);
        assert_bits_eq(&got, &candle(&theirs, &x, 4, 64), &format!("{isa:?}"));
    }
    // m = 0 is a no-op.
    w.matmul(&[], 0, &mut []);
}

#[test]
#[should_panic(expected = "out is not")]
fn wrong_output_size_panics() {
    let mut rng = Rng(8);
    let w = QWeight::from_qtensor(&quantized(&mut rng, 16, 32, GgmlDType::Q8_0))
        .unwrap()
        .unwrap();
    let mut out = vec![0f32; 15];
    w.matmul(&[0.5; 32], 1, &mut out);
}

#[test]
fn forward_keeps_leading_dims() {
    let mut rng = Rng(9);
    let wq = quantized(&mut rng, 40, 64, GgmlDType::Q4_1);
    let w = QWeight::from_qtensor(&wq).unwrap().unwrap();
    let theirs = QMatMul::from_qtensor(wq).unwrap();
    let x = Tensor::from_vec(rng.matrix(6, 64, 1.0), (2, 3, 64), &Device::Cpu).unwrap();
    let got = w.forward(&x).unwrap();
    assert_eq!(got.dims(), &[2, 3, 40]);
    let want = theirs.forward(&x).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_bits_eq(&flat(&got), &flat(&want), "forward");
}

/// The default model's own tensors (its projections are Q4_1, its tied embedding Q8_0), fed
/// with real embedding rows as activations.
#[test]
fn default_model_tensors_match_candle() {
    let path = common::default_model_path();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let embd = content
        .tensor(&mut file, "token_embd.weight", &Device::Cpu)
        .unwrap();
    let embd_f32 = embd.dequantize(&Device::Cpu).unwrap();
    let hidden = embd_f32.dim(1).unwrap();
    let tokens = Tensor::new(
        &[
            1u32, 504, 2, 9000, 30000, 17, 333, 12345, 49000, 7, 100, 200,
        ][..],
        &Device::Cpu,
    )
    .unwrap();
    let rows = embd_f32.index_select(&tokens, 0).unwrap();
    let mut rng = Rng(10);
    let names = [
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.attn_v.weight",
        "blk.0.attn_output.weight",
        "blk.0.ffn_gate.weight",
        "blk.0.ffn_up.weight",
        "blk.0.ffn_down.weight",
        "blk.29.ffn_down.weight",
        "token_embd.weight",
    ];
    for name in names {
        let wq = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let (n, k) = wq.shape().dims2().unwrap();
        let dtype = wq.dtype();
        let Some(w) = QWeight::from_qtensor(&wq).unwrap() else {
            eprintln!("{name}: {dtype:?} left to candle");
            continue;
        };
        for m in [1, 12] {
            // Embedding rows where the input is the hidden size, scaled noise elsewhere.
            let x: Vec<f32> = match k == hidden {
                true => rows
                    .narrow(0, 0, m)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
                false => rng.matrix(m, k, 0.5),
            };
            let got = ours(&w, &x, m);
            let what = format!("{name} ({dtype:?} {k}->{n}) m={m}");
            match dtype {
                GgmlDType::Q4_1 => {
                    let theirs = QMatMul::from_qtensor(
                        content.tensor(&mut file, name, &Device::Cpu).unwrap(),
                    )
                    .unwrap();
                    assert_bits_eq(&got, &candle(&theirs, &x, m, k), &what);
                }
                _ => {
                    let (exact, magnitude) = reference(&wq, &x, m, GgmlDType::Q8_0);
                    let nb = (k / 32) as f64;
                    let bound: Vec<f64> = magnitude
                        .iter()
                        .map(|s| (nb + 2.0) * f32::EPSILON as f64 * s)
                        .collect();
                    assert_within(&got, &exact, &bound, &what);
                }
            }
        }
    }
}

/// Weights of several kinds sharing one input (a file may store q as Q4_K and v as Q6_K or
/// Q8_0): the input is quantized to both Q8_1 blocks and Q8_K super-blocks once, and each
/// weight gets its own `forward`'s result, bit for bit.
#[test]
fn mixed_kinds_share_an_input() {
    let mut rng = Rng(14);
    let weights: Vec<QWeight> = [
        (512, GgmlDType::Q4K),
        (72, GgmlDType::Q6K),
        (40, GgmlDType::Q8_0),
        (24, GgmlDType::Q4_1),
    ]
    .iter()
    .map(|&(n, dtype)| {
        QWeight::from_qtensor(&quantized(&mut rng, n, 512, dtype))
            .unwrap()
            .unwrap()
    })
    .collect();
    let refs: Vec<&QWeight> = weights.iter().collect();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for m in [1, 6] {
        let x = Tensor::from_vec(rng.matrix(m, 512, 1.0), (m, 512), &Device::Cpu).unwrap();
        let shared = QWeight::forward_shared(&refs, &x).unwrap();
        for (w, got) in weights.iter().zip(&shared) {
            let alone = w.forward(&x).unwrap();
            assert_bits_eq(&flat(got), &flat(&alone), &format!("{:?} m={m}", w.dtype()));
        }
    }
}

/// A k-quant weight given an input quantized only for the others is refused, not misread.
#[test]
#[should_panic(expected = "the weight needs")]
fn k_quant_needs_its_activation_form() {
    let mut rng = Rng(15);
    let q8 = QWeight::from_qtensor(&quantized(&mut rng, 16, 256, GgmlDType::Q8_0))
        .unwrap()
        .unwrap();
    let q4k = QWeight::from_qtensor(&quantized(&mut rng, 16, 256, GgmlDType::Q4K))
        .unwrap()
        .unwrap();
    let mut input = minserve_model::qmatmul::QInput::new();
    input.quantize_for(&[&q8], &[0.5; 256], 1);
    let mut out = vec![0f32; 16];
    QWeight::matmul_quantized_many(&[&q4k], &input, &mut [&mut out]);
}

/// Quantizing once for several weights (q/k/v) gives each weight's own `forward`, bit for bit.
#[test]
fn shared_input_matches_separate_calls() {
    let mut rng = Rng(11);
    let weights: Vec<QWeight> = [
        (576, GgmlDType::Q4_1),
        (192, GgmlDType::Q8_0),
        (40, GgmlDType::Q4_0),
    ]
    .iter()
    .map(|&(n, dtype)| {
        QWeight::from_qtensor(&quantized(&mut rng, n, 576, dtype))
            .unwrap()
            .unwrap()
    })
    .collect();
    let refs: Vec<&QWeight> = weights.iter().collect();
    for m in [1, 5, 64] {
        let x = Tensor::from_vec(rng.matrix(m, 576, 1.0), (m, 576), &Device::Cpu).unwrap();
        let shared = QWeight::forward_shared(&refs, &x).unwrap();
        let mut input = minserve_model::qmatmul::QInput::new();
        input.quantize_for(
            &refs,
            &x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            m,
        );
        assert_eq!((input.rows(), input.k()), (m, 576));
        for (w, got) in weights.iter().zip(&shared) {
            let alone = w.forward(&x).unwrap();
            assert_eq!(got.dims(), alone.dims());
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_bits_eq(&flat(got), &flat(&alone), &format!("{:?} m={m}", w.dtype()));
            let mut out = vec![0f32; m * w.n()];
            QWeight::matmul_quantized_many(&[w], &input, &mut [&mut out]);
            assert_bits_eq(
                &out,
                &flat(&alone),
                &format!("{:?} m={m} quantized", w.dtype()),
            );
        }
    }
    assert!(QWeight::forward_shared(
        &[],
        &Tensor::zeros((1, 576), DType::F32, &Device::Cpu).unwrap()
    )
    .unwrap()
    .is_empty());
}

/// gemma3-270m's k-quant tensors (Q4_K and Q6_K: attention outputs and MLP downs): every one of
/// them is packed (k a multiple of 256), and a sample of them, fed with noise shaped like hidden
/// states, matches the f64 product of the quantized operands within the k-quant bound.
#[test]
fn gemma_k_quant_tensors_match_reference() {
    let path = common::catalog_model_path("gemma3-270m");
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut k_quants: Vec<(String, GgmlDType)> = content
        .tensor_infos
        .iter()
        .filter(|(_, info)| matches!(info.ggml_dtype, GgmlDType::Q4K | GgmlDType::Q6K))
        .map(|(name, info)| {
            let k = *info.shape.dims().last().unwrap();
            assert!(k % 256 == 0, "{name}: k = {k} would be left to candle");
            (name.clone(), info.ggml_dtype)
        })
        .collect();
    k_quants.sort_by(|a, b| a.0.cmp(&b.0));
    eprintln!("{} k-quant tensors", k_quants.len());
    assert!(k_quants.iter().any(|(_, t)| *t == GgmlDType::Q4K));
    assert!(k_quants.iter().any(|(_, t)| *t == GgmlDType::Q6K));
    let mut rng = Rng(16);
    // The first and last of each type, by name.
    let mut sample: Vec<&(String, GgmlDType)> = Vec::new();
    for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
        let of_type: Vec<_> = k_quants.iter().filter(|(_, t)| *t == dtype).collect();
        sample.extend([of_type[0], of_type[of_type.len() - 1]]);
    }
    for (name, dtype) in sample {
        let wq = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let (n, k) = wq.shape().dims2().unwrap();
        let w = QWeight::from_qtensor(&wq).unwrap().expect("packed");
        for m in [1, 9] {
            let x = rng.matrix(m, k, 0.5);
            let got = ours(&w, &x, m);
            let (exact, _) = reference(&wq, &x, m, GgmlDType::Q8K);
            let nsb = (k / 256) as f64;
            let bound: Vec<f64> = k_quant_magnitude(&wq, &x, m)
                .iter()
                .map(|s| (nsb + 6.0) * f32::EPSILON as f64 * s)
                .collect();
            let what = format!("{name} ({dtype:?} {k}->{n}) m={m}");
            assert_within(&got, &exact, &bound, &what);
        }
    }
}
