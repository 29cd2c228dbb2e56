//! Quantizing activation rows ([`QInput::quantize_for`]), once per input however many weights
//! read it, into the forms those weights multiply: ggml's Q8_1 blocks of 32 (for Q4_0, Q4_1,
//! Q8_0) and its Q8_K super-blocks of 256 (for Q4_K, Q6_K). On the thread pool when large;
//! Q8_1 sixteen blocks at a time on AVX-512; bit-identical on every instruction set to candle's
//! `BlockQ8_1::from_float` and `BlockQ8K::from_float` (this file's tests check it). Also the
//! per-thread buffer that single multiplications quantize into.

use std::cell::RefCell;
use std::sync::Arc;

use super::isa::Isa;
use super::layout::{Forms, QInput, BLOCK, SUPER_BLOCK};
use super::pack::QWeight;
use super::scalar::{quantize_block, quantize_superblock};
#[cfg(target_arch = "x86_64")]
use super::x86;

/// Below this many blocks of 32, quantizing on the calling thread beats waking the pool.
const PARALLEL_QUANTIZE_BLOCKS: usize = 512;

impl QInput {
    /// Quantizes `x` (`m` rows of the weights' `k`, row-major) into the forms `weights` multiply,
    /// reusing this buffer's memory. The result is the same on every instruction set.
    ///
    /// Weights with an input order ([`QWeight::input_order`]) get the rows gathered into it
    /// first.
    ///
    /// # Panics
    /// If the weights do not share one `k` and input order ([`QWeight::shares_input_with`]),
    /// or `x` is not `m x k`.
    pub fn quantize_for(&mut self, weights: &[&QWeight], x: &[f32], m: usize) {
        let Some(first) = weights.first() else {
            return;
        };
        assert!(
            weights.iter().all(|w| w.shares_input_with(first)),
            "qmatmul: weights of different k or input order share an input"
        );
        let forms = forms_of(weights);
        let order = first.input_order();
        self.quantize_with(Isa::best(), x, m, first.k(), forms, order)
    }

    pub(crate) fn quantize_with(
        &mut self,
        isa: Isa,
        x: &[f32],
        m: usize,
        k: usize,
        forms: Forms,
        order: Option<&Arc<[u32]>>,
    ) {
        self.order = order.cloned();
        let Some(order) = order else {
            return self.quantize_in_order(isa, x, m, k, forms);
        };
        assert_eq!(x.len(), m * k, "qmatmul: x is not {m} x {k}");
        assert_eq!(
            order.len(),
            k,
            "qmatmul: an input order of {} for k = {k}",
            order.len()
        );
        let mut reordered = std::mem::take(&mut self.reordered);
        reordered.clear();
        for row in x.chunks_exact(k) {
            reordered.extend(order.iter().map(|&i| row[i as usize]));
        }
        self.quantize_in_order(isa, &reordered, m, k, forms);
        self.reordered = reordered;
    }

    fn quantize_in_order(&mut self, isa: Isa, x: &[f32], m: usize, k: usize, forms: Forms) {
        assert!(isa.is_available(), "qmatmul: {isa:?} is not available here");
        assert!(
            k.is_multiple_of(BLOCK),
            "qmatmul: k = {k} is not a multiple of {BLOCK}"
        );
        assert!(
            !forms.q8k || k.is_multiple_of(SUPER_BLOCK),
            "qmatmul: k = {k} is not a multiple of {SUPER_BLOCK}"
        );
        assert_eq!(x.len(), m * k, "qmatmul: x is not {m} x {k}");
        self.m = m;
        self.nb = k / BLOCK;
        self.forms = forms;
        if forms.q8_1 {
            self.quantize_q8_1(isa, x);
        }
        if forms.q8k {
            self.quantize_q8k(x);
        }
        if forms.bf16 {
            self.fill_fp8_forms(x, m, k, false);
        }
        if forms.e4m3 {
            self.fill_fp8_forms(x, m, k, true);
        }
    }

    fn quantize_q8_1(&mut self, isa: Isa, x: &[f32]) {
        let blocks = self.m * self.nb;
        let dst = self.q8_1_writer();
        // SAFETY: the buffers hold `blocks` blocks and `x` as many (asserted by the caller);
        // each block index goes to exactly one call, so no two threads write the same block.
        if blocks < PARALLEL_QUANTIZE_BLOCKS {
            unsafe { dst.quantize(isa, x, 0..blocks) }
        } else {
            crate::pool::pool().execute_chunked(blocks, |range| unsafe {
                dst.quantize(isa, &x[range.start * BLOCK..range.end * BLOCK], range)
            });
        }
    }

    fn quantize_q8k(&mut self, x: &[f32]) {
        let blocks = self.m * self.nsb();
        let dst = self.q8k_writer();
        let per_block = SUPER_BLOCK / BLOCK;
        // SAFETY: as for the Q8_1 form.
        if blocks * per_block < PARALLEL_QUANTIZE_BLOCKS {
            unsafe { dst.quantize(x, 0..blocks) }
        } else {
            crate::pool::pool().execute_chunked(blocks, |range| unsafe {
                dst.quantize(
                    &x[range.start * SUPER_BLOCK..range.end * SUPER_BLOCK],
                    range,
                )
            });
        }
    }

    /// The Q8_1 buffers, grown to `m * nb` blocks (never shrunk: reused across calls).
    fn q8_1_writer(&mut self) -> BlockWriter {
        let blocks = self.m * self.nb;
        if self.d.len() < blocks {
            self.qs.resize(blocks * BLOCK, 0);
            self.d.resize(blocks, 0.0);
            self.s.resize(blocks, 0.0);
            self.sum.resize(blocks, 0);
        }
        BlockWriter {
            qs: self.qs.as_mut_ptr(),
            d: self.d.as_mut_ptr(),
            s: self.s.as_mut_ptr(),
            sum: self.sum.as_mut_ptr(),
        }
    }

    /// The Q8_K buffers, grown to `m * nsb` super-blocks.
    fn q8k_writer(&mut self) -> SuperBlockWriter {
        let blocks = self.m * self.nsb();
        let rows = &mut self.q8k;
        if rows.d.len() < blocks {
            rows.qs.resize(blocks * SUPER_BLOCK, 0);
            rows.d.resize(blocks, 0.0);
            rows.bsum16.resize(blocks * 16, 0);
            rows.bsum32.resize(blocks * 8, 0);
        }
        SuperBlockWriter {
            qs: rows.qs.as_mut_ptr(),
            d: rows.d.as_mut_ptr(),
            bsum16: rows.bsum16.as_mut_ptr(),
            bsum32: rows.bsum32.as_mut_ptr(),
        }
    }

    /// Whether [`quantize_rows_for`](Self::quantize_rows_for) can feed `weights`: they share
    /// their input, read it in its own order, and multiply the integer forms (Q8_1, Q8_K). The
    /// FP8 forms are filled for a whole matrix at a time.
    pub fn quantizes_rows_for(weights: &[&QWeight]) -> bool {
        let Some(first) = weights.first() else {
            return false;
        };
        let forms = forms_of(weights);
        weights.iter().all(|w| w.shares_input_with(first))
            && first.input_order().is_none()
            && !forms.bf16
            && !forms.e4m3
    }

    /// As [`quantize_for`](Self::quantize_for), for `m` rows that `produce(row, out)` writes
    /// into a per-thread buffer of `k` values just before they are quantized: the f32 rows
    /// are never stored, so the pass that makes them (a norm, an activation function) and the
    /// quantization read and write memory once. `produce` is called exactly once per row, on
    /// the pool's threads; each row's blocks are quantized by the same code as
    /// [`quantize_for`](Self::quantize_for)'s, so the result is the same bits.
    ///
    /// # Panics
    /// Unless [`quantizes_rows_for`](Self::quantizes_rows_for) holds for `weights`.
    pub fn quantize_rows_for(
        &mut self,
        weights: &[&QWeight],
        m: usize,
        produce: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        assert!(
            Self::quantizes_rows_for(weights),
            "qmatmul: these weights take their input whole"
        );
        let isa = Isa::best();
        let k = weights[0].k();
        let forms = forms_of(weights);
        assert!(
            k.is_multiple_of(BLOCK) && (!forms.q8k || k.is_multiple_of(SUPER_BLOCK)),
            "qmatmul: k = {k} is not a multiple of the forms' blocks"
        );
        self.order = None;
        self.m = m;
        self.nb = k / BLOCK;
        self.forms = forms;
        let (nb, nsb) = (self.nb, self.nsb());
        let q8_1 = forms.q8_1.then(|| self.q8_1_writer());
        let q8k = forms.q8k.then(|| self.q8k_writer());
        let run = |rows: std::ops::Range<usize>| {
            ROW.with(|row| {
                let mut row = row.borrow_mut();
                row.resize(k, 0.0);
                for r in rows {
                    produce(r, &mut row);
                    // SAFETY: the buffers hold `m` rows of blocks (the writers grew them);
                    // row `r`'s blocks go to this call only.
                    unsafe {
                        if let Some(dst) = &q8_1 {
                            dst.quantize(isa, &row, r * nb..(r + 1) * nb);
                        }
                        if let Some(dst) = &q8k {
                            dst.quantize(&row, r * nsb..(r + 1) * nsb);
                        }
                    }
                }
            })
        };
        if m * nb < PARALLEL_QUANTIZE_BLOCKS {
            run(0..m);
        } else {
            crate::pool::pool().execute_chunked(m, run);
        }
    }
}

/// Every activation form some of `weights` multiply.
fn forms_of(weights: &[&QWeight]) -> Forms {
    weights
        .iter()
        .fold(Forms::default(), |f, w| f.union(w.activation_forms()))
}

thread_local! {
    /// The row [`QInput::quantize_rows_for`] produces into, per thread.
    static ROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Raw pointers into a [`QInput`]'s Q8_K buffers, so that pool workers can fill disjoint
/// super-blocks.
struct SuperBlockWriter {
    qs: *mut i8,
    d: *mut f32,
    bsum16: *mut i16,
    bsum32: *mut i16,
}

// SAFETY: writers only touch the super-blocks they are given, which never overlap.
unsafe impl Sync for SuperBlockWriter {}

impl SuperBlockWriter {
    /// Quantizes super-blocks `range`, whose values `x` holds (its first is `range.start`'s).
    ///
    /// # Safety
    /// The buffers hold every super-block of `range`, and nothing else accesses those
    /// super-blocks meanwhile.
    unsafe fn quantize(&self, x: &[f32], range: std::ops::Range<usize>) {
        assert_eq!(x.len(), range.len() * SUPER_BLOCK);
        for (i, x) in range.zip(x.chunks_exact(SUPER_BLOCK)) {
            let x: &[f32; SUPER_BLOCK] = x.try_into().unwrap();
            *self.d.add(i) = quantize_superblock(
                x,
                &mut *(self.qs.add(i * SUPER_BLOCK) as *mut [i8; SUPER_BLOCK]),
                &mut *(self.bsum16.add(i * 16) as *mut [i16; 16]),
                &mut *(self.bsum32.add(i * 8) as *mut [i16; 8]),
            );
        }
    }
}

/// Raw pointers into a [`QInput`]'s buffers, so that pool workers can fill disjoint blocks.
struct BlockWriter {
    qs: *mut i8,
    d: *mut f32,
    s: *mut f32,
    sum: *mut i32,
}

// SAFETY: writers only touch the blocks they are given, which never overlap (see `quantize`).
unsafe impl Sync for BlockWriter {}

impl BlockWriter {
    /// Quantizes blocks `range`, whose values `x` holds (its first is `range.start`'s).
    ///
    /// # Safety
    /// `isa` is available, the buffers hold every block of `range`, and nothing else accesses
    /// those blocks meanwhile.
    unsafe fn quantize(&self, isa: Isa, x: &[f32], range: std::ops::Range<usize>) {
        assert_eq!(x.len(), range.len() * BLOCK);
        let first = range.start;
        let mut range = range;
        // Whole groups of blocks first, their scales computed side by side (1.7x faster per
        // block); a group that needs the scalar path, and the tail, go block by block below.
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Vnni {
            while range.len() >= x86::QUANTIZE_GROUP {
                let i = range.start;
                let (q, d, s, sum) = (
                    self.qs.add(i * BLOCK),
                    self.d.add(i),
                    self.s.add(i),
                    self.sum.add(i),
                );
                let values = x[(i - first) * BLOCK..][..x86::QUANTIZE_GROUP * BLOCK].as_ptr();
                if !x86::quantize_16_blocks(values, q, d, s, sum) {
                    break;
                }
                range.start += x86::QUANTIZE_GROUP;
            }
        }
        for i in range {
            let x: &[f32; BLOCK] = x[(i - first) * BLOCK..][..BLOCK].try_into().unwrap();
            let q = &mut *(self.qs.add(i * BLOCK) as *mut [i8; BLOCK]);
            let (d, s, sum) = match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni => {
                    x86::quantize_block(x, q).unwrap_or_else(|| quantize_block(x, q))
                }
                _ => quantize_block(x, q),
            };
            *self.d.add(i) = d;
            *self.s.add(i) = s;
            *self.sum.add(i) = sum;
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<QInput> = RefCell::new(QInput::default());
}

/// Runs `f` on this thread's reusable activation buffer.
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut QInput) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut input) => f(&mut input),
        // Re-entered on this thread (not expected): use a fresh buffer.
        Err(_) => f(&mut QInput::default()),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use half::f16;

    use super::*;

    const Q8_1: Forms = Forms {
        q8_1: true,
        q8k: false,
        bf16: false,
        e4m3: false,
    };

    /// Blocks with every kind of value: random magnitudes, exact rounding ties, zeros,
    /// subnormals, and (last) NaN and infinities. Ties and zeros come first too, where the
    /// 16-block AVX-512 path takes them (the last group, holding NaN, falls back block by block).
    fn blocks() -> Vec<f32> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut ties: Vec<f32> = (0..BLOCK).map(|j| j as f32 * 4.0 - 63.5).collect();
        ties[0] = 127.0;
        let mut x = ties.clone();
        x.extend(ties.iter().map(|v| -v));
        x.extend([0.0; BLOCK]);
        // d = 0.75 and the sum 31 * 127 + 2, odd and above 2048: it rounds when stored as f16,
        // and s differs if that rounding is skipped.
        x.extend([95.25; BLOCK - 1]);
        x.push(1.5);
        for b in 0..4000 {
            let scale = f32::powi(2.0, (b % 60) - 40);
            for _ in 0..BLOCK {
                x.push(((next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale);
            }
        }
        // amax 127 gives d = 1: halves are exact ties.
        x.extend(&ties);
        x.extend(ties.iter().map(|v| -v));
        x.extend([0.0; BLOCK]);
        x.extend((0..BLOCK).map(|j| f32::from_bits(j as u32 * 1000 + 1)));
        x.extend((0..BLOCK).map(|j| if j == 5 { f32::NAN } else { j as f32 }));
        x.extend((0..BLOCK).map(|j| if j == 20 { f32::INFINITY } else { -(j as f32) }));
        x
    }

    #[test]
    fn quantization_matches_candle_q8_1_on_every_isa() {
        let x = blocks();
        let m = x.len() / BLOCK;
        // candle's quantizer on finite blocks (its f16 `s` of a NaN block is NaN).
        let finite = (m - 2) * BLOCK;
        let t = Tensor::from_slice(&x[..finite], (m - 2, BLOCK), &Device::Cpu).unwrap();
        let bytes = QTensor::quantize(&t, GgmlDType::Q8_1)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        let mut scalar = QInput::default();
        scalar.quantize_with(Isa::Scalar, &x, m, BLOCK, Q8_1, None);
        for b in 0..m - 2 {
            let blk = &bytes[b * 36..(b + 1) * 36];
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let s = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
            assert_eq!(scalar.d[b].to_bits(), d.to_bits(), "block {b}");
            assert_eq!(scalar.s[b].to_bits(), s.to_bits(), "block {b}");
            let q: Vec<i8> = blk[4..].iter().map(|&v| v as i8).collect();
            assert_eq!(&scalar.qs[b * BLOCK..(b + 1) * BLOCK], &q[..], "block {b}");
        }
        for isa in Isa::available() {
            let mut acts = QInput::default();
            acts.quantize_with(isa, &x, m, BLOCK, Q8_1, None);
            let first = acts.qs.iter().zip(&scalar.qs).position(|(a, b)| a != b);
            assert_eq!(first, None, "{isa:?}: first differing value");
            assert_eq!(acts.sum, scalar.sum, "{isa:?}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&acts.d), bits(&scalar.d), "{isa:?}");
            assert_eq!(bits(&acts.s), bits(&scalar.s), "{isa:?}");
        }
    }

    /// Our Q8_K super-blocks against candle's `BlockQ8K::from_float`, byte for byte (its `d`
    /// is f32, then 256 codes, then 16 sums of 16 as i16): ties, zeros, a largest magnitude
    /// that is negative (a negative `d`), tiny and huge scales.
    #[test]
    fn q8k_quantization_matches_candle() {
        let mut x = blocks();
        x.truncate(x.len() / SUPER_BLOCK * SUPER_BLOCK);
        // Without the NaN / infinity blocks (candle's codes for those are its own business).
        x.truncate(x.len() - 2 * SUPER_BLOCK);
        x.extend((0..SUPER_BLOCK).map(|j| if j == 77 { -3.5 } else { (j % 7) as f32 * 0.5 }));
        x.extend([0.0; SUPER_BLOCK]);
        let m = x.len() / SUPER_BLOCK;
        let t = Tensor::from_slice(&x, (m, SUPER_BLOCK), &Device::Cpu).unwrap();
        let bytes = QTensor::quantize(&t, GgmlDType::Q8K)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        let mut ours = QInput::default();
        let forms = Forms {
            q8k: true,
            ..Forms::default()
        };
        ours.quantize_with(Isa::best(), &x, m, SUPER_BLOCK, forms, None);
        let q8k = &ours.q8k;
        let size = 4 + SUPER_BLOCK + 32;
        for b in 0..m {
            let blk = &bytes[b * size..(b + 1) * size];
            let d = f32::from_le_bytes(blk[..4].try_into().unwrap());
            assert_eq!(q8k.d[b].to_bits(), d.to_bits(), "block {b}");
            let q: Vec<i8> = blk[4..4 + SUPER_BLOCK].iter().map(|&v| v as i8).collect();
            assert_eq!(
                &q8k.qs[b * SUPER_BLOCK..(b + 1) * SUPER_BLOCK],
                &q[..],
                "block {b}"
            );
            let sums: Vec<i16> = blk[4 + SUPER_BLOCK..]
                .chunks_exact(2)
                .map(|v| i16::from_le_bytes([v[0], v[1]]))
                .collect();
            assert_eq!(&q8k.bsum16[b * 16..(b + 1) * 16], &sums[..], "block {b}");
            let pairs: Vec<i16> = sums.chunks_exact(2).map(|p| p[0] + p[1]).collect();
            assert_eq!(&q8k.bsum32[b * 8..(b + 1) * 8], &pairs[..], "block {b}");
        }
        assert!(q8k.d[..m].iter().any(|&d| d < 0.0) && q8k.d[m - 1] == 0.0);
    }
}
