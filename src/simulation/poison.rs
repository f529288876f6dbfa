//! Attacks for `simulate --attack` (docs/SECURITY.md, "The adversary
//! suite"): a node that trains honestly, then publishes a corrupted update
//! (well-formed, so only robust averaging can limit it), or that breaks the
//! protocol in the round engine (`node::misbehaviour`). Every other node is
//! untouched.

use std::path::PathBuf;

use clap::ValueEnum;

use crate::aggregate::Tensors;
use crate::node::compute::ComputeClient;
use crate::node::engine::{LocalResult, RoundTrainer};
use crate::node::misbehaviour::Misbehaviour;
use crate::rng::SeededRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Attack {
    /// The update (trained − start) scaled by 100.
    Scale,
    /// The update reversed: start − (trained − start).
    SignFlip,
    /// Gaussian noise (standard deviation 1) in place of the update.
    Noise,
    /// Trains honestly, but as a slice owner in the reduce exchange claims
    /// every slice it owns with its values ×10 (`federation.exchange = "reduce"`).
    LyingReducer,
    /// Trains and serves its update honestly, but as a slice owner never
    /// claims a slice, as an owner that crashed mid-round: each of its
    /// slices' standbys takes it over.
    LazyReducer,
    /// Claims 1,000 times the examples it trained on.
    InflateWeight,
    /// Serves a poisoned average (×100) to late joiners, certified by
    /// itself alone; use it with the late-joiners scenario.
    FakeAverage,
    /// Publishes two different updates for every round (the second ×100).
    Equivocate,
    /// Also publishes its update for rounds r + 1,000 and u64::MAX.
    FutureRound,
    /// Subscribes to the run and never publishes.
    Silent,
    /// Every attacker (`--attackers k`: one attacker's k identities) sends
    /// the same update: Gaussian noise (σ = 1) drawn from the round alone.
    Sybil,
}

impl Attack {
    /// Whether the attack corrupts the attacker's updates (the others act
    /// in the round engine).
    pub fn poisons_updates(self) -> bool {
        matches!(self, Attack::Scale | Attack::SignFlip | Attack::Noise | Attack::Sybil)
    }

    /// What the attack does in the round engine, if anything.
    pub fn misbehaviour(self) -> Option<Misbehaviour> {
        match self {
            Attack::LyingReducer => Some(Misbehaviour::LyingReducer),
            Attack::LazyReducer => Some(Misbehaviour::LazyReducer),
            Attack::InflateWeight => Some(Misbehaviour::InflateWeight),
            Attack::FakeAverage => Some(Misbehaviour::FakeAverage),
            Attack::Equivocate => Some(Misbehaviour::Equivocate),
            Attack::FutureRound => Some(Misbehaviour::FutureRound),
            Attack::Silent => Some(Misbehaviour::Silent),
            Attack::Scale | Attack::SignFlip | Attack::Noise | Attack::Sybil => None,
        }
    }
}

/// A node's trainer in simulation: honest, or an attacker.
#[derive(Clone)]
pub struct SimTrainer {
    pub client: ComputeClient,
    pub attack: Option<Attack>,
    pub seed: u64,
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut SeededRng) -> f64 {
    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

pub fn poison(attack: Attack, start: &Tensors, trained: &mut Tensors, rng: &mut SeededRng) {
    for (name, tensor) in trained.iter_mut() {
        let Some(base) = start.get(name) else { continue };
        for (value, &before) in tensor.values.iter_mut().zip(&base.values) {
            let delta = f64::from(*value) - f64::from(before);
            let poisoned = match attack {
                Attack::Scale => f64::from(before) + 100.0 * delta,
                Attack::SignFlip => f64::from(before) - delta,
                Attack::Noise | Attack::Sybil => f64::from(before) + normal(rng),
                _ => f64::from(*value),
            };
            *value = poisoned as f32;
        }
    }
}

impl RoundTrainer for SimTrainer {
    async fn initial(&self) -> Result<Tensors, String> {
        self.client.initial().await
    }

    async fn train(&self, start: Tensors, rows: Vec<u64>, round: u64) -> Result<(Tensors, LocalResult), String> {
        let (mut trained, local) = self.client.train(start.clone(), rows, round).await?;
        if let Some(attack) = self.attack.filter(|a| a.poisons_updates()) {
            // Sybil identities send one update: its noise depends on the round only.
            let seed = if attack == Attack::Sybil { 0x5EB1 } else { self.seed };
            let mut rng = SeededRng::new(seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            poison(attack, &start, &mut trained, &mut rng);
        }
        Ok((trained, local))
    }

    async fn evaluate(&self, adapter: Tensors) -> Result<f32, String> {
        self.client.evaluate(adapter).await
    }

    async fn save(&self, adapter: Tensors, dir: PathBuf) -> Result<(), String> {
        self.client.save(adapter, dir).await
    }

    async fn optimizer_state(&self) -> Result<Tensors, String> {
        self.client.optimizer_state().await
    }

    async fn restore_optimizer_state(&self, state: Tensors) -> Result<(), String> {
        self.client.restore_optimizer_state(state).await
    }
}
