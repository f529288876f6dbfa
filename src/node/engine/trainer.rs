//! The trainer as the engine sees it: one trait, plain float tensors.

use std::future::Future;
use std::path::PathBuf;

use crate::aggregate::Tensors;

/// What a round of local training produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalResult {
    pub loss: f32,
    pub examples: u64,
    pub tokens: u64,
}

/// The trainer as the engine sees it. Adapters cross as plain float
/// tensors, so a fake trainer is enough to test the engine.
pub trait RoundTrainer: Clone + Send + Sync + 'static {
    /// The adapter every node of the run starts from (the same seed gives
    /// the same tensors on every node).
    fn initial(&self) -> impl Future<Output = Result<Tensors, String>> + Send;
    /// Local steps of `round` from `start` on the rows `rows` (indices).
    fn train(&self, start: Tensors, rows: Vec<u64>, round: u64) -> impl Future<Output = Result<(Tensors, LocalResult), String>> + Send;
    /// Loss on the held-out rows.
    fn evaluate(&self, adapter: Tensors) -> impl Future<Output = Result<f32, String>> + Send;
    /// Writes the adapter in the mlx-lm format into `dir`.
    fn save(&self, adapter: Tensors, dir: PathBuf) -> impl Future<Output = Result<(), String>> + Send;
    /// This node's optimizer state, for its checkpoint.
    fn optimizer_state(&self) -> impl Future<Output = Result<Tensors, String>> + Send;
    /// Puts a checkpointed optimizer state back.
    fn restore_optimizer_state(&self, state: Tensors) -> impl Future<Output = Result<(), String>> + Send;
}
