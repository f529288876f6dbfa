//! Attention masks and grouped-query attention through MLX's fused
//! scaled-dot-product kernel.

use mlx_rs::Array;
use mlx_rs::fast::ScaledDotProductAttentionMask;

use super::ModelError;

/// Which keys each query may see.
#[derive(Debug, Clone)]
pub enum AttentionMask {
    /// One query attending to the whole cache: no mask needed.
    None,
    /// Causal, aligned to the end of the keys (queries are the last L positions).
    Causal,
    /// Boolean `[batch|1, 1, queries, keys]`, true where attention is allowed.
    Explicit(Array),
    /// Several rows packed into each sequence (training only, no cache): a
    /// boolean `[batch, 1, len, len]` mask that keeps every row to itself,
    /// and each token's `[batch, len]` position within its own row, so that
    /// RoPE sees a packed row exactly as it sees the row alone.
    Packed { mask: Array, positions: Array },
}

/// How the rows of a forward pass sit in its `[batch, len]` token matrix.
#[derive(Debug, Clone, Copy)]
pub enum Layout<'a> {
    /// One row per batch line from position 0 (or the cache's offset), with
    /// an optional `[batch, keys]` boolean mask of real (non-padding) keys.
    Rows { key_padding: Option<&'a Array> },
    /// Several rows per batch line (see `PackedRows`).
    Packed(&'a PackedRows),
}

impl Layout<'_> {
    /// One row per batch line, no padding.
    pub const ROWS: Layout<'static> = Layout::Rows { key_padding: None };
}

/// Rows packed one after another into each sequence of a batch.
#[derive(Debug, Clone)]
pub struct PackedRows {
    /// `[batch, len]` int32: which row each token belongs to. Padding tokens
    /// get ids of their own (any id no row uses, one per token).
    pub segments: Array,
    /// `[batch, len]` int32: each token's position within its row.
    pub positions: Array,
}

impl AttentionMask {
    /// The mask for `queries` new positions after `offset` cached ones, with an
    /// optional sliding `window` and an optional `[batch, offset + queries]`
    /// boolean mask of real (non-padding) keys.
    pub fn build(queries: i32, offset: i32, window: Option<i32>, key_padding: Option<&Array>) -> Result<Self, ModelError> {
        let keys = offset + queries;
        let windowed = window.is_some_and(|w| keys > w);
        if key_padding.is_none() && !windowed {
            return Ok(if queries > 1 { AttentionMask::Causal } else { AttentionMask::None });
        }
        let q_pos = mlx_rs::ops::arange::<_, i32>(offset, keys, None)?.reshape(&[queries, 1])?;
        let k_pos = mlx_rs::ops::arange::<_, i32>(0, keys, None)?.reshape(&[1, keys])?;
        let mut mask = k_pos.le(&q_pos)?;
        if let Some(w) = window.filter(|_| windowed) {
            mask = mask.logical_and(&k_pos.gt(q_pos.subtract(Array::from_int(w))?)?)?;
        }
        let mut mask = mask.reshape(&[1, 1, queries, keys])?;
        if let Some(padding) = key_padding {
            let shape = padding.shape();
            if shape.len() != 2 || shape[1] != keys {
                return Err(ModelError::BadInput(format!(
                    "key padding mask has shape {shape:?}, expected [batch, {keys}]"
                )));
            }
            let padding = padding.reshape(&[shape[0], 1, 1, keys])?;
            // A padding query would see no key at all, and a softmax over
            // nothing is NaN, which the next layer would spread through the
            // padding keys' values. Let every query see itself; real queries
            // never see the padding.
            let diagonal = k_pos.eq(&q_pos)?.reshape(&[1, 1, queries, keys])?;
            mask = mask.logical_and(&padding)?.logical_or(&diagonal)?;
        }
        Ok(AttentionMask::Explicit(mask))
    }

    /// The causal mask of packed rows: a query sees the keys of its own row
    /// up to itself (and, with a `window`, only the last `window` of them).
    /// A padding token is a row of one, so its query sees itself, never NaN.
    pub fn packed(rows: &PackedRows, window: Option<i32>) -> Result<Self, ModelError> {
        let shape = rows.segments.shape();
        if shape.len() != 2 || rows.positions.shape() != shape {
            return Err(ModelError::BadInput(format!(
                "packed rows need [batch, len] segments and positions, got {shape:?} and {:?}",
                rows.positions.shape()
            )));
        }
        let (batch, len) = (shape[0], shape[1]);
        let index = mlx_rs::ops::arange::<_, i32>(0, len, None)?;
        let (q_index, k_index) = (index.reshape(&[len, 1])?, index.reshape(&[1, len])?);
        let mut allowed = k_index.le(&q_index)?;
        if let Some(w) = window {
            allowed = allowed.logical_and(&k_index.gt(q_index.subtract(Array::from_int(w))?)?)?;
        }
        let same_row = rows
            .segments
            .reshape(&[batch, 1, len, 1])?
            .eq(rows.segments.reshape(&[batch, 1, 1, len])?)?;
        Ok(AttentionMask::Packed {
            mask: same_row.logical_and(&allowed.reshape(&[1, 1, len, len])?)?,
            positions: rows.positions.clone(),
        })
    }
}

/// `softmax(q kᵀ · scale + mask) v` for `[batch, heads, seq, head_dim]`
/// inputs; keys and values may have fewer (grouped) heads.
pub fn attend(q: &Array, k: &Array, v: &Array, scale: f32, mask: &AttentionMask) -> Result<Array, ModelError> {
    let out = match mask {
        AttentionMask::None => mlx_rs::fast::scaled_dot_product_attention(q, k, v, scale, None, None)?,
        AttentionMask::Causal => {
            mlx_rs::fast::scaled_dot_product_attention(q, k, v, scale, ScaledDotProductAttentionMask::Causal, None)?
        }
        AttentionMask::Explicit(mask) | AttentionMask::Packed { mask, .. } => {
            mlx_rs::fast::scaled_dot_product_attention(q, k, v, scale, mask, None)?
        }
    };
    Ok(out)
}
