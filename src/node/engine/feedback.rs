//! Compressed updates with error feedback (docs/PROTOCOL.md, "Compressed
//! updates"): under `federation.compression` a node sends what it changed
//! this round (its adapter minus the round's start), plus what compression
//! left out of its earlier updates (the residual), compressed. What the
//! compression drops now is kept for the next round, so that over rounds
//! what was sent adds up to what was meant. Pure functions; the residual is
//! this node's own (never sent), kept in its checkpoint beside the state as
//! `<name>` + [`RESIDUAL_SUFFIX`].

use crate::aggregate::{Tensor, Tensors};
use crate::wire::compression::Compression;
use crate::wire::tensors::{decode_checked_as, encode_as};
use crate::wire::codec::Limits;

/// Names a tensor's residual in a checkpoint.
pub(super) const RESIDUAL_SUFFIX: &str = ".residual";

/// `a + sign·b`, tensor by tensor (same names and shapes).
fn combine(a: &Tensors, b: &Tensors, sign: f32) -> Result<Tensors, String> {
    a.iter()
        .map(|(name, x)| {
            let y = b.get(name).filter(|y| y.values.len() == x.values.len()).ok_or_else(|| format!("{name} is missing or has another shape"))?;
            let values = x.values.iter().zip(&y.values).map(|(p, q)| p + sign * q).collect();
            Ok((name.clone(), Tensor { shape: x.shape.clone(), values }))
        })
        .collect()
}

/// `a + b`.
pub(super) fn add(a: &Tensors, b: &Tensors) -> Result<Tensors, String> {
    combine(a, b, 1.0)
}

/// What a node sends for a round that moved `start` to `trained`: the
/// change plus `residual`, compressed. Returns the encoding, the values it
/// decodes to (what peers average: the node averages the same), and the new
/// residual (meant − sent).
pub(super) fn compress(start: &Tensors, trained: &Tensors, residual: &Tensors, compression: Compression) -> Result<(Vec<u8>, Tensors, Tensors), String> {
    let meant = add(&combine(trained, start, -1.0)?, residual)?;
    let bytes = encode_as(&meant, compression)?;
    let limits = Limits {
        max_adapter_bytes: bytes.len(),
        ..Limits::default()
    };
    let sent = decode_checked_as(&bytes, &meant, compression, &limits)?;
    let left = combine(&meant, &sent, -1.0)?;
    Ok((bytes, sent, left))
}

/// `residual` plus what of `sent` the round's `average` dropped (its
/// values where the average is zero), or all of `sent` where this node's
/// update was not averaged (`None`). Under top-k an average keeps only the
/// largest values of each block of its inputs' mean; without this, what
/// the inputs sent outside them would be lost, where now each sender sends
/// it again until an average takes it.
pub(super) fn return_dropped(residual: &Tensors, sent: &Tensors, average: Option<&Tensors>) -> Result<Tensors, String> {
    let dropped: Tensors = match average {
        None => sent.clone(),
        Some(average) => sent
            .iter()
            .map(|(name, s)| {
                let a = average.get(name).filter(|a| a.values.len() == s.values.len()).ok_or_else(|| format!("{name} is missing from the average or has another shape"))?;
                let values = s.values.iter().zip(&a.values).map(|(v, kept)| if *kept == 0.0 { *v } else { 0.0 }).collect();
                Ok((name.clone(), Tensor { shape: s.shape.clone(), values }))
            })
            .collect::<Result<_, String>>()?,
    };
    add(residual, &dropped)
}

/// A state and a residual in one set of tensors (a checkpoint's).
pub(super) fn with_residual(state: &Tensors, residual: &Tensors) -> Tensors {
    let mut packed = state.clone();
    packed.extend(residual.iter().map(|(name, t)| (format!("{name}{RESIDUAL_SUFFIX}"), t.clone())));
    packed
}

/// The state and the residual of a checkpoint's tensors.
pub(super) fn split_residual(packed: Tensors) -> (Tensors, Tensors) {
    let (residual, state): (Tensors, Tensors) = packed.into_iter().partition(|(name, _)| name.ends_with(RESIDUAL_SUFFIX));
    let residual = residual.into_iter().map(|(name, t)| (name.trim_end_matches(RESIDUAL_SUFFIX).to_owned(), t)).collect();
    (state, residual)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::zeros_like;
    use crate::rng::SeededRng;

    fn tensors(rng: &mut SeededRng, spread: f32) -> Tensors {
        [("l.lora_a", 40), ("l.lora_b", 17)]
            .into_iter()
            .map(|(name, n)| (name.to_owned(), Tensor { shape: vec![n], values: (0..n).map(|_| (rng.next_f64() as f32 - 0.5) * spread).collect() }))
            .collect()
    }

    /// Over rounds, what was sent adds up to what was meant, within one
    /// round's compression error (the residual at the end), where sending
    /// without feedback drifts by the sum of every round's error.
    #[test]
    fn error_feedback_carries_the_residual() {
        for compression in [Compression::Int8, Compression::Fp16] {
            let mut rng = SeededRng::new(5);
            let start = tensors(&mut rng, 1.0);
            let mut residual = zeros_like(&start);
            let (mut meant_sum, mut sent_sum, mut plain_sum) = (zeros_like(&start), zeros_like(&start), zeros_like(&start));
            for _ in 0..50 {
                // Small changes with one steady direction, as training makes.
                let change = add(&tensors(&mut rng, 1e-3), &zeros_like(&start).into_iter().map(|(n, t)| (n, Tensor { values: vec![2e-4; t.values.len()], ..t })).collect()).unwrap();
                let trained = add(&start, &change).unwrap();
                let (_, sent, left) = compress(&start, &trained, &residual, compression).unwrap();
                let (_, plain, _) = compress(&start, &trained, &zeros_like(&start), compression).unwrap();
                residual = left;
                meant_sum = add(&meant_sum, &change).unwrap();
                sent_sum = add(&sent_sum, &sent).unwrap();
                plain_sum = add(&plain_sum, &plain).unwrap();
            }
            let gap = |sum: &Tensors| -> f32 {
                sum.iter().flat_map(|(n, t)| t.values.iter().zip(&meant_sum[n].values).map(|(a, b)| (a - b).abs())).fold(0.0, f32::max)
            };
            let largest_residual = residual.values().flat_map(|t| t.values.iter()).fold(0f32, |m, v| m.max(v.abs()));
            // meant = sent + final residual, up to float32 rounding.
            assert!(gap(&sent_sum) <= largest_residual + 1e-5, "{compression:?}: {} vs residual {largest_residual}", gap(&sent_sum));
            if compression == Compression::Int8 {
                assert!(gap(&sent_sum) * 4.0 < gap(&plain_sum), "feedback {} vs none {}", gap(&sent_sum), gap(&plain_sum));
            }
        }
    }

    /// Under top-k three nodes' averages keep only each block's largest
    /// values of the mean: with what was dropped returned to each sender's
    /// residual, the averages applied over rounds add up to the mean of what
    /// the nodes meant, less their residuals, within the averages' own
    /// rounding; without it, most of the change is lost.
    #[test]
    fn top_k_returns_what_the_average_dropped() {
        let mut rng = SeededRng::new(11);
        let start: Tensors = [("l.lora_a", 600)].into_iter().map(|(name, n)| (name.to_owned(), Tensor { shape: vec![n], values: vec![0.0; n] })).collect();
        let nodes = 3;
        let mut residuals = vec![zeros_like(&start); nodes];
        let mut kept_residuals = vec![zeros_like(&start); nodes];
        let (mut meant, mut applied, mut applied_without) = (zeros_like(&start), zeros_like(&start), zeros_like(&start));
        let mean = |all: &[Tensors]| -> Tensors {
            let sum = all.iter().skip(1).fold(all[0].clone(), |acc, t| add(&acc, t).unwrap());
            sum.into_iter().map(|(n, t)| (n, Tensor { values: t.values.iter().map(|v| v / all.len() as f32).collect(), ..t })).collect()
        };
        let average_of = |sent: &[Tensors]| {
            let m = mean(sent);
            decode_checked_as(&encode_as(&m, Compression::TopK).unwrap(), &m, Compression::TopK, &Limits::default()).unwrap()
        };
        let rounds = 30;
        for _ in 0..rounds {
            let changes: Vec<Tensors> = (0..nodes).map(|_| add(&tensors_like(&mut rng, &start, 1e-3), &constant(&start, 2e-4)).unwrap()).collect();
            meant = add(&meant, &mean(&changes)).unwrap();
            let mut sent = Vec::new();
            let mut sent_without = Vec::new();
            for i in 0..nodes {
                let trained = add(&start, &changes[i]).unwrap();
                let (_, s, left) = compress(&start, &trained, &residuals[i], Compression::TopK).unwrap();
                residuals[i] = left;
                sent.push(s);
                let (_, s, left) = compress(&start, &trained, &kept_residuals[i], Compression::TopK).unwrap();
                kept_residuals[i] = left;
                sent_without.push(s);
            }
            let average = average_of(&sent);
            for i in 0..nodes {
                residuals[i] = return_dropped(&residuals[i], &sent[i], Some(&average)).unwrap();
            }
            applied = add(&applied, &average).unwrap();
            applied_without = add(&applied_without, &average_of(&sent_without)).unwrap();
        }
        let gap = |a: &Tensors, b: &Tensors| -> f32 { a["l.lora_a"].values.iter().zip(&b["l.lora_a"].values).map(|(x, y)| (x - y).powi(2)).sum::<f32>().sqrt() };
        let norm = |a: &Tensors| gap(a, &zeros_like(a));
        let owed = combine(&meant, &mean(&residuals), -1.0).unwrap();
        let owed_without = combine(&meant, &mean(&kept_residuals), -1.0).unwrap();
        // Each average rounds to int8 steps of its block: a few percent of
        // the total after 30 rounds.
        assert!(gap(&applied, &owed) < 0.05 * norm(&meant), "{} vs {}", gap(&applied, &owed), norm(&meant));
        assert!(gap(&applied, &owed) * 20.0 < gap(&applied_without, &owed_without), "returned {} vs dropped {}", gap(&applied, &owed), gap(&applied_without, &owed_without));
        // Not averaged at all: everything sent comes back.
        let back = return_dropped(&zeros_like(&start), &sent_like(&start), None).unwrap();
        assert_eq!(back, sent_like(&start));
    }

    fn tensors_like(rng: &mut SeededRng, like: &Tensors, spread: f32) -> Tensors {
        like.iter().map(|(n, t)| (n.clone(), Tensor { shape: t.shape.clone(), values: (0..t.values.len()).map(|_| (rng.next_f64() as f32 - 0.5) * spread).collect() })).collect()
    }

    fn constant(like: &Tensors, value: f32) -> Tensors {
        like.iter().map(|(n, t)| (n.clone(), Tensor { values: vec![value; t.values.len()], ..t.clone() })).collect()
    }

    fn sent_like(like: &Tensors) -> Tensors {
        constant(like, 0.5)
    }

    #[test]
    fn a_checkpoint_keeps_state_and_residual_apart() {
        let mut rng = SeededRng::new(9);
        let (state, residual) = (tensors(&mut rng, 1.0), tensors(&mut rng, 1e-3));
        assert_eq!(split_residual(with_residual(&state, &residual)), (state, residual));
    }
}
