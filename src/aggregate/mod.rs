//! Averaging the adapters of a round (docs/PROTOCOL.md, "Averaging"): pure
//! functions, tensors in, tensors out, nothing of MLX or the network.
//! `outer` is the step from a round's average to the next round's start.
//!
//! Determinism is the point: nodes that average the same inputs must hold
//! byte-identical results (and so the same adapter hash). Inputs are sorted
//! by author, every sum runs in that order in f64, and no library with its
//! own threading or platform-specific kernels is involved.

mod exact;
mod linalg;
pub mod outer;
mod robust;

use std::collections::BTreeMap;

pub use exact::fedavg_drift;

/// A float32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> Result<Self, AggregateError> {
        let expected = shape.iter().product::<usize>();
        if expected != values.len() {
            return Err(AggregateError::Malformed(format!("shape {shape:?} needs {expected} values, got {}", values.len())));
        }
        Ok(Self { shape, values })
    }
}

/// An adapter: tensors by their mlx-lm names (`….lora_a`, `….lora_b`, `….m`).
pub type Tensors = BTreeMap<String, Tensor>;

/// Zeros in `layout`'s names and shapes.
pub fn zeros_like(layout: &Tensors) -> Tensors {
    layout
        .iter()
        .map(|(name, t)| (name.clone(), Tensor { shape: t.shape.clone(), values: vec![0.0; t.values.len()] }))
        .collect()
}

/// One peer's adapter for the round.
#[derive(Debug, Clone)]
pub struct Contribution {
    /// The author's peer id bytes: the sort key.
    pub author: Vec<u8>,
    /// Training examples behind it (FedAvg's weight).
    pub examples: u64,
    pub tensors: Tensors,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Weighted mean of every tensor, A and B separately (the Flower baseline).
    FedAvg,
    /// Weighted mean of the updates ΔWᵀ = A·B, re-factored to rank r.
    Exact,
    /// Coordinate-wise median (unweighted).
    Median,
    /// Coordinate-wise mean after dropping `fraction` of the values at each end.
    TrimmedMean { fraction: f64 },
    /// Updates relative to the previous average are scaled down to the median
    /// update norm, then FedAvg'd.
    NormClip,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("nothing to average")]
    NoInputs,
    #[error("two contributions from the same author")]
    DuplicateAuthor,
    #[error("contribution {author}: {detail}")]
    Mismatch { author: String, detail: String },
    #[error("{0}")]
    Malformed(String),
    #[error("norm clipping needs the previous average")]
    NoPrevious,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Sorts by author and checks that every contribution has the same tensor
/// names and shapes as the first, and only finite values.
fn prepare(mut inputs: Vec<Contribution>) -> Result<Vec<Contribution>, AggregateError> {
    inputs.sort_by(|a, b| a.author.cmp(&b.author));
    if inputs.windows(2).any(|w| w[0].author == w[1].author) {
        return Err(AggregateError::DuplicateAuthor);
    }
    let first = inputs.first().ok_or(AggregateError::NoInputs)?;
    let layout: Vec<(&String, &Vec<usize>)> = first.tensors.iter().map(|(n, t)| (n, &t.shape)).collect();
    for input in &inputs {
        let mismatch = |detail: String| AggregateError::Mismatch {
            author: hex(&input.author),
            detail,
        };
        let this: Vec<(&String, &Vec<usize>)> = input.tensors.iter().map(|(n, t)| (n, &t.shape)).collect();
        if this != layout {
            let differing = layout
                .iter()
                .zip(&this)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("{} {:?} vs {} {:?}", a.0, a.1, b.0, b.1))
                .unwrap_or_else(|| format!("{} tensors vs {}", this.len(), layout.len()));
            return Err(mismatch(format!("tensors differ from the others: {differing}")));
        }
        for (name, tensor) in &input.tensors {
            if tensor.values.len() != tensor.shape.iter().product::<usize>() {
                return Err(mismatch(format!("{name}: value count does not match shape {:?}", tensor.shape)));
            }
            if tensor.values.iter().any(|v| !v.is_finite()) {
                return Err(mismatch(format!("{name} has NaN or infinite values")));
            }
        }
    }
    Ok(inputs)
}

/// Normalized FedAvg weights: by examples, or equal when no one counted any.
/// The total is a u128: counts are u64 and there are fewer than 2^64 inputs,
/// so it cannot overflow whatever the counts are.
fn weights(inputs: &[Contribution]) -> Vec<f64> {
    let total: u128 = inputs.iter().map(|c| u128::from(c.examples)).sum();
    if total == 0 {
        return vec![1.0 / inputs.len() as f64; inputs.len()];
    }
    inputs.iter().map(|c| c.examples as f64 / total as f64).collect()
}

/// Per-coordinate combination of the inputs' values of every tensor.
fn per_coordinate(inputs: &[Contribution], mut combine: impl FnMut(&mut [f64]) -> f64) -> Tensors {
    let mut column = Vec::with_capacity(inputs.len());
    inputs[0]
        .tensors
        .iter()
        .map(|(name, first)| {
            let values = (0..first.values.len())
                .map(|i| {
                    column.clear();
                    column.extend(inputs.iter().map(|c| f64::from(c.tensors[name].values[i])));
                    combine(&mut column) as f32
                })
                .collect();
            (name.clone(), Tensor { shape: first.shape.clone(), values })
        })
        .collect()
}

fn weighted_mean(inputs: &[Contribution], weights: &[f64]) -> Tensors {
    per_coordinate(inputs, |column| column.iter().zip(weights).map(|(v, w)| v * w).sum())
}

/// Averages one round's contributions. `previous` is the average they
/// trained from (norm clipping measures updates against it).
pub fn aggregate(method: Method, inputs: Vec<Contribution>, previous: Option<&Tensors>) -> Result<Tensors, AggregateError> {
    let inputs = prepare(inputs)?;
    let weights = weights(&inputs);
    match method {
        Method::FedAvg => Ok(weighted_mean(&inputs, &weights)),
        Method::Exact => exact::exact(&inputs, &weights),
        Method::Median => Ok(per_coordinate(&inputs, robust::median)),
        Method::TrimmedMean { fraction } => {
            let trim = robust::trim_count(inputs.len(), fraction);
            Ok(per_coordinate(&inputs, |column| robust::trimmed_mean(column, trim)))
        }
        Method::NormClip => robust::norm_clip(&inputs, &weights, previous.ok_or(AggregateError::NoPrevious)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contribution(author: u8, examples: u64, a: &[f32], b: &[f32]) -> Contribution {
        let mut tensors = Tensors::new();
        tensors.insert("l.lora_a".into(), Tensor::new(vec![a.len(), 1], a.to_vec()).unwrap());
        tensors.insert("l.lora_b".into(), Tensor::new(vec![1, b.len()], b.to_vec()).unwrap());
        Contribution {
            author: vec![author],
            examples,
            tensors,
        }
    }

    #[test]
    fn fedavg_weights_by_examples() {
        let out = aggregate(
            Method::FedAvg,
            vec![contribution(1, 1, &[0.0, 4.0], &[1.0]), contribution(2, 3, &[4.0, 0.0], &[5.0])],
            None,
        )
        .unwrap();
        assert_eq!(out["l.lora_a"].values, vec![3.0, 1.0]);
        assert_eq!(out["l.lora_b"].values, vec![4.0]);
    }

    #[test]
    fn median_and_trimmed_mean_ignore_an_outlier() {
        let inputs = vec![
            contribution(1, 1, &[1.0], &[1.0]),
            contribution(2, 1, &[2.0], &[2.0]),
            contribution(3, 1, &[3.0], &[3.0]),
            contribution(4, 1, &[2.5], &[2.5]),
            contribution(5, 1, &[1000.0], &[-1000.0]),
        ];
        let median = aggregate(Method::Median, inputs.clone(), None).unwrap();
        assert_eq!(median["l.lora_a"].values, vec![2.5]);
        assert_eq!(median["l.lora_b"].values, vec![2.0]);
        let trimmed = aggregate(Method::TrimmedMean { fraction: 0.2 }, inputs, None).unwrap();
        assert_eq!(trimmed["l.lora_a"].values, vec![2.5]);
        assert!((trimmed["l.lora_b"].values[0] - 5.5 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn norm_clip_bounds_a_scaled_update() {
        let previous = contribution(0, 0, &[0.0], &[0.0]).tensors;
        let inputs = vec![
            contribution(1, 1, &[1.0], &[0.0]),
            contribution(2, 1, &[0.0], &[1.0]),
            contribution(3, 1, &[100.0], &[100.0]),
        ];
        let out = aggregate(Method::NormClip, inputs, Some(&previous)).unwrap();
        // The attacker's update is cut to the median norm (1), so no
        // coordinate can move by more than 1.
        let a = out["l.lora_a"].values[0];
        assert!(a > 0.0 && a < 1.0, "{a}");
        assert!(aggregate(Method::NormClip, vec![contribution(1, 1, &[1.0], &[1.0])], None).is_err());
    }

    #[test]
    fn mismatched_shapes_and_non_finite_values_are_rejected() {
        let good = contribution(1, 1, &[1.0, 2.0], &[1.0]);
        let bad_shape = contribution(2, 1, &[1.0], &[1.0]);
        let err = aggregate(Method::FedAvg, vec![good.clone(), bad_shape], None).unwrap_err();
        assert!(matches!(err, AggregateError::Mismatch { .. }), "{err}");
        let nan = contribution(3, 1, &[f32::NAN, 2.0], &[1.0]);
        assert!(aggregate(Method::FedAvg, vec![good.clone(), nan], None).is_err());
        assert_eq!(aggregate(Method::FedAvg, vec![], None), Err(AggregateError::NoInputs));
        assert_eq!(aggregate(Method::FedAvg, vec![good.clone(), good], None), Err(AggregateError::DuplicateAuthor));
    }
}
