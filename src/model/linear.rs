//! Frozen projection layers: float or MLX affine-quantized. Kept as a plain
//! enum so the trainer can wrap any of them with LoRA (as mlx-lm's
//! `LoRALinear.from_base` wraps `nn.Linear` and `nn.QuantizedLinear`).

use mlx_rs::{Array, Dtype};

use super::ModelError;
use super::weights::WeightMap;

/// `y = x Wᵀ (+ b)` with `W` of shape `[out, in]`.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense {
        weight: Array,
        bias: Option<Array>,
    },
    Quantized {
        /// Packed `bits`-bit values, `[out, in * bits / 32]` uint32.
        weight: Array,
        scales: Array,
        biases: Array,
        bias: Option<Array>,
        group_size: i32,
        bits: i32,
    },
}

impl Linear {
    /// Takes `{prefix}.weight` (and `.scales`/`.biases` when quantized, and
    /// `.bias` when `with_bias`) out of `weights`, checking the shape against
    /// `[out_features, in_features]`.
    pub fn take(
        weights: &mut WeightMap,
        prefix: &str,
        out_features: i32,
        in_features: i32,
        with_bias: bool,
    ) -> Result<Linear, ModelError> {
        let weight = weights.take(&format!("{prefix}.weight"))?;
        let bias = if with_bias {
            let bias = weights.take(&format!("{prefix}.bias"))?;
            check_shape(&format!("{prefix}.bias"), &bias, &[out_features])?;
            Some(bias)
        } else {
            None
        };
        match weights.take_optional(&format!("{prefix}.scales")) {
            None => {
                check_shape(&format!("{prefix}.weight"), &weight, &[out_features, in_features])?;
                Ok(Linear::Dense { weight, bias })
            }
            Some(scales) => {
                let biases = weights.take(&format!("{prefix}.biases"))?;
                let (group_size, bits) = infer_quantization(prefix, &weight, &scales, out_features, in_features)?;
                check_shape(&format!("{prefix}.biases"), &biases, scales.shape())?;
                Ok(Linear::Quantized {
                    weight,
                    scales,
                    biases,
                    bias,
                    group_size,
                    bits,
                })
            }
        }
    }

    pub fn forward(&self, x: &Array) -> Result<Array, ModelError> {
        let y = match self {
            Linear::Dense { weight, .. } => x.matmul(weight.t())?,
            Linear::Quantized {
                weight,
                scales,
                biases,
                group_size,
                bits,
                ..
            } => mlx_rs::ops::quantized_matmul(x, weight, scales, biases, true, *group_size, *bits)?,
        };
        match self.bias() {
            Some(bias) => Ok(y.add(bias)?),
            None => Ok(y),
        }
    }

    pub fn bias(&self) -> Option<&Array> {
        match self {
            Linear::Dense { bias, .. } | Linear::Quantized { bias, .. } => bias.as_ref(),
        }
    }

    /// The float weight `[out, in]` (dequantized if need be) in `dtype`.
    pub fn dense_weight(&self, dtype: Dtype) -> Result<Array, ModelError> {
        let weight = match self {
            Linear::Dense { weight, .. } => weight.clone(),
            Linear::Quantized {
                weight,
                scales,
                biases,
                group_size,
                bits,
                ..
            } => {
                // In the target precision: dequantizing with f16 scales would
                // round every weight to f16.
                let (scales, biases) = (scales.as_dtype(dtype)?, biases.as_dtype(dtype)?);
                mlx_rs::ops::dequantize(weight, &scales, &biases, *group_size, *bits)?
            }
        };
        Ok(weight.as_dtype(dtype)?)
    }

    /// The same layer with float weights in `dtype` (the CPU fast path: MLX's
    /// quantized matmul is much slower there than a BLAS sgemm).
    pub fn dequantized(&self, dtype: Dtype) -> Result<Linear, ModelError> {
        Ok(Linear::Dense {
            weight: self.dense_weight(dtype)?,
            bias: self.bias().map(|b| b.as_dtype(dtype)).transpose()?,
        })
    }

    /// Quantizes a float layer with MLX affine quantization.
    pub fn quantized(&self, group_size: i32, bits: i32) -> Result<Linear, ModelError> {
        match self {
            Linear::Quantized { .. } => Ok(self.clone()),
            Linear::Dense { weight, bias } => {
                let (packed, scales, biases) = mlx_rs::ops::quantize(weight, group_size, bits)?;
                Ok(Linear::Quantized {
                    weight: packed,
                    scales,
                    biases,
                    bias: bias.clone(),
                    group_size,
                    bits,
                })
            }
        }
    }

    /// Puts the layer's arrays back under `prefix`, with mlx-lm's names.
    pub fn store(&self, prefix: &str, out: &mut WeightMap) {
        match self {
            Linear::Dense { weight, bias } => {
                out.insert(format!("{prefix}.weight"), weight.clone());
                if let Some(bias) = bias {
                    out.insert(format!("{prefix}.bias"), bias.clone());
                }
            }
            Linear::Quantized {
                weight,
                scales,
                biases,
                bias,
                ..
            } => {
                out.insert(format!("{prefix}.weight"), weight.clone());
                out.insert(format!("{prefix}.scales"), scales.clone());
                out.insert(format!("{prefix}.biases"), biases.clone());
                if let Some(bias) = bias {
                    out.insert(format!("{prefix}.bias"), bias.clone());
                }
            }
        }
    }

    pub fn quantization(&self) -> Option<(i32, i32)> {
        match self {
            Linear::Dense { .. } => None,
            Linear::Quantized { group_size, bits, .. } => Some((*group_size, *bits)),
        }
    }
}

pub(crate) fn check_shape(name: &str, array: &Array, expected: &[i32]) -> Result<(), ModelError> {
    if array.shape() == expected {
        Ok(())
    } else {
        Err(ModelError::ShapeMismatch {
            name: name.to_owned(),
            expected: expected.to_vec(),
            actual: array.shape().to_vec(),
        })
    }
}

/// Group size and bits follow from the shapes: `scales` has one column per
/// group of `in_features`, and the packed weight holds `in_features * bits`
/// bits a row in uint32 words. This also covers per-layer quantization.
pub(crate) fn infer_quantization(
    prefix: &str,
    weight: &Array,
    scales: &Array,
    out_features: i32,
    in_features: i32,
) -> Result<(i32, i32), ModelError> {
    let mismatch = || ModelError::ShapeMismatch {
        name: format!("{prefix}.weight (quantized)"),
        expected: vec![out_features, in_features],
        actual: weight.shape().to_vec(),
    };
    let (&[w_out, w_cols], &[s_out, s_cols]) = (weight.shape(), scales.shape()) else {
        return Err(mismatch());
    };
    if weight.dtype() != Dtype::Uint32 || w_out != out_features || s_out != out_features || s_cols == 0 {
        return Err(mismatch());
    }
    if in_features % s_cols != 0 || (w_cols * 32) % in_features != 0 {
        return Err(mismatch());
    }
    let group_size = in_features / s_cols;
    let bits = w_cols * 32 / in_features;
    if ![32, 64, 128].contains(&group_size) || ![2, 3, 4, 5, 6, 8].contains(&bits) {
        return Err(mismatch());
    }
    Ok((group_size, bits))
}
