//! GGML tensor types and their dequantization to float32: every type
//! llama.cpp's usual mixes hold (Q4_K_M holds Q4_K, Q6_K, Q5_0 and Q8_0).
//! Each function follows `gguf`'s Python `dequantize` operation for
//! operation (the same float32 products and sums in the same order), so the
//! values are bit-identical to it; fixtures made with it check that
//! (`scripts/gguf_fixtures.py`, `tests/fixtures/gguf_quants/`).

use half::{bf16, f16};

/// Values in a K-quant super-block.
const QK_K: usize = 256;

/// A GGML tensor type, by its number in GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Bf16,
}

impl GgmlType {
    /// The type numbered `id`, or the name llama.cpp gives it where this
    /// loader does not read it.
    pub fn from_id(id: u32) -> Result<GgmlType, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            other => return Err(unsupported_name(other)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Bf16 => "BF16",
        }
    }

    /// (values, bytes) of one block.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2K => (QK_K, 84),
            GgmlType::Q3K => (QK_K, 110),
            GgmlType::Q4K => (QK_K, 144),
            GgmlType::Q5K => (QK_K, 176),
            GgmlType::Q6K => (QK_K, 210),
        }
    }

    /// The bytes of `values` values, or why there is no such size (not
    /// whole blocks, or too large).
    pub fn bytes_for(self, values: u64) -> Result<u64, String> {
        let (per_block, block_bytes) = self.block();
        if values % per_block as u64 != 0 {
            return Err(format!("{values} values are not whole {} blocks of {per_block}", self.name()));
        }
        (values / per_block as u64).checked_mul(block_bytes as u64).ok_or_else(|| format!("{values} {} values overflow", self.name()))
    }

    /// Whether MLX's own GGUF loader reads this type exactly (floats, and
    /// the quantizations it maps onto its affine groups of 32).
    pub fn read_by_mlx(self) -> bool {
        matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
    }
}

/// llama.cpp's name of a type this loader does not read.
fn unsupported_name(id: u32) -> String {
    let name = match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("type {id}, unknown to this loader"),
    };
    format!("{name} (type {id})")
}

/// `bytes`, whole blocks of `kind`, as float32 values.
pub fn dequantize(kind: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let (per_block, block_bytes) = kind.block();
    if bytes.len() % block_bytes != 0 {
        return Err(format!("{} bytes are not whole {} blocks of {block_bytes} bytes", bytes.len(), kind.name()));
    }
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * per_block);
    let blocks = bytes.chunks_exact(block_bytes);
    match kind {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(half16)),
        GgmlType::Bf16 => out.extend(blocks.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        GgmlType::Q4_0 => blocks.for_each(|b| q4_0(b, &mut out)),
        GgmlType::Q4_1 => blocks.for_each(|b| q4_1(b, &mut out)),
        GgmlType::Q5_0 => blocks.for_each(|b| q5_0(b, &mut out)),
        GgmlType::Q5_1 => blocks.for_each(|b| q5_1(b, &mut out)),
        GgmlType::Q8_0 => blocks.for_each(|b| q8_0(b, &mut out)),
        GgmlType::Q2K => blocks.for_each(|b| q2_k(b, &mut out)),
        GgmlType::Q3K => blocks.for_each(|b| q3_k(b, &mut out)),
        GgmlType::Q4K => blocks.for_each(|b| q4_k(b, &mut out)),
        GgmlType::Q5K => blocks.for_each(|b| q5_k(b, &mut out)),
        GgmlType::Q6K => blocks.for_each(|b| q6_k(b, &mut out)),
    }
    Ok(out)
}

/// A little-endian float16 at the start of `b`, as float32.
fn half16(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// The 4-bit value `i` (0..32) of a 16-byte block: low nibbles first.
fn nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 { qs[i] & 0x0F } else { qs[i - 16] >> 4 }
}

/// Bit `i` of a little-endian u32.
fn high_bit(qh: &[u8], i: usize) -> u8 {
    (u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]) >> i) as u8 & 1
}

fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half16(b);
    out.extend((0..32).map(|i| d * (nibble(&b[2..], i) as i8 - 8) as f32));
}

fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half16(b), half16(&b[2..]));
    out.extend((0..32).map(|i| d * nibble(&b[4..], i) as f32 + m));
}

fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let (d, qh, qs) = (half16(b), &b[2..6], &b[6..]);
    out.extend((0..32).map(|i| d * ((nibble(qs, i) | high_bit(qh, i) << 4) as i8 - 16) as f32));
}

fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m, qh, qs) = (half16(b), half16(&b[2..]), &b[4..8], &b[8..]);
    out.extend((0..32).map(|i| d * (nibble(qs, i) | high_bit(qh, i) << 4) as f32 + m));
}

fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half16(b);
    out.extend(b[2..].iter().map(|q| *q as i8 as f32 * d));
}

fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (half16(&b[80..]), half16(&b[82..]));
    for e in 0..QK_K {
        // Element e: 32-byte half h, 2-bit shift s, byte l.
        let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
        let q = (qs[h * 32 + l] >> (2 * s)) & 3;
        let sc = scales[e / 16];
        let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
        out.push(dl * q as f32 - ml);
    }
}

fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, scales, d) = (&b[..32], &b[32..96], &b[96..108], half16(&b[108..]));
    // Sixteen 6-bit scales: low 4 bits in bytes 0..8 (two a byte), high 2
    // bits in bytes 8..12 (four a byte).
    let scale = |k: usize| {
        let low = (scales[k % 8] >> (4 * (k / 8))) & 0x0F;
        let high = (scales[8 + k % 4] >> (2 * (k / 4))) & 0x03;
        ((low | high << 4) as i8 - 32) as f32
    };
    for e in 0..QK_K {
        let (h, s, l) = (e / 128, (e % 128) / 32, e % 32);
        let low = (qs[h * 32 + l] >> (2 * s)) & 3;
        // The hmask bit set means no offset; clear means minus 4.
        let high = ((hmask[l] >> (e / 32)) & 1) ^ 1;
        let q = (low as i8 - (high << 2) as i8) as f32;
        out.push(d * scale(e / 16) * q);
    }
}

/// Q4_K's and Q5_K's eight 6-bit (scale, min) pairs, packed in 12 bytes.
fn scale_min_k4(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 0x3F, scales[4 + j] & 0x3F)
    } else {
        let (packed, d, m) = (scales[8 + j - 4], scales[j - 4], scales[j]);
        ((packed & 0x0F) | ((d >> 2) & 0x30), (packed >> 4) | ((m >> 2) & 0x30))
    }
}

fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, scales, qs) = (half16(b), half16(&b[2..]), &b[4..16], &b[16..]);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(scales, j);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        // Sub-block j: the low (even j) or high nibbles of 32 bytes.
        let (c, t) = (j / 2, j % 2);
        out.extend(qs[c * 32..c * 32 + 32].iter().map(|q| dl * ((q >> (4 * t)) & 0x0F) as f32 - ml));
    }
}

fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin, scales, qh, qs) = (half16(b), half16(&b[2..]), &b[4..16], &b[16..48], &b[48..]);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(scales, j);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        let (c, t) = (j / 2, j % 2);
        out.extend((0..32).map(|l| {
            let q = ((qs[c * 32 + l] >> (4 * t)) & 0x0F) | ((qh[l] >> j) & 1) << 4;
            dl * q as f32 - ml
        }));
    }
}

fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales, d) = (&b[..128], &b[128..192], &b[192..208], half16(&b[208..]));
    for e in 0..QK_K {
        let (a, rest) = (e / 128, e % 128);
        let low = (ql[a * 64 + rest % 64] >> (4 * (rest / 64))) & 0x0F;
        let high = (qh[a * 32 + rest % 32] >> (2 * (rest / 32))) & 0x03;
        let q = ((low | high << 4) as i8 - 32) as f32;
        out.push(d * scales[e / 16] as i8 as f32 * q);
    }
}

/// Q4_K blocks as MLX affine 4-bit groups of 32, an exact mapping: each
/// 32-value sub-block has one scale (`d · sc`) and one offset (`dmin · m`),
/// so `scale · q + bias` with `bias = -(dmin · m)` is the dequantized value
/// bit for bit.
pub fn q4_k_as_affine(bytes: &[u8]) -> Result<Affine4, String> {
    let (_, block_bytes) = GgmlType::Q4K.block();
    if bytes.len() % block_bytes != 0 {
        return Err(format!("{} bytes are not whole Q4_K blocks of {block_bytes} bytes", bytes.len()));
    }
    let blocks = bytes.len() / block_bytes;
    let (mut packed, mut scales, mut biases) = (Vec::with_capacity(blocks * 32), Vec::with_capacity(blocks * 8), Vec::with_capacity(blocks * 8));
    for b in bytes.chunks_exact(block_bytes) {
        let (d, dmin, scale_bytes, qs) = (half16(b), half16(&b[2..]), &b[4..16], &b[16..]);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(scale_bytes, j);
            scales.push(d * sc as f32);
            biases.push(-(dmin * m as f32));
            let (c, t) = (j / 2, j % 2);
            for word in qs[c * 32..c * 32 + 32].chunks_exact(8) {
                packed.push(word.iter().enumerate().fold(0u32, |acc, (k, q)| acc | (((q >> (4 * t)) & 0x0F) as u32) << (4 * k)));
            }
        }
    }
    Ok(Affine4 { packed, scales, biases })
}

/// MLX's affine 4-bit form of a matrix, in row-major order.
pub struct Affine4 {
    /// Eight values a word, the first in the low bits.
    pub packed: Vec<u32>,
    /// One scale and one bias for each group of 32 values.
    pub scales: Vec<f32>,
    pub biases: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Every type's fixture (random blocks with sane scales, from
    /// `scripts/gguf_fixtures.py`) dequantizes to exactly the float32 bits
    /// `gguf`'s Python `dequantize` gave.
    #[test]
    fn every_type_dequantizes_bit_exactly_like_gguf_py() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_quants");
        let kinds = [
            GgmlType::F16,
            GgmlType::Bf16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q2K,
            GgmlType::Q3K,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ];
        for kind in kinds {
            let raw = std::fs::read(dir.join(format!("{}.bin", kind.name()))).unwrap();
            let expected = std::fs::read(dir.join(format!("{}.f32", kind.name()))).unwrap();
            let got = dequantize(kind, &raw).unwrap();
            assert_eq!(got.len() * 4, expected.len(), "{}", kind.name());
            let mismatches = got.iter().zip(expected.chunks_exact(4)).enumerate().filter(|(_, (g, e))| g.to_bits() != u32::from_le_bytes([e[0], e[1], e[2], e[3]]));
            let first: Vec<usize> = mismatches.map(|(i, _)| i).take(5).collect();
            assert!(first.is_empty(), "{}: values {first:?} differ from gguf-py's", kind.name());
        }
    }

    /// The affine form of the Q4_K fixture, dequantized as MLX does
    /// (`scale · q + bias`), is gguf-py's values bit for bit.
    #[test]
    fn q4_k_maps_exactly_onto_affine_groups_of_32() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_quants");
        let raw = std::fs::read(dir.join("Q4_K.bin")).unwrap();
        let expected = dequantize(GgmlType::Q4K, &raw).unwrap();
        let Affine4 { packed, scales, biases } = q4_k_as_affine(&raw).unwrap();
        let values: Vec<f32> = (0..expected.len()).map(|i| {
            let q = (packed[i / 8] >> (4 * (i % 8))) & 0x0F;
            scales[i / 32] * q as f32 + biases[i / 32]
        }).collect();
        assert!(values.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn partial_blocks_and_unknown_types_are_named() {
        assert!(dequantize(GgmlType::Q4K, &[0; 143]).unwrap_err().contains("not whole Q4_K blocks of 144 bytes"));
        assert!(GgmlType::Q6K.bytes_for(100).unwrap_err().contains("not whole Q6_K blocks of 256"));
        assert_eq!(GgmlType::Q5_0.bytes_for(64), Ok(44));
        assert_eq!(GgmlType::from_id(20).unwrap_err(), "IQ4_NL (type 20)");
        assert_eq!(GgmlType::from_id(99).unwrap_err(), "type 99, unknown to this loader");
        assert_eq!(GgmlType::from_id(12), Ok(GgmlType::Q4K));
    }
}
