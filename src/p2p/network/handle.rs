//! The cloneable handle the engine and the commands hold: each call is a
//! [`Command`] sent to the event loop, answered on a oneshot channel.

use std::sync::Arc;

use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use crate::wire::codec::Digest;
use crate::wire::manifest::{Manifest, SignedManifest};

use super::{Average, Exchange, NetworkError, PeerPath, Piece};
use crate::p2p::chunk_protocol::HeldManifest;
use crate::p2p::payload::{PayloadKind, PayloadTraffic};
use crate::p2p::peer_bytes::{PeerBytes, PeerTraffic};

pub(super) enum Command {
    Subscribe(Digest, Exchange, oneshot::Sender<Result<(), String>>),
    /// With the guard against a second update for a round (true), or not.
    Publish(Box<(SignedManifest, Manifest, Vec<u8>)>, bool, oneshot::Sender<Result<(), NetworkError>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    Listen(Multiaddr, oneshot::Sender<Result<(), String>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    /// Listen addresses that name a host, and confirmed external ones.
    Reachable(oneshot::Sender<Vec<Multiaddr>>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    PeerPaths(oneshot::Sender<Vec<(PeerId, PeerPath)>>),
    PeerScore(PeerId, oneshot::Sender<Option<f64>>),
    /// Quarantine a peer proven to misbehave (the round engine's proof).
    Ban(PeerId),
    /// Ask connected peers for the newest manifest of a run, and fetch it.
    CatchUp(Digest, oneshot::Sender<Result<(), String>>),
    /// Ask connected peers for the outer state with this hash (run id,
    /// hash), and fetch it.
    AskState(Digest, Digest, oneshot::Sender<Result<(), String>>),
    Unsubscribe(Digest, oneshot::Sender<()>),
    /// Store this node's average of a round, gossip its attestation, and
    /// certify the average once two thirds of its contributors attest.
    KeepAverage(Box<Average>, oneshot::Sender<Result<(), NetworkError>>),
    /// Store and serve an adapter without gossiping it.
    Keep(Box<(SignedManifest, Manifest, Vec<u8>)>, oneshot::Sender<Result<(), NetworkError>>),
    RunPeers(Digest, oneshot::Sender<Vec<PeerId>>),
    /// Whether a peer asked this node for a run's newest certificate.
    AskedForLatest(Digest, oneshot::Sender<bool>),
    ForgetBefore(u64, oneshot::Sender<Result<(), String>>),
    /// Ask connected peers for a round's update manifests, and fetch them.
    AskRound(Digest, u64, Vec<HeldManifest>),
    /// One chunk by id, from the first of these peers that has it.
    FetchChunk(Digest, Vec<PeerId>, oneshot::Sender<Option<Vec<u8>>>),
    /// Store and serve bytes under their hash until the round is forgotten.
    PutBlob(u64, Vec<u8>, oneshot::Sender<Result<Digest, NetworkError>>),
    /// One chunk by (adapter, index), checked by its proof against the root.
    FetchPiece(Piece, Vec<PeerId>, oneshot::Sender<Option<Vec<u8>>>),
}

/// Cloneable access to the network task.
#[derive(Clone)]
pub struct NetworkHandle {
    pub(super) commands: mpsc::Sender<Command>,
    pub peer_id: PeerId,
    pub(super) traffic: Arc<PayloadTraffic>,
    pub(super) peer_bytes: Arc<PeerBytes>,
}

impl NetworkHandle {
    /// Each peer's bytes (received from it, sent to it) that changed since
    /// the last call, and peers gone since, with their final totals.
    pub fn peer_bytes(&self) -> Vec<PeerTraffic> {
        self.peer_bytes.report()
    }

    /// (sent, received) payload bytes so far.
    pub fn payload_traffic(&self) -> (u64, u64) {
        self.traffic.totals()
    }

    /// Payload bytes received so far, by what they carried.
    pub fn payload_received_by_kind(&self) -> Vec<(PayloadKind, u64)> {
        self.traffic.received_by_kind()
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, NetworkError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| NetworkError::Stopped)?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// Joins the run's manifest and chunk topics; `exchange` says whether
    /// its updates are gossiped whole or fetched by slice.
    pub async fn subscribe(&self, run_id: Digest, exchange: Exchange) -> Result<(), NetworkError> {
        self.call(|tx| Command::Subscribe(run_id, exchange, tx)).await?.map_err(NetworkError::Command)
    }

    /// A chunk by id, from this node's store or from the first of `peers`
    /// that serves it (checked against its id); `None` if none does.
    pub async fn fetch_chunk(&self, id: Digest, peers: Vec<PeerId>) -> Result<Option<Vec<u8>>, NetworkError> {
        self.call(|tx| Command::FetchChunk(id, peers, tx)).await
    }

    /// Stores and gossips a signed manifest and its adapter's chunks.
    /// Chunk `piece.index` of an adapter named by its Merkle root, from the
    /// first of `peers` that has it, checked by its proof.
    pub async fn fetch_piece(&self, piece: Piece, peers: Vec<PeerId>) -> Result<Option<Vec<u8>>, NetworkError> {
        self.call(|tx| Command::FetchPiece(piece, peers, tx)).await
    }

    /// Stores `bytes` as a chunk under their hash and serves it to peers
    /// who ask until `forget_before` drops `round`; returns the hash.
    pub async fn put_blob(&self, round: u64, bytes: Vec<u8>) -> Result<Digest, NetworkError> {
        self.call(|tx| Command::PutBlob(round, bytes, tx)).await?
    }

    /// Stores and gossips a signed manifest and its adapter's chunks. A
    /// second, different update for a round this node already published an
    /// update for is refused: it would be equivocation.
    pub async fn publish(&self, signed: SignedManifest, manifest: Manifest, adapter: Vec<u8>) -> Result<(), NetworkError> {
        self.call(|tx| Command::Publish(Box::new((signed, manifest, adapter)), true, tx)).await?
    }

    /// `publish` without that refusal: only the adversary suite's
    /// equivocating node (`simulate --attack equivocate`) calls it.
    pub async fn publish_unguarded(&self, signed: SignedManifest, manifest: Manifest, adapter: Vec<u8>) -> Result<(), NetworkError> {
        self.call(|tx| Command::Publish(Box::new((signed, manifest, adapter)), false, tx)).await?
    }

    /// Leaves the run's topics (peers learn it at once, as from a goodbye).
    pub async fn unsubscribe(&self, run_id: Digest) -> Result<(), NetworkError> {
        self.call(|tx| Command::Unsubscribe(run_id, tx)).await
    }

    /// Stores an adapter and its manifest, and serves them to peers that ask
    /// (catch-up, chunk requests), without gossiping them.
    pub async fn keep(&self, signed: SignedManifest, manifest: Manifest, adapter: Vec<u8>) -> Result<(), NetworkError> {
        self.call(|tx| Command::Keep(Box::new((signed, manifest, adapter)), tx)).await?
    }

    /// Stores this node's average of a round and serves its chunks; gossips
    /// the attestation; once two thirds of the contributors attested, the
    /// certificate is what late joiners get (`NetworkEvent::Certified`).
    pub async fn keep_average(&self, average: Average) -> Result<(), NetworkError> {
        self.call(|tx| Command::KeepAverage(Box::new(average), tx)).await?
    }

    /// Connected peers subscribed to the run's manifest topic, relays excepted.
    pub async fn run_peers(&self, run_id: Digest) -> Result<Vec<PeerId>, NetworkError> {
        self.call(|tx| Command::RunPeers(run_id, tx)).await
    }

    /// Whether a peer (a seeding relay, a joiner) asked this node for the
    /// run's newest certificate since it joined.
    pub async fn asked_for_latest(&self, run_id: Digest) -> Result<bool, NetworkError> {
        self.call(|tx| Command::AskedForLatest(run_id, tx)).await
    }

    /// Drops stored manifests of rounds before `round` and the chunks only
    /// they referenced (the newest adapter of each run stays, for catch-up).
    pub async fn forget_before(&self, round: u64) -> Result<(), NetworkError> {
        self.call(|tx| Command::ForgetBefore(round, tx)).await?.map_err(NetworkError::Command)
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetworkError> {
        self.call(|tx| Command::Dial(addr, tx)).await?.map_err(NetworkError::Command)
    }

    /// Listens on `addr`; `<relay address>/p2p-circuit` reserves a slot on a
    /// relay, so peers that cannot reach this node directly dial it through
    /// the relay.
    pub async fn listen_on(&self, addr: Multiaddr) -> Result<(), NetworkError> {
        self.call(|tx| Command::Listen(addr, tx)).await?.map_err(NetworkError::Command)
    }

    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetworkError> {
        self.call(Command::ListenAddrs).await
    }

    /// Where peers can dial this node: listen addresses that name a host
    /// (not 0.0.0.0 or ::), then confirmed external addresses.
    pub async fn reachable_addrs(&self) -> Result<Vec<Multiaddr>, NetworkError> {
        self.call(Command::Reachable).await
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetworkError> {
        self.call(Command::ConnectedPeers).await
    }

    /// Each connected peer's path: direct, or through which relay.
    pub async fn peer_paths(&self) -> Result<Vec<(PeerId, PeerPath)>, NetworkError> {
        self.call(Command::PeerPaths).await
    }

    /// This node's gossipsub score of `peer` (negative after invalid messages).
    pub async fn peer_score(&self, peer: PeerId) -> Result<Option<f64>, NetworkError> {
        self.call(|tx| Command::PeerScore(peer, tx)).await
    }

    /// Asks connected peers for the update manifests of `round` (updates
    /// gossiped before this node joined), less those in `held` (what the
    /// asker holds, `held_key`); they arrive as usual events.
    pub async fn ask_round(&self, run_id: Digest, round: u64, held: Vec<HeldManifest>) -> Result<(), NetworkError> {
        self.commands.send(Command::AskRound(run_id, round, held)).await.map_err(|_| NetworkError::Stopped)
    }

    /// Quarantines `peer` (the round engine proved it misbehaves): closes
    /// and refuses its connections and accepts nothing it signs. Sent
    /// without waiting, so event handlers can call it; a full command queue
    /// drops it (the engine excludes the peer anyway).
    pub fn ban(&self, peer: PeerId) {
        if self.commands.try_send(Command::Ban(peer)).is_err() {
            tracing::warn!(%peer, "the network is busy: the quarantined peer's connections stay open");
        }
    }

    pub async fn catch_up(&self, run_id: Digest) -> Result<(), NetworkError> {
        self.call(|tx| Command::CatchUp(run_id, tx)).await?.map_err(NetworkError::Command)
    }

    /// Asks connected peers for the outer state `hash` of `run_id`, whether
    /// certified or not; it comes back as `NetworkEvent::AdapterReady`.
    pub async fn ask_state(&self, run_id: Digest, hash: Digest) -> Result<(), NetworkError> {
        self.call(|tx| Command::AskState(run_id, hash, tx)).await?.map_err(NetworkError::Command)
    }
}
