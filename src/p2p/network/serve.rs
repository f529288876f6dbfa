//! Serving peers from what this node holds: chunks, pieces and parts of
//! pieces with their proofs, a round's manifests, the run's certificate
//! (and the averages it keeps and certifies); what the store forgets.

use std::collections::HashSet;

use libp2p::PeerId;

use crate::wire::{chunk_part, merkle};
use crate::wire::certificate::Certificate;
use crate::wire::codec::Digest;
use crate::wire::manifest::{Manifest, ManifestKind, SignedManifest};

use super::{Average, EventLoop, NetworkError, NetworkEvent};
use super::gossip::topics;
use crate::p2p::certify::CertificateNews;
use crate::p2p::chunk_protocol::{ChunkRequest, ChunkResponse, HeldManifest, MAX_ROUND_MANIFESTS, held_key};
use crate::p2p::payload::PayloadKind;

pub(super) fn response_size(response: &ChunkResponse) -> usize {
    match response {
        ChunkResponse::Chunk(bytes) | ChunkResponse::Manifest(bytes) | ChunkResponse::Certificate(bytes) => bytes.len(),
        ChunkResponse::Manifests(list) => list.iter().map(Vec::len).sum(),
        ChunkResponse::Piece(bytes, proof) => bytes.len() + 32 * proof.len(),
        ChunkResponse::PieceRange(_, proof, slice) => 32 + 32 * proof.len() + slice.len(),
        ChunkResponse::NotFound => 0,
    }
}

/// What an answer carried (`Latest` is answered with a certificate, or
/// with a manifest when the peer holds none).
pub(super) fn response_kind(response: &ChunkResponse) -> Option<PayloadKind> {
    match response {
        ChunkResponse::Chunk(_) => Some(PayloadKind::Chunks),
        ChunkResponse::Piece(..) => Some(PayloadKind::Pieces),
        ChunkResponse::PieceRange(..) => Some(PayloadKind::AuditParts),
        ChunkResponse::Manifests(_) => Some(PayloadKind::RoundAnswers),
        ChunkResponse::Manifest(_) | ChunkResponse::Certificate(_) => Some(PayloadKind::Certificates),
        ChunkResponse::NotFound => None,
    }
}

/// Pieces fetched and kept to serve on, at most.
pub(super) const MAX_PROVEN: usize = 1 << 16;

impl EventLoop {
    /// Chunk `index` of a rooted adapter, its id and its proof, if this
    /// node holds it: its own (it has every id) or one it fetched (it kept
    /// the proof).
    pub(super) fn held_piece(&mut self, adapter: Digest, index: u32) -> Option<(Digest, Vec<u8>, Vec<Digest>)> {
        let (id, proof) = match self.rooted.get(&adapter) {
            Some((_, ids)) => (*ids.get(index as usize)?, merkle::proof(ids, index as usize)?),
            None => self.proven.get(&(adapter, index)).map(|(_, id, proof)| (*id, proof.clone()))?,
        };
        let bytes = self.store.get_chunk(&id).ok()??;
        Some((id, bytes, proof))
    }

    /// Chunk `index` of a rooted adapter with its proof, if this node holds it.
    pub(super) fn piece(&mut self, adapter: Digest, index: u32) -> ChunkResponse {
        match self.held_piece(adapter, index) {
            Some((_, bytes, proof)) => ChunkResponse::Piece(bytes, proof),
            None => ChunkResponse::NotFound,
        }
    }

    /// Bytes `start..start + len` of chunk `index` of a rooted adapter, if
    /// this node holds the chunk: its id, its proof and a bao slice of them.
    pub(super) fn piece_range(&mut self, adapter: Digest, index: u32, start: u32, len: u32) -> ChunkResponse {
        let held = self.held_piece(adapter, index);
        match held.and_then(|(id, bytes, proof)| Some((id, proof, chunk_part::prove(&bytes, start, len)?))) {
            Some((id, proof, slice)) => ChunkResponse::PieceRange(id, proof, slice),
            None => ChunkResponse::NotFound,
        }
    }

    /// The update manifests (and, for round 0, member announcements) of
    /// (run, round) this node holds, less those the asker holds (`held`),
    /// as many as fit.
    pub(super) fn round_manifests(&mut self, run_id: Digest, round: u64, held: &[HeldManifest]) -> ChunkResponse {
        let held: HashSet<&HeldManifest> = held.iter().collect();
        let mut list = Vec::new();
        let mut size = 0;
        for signed in self.store.manifests(round).unwrap_or_default() {
            let Ok(bytes) = signed.to_bytes() else { continue };
            let Some((manifest, author)) = self.verified(&signed, &bytes) else { continue };
            if manifest.run_id != run_id || !matches!(manifest.kind, ManifestKind::Update | ManifestKind::Members) || held.contains(&held_key(manifest.kind, &author)) {
                continue;
            }
            if size + bytes.len() > MAX_ROUND_MANIFESTS {
                break;
            }
            size += bytes.len();
            list.push(bytes);
        }
        if list.is_empty() { ChunkResponse::NotFound } else { ChunkResponse::Manifests(list) }
    }

    /// Keeps this node's average of a round (`NetworkHandle::keep_average`)
    /// and gossips its attestation; attestations of the round already
    /// stored (peers that averaged first) count at once.
    pub(super) async fn keep_average(&mut self, average: Average) -> Result<(), NetworkError> {
        let Average { signed, manifest, bytes, inputs, attestation } = average;
        self.keep(&signed, &manifest, &bytes)?;
        let me = *self.swarm.local_peer_id();
        let earlier: Vec<(PeerId, Manifest, SignedManifest)> = self
            .store
            .manifests(manifest.round)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|stored| {
                let bytes = stored.to_bytes().ok()?;
                self.verified(&stored, &bytes).map(|(m, author)| (author, m, stored))
            })
            .filter(|(author, m, _)| m.kind == ManifestKind::Attestation && *author != me)
            .collect();
        let (manifest_topic, _) = topics(&manifest.run_id);
        let gossiped = attestation.to_bytes().map_err(|e| NetworkError::Command(e.to_string()))?;
        let size = gossiped.len();
        match self.swarm.behaviour_mut().gossipsub.publish(manifest_topic, gossiped) {
            Ok(_) => self.count_sent(size),
            // No peer in the topic right now: those who ask get the certificate later.
            Err(e) => tracing::debug!(error = %e, "attestation not gossiped"),
        }
        match self.certifier.draft(signed, manifest, inputs, (me, attestation), earlier) {
            Ok(Some(news)) => self.emit(NetworkEvent::Certified(news)),
            Ok(None) => {}
            Err(e) => return Err(NetworkError::Command(format!("the average's input list: {e}"))),
        }
        Ok(())
    }

    /// A certificate a peer served in answer to a catch-up: every signature
    /// checked (and, in a closed run, every signer allowed); reported and
    /// its average fetched (the round engine chooses between certificates),
    /// and held and served on if it beats this node's.
    pub(super) async fn accept_certificate(&mut self, bytes: &[u8], peer: PeerId) -> Result<(), String> {
        let certificate = Certificate::from_bytes(bytes).map_err(|e| e.to_string())?;
        let allowed = |p: &PeerId| self.allowed_peers.as_ref().is_none_or(|list| list.contains(p));
        let certified = certificate.verify(&self.limits, allowed).map_err(|e| e.to_string())?;
        let average = certified.average.clone();
        if !self.joined(&average.run_id) {
            return Err(format!("a certificate for run {:?}, which this node did not join", average.run_id));
        }
        if self.certifier.offer(&certificate, &certified)? {
            self.store.put_manifest(average.round, &certificate.average).map_err(|e| e.to_string())?;
        }
        self.known.insert(average.adapter_hash, (average.round, average.chunk_ids.clone()));
        let news = CertificateNews {
            run_id: average.run_id,
            round: average.round,
            average: average.adapter_hash,
            signers: certified.signers.len(),
            contributors: certified.contributors,
            own: false,
        };
        self.emit(NetworkEvent::Certified(news));
        self.assemble(average, certified.author, Some(peer)).await;
        Ok(())
    }

    /// Answers a peer's request from what this node holds.
    pub(super) fn answer(&mut self, request: ChunkRequest) -> ChunkResponse {
        match request {
            ChunkRequest::Chunk(id) => match self.store.get_chunk(&id) {
                Ok(Some(bytes)) => ChunkResponse::Chunk(bytes),
                _ => ChunkResponse::NotFound,
            },
            ChunkRequest::Latest(run_id) => self.newest(run_id),
            ChunkRequest::Round(run_id, round, held) => self.round_manifests(run_id, round, &held),
            ChunkRequest::Piece(adapter, index) => self.piece(adapter, index),
            ChunkRequest::PieceRange(adapter, index, start, len) => self.piece_range(adapter, index, start, len),
            ChunkRequest::State(run_id, hash) => self.held_state(run_id, hash),
        }
    }

    /// The run's newest adapter: the certificate this node serves, else its
    /// newest update manifest. A run someone asked this of is remembered
    /// (`asked_for_latest`: a node lingers after its last round for them).
    fn newest(&mut self, run_id: Digest) -> ChunkResponse {
        if self.joined(&run_id) {
            self.latest_asked.insert(run_id);
        }
        match (self.certifier.served(&run_id), self.latest.get(&run_id).map(|l| l.signed.to_bytes())) {
            (Some(certificate), _) => ChunkResponse::Certificate(certificate.to_vec()),
            (None, Some(Ok(bytes))) => ChunkResponse::Manifest(bytes),
            _ => ChunkResponse::NotFound,
        }
    }

    /// The signed average manifest of the outer state `hash` of `run_id`,
    /// if this node holds the manifest and every chunk it names.
    fn held_state(&mut self, run_id: Digest, hash: Digest) -> ChunkResponse {
        let Some((round, chunk_ids)) = self.known.get(&hash).cloned() else { return ChunkResponse::NotFound };
        if !chunk_ids.iter().all(|id| self.store.has_chunk(id)) {
            return ChunkResponse::NotFound;
        }
        for stored in self.store.manifests(round).unwrap_or_default() {
            let Ok(bytes) = stored.to_bytes() else { continue };
            if self.verified(&stored, &bytes).is_some_and(|(m, _)| m.kind == ManifestKind::Average && m.run_id == run_id && m.adapter_hash == hash) {
                return ChunkResponse::Manifest(bytes);
            }
        }
        ChunkResponse::NotFound
    }

    /// Stores a chunk no manifest names (an input list), kept through `round`.
    pub(super) fn put_blob(&mut self, round: u64, bytes: Vec<u8>) -> Result<Digest, NetworkError> {
        let id = Digest::of(&bytes);
        self.store.put_chunk(&id, &bytes).map_err(|e| NetworkError::Store(e.to_string()))?;
        self.blobs.entry(round).or_default().push(id);
        Ok(id)
    }

    /// Forgets what rounds before `round` left: the store keeps only the
    /// chunks still served (the newest updates, certificates, blobs and
    /// pieces of later rounds).
    pub(super) fn forget_before(&mut self, round: u64) -> Result<(), String> {
        self.blobs.retain(|blob_round, _| *blob_round >= round);
        let mut pinned: HashSet<Digest> = self.latest.values().flat_map(|latest| latest.chunk_ids.iter().copied()).collect();
        pinned.extend(self.certifier.pinned());
        self.certifier.forget_before(round);
        pinned.extend(self.blobs.values().flatten());
        self.rooted.retain(|_, (r, _)| *r >= round);
        self.proven.retain(|_, (r, _, _)| *r >= round);
        pinned.extend(self.rooted.values().flat_map(|(_, ids)| ids.iter().copied()));
        pinned.extend(self.proven.values().map(|(_, id, _)| *id));
        let result = self.store.gc(round, &pinned).map(|report| {
            tracing::debug!(?report, "store clean-up");
        });
        self.known.retain(|_, (known_round, _)| *known_round >= round);
        self.first_updates.retain(|(_, r, _), _| *r >= round);
        self.verified_manifests.retain(|_, (r, _, _)| *r >= round);
        self.asked_rounds.retain(|(_, r), _| *r >= round);
        self.pending.retain(|_, p| p.manifest.round >= round);
        result.map_err(|e| e.to_string())
    }
}
