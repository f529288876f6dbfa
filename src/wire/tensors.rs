//! Adapters between the averaging layer's float tensors and the network's
//! canonical bytes, with the checks a received adapter must pass.

use crate::aggregate::{Tensor, Tensors};
use crate::wire::codec::{Limits, TensorBytes, TensorDtype, decode_adapter, encode_adapter_aligned};
use crate::wire::compression::Compression;

/// The canonical safetensors bytes of an adapter (equal tensors, equal bytes).
pub fn encode(tensors: &Tensors) -> Result<Vec<u8>, String> {
    encode_as(tensors, Compression::None)
}

/// The canonical bytes of `tensors` with their values as `compression`
/// writes them (an int8 tensor is a byte tensor of whole blocks).
pub fn encode_as(tensors: &Tensors, compression: Compression) -> Result<Vec<u8>, String> {
    let list: Vec<TensorBytes> = tensors
        .iter()
        .map(|(name, t)| {
            let data = compression.encode(&t.values);
            let (dtype, shape) = match compression {
                Compression::None => (TensorDtype::F32, t.shape.clone()),
                Compression::Fp16 => (TensorDtype::F16, t.shape.clone()),
                Compression::Int8 => (TensorDtype::Int8Blocks, vec![data.len()]),
                Compression::TopK => (TensorDtype::TopkBlocks, vec![data.len()]),
            };
            TensorBytes { name: name.clone(), dtype, shape, data }
        })
        .collect();
    encode_adapter_aligned(&list, compression.alignment()).map_err(|e| e.to_string())
}

/// Decodes a peer's adapter and checks it against this node's own adapter
/// layout: the same tensor names and shapes, float32, finite values.
pub fn decode_checked(bytes: &[u8], layout: &Tensors, limits: &Limits) -> Result<Tensors, String> {
    decode_checked_as(bytes, layout, Compression::None, limits)
}

/// [`decode_checked`] for values written as `compression` writes them.
pub fn decode_checked_as(bytes: &[u8], layout: &Tensors, compression: Compression, limits: &Limits) -> Result<Tensors, String> {
    let list = decode_adapter(bytes, limits).map_err(|e| e.to_string())?;
    let (dtype, what) = match compression {
        Compression::None => (TensorDtype::F32, "adapters travel as float32"),
        Compression::Fp16 => (TensorDtype::F16, "this run's updates travel as float16"),
        Compression::Int8 => (TensorDtype::Int8Blocks, "this run's updates travel as int8 blocks"),
        Compression::TopK => (TensorDtype::TopkBlocks, "this run's updates travel as top-k blocks"),
    };
    let mut tensors = Tensors::new();
    for t in list {
        let expected = layout.get(&t.name).ok_or_else(|| format!("unexpected tensor {}", t.name))?;
        if t.dtype != dtype {
            return Err(format!("{} is {:?}; {what}", t.name, t.dtype));
        }
        let count = expected.values.len();
        let shape_ok = match compression {
            Compression::Int8 | Compression::TopK => t.shape == [compression.encoded_len(count)],
            _ => t.shape == expected.shape,
        };
        if !shape_ok {
            return Err(format!("{} has shape {:?}, expected {:?}", t.name, t.shape, expected.shape));
        }
        let mut values = compression.decode(&t.data).ok_or_else(|| format!("{} has {} bytes, not whole values", t.name, t.data.len()))?;
        // Int8 pads a tensor to whole blocks; the padding carries nothing.
        values.truncate(count);
        if values.iter().any(|v| !v.is_finite()) {
            return Err(format!("{} has NaN or infinite values", t.name));
        }
        let tensor = Tensor::new(expected.shape.clone(), values).map_err(|e| e.to_string())?;
        tensors.insert(t.name, tensor);
    }
    if tensors.len() != layout.len() {
        let missing: Vec<&String> = layout.keys().filter(|n| !tensors.contains_key(*n)).take(3).collect();
        return Err(format!("{} of {} tensors, missing e.g. {missing:?}", tensors.len(), layout.len()));
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::codec::Limits;

    fn adapter() -> Tensors {
        [("a.lora_a", vec![2, 7]), ("a.lora_b", vec![7, 1])]
            .into_iter()
            .map(|(name, shape): (&str, Vec<usize>)| {
                let n = shape.iter().product::<usize>();
                (name.to_owned(), Tensor::new(shape, (0..n).map(|i| i as f32 * 0.01 - 0.05).collect()).unwrap())
            })
            .collect()
    }

    #[test]
    fn every_compression_round_trips_against_the_layout() {
        let tensors = adapter();
        // Tensors this small keep every value under top-k too.
        for compression in [Compression::None, Compression::Fp16, Compression::Int8, Compression::TopK] {
            let bytes = encode_as(&tensors, compression).unwrap();
            let back = decode_checked_as(&bytes, &tensors, compression, &Limits::default()).unwrap();
            for (name, t) in &tensors {
                assert_eq!(back[name].shape, t.shape);
                for (a, b) in t.values.iter().zip(&back[name].values) {
                    assert!((a - b).abs() < 1e-3, "{compression:?} {name}: {a} → {b}");
                }
            }
            // Another run's compression is refused with what it should be.
            let other = if compression == Compression::None { Compression::Fp16 } else { Compression::None };
            let err = decode_checked_as(&bytes, &tensors, other, &Limits::default()).unwrap_err();
            assert!(err.contains("travel as"), "{err}");
        }
    }

    #[test]
    fn a_corrupt_block_scale_is_refused() {
        let tensors = adapter();
        for compression in [Compression::Int8, Compression::TopK] {
            let mut bytes = encode_as(&tensors, compression).unwrap();
            // The first tensor's data starts right after the header.
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            assert_eq!(header % crate::wire::compression::INT8_BLOCK_BYTES, 0, "the data starts on the block grid");
            bytes[header..header + 2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
            let err = decode_checked_as(&bytes, &tensors, compression, &Limits::default()).unwrap_err();
            assert!(err.contains(&format!("{} block 0 has scale NaN", compression.name())), "{err}");
        }
    }

    /// A top-k block that names a position twice (or out of order) would
    /// decode to values that depend on the decoder: refused, named.
    #[test]
    fn top_k_positions_out_of_order_are_refused() {
        let tensors = adapter();
        let mut bytes = encode_as(&tensors, Compression::TopK).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[header + 3] = bytes[header + 2];
        let err = decode_checked_as(&bytes, &tensors, Compression::TopK, &Limits::default()).unwrap_err();
        assert!(err.contains("topk block 0 has positions that do not increase"), "{err}");
    }
}
