//! Exact averaging of LoRA updates. mlx-lm's adapter computes
//! y = x·W + s·(x·A)·B, so the update is ΔWᵀ = A·B (A: in×r, B: r×out).
//! Averaging A and B separately (FedAvg) is not the average of the updates
//! Σ wᵢ·Aᵢ·Bᵢ. That average has rank ≤ n·r; it is re-factored to rank r:
//!
//!   Σ wᵢ·Aᵢ·Bᵢ = [A₁ … Aₙ] · [w₁B₁; …; wₙBₙ] = Qa·(Ra·Rbᵀ)·Qbᵀ
//!
//! with thin QRs of the two stacked factors, then an SVD of the small
//! middle matrix M = U·S·Vᵀ. The new A = Qa·U·α keeps the inputs' mean
//! column norm α (A is LoRA's down-projection; if it shrank with the
//! update, later steps would barely move B) and B = (S/α)·Vᵀ·Qbᵀ carries
//! the magnitude.

use super::linalg::{Matrix, qr, symmetric_eigen};
use super::{AggregateError, Contribution, Tensor, Tensors, prepare, weighted_mean, weights};

const A_SUFFIX: &str = ".lora_a";
const B_SUFFIX: &str = ".lora_b";

fn matrix(tensor: &Tensor, name: &str) -> Result<Matrix, AggregateError> {
    match tensor.shape.as_slice() {
        [rows, cols] => Ok(Matrix {
            rows: *rows,
            cols: *cols,
            data: tensor.values.iter().map(|&v| f64::from(v)).collect(),
        }),
        other => Err(AggregateError::Malformed(format!("{name} has shape {other:?}; LoRA factors are matrices"))),
    }
}

fn tensor(m: &Matrix) -> Tensor {
    Tensor {
        shape: vec![m.rows, m.cols],
        values: m.data.iter().map(|&v| v as f32).collect(),
    }
}

/// The LoRA pairs (A name, B name, A of each input, B of each input).
struct Pair {
    a_name: String,
    b_name: String,
    a: Vec<Matrix>,
    b: Vec<Matrix>,
}

fn pairs(inputs: &[Contribution]) -> Result<Vec<Pair>, AggregateError> {
    let names = &inputs[0].tensors;
    let mut pairs = Vec::new();
    for name in names.keys() {
        if let Some(prefix) = name.strip_suffix(A_SUFFIX) {
            let b_name = format!("{prefix}{B_SUFFIX}");
            if !names.contains_key(&b_name) {
                return Err(AggregateError::Malformed(format!("{name} has no {b_name}")));
            }
            let mut a = Vec::with_capacity(inputs.len());
            let mut b = Vec::with_capacity(inputs.len());
            for input in inputs {
                let (ai, bi) = (matrix(&input.tensors[name], name)?, matrix(&input.tensors[&b_name], &b_name)?);
                if ai.cols != bi.rows {
                    return Err(AggregateError::Malformed(format!("{name} is {}×{} but {b_name} is {}×{}", ai.rows, ai.cols, bi.rows, bi.cols)));
                }
                a.push(ai);
                b.push(bi);
            }
            pairs.push(Pair {
                a_name: name.clone(),
                b_name,
                a,
                b,
            });
        } else if let Some(prefix) = name.strip_suffix(B_SUFFIX)
            && !names.contains_key(&format!("{prefix}{A_SUFFIX}"))
        {
            return Err(AggregateError::Malformed(format!("{name} has no {prefix}{A_SUFFIX}")));
        }
    }
    Ok(pairs)
}

/// `[A₁ … Aₙ]` (in × n·r) and `[w₁B₁; …; wₙBₙ]` (n·r × out).
fn stacked(pair: &Pair, weights: &[f64]) -> (Matrix, Matrix) {
    let (rows, rank, out) = (pair.a[0].rows, pair.a[0].cols, pair.b[0].cols);
    let k = rank * pair.a.len();
    let mut a_cat = Matrix::zeros(rows, k);
    let mut b_cat = Matrix::zeros(k, out);
    for (i, ((a, b), w)) in pair.a.iter().zip(&pair.b).zip(weights).enumerate() {
        for r in 0..rows {
            for c in 0..rank {
                a_cat.set(r, i * rank + c, a.at(r, c));
            }
        }
        for r in 0..rank {
            for c in 0..out {
                b_cat.set(i * rank + r, c, w * b.at(r, c));
            }
        }
    }
    (a_cat, b_cat)
}

fn refactor(pair: &Pair, weights: &[f64], fallback_a: &Tensor) -> (Tensor, Tensor) {
    let (rows, rank, out) = (pair.a[0].rows, pair.a[0].cols, pair.b[0].cols);
    let (a_cat, b_cat) = stacked(pair, weights);
    let (qa, ra) = qr(&a_cat);
    let (qb, rb) = qr(&b_cat.transpose());
    let middle = ra.matmul(&rb.transpose());
    let (eigenvalues, v) = symmetric_eigen(&middle.transpose().matmul(&middle));
    let column_norms: Vec<f64> = pair
        .a
        .iter()
        .flat_map(|a| (0..rank).map(move |c| (0..a.rows).map(|r| a.at(r, c).powi(2)).sum::<f64>().sqrt()))
        .collect();
    let alpha = column_norms.iter().sum::<f64>() / column_norms.len() as f64;
    let alpha = if alpha > 0.0 { alpha } else { 1.0 };
    let top = eigenvalues.first().copied().unwrap_or(0.0).max(0.0);
    let mut new_a = Matrix::zeros(rows, rank);
    let mut new_b = Matrix::zeros(rank, out);
    for j in 0..rank {
        let sigma = eigenvalues.get(j).copied().unwrap_or(0.0).max(0.0).sqrt();
        if sigma <= 1e-9 * top.sqrt() || sigma == 0.0 {
            // No update in this direction: B's row stays zero, and A keeps
            // the FedAvg column so that the direction can still learn.
            for r in 0..rows {
                new_a.set(r, j, f64::from(fallback_a.values[r * rank + j]));
            }
            continue;
        }
        let v_j: Vec<f64> = (0..v.rows).map(|r| v.at(r, j)).collect();
        // u_j = M·v_j / σ_j, then A's column Qa·u_j·α.
        let u_j: Vec<f64> = (0..middle.rows).map(|r| (0..middle.cols).map(|c| middle.at(r, c) * v_j[c]).sum::<f64>() / sigma).collect();
        for r in 0..rows {
            let value: f64 = (0..qa.cols).map(|c| qa.at(r, c) * u_j[c]).sum();
            new_a.set(r, j, value * alpha);
        }
        for c in 0..out {
            let value: f64 = (0..qb.cols).map(|k| qb.at(c, k) * v_j[k]).sum();
            new_b.set(j, c, value * sigma / alpha);
        }
    }
    (tensor(&new_a), tensor(&new_b))
}

pub fn exact(inputs: &[Contribution], weights: &[f64]) -> Result<Tensors, AggregateError> {
    let pairs = pairs(inputs)?;
    // Everything that is not a LoRA factor (DoRA magnitudes) is FedAvg'd;
    // so are the fallback columns of A.
    let mut out = weighted_mean(inputs, weights);
    for pair in &pairs {
        let (a, b) = refactor(pair, weights, &out[&pair.a_name]);
        out.insert(pair.a_name.clone(), a);
        out.insert(pair.b_name.clone(), b);
    }
    Ok(out)
}

/// ⟨X₁·Y₁, X₂·Y₂⟩ (Frobenius) through r×r Gram matrices, never forming the
/// in×out products.
fn product_inner(x1: &Matrix, y1: &Matrix, x2: &Matrix, y2: &Matrix) -> f64 {
    let g = x1.transpose().matmul(x2);
    let h = y2.matmul(&y1.transpose());
    (0..g.rows).flat_map(|p| (0..g.cols).map(move |q| (p, q))).map(|(p, q)| g.at(p, q) * h.at(q, p)).sum()
}

/// How far FedAvg's update Ā·B̄ is from the true average update Σ wᵢ·Aᵢ·Bᵢ:
/// ‖Ā·B̄ − Σ wᵢAᵢBᵢ‖ / ‖Σ wᵢAᵢBᵢ‖ over every LoRA pair (0 when there is no
/// update at all).
pub fn fedavg_drift(inputs: Vec<Contribution>) -> Result<f64, AggregateError> {
    let inputs = prepare(inputs)?;
    let weights = weights(&inputs);
    let mean = weighted_mean(&inputs, &weights);
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for pair in pairs(&inputs)? {
        let (a_bar, b_bar) = (matrix(&mean[&pair.a_name], &pair.a_name)?, matrix(&mean[&pair.b_name], &pair.b_name)?);
        // Terms cⱼ·Xⱼ·Yⱼ: FedAvg's product, minus each weighted input.
        let mut terms: Vec<(f64, &Matrix, &Matrix)> = vec![(1.0, &a_bar, &b_bar)];
        terms.extend(pair.a.iter().zip(&pair.b).zip(&weights).map(|((a, b), w)| (-w, a, b)));
        for (j, (cj, xj, yj)) in terms.iter().enumerate() {
            for (l, (cl, xl, yl)) in terms.iter().enumerate() {
                let inner = cj * cl * product_inner(xj, yj, xl, yl);
                diff += inner;
                if j > 0 && l > 0 {
                    norm += inner;
                }
            }
        }
    }
    if norm <= 0.0 {
        return Ok(0.0);
    }
    Ok((diff.max(0.0) / norm).sqrt())
}

#[cfg(test)]
mod tests {
    use super::super::{Method, aggregate};
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    fn random_pair(author: u8, seed: &mut u64, (input, rank, output): (usize, usize, usize)) -> Contribution {
        let mut tensors = Tensors::new();
        tensors.insert("p.lora_a".into(), Tensor::new(vec![input, rank], (0..input * rank).map(|_| lcg(seed)).collect()).unwrap());
        tensors.insert("p.lora_b".into(), Tensor::new(vec![rank, output], (0..rank * output).map(|_| lcg(seed)).collect()).unwrap());
        tensors.insert("p.m".into(), Tensor::new(vec![output], (0..output).map(|_| lcg(seed)).collect()).unwrap());
        Contribution {
            author: vec![author],
            examples: u64::from(author),
            tensors,
        }
    }

    fn product(t: &Tensors) -> Matrix {
        matrix(&t["p.lora_a"], "a").unwrap().matmul(&matrix(&t["p.lora_b"], "b").unwrap())
    }

    fn frobenius(m: &Matrix) -> f64 {
        m.data.iter().map(|v| v * v).sum::<f64>().sqrt()
    }

    #[test]
    fn one_input_is_reproduced_exactly() {
        let mut seed = 7;
        let input = random_pair(1, &mut seed, (12, 3, 10));
        let out = aggregate(Method::Exact, vec![input.clone()], None).unwrap();
        let (want, got) = (product(&input.tensors), product(&out));
        let err = want.data.iter().zip(&got.data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-5, "max error {err}");
        assert_eq!(out["p.m"], input.tensors["p.m"]);
    }

    #[test]
    fn exact_is_the_best_rank_r_average_and_fedavg_drifts() {
        let mut seed = 11;
        let dims = (16, 2, 9);
        let inputs: Vec<Contribution> = (1..=4).map(|a| random_pair(a, &mut seed, dims)).collect();
        let weights = weights(&prepare(inputs.clone()).unwrap());
        // The true average update, formed densely for the check.
        let mut truth = Matrix::zeros(16, 9);
        for (input, w) in inputs.iter().zip(&weights) {
            let p = product(&input.tensors);
            for (t, v) in truth.data.iter_mut().zip(&p.data) {
                *t += w * v;
            }
        }
        let exact = product(&aggregate(Method::Exact, inputs.clone(), None).unwrap());
        let fedavg = product(&aggregate(Method::FedAvg, inputs.clone(), None).unwrap());
        let gap = |m: &Matrix| {
            let d = Matrix {
                rows: 16,
                cols: 9,
                data: m.data.iter().zip(&truth.data).map(|(a, b)| a - b).collect(),
            };
            frobenius(&d) / frobenius(&truth)
        };
        // Rank-2 truncation of a rank-8 average loses something, but far
        // less than FedAvg's mixing of unrelated factors.
        assert!(gap(&exact) < gap(&fedavg), "exact {} vs fedavg {}", gap(&exact), gap(&fedavg));
        let drift = fedavg_drift(inputs).unwrap();
        assert!((drift - gap(&fedavg)).abs() < 1e-6, "drift {drift} vs dense {}", gap(&fedavg));
    }

    #[test]
    fn zero_updates_keep_a_usable() {
        let mut seed = 3;
        let mut input = random_pair(1, &mut seed, (8, 2, 5));
        input.tensors.get_mut("p.lora_b").unwrap().values.fill(0.0);
        let out = aggregate(Method::Exact, vec![input.clone()], None).unwrap();
        assert!(out["p.lora_b"].values.iter().all(|v| *v == 0.0));
        assert_eq!(out["p.lora_a"], input.tensors["p.lora_a"]);
    }
}
