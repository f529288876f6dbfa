//! The outer step (docs/PROTOCOL.md, "The outer step"): how a round's
//! average moves the adapter every node trains the next round from.
//!
//! `average` takes the average as it is (FedAvg, the Flower baseline).
//! `nesterov` is DiLoCo's outer optimizer: the round's pseudo-gradient is
//! g = start − average (what the nodes' local training moved, on the
//! mean), the momentum m ← μ·m + g, and the next start is
//! start − lr·(g + μ·m). With lr = 1 and μ = 0 it is plain averaging.
//!
//! The state (adapter and momentum) is a pure function of the certified
//! averages, so every node holds the same bytes: the step runs element by
//! element in float32 in a fixed order, with no fused multiply-add. The
//! momentum travels inside the state, as tensors named `<name>` +
//! [`MOMENTUM_SUFFIX`], so a joiner or a restarted node takes it with the
//! certified state and a checkpoint holds it.

use super::{AggregateError, Tensor, Tensors, zeros_like};

/// Names the momentum of adapter tensor `<name>` inside a state.
pub const MOMENTUM_SUFFIX: &str = ".outer_momentum";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OuterOptimizer {
    /// The next start is the round's average.
    Average,
    /// DiLoCo's Nesterov step on the pseudo-gradient.
    Nesterov { lr: f32, momentum: f32 },
}

impl OuterOptimizer {
    /// Whether the state carries a momentum beside the adapter.
    pub fn has_momentum(self) -> bool {
        matches!(self, Self::Nesterov { .. })
    }
}

/// The state every node starts the run from: the initial adapter and, for
/// `nesterov`, a zero momentum of each of its tensors.
pub fn initial_state(optimizer: OuterOptimizer, adapter: &Tensors) -> Tensors {
    let mut state = adapter.clone();
    if optimizer.has_momentum() {
        state.extend(zeros_like(adapter).into_iter().map(|(name, zeros)| (format!("{name}{MOMENTUM_SUFFIX}"), zeros)));
    }
    state
}

/// The adapter of a state (the state itself under `average`).
pub fn adapter_of(state: &Tensors) -> Tensors {
    state.iter().filter(|(name, _)| !name.ends_with(MOMENTUM_SUFFIX)).map(|(n, t)| (n.clone(), t.clone())).collect()
}

/// The next state from `state` (whose adapter the round trained from) and
/// the round's `average`, which must have the adapter's tensors and shapes.
pub fn step(optimizer: OuterOptimizer, state: &Tensors, average: &Tensors) -> Result<Tensors, AggregateError> {
    let OuterOptimizer::Nesterov { lr, momentum: mu } = optimizer else {
        return Ok(average.clone());
    };
    let mut next = Tensors::new();
    for (name, mean) in average {
        let malformed = |what: &str| AggregateError::Malformed(format!("outer step: {name} {what}"));
        let start = state.get(name).ok_or_else(|| malformed("is not in the state"))?;
        let moment_name = format!("{name}{MOMENTUM_SUFFIX}");
        let moment = state.get(&moment_name).ok_or_else(|| malformed("has no momentum in the state"))?;
        if start.shape != mean.shape || moment.shape != mean.shape || start.values.len() != mean.values.len() || moment.values.len() != mean.values.len() {
            return Err(malformed("has another shape in the state than in the average"));
        }
        let mut adapter = Vec::with_capacity(mean.values.len());
        let mut moments = Vec::with_capacity(mean.values.len());
        for ((s, a), m) in start.values.iter().zip(&mean.values).zip(&moment.values) {
            let g = s - a;
            let m = mu * m + g;
            let v = s - lr * (g + mu * m);
            if !v.is_finite() || !m.is_finite() {
                return Err(malformed("overflows in the outer step"));
            }
            adapter.push(v);
            moments.push(m);
        }
        next.insert(name.clone(), Tensor { shape: mean.shape.clone(), values: adapter });
        next.insert(moment_name, Tensor { shape: mean.shape.clone(), values: moments });
    }
    if next.len() != state.len() {
        return Err(AggregateError::Malformed(format!("outer step: the average has {} tensors, the state's adapter {}", average.len(), state.len() / 2)));
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(values: &[f32]) -> Tensors {
        [("a".to_owned(), Tensor { shape: vec![values.len()], values: values.to_vec() })].into()
    }

    #[test]
    fn average_takes_the_average() {
        let state = initial_state(OuterOptimizer::Average, &adapter(&[1.0, 2.0]));
        assert_eq!(state.len(), 1);
        assert_eq!(step(OuterOptimizer::Average, &state, &adapter(&[3.0, 4.0])).unwrap(), adapter(&[3.0, 4.0]));
    }

    #[test]
    fn nesterov_without_momentum_at_lr_one_is_averaging() {
        let plain = OuterOptimizer::Nesterov { lr: 1.0, momentum: 0.0 };
        let state = initial_state(plain, &adapter(&[1.0, -2.0]));
        let next = step(plain, &state, &adapter(&[0.5, 3.0])).unwrap();
        assert_eq!(adapter_of(&next), adapter(&[0.5, 3.0]));
    }

    #[test]
    fn nesterov_follows_diloco() {
        let opt = OuterOptimizer::Nesterov { lr: 0.5, momentum: 0.9 };
        let state = initial_state(opt, &adapter(&[1.0]));
        assert_eq!(state[&format!("a{MOMENTUM_SUFFIX}")].values, vec![0.0]);
        // g = 1 - 0.8 = 0.2; m = 0.2; θ = 1 - 0.5·(0.2 + 0.18) = 0.81.
        let one = step(opt, &state, &adapter(&[0.8])).unwrap();
        assert!((one["a"].values[0] - 0.81).abs() < 1e-6);
        assert!((one[&format!("a{MOMENTUM_SUFFIX}")].values[0] - 0.2).abs() < 1e-6);
        // The same average again moves further: the momentum adds up.
        // g = 0.81 - 0.8 = 0.01; m = 0.18 + 0.01 = 0.19; θ = 0.81 - 0.5·(0.01 + 0.171).
        let two = step(opt, &one, &adapter(&[0.8])).unwrap();
        assert!((two["a"].values[0] - (0.81 - 0.5 * (0.01 + 0.9 * 0.19))).abs() < 1e-6);
        assert_eq!(adapter_of(&two).len(), 1);
    }

    #[test]
    fn a_state_without_the_average_s_tensors_is_refused() {
        let opt = OuterOptimizer::Nesterov { lr: 0.7, momentum: 0.9 };
        let state = initial_state(opt, &adapter(&[1.0]));
        let other: Tensors = [("b".to_owned(), Tensor { shape: vec![1], values: vec![0.0] })].into();
        assert!(step(opt, &state, &other).is_err());
        assert!(step(opt, &adapter(&[1.0]), &adapter(&[0.0])).is_err(), "no momentum in the state");
        let overflow = step(opt, &initial_state(opt, &adapter(&[f32::MAX])), &adapter(&[-f32::MAX]));
        assert!(overflow.is_err());
    }
}
