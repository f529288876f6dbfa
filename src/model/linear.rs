//! Frozen weight matrices, float or MLX affine-quantized, and the projection
//! layer built on them. `Linear` is a plain struct so the trainer can wrap it
//! with LoRA (as mlx-lm's `LoRALinear.from_base` wraps `nn.Linear` and
//! `nn.QuantizedLinear`).

use mlx_rs::{Array, Dtype};

use super::ModelError;
use super::weights::WeightMap;

/// A `[rows, cols]` matrix, float or MLX affine-quantized (one scale and bias
/// per `group_size` columns, `bits` per value packed in uint32 words).
#[derive(Debug, Clone)]
pub enum Matrix {
    Dense(Array),
    Quantized(QuantizedMatrix),
}

#[derive(Debug, Clone)]
pub struct QuantizedMatrix {
    /// `[rows, cols * bits / 32]` uint32.
    pub packed: Array,
    /// `[rows, cols / group_size]`, one per group.
    pub scales: Array,
    pub biases: Array,
    pub group_size: i32,
    pub bits: i32,
}

impl Matrix {
    /// Takes `{prefix}.weight`, plus `.scales` and `.biases` when quantized,
    /// checking the shape against `[rows, cols]`.
    pub fn take(weights: &mut WeightMap, prefix: &str, rows: i32, cols: i32) -> Result<Matrix, ModelError> {
        let weight = weights.take(&format!("{prefix}.weight"))?;
        match weights.take_optional(&format!("{prefix}.scales")) {
            None => {
                check_shape(&format!("{prefix}.weight"), &weight, &[rows, cols])?;
                Ok(Matrix::Dense(weight))
            }
            Some(scales) => {
                let biases = weights.take(&format!("{prefix}.biases"))?;
                let (group_size, bits) = infer_quantization(prefix, &weight, &scales, rows, cols)?;
                check_shape(&format!("{prefix}.biases"), &biases, scales.shape())?;
                Ok(Matrix::Quantized(QuantizedMatrix {
                    packed: weight,
                    scales,
                    biases,
                    group_size,
                    bits,
                }))
            }
        }
    }

    /// `x Mᵀ`.
    pub fn matmul_t(&self, x: &Array) -> Result<Array, ModelError> {
        Ok(match self {
            Matrix::Dense(weight) => x.matmul(weight.t())?,
            Matrix::Quantized(q) => mlx_rs::ops::quantized_matmul(x, &q.packed, &q.scales, &q.biases, true, q.group_size, q.bits)?,
        })
    }

    /// The rows at `indices` (any shape), as float: an embedding lookup.
    pub fn rows(&self, indices: &Array) -> Result<Array, ModelError> {
        match self {
            Matrix::Dense(weight) => Ok(weight.take_axis(indices, 0)?),
            Matrix::Quantized(q) => {
                let rows = |a: &Array| a.take_axis(indices, 0);
                Ok(mlx_rs::ops::dequantize(rows(&q.packed)?, rows(&q.scales)?, &rows(&q.biases)?, q.group_size, q.bits)?)
            }
        }
    }

    /// The float matrix in `dtype`, dequantized if need be.
    pub fn dense(&self, dtype: Dtype) -> Result<Array, ModelError> {
        let dense = match self {
            Matrix::Dense(weight) => weight.clone(),
            Matrix::Quantized(q) => {
                // In the target precision: dequantizing with f16 scales would
                // round every weight to f16.
                let (scales, biases) = (q.scales.as_dtype(dtype)?, q.biases.as_dtype(dtype)?);
                mlx_rs::ops::dequantize(&q.packed, &scales, &biases, q.group_size, q.bits)?
            }
        };
        Ok(dense.as_dtype(dtype)?)
    }

    /// The same matrix quantized with MLX affine quantization (a no-op when it
    /// already is).
    pub fn quantized(&self, group_size: i32, bits: i32) -> Result<Matrix, ModelError> {
        match self {
            Matrix::Quantized { .. } => Ok(self.clone()),
            Matrix::Dense(weight) => {
                let (packed, scales, biases) = mlx_rs::ops::quantize(weight, group_size, bits)?;
                Ok(Matrix::Quantized(QuantizedMatrix {
                    packed,
                    scales,
                    biases,
                    group_size,
                    bits,
                }))
            }
        }
    }

    /// Puts the arrays back under `prefix`, with mlx-lm's names.
    pub fn store(&self, prefix: &str, out: &mut WeightMap) {
        match self {
            Matrix::Dense(weight) => out.insert(format!("{prefix}.weight"), weight.clone()),
            Matrix::Quantized(q) => {
                out.insert(format!("{prefix}.weight"), q.packed.clone());
                out.insert(format!("{prefix}.scales"), q.scales.clone());
                out.insert(format!("{prefix}.biases"), q.biases.clone());
            }
        }
    }

    /// `(rows, cols)` of the logical (unpacked) matrix.
    pub fn shape(&self) -> (i32, i32) {
        match self {
            Matrix::Dense(weight) => (weight.shape()[0], weight.shape()[1]),
            Matrix::Quantized(q) => (q.scales.shape()[0], q.scales.shape()[1] * q.group_size),
        }
    }

    /// `(group_size, bits)` when quantized.
    pub fn quantization(&self) -> Option<(i32, i32)> {
        match self {
            Matrix::Dense(_) => None,
            Matrix::Quantized(q) => Some((q.group_size, q.bits)),
        }
    }
}

/// A trainable change to frozen projections (LoRA, DoRA). The model calls it
/// for every projection it runs; the trainer implements it. This keeps the
/// model layer free of training code while LoRA still wraps `Linear`.
pub trait ProjectionAdapter {
    /// The adapted output of `base` for input `x`, or `None` to leave `base`
    /// as it is.
    fn apply(&self, base: &Linear, x: &Array) -> Result<Option<Array>, ModelError>;
}

/// `y = x Wᵀ (+ b)` with `W` of shape `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The module path, e.g. `model.layers.3.self_attn.q_proj` (mlx-lm's name).
    pub path: String,
    pub weight: Matrix,
    pub bias: Option<Array>,
    /// `[out]` float32: the squared norm of each row of the weight, kept
    /// (evaluated) once a DoRA adapter asked for it (`with_row_norms`): it is
    /// a constant of the frozen weight that every DoRA step would otherwise
    /// recompute (a dequantization and a reduction per projection).
    pub row_norms_squared: Option<Array>,
}

impl Linear {
    /// Takes `{prefix}.weight` (quantized or not) and, when `with_bias`,
    /// `{prefix}.bias` out of `weights`.
    pub fn take(weights: &mut WeightMap, prefix: &str, out_features: i32, in_features: i32, with_bias: bool) -> Result<Linear, ModelError> {
        let weight = Matrix::take(weights, prefix, out_features, in_features)?;
        let bias = if with_bias {
            let bias = weights.take(&format!("{prefix}.bias"))?;
            check_shape(&format!("{prefix}.bias"), &bias, &[out_features])?;
            Some(bias)
        } else {
            None
        };
        Ok(Linear {
            path: prefix.to_owned(),
            weight,
            bias,
            row_norms_squared: None,
        })
    }

    /// The output with `adapter` applied where it has something for this layer.
    pub fn forward_adapted(&self, x: &Array, adapter: Option<&dyn ProjectionAdapter>) -> Result<Array, ModelError> {
        if let Some(adapter) = adapter
            && let Some(y) = adapter.apply(self, x)?
        {
            return Ok(y);
        }
        self.forward(x)
    }

    pub fn forward(&self, x: &Array) -> Result<Array, ModelError> {
        let y = self.weight.matmul_t(x)?;
        match &self.bias {
            Some(bias) => Ok(y.add(bias)?),
            None => Ok(y),
        }
    }

    /// The same layer with float weights in `dtype` (the CPU fast path: MLX's
    /// quantized matmul is much slower there than a BLAS sgemm).
    pub fn dequantized(&self, dtype: Dtype) -> Result<Linear, ModelError> {
        Ok(Linear {
            path: self.path.clone(),
            weight: Matrix::Dense(self.weight.dense(dtype)?),
            bias: self.bias.as_ref().map(|b| b.as_dtype(dtype)).transpose()?,
            row_norms_squared: None,
        })
    }

    pub fn quantized(&self, group_size: i32, bits: i32) -> Result<Linear, ModelError> {
        Ok(Linear {
            path: self.path.clone(),
            weight: self.weight.quantized(group_size, bits)?,
            bias: self.bias.clone(),
            row_norms_squared: None,
        })
    }

    /// The squared norm of each row of the weight (`[out]`, float32).
    pub fn row_norms_squared(&self) -> Result<Array, ModelError> {
        match &self.row_norms_squared {
            Some(norms) => Ok(norms.clone()),
            None => Ok(self.weight.dense(Dtype::Float32)?.square()?.sum_axis(1, None)?),
        }
    }

    /// The same layer keeping its squared row norms, evaluated now (so that
    /// a compiled step takes them as a constant, not as work).
    pub fn with_row_norms(&self) -> Result<Linear, ModelError> {
        let norms = self.row_norms_squared()?;
        norms.eval()?;
        Ok(Linear {
            row_norms_squared: Some(norms),
            ..self.clone()
        })
    }

    pub fn store(&self, prefix: &str, out: &mut WeightMap) {
        self.weight.store(prefix, out);
        if let Some(bias) = &self.bias {
            out.insert(format!("{prefix}.bias"), bias.clone());
        }
    }

    pub fn quantization(&self) -> Option<(i32, i32)> {
        self.weight.quantization()
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
/// group of `cols`, and the packed weight holds `cols * bits` bits a row in
/// uint32 words. This also covers per-layer quantization.
fn infer_quantization(prefix: &str, packed: &Array, scales: &Array, rows: i32, cols: i32) -> Result<(i32, i32), ModelError> {
    let mismatch = || ModelError::ShapeMismatch {
        name: format!("{prefix}.weight (quantized)"),
        expected: vec![rows, cols],
        actual: packed.shape().to_vec(),
    };
    let (&[p_rows, p_cols], &[s_rows, s_cols]) = (packed.shape(), scales.shape()) else {
        return Err(mismatch());
    };
    if packed.dtype() != Dtype::Uint32 || p_rows != rows || s_rows != rows || s_cols == 0 {
        return Err(mismatch());
    }
    if cols % s_cols != 0 || (p_cols * 32) % cols != 0 {
        return Err(mismatch());
    }
    let group_size = cols / s_cols;
    let bits = p_cols * 32 / cols;
    if ![32, 64, 128].contains(&group_size) || ![2, 3, 4, 5, 6, 8].contains(&bits) {
        return Err(mismatch());
    }
    Ok((group_size, bits))
}
