//! Gossip in: every manifest, chunk and piece of evidence on a run's
//! topics is validated before gossipsub forwards it (signature, run,
//! allowlist, quarantine, equivocation), and invalid ones cost the sender
//! peer score. Also the topics themselves: joining and leaving a run.

use std::time::Instant;

use libp2p::{PeerId, gossipsub};

use crate::wire::codec::{ChunkMessage, Digest};
use crate::wire::evidence::Equivocation;
use crate::wire::manifest::{Manifest, ManifestKind, SignedManifest};

use super::{EventLoop, Exchange, NetworkEvent};
use crate::p2p::behaviour;
use crate::p2p::chunk_protocol::ChunkRequest;
use crate::p2p::payload::PayloadKind;

/// A run's topics, named by a hash of `blossom/<run id>/…` that every
/// message carries: 44 bytes instead of 82.
pub(super) fn topics(run_id: &Digest) -> (gossipsub::Sha256Topic, gossipsub::Sha256Topic) {
    let hex = run_id.to_hex();
    (
        gossipsub::Sha256Topic::new(format!("blossom/{hex}/manifests")),
        gossipsub::Sha256Topic::new(format!("blossom/{hex}/chunks")),
    )
}

/// A run's topic for evidence of misbehaviour (rare, small messages).
pub(super) fn evidence_topic(run_id: &Digest) -> gossipsub::Sha256Topic {
    gossipsub::Sha256Topic::new(format!("blossom/{}/evidence", run_id.to_hex()))
}

/// First update manifests remembered to catch equivocation, at most.
pub(super) const MAX_FIRST_UPDATES: usize = 1 << 16;

/// Verified manifests remembered by the hash of their signed bytes, so that
/// one offered again (by every peer asked for a round) costs a hash, not a
/// signature check and a store write.
pub(super) const MAX_VERIFIED_MANIFESTS: usize = 1 << 14;

/// Why a gossiped or offered message was refused, and whether the peer
/// that sent it is to blame. An honest forwarder may pass on what only
/// this node knows to refuse (a manifest by a peer it quarantined a moment
/// ago, the second of two updates it saw in the other order): gossipsub
/// must not score it down for that, or the honest mesh falls apart.
pub(super) struct Refusal {
    pub(super) reason: String,
    pub(super) sender_at_fault: bool,
}

impl Refusal {
    pub(super) fn innocent(reason: String) -> Self {
        Self { reason, sender_at_fault: false }
    }
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Self { reason, sender_at_fault: true }
    }
}

impl EventLoop {
    pub(super) async fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        self.count_received(message.data.len());
        let verdict = if let Some(run_id) = self.manifest_topics.get(&message.topic).copied() {
            match self.accept_manifest(&message.data, Some(run_id), Some(source)).await {
                Ok(()) => Ok(true),
                Err(refusal) if refusal.sender_at_fault => Err(refusal.reason),
                Err(refusal) => {
                    tracing::debug!(peer = %source, reason = %refusal.reason, "ignored a gossip message");
                    Ok(false)
                }
            }
        } else if self.chunk_topics.contains(&message.topic) {
            self.traffic.count_kind(PayloadKind::GossipChunks, message.data.len());
            self.accept_chunk_message(&message.data).await
        } else if let Some(run_id) = self.evidence_topics.get(&message.topic).copied() {
            self.traffic.count_kind(PayloadKind::Evidence, message.data.len());
            self.accept_evidence(&message.data, run_id).await.map(|()| true)
        } else {
            Err("message on a topic this node did not join".to_owned())
        };
        let acceptance = match &verdict {
            Ok(true) => gossipsub::MessageAcceptance::Accept,
            // Not checkable yet: neither forwarded nor held against the sender.
            Ok(false) => gossipsub::MessageAcceptance::Ignore,
            Err(_) => gossipsub::MessageAcceptance::Reject,
        };
        self.swarm.behaviour_mut().gossipsub.report_message_validation_result(&id, &source, acceptance);
        if let Err(reason) = verdict {
            tracing::warn!(peer = %source, %reason, "rejected a gossip message");
            self.emit(NetworkEvent::Rejected { peer: source, reason });
        }
    }

    /// Verifies a signed manifest (gossiped on `topic_run`'s topic, or
    /// offered in answer to a request: `None`), keeps it, and starts
    /// assembling its adapter.
    pub(super) async fn accept_manifest(&mut self, bytes: &[u8], topic_run: Option<Digest>, source: Option<PeerId>) -> Result<(), Refusal> {
        let signed = SignedManifest::from_bytes(bytes).map_err(|e| e.to_string())?;
        let digest = Digest::of(bytes);
        // Remembered as verified only once stored (below).
        let (manifest, author, kept) = self.check_signature(&signed, &digest)?;
        if topic_run.is_some() {
            self.traffic.count_kind(PayloadKind::of_manifest(manifest.kind), bytes.len());
        }
        match topic_run {
            Some(run_id) if manifest.run_id != run_id => {
                return Err(Refusal::from(format!("manifest for run {:?} on the topic of run {run_id:?}", manifest.run_id)));
            }
            // Offered in answer to a request: it must be for a run this node joined.
            None if !self.joined(&manifest.run_id) => {
                return Err(Refusal::from(format!("a manifest for run {:?}, which this node did not join", manifest.run_id)));
            }
            _ => {}
        }
        if self.allowed_peers.as_ref().is_some_and(|allowed| !allowed.contains(&author)) {
            return Err(Refusal::from(format!("manifest by {author}, who is not in this run's allowlist")));
        }
        if let Some(why) = self.quarantined.get(&author) {
            return Err(Refusal::innocent(format!("manifest by {author}, quarantined for {why}")));
        }
        if manifest.kind == ManifestKind::Update
            && let Some(evidence) = self.equivocation(&manifest, author, &signed)
        {
            self.convict(evidence).await;
            // A forwarder may well have seen this one first.
            return Err(Refusal::innocent(format!("a second, different update for round {} by {author}: equivocation", manifest.round)));
        }
        if manifest.kind == ManifestKind::Average {
            return Err(Refusal::from(format!("an average of round {} offered without its certificate", manifest.round)));
        }
        if !kept {
            self.store.cache_manifest(manifest.round, &signed).map_err(|e| e.to_string())?;
            self.remember_verified(digest, &manifest, author);
        }
        self.remember_addresses(author, &manifest.addresses);
        self.reach_behind_nat(author);
        if manifest.kind == ManifestKind::Attestation {
            // Kept in the store: this node's own average of the round may
            // come later, and then counts it.
            if let Some(news) = self.certifier.attest(&manifest, author, &signed) {
                self.emit(NetworkEvent::Certified(news));
            } else if self.certifier.should_ask(&manifest, author, Instant::now()) {
                // The forwarder, connected, validated it and so counted it
                // towards its own certificate of that round.
                for peer in std::iter::once(author).chain(source.filter(|s| *s != author)) {
                    self.swarm.behaviour_mut().chunks.send_request(&peer, ChunkRequest::Latest(manifest.run_id));
                }
            }
            return Ok(());
        }
        if manifest.kind == ManifestKind::Members {
            // Nothing to assemble: the announcement is the whole message.
            self.emit(NetworkEvent::Manifest { manifest, author });
            return Ok(());
        }
        self.remember_latest(&manifest, &signed);
        self.known.insert(manifest.adapter_hash, (manifest.round, manifest.chunk_ids.clone()));
        let reduce_run = self.reduce_runs.contains(&manifest.run_id);
        let rooted_or_claim = manifest.chunk_root.is_some() || manifest.kind == ManifestKind::Slice;
        if (manifest.kind == ManifestKind::Update && reduce_run) || (rooted_or_claim && !reduce_run) {
            // The slice owners fetch what they need of an update. A node in
            // the gossip exchange (a seeding relay, say) can assemble neither
            // an update named by its root (its chunks are never gossiped) nor
            // a claim's slices: it fetches nothing for them.
            self.emit(NetworkEvent::Manifest { manifest, author });
            return Ok(());
        }
        self.assemble(manifest, author, source).await;
        Ok(())
    }

    /// A manifest `peer` offered in answer to a request.
    pub(super) async fn take_offered_manifest(&mut self, bytes: &[u8], peer: PeerId) {
        match self.accept_manifest(bytes, None, Some(peer)).await {
            Ok(()) => {}
            Err(refusal) if refusal.sender_at_fault => self.emit(NetworkEvent::Rejected { peer, reason: refusal.reason }),
            Err(refusal) => tracing::debug!(%peer, reason = %refusal.reason, "ignored an offered manifest"),
        }
    }

    /// Whether this node already published another update for the round
    /// of `manifest`: its store keeps every update it published (`keep`),
    /// in this process or before a restart.
    pub(super) fn published_another(&mut self, manifest: &Manifest) -> bool {
        let me = *self.swarm.local_peer_id();
        self.store.manifests(manifest.round).unwrap_or_default().into_iter().any(|stored| {
            let Ok(bytes) = stored.to_bytes() else { return false };
            self.verified(&stored, &bytes)
                .is_some_and(|(m, author)| author == me && m.kind == ManifestKind::Update && m.run_id == manifest.run_id && m.adapter_hash != manifest.adapter_hash)
        })
    }

    /// Remembers the first update of each (run, round, author); a second,
    /// different one returns the evidence of equivocation.
    pub(super) fn equivocation(&mut self, manifest: &Manifest, author: PeerId, signed: &SignedManifest) -> Option<Equivocation> {
        let key = (manifest.run_id, manifest.round, author);
        match self.first_updates.get(&key) {
            Some(first) => {
                let evidence = Equivocation { first: first.clone(), second: signed.clone() };
                evidence.verify(&self.limits).is_ok().then_some(evidence)
            }
            None => {
                if self.first_updates.len() < MAX_FIRST_UPDATES {
                    self.first_updates.insert(key, signed.clone());
                }
                None
            }
        }
    }

    /// Acts on checked evidence: quarantines its author and gossips the
    /// evidence, so that peers that saw only one of the two updates learn it.
    pub(super) async fn convict(&mut self, evidence: Equivocation) {
        let Ok(proven) = evidence.verify(&self.limits) else { return };
        if self.quarantined.contains_key(&proven.peer) || proven.peer == *self.swarm.local_peer_id() {
            return;
        }
        if let Ok(bytes) = evidence.to_bytes() {
            let size = bytes.len();
            if self.swarm.behaviour_mut().gossipsub.publish(evidence_topic(&proven.run_id), bytes).is_ok() {
                self.count_sent(size);
            }
        }
        self.quarantine(proven.peer, proven.reason.clone());
        self.emit(NetworkEvent::Quarantined { peer: proven.peer, reason: proven.reason });
    }

    /// Closes and refuses `peer`'s connections, and accepts nothing it signs.
    pub(super) fn quarantine(&mut self, peer: PeerId, reason: String) {
        tracing::warn!(%peer, %reason, "quarantined");
        self.swarm.behaviour_mut().blocked.block_peer(peer);
        self.swarm.behaviour_mut().gossipsub.blacklist_peer(&peer);
        self.first_updates.retain(|(_, _, author), _| *author != peer);
        self.quarantined.entry(peer).or_insert(reason);
    }

    /// Gossiped evidence for `run_id`: checked here before anything is done
    /// with it (a forwarder cannot make it up: it needs the accused's keys).
    pub(super) async fn accept_evidence(&mut self, bytes: &[u8], run_id: Digest) -> Result<(), String> {
        let evidence = Equivocation::from_bytes(bytes)?;
        let proven = evidence.verify(&self.limits)?;
        if proven.run_id != run_id {
            return Err(format!("evidence for run {:?} on the topic of run {run_id:?}", proven.run_id));
        }
        self.convict(evidence).await;
        Ok(())
    }

    /// A gossiped chunk: checked against its manifest when that is known
    /// (`Ok(true)`: forward), kept unchecked otherwise (`Ok(false)`: not
    /// forwarded; the manifest, once it comes, decides whether it is used).
    pub(super) async fn accept_chunk_message(&mut self, data: &[u8]) -> Result<bool, String> {
        let message = ChunkMessage::from_bytes(data).map_err(|e| e.to_string())?;
        match self.known.get(&message.adapter_hash) {
            Some((_, ids)) => {
                let expected = ids.get(message.index as usize).copied();
                if expected != Some(Digest::of(&message.bytes)) {
                    return Err(format!("chunk {} of adapter {:?} does not match its manifest", message.index, message.adapter_hash));
                }
                self.accept_chunk(&message.bytes).await?;
                Ok(true)
            }
            None => {
                self.accept_chunk(&message.bytes).await?;
                Ok(false)
            }
        }
    }

    pub(super) async fn accept_chunk(&mut self, bytes: &[u8]) -> Result<(), String> {
        let id = Digest::of(bytes);
        self.store.cache_chunk(&id, bytes).map_err(|e| e.to_string())?;
        self.complete_waiting_on(&[id]);
        Ok(())
    }

    /// A stored manifest (`bytes` its encoding) checked, once.
    pub(super) fn verified(&mut self, signed: &SignedManifest, bytes: &[u8]) -> Option<(Manifest, PeerId)> {
        let digest = Digest::of(bytes);
        let (manifest, author, known) = self.check_signature(signed, &digest).ok()?;
        if !known {
            self.remember_verified(digest, &manifest, author);
        }
        Some((manifest, author))
    }

    /// `signed` (whose encoding hashes to `digest`) checked: its manifest,
    /// its author, and whether it was checked and kept before (then the
    /// check is a lookup).
    pub(super) fn check_signature(&self, signed: &SignedManifest, digest: &Digest) -> Result<(Manifest, PeerId, bool), String> {
        if let Some((_, manifest, author)) = self.verified_manifests.get(digest) {
            return Ok((manifest.clone(), *author, true));
        }
        let (manifest, author) = signed.verify(&self.limits).map_err(|e| e.to_string())?;
        Ok((manifest, author, false))
    }

    pub(super) fn remember_verified(&mut self, digest: Digest, manifest: &Manifest, author: PeerId) {
        if self.verified_manifests.len() < MAX_VERIFIED_MANIFESTS {
            self.verified_manifests.insert(digest, (manifest.round, manifest.clone(), author));
        }
    }

    /// Whether this node joined `run_id` (it holds the run's manifest topic).
    pub(super) fn joined(&self, run_id: &Digest) -> bool {
        self.manifest_topics.values().any(|r| r == run_id)
    }

    /// Joins a run's manifest, chunk and evidence topics, with peer scoring.
    pub(super) fn subscribe(&mut self, run_id: Digest, exchange: Exchange) -> Result<(), String> {
        if exchange == Exchange::Reduce {
            self.reduce_runs.insert(run_id);
        }
        let (manifests, chunks) = topics(&run_id);
        let evidence = evidence_topic(&run_id);
        let gossip = &mut self.swarm.behaviour_mut().gossipsub;
        let result = gossip
            .subscribe(&manifests)
            .and_then(|_| gossip.subscribe(&chunks))
            .and_then(|_| gossip.subscribe(&evidence))
            .map(|_| ())
            .map_err(|e| format!("subscribe: {e}"));
        for topic in [&manifests, &chunks, &evidence] {
            if let Err(e) = gossip.set_topic_params(topic.clone(), behaviour::topic_score_params()) {
                tracing::error!(error = e, "peer scoring is off for a run topic");
            }
        }
        self.manifest_topics.insert(manifests.hash(), run_id);
        self.chunk_topics.insert(chunks.hash());
        self.evidence_topics.insert(evidence.hash(), run_id);
        result
    }

    /// Leaves a run's topics.
    pub(super) fn unsubscribe(&mut self, run_id: Digest) {
        let (manifests, chunks) = topics(&run_id);
        let gossip = &mut self.swarm.behaviour_mut().gossipsub;
        gossip.unsubscribe(&manifests);
        gossip.unsubscribe(&chunks);
        gossip.unsubscribe(&evidence_topic(&run_id));
        self.evidence_topics.retain(|_, run| *run != run_id);
        self.manifest_topics.remove(&manifests.hash());
        self.chunk_topics.remove(&chunks.hash());
        self.reduce_runs.remove(&run_id);
    }
}
