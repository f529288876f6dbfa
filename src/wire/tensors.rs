//! Adapters between the averaging layer's float tensors and the network's
//! canonical bytes, with the checks a received adapter must pass.

use crate::aggregate::{Tensor, Tensors};
use crate::wire::codec::{Limits, TensorBytes, TensorDtype, decode_adapter, encode_adapter};

/// The canonical safetensors bytes of an adapter (equal tensors, equal bytes).
pub fn encode(tensors: &Tensors) -> Result<Vec<u8>, String> {
    let list: Vec<TensorBytes> = tensors
        .iter()
        .map(|(name, t)| TensorBytes {
            name: name.clone(),
            dtype: TensorDtype::F32,
            shape: t.shape.clone(),
            data: t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    encode_adapter(&list).map_err(|e| e.to_string())
}

/// Decodes a peer's adapter and checks it against this node's own adapter
/// layout: the same tensor names and shapes, float32, finite values.
pub fn decode_checked(bytes: &[u8], layout: &Tensors, limits: &Limits) -> Result<Tensors, String> {
    let list = decode_adapter(bytes, limits).map_err(|e| e.to_string())?;
    let mut tensors = Tensors::new();
    for t in list {
        let expected = layout.get(&t.name).ok_or_else(|| format!("unexpected tensor {}", t.name))?;
        if t.shape != expected.shape {
            return Err(format!("{} has shape {:?}, expected {:?}", t.name, t.shape, expected.shape));
        }
        if t.dtype != TensorDtype::F32 {
            return Err(format!("{} is {:?}; adapters travel as float32", t.name, t.dtype));
        }
        let values: Vec<f32> = t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if values.iter().any(|v| !v.is_finite()) {
            return Err(format!("{} has NaN or infinite values", t.name));
        }
        let tensor = Tensor::new(t.shape, values).map_err(|e| e.to_string())?;
        tensors.insert(t.name, tensor);
    }
    if tensors.len() != layout.len() {
        let missing: Vec<&String> = layout.keys().filter(|n| !tensors.contains_key(*n)).take(3).collect();
        return Err(format!("{} of {} tensors, missing e.g. {missing:?}", tensors.len(), layout.len()));
    }
    Ok(tensors)
}
