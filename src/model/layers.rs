//! Building blocks shared by the architectures: RMSNorm, RoPE and the token
//! embedding.

use mlx_rs::{Array, Dtype};

use super::ModelError;
use super::args::RopeScaling;
use super::linear::{Matrix, check_shape};
use super::weights::WeightMap;

/// RMSNorm. Gemma scales by `1 + weight`; that offset is folded into the
/// weight once at load time, so the forward pass is the same fused kernel.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Array,
    pub eps: f32,
    /// Gemma's `1 + weight` form: `weight` here already includes the 1.
    pub one_plus_weight: bool,
}

impl RmsNorm {
    pub fn take(weights: &mut WeightMap, name: &str, dims: i32, eps: f32, one_plus_weight: bool) -> Result<Self, ModelError> {
        let weight = weights.take(&format!("{name}.weight"))?;
        check_shape(&format!("{name}.weight"), &weight, &[dims])?;
        // The 1 in the weight's own dtype: a float32 scalar would widen a
        // bfloat16 norm, and every activation after it.
        let one = Array::from_f32(1.0).as_dtype(weight.dtype())?;
        let weight = if one_plus_weight { weight.add(&one)? } else { weight };
        Ok(Self { weight, eps, one_plus_weight })
    }

    /// The weight as the checkpoint stores it (without Gemma's folded 1).
    pub fn stored_weight(&self) -> Result<Array, ModelError> {
        if self.one_plus_weight {
            Ok(self.weight.subtract(Array::from_f32(1.0).as_dtype(self.weight.dtype())?)?)
        } else {
            Ok(self.weight.clone())
        }
    }

    pub fn store(&self, name: &str, out: &mut WeightMap) -> Result<(), ModelError> {
        out.insert(format!("{name}.weight"), self.stored_weight()?);
        Ok(())
    }

    pub fn forward(&self, x: &Array) -> Result<Array, ModelError> {
        Ok(mlx_rs::fast::rms_norm(x, Some(&self.weight), self.eps)?)
    }
}

/// Rotary position embedding over the first `dims` features of each head.
#[derive(Debug, Clone)]
pub struct Rope {
    pub dims: i32,
    /// Rotate interleaved pairs (GPT-J / llama.cpp layout) instead of halves.
    pub traditional: bool,
    pub base: f32,
    pub scale: f32,
    /// Per-frequency periods for Llama-3 scaling (replaces `base`).
    pub freqs: Option<Array>,
}

impl Rope {
    pub fn new(dims: i32, traditional: bool, base: f32, scaling: Option<&RopeScaling>) -> Result<Self, ModelError> {
        let mut rope = Rope {
            dims,
            traditional,
            base,
            scale: 1.0,
            freqs: None,
        };
        match scaling {
            None => {}
            Some(s) if s.rope_type == "linear" => rope.scale = 1.0 / s.factor,
            Some(s) if s.rope_type == "llama3" => rope.freqs = Some(llama3_freqs(dims, base, s)?),
            Some(s) if s.rope_type == "default" => {}
            Some(s) => {
                return Err(ModelError::BadConfig(format!(
                    "rope_scaling type `{}` is not supported (supported: linear, llama3)",
                    s.rope_type
                )));
            }
        }
        Ok(rope)
    }

    /// `x` is `[batch, heads, seq, head_dim]`; positions start at `offset`.
    pub fn forward(&self, x: &Array, offset: i32) -> Result<Array, ModelError> {
        let base = if self.freqs.is_some() { None } else { Some(self.base) };
        Ok(mlx_rs::fast::rope(x, self.dims, self.traditional, base, self.scale, offset, self.freqs.as_ref())?)
    }

    /// The same rotation with each token's own position: `x` is
    /// `[batch, heads, len, head_dim]`, `positions` `[batch, len]` (packed
    /// rows, where positions restart at each row). MLX's fused kernel takes
    /// one offset per call, so this is its definition written out.
    pub fn forward_at(&self, x: &Array, positions: &Array) -> Result<Array, ModelError> {
        let shape = x.shape();
        let (batch, len, head_dim) = (shape[0], shape[2], shape[3]);
        let half = self.dims / 2;
        let inverse_frequencies = match &self.freqs {
            Some(freqs) => freqs.reciprocal()?,
            None => mlx_rs::ops::arange::<_, f32>(0, half, None)?
                .multiply(Array::from_f32(-self.base.ln() / half as f32))?
                .exp()?,
        };
        let theta = positions
            .as_dtype(Dtype::Float32)?
            .reshape(&[batch, 1, len, 1])?
            .multiply(Array::from_f32(self.scale))?
            .multiply(inverse_frequencies.reshape(&[1, 1, 1, half])?)?;
        let (cos, sin) = (theta.cos()?.as_dtype(x.dtype())?, theta.sin()?.as_dtype(x.dtype())?);
        let rotated_part = if self.dims < head_dim {
            mlx_rs::ops::split_at_indices(x, &[self.dims], -1)?
        } else {
            vec![x.clone()]
        };
        let rotated = &rotated_part[0];
        let rotate = |x1: &Array, x2: &Array, cos: &Array, sin: &Array| -> Result<(Array, Array), ModelError> {
            Ok((x1.multiply(cos)?.subtract(x2.multiply(sin)?)?, x1.multiply(sin)?.add(x2.multiply(cos)?)?))
        };
        let out = if self.traditional {
            // Interleaved pairs (x0, x1), (x2, x3), …
            let pairs = rotated.reshape(&[batch, shape[1], len, half, 2])?.split_equal(2, -1)?;
            let (cos, sin) = (cos.expand_dims(-1)?, sin.expand_dims(-1)?);
            let (a, b) = rotate(&pairs[0], &pairs[1], &cos, &sin)?;
            mlx_rs::ops::concatenate(&[a, b], -1)?.reshape(&[batch, shape[1], len, self.dims])?
        } else {
            // Halves: the first half pairs with the second.
            let halves = rotated.split_equal(2, -1)?;
            let (a, b) = rotate(&halves[0], &halves[1], &cos, &sin)?;
            mlx_rs::ops::concatenate(&[a, b], -1)?
        };
        Ok(match rotated_part.get(1) {
            Some(rest) => mlx_rs::ops::concatenate(&[&out, rest], -1)?,
            None => out,
        })
    }
}

/// Llama 3's frequency-dependent RoPE scaling (as in mlx-lm's Llama3RoPE):
/// low frequencies are slowed by `factor`, high ones kept, and the band in
/// between interpolated.
fn llama3_freqs(dims: i32, base: f32, s: &RopeScaling) -> Result<Array, ModelError> {
    let low_freq_factor = s.low_freq_factor.unwrap_or(1.0);
    let high_freq_factor = s.high_freq_factor.unwrap_or(4.0);
    let old_context = s.original_max_position_embeddings.unwrap_or(8192.0);
    if !(s.factor > 0.0 && high_freq_factor > low_freq_factor) {
        return Err(ModelError::BadConfig("llama3 rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor".into()));
    }
    let low_freq_wavelen = old_context / low_freq_factor;
    let high_freq_wavelen = old_context / high_freq_factor;
    let freqs: Vec<f32> = (0..dims / 2)
        .map(|i| {
            let freq = base.powf(2.0 * i as f32 / dims as f32);
            let wavelen = 2.0 * std::f32::consts::PI * freq;
            if wavelen > low_freq_wavelen {
                freq * s.factor
            } else if wavelen < high_freq_wavelen {
                freq
            } else {
                let smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                freq / ((1.0 - smooth) / s.factor + smooth)
            }
        })
        .collect();
    Ok(Array::from_slice(&freqs, &[dims / 2]))
}

/// Token embedding, float or quantized. With tied weights it is also the
/// output head (`as_linear`).
#[derive(Debug, Clone)]
pub struct Embedding {
    pub table: Matrix,
}

impl Embedding {
    pub fn take(weights: &mut WeightMap, name: &str, vocab: i32, dims: i32) -> Result<Self, ModelError> {
        Ok(Self {
            table: Matrix::take(weights, name, vocab, dims)?,
        })
    }

    /// Rows of the table for `tokens` (any shape), as float.
    pub fn forward(&self, tokens: &Array) -> Result<Array, ModelError> {
        self.table.rows(tokens)
    }

    /// `x Eᵀ`: logits from hidden states through the tied table.
    pub fn as_linear(&self, x: &Array) -> Result<Array, ModelError> {
        self.table.matmul_t(x)
    }

    pub fn dequantized(&self, dtype: Dtype) -> Result<Embedding, ModelError> {
        Ok(Self {
            table: Matrix::Dense(self.table.dense(dtype)?),
        })
    }

    pub fn quantized(&self, group_size: i32, bits: i32) -> Result<Embedding, ModelError> {
        Ok(Self {
            table: self.table.quantized(group_size, bits)?,
        })
    }

    pub fn store(&self, name: &str, out: &mut WeightMap) {
        self.table.store(name, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `forward_at` with positions `offset, offset + 1, …` is MLX's fused
    /// RoPE at `offset`, in every layout the models use.
    #[test]
    fn rope_at_positions_equals_the_fused_kernel() {
        let (batch, heads, len, head_dim) = (2, 3, 5, 16);
        let x = mlx_rs::random::normal::<f32>(&[batch, heads, len, head_dim], None, None, &mlx_rs::random::key(7).unwrap()).unwrap();
        let scaling = RopeScaling {
            rope_type: "llama3".into(),
            factor: 8.0,
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(64.0),
        };
        let ropes = [
            Rope::new(head_dim, false, 10_000.0, None).unwrap(),
            Rope::new(head_dim, true, 10_000.0, None).unwrap(),
            Rope::new(8, false, 500.0, None).unwrap(),
            Rope::new(8, true, 500.0, None).unwrap(),
            Rope::new(head_dim, false, 10_000.0, Some(&scaling)).unwrap(),
        ];
        let offset = 11;
        let positions: Vec<i32> = (0..batch).flat_map(|_| offset..offset + len).collect();
        let positions = Array::from_slice(&positions, &[batch, len]);
        for rope in &ropes {
            let fused = rope.forward(&x, offset).unwrap();
            let written_out = rope.forward_at(&x, &positions).unwrap();
            let diff = fused.subtract(&written_out).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
            assert!(diff < 1e-4, "dims {} traditional {}: differs by {diff}", rope.dims, rope.traditional);
        }
    }
}
