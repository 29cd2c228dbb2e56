//! Laying quantized matrices out as the tensors of the standard checkpoint layouts: GPTQ v1
//! ([`gptq`]), AutoAWQ's GEMM packing ([`awq`]) and compressed-tensors ([`compressed`]). Each
//! writer turns one projection into its named tensors and knows its layout's
//! `quantization_config`; the layouts are described in docs/quantization.md.

pub mod awq;
pub mod compressed;
pub mod gptq;

use std::borrow::Cow;

use half::{bf16, f16};
use minserve_model::export::ExportDType;
use safetensors::{Dtype, View};

/// A tensor as the bytes safetensors stores (little-endian), with its dtype and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn int32(values: &[i32], shape: Vec<usize>) -> Self {
        Self::of(
            Dtype::I32,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()),
        )
    }

    pub fn int64(values: &[i64], shape: Vec<usize>) -> Self {
        Self::of(
            Dtype::I64,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()),
        )
    }

    pub fn int8(values: &[i8], shape: Vec<usize>) -> Self {
        Self::of(Dtype::I8, shape, values.iter().map(|&v| v as u8))
    }

    pub fn fp8_e4m3(bits: &[u8], shape: Vec<usize>) -> Self {
        Self::of(Dtype::F8_E4M3, shape, bits.iter().copied())
    }

    /// Floats stored as `dtype` (rounded to nearest for f16/bf16).
    pub fn float(values: &[f32], shape: Vec<usize>, dtype: ExportDType) -> Self {
        match dtype {
            ExportDType::F32 => Self::of(
                Dtype::F32,
                shape,
                values.iter().flat_map(|v| v.to_le_bytes()),
            ),
            ExportDType::F16 => Self::of(
                Dtype::F16,
                shape,
                values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()),
            ),
            ExportDType::BF16 => Self::of(
                Dtype::BF16,
                shape,
                values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()),
            ),
        }
    }

    fn of(dtype: Dtype, shape: Vec<usize>, bytes: impl Iterator<Item = u8>) -> Self {
        let data: Vec<u8> = bytes.collect();
        debug_assert_eq!(
            data.len(),
            shape.iter().product::<usize>() * dtype.bitsize() / 8
        );
        Self { dtype, shape, data }
    }

    /// The values of an int32 tensor (tests, reading back).
    pub fn as_i32(&self) -> Vec<i32> {
        self.data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

impl View for &RawTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// `values.len()` codes of `bits` bits each into little-endian 32-bit words, the first code in
/// the lowest bits: the packing every layout here uses, along different axes.
pub fn pack_words(values: impl ExactSizeIterator<Item = u8>, bits: u32) -> Vec<i32> {
    let per_word = (32 / bits) as usize;
    let mut words = Vec::with_capacity(values.len().div_ceil(per_word));
    let (mut word, mut filled) = (0u32, 0usize);
    for v in values {
        word |= (v as u32) << (bits as usize * filled);
        filled += 1;
        if filled == per_word {
            words.push(word as i32);
            (word, filled) = (0, 0);
        }
    }
    if filled > 0 {
        words.push(word as i32);
    }
    words
}

/// A tensor and its name: `prefix` (e.g. `model.layers.0.self_attn.q_proj`) + `.` + `suffix`.
pub type Named = (String, RawTensor);

pub(crate) fn named(prefix: &str, suffix: &str, tensor: RawTensor) -> Named {
    (format!("{prefix}.{suffix}"), tensor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_take_the_first_code_in_the_low_bits() {
        assert_eq!(
            pack_words([1u8, 2, 3, 4, 5, 6, 7, 8].into_iter(), 4),
            vec![0x8765_4321u32 as i32]
        );
        assert_eq!(
            pack_words([0xffu8, 1, 0, 0x80].into_iter(), 8),
            vec![0x8000_01ffu32 as i32]
        );
        // A short tail is padded with zeros.
        assert_eq!(pack_words([0xfu8; 9].into_iter(), 4), vec![-1, 0xf]);
    }
}
