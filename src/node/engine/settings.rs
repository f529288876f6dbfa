//! What a node's engine is told at start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::aggregate::Method;
use crate::aggregate::outer::OuterOptimizer;
use crate::p2p::network::Exchange;
use crate::wire::codec::{Digest, Limits};
use crate::wire::compression::Compression;

use crate::node::checkpoint::CheckpointFile;
use crate::node::misbehaviour::Misbehaviour;
use super::RoundClock;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PartitionMode {
    /// Hash buckets over the round's members (rendezvous hashing).
    Hash { buckets: u32 },
    /// Shard `id` of `count`, whoever else is there.
    Static { id: u32, count: u32 },
}

#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub run_id: Digest,
    /// Rounds of the whole run (the node stops after the last).
    pub rounds: u64,
    pub method: Method,
    /// How a round's average moves the next round's start.
    pub outer: OuterOptimizer,
    /// How updates travel: adapters in float32 (`None`), or each round's
    /// change compressed, with error feedback (`feedback.rs`).
    pub compression: Compression,
    pub partition: PartitionMode,
    pub fingerprint: String,
    /// Indices of the training rows.
    pub train_rows: Arc<Vec<u64>>,
    pub clock: RoundClock,
    /// Ask peers for the newest average before the first round.
    pub catch_up: bool,
    /// Round 0 starts once this many run members, this node included, have
    /// announced themselves (Flower's `min_available_clients`).
    pub min_members: usize,
    /// After the quorum, updates are still taken for this long (clock time):
    /// late joiners' and, in round 0, those of peers not yet known.
    pub grace: Duration,
    /// Evaluate every average on the held-out rows.
    pub evaluate: bool,
    /// Save the average in the mlx-lm format every N rounds into `save_dir/round-NNNN`.
    pub save_every: u32,
    pub save_dir: Option<PathBuf>,
    pub limits: Limits,
    /// Report how far FedAvg's result is from the exact average each round.
    pub measure_drift: bool,
    /// Checkpoint after every round, and resume from it at start.
    pub checkpoint: Option<CheckpointFile>,
    /// The examples an honest node trains on in a round when it has rows
    /// (`node::examples_per_round`: steps × accumulation × batch; a node
    /// without rows trains on none). An update's weight is one of these
    /// two values; a manifest claiming anything else is rejected.
    pub examples_per_round: u64,
    /// How updates travel: whole to everyone, or by slice to their owners.
    pub exchange: Exchange,
    /// Owners of each slice in the reduce exchange.
    pub replicas: usize,
    /// In the reduce exchange, the chance that a node recomputes one slice
    /// it did not own each round and checks its owners' result.
    pub audit: f64,
    /// `simulate --attack …` only: what this attacking node does wrong.
    pub misbehaviour: Option<Misbehaviour>,
}
