//! What the engine tells whoever runs it: its events, each round's report, its errors.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use libp2p::PeerId;

use crate::aggregate::Tensors;
use crate::wire::codec::Digest;

use crate::node::checkpoint::CheckpointError;
use super::LocalResult;

/// A member of a round as this node saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    pub peer: PeerId,
    /// The newest round it published an update for, as far as this node knows.
    pub newest_round: Option<u64>,
    /// Its training rows this round (hash partitions; unknown for static ones).
    pub rows: Option<usize>,
}

/// One round, as this node lived it.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub round: u64,
    pub average_hash: Digest,
    pub average: Arc<Tensors>,
    /// The average this node trained from.
    pub parent: Digest,
    pub contributors: usize,
    pub expected: usize,
    /// True if the deadline, not the quorum, ended the round.
    pub timed_out: bool,
    pub rows: usize,
    pub local: LocalResult,
    pub eval_loss: Option<f32>,
    /// Of this round's contributors, the fraction that trained from the same
    /// average as this node: agreement on round r−1's average.
    pub agreement_before: f64,
    /// ‖FedAvg update − exact average update‖ / ‖exact‖, if measured.
    pub fedavg_drift: Option<f64>,
    pub elapsed: Duration,
    pub members: Vec<MemberView>,
    /// Slices of the average this node computed (the reduce exchange):
    /// its own, and those it took over, found contested, waited for in
    /// vain or audited.
    pub slices_computed: Option<usize>,
}

#[derive(Debug, Clone)]
pub enum EngineEvent {
    Listening(libp2p::Multiaddr),
    PeerConnected(PeerId),
    /// Catch-up found an adapter: training resumes at `round`.
    CaughtUp { round: u64, from: Digest },
    /// The node's own checkpoint: training resumes at `round`.
    Resumed { round: u64 },
    /// The update of `round` is out; collection ends by `deadline` at the
    /// latest (unknown in advance for an idle-time clock).
    Collecting { round: u64, deadline: Option<SystemTime> },
    /// Round 0 waits for its members: `known` of `wanted` have announced
    /// themselves (this node included).
    Waiting { known: usize, wanted: usize },
    /// Round 0's member list is settled: every node that announced itself
    /// in time. `member` is false for a node that came after round 0 began:
    /// it averages round 0 without training in it.
    Members { count: usize, member: bool },
    Round(RoundReport),
    /// Two thirds of a round's contributors attested this node's average of
    /// it: the certificate late joiners now get from this node.
    Certified { round: u64, average: Digest, signers: usize, contributors: usize },
    Rejected { peer: PeerId, reason: String },
    /// `peer` is proven to misbehave and left out of the run for good.
    Quarantined { peer: PeerId, reason: String },
    Finished,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("trainer: {0}")]
    Trainer(String),
    #[error("network: {0}")]
    Network(String),
    #[error("averaging: {0}")]
    Aggregate(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// Agreement across nodes: the share of `hashes` equal to the most common one.
pub fn agreement(hashes: &[Digest]) -> f64 {
    let mut counts: HashMap<&Digest, usize> = HashMap::new();
    for hash in hashes {
        *counts.entry(hash).or_default() += 1;
    }
    counts.values().max().copied().unwrap_or(0) as f64 / hashes.len().max(1) as f64
}
