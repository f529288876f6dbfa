//! Who takes part: round 0's settled member list (docs/PROTOCOL.md,
//! "Round 0"), later rounds' members, which rows each trains on, and
//! whether most members are one round behind.

use std::collections::BTreeSet;
use std::time::Duration;

use libp2p::PeerId;

use crate::p2p::network::NetworkError;
use crate::wire::inputs;
use crate::wire::codec::Digest;
use crate::wire::manifest::{Manifest, ManifestKind};

use super::Engine;
use super::events::{EngineError, EngineEvent, MemberView};
use super::settings::PartitionMode;
use crate::node::misbehaviour::Misbehaviour;
use crate::node::partition::{hash_partition, hash_partition_sizes, static_partition};
use super::trainer::RoundTrainer;

/// Round-0 member announcements kept at most (each needs its own key, but
/// keys are free: memory stays bounded whatever peers send).
pub(super) const MAX_ANNOUNCED: usize = 4096;

/// How many times (a second apart) a node asks for round 0's announcements
/// when its peers trained with a member list it cannot make up yet.
pub(super) const ROUND_ZERO_ASKS: usize = 10;

impl<T: RoundTrainer> Engine<T> {
    /// Keeps a round-0 member announcement of this run (verified by the
    /// network: round 0, no adapter); other manifests come with their bytes.
    pub(super) fn on_announcement(&mut self, manifest: &Manifest, author: PeerId) {
        let ours = manifest.run_id == self.settings.run_id && author != self.me();
        if manifest.kind == ManifestKind::Members && ours && self.heard.announced.len() < MAX_ANNOUNCED {
            self.heard.announced.insert(author);
        }
    }

    /// The round's members, whose updates the quorum waits for (sorted, with
    /// this node): peers that published an update for the previous round or
    /// this one, and every connected peer of the run. Waiting for connected
    /// peers that have not published yet (a late joiner still catching up, a
    /// node one round behind) keeps all nodes in step: without it such a
    /// node's updates always arrived after its peers had closed the round,
    /// and it stayed one round out of phase, averaging other sets of updates,
    /// for the rest of the run.
    ///
    /// A connected peer that never published and let a deadline pass is left
    /// out until it publishes (`silent`): one that subscribes and never
    /// publishes costs the run one deadline, not one a round.
    pub(super) async fn members(&self, round: u64) -> Result<Vec<PeerId>, EngineError> {
        let mut members: Vec<PeerId> = self.heard.recent_authors.iter().filter(|(_, r)| r.saturating_add(1) >= round).map(|(p, _)| *p).collect();
        let connected = self.net.run_peers(self.settings.run_id).await.map_err(|e| EngineError::Network(e.to_string()))?;
        members.extend(connected.into_iter().filter(|peer| !self.heard.silent.contains(peer)));
        members.retain(|peer| !self.verdicts.excluded.contains_key(peer));
        members.push(self.me());
        members.sort();
        members.dedup();
        Ok(members)
    }

    /// Round 0's members, the same list on every node (docs/PROTOCOL.md,
    /// "Round 0"): this node announces itself, waits until `min_members`
    /// members (itself included) have, then one grace period more for
    /// announcements still in flight; the list is everyone who announced.
    /// Round-0 updates name the list their authors trained with: a node
    /// whose peers' list leaves it out (it came after they settled) stays
    /// off its own too, and averages round 0 without training in it.
    pub(super) async fn round_zero_members(&mut self) -> Result<Vec<PeerId>, EngineError> {
        let run_id = self.settings.run_id;
        let hello = Manifest::hello(run_id, &self.me());
        let signed = self.sign(&hello)?;
        let announce = self.settings.misbehaviour != Some(Misbehaviour::Silent);
        match if announce { self.net.publish(signed, hello, Vec::new()).await } else { Ok(()) } {
            Err(e @ NetworkError::Store(_)) => return Err(EngineError::Network(e.to_string())),
            // No peer yet: they find the announcement by asking (below).
            Err(e) => tracing::debug!(error = %e, "announcement not gossiped"),
            Ok(()) => {}
        }
        let wanted = self.settings.min_members.max(1);
        let mut shown = 0;
        // Like Flower's server, a run waits for its members as long as it
        // takes (the operator stops it); each pass asks connected peers for
        // round 0's announcements and updates, which reach a node that
        // subscribed after they were gossiped.
        loop {
            let known = self.heard.announced.len() + 1;
            if known >= wanted || self.round_zero_under_way() {
                break;
            }
            if known != shown {
                tracing::info!(known, wanted, "waiting for peers");
                self.report(EngineEvent::Waiting { known, wanted });
                shown = known;
            }
            self.ask_round(0, []).await?;
            self.sleep_listening(Duration::from_secs(1), Some(0)).await?;
        }
        let mut clock = self.settings.clock.clone();
        let grace = self.settings.grace;
        self.while_listening(clock.wait(grace), Some(0)).await?;
        let mut asks = 0;
        let (with_me, others, lists) = loop {
            let others: Vec<PeerId> = self.heard.announced.iter().copied().collect();
            let mut with_me = others.clone();
            with_me.push(self.me());
            with_me.sort();
            // Round-0 updates already here say which list their authors
            // trained with: this node is on it, or came too late for it.
            let lists: BTreeSet<Digest> = self.heard.buffered.get(&0).map(|u| u.values().filter_map(|u| u.manifest.members).collect()).unwrap_or_default();
            let known = lists.is_empty() || lists.contains(&members_digest(&with_me)) || lists.contains(&members_digest(&others));
            // Neither: announcements its peers saw are still on their way
            // here (a large network starting at once). Asked for, so that
            // this node trains with its peers' list instead of adopting
            // their inputs later, which costs the round a second pass.
            if known || asks == ROUND_ZERO_ASKS {
                break (with_me, others, lists);
            }
            asks += 1;
            self.ask_round(0, []).await?;
            self.sleep_listening(Duration::from_secs(1), Some(0)).await?;
        };
        let member = lists.contains(&members_digest(&with_me)) || !lists.contains(&members_digest(&others));
        let members = if member { with_me } else { others };
        tracing::info!(count = members.len(), member, "round 0 members settled");
        self.report(EngineEvent::Members { count: members.len(), member });
        Ok(members)
    }

    /// Round 0 is under way if peers already published updates for it.
    pub(super) fn round_zero_under_way(&self) -> bool {
        self.heard.buffered.get(&0).is_some_and(|updates| updates.keys().any(|author| *author != self.me()))
    }

    pub(super) fn rows(&self, members: &[PeerId]) -> Vec<u64> {
        match self.settings.partition {
            PartitionMode::Static { id, count } => static_partition(&self.settings.train_rows, id, count),
            PartitionMode::Hash { buckets } => {
                let peers: Vec<Vec<u8>> = members.iter().map(|p| p.to_bytes()).collect();
                hash_partition(&self.settings.fingerprint, &self.settings.train_rows, buckets, &peers, &self.me().to_bytes())
            }
        }
    }

    /// Every member's newest round and share of the rows, for the report.
    pub(super) fn member_views(&self, members: &[PeerId], round: u64) -> Vec<MemberView> {
        let sizes = match self.settings.partition {
            PartitionMode::Hash { buckets } => {
                let peers: Vec<Vec<u8>> = members.iter().map(|p| p.to_bytes()).collect();
                hash_partition_sizes(&self.settings.fingerprint, &self.settings.train_rows, buckets, &peers).into_iter().map(Some).collect()
            }
            PartitionMode::Static { .. } => vec![None; members.len()],
        };
        members
            .iter()
            .zip(sizes)
            .map(|(peer, rows)| MemberView {
                peer: *peer,
                newest_round: if *peer == self.me() { Some(round) } else { self.heard.recent_authors.get(peer).copied() },
                rows,
            })
            .collect()
    }

    /// Whether most of the round's other members are one round behind:
    /// each signed round r−1 and has not sent its update of round r. That
    /// is most members' own word, so one peer cannot hold a round up.
    pub(super) fn ahead_of_members(&self, round: u64, members: &[PeerId]) -> bool {
        let me = self.me();
        let got = self.heard.buffered.get(&round);
        let others: Vec<PeerId> = members.iter().copied().filter(|peer| *peer != me && !self.verdicts.excluded.contains_key(peer)).collect();
        most_one_round_behind(round, &others, |peer| got.is_some_and(|updates| updates.contains_key(peer)), |peer| self.heard.recent_authors.get(peer).copied())
    }
}

/// Whether most of `others` are one round behind `round`: no update of
/// `round` from them is held, and the newest round each signed is the one
/// before.
pub(super) fn most_one_round_behind(round: u64, others: &[PeerId], holds: impl Fn(&PeerId) -> bool, newest: impl Fn(&PeerId) -> Option<u64>) -> bool {
    let behind = others.iter().filter(|peer| !holds(peer) && newest(peer).is_some_and(|signed| signed.saturating_add(1) == round)).count();
    behind.saturating_mul(2) > others.len()
}

/// blake3 of a sorted member list (round-0 updates carry it).
pub(super) fn members_digest(members: &[PeerId]) -> Digest {
    let mut bytes = Vec::new();
    for member in members {
        inputs::push_peer(&mut bytes, &member.to_bytes());
    }
    Digest::of(&bytes)
}

#[cfg(test)]
mod tests {
    use libp2p::PeerId;

    use super::most_one_round_behind;

    #[test]
    fn a_round_waits_only_for_a_majority_one_round_behind() {
        let others: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let others_index = |peer: &PeerId| others.iter().position(|p| p == peer);
        // The newest round each of the four signed.
        let signed = |rounds: [u64; 4]| move |peer: &PeerId| others_index(peer).map(|i| rounds[i]);
        let none_held = |_: &PeerId| false;
        // All four signed round 2 and nothing of round 3: wait.
        assert!(most_one_round_behind(3, &others, none_held, signed([2, 2, 2, 2])));
        // Three of four behind is most; two of four is not.
        assert!(most_one_round_behind(3, &others, none_held, signed([2, 2, 2, 3])));
        assert!(!most_one_round_behind(3, &others, none_held, signed([2, 2, 3, 3])));
        // One peer alone cannot hold a round up.
        assert!(!most_one_round_behind(3, &others, none_held, signed([2, 3, 3, 3])));
        // Peers whose updates of round 3 are here are not behind.
        let held = |peer: &PeerId| others_index(peer).is_some_and(|i| i < 2);
        assert!(!most_one_round_behind(3, &others, held, signed([2, 2, 2, 2])));
        // Peers last heard of two rounds back (gone) are not waited for,
        // nor are peers never heard of.
        assert!(!most_one_round_behind(3, &others, none_held, signed([1, 1, 1, 2])));
        assert!(!most_one_round_behind(3, &others, none_held, |_: &PeerId| None));
        // A node alone waits for nobody.
        assert!(!most_one_round_behind(3, &[], none_held, |_: &PeerId| Some(2)));
    }
}
