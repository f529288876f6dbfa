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
    if q.shape()[2] >= CPU_MIN_QUERIES && crate::mlx_env::backend() == crate::mlx_env::Backend::Cpu {
        return attend_on_cpu(q, k, v, scale, mask);
    }
    attend_with_kernel(q, k, v, scale, mask)
}

/// `attend` through MLX's fused kernel.
fn attend_with_kernel(q: &Array, k: &Array, v: &Array, scale: f32, mask: &AttentionMask) -> Result<Array, ModelError> {
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

/// Queries from which the CPU computes attention itself (`attend_on_cpu`);
/// one decoding step's single query keeps MLX's kernel, whose dispatch
/// costs less than the several operations below.
const CPU_MIN_QUERIES: i32 = 16;

/// Queries a block of `attend_on_cpu` holds at least.
const QUERY_BLOCK: i32 = 128;

/// The share of a `queries`-long causal row's query-key products that
/// `attend` computes: on the CPU (`attend_on_cpu`) each block of queries
/// multiplies the keys up to its last query only; MLX's kernels take them all.
pub fn computed_key_share(queries: i32, on_cpu: bool) -> f64 {
    if !on_cpu || queries < CPU_MIN_QUERIES {
        return 1.0;
    }
    let products: f64 = query_blocks(queries).map(|(start, end)| f64::from(end - start) * f64::from(end)).sum();
    products / (f64::from(queries) * f64::from(queries))
}

/// The `[start, end)` query ranges `attend_on_cpu` cuts `queries` into:
/// blocks of at least `QUERY_BLOCK` (one block below that), as even as
/// can be.
fn query_blocks(queries: i32) -> impl Iterator<Item = (i32, i32)> {
    let blocks = (queries / QUERY_BLOCK).max(1);
    (0..blocks).map(move |b| (queries * b / blocks, queries * (b + 1) / blocks))
}

/// `attend` on the CPU, written out, for two reasons. MLX's CPU kernel
/// falls back to a softmax over every key of every query, masked ones
/// included; here the queries are cut into blocks of at least
/// `QUERY_BLOCK`, and block `b` multiplies only the keys up to its last
/// query (every mask here is causal), which at 512 positions in 128-query
/// blocks computes 10/16 of the scores. And the softmax is
/// `softmax::softmax_of_log2`, with `log2 e` folded into the query scale.
/// A key group's query heads are stacked into one matrix per product
/// (`[group · queries, head_dim]` against the group's keys): fewer, larger
/// matrix products than a product per head.
fn attend_on_cpu(q: &Array, k: &Array, v: &Array, scale: f32, mask: &AttentionMask) -> Result<Array, ModelError> {
    let (batch, heads, queries, head_dim) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (kv_heads, keys) = (k.shape()[1], k.shape()[2]);
    if kv_heads == 0 || heads % kv_heads != 0 || keys < queries {
        return Err(ModelError::BadInput(format!("attention over {heads} query heads and {kv_heads} key heads, {queries} queries and {keys} keys")));
    }
    let group = heads / kv_heads;
    // Each query sees the keys up to its own position plus `offset`.
    let offset = keys - queries;
    let q = q
        .multiply(Array::from_f32(scale * std::f32::consts::LOG2_E))?
        .reshape(&[batch, kv_heads, group, queries, head_dim])?;
    let range = |start: i32, end: i32| mlx_rs::ops::arange::<_, i32>(start, end, None);
    let mut outputs = Vec::new();
    for (start, end) in query_blocks(queries) {
        let (block, visible) = (end - start, offset + end);
        let seen = range(0, visible)?;
        let q_block = q.take_axis(range(start, end)?, 3)?.reshape(&[batch, kv_heads, group * block, head_dim])?;
        let (k_block, v_block) = (k.take_axis(&seen, 2)?, v.take_axis(&seen, 2)?);
        let scores = q_block
            .matmul(k_block.transpose_axes(&[0, 1, 3, 2])?)?
            .reshape(&[batch, kv_heads, group, block, visible])?;
        let allowed = match mask {
            AttentionMask::None => None,
            AttentionMask::Causal => {
                let q_pos = range(offset + start, offset + end)?.reshape(&[block, 1])?;
                Some(seen.reshape(&[1, visible])?.le(&q_pos)?)
            }
            AttentionMask::Explicit(mask) | AttentionMask::Packed { mask, .. } => {
                // `[batch|1, 1, queries, keys]`: this block's rows and keys,
                // with an axis for the group.
                let rows = mask.take_axis(range(start, end)?, 2)?.take_axis(&seen, 3)?;
                Some(rows.expand_dims(2)?)
            }
        };
        let scores = match allowed {
            Some(allowed) => mlx_rs::ops::select(&allowed, &scores, Array::from_f32(f32::NEG_INFINITY))?,
            None => scores,
        };
        let weights = super::softmax::softmax_of_log2(&scores.as_dtype(mlx_rs::Dtype::Float32)?)?.as_dtype(v.dtype())?;
        let out = weights.reshape(&[batch, kv_heads, group * block, visible])?.matmul(&v_block)?;
        outputs.push(out.reshape(&[batch, kv_heads, group, block, head_dim])?);
    }
    let out = if outputs.len() == 1 { outputs.remove(0) } else { mlx_rs::ops::concatenate(&outputs, 3)? };
    Ok(out.reshape(&[batch, heads, queries, head_dim])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[i32], seed: u64) -> Array {
        let key = mlx_rs::random::key(seed).expect("key");
        mlx_rs::random::normal::<f32>(shape, None, None, &key).expect("normal")
    }

    /// The written-out CPU attention against MLX's kernel, for every mask
    /// kind, with grouped heads, one block and several.
    #[test]
    fn cpu_attention_equals_the_kernel() {
        // Row 0 all real, row 1 real for its first 25 positions.
        let real: Vec<bool> = (0..80).map(|i| i < 65).collect();
        let padding = Array::from_slice(&real, &[2, 40]);
        let segments: Vec<i32> = (0..2 * 300).map(|i| (i % 300) / 70 + 10 * (i / 300)).collect();
        let positions: Vec<i32> = (0..2 * 300).map(|i| (i % 300) % 70).collect();
        let packed = PackedRows { segments: Array::from_slice(&segments, &[2, 300]), positions: Array::from_slice(&positions, &[2, 300]) };
        let cases = [
            ("causal, 3 blocks", 390, 0, AttentionMask::Causal),
            ("causal after a cache", 20, 30, AttentionMask::Causal),
            ("no mask", 16, 0, AttentionMask::None),
            ("key padding", 40, 0, AttentionMask::build(40, 0, None, Some(&padding)).unwrap()),
            ("sliding window, 2 blocks", 260, 0, AttentionMask::build(260, 0, Some(64), None).unwrap()),
            ("packed rows, 2 blocks", 300, 0, AttentionMask::packed(&packed, None).unwrap()),
        ];
        for (seed, (name, queries, offset, mask)) in cases.into_iter().enumerate() {
            let keys = queries + offset;
            let seed = 10 * seed as u64;
            let (q, k, v) = (random(&[2, 6, queries, 8], seed), random(&[2, 2, keys, 8], seed + 1), random(&[2, 2, keys, 8], seed + 2));
            let ours = attend_on_cpu(&q, &k, &v, 0.35, &mask).unwrap();
            let kernel = attend_with_kernel(&q, &k, &v, 0.35, &mask).unwrap();
            assert_eq!(ours.shape(), kernel.shape(), "{name}");
            let gap: f32 = ours.subtract(&kernel).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
            assert!(gap < 1e-5, "{name}: the CPU attention differs from the kernel by {gap}");
        }
    }
}
