//! Key/value cache for incremental decoding: each layer keeps the keys and
//! values of every position seen so far, so a new token attends to them
//! without recomputing the prefix.
//!
//! As mlx-lm's `KVCache`, the arrays hold room for a multiple of
//! `CACHE_STEP` positions and each step writes its keys and values in place
//! (a slice update, which MLX performs in the array's own buffer when
//! nothing else holds it): concatenating instead copied the whole cache at
//! every token, work that grows with the context.

use mlx_rs::Array;
use mlx_rs::ops::indexing::{TryIndexMutOp, TryIndexOp};

use super::ModelError;

/// Positions a cache grows by.
const CACHE_STEP: i32 = 256;

#[derive(Debug, Default, Clone)]
pub struct KvCache {
    /// `[batch, kv_heads, capacity, head_dim]`; positions from `offset` on
    /// are room, not keys.
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions (the RoPE offset of the next token).
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Appends `[batch, kv_heads, new, head_dim]` keys and values and returns
    /// everything cached so far.
    pub fn update(&mut self, keys: Array, values: Array) -> Result<(Array, Array), ModelError> {
        let start = self.offset;
        let end = start + keys.shape()[2];
        let stored_keys = write_at(self.keys.take(), &keys, start, end)?;
        let stored_values = write_at(self.values.take(), &values, start, end)?;
        let cached = (stored_keys.try_index((.., .., ..end, ..))?, stored_values.try_index((.., .., ..end, ..))?);
        (self.keys, self.values, self.offset) = (Some(stored_keys), Some(stored_values), end);
        Ok(cached)
    }
}

/// `store` with `new` written at positions `start..end` of axis 2, grown
/// (by whole `CACHE_STEP`s) when it has no room for them.
fn write_at(store: Option<Array>, new: &Array, start: i32, end: i32) -> Result<Array, ModelError> {
    let capacity = store.as_ref().map_or(0, |s| s.shape()[2]);
    let mut store = match store {
        Some(store) if end <= capacity => store,
        store => {
            let shape = new.shape();
            let room = (end - start + CACHE_STEP - 1) / CACHE_STEP * CACHE_STEP;
            let zeros = mlx_rs::ops::zeros_dtype(&[shape[0], shape[1], room, shape[3]], new.dtype())?;
            match store {
                // Only the cached positions move over; the old room is dropped.
                Some(old) => mlx_rs::ops::concatenate(&[old.try_index((.., .., ..start, ..))?, zeros], 2)?,
                None => zeros,
            }
        }
    };
    store.try_index_mut((.., .., start..end, ..), new)?;
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appending across the growth step keeps every position's keys, as
    /// concatenating them would.
    #[test]
    fn the_cache_returns_what_was_appended_across_growth() {
        let mut cache = KvCache::new();
        let mut all: Vec<f32> = Vec::new();
        for (round, new) in [3, 1, 300, 1, 1].into_iter().enumerate() {
            let values: Vec<f32> = (0..new * 2).map(|i| (round * 1000 + i as usize) as f32).collect();
            all.extend(&values);
            let chunk = Array::from_slice(&values, &[1, 1, new, 2]);
            let (keys, values) = cache.update(chunk.clone(), chunk).unwrap();
            let total = all.len() as i32 / 2;
            assert_eq!(keys.shape(), &[1, 1, total, 2]);
            assert_eq!(cache.offset(), total);
            // (A sum makes the strided views contiguous before reading them.)
            let read = |a: &Array| a.add(Array::from_f32(0.0)).unwrap().as_slice::<f32>().to_vec();
            assert_eq!(read(&keys), all);
            assert_eq!(read(&values), all);
        }
    }
}
