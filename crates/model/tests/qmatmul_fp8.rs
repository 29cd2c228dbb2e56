//! The FP8 (E4M3) batched matmul (`minserve_model::qmatmul`, `QWeight::from_e4m3`) against an
//! f64 dequantize-then-dot reference, itself across instruction sets and batch compositions.
//!
//! Tolerances:
//! * Against the f64 product of the dequantized weights and the **bf16-rounded** activations
//!   (what the kernel multiplies; E4M3 x bf16 products are exact in f32): the kernel sums
//!   `k / 4` products per chain with one rounding each (fused multiply-adds), then three adds and
//!   two scale multiplies, so the error is at most `(k / 4 + 5) u sum_j |w_j x_j|`, `u = 2^-24`
//!   (standard summation bound; flushing subnormal partial sums adds at most `k 2^-126`). We
//!   allow `(k / 4 + 8) * f32::EPSILON * sum_j |w_j x_j|`, well above it.
//! * Against f32 activations (no bf16 rounding): additionally `2^-8 sum_j |w_j x_j|` (the
//!   relative rounding of each input to bf16's 8 significant bits).
//! * W8A8 per token: against the f64 product of the weights and the activations quantized to
//!   E4M3 per row exactly as the module documents (scale `max |x| / 448`), the first bound.
//! * ISA paths and batch compositions: **bit-identical**.

use minserve_core::sampling::Rng;
use minserve_model::e4m3;
use minserve_model::qmatmul::{Fp8Activations, Isa, QInput, QWeight};

/// Values whose magnitude varies over many octaves, so that E4M3 subnormals, every exponent
/// and the largest codes all occur, and rows have different scales.
fn matrix(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    let mut uniform = || rng.next_f32() * 2.0 - 1.0;
    let mut v = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row_scale = 0.05 * (1.0 + (r % 7) as f32);
        for _ in 0..cols {
            let octaves = (uniform() + 1.0) * 8.0;
            v.push(uniform() * row_scale * 2f32.powf(-octaves));
        }
    }
    v
}

/// An FP8 weight quantized from `w` (`[n, k]`) per channel as compressed-tensors does
/// (`scale = max |w| / 448`), with its dequantized values.
fn fp8_weight(w: &[f32], n: usize, k: usize, activations: Fp8Activations) -> (QWeight, Vec<f32>) {
    let mut codes = Vec::with_capacity(n * k);
    let mut scales = Vec::with_capacity(n);
    let mut dequantized = Vec::with_capacity(n * k);
    for row in w.chunks_exact(k) {
        let scale = row.iter().fold(0f32, |m, x| m.max(x.abs())) / 448.0;
        let scale = if scale > 0.0 { scale } else { 1.0 };
        scales.push(scale);
        for &x in row {
            let code = e4m3::encode(x / scale);
            codes.push(code);
            dequantized.push(e4m3::decode(code) * scale);
        }
    }
    let q = QWeight::from_e4m3(&codes, n, k, &scales, activations).unwrap();
    (q, dequantized)
}

fn bf16_rounded(x: f32) -> f32 {
    let r = half::bf16::from_f32(x).to_f32();
    if r.is_subnormal() {
        0f32.copysign(r)
    } else {
        r
    }
}

/// `x` quantized to E4M3 per row (scale `max |x| / 448`, floored as vLLM does), dequantized.
fn e4m3_per_token(x: &[f32], k: usize) -> Vec<f32> {
    x.chunks_exact(k)
        .flat_map(|row| {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = (amax / 448.0).max(1.0 / (448.0 * 512.0));
            row.iter()
                .map(move |&v| e4m3::decode(e4m3::encode(v / scale)) * scale)
        })
        .collect()
}

/// Checks `got` (`m x n`) against `w x^T` in f64 within `(k/4 + 8) eps sum |w x| + extra`.
fn check_close(
    got: &[f32],
    (w, x): (&[f32], &[f32]),
    (m, n, k): (usize, usize, usize),
    extra_rel: f64,
    what: &str,
) {
    for r in 0..m {
        for c in 0..n {
            let (mut exact, mut mag) = (0f64, 0f64);
            for i in 0..k {
                let p = w[c * k + i] as f64 * x[r * k + i] as f64;
                exact += p;
                mag += p.abs();
            }
            let bound = ((k / 4 + 8) as f64 * f32::EPSILON as f64 + extra_rel) * mag;
            let err = (got[r * n + c] as f64 - exact).abs();
            assert!(
                err <= bound,
                "{what}: row {r} col {c}: {} vs {exact} (err {err:e} > {bound:e})",
                got[r * n + c]
            );
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

const SHAPES: [(usize, usize); 4] = [(576, 192), (64, 40), (1536, 17), (32, 16)];

/// Every instruction set against the f64 reference, and bit-identical to the scalar path.
#[test]
fn w8a16_matches_dequantize_then_dot_on_every_isa() {
    let mut rng = Rng::new(7);
    for (k, n) in SHAPES {
        let w = matrix(&mut rng, n, k);
        let (q, dequantized) = fp8_weight(&w, n, k, Fp8Activations::Bf16);
        for m in [1, 3, 4, 9] {
            let x = matrix(&mut rng, m, k);
            let rounded: Vec<f32> = x.iter().map(|&v| bf16_rounded(v)).collect();
            let mut scalar = vec![0f32; m * n];
            q.matmul_with(Isa::Scalar, &x, m, &mut scalar);
            check_close(
                &scalar,
                (&dequantized, &rounded),
                (m, n, k),
                0.0,
                &format!("k={k} n={n} m={m}"),
            );
            // The bf16 rounding of the activations is the one difference from f32.
            check_close(
                &scalar,
                (&dequantized, &x),
                (m, n, k),
                2f64.powi(-8),
                &format!("f32 k={k} n={n} m={m}"),
            );
            for isa in Isa::available() {
                let mut out = vec![0f32; m * n];
                q.matmul_with(isa, &x, m, &mut out);
                assert_eq!(bits(&out), bits(&scalar), "{isa:?} k={k} n={n} m={m}");
            }
        }
    }
}

/// W8A8-FP8: activations quantized to E4M3 per token, on every instruction set.
#[test]
fn w8a8_per_token_matches_its_reference_on_every_isa() {
    let mut rng = Rng::new(11);
    for (k, n) in SHAPES {
        let w = matrix(&mut rng, n, k);
        let (q, dequantized) = fp8_weight(&w, n, k, Fp8Activations::E4m3PerToken);
        for m in [1, 5] {
            let mut x = matrix(&mut rng, m, k);
            // An all-zero row: the floor on the scale keeps it finite, the result zero.
            x[..k].fill(0.0);
            let quantized = e4m3_per_token(&x, k);
            let mut scalar = vec![0f32; m * n];
            q.matmul_with(Isa::Scalar, &x, m, &mut scalar);
            check_close(
                &scalar,
                (&dequantized, &quantized),
                (m, n, k),
                0.0,
                &format!("k={k} n={n} m={m}"),
            );
            assert!(scalar[..n].iter().all(|&y| y == 0.0));
            for isa in Isa::available() {
                let mut out = vec![0f32; m * n];
                q.matmul_with(isa, &x, m, &mut out);
                assert_eq!(bits(&out), bits(&scalar), "{isa:?} k={k} n={n} m={m}");
            }
        }
    }
}

/// A row's result does not depend on the batch around it: every row of a 37-row batch (row
/// tiles and tail rows) equals that row alone, bit for bit, on every instruction set.
#[test]
fn results_are_batch_invariant() {
    let mut rng = Rng::new(3);
    let (k, n, m) = (576, 40, 37);
    let w = matrix(&mut rng, n, k);
    for activations in [Fp8Activations::Bf16, Fp8Activations::E4m3PerToken] {
        let (q, _) = fp8_weight(&w, n, k, activations);
        let x = matrix(&mut rng, m, k);
        for isa in Isa::available() {
            let mut batch = vec![0f32; m * n];
            q.matmul_with(isa, &x, m, &mut batch);
            for r in 0..m {
                let mut alone = vec![0f32; n];
                q.matmul_with(isa, &x[r * k..(r + 1) * k], 1, &mut alone);
                assert_eq!(
                    bits(&batch[r * n..(r + 1) * n]),
                    bits(&alone),
                    "{isa:?} {activations:?} row {r}"
                );
            }
        }
    }
}

/// Every finite code, subnormals and ±448 included, decodes the same in the kernels as in
/// the table: a weight holding each code once per column, against one-hot activations.
#[test]
fn every_code_decodes_exactly_in_the_kernels() {
    let finite: Vec<u8> = (0..=255u8).filter(|&c| !e4m3::is_nan(c)).collect();
    let k = 256;
    let n = 3;
    let mut codes = Vec::new();
    for c in 0..n {
        // Shifted per column so that codes land in both halves of a pair, in every lane.
        codes.extend((0..k).map(|i| finite[(i + 7 * c) % finite.len()]));
    }
    let q = QWeight::from_e4m3(&codes, n, k, &[1.0, 0.5, 2.0], Fp8Activations::Bf16).unwrap();
    for isa in Isa::available() {
        for i in [0usize, 1, 8, 9, 126, 127, 128, 200, 255] {
            let mut x = vec![0f32; k];
            x[i] = 1.0;
            let mut out = vec![0f32; n];
            q.matmul_with(isa, &x, 1, &mut out);
            for c in 0..n {
                let expected = e4m3::decode(codes[c * k + i]) * [1.0, 0.5, 2.0][c];
                assert_eq!(out[c], expected, "{isa:?} input {i} column {c}");
            }
        }
    }
}

/// FP8 and GGUF weights sharing an input (one `QInput` filled in both forms) give what each
/// gives alone.
#[test]
fn shares_an_input_with_gguf_weights() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let mut rng = Rng::new(5);
    let (k, n, m) = (256, 24, 6);
    let (fp8, _) = fp8_weight(&matrix(&mut rng, n, k), n, k, Fp8Activations::Bf16);
    let (fp8_tokens, _) = fp8_weight(&matrix(&mut rng, n, k), n, k, Fp8Activations::E4m3PerToken);
    let dense = Tensor::from_vec(matrix(&mut rng, n, k), (n, k), &Device::Cpu).unwrap();
    let q8 = QWeight::from_qtensor(&QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap())
        .unwrap()
        .unwrap();
    let x = matrix(&mut rng, m, k);
    let weights = [&fp8, &q8, &fp8_tokens];
    let mut input = QInput::new();
    input.quantize_for(&weights, &x, m);
    let mut outs = vec![vec![0f32; m * n]; 3];
    let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    QWeight::matmul_quantized_many(&weights, &input, &mut slices);
    for (w, shared) in weights.iter().zip(&outs) {
        let mut alone = vec![0f32; m * n];
        w.matmul(&x, m, &mut alone);
        assert_eq!(bits(shared), bits(&alone));
    }
}

#[test]
fn bad_weights_are_refused() {
    let err = |codes: &[u8], n, k, scales: &[f32]| {
        QWeight::from_e4m3(codes, n, k, scales, Fp8Activations::Bf16)
            .err()
            .expect("refused")
            .to_string()
    };
    let mut codes = vec![0x38u8; 2 * 64];
    codes[64 + 5] = 0xFF;
    assert!(err(&codes, 2, 64, &[1.0, 1.0]).contains("NaN code at row 1, column 5"));
    assert!(err(&[0; 2 * 48], 2, 48, &[1.0, 1.0]).contains("multiple of 32"));
    assert!(err(&[0; 2 * 64], 2, 64, &[1.0]).contains("1 scales"));
}
