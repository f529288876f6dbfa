//! What an attacking node does in the round engine, for `simulate
//! --attack` (docs/SECURITY.md, "The adversary suite"). Honest nodes have
//! none; `start` cannot set one. Attacks on the update's values (scale,
//! sign flip, noise, Sybil) live in the simulation's trainer instead.

use crate::aggregate::Tensors;

/// Each one is the engine's half of the `simulation::poison::Attack` of the
/// same name, whose documentation (`simulate --help`) says what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// In `claim_slices`: owned slices ×10.
    LyingReducer,
    /// In `claim_slices`: no claim at all.
    LazyReducer,
    /// In `publish_update`: examples ×1,000.
    InflateWeight,
    /// In `round`: `fake_average` replaces the kept average.
    FakeAverage,
    /// In `misbehave_with`: a second update, ×100.
    Equivocate,
    /// In `misbehave_with`: copies under rounds r + 1,000 and u64::MAX.
    FutureRound,
    /// No announcement, no update, no attestation.
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
