//! The wire format of adapters, with no idea of MLX: tensors as bytes, the
//! canonical safetensors encoding (equal tensors give equal bytes, so equal
//! adapters have equal hashes on every node), and content-addressed chunks.
//!
//! Everything that decodes is bounded before it allocates: the network is
//! untrusted.

use std::collections::BTreeMap;
use std::fmt;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::compression::{Compression, INT8_BLOCK_BYTES};

/// Chunks are at most this many bytes (docs/ARCHITECTURE.md: ≤ 256 KiB).
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Fixed safetensors metadata: part of the canonical encoding.
const FORMAT_METADATA: (&str, &str) = ("format", "blossom-adapter-v1");

/// How much a peer may make us decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_adapter_bytes: usize,
    pub max_tensors: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // A rank-64 adapter on every projection of a 7B model is ~350 MB.
            max_adapter_bytes: 512 * 1024 * 1024,
            max_tensors: 16_384,
        }
    }
}

/// A 32-byte blake3 digest: chunk ids, adapter hashes, run ids.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Digest(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Element types adapters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorDtype {
    F32,
    F16,
    Bf16,
    /// int8 blocks with a bfloat16 scale (`wire::compression`), as bytes
    /// (safetensors `U8`, shape `[bytes]`).
    Int8Blocks,
    /// top-k blocks (`wire::compression`), as bytes (safetensors `I8`,
    /// shape `[bytes]`; `I8` only tells them from int8 blocks).
    TopkBlocks,
}

impl TensorDtype {
    fn safetensors(self) -> Dtype {
        match self {
            TensorDtype::F32 => Dtype::F32,
            TensorDtype::F16 => Dtype::F16,
            TensorDtype::Bf16 => Dtype::BF16,
            TensorDtype::Int8Blocks => Dtype::U8,
            TensorDtype::TopkBlocks => Dtype::I8,
        }
    }

    /// The compression whose blocks a byte dtype holds.
    fn blocks(self) -> Option<Compression> {
        match self {
            TensorDtype::Int8Blocks => Some(Compression::Int8),
            TensorDtype::TopkBlocks => Some(Compression::TopK),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            TensorDtype::F32 => 4,
            TensorDtype::F16 | TensorDtype::Bf16 => 2,
            TensorDtype::Int8Blocks | TensorDtype::TopkBlocks => 1,
        }
    }
}

/// One tensor as bytes (little-endian, row-major).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorBytes {
    pub name: String,
    pub dtype: TensorDtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("adapter of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    #[error("adapter has {0} tensors, more than the limit of {1}")]
    TooManyTensors(usize, usize),
    #[error("tensor `{name}`: {message}")]
    BadTensor { name: String, message: String },
    #[error("not a valid adapter encoding: {0}")]
    Malformed(String),
    #[error("the reassembled adapter hashes to {actual:?}, the manifest says {expected:?}")]
    HashMismatch { expected: Digest, actual: Digest },
    #[error("chunk {index} hashes to {actual:?}, expected {expected:?}")]
    ChunkMismatch { index: usize, expected: Digest, actual: Digest },
}

/// The canonical encoding: safetensors with tensors by name and one fixed
/// metadata entry, so equal tensors give byte-identical output.
pub fn encode_adapter(tensors: &[TensorBytes]) -> Result<Vec<u8>, CodecError> {
    encode_adapter_aligned(tensors, 8)
}

/// [`encode_adapter`] with the tensor data starting at a multiple of `align`
/// bytes (a multiple of 8: safetensors pads its header to 8): the metadata
/// entry's value is padded with spaces, the one thing in the header that
/// has no meaning, so the encoding stays canonical.
pub fn encode_adapter_aligned(tensors: &[TensorBytes], align: usize) -> Result<Vec<u8>, CodecError> {
    let mut sorted: BTreeMap<&str, &TensorBytes> = BTreeMap::new();
    for tensor in tensors {
        let expected = tensor.shape.iter().product::<usize>() * tensor.dtype.size();
        if tensor.data.len() != expected {
            return Err(CodecError::BadTensor {
                name: tensor.name.clone(),
                message: format!("{} bytes for shape {:?} of {:?}", tensor.data.len(), tensor.shape, tensor.dtype),
            });
        }
        if sorted.insert(tensor.name.as_str(), tensor).is_some() {
            return Err(CodecError::BadTensor {
                name: tensor.name.clone(),
                message: "appears twice".into(),
            });
        }
    }
    let serialize = |padding: usize| -> Result<Vec<u8>, CodecError> {
        let views = sorted
            .iter()
            .map(|(name, t)| {
                TensorView::new(t.dtype.safetensors(), t.shape.clone(), &t.data)
                    .map(|view| (*name, view))
                    .map_err(|e| CodecError::BadTensor {
                        name: name.to_string(),
                        message: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let value = format!("{}{}", FORMAT_METADATA.1, " ".repeat(padding));
        let metadata = Some(std::collections::HashMap::from([(FORMAT_METADATA.0.to_owned(), value)]));
        safetensors::serialize(views, metadata).map_err(|e| CodecError::Malformed(e.to_string()))
    };
    let bytes = serialize(0)?;
    let header = bytes.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).ok_or_else(|| CodecError::Malformed("safetensors wrote no header".into()))?;
    // Data starts at 8 + header (a multiple of 8): `padding` more spaces,
    // a multiple of 8 too, move it there exactly.
    let start = 8 + header as usize;
    let padding = (align - start % align) % align;
    if padding == 0 { Ok(bytes) } else { serialize(padding) }
}

/// Decodes and checks an adapter: size limits first, then the safetensors
/// structure, supported dtypes, and finite values.
pub fn decode_adapter(bytes: &[u8], limits: &Limits) -> Result<Vec<TensorBytes>, CodecError> {
    if bytes.len() > limits.max_adapter_bytes {
        return Err(CodecError::TooLarge(bytes.len(), limits.max_adapter_bytes));
    }
    let parsed = SafeTensors::deserialize(bytes).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if parsed.len() > limits.max_tensors {
        return Err(CodecError::TooManyTensors(parsed.len(), limits.max_tensors));
    }
    let mut tensors = Vec::with_capacity(parsed.len());
    for (name, view) in parsed.tensors() {
        let bad = |message: String| CodecError::BadTensor {
            name: name.clone(),
            message,
        };
        let dtype = match view.dtype() {
            Dtype::F32 => TensorDtype::F32,
            Dtype::F16 => TensorDtype::F16,
            Dtype::BF16 => TensorDtype::Bf16,
            Dtype::U8 => TensorDtype::Int8Blocks,
            Dtype::I8 => TensorDtype::TopkBlocks,
            other => return Err(bad(format!("dtype {other:?} is not an adapter dtype"))),
        };
        let data = view.data();
        if !all_finite(dtype, data) {
            return Err(bad(match (dtype.blocks(), dtype.blocks().and_then(|c| c.bad_block(data))) {
                (Some(c), Some((block, what))) => format!("{} block {block} has {what}", c.name()),
                (Some(c), None) => format!("{} bytes are not whole {INT8_BLOCK_BYTES}-byte {} blocks", data.len(), c.name()),
                _ => "holds NaN or infinity".into(),
            }));
        }
        tensors.push(TensorBytes {
            name,
            dtype,
            shape: view.shape().to_vec(),
            data: data.to_vec(),
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

fn all_finite(dtype: TensorDtype, data: &[u8]) -> bool {
    match dtype {
        TensorDtype::F32 => data.chunks_exact(4).all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        // Exponent bits all ones means NaN or infinity.
        TensorDtype::F16 => data.chunks_exact(2).all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7C00 != 0x7C00),
        TensorDtype::Bf16 => data.chunks_exact(2).all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7F80 != 0x7F80),
        TensorDtype::Int8Blocks | TensorDtype::TopkBlocks => data.len() % INT8_BLOCK_BYTES == 0 && dtype.blocks().and_then(|c| c.bad_block(data)).is_none(),
    }
}

/// The chunks of an encoding, in order, with their ids.
pub fn split_chunks(bytes: &[u8]) -> Vec<(Digest, &[u8])> {
    split_chunks_of(bytes, CHUNK_SIZE)
}

/// Chunks of `size` bytes (at most `CHUNK_SIZE`; a round's slices in the
/// reduce exchange), each named by its blake3.
pub fn split_chunks_of(bytes: &[u8], size: usize) -> Vec<(Digest, &[u8])> {
    bytes.chunks(size.clamp(1, CHUNK_SIZE)).map(|chunk| (Digest::of(chunk), chunk)).collect()
}

/// Joins chunks (verifying each against its id) and checks the result
/// against the adapter hash.
pub fn reassemble(ids: &[Digest], chunks: &[&[u8]], adapter_hash: &Digest, limits: &Limits) -> Result<Vec<u8>, CodecError> {
    if ids.len() != chunks.len() {
        return Err(CodecError::Malformed(format!("{} chunk ids for {} chunks", ids.len(), chunks.len())));
    }
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    if total > limits.max_adapter_bytes {
        return Err(CodecError::TooLarge(total, limits.max_adapter_bytes));
    }
    let mut bytes = Vec::with_capacity(total);
    for (index, (id, chunk)) in ids.iter().zip(chunks).enumerate() {
        if chunk.len() > CHUNK_SIZE {
            return Err(CodecError::Malformed(format!("chunk {index} has {} bytes, more than {CHUNK_SIZE}", chunk.len())));
        }
        let actual = Digest::of(chunk);
        if actual != *id {
            return Err(CodecError::ChunkMismatch { index, expected: *id, actual });
        }
        bytes.extend_from_slice(chunk);
    }
    let actual = Digest::of(&bytes);
    if actual != *adapter_hash {
        return Err(CodecError::HashMismatch {
            expected: *adapter_hash,
            actual,
        });
    }
    Ok(bytes)
}

/// A chunk as gossiped: it names its adapter and position, so a receiver that
/// knows the manifest can check it before forwarding it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkMessage {
    pub adapter_hash: Digest,
    pub index: u32,
    pub bytes: Vec<u8>,
}

const CHUNK_MESSAGE_LIMIT: usize = CHUNK_SIZE + 128;

impl ChunkMessage {
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        bincode::serde::encode_to_vec(self, bincode::config::standard()).map_err(|e| CodecError::Malformed(e.to_string()))
    }

    /// Decodes at most one chunk's worth of bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        if bytes.len() > CHUNK_MESSAGE_LIMIT {
            return Err(CodecError::TooLarge(bytes.len(), CHUNK_MESSAGE_LIMIT));
        }
        let config = bincode::config::standard().with_limit::<CHUNK_MESSAGE_LIMIT>();
        let (message, read): (ChunkMessage, usize) =
            bincode::serde::decode_from_slice(bytes, config).map_err(|e| CodecError::Malformed(e.to_string()))?;
        if read != bytes.len() || message.bytes.len() > CHUNK_SIZE {
            return Err(CodecError::Malformed("chunk message with trailing bytes or an oversized chunk".into()));
        }
        Ok(message)
    }
}
