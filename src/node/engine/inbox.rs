//! Network events in (docs/PROTOCOL.md, "A round"): updates, slice
//! claims, round-0 announcements and certificates, each checked against
//! what every node can check for itself and kept in bounded memory while
//! the engine trains, waits or averages.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use libp2p::PeerId;

use crate::p2p::chunk_protocol::{HeldManifest, held_key};
use crate::p2p::network::{Exchange, NetworkEvent};
use crate::wire::manifest::{Manifest, ManifestKind};
use crate::wire::compression::Compression;
use crate::wire::tensors::decode_checked_as;

use super::{Engine, Update};
use super::catch_up::Candidate;
use super::events::{EngineError, EngineEvent};
use super::quarantine::Conviction;
use super::trainer::RoundTrainer;

/// How many rounds ahead of this node updates are kept.
/// What peers published that this node keeps from round to round.
#[derive(Default)]
pub(super) struct Heard {
    /// Updates by round and author.
    pub(super) buffered: BTreeMap<u64, BTreeMap<PeerId, Update>>,
    /// The newest round each peer published an update for: who is active.
    pub(super) recent_authors: HashMap<PeerId, u64>,
    /// Connected peers that never published and let a round's deadline
    /// pass. They are not waited for again until they publish: a silent
    /// subscriber costs the run one deadline, not one a round.
    pub(super) silent: HashSet<PeerId>,
    /// Peers that announced themselves as members of round 0.
    pub(super) announced: BTreeSet<PeerId>,
}

pub(super) const LOOKAHEAD: u64 = 2;

impl<T: RoundTrainer> Engine<T> {
    /// Asks peers for `round`'s updates (and round 0's announcements) that
    /// this node lacks: it names those it holds (its buffered ones, those
    /// of `holding`, its own), and peers leave them out of their answers.
    pub(super) async fn ask_round(&self, round: u64, holding: impl IntoIterator<Item = PeerId>) -> Result<(), EngineError> {
        let me = self.me();
        let buffered = self.heard.buffered.get(&round).into_iter().flat_map(|b| b.keys().copied());
        let mut held: Vec<HeldManifest> = buffered.chain(holding).chain([me]).map(|a| held_key(ManifestKind::Update, &a)).collect();
        if round == 0 {
            held.extend(self.heard.announced.iter().chain([&me]).map(|a| held_key(ManifestKind::Members, a)));
        }
        held.sort_unstable();
        held.dedup();
        self.net.ask_round(self.settings.run_id, round, held).await.map_err(|e| EngineError::Network(e.to_string()))
    }

    /// Handles one network event: buffers updates of rounds
    /// `from..=from+LOOKAHEAD` (while catching up, `from` is unknown, the
    /// newest rounds are kept and the newest average is remembered),
    /// reports rejections.
    pub(super) fn on_network_event(&mut self, event: NetworkEvent, from: Option<u64>) {
        let (manifest, author, bytes) = match event {
            NetworkEvent::AdapterReady { manifest, author, bytes } => (manifest, author, Some(bytes)),
            NetworkEvent::Manifest { manifest, author } => match manifest.kind {
                ManifestKind::Members => return self.on_announcement(&manifest, author),
                // In the reduce exchange an update is only its manifest here;
                // a slice claim is kept as it comes (its chunk follows).
                ManifestKind::Update if self.settings.exchange == Exchange::Reduce => (manifest, author, None),
                ManifestKind::Slice => return self.on_claim(&manifest, author, from),
                ManifestKind::Update | ManifestKind::Average | ManifestKind::Attestation => return,
            },
            NetworkEvent::Certified(news) => return self.on_certified(news),
            NetworkEvent::Quarantined { peer, reason } => return self.quarantine(peer, reason, Conviction::Public),
            NetworkEvent::Rejected { peer, reason } => return self.report(EngineEvent::Rejected { peer, reason }),
            NetworkEvent::Listening(addr) => return self.report(EngineEvent::Listening(addr)),
            NetworkEvent::PeerConnected(peer) => return self.report(EngineEvent::PeerConnected(peer)),
            NetworkEvent::DialFailed { peer, error } => return tracing::debug!(?peer, %error, "a dial failed"),
        };
        if manifest.run_id != self.settings.run_id || author == self.me() || self.verdicts.excluded.contains_key(&author) {
            return;
        }
        if let Err(reason) = self.check_claims(&manifest) {
            // No honest node signs this: the signed manifest is the proof.
            tracing::warn!(peer = %author, round = manifest.round, %reason, "rejected an adapter");
            self.report(EngineEvent::Rejected { peer: author, reason: reason.clone() });
            return self.quarantine(author, reason, Conviction::Public);
        }
        if manifest.kind == ManifestKind::Slice {
            if let Some(bytes) = bytes.filter(|_| in_window(manifest.round, from)) {
                self.keep_slice_results(&manifest, &bytes);
            }
            return;
        }
        // An average is a whole outer state (the adapter, and its momentum
        // where the outer step keeps one); an update is an adapter.
        let (layout, compression) = if manifest.kind == ManifestKind::Average { (&self.state_layout, Compression::None) } else { (&self.layout, self.settings.compression) };
        let tensors = match bytes.map(|b| decode_checked_as(&b, layout, compression, &self.settings.limits)).transpose() {
            Ok(t) => t,
            Err(reason) => {
                tracing::warn!(peer = %author, round = manifest.round, %reason, "rejected an adapter");
                return self.report(EngineEvent::Rejected { peer: author, reason });
            }
        };
        if manifest.kind == ManifestKind::Average {
            // Averages come inside certificates (the network checked them;
            // the one backed by the most signers wins), or as the state a
            // node asked for by its hash (`take_state`: the hash is the check).
            let hash = manifest.adapter_hash;
            let certified = self.offers.offered.get(&hash).copied().filter(|(_, round)| *round == manifest.round);
            let rank = match (self.offers.wanted, certified) {
                (Some(wanted), _) if wanted == hash => Some(certified.unwrap_or((0, manifest.round))),
                (None, Some(rank)) if self.offers.candidate.as_ref().is_none_or(|c| rank > c.rank) => Some(rank),
                _ => None,
            };
            if let Some(tensors) = tensors
                && from.is_none()
                && let Some(rank) = rank
            {
                self.offers.candidate = Some(Candidate { rank, round: manifest.round, hash, tensors });
            }
            return;
        }
        let newest = self.heard.recent_authors.entry(author).or_insert(manifest.round);
        *newest = (*newest).max(manifest.round);
        self.heard.silent.remove(&author);
        // Never average a stale adapter into a newer round.
        if let Some(from) = from
            && let last = from.saturating_add(LOOKAHEAD)
            && (manifest.round < from || manifest.round > last)
        {
            let reason = format!("round {} outside the round window {from}..={last}", manifest.round);
            tracing::debug!(peer = %author, %reason, "ignored an update");
            return self.report(EngineEvent::Rejected { peer: author, reason });
        }
        let round = self.heard.buffered.entry(manifest.round).or_default();
        match round.get(&author) {
            Some(existing) if existing.manifest.adapter_hash != manifest.adapter_hash => {
                let reason = format!("a second, different update for round {}", manifest.round);
                self.report(EngineEvent::Rejected { peer: author, reason });
            }
            Some(_) => {}
            None => {
                round.insert(author, Update { manifest, tensors });
            }
        }
        bound_rounds(&mut self.heard.buffered, from);
    }

    /// What a peer's manifest says that every node can check for itself:
    /// its round is one of the run's (so no round arithmetic can overflow,
    /// and a forged "average of round 1000" in a 10-round run is refused),
    /// and its example count is one an honest node can produce.
    pub(super) fn check_claims(&self, manifest: &Manifest) -> Result<(), String> {
        if manifest.round >= self.settings.rounds {
            return Err(format!(
                "round {} outside the round window 0..={} of the run",
                manifest.round,
                self.settings.rounds.saturating_sub(1)
            ));
        }
        let full = self.settings.examples_per_round;
        if manifest.kind == ManifestKind::Update && manifest.examples != 0 && manifest.examples != full {
            return Err(format!(
                "claims {} examples for its round; an update is trained on {full} (steps × accumulation × batch) or 0: wrong weight",
                manifest.examples
            ));
        }
        Ok(())
    }

    /// Runs `work` while handling network events (the event channel is
    /// bounded: leaving it undrained would stall the swarm).
    pub(super) async fn while_listening<R>(&mut self, work: impl Future<Output = R>, round: Option<u64>) -> Result<R, EngineError> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                result = &mut work => return Ok(result),
                event = self.events.recv() => match event {
                    Some(event) => self.on_network_event(event, round),
                    None => return Err(EngineError::Network("the network task stopped".into())),
                },
            }
        }
    }

    pub(super) async fn sleep_listening(&mut self, duration: Duration, round: Option<u64>) -> Result<(), EngineError> {
        self.while_listening(tokio::time::sleep(duration), round).await
    }
}

/// Bounded memory whatever peers claim: at most `LOOKAHEAD + 1` rounds of
/// updates. A node catching up (`from` unknown) keeps the newest rounds; one
/// in a round keeps that round (its own update is there) and drops the
/// farthest ahead, which a catch-up may have taken in beyond its window
/// (dropping the oldest lost a node's own update after a catch-up found no
/// average: the node then left itself out of its round).
pub(super) fn bound_rounds<V>(buffered: &mut BTreeMap<u64, V>, from: Option<u64>) {
    while buffered.len() > LOOKAHEAD as usize + 1 {
        match from {
            Some(_) => buffered.pop_last(),
            None => buffered.pop_first(),
        };
    }
}

/// Whether `round` lies in the window `from..=from+LOOKAHEAD` of a node in
/// round `from` (never while catching up, when `from` is unknown).
pub(super) fn in_window(round: u64, from: Option<u64>) -> bool {
    from.is_some_and(|r| round >= r && round <= r.saturating_add(LOOKAHEAD))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::bound_rounds;

    #[test]
    fn a_node_in_a_round_keeps_it_when_updates_from_far_ahead_are_held() {
        // A catch-up took in rounds 4 to 6; the node then published in round 3.
        let mut buffered: BTreeMap<u64, &str> = (3..=6).map(|r| (r, "updates")).collect();
        bound_rounds(&mut buffered, Some(3));
        assert_eq!(buffered.keys().copied().collect::<Vec<_>>(), vec![3, 4, 5]);
        // Catching up, the newest rounds are what counts.
        let mut buffered: BTreeMap<u64, &str> = (3..=6).map(|r| (r, "updates")).collect();
        bound_rounds(&mut buffered, None);
        assert_eq!(buffered.keys().copied().collect::<Vec<_>>(), vec![4, 5, 6]);
    }
}
