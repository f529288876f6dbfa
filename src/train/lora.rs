//! LoRA and DoRA (mlx-lm's `tuner/lora.py` and `tuner/dora.py`): low-rank
//! updates on frozen projections, float or quantized.
//!
//! The adapter tensors live in a map under mlx-lm's names
//! (`model.layers.N.self_attn.q_proj.lora_a`, `.lora_b`, and DoRA's `.m`), so
//! they are what gets differentiated, averaged, gossiped and saved; the base
//! model is never touched. `LoraApplier` wraps each adapted `Linear` during a
//! forward pass through the model's `ProjectionAdapter` hook.

use std::collections::HashMap;
use std::rc::Rc;

use mlx_rs::{Array, Dtype};

use crate::config::{FineTuneType, LoraConfig};
use crate::model::linear::{Linear, ProjectionAdapter};
use crate::model::{Decoder, ModelError};
use crate::rng::SeededRng;

use super::TrainError;

/// Adapter tensors by mlx-lm parameter name.
pub type AdapterParams = HashMap<Rc<str>, Array>;

/// What to adapt and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub dora: bool,
    /// The last `num_layers` blocks.
    pub num_layers: usize,
    pub rank: i32,
    pub scale: f32,
    pub dropout: f32,
    /// Projections inside a block, e.g. `self_attn.q_proj`.
    pub keys: Vec<String>,
}

impl LoraSettings {
    pub fn from_config(config: &LoraConfig) -> Self {
        Self {
            dora: config.fine_tune_type == FineTuneType::Dora,
            num_layers: config.num_layers as usize,
            rank: config.rank as i32,
            scale: config.scale as f32,
            dropout: config.dropout as f32,
            keys: config.keys.clone(),
        }
    }

    /// The adapted projections of `decoder` (module paths), checking that
    /// the settings fit the model.
    pub fn targets<'a>(&self, decoder: &'a Decoder) -> Result<Vec<&'a Linear>, TrainError> {
        if self.rank < 1 {
            return Err(TrainError::Settings(format!("lora.rank must be at least 1, got {}", self.rank)));
        }
        let layers = decoder.num_layers();
        if self.num_layers == 0 || self.num_layers > layers {
            return Err(TrainError::Settings(format!(
                "lora.num_layers = {} but the model has {layers} layers",
                self.num_layers
            )));
        }
        let linears = decoder.linears();
        let first = layers - self.num_layers;
        let mut targets = Vec::new();
        for key in &self.keys {
            let known = linears.iter().any(|(path, _)| *path == format!("model.layers.0.{key}"));
            if !known {
                let available: Vec<String> = linears
                    .iter()
                    .filter_map(|(path, _)| path.strip_prefix("model.layers.0.").map(str::to_owned))
                    .collect();
                return Err(TrainError::Settings(format!(
                    "unknown LoRA target key `{key}`; this model's blocks have {available:?}"
                )));
            }
            for layer in first..layers {
                let path = format!("model.layers.{layer}.{key}");
                if let Some((_, linear)) = linears.iter().find(|(p, _)| *p == path) {
                    targets.push(*linear);
                }
            }
        }
        Ok(targets)
    }

    /// Fresh adapters, as mlx-lm initializes them: A uniform in ±1/√in, B
    /// zero (so training starts at the base model), DoRA's magnitude the
    /// row norms of the base weight.
    pub fn init(&self, decoder: &Decoder, seed: u64) -> Result<AdapterParams, TrainError> {
        let mut rng = SeededRng::new(seed ^ 0x10_4A);
        let mut params = AdapterParams::new();
        for linear in self.targets(decoder)? {
            let (out_dim, in_dim) = linear.weight.shape();
            let bound = 1.0 / (in_dim as f64).sqrt();
            let a: Vec<f32> = (0..in_dim * self.rank).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
            params.insert(format!("{}.lora_a", linear.path).into(), Array::from_slice(&a, &[in_dim, self.rank]));
            params.insert(format!("{}.lora_b", linear.path).into(), Array::zeros::<f32>(&[self.rank, out_dim])?);
            if self.dora {
                params.insert(format!("{}.m", linear.path).into(), linear.row_norms_squared()?.sqrt()?);
            }
        }
        mlx_rs::transforms::eval(params.values())?;
        Ok(params)
    }

    /// `decoder` with the squared row norms of every projection a DoRA
    /// adapter wraps kept (`Linear::with_row_norms`); unchanged for LoRA.
    pub fn keep_base_norms(&self, decoder: &mut Decoder) -> Result<(), TrainError> {
        if !self.dora {
            return Ok(());
        }
        let paths: std::collections::HashSet<String> = self.targets(decoder)?.into_iter().map(|l| l.path.clone()).collect();
        decoder.map_linears(|linear| if paths.contains(&linear.path) { linear.with_row_norms() } else { Ok(linear.clone()) })?;
        Ok(())
    }
}

fn row_norms(weight: &Array) -> Result<Array, ModelError> {
    Ok(weight.square()?.sum_axis(1, None)?.sqrt()?)
}

/// Dropout for one training step: a random key per adapted projection,
/// each a pure function of (seed, step, projection), so a resumed run draws
/// the same masks as an uninterrupted one. The keys are arrays rather than
/// seeds so that the compiled step takes them as inputs (a seed would be
/// traced into the graph as a constant and repeat the first step's masks).
#[derive(Debug, Clone)]
pub struct Dropout {
    pub probability: f32,
    /// By projection path; empty when `probability` is 0.
    pub keys: HashMap<String, Array>,
}

impl Dropout {
    /// The keys of micro-batch `step`'s part `part` (`train.cpu_streams`
    /// splits a batch into parts; part 0 is the whole batch when it does not,
    /// and draws what every step drew before parts existed).
    pub fn for_step<'p>(probability: f32, seed: u64, step: u64, part: usize, paths: impl IntoIterator<Item = &'p str>) -> Result<Self, ModelError> {
        let mut keys = HashMap::new();
        if probability > 0.0 {
            for path in paths {
                let name = match part {
                    0 => format!("{seed}:{step}:{path}"),
                    part => format!("{seed}:{step}:{path}:part {part}"),
                };
                let key_seed = blake3::hash(name.as_bytes());
                let mut first = [0u8; 8];
                first.copy_from_slice(&key_seed.as_bytes()[..8]);
                keys.insert(path.to_owned(), mlx_rs::random::key(u64::from_le_bytes(first))?);
            }
        }
        Ok(Self { probability, keys })
    }
}

/// The projections `params` adapts (their paths, sorted).
pub fn adapted_paths(params: &AdapterParams) -> Vec<String> {
    let mut paths: Vec<String> = params.keys().filter_map(|name| name.strip_suffix(".lora_a")).map(str::to_owned).collect();
    paths.sort();
    paths
}

/// Applies the adapters in `params` to the projections they name.
pub struct LoraApplier<'a> {
    pub params: &'a AdapterParams,
    pub settings: &'a LoraSettings,
    /// `Some` while training with dropout; `None` at evaluation.
    pub dropout: Option<&'a Dropout>,
}

impl LoraApplier<'_> {
    fn dropout(&self, x: &Array, path: &str) -> Result<Array, ModelError> {
        let Some(dropout) = self.dropout.filter(|d| d.probability > 0.0) else {
            return Ok(x.clone());
        };
        let key = dropout
            .keys
            .get(path)
            .ok_or_else(|| ModelError::MissingTensor(format!("the dropout key of {path}")))?;
        let keep = Array::from_f32(1.0 - dropout.probability);
        let mask = mlx_rs::random::bernoulli(&keep, x.shape(), key)?;
        Ok(x.multiply(mask.as_dtype(x.dtype())?)?.divide(&keep)?)
    }
}

impl ProjectionAdapter for LoraApplier<'_> {
    fn apply(&self, base: &Linear, x: &Array) -> Result<Option<Array>, ModelError> {
        let Some(a) = self.params.get(format!("{}.lora_a", base.path).as_str()) else {
            return Ok(None);
        };
        let b = self
            .params
            .get(format!("{}.lora_b", base.path).as_str())
            .ok_or_else(|| ModelError::MissingTensor(format!("{}.lora_b", base.path)))?;
        let scale = Array::from_f32(self.settings.scale);
        // The adapter computes in float32 (x·A promotes a bfloat16 x); its
        // update joins the base's output in the base's dtype, as mlx-lm's.
        let update = self.dropout(x, &base.path)?.matmul(a)?.matmul(b)?.multiply(&scale)?;
        if !self.settings.dora {
            let out = base.forward(x)?;
            return Ok(Some(out.add(update.as_dtype(out.dtype())?)?));
        }
        // DoRA: rescale each output row of the adapted weight to the learned
        // magnitude m; the norm is a constant for the gradient (as mlx-lm).
        let m = self
            .params
            .get(format!("{}.m", base.path).as_str())
            .ok_or_else(|| ModelError::MissingTensor(format!("{}.m", base.path)))?;
        let out = base.weight.matmul_t(x)?;
        let dtype = out.dtype();
        let out = out.add(update.as_dtype(dtype)?)?;
        let denom = mlx_rs::stop_gradient(adapted_row_norms(base, a, b, self.settings.scale)?)?;
        let out = out.multiply(m.divide(&denom)?.as_dtype(dtype)?)?;
        Ok(Some(match &base.bias {
            Some(bias) => out.add(bias)?,
            None => out,
        }))
    }
}

/// The row norms of the adapted weight `W + s·Bᵀ·Aᵀ` (`[out]`), without
/// forming that `[out, in]` matrix: row i's squared norm is
/// `‖wᵢ‖² + 2s·⟨wᵢ, (BᵀAᵀ)ᵢ⟩ + s²·‖(BᵀAᵀ)ᵢ‖²`, where the cross term is
/// column i of `B ⊙ (W·A)ᵀ` summed and the last `B ⊙ (AᵀA·B)` summed. That is
/// one pass over W (`W·A`, a quantized matmul when W is quantized) and
/// `[rank, out]` work, where forming the matrix takes several full passes
/// a step.
fn adapted_row_norms(base: &Linear, a: &Array, b: &Array, scale: f32) -> Result<Array, ModelError> {
    let weight_sq = base.row_norms_squared()?;
    let wa_t = base.weight.matmul_t(&a.t())?;
    let cross = b.multiply(&wa_t)?.sum_axis(0, None)?;
    let lora_sq = b.multiply(a.t().matmul(a)?.matmul(b)?)?.sum_axis(0, None)?;
    let squared = weight_sq
        .add(cross.multiply(Array::from_f32(2.0 * scale))?)?
        .add(lora_sq.multiply(Array::from_f32(scale * scale))?)?;
    // Rounding could take a vanishing norm below zero.
    Ok(mlx_rs::ops::maximum(&squared, Array::from_f32(0.0))?.sqrt()?)
}

/// Folds the adapters into the base weights (`export --fuse`): each adapted
/// projection becomes a float32 matrix `W + scale·Bᵀ·Aᵀ`, rescaled row by row
/// to the magnitude `m` for DoRA. Projections without an adapter keep their
/// weights, quantized or not.
pub fn fuse(decoder: &mut Decoder, params: &AdapterParams, settings: &LoraSettings) -> Result<(), TrainError> {
    let scale = Array::from_f32(settings.scale);
    decoder.map_linears(|linear| {
        let (Some(a), Some(b)) = (
            params.get(format!("{}.lora_a", linear.path).as_str()),
            params.get(format!("{}.lora_b", linear.path).as_str()),
        ) else {
            return Ok(linear.clone());
        };
        let weight = linear.weight.dense(Dtype::Float32)?;
        let mut fused = weight.add(b.t().matmul(a.t())?.multiply(&scale)?)?;
        if settings.dora {
            let m = params
                .get(format!("{}.m", linear.path).as_str())
                .ok_or_else(|| ModelError::MissingTensor(format!("{}.m", linear.path)))?;
            let factor = m.divide(row_norms(&fused)?)?.expand_dims(-1)?;
            fused = fused.multiply(&factor)?;
        }
        Ok(Linear {
            path: linear.path.clone(),
            weight: crate::model::linear::Matrix::Dense(fused),
            bias: linear.bias.clone(),
            row_norms_squared: None,
        })
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::linear::Matrix;

    #[test]
    fn factored_dora_norms_equal_the_norms_of_the_formed_matrix() {
        let (out_dim, in_dim, rank, scale) = (48, 64, 4, 20.0f32);
        let mut rng = SeededRng::new(7);
        let mut random = |n: i32, spread: f64| -> Vec<f32> { (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * spread) as f32).collect() };
        let weight = Array::from_slice(&random(out_dim * in_dim, 0.5), &[out_dim, in_dim]);
        let a = Array::from_slice(&random(in_dim * rank, 0.2), &[in_dim, rank]);
        let b = Array::from_slice(&random(rank * out_dim, 0.05), &[rank, out_dim]);
        for matrix in [Matrix::Dense(weight.clone()), Matrix::Dense(weight.clone()).quantized(32, 8).unwrap()] {
            let quantized = matrix.quantization().is_some();
            let base = Linear { path: "p".into(), weight: matrix, bias: None, row_norms_squared: None };
            // The formed matrix, from W as the layer holds it (a quantized W
            // has its own norms: its dequantized self's).
            let dense = base.weight.dense(Dtype::Float32).unwrap();
            let formed = dense.add(b.t().matmul(a.t()).unwrap().multiply(Array::from_f32(scale)).unwrap()).unwrap();
            let expected = row_norms(&formed).unwrap();
            // Computed each time, or from the squared row norms the layer kept.
            for base in [base.clone(), base.with_row_norms().unwrap()] {
                let kept = base.row_norms_squared.is_some();
                let factored = adapted_row_norms(&base, &a, &b, scale).unwrap();
                let gap = factored.subtract(&expected).unwrap().abs().unwrap().divide(&expected).unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
                assert!(gap < 1e-5, "quantized={quantized} kept={kept}: relative gap {gap}");
            }
        }
    }
}
