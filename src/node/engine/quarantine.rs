//! Peers proven to misbehave are left out of the run: not members, not
//! owners, their updates and claims dropped, their connections closed.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;

use super::Engine;
use super::events::EngineEvent;
use super::slice_reads::InputSource;

use super::trainer::RoundTrainer;

/// Who this node left out of the run, and why.
#[derive(Default)]
pub(super) struct Verdicts {
    /// Peers proven to misbehave (a wrong slice claim, a signed manifest no
    /// honest node signs), and the proof: not members, not owners.
    pub(super) excluded: HashMap<PeerId, String>,
    /// Of those, the ones quarantined on proof that reaches every node
    /// (gossiped evidence, a signed manifest gossiped to all): their
    /// updates leave a round's inputs even mid-round, as they do
    /// everywhere else.
    pub(super) convicted: HashSet<PeerId>,
}

/// How a quarantine's proof travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Conviction {
    /// Every node gets it: gossiped evidence, or a signed manifest gossiped
    /// to all.
    Public,
    /// Only this node proved it (a slice claim it recomputed).
    Local,
}

impl<T: RoundTrainer> Engine<T> {
    /// Excludes a peer proven to misbehave (its signed word is the proof):
    /// not a member, not an owner, its updates and claims dropped, and the
    /// network closes its connections.
    pub(super) fn quarantine(&mut self, peer: PeerId, reason: String, conviction: Conviction) {
        if peer == self.me() || self.verdicts.excluded.contains_key(&peer) {
            return;
        }
        if conviction == Conviction::Public {
            self.verdicts.convicted.insert(peer);
        }
        tracing::warn!(%peer, %reason, "quarantined");
        for updates in self.heard.buffered.values_mut() {
            updates.remove(&peer);
        }
        self.heard.recent_authors.remove(&peer);
        self.net.ban(peer);
        self.verdicts.excluded.insert(peer, reason.clone());
        self.report(EngineEvent::Quarantined { peer, reason });
    }

    pub(super) fn report_non_finite(&self, sources: &[InputSource], bad: &[usize], s: usize, round: u64) {
        for input in bad.iter().filter_map(|i| sources.get(*i)) {
            let reason = format!("non-finite values in slice {s} of its round-{round} update (taken as no change)");
            self.report(EngineEvent::Rejected { peer: input.author, reason });
        }
    }
}
