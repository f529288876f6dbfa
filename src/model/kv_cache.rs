//! Key/value cache for incremental decoding: each layer keeps the keys and
//! values of every position seen so far, so a new token attends to them
//! without recomputing the prefix.

use mlx_rs::Array;

use super::ModelError;

#[derive(Debug, Default, Clone)]
pub struct KvCache {
    keys: Option<Array>,
    values: Option<Array>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions (the RoPE offset of the next token).
    pub fn offset(&self) -> i32 {
        self.keys.as_ref().map_or(0, |k| k.shape()[2])
    }

    /// Appends `[batch, kv_heads, new, head_dim]` keys and values and returns
    /// everything cached so far.
    pub fn update(&mut self, keys: Array, values: Array) -> Result<(Array, Array), ModelError> {
        let (keys, values) = match (self.keys.take(), self.values.take()) {
            (Some(old_k), Some(old_v)) => (
                mlx_rs::ops::concatenate(&[old_k, keys], 2)?,
                mlx_rs::ops::concatenate(&[old_v, values], 2)?,
            ),
            _ => (keys, values),
        };
        self.keys = Some(keys.clone());
        self.values = Some(values.clone());
        Ok((keys, values))
    }
}
