//! Fetching what gossip did not bring: missing chunks of pending
//! adapters, chunks and pieces asked for by the engine (each from the
//! peers that can serve it, one after another), a round's manifests, the
//! newest certificate and an outer state by its hash; answers are checked
//! before they are kept.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, request_response};
use libp2p::request_response::{OutboundFailure, OutboundRequestId};
use tokio::sync::oneshot;

use crate::wire::{chunk_part, merkle};
use crate::wire::codec::{Digest, reassemble};
use crate::wire::manifest::{Manifest, ManifestKind, SignedManifest};

use super::{EventLoop, NetworkEvent, Piece, PieceKey};
use super::serve::{MAX_PROVEN, response_kind, response_size};
use crate::p2p::chunk_protocol::{ChunkRequest, ChunkResponse, HeldManifest, MAX_HELD};
use crate::p2p::sources::{Awaited, chunks_to_fetch};

/// How long chunks may trickle in by gossip before missing ones are fetched.
pub(super) const FETCH_GRACE: Duration = Duration::from_millis(1500);

/// Chunk requests in flight at once.
pub(super) const MAX_IN_FLIGHT: usize = 16;

/// An adapter we know the manifest of and are assembling.
pub(super) struct Pending {
    pub(super) manifest: Manifest,
    pub(super) author: PeerId,
    /// Peers that can serve its chunks: the author and whoever forwarded it.
    pub(super) sources: Vec<PeerId>,
    pub(super) since: Instant,
}

/// A `fetch_piece` in progress.
pub(super) struct PieceFetch {
    pub(super) piece: Piece,
    pub(super) fetch: DirectFetch,
}

pub(super) const MAX_PEER_ADDRESSES: usize = 4096;

/// Peers asked at once for a round's manifests (`ask_round`). Any one of
/// them holds what gossip brought it; asking every connected peer every
/// second made each of N waiting nodes check N² signatures a second, which
/// stalled round 0 at 64 simulated nodes.
pub(super) const ASK_ROUND_PEERS: usize = 3;

/// A `fetch_chunk` (or one of a `fetch_piece`) in progress.
#[derive(Default)]
pub(super) struct DirectFetch {
    pub(super) peers: VecDeque<PeerId>,
    pub(super) waiting: Vec<oneshot::Sender<Option<Vec<u8>>>>,
}

impl DirectFetch {
    /// Adds a waiter and the peers it names; true if no request was out.
    pub(super) fn join(&mut self, peers: Vec<PeerId>, reply: oneshot::Sender<Option<Vec<u8>>>) -> bool {
        let idle = self.waiting.is_empty();
        self.peers.extend(peers);
        self.waiting.push(reply);
        idle
    }
}

impl EventLoop {
    /// Fetches a verified manifest's chunks (from its author and `source`)
    /// and emits it, then `AdapterReady` once they are all here.
    pub(super) async fn assemble(&mut self, manifest: Manifest, author: PeerId, source: Option<PeerId>) {
        let mut sources = vec![author];
        sources.extend(source.filter(|s| *s != author));
        // An average (from a catch-up answer) is never gossiped: fetch its
        // chunks at once instead of waiting for gossip. Nor is a slice
        // result, but it waits for a second claim naming it (its co-owner's,
        // `fetch_missing`), or else the grace.
        let since = match manifest.kind {
            ManifestKind::Average => Instant::now().checked_sub(FETCH_GRACE).unwrap_or_else(Instant::now),
            ManifestKind::Update | ManifestKind::Members | ManifestKind::Attestation | ManifestKind::Slice => Instant::now(),
        };
        self.pending.entry(manifest.adapter_hash).or_insert(Pending {
            manifest: manifest.clone(),
            author,
            sources,
            since,
        });
        self.emit(NetworkEvent::Manifest { manifest: manifest.clone(), author });
        self.complete(manifest.adapter_hash);
        if manifest.kind != ManifestKind::Update {
            // Nothing gossips its chunks: ask now, not at the next tick.
            self.fetch_missing();
        }
    }

    /// Completes the pending adapters that waited for any of `ids`, now
    /// stored: fetched, or this node's own (`keep`).
    pub(super) fn complete_waiting_on(&mut self, ids: &[Digest]) {
        let waiting: Vec<Digest> = self.pending.iter().filter(|(_, p)| p.manifest.chunk_ids.iter().any(|c| ids.contains(c))).map(|(h, _)| *h).collect();
        for hash in waiting {
            self.complete(hash);
        }
    }

    /// Emits `AdapterReady` once every chunk of a pending adapter is stored.
    pub(super) fn complete(&mut self, hash: Digest) {
        let Some(pending) = self.pending.get(&hash) else { return };
        if !pending.manifest.chunk_ids.iter().all(|id| self.store.has_chunk(id)) {
            return;
        }
        let Some(pending) = self.pending.remove(&hash) else { return };
        let mut chunks = Vec::with_capacity(pending.manifest.chunk_ids.len());
        for id in &pending.manifest.chunk_ids {
            match self.store.get_chunk(id) {
                Ok(Some(chunk)) => chunks.push(chunk),
                // Vanished or corrupt: wait for it again.
                _ => {
                    self.pending.insert(hash, pending);
                    return;
                }
            }
        }
        let parts: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        match reassemble(&pending.manifest.chunk_ids, &parts, &pending.manifest.adapter_hash, &self.limits) {
            Ok(bytes) => {
                self.emit(NetworkEvent::AdapterReady {
                    manifest: pending.manifest,
                    author: pending.author,
                    bytes,
                })
            }
            Err(e) => tracing::warn!(adapter = ?hash, error = %e, "an adapter failed to reassemble"),
        }
    }

    /// Asks up to `ASK_ROUND_PEERS` connected peers for the manifests of
    /// (run, round): peers not asked yet, and once all have been, all of
    /// them again, since they may hold more by now.
    pub(super) fn ask_round(&mut self, run_id: Digest, round: u64, mut held: Vec<HeldManifest>) {
        held.truncate(MAX_HELD);
        let connected: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        let asked = self.asked_rounds.entry((run_id, round)).or_default();
        if connected.iter().all(|peer| asked.contains(peer)) {
            asked.clear();
        }
        let picked: Vec<PeerId> = connected.into_iter().filter(|peer| !asked.contains(peer)).take(ASK_ROUND_PEERS).collect();
        asked.extend(picked.iter().copied());
        for peer in picked {
            self.swarm.behaviour_mut().chunks.send_request(&peer, ChunkRequest::Round(run_id, round, held.clone()));
        }
    }

    pub(super) fn remember_addresses(&mut self, peer: PeerId, addresses: &[String]) {
        let parsed: Vec<Multiaddr> = addresses.iter().filter_map(|a| a.parse().ok()).collect();
        if parsed.is_empty() || (self.addresses.len() >= MAX_PEER_ADDRESSES && !self.addresses.contains_key(&peer)) {
            return;
        }
        self.addresses.insert(peer, parsed);
    }

    /// A chunk request to `peer`, remembered until its answer.
    pub(super) fn request_chunk(&mut self, peer: PeerId, id: Digest) {
        let request = self.send_request(peer, ChunkRequest::Chunk(id));
        self.in_flight.insert(request, (id, peer));
    }

    /// Sends `request` to `peer`, dialing it at the addresses it gave if
    /// this node is not connected to it.
    pub(super) fn send_request(&mut self, peer: PeerId, request: ChunkRequest) -> request_response::OutboundRequestId {
        let addresses = self.addresses.get(&peer).cloned().unwrap_or_default();
        self.swarm.behaviour_mut().chunks.send_request_with_addresses(&peer, request, addresses)
    }

    /// Starts a `fetch_chunk`: answered at once from the store, else by the
    /// peers in turn.
    pub(super) fn fetch_chunk(&mut self, id: Digest, peers: Vec<PeerId>, reply: oneshot::Sender<Option<Vec<u8>>>) {
        if let Ok(Some(bytes)) = self.store.get_chunk(&id) {
            let _ = reply.send(Some(bytes));
            return;
        }
        if self.direct.entry(id).or_default().join(peers, reply) {
            self.ask_next(id);
        }
    }

    /// Starts a `fetch_piece`: answered at once if this node holds the
    /// piece, else by the peers in turn.
    pub(super) fn fetch_piece(&mut self, piece: Piece, peers: Vec<PeerId>, reply: oneshot::Sender<Option<Vec<u8>>>) {
        if let Some((id, bytes, proof)) = self.held_piece(piece.adapter, piece.index)
            && merkle::verify(&piece.root, piece.count, piece.index as usize, &id, &proof)
        {
            let part = match piece.part {
                None => Some(bytes),
                Some((start, len)) => start.checked_add(len).and_then(|end| bytes.get(start as usize..end as usize)).map(<[u8]>::to_vec),
            };
            let _ = reply.send(part);
            return;
        }
        let key = (piece.adapter, piece.index, piece.part);
        let fetch = self.piece_fetches.entry(key).or_insert_with(|| PieceFetch {
            piece,
            fetch: DirectFetch::default(),
        });
        if fetch.fetch.join(peers, reply) {
            self.ask_next_piece(key);
        }
    }

    /// Asks the next peer for a piece, or tells the waiters no peer had it.
    pub(super) fn ask_next_piece(&mut self, key: PieceKey) {
        let Some(fetch) = self.piece_fetches.get_mut(&key) else { return };
        match fetch.fetch.peers.pop_front() {
            Some(peer) => {
                let request = match key {
                    (adapter, index, None) => ChunkRequest::Piece(adapter, index),
                    (adapter, index, Some((start, len))) => ChunkRequest::PieceRange(adapter, index, start, len),
                };
                let request = self.send_request(peer, request);
                self.piece_requests.insert(request, key);
            }
            None => {
                for waiter in self.piece_fetches.remove(&key).map(|f| f.fetch.waiting).unwrap_or_default() {
                    let _ = waiter.send(None);
                }
            }
        }
    }

    /// A peer's answer to a piece request: kept (with its proof, to serve
    /// on) and handed to the waiters if the proof holds, else the next peer.
    /// A part of a piece is handed on, not kept.
    pub(super) async fn on_piece(&mut self, peer: PeerId, key: PieceKey, response: ChunkResponse) {
        let Some(piece) = self.piece_fetches.get(&key).map(|f| f.piece) else { return };
        match (response, piece.part) {
            (ChunkResponse::PieceRange(id, proof, slice), Some((start, len))) => {
                let proven = merkle::verify(&piece.root, piece.count, piece.index as usize, &id, &proof).then(|| chunk_part::verify(&id, start, len, &slice));
                let Some(Some(part)) = proven else {
                    let reason = format!("sent part of piece {} of adapter {:?} that its proofs do not tie to the signed root", piece.index, piece.adapter);
                    self.emit(NetworkEvent::Rejected { peer, reason });
                    return self.ask_next_piece(key);
                };
                for waiter in self.piece_fetches.remove(&key).map(|f| f.fetch.waiting).unwrap_or_default() {
                    let _ = waiter.send(Some(part.clone()));
                }
            }
            (ChunkResponse::Piece(bytes, proof), None) => {
                let id = Digest::of(&bytes);
                if !merkle::verify(&piece.root, piece.count, piece.index as usize, &id, &proof) {
                    let reason = format!("sent a piece {} of adapter {:?} that its proof does not tie to the signed root", piece.index, piece.adapter);
                    self.emit(NetworkEvent::Rejected { peer, reason });
                    return self.ask_next_piece(key);
                }
                if let Err(reason) = self.accept_chunk(&bytes).await {
                    tracing::warn!(%peer, %reason, "could not keep a fetched piece");
                }
                let round = self.known.get(&piece.adapter).map_or(0, |(r, _)| *r);
                if self.proven.len() < MAX_PROVEN {
                    self.proven.insert((piece.adapter, piece.index), (round, id, proof));
                }
                for waiter in self.piece_fetches.remove(&key).map(|f| f.fetch.waiting).unwrap_or_default() {
                    let _ = waiter.send(Some(bytes.clone()));
                }
            }
            _ => self.ask_next_piece(key),
        }
    }

    /// Asks the next peer for a chunk someone waits for directly, or tells
    /// the waiters that no peer had it.
    pub(super) fn ask_next(&mut self, id: Digest) {
        let Some(fetch) = self.direct.get_mut(&id) else { return };
        match fetch.peers.pop_front() {
            Some(peer) => self.request_chunk(peer, id),
            None => {
                for waiter in self.direct.remove(&id).map(|f| f.waiting).unwrap_or_default() {
                    let _ = waiter.send(None);
                }
            }
        }
    }

    /// Asks peers for chunks of adapters whose grace period passed, and
    /// for slice results that enough claims name (`sources::chunks_to_fetch`).
    pub(super) fn fetch_missing(&mut self) {
        let now = Instant::now();
        let awaited: Vec<Awaited> = self
            .pending
            .values()
            .map(|p| Awaited {
                kind: p.manifest.kind,
                author: p.author,
                chunk_ids: &p.manifest.chunk_ids,
                sources: &p.sources,
                waited: now.duration_since(p.since),
            })
            .collect();
        let asked = |id: &Digest| self.store.has_chunk(id) || self.wanted.contains_key(id) || self.in_flight.values().any(|(c, _)| c == id);
        let fetch = chunks_to_fetch(self.swarm.local_peer_id(), &awaited, (FETCH_GRACE, self.agreeing_claims), asked);
        self.wanted.extend(fetch);
        let ready: Vec<Digest> = self.wanted.keys().copied().collect();
        for id in ready {
            if self.in_flight.len() >= MAX_IN_FLIGHT {
                break;
            }
            if self.in_flight.values().any(|(c, _)| *c == id) {
                continue;
            }
            let Some(peer) = self.wanted.get_mut(&id).and_then(VecDeque::pop_front) else {
                // Every source was tried; wait for new announcements.
                self.wanted.remove(&id);
                continue;
            };
            self.request_chunk(peer, id);
        }
    }

    /// Asks every connected peer for the run's newest certificate (or, in a
    /// run without one, its newest update).
    pub(super) fn catch_up(&mut self, run_id: Digest) -> Result<(), String> {
        self.ask_connected(&ChunkRequest::Latest(run_id), "catch up from").map(|_| ())
    }

    /// Sends `request` to every connected peer: the requests out, or an
    /// error naming what there was nobody to `ask_for`.
    fn ask_connected(&mut self, request: &ChunkRequest, ask_for: &str) -> Result<Vec<OutboundRequestId>, String> {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        if peers.is_empty() {
            return Err(format!("no connected peer to {ask_for}"));
        }
        Ok(peers.iter().map(|peer| self.swarm.behaviour_mut().chunks.send_request(peer, request.clone())).collect())
    }

    /// A seeding node asks attesters again whose answer was an older
    /// round's certificate (`Certifier::asks_due`).
    pub(super) fn ask_certificates_again(&mut self) {
        for (run_id, peer) in self.certifier.asks_due(Instant::now()) {
            self.swarm.behaviour_mut().chunks.send_request(&peer, ChunkRequest::Latest(run_id));
        }
    }

    /// Asks every connected peer for the average manifest of the outer
    /// state `hash` (`ChunkRequest::State`); the first valid answer is
    /// fetched like a certified average, and its chunks are checked against
    /// that hash. One state is sought at a time.
    pub(super) fn ask_state(&mut self, run_id: Digest, hash: Digest) -> Result<(), String> {
        let requests = self.ask_connected(&ChunkRequest::State(run_id, hash), "ask for the state")?;
        self.state_requests.extend(requests.into_iter().map(|request| (request, hash)));
        self.state_sought = Some(hash);
        // An earlier answer's fetch may be stuck on chunks that never come
        // (a peer can sign a manifest naming this hash over bogus chunks):
        // each ask starts from the first answer again; chunks already here
        // stay in the store.
        self.pending.remove(&hash);
        Ok(())
    }

    /// A peer's answer to `ask_state`: "not found" (another peer may hold
    /// it), or the state's signed average manifest, fetched at once.
    async fn on_state(&mut self, peer: PeerId, hash: Digest, response: ChunkResponse) {
        let ChunkResponse::Manifest(bytes) = response else { return };
        if self.state_sought != Some(hash) {
            // Another peer's answer came first.
            return;
        }
        match self.state_manifest(&bytes, hash) {
            Ok((manifest, author)) => {
                self.state_sought = None;
                self.assemble(manifest, author, Some(peer)).await;
            }
            Err(reason) => self.emit(NetworkEvent::Rejected { peer, reason }),
        }
    }

    /// `bytes` checked as the signed average manifest of state `hash` in a
    /// run this node joined.
    fn state_manifest(&self, bytes: &[u8], hash: Digest) -> Result<(Manifest, PeerId), String> {
        let signed = SignedManifest::from_bytes(bytes).map_err(|e| format!("answered a state request with no manifest: {e}"))?;
        let (manifest, author, _) = self.check_signature(&signed, &Digest::of(bytes))?;
        if manifest.kind != ManifestKind::Average || manifest.adapter_hash != hash {
            return Err(format!("answered a request for state {hash:?} with another manifest"));
        }
        if !self.joined(&manifest.run_id) {
            return Err(format!("answered a state request with a manifest of run {:?}, which this node did not join", manifest.run_id));
        }
        Ok((manifest, author))
    }

    /// A peer's answer to one of this node's requests: a piece, a chunk
    /// (checked against its id), manifests, a certificate, a state.
    pub(super) async fn on_response(&mut self, peer: PeerId, request_id: OutboundRequestId, response: ChunkResponse) {
        let size = response_size(&response);
        self.count_received(size);
        if let Some(kind) = response_kind(&response) {
            self.traffic.count_kind(kind, size);
        }
        if let Some(key) = self.piece_requests.remove(&request_id) {
            self.on_piece(peer, key, response).await;
            return;
        }
        if let Some(hash) = self.state_requests.remove(&request_id) {
            self.on_state(peer, hash, response).await;
            self.fetch_missing();
            return;
        }
        let asked = self.in_flight.remove(&request_id);
        match (response, asked) {
            (ChunkResponse::Chunk(bytes), Some((id, _))) if Digest::of(&bytes) == id => {
                self.wanted.remove(&id);
                if let Err(reason) = self.accept_chunk(&bytes).await {
                    tracing::warn!(%peer, %reason, "could not keep a fetched chunk");
                }
                if let Some(fetch) = self.direct.remove(&id) {
                    for waiter in fetch.waiting {
                        let _ = waiter.send(Some(bytes.clone()));
                    }
                }
            }
            (ChunkResponse::Chunk(_), Some((id, _))) => {
                let reason = format!("sent bytes that are not chunk {id:?}");
                self.emit(NetworkEvent::Rejected { peer, reason });
                self.ask_next(id);
            }
            (ChunkResponse::NotFound, Some((id, _))) => self.ask_next(id),
            (ChunkResponse::Manifests(list), _) => {
                for bytes in list {
                    self.take_offered_manifest(&bytes, peer).await;
                }
            }
            (ChunkResponse::Certificate(bytes), _) => {
                if let Err(reason) = self.accept_certificate(&bytes, peer).await {
                    self.emit(NetworkEvent::Rejected { peer, reason });
                }
            }
            (ChunkResponse::Manifest(bytes), _) => {
                self.take_offered_manifest(&bytes, peer).await;
            }
            _ => {}
        }
        // A request slot is free: keep fetching without waiting for the tick.
        self.fetch_missing();
    }

    /// A request that got no answer: the fetch asks its next peer.
    pub(super) fn on_request_failed(&mut self, request_id: OutboundRequestId, peer: PeerId, error: &OutboundFailure) {
        if let Some(key) = self.piece_requests.remove(&request_id) {
            tracing::debug!(%peer, %error, "piece request failed; trying another peer");
            self.ask_next_piece(key);
        } else if self.state_requests.remove(&request_id).is_some() {
            tracing::debug!(%peer, %error, "state request failed");
        } else if let Some((id, _)) = self.in_flight.remove(&request_id) {
            tracing::debug!(%peer, %error, "chunk request failed; trying another peer");
            self.ask_next(id);
        }
    }
}
