//! Quantizing activation rows to ggml's Q8_1 blocks ([`QInput::quantize`]), once per input
//! however many weights read it: on the thread pool when large, sixteen blocks at a time on
//! AVX-512, and bit-identical on every instruction set to candle's `BlockQ8_1::from_float` (this
//! file's tests check it). Also the per-thread buffer that single multiplications quantize into.

use std::cell::RefCell;

use super::isa::Isa;
use super::layout::{QInput, BLOCK};
use super::scalar::quantize_block;
#[cfg(target_arch = "x86_64")]
use super::x86;

/// Below this many blocks, quantizing on the calling thread beats waking the pool.
const PARALLEL_QUANTIZE_BLOCKS: usize = 512;

impl QInput {
    /// Quantizes `x` (`m x k`, row-major; `k` a multiple of 32), reusing this buffer's memory.
    /// The result is the same on every instruction set.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize) {
        self.quantize_with(Isa::best(), x, m, k)
    }

    pub(crate) fn quantize_with(&mut self, isa: Isa, x: &[f32], m: usize, k: usize) {
        assert!(isa.is_available(), "qmatmul: {isa:?} is not available here");
        assert!(
            k.is_multiple_of(BLOCK),
            "qmatmul: k = {k} is not a multiple of {BLOCK}"
        );
        assert_eq!(x.len(), m * k, "qmatmul: x is not {m} x {k}");
        let nb = k / BLOCK;
        self.m = m;
        self.nb = nb;
        let blocks = m * nb;
        // Grow only: the buffer is reused across calls.
        if self.d.len() < blocks {
            self.qs.resize(blocks * BLOCK, 0);
            self.d.resize(blocks, 0.0);
            self.s.resize(blocks, 0.0);
            self.sum.resize(blocks, 0);
        }
        let dst = BlockWriter {
            qs: self.qs.as_mut_ptr(),
            d: self.d.as_mut_ptr(),
            s: self.s.as_mut_ptr(),
            sum: self.sum.as_mut_ptr(),
        };
        // SAFETY: the buffers hold `blocks` blocks and `x` as many (asserted above); each block
        // index goes to exactly one call, so no two threads write the same block.
        if blocks < PARALLEL_QUANTIZE_BLOCKS {
            unsafe { dst.quantize(isa, x, 0..blocks) }
        } else {
            crate::pool::pool()
                .execute_chunked(blocks, |range| unsafe { dst.quantize(isa, x, range) });
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
    /// # Safety
    /// `isa` is available, `x` and the buffers hold every block of `range`, and nothing else
    /// accesses those blocks meanwhile.
    unsafe fn quantize(&self, isa: Isa, x: &[f32], range: std::ops::Range<usize>) {
        let mut range = range;
        // Whole groups of blocks first, their scales computed side by side (1.7x faster per
        // block); a group that needs the scalar path, and the tail, go block by block below.
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512Vnni {
            while range.len() >= x86::QUANTIZE_GROUP {
                let i = range.start;
                assert!(x.len() >= (i + x86::QUANTIZE_GROUP) * BLOCK);
                let (q, d, s, sum) = (
                    self.qs.add(i * BLOCK),
                    self.d.add(i),
                    self.s.add(i),
                    self.sum.add(i),
                );
                if !x86::quantize_16_blocks(x.as_ptr().add(i * BLOCK), q, d, s, sum) {
                    break;
                }
                range.start += x86::QUANTIZE_GROUP;
            }
        }
        for i in range {
            let x: &[f32; BLOCK] = x[i * BLOCK..(i + 1) * BLOCK].try_into().unwrap();
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
        scalar.quantize_with(Isa::Scalar, &x, m, BLOCK);
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
            acts.quantize_with(isa, &x, m, BLOCK);
            let first = acts.qs.iter().zip(&scalar.qs).position(|(a, b)| a != b);
            assert_eq!(first, None, "{isa:?}: first differing value");
            assert_eq!(acts.sum, scalar.sum, "{isa:?}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&acts.d), bits(&scalar.d), "{isa:?}");
            assert_eq!(bits(&acts.s), bits(&scalar.s), "{isa:?}");
        }
    }
}
