//! The FP8 E4M3 number format (OCP 8-bit floating point, the `e4m3fn` variant that
//! compressed-tensors checkpoints, vLLM and PyTorch's `float8_e4m3fn` use): 1 sign bit, 4
//! exponent bits (bias 7), 3 mantissa bits; no infinities, one NaN code per sign (`S.1111.111`),
//! largest finite magnitude 448, smallest normal 2^-6, smallest subnormal 2^-9.
//!
//! Decoding is exact into f32 and into bf16 (whose 8 exponent bits cover E4M3's whole range,
//! subnormals included, and whose 7 mantissa bits hold its 3). Encoding rounds to nearest, ties
//! to even, and saturates ("satfinite"): magnitudes above 448, infinities included, become
//! ±448, because a weight or a cached key that overflowed to NaN would poison every result it
//! touches, whereas a clipped one is merely off. NaN stays NaN.
//!
//! One place for the format: the FP8 weight loader and kernels (`quantized_checkpoint::fp8`,
//! `qmatmul::fp8`) and the FP8 KV cache (`kv_cache`) all encode and decode through here.

/// The largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// The code of +NaN (`0x7F`; `0xFF` is -NaN).
pub const E4M3_NAN: u8 = 0x7F;

/// One E4M3 code, as stored (the FP8 KV cache's element).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct E4m3(pub u8);

impl E4m3 {
    #[inline]
    pub fn to_f32(self) -> f32 {
        decode(self.0)
    }
}

/// Every code's value, indexed by the code.
static DECODE: [f32; 256] = decode_table();

/// [`decode`] for constant tables.
pub(crate) const fn decode_const(code: u8) -> f32 {
    let magnitude = code & 0x7F;
    let exponent = (magnitude >> 3) as u32;
    let mantissa = (magnitude & 7) as u32;
    let value = if magnitude == E4M3_NAN {
        f32::NAN
    } else if exponent == 0 {
        // Subnormal: mantissa * 2^-9, exact in f32.
        mantissa as f32 / 512.0
    } else {
        // 2^(e - 7) * (1 + m / 8): rebias the exponent to f32's 127, move the mantissa up.
        f32::from_bits(((exponent + 120) << 23) | (mantissa << 20))
    };
    if code & 0x80 != 0 {
        -value
    } else {
        value
    }
}

const fn decode_table() -> [f32; 256] {
    let mut table = [0f32; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = decode_const(code as u8);
        code += 1;
    }
    table
}

/// The value of an E4M3 code (exact).
#[inline]
pub fn decode(code: u8) -> f32 {
    DECODE[code as usize]
}

/// Whether `code` is one of the two NaN codes.
#[inline]
pub fn is_nan(code: u8) -> bool {
    code & 0x7F == E4M3_NAN
}

/// `x` as the nearest E4M3 code (ties to even), saturating at ±448 (infinities too); NaN gives
/// the NaN code of its sign.
pub fn encode(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | E4M3_NAN;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    if a < 1.0 / 64.0 {
        // Below the smallest normal the step is 2^-9 everywhere: scaling by 512 is exact, and
        // a round up to 8 lands on code 8, the smallest normal, as it should.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // a is a normal f32 in [2^-6, 448): keep the top 3 of its 23 mantissa bits, rounding the
    // other 20 to nearest even. A carry out of the mantissa moves into the exponent field,
    // which is the right next value; it cannot pass 448 (0x7E) since a < 448.
    let bits = a.to_bits();
    let exponent = (bits >> 23) as i32 - 127;
    let mantissa = bits & 0x7F_FFFF;
    let (mut top, rest) = (mantissa >> 20, mantissa & 0xF_FFFF);
    const HALF: u32 = 0x8_0000;
    if rest > HALF || (rest == HALF && top & 1 == 1) {
        top += 1;
    }
    sign | ((((exponent + 7) as u32) << 3) + top) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All 256 codes against the format's definition, computed another way (f64 powers).
    #[test]
    fn every_code_decodes_to_its_value() {
        for code in 0..=255u8 {
            let (sign, e, m) = (code >> 7, (code >> 3) & 0xF, code & 7);
            let value = decode(code);
            if e == 0xF && m == 7 {
                assert!(value.is_nan(), "{code:#04x}");
                assert!(is_nan(code));
                continue;
            }
            assert!(!is_nan(code));
            let magnitude = match e {
                0 => m as f64 * 2f64.powi(-9),
                _ => (1.0 + m as f64 / 8.0) * 2f64.powi(e as i32 - 7),
            };
            let expected = if sign == 1 { -magnitude } else { magnitude };
            assert_eq!(value as f64, expected, "{code:#04x}");
            // Negative zero keeps its sign.
            assert_eq!(value.is_sign_negative(), sign == 1, "{code:#04x}");
        }
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0xFE), -448.0);
        assert_eq!(decode(0x08), 2f32.powi(-6));
        assert_eq!(decode(0x01), 2f32.powi(-9));
    }

    /// Every finite code encodes back to itself (and -0 to 0x80).
    #[test]
    fn encode_round_trips_every_finite_code() {
        for code in 0..=255u8 {
            if !is_nan(code) {
                assert_eq!(encode(decode(code)), code, "{code:#04x}");
            }
        }
    }

    /// Between two neighbouring codes, values round to the nearer, and the midpoint to the
    /// one with an even mantissa, in the subnormal and normal ranges and across exponent edges.
    #[test]
    fn encode_rounds_to_nearest_even() {
        for code in 0..0x7Du8 {
            let (lo, hi) = (decode(code), decode(code + 1));
            let mid = (lo + hi) / 2.0;
            let even = if code & 1 == 0 { code } else { code + 1 };
            assert_eq!(encode(mid), even, "midpoint of {code:#04x}");
            assert_eq!(encode(-mid), 0x80 | even, "-midpoint of {code:#04x}");
            let just_below = f32::from_bits(mid.to_bits() - 1);
            let just_above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!(
                encode(just_below),
                code,
                "below the midpoint of {code:#04x}"
            );
            assert_eq!(
                encode(just_above),
                code + 1,
                "above the midpoint of {code:#04x}"
            );
        }
        // Subnormal edge: halfway between 0 and 2^-9 is a tie to 0; 7.5 * 2^-9 ties up to the
        // smallest normal (8 * 2^-9 = 2^-6, code 8, even).
        assert_eq!(encode(2f32.powi(-10)), 0);
        assert_eq!(encode(7.5 * 2f32.powi(-9)), 0x08);
        // Far below the smallest subnormal: zero, keeping the sign.
        assert_eq!(encode(1e-30), 0x00);
        assert_eq!(encode(-1e-30), 0x80);
        // f32 subnormals too.
        assert_eq!(encode(f32::from_bits(1)), 0x00);
    }

    #[test]
    fn encode_saturates_and_keeps_nan() {
        for x in [448.0f32, 449.0, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(encode(x), 0x7E, "{x}");
            assert_eq!(encode(-x), 0xFE, "{x}");
        }
        // Just below the largest value, still rounding to it or its neighbour.
        assert_eq!(encode(447.9), 0x7E);
        assert_eq!(encode(416.0), 0x7D);
        assert_eq!(encode(f32::NAN), E4M3_NAN);
        assert_eq!(encode(-f32::NAN), 0x80 | E4M3_NAN);
        assert!(decode(encode(f32::NAN)).is_nan());
    }
}
