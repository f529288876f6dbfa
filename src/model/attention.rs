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
}

/// `softmax(q kᵀ · scale + mask) v` for `[batch, heads, seq, head_dim]`
/// inputs; keys and values may have fewer (grouped) heads.
pub fn attend(q: &Array, k: &Array, v: &Array, scale: f32, mask: &AttentionMask) -> Result<Array, ModelError> {
    let out = match mask {
        AttentionMask::None => mlx_rs::fast::scaled_dot_product_attention(q, k, v, scale, None, None)?,
        AttentionMask::Causal => {
            mlx_rs::fast::scaled_dot_product_attention(q, k, v, scale, ScaledDotProductAttentionMask::Causal, None)?
        }
        AttentionMask::Explicit(mask) => mlx_rs::fast::scaled_dot_product_attention(q, k, v, scale, mask, None)?,
    };
    Ok(out)
}
