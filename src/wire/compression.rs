//! How an update's values travel (`federation.compression`, docs/PROTOCOL.md,
//! "Compressed updates"): float32 as they are, float16, int8 in blocks
//! with an absmax scale, or the largest values of each block (top-k).
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
//! A top-k block is 64 bytes too, for 256 values: a bfloat16 scale, the
//! positions of the block's 31 largest values (one byte each, strictly
//! increasing, so an encoding is canonical and no position is written
//! twice), then those 31 values as signed bytes; every other value is zero.
//! That is 12% of the values at 0.25 bytes a value (16x less than float32).
//! A block's size is fixed, so top-k keeps int8's 64-byte grid and every
//! slice and part decodes alone, as int8's do.
//!
//! Decoding is a pure function of the bytes, so every node reads the same
//! numbers from the same bytes. A scale that is not a finite, non-negative
//! bfloat16, or a top-k block whose positions do not increase, decodes to
//! NaN values: whole updates with one are refused, and a slice input with
//! one is treated as any input with non-finite values (its author is named).

use half::{bf16, f16};

/// Values of one int8 block.
pub const INT8_BLOCK_VALUES: usize = 62;
/// Bytes of one int8 block: a bfloat16 scale and the values.
pub const INT8_BLOCK_BYTES: usize = 64;
/// Values one top-k block stands for (a position is one byte).
pub const TOPK_BLOCK_VALUES: usize = 256;
/// Values a top-k block keeps: a bfloat16 scale, then a byte of position
/// and a byte of value each fill 64 bytes.
pub const TOPK_KEPT: usize = (INT8_BLOCK_BYTES - 2) / 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// float32, 4 bytes a value (adapters themselves, not their changes).
    #[default]
    None,
    /// float16, 2 bytes a value.
    Fp16,
    /// int8 blocks of 62 values with a bfloat16 absmax scale.
    Int8,
    /// The 31 largest of each 256 values, as int8 with a bfloat16 scale.
    TopK,
}

impl Compression {
    /// The name `federation.compression` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Fp16 => "fp16",
            Self::Int8 => "int8",
            Self::TopK => "topk",
        }
    }

    /// Bytes of `n` values (an int8 tensor is padded to whole blocks).
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            Self::None => n * 4,
            Self::Fp16 => n * 2,
            Self::Int8 => n.div_ceil(INT8_BLOCK_VALUES) * INT8_BLOCK_BYTES,
            Self::TopK => n.div_ceil(TOPK_BLOCK_VALUES) * INT8_BLOCK_BYTES,
        }
    }

    /// The byte grid an encoding keeps: slices, parts and each tensor's data
    /// start on multiples of it, so that each holds whole values.
    pub fn alignment(self) -> usize {
        match self {
            Self::None | Self::Fp16 => 8,
            Self::Int8 | Self::TopK => INT8_BLOCK_BYTES,
        }
    }

    /// Values (padding included) in `bytes` bytes of whole values.
    pub fn values_in(self, bytes: usize) -> usize {
        match self {
            Self::None => bytes / 4,
            Self::Fp16 => bytes / 2,
            Self::Int8 => bytes / INT8_BLOCK_BYTES * INT8_BLOCK_VALUES,
            Self::TopK => bytes / INT8_BLOCK_BYTES * TOPK_BLOCK_VALUES,
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
                    let scale = block_scale(block);
                    out.extend_from_slice(&scale.to_le_bytes());
                    for i in 0..INT8_BLOCK_VALUES {
                        out.push(quantize(block.get(i).copied().unwrap_or(0.0), scale));
                    }
                }
                out
            }
            Self::TopK => {
                let mut out = Vec::with_capacity(self.encoded_len(values.len()));
                for block in values.chunks(TOPK_BLOCK_VALUES) {
                    out.extend_from_slice(&encode_topk_block(block));
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
            Self::TopK => {
                if bytes.len() % INT8_BLOCK_BYTES != 0 {
                    return None;
                }
                let mut out = vec![0f32; bytes.len() / INT8_BLOCK_BYTES * TOPK_BLOCK_VALUES];
                for (block, values) in bytes.chunks_exact(INT8_BLOCK_BYTES).zip(out.chunks_exact_mut(TOPK_BLOCK_VALUES)) {
                    let scale = bf16::from_le_bytes([block[0], block[1]]);
                    let (positions, kept) = block[2..].split_at(TOPK_KEPT);
                    if !scale_is_sane(scale) || !increasing(positions) {
                        values.fill(f32::NAN);
                        continue;
                    }
                    for (p, q) in positions.iter().zip(kept) {
                        values[usize::from(*p)] = f32::from(*q as i8) * scale.to_f32();
                    }
                }
                Some(out)
            }
        }
    }

    /// The first bad block in a tensor's bytes (an int8 or top-k scale
    /// that is not a finite, non-negative bfloat16, or top-k positions
    /// that do not increase), as (block, what is wrong), for an error that
    /// names it.
    pub fn bad_block(self, bytes: &[u8]) -> Option<(usize, String)> {
        if !matches!(self, Self::Int8 | Self::TopK) {
            return None;
        }
        bytes.chunks(INT8_BLOCK_BYTES).enumerate().find_map(|(i, block)| {
            let scale = bf16::from_le_bytes([block[0], *block.get(1)?]);
            if !scale_is_sane(scale) {
                return Some((i, format!("scale {scale}; a block's scale is a finite bfloat16, never negative")));
            }
            let positions = block.get(2..2 + TOPK_KEPT)?;
            (self == Self::TopK && !increasing(positions)).then(|| (i, "positions that do not increase; a top-k block names each kept value once, in order".to_owned()))
        })
    }
}

/// Whether top-k positions name each value once, in order.
fn increasing(positions: &[u8]) -> bool {
    positions.windows(2).all(|w| w[0] < w[1])
}

/// One top-k block of up to 256 values (a tensor's last block may be
/// shorter: the rest counts as zeros). The kept values are the largest in
/// magnitude, ties to the earlier position, so the same values always
/// give the same bytes.
fn encode_topk_block(block: &[f32]) -> [u8; INT8_BLOCK_BYTES] {
    let mut order: Vec<usize> = (0..TOPK_BLOCK_VALUES).collect();
    let magnitude = |i: usize| block.get(i).map_or(0.0, |v| v.abs());
    // A total order (larger first, then the earlier position): the first
    // TOPK_KEPT after the partition are the same set on every node.
    order.select_nth_unstable_by(TOPK_KEPT - 1, |a, b| magnitude(*b).total_cmp(&magnitude(*a)).then(a.cmp(b)));
    let mut kept = order[..TOPK_KEPT].to_vec();
    kept.sort_unstable();
    let scale = block_scale(block);
    let mut out = [0u8; INT8_BLOCK_BYTES];
    out[..2].copy_from_slice(&scale.to_le_bytes());
    for (k, position) in kept.into_iter().enumerate() {
        // Positions are below 256 (`TOPK_BLOCK_VALUES`): one byte each.
        out[2 + k] = position as u8;
        out[2 + TOPK_KEPT + k] = quantize(block.get(position).copied().unwrap_or(0.0), scale);
    }
    out
}

/// The scale of an int8 or top-k block: from its absmax, so that no value
/// is clipped.
fn block_scale(block: &[f32]) -> bf16 {
    scale_for(block.iter().fold(0f32, |m, v| m.max(v.abs())))
}

/// `v` as the signed byte that times `scale` (as sent: what the receiver
/// multiplies by) comes nearest to it, ties to even.
fn quantize(v: f32, scale: bf16) -> u8 {
    let divisor = scale.to_f32();
    let q = if divisor > 0.0 { (v / divisor).round_ties_even().clamp(-127.0, 127.0) } else { 0.0 };
    q as i8 as u8
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
        assert_eq!(Compression::Int8.bad_block(&bytes), None);
        for bad in [bf16::NAN, bf16::INFINITY, bf16::from_f32(-0.5)] {
            bytes[b..b + 2].copy_from_slice(&bad.to_le_bytes());
            let got = Compression::Int8.decode(&bytes).unwrap();
            assert!(got[..n].iter().all(|v| v.is_finite()));
            assert!(got[n..2 * n].iter().all(|v| v.is_nan()), "{bad}");
            assert_eq!(Compression::Int8.bad_block(&bytes).map(|(block, _)| block), Some(1));
        }
        assert_eq!(Compression::Int8.decode(&bytes[..b - 1]), None, "not whole blocks");
    }

    /// Top-k keeps each block's 31 largest values, within int8's half a
    /// step, and decodes the rest to zero; bytes that name a position twice
    /// decode to NaN (refused, with the author named).
    #[test]
    fn top_k_keeps_each_blocks_largest_values() {
        let c = Compression::TopK;
        let sent = values(600, 1.0);
        let bytes = c.encode(&sent);
        assert_eq!(bytes.len(), c.encoded_len(600));
        assert_eq!(bytes, c.encode(&sent), "deterministic");
        assert_eq!(c.encoded_len(600) * 16, 3 * 4 * TOPK_BLOCK_VALUES, "16x less than float32");
        let got = c.decode(&bytes).unwrap();
        assert_eq!(got.len(), 3 * TOPK_BLOCK_VALUES);
        assert!(got[600..].iter().all(|v| *v == 0.0), "padding");
        for (s, g) in sent.chunks(TOPK_BLOCK_VALUES).zip(got.chunks(TOPK_BLOCK_VALUES)) {
            let mut magnitudes: Vec<f32> = s.iter().map(|v| v.abs()).collect();
            magnitudes.sort_by(|a, b| b.total_cmp(a));
            let (absmax, smallest_kept) = (magnitudes[0], magnitudes[TOPK_KEPT - 1]);
            let bound = absmax / 127.0 * (1.0 + 1.0 / 128.0) / 2.0 + f32::EPSILON * absmax;
            assert!(g.iter().filter(|v| **v != 0.0).count() <= TOPK_KEPT);
            for (a, b) in s.iter().zip(g) {
                if a.abs() >= smallest_kept {
                    assert!((a - b).abs() <= bound, "{a} → {b}, bound {bound}");
                } else {
                    assert_eq!(*b, 0.0, "{a} is not among the block's largest");
                }
            }
        }
        let mut twice = bytes.clone();
        twice[INT8_BLOCK_BYTES + 3] = twice[INT8_BLOCK_BYTES + 2];
        let got = c.decode(&twice).unwrap();
        assert!(got[..TOPK_BLOCK_VALUES].iter().all(|v| v.is_finite()));
        assert!(got[TOPK_BLOCK_VALUES..2 * TOPK_BLOCK_VALUES].iter().all(|v| v.is_nan()));
        assert_eq!(c.bad_block(&twice).map(|(block, _)| block), Some(1));
        assert_eq!(c.bad_block(&bytes), None);
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
