//! What an attacking node does in the round engine, for `simulate
//! --attack` (docs/SECURITY.md, "The adversary suite"). Honest nodes have
//! none; `start` cannot set one. Attacks on the update's values (scale,
//! sign flip, noise, Sybil) live in the simulation's trainer instead.

use crate::aggregate::Tensors;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Trains honestly, but as a slice owner (reduce exchange) claims every
    /// slice it owns with its values ×10.
    LyingReducer,
    /// Claims 1,000 times the examples it trained on.
    InflateWeight,
    /// Serves a poisoned average (its own ×100) to joiners, in a
    /// certificate it signs alone, naming itself the round's only contributor.
    FakeAverage,
    /// Publishes two different updates for every round (the second ×100).
    Equivocate,
    /// Also publishes its update under rounds far ahead: r + 1,000 and u64::MAX.
    FutureRound,
    /// Subscribes to the run and never publishes anything.
    Silent,
}

/// `tensors` with every value times `factor`: the poison of an equivocated
/// update and of a fake average.
pub fn scaled(tensors: &Tensors, factor: f32) -> Tensors {
    let mut out = tensors.clone();
    for tensor in out.values_mut() {
        for value in &mut tensor.values {
            *value *= factor;
        }
    }
    out
}
