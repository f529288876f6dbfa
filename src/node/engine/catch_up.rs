//! Catching up (docs/SECURITY.md, "Round certificates"): a joiner or a
//! node left two rounds behind takes the newest certified average its
//! peers serve, never one peer's word.

use std::collections::{BTreeMap, HashMap};

use libp2p::PeerId;
use std::time::Duration;

use crate::aggregate::Tensors;
use crate::wire::codec::Digest;

use super::Engine;
use super::events::{EngineError, EngineEvent};
use super::trainer::RoundTrainer;

/// What catching up found so far.
#[derive(Default)]
pub(super) struct Offers {
    /// The best certified average whose adapter arrived.
    pub(super) candidate: Option<Candidate>,
    /// Certificates peers served while catching up: (signers, round) by
    /// average hash. Only these averages are taken.
    pub(super) offered: HashMap<Digest, (usize, u64)>,
    /// While taking one state by its hash (`take_state`): only it is a
    /// candidate, certified or not.
    pub(super) wanted: Option<Digest>,
}

/// The best certified average seen while catching up.
pub(super) struct Candidate {
    /// (signers, round): how candidates rank (docs/SECURITY.md, "Round certificates").
    pub(super) rank: (usize, u64),
    pub(super) round: u64,
    pub(super) hash: Digest,
    pub(super) tensors: Tensors,
}

/// Certificates offered during one catch-up kept at most.
pub(super) const MAX_OFFERED: usize = 256;

impl<T: RoundTrainer> Engine<T> {
    /// Asks peers for the newest average and waits for it: `Some((round to
    /// train next, its certified outer state))`, or `None` to start at round 0 (the run has
    /// not finished a round yet), or when the average found is not past
    /// round `past`: a node never goes back to a round it has averaged.
    pub(super) async fn catch_up(&mut self, past: Option<u64>) -> Result<Option<(u64, Tensors)>, EngineError> {
        self.start_asking(None);
        // Bounded: about 20 s of asking.
        for attempt in 0..10 {
            let peers = self.net.connected_peers().await.map_err(|e| EngineError::Network(e.to_string()))?;
            if let Some(candidate) = self.ask_once(!peers.is_empty()).await? {
                // Below `rounds` (check_claims), so this cannot overflow.
                let next = candidate.round.saturating_add(1);
                if past.is_some_and(|round| next <= round) {
                    return Ok(None);
                }
                self.report(EngineEvent::CaughtUp { round: next, from: candidate.hash });
                tracing::info!(round = next, from = %candidate.hash, "caught up");
                return Ok(Some((next, candidate.tensors)));
            }
            let newest_update = self.heard.buffered.keys().next_back().copied();
            // Peers train round 0 and have no average yet: join them.
            let in_round_zero = newest_update == Some(0);
            // Peers were asked three times and nothing is moving: this run
            // has not started yet.
            let not_started = attempt >= 2 && !peers.is_empty() && newest_update.is_none();
            if in_round_zero || not_started {
                return Ok(None);
            }
        }
        // Updates go round but no certified average came. A peer's update
        // is one peer's word (it could be anything): start where this node
        // is, and rejoin once a certificate can be had (`overtaken`).
        tracing::warn!("no certified average came; peers' updates are not taken as a starting point");
        Ok(None)
    }

    /// The outer state `hash`, from peers that hold it, certified or not
    /// (about 10 s of asking at most); `None` if none did. Its hash is
    /// what most of a round's signed updates name as their start, and the
    /// chunks that arrive are checked against it. Compressed updates are changes:
    /// a node whose start is not the one most of a round's inputs trained
    /// from takes that start before adding their average change to it, so
    /// nodes that diverged (a healed partition) agree again.
    pub(super) async fn take_state(&mut self, hash: Digest) -> Result<Option<Tensors>, EngineError> {
        self.start_asking(Some(hash));
        let mut found = None;
        for _ in 0..5 {
            if let Some(candidate) = self.ask_once(true).await? {
                found = Some(candidate.tensors);
                break;
            }
        }
        self.offers.wanted = None;
        Ok(found)
    }

    /// Forgets earlier offers; only `wanted` is taken, if given.
    fn start_asking(&mut self, wanted: Option<Digest>) {
        self.offers.candidate = None;
        self.offers.offered.clear();
        self.offers.wanted = wanted;
    }

    /// Asks peers (if `ask`) for the wanted state, or else for their newest
    /// certificate, and waits for a candidate: answers need a fetch of the
    /// state's chunks, so up to two seconds, looking every quarter.
    async fn ask_once(&mut self, ask: bool) -> Result<Option<Candidate>, EngineError> {
        let run_id = self.settings.run_id;
        let asked = match self.offers.wanted {
            _ if !ask => Ok(()),
            Some(hash) => self.net.ask_state(run_id, hash).await,
            None => self.net.catch_up(run_id).await,
        };
        if let Err(e) = asked {
            tracing::debug!(error = %e, "catch-up request");
        }
        for _ in 0..8 {
            self.sleep_listening(Duration::from_millis(250), None).await?;
            if self.offers.candidate.is_some() {
                break;
            }
        }
        Ok(self.offers.candidate.take())
    }

    /// With compressed updates: the certified state most of `round`'s
    /// `inputs` trained from (`parents` by author; a tie goes to the
    /// smaller hash, the same choice on every node), taken from peers when
    /// it is not this node's own start `mine`; `None` when it is, or when
    /// no peer served it (the node then stays on its own start).
    pub(super) async fn common_start(&mut self, round: u64, mine: Digest, inputs: &[(PeerId, Digest)], parents: &BTreeMap<PeerId, Option<Digest>>) -> Result<Option<Tensors>, EngineError> {
        let mut counts: BTreeMap<Digest, usize> = BTreeMap::new();
        for (author, _) in inputs {
            let buffered = || self.heard.buffered.get(&round).and_then(|b| b.get(author)).and_then(|u| u.manifest.parent);
            if let Some(parent) = parents.get(author).copied().flatten().or_else(buffered) {
                *counts.entry(parent).or_default() += 1;
            }
        }
        let Some((&most, _)) = counts.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))) else { return Ok(None) };
        if most == mine {
            return Ok(None);
        }
        tracing::info!(round, start = %most, "most of the round's inputs trained from another start: taking it");
        let taken = self.take_state(most).await?;
        if taken.is_none() {
            tracing::warn!(round, start = %most, "no peer served the start most inputs trained from; staying on this node's own");
        }
        Ok(taken)
    }

    /// Once a round (`tried`): if this node is overtaken, the round to
    /// train next and the newest average to train it from.
    pub(super) async fn rejoin_if_overtaken(&mut self, round: u64, members: usize, tried: &mut bool) -> Result<Option<(u64, Tensors)>, EngineError> {
        if *tried || !self.overtaken(round, members) {
            return Ok(None);
        }
        *tried = true;
        self.catch_up(Some(round)).await
    }

    /// Most of the round's other members published updates two rounds or
    /// more after `round` (a majority, so that one peer's claim to be ahead
    /// moves nobody): this node was cut off or slow, and rejoins from their
    /// newest average instead of finishing a round they left behind.
    /// The newest round each author signed counts, not only the updates
    /// buffered: an update too far ahead of this node's round is not kept
    /// (a partitioned node's peers may be three rounds on), yet it is what
    /// shows that this node fell behind.
    pub(super) fn overtaken(&self, round: u64, members: usize) -> bool {
        let ahead = self.heard.recent_authors.values().filter(|newest| **newest >= round.saturating_add(2)).count();
        let others = members.saturating_sub(1).max(1);
        ahead.saturating_mul(2) >= others
    }
}
