//! Robust averaging for runs with untrusted peers: a few poisoned inputs
//! cannot move these results far, where they can move a mean anywhere.

use super::{AggregateError, Contribution, Tensor, Tensors};

fn sort(column: &mut [f64]) {
    column.sort_by(f64::total_cmp);
}

pub fn median(column: &mut [f64]) -> f64 {
    sort(column);
    let n = column.len();
    if n % 2 == 1 { column[n / 2] } else { (column[n / 2 - 1] + column[n / 2]) / 2.0 }
}

/// Values cut from each end; always leaves at least one.
pub fn trim_count(n: usize, fraction: f64) -> usize {
    let trim = (fraction.clamp(0.0, 0.5) * n as f64).floor() as usize;
    trim.min(n.saturating_sub(1) / 2)
}

pub fn trimmed_mean(column: &mut [f64], trim: usize) -> f64 {
    sort(column);
    let kept = &column[trim..column.len() - trim];
    kept.iter().sum::<f64>() / kept.len() as f64
}

/// L2 norm of `tensors − previous` over every tensor.
fn update_norm(tensors: &Tensors, previous: &Tensors) -> Result<f64, AggregateError> {
    let mut sum = 0.0f64;
    for (name, tensor) in tensors {
        let base = previous
            .get(name)
            .filter(|p| p.shape == tensor.shape)
            .ok_or_else(|| AggregateError::Malformed(format!("the previous average has no {name} of shape {:?}", tensor.shape)))?;
        sum += tensor.values.iter().zip(&base.values).map(|(v, p)| (f64::from(*v) - f64::from(*p)).powi(2)).sum::<f64>();
    }
    Ok(sum.sqrt())
}

/// Each update `xᵢ − previous` is scaled to at most the median update norm,
/// then the clipped updates are FedAvg'd onto `previous`. The threshold
/// comes from the inputs themselves, so it needs no tuning and an attacker
/// who scales its update up only reaches the honest majority's size.
pub fn norm_clip(inputs: &[Contribution], weights: &[f64], previous: &Tensors) -> Result<Tensors, AggregateError> {
    if previous.len() != inputs[0].tensors.len() {
        return Err(AggregateError::Malformed("the previous average has other tensors than the contributions".into()));
    }
    let norms = inputs.iter().map(|c| update_norm(&c.tensors, previous)).collect::<Result<Vec<_>, _>>()?;
    let threshold = median(&mut norms.clone());
    let scales: Vec<f64> = norms.iter().map(|&n| if n > threshold && n > 0.0 { threshold / n } else { 1.0 }).collect();
    Ok(previous
        .iter()
        .map(|(name, base)| {
            let values = base
                .values
                .iter()
                .enumerate()
                .map(|(i, &p)| {
                    let p = f64::from(p);
                    let step: f64 = inputs
                        .iter()
                        .zip(weights)
                        .zip(&scales)
                        .map(|((c, w), s)| w * s * (f64::from(c.tensors[name].values[i]) - p))
                        .sum();
                    (p + step) as f32
                })
                .collect();
            (name.clone(), Tensor { shape: base.shape.clone(), values })
        })
        .collect())
}
