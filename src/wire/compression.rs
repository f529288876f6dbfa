//! How an update's values travel (`federation.compression`, docs/PROTOCOL.md,
//! "Compressed updates"): float32 as they are, float16, or int8 in blocks
//! with an absmax scale.
//!
//! An int8 block is 64 bytes: a bfloat16 scale, then 62 signed bytes,
//! value = byte × scale. The scale is bfloat16 because a round's changes are
//! small (1e-6 to 1e-3): float16 would hold their scales as subnormals,
//! with errors of several percent; bfloat16 has float32's range, and the
//! scale is rounded up so that no value is clipped. Every block lies on
//! the 64-byte grid that the reduce exchange then cuts slices and audit
//! parts on (the header is padded to 64, each tensor to whole blocks,
//! slices are multiples of 64 bytes), so an owner decodes any slice or part
//! without the rest of the update. 62 values a scale cost 1.03 bytes a
//! value (3.9x less than float32) and bound a value's error by half a
//! step, absmax / 254 of its block.
//!
//! Decoding is a pure function of the bytes, so every node reads the same
//! numbers from the same bytes. A scale that is not a finite, non-negative
//! bfloat16 decodes to NaN values: whole updates with one are refused, and a
//! slice input with one is treated as any input with non-finite values
//! (its author is named).

use half::{bf16, f16};

/// Values of one int8 block.
pub const INT8_BLOCK_VALUES: usize = 62;
/// Bytes of one int8 block: a bfloat16 scale and the values.
pub const INT8_BLOCK_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// float32, 4 bytes a value (adapters themselves, not their changes).
    #[default]
    None,
    /// float16, 2 bytes a value.
    Fp16,
    /// int8 blocks of 62 values with a bfloat16 absmax scale.
    Int8,
}

impl Compression {
    /// Bytes of `n` values (an int8 tensor is padded to whole blocks).
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            Self::None => n * 4,
            Self::Fp16 => n * 2,
            Self::Int8 => n.div_ceil(INT8_BLOCK_VALUES) * INT8_BLOCK_BYTES,
        }
    }

    /// The byte grid an encoding keeps: slices, parts and each tensor's data
    /// start on multiples of it, so that each holds whole values.
    pub fn alignment(self) -> usize {
        match self {
            Self::None | Self::Fp16 => 8,
            Self::Int8 => INT8_BLOCK_BYTES,
        }
    }

    /// Values (padding included) in `bytes` bytes of whole values.
    pub fn values_in(self, bytes: usize) -> usize {
        match self {
            Self::None => bytes / 4,
            Self::Fp16 => bytes / 2,
            Self::Int8 => bytes / INT8_BLOCK_BYTES * INT8_BLOCK_VALUES,
        }
    }

    /// The bytes of `values` (one tensor, or a slice's run of whole
    /// blocks): round to nearest, ties to even, for float16 and int8.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::None => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::Fp16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            Self::Int8 => {
                let mut out = Vec::with_capacity(self.encoded_len(values.len()));
                for block in values.chunks(INT8_BLOCK_VALUES) {
                    let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = scale_for(absmax);
                    // The scale as sent: what the receiver multiplies by.
                    let divisor = scale.to_f32();
                    out.extend_from_slice(&scale.to_le_bytes());
                    for i in 0..INT8_BLOCK_VALUES {
                        let v = block.get(i).copied().unwrap_or(0.0);
                        let q = if divisor > 0.0 { (v / divisor).round_ties_even().clamp(-127.0, 127.0) } else { 0.0 };
                        out.push(q as i8 as u8);
                    }
                }
                out
            }
        }
    }

    /// The values in `bytes`, which must hold whole values (whole blocks
    /// for int8, padding included); `None` otherwise.
    pub fn decode(self, bytes: &[u8]) -> Option<Vec<f32>> {
        match self {
            Self::None => (bytes.len() % 4 == 0).then(|| bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
            Self::Fp16 => (bytes.len() % 2 == 0).then(|| bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()),
            Self::Int8 => {
                if bytes.len() % INT8_BLOCK_BYTES != 0 {
                    return None;
                }
                let mut out = Vec::with_capacity(bytes.len() / INT8_BLOCK_BYTES * INT8_BLOCK_VALUES);
                for block in bytes.chunks_exact(INT8_BLOCK_BYTES) {
                    let scale = bf16::from_le_bytes([block[0], block[1]]);
                    let scale = if scale_is_sane(scale) { scale.to_f32() } else { f32::NAN };
                    out.extend(block[2..].iter().map(|q| f32::from(*q as i8) * scale));
                }
                Some(out)
            }
        }
    }

    /// The first bad int8 scale in a tensor's bytes, as (block, scale),
    /// for an error that names it.
    pub fn bad_scale(self, bytes: &[u8]) -> Option<(usize, f32)> {
        if self != Self::Int8 {
            return None;
        }
        bytes.chunks(INT8_BLOCK_BYTES).enumerate().find_map(|(i, block)| {
            let scale = bf16::from_le_bytes([block[0], *block.get(1)?]);
            (!scale_is_sane(scale)).then(|| (i, scale.to_f32()))
        })
    }
}

/// A scale an honest encoder writes: finite, and not negative (an absmax
/// is never below zero; a negative scale would flip the block's signs).
fn scale_is_sane(scale: bf16) -> bool {
    scale.is_finite() && !scale.is_sign_negative()
}

/// The smallest bfloat16 at least `absmax / 127` (so no value of the block
/// is clipped), at most bfloat16's largest finite value.
fn scale_for(absmax: f32) -> bf16 {
    let wanted = absmax / 127.0;
    if !wanted.is_finite() {
        return bf16::MAX;
    }
    let near = bf16::from_f32(wanted);
    if near.to_f32() >= wanted {
        return near;
    }
    // Positive and finite: the next bfloat16 up is the next bit pattern.
    let up = bf16::from_bits(near.to_bits() + 1);
    if up.is_finite() { up } else { bf16::MAX }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-spread/2, spread/2], irregular enough that every block
    /// has its own absmax (the wire layer takes nothing from `rng`).
    fn values(n: usize, spread: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 12.9898).sin() * 43_758.547).fract() * spread / 2.0).collect()
    }

    #[test]
    fn int8_round_trip_error_stays_within_half_a_step_of_its_block() {
        for spread in [1e-4, 1e-2, 1.0, 300.0] {
            let sent = values(1000, spread);
            let bytes = Compression::Int8.encode(&sent);
            assert_eq!(bytes.len(), Compression::Int8.encoded_len(1000));
            let got = Compression::Int8.decode(&bytes).unwrap();
            assert_eq!(got.len(), 1000usize.div_ceil(INT8_BLOCK_VALUES) * INT8_BLOCK_VALUES, "padded to whole blocks");
            assert!(got[1000..].iter().all(|v| *v == 0.0));
            for (block, (s, g)) in sent.chunks(INT8_BLOCK_VALUES).zip(got.chunks(INT8_BLOCK_VALUES)).enumerate() {
                let absmax = s.iter().fold(0f32, |m, v| m.max(v.abs()));
                // The scale is absmax/127 rounded up to bfloat16 (8 bits of
                // mantissa), so a step is at most absmax/127·(1 + 2^-7).
                let bound = absmax / 127.0 * (1.0 + 1.0 / 128.0) / 2.0 + f32::EPSILON * absmax;
                for (a, b) in s.iter().zip(g) {
                    assert!((a - b).abs() <= bound, "spread {spread}, block {block}: {a} → {b}, bound {bound}");
                }
            }
        }
    }

    #[test]
    fn fp16_round_trip_is_within_float16_precision() {
        let sent = values(500, 2.0);
        let got = Compression::Fp16.decode(&Compression::Fp16.encode(&sent)).unwrap();
        for (a, b) in sent.iter().zip(&got) {
            assert!((a - b).abs() <= a.abs() * 1e-3 + 1e-7, "{a} → {b}");
        }
        assert_eq!(Compression::None.decode(&Compression::None.encode(&sent)).unwrap(), sent);
    }

    #[test]
    fn a_bad_scale_decodes_to_nan_and_is_named() {
        let (n, b) = (INT8_BLOCK_VALUES, INT8_BLOCK_BYTES);
        let mut bytes = Compression::Int8.encode(&values(3 * n, 1.0));
        assert_eq!(Compression::Int8.bad_scale(&bytes), None);
        for bad in [bf16::NAN, bf16::INFINITY, bf16::from_f32(-0.5)] {
            bytes[b..b + 2].copy_from_slice(&bad.to_le_bytes());
            let got = Compression::Int8.decode(&bytes).unwrap();
            assert!(got[..n].iter().all(|v| v.is_finite()));
            assert!(got[n..2 * n].iter().all(|v| v.is_nan()), "{bad}");
            assert_eq!(Compression::Int8.bad_scale(&bytes).map(|(block, _)| block), Some(1));
        }
        assert_eq!(Compression::Int8.decode(&bytes[..b - 1]), None, "not whole blocks");
    }

    #[test]
    fn the_scale_rounds_up_and_stays_finite() {
        for absmax in [1e-30, 3.3e-7, 1.0, 127.0, 1e30, f32::MAX] {
            let scale = scale_for(absmax).to_f32();
            assert!(scale.is_finite() && scale >= (absmax / 127.0).min(bf16::MAX.to_f32()), "{absmax}: {scale}");
        }
    }

    #[test]
    fn encoding_is_deterministic_and_zero_stays_zero() {
        let sent = values(60, 0.3);
        assert_eq!(Compression::Int8.encode(&sent), Compression::Int8.encode(&sent));
        let zeros = Compression::Int8.encode(&[0.0; 2 * INT8_BLOCK_VALUES]);
        assert!(Compression::Int8.decode(&zeros).unwrap().iter().all(|v| *v == 0.0));
    }
}
