//! One task owns the libp2p `Swarm`; a cloneable `NetworkHandle` sends it
//! commands, and events come back on a channel (as in rust-libp2p's
//! file-sharing example). It gossips signed manifests and content-addressed
//! chunks, validates every message before it is forwarded, keeps what it
//! accepts in the store, fetches missing chunks by request-response from
//! peers that announced them, and serves chunks and the newest manifest.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::{Transport, upgrade};
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identify, identity, kad, mdns, noise, request_response, tcp, yamux};
use tokio::sync::{mpsc, oneshot};

use crate::store::Store;
use crate::wire::certificate::Certificate;
use crate::wire::codec::{ChunkMessage, Digest, Limits, reassemble, split_chunks_of};
use crate::wire::evidence::Equivocation;
use crate::wire::manifest::{Manifest, ManifestKind, SignedManifest};
use crate::wire::{chunk_part, merkle};

use super::behaviour::{self, Behaviour, BehaviourEvent};
use super::certify::{CertificateNews, Certifier};
use super::chunk_protocol::{ChunkRequest, ChunkResponse, HeldManifest, MAX_HELD, MAX_ROUND_MANIFESTS, held_key};
use super::payload::{PayloadKind, PayloadTraffic};
use super::sources::{Awaited, chunks_to_fetch};

/// How long chunks may trickle in by gossip before missing ones are fetched.
const FETCH_GRACE: Duration = Duration::from_millis(1500);
/// Chunk requests in flight at once.
const MAX_IN_FLIGHT: usize = 16;

#[derive(Debug, Clone)]
pub struct NetworkOptions {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses others can reach this node at.
    pub external: Vec<Multiaddr>,
    pub mdns: bool,
    /// Run a circuit-relay server (the `relay` command).
    pub relay_server: bool,
    pub store_dir: PathBuf,
    pub store_quota: u64,
    pub limits: Limits,
    /// A private network: TCP connections are wrapped in libp2p pnet with
    /// this key, and QUIC is off (its TLS handshake cannot be wrapped).
    pub psk: Option<PreSharedKey>,
    /// Gossipsub's mesh degree D (default 6); the benchmark varies it.
    pub mesh_n: Option<usize>,
    /// How many owners compute each slice of the reduce exchange
    /// (`federation.replicas`): a slice result is fetched as soon as that
    /// many claims name it (two at most; `sources::chunks_to_fetch`).
    pub slice_owners: usize,
    pub transport: TransportKind,
    /// A closed run: only these peers may connect, and only their manifests
    /// are accepted (also when another peer forwards them).
    pub allowed_peers: Option<HashSet<PeerId>>,
}

/// What carries the connections.
#[derive(Debug, Clone)]
pub enum TransportKind {
    /// TCP and QUIC (TCP only, wrapped in pnet, when a pre-shared key is set).
    Internet,
    /// Node `node` of an in-process simulated network (`simulate`).
    Simulated { network: netsim::SimNetwork, node: u64 },
}

#[derive(Debug, Clone)]
pub enum NetworkEvent {
    Listening(Multiaddr),
    PeerConnected(PeerId),
    /// A verified manifest for a subscribed run.
    Manifest { manifest: Manifest, author: PeerId },
    /// Every chunk of a manifest arrived, and the adapter matches its hash.
    AdapterReady { manifest: Manifest, author: PeerId, bytes: Vec<u8> },
    /// A round certificate: one of this node's averages was certified, or a
    /// peer served one that checked out (held if it beats this node's).
    Certified(CertificateNews),
    /// `peer` is proven to misbehave (checked evidence): its connections are
    /// closed and refused, and nothing it signs is accepted any more.
    Quarantined { peer: PeerId, reason: String },
    /// A message failed validation and was not forwarded.
    Rejected { peer: PeerId, reason: String },
    /// An outgoing connection failed (e.g. an unreachable bootstrap peer).
    DialFailed { peer: Option<PeerId>, error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network setup: {0}")]
    Setup(String),
    #[error("the network task has stopped")]
    Stopped,
    #[error("{0}")]
    Command(String),
    /// The local store cannot take this node's own data (full, or its disk
    /// failed): the node cannot serve what it publishes.
    #[error("the chunk store cannot keep it: {0}")]
    Store(String),
}

/// How a run moves its updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    /// Every update's chunks are gossiped to every node and assembled.
    Gossip,
    /// Updates stay with their authors: only their manifests are gossiped,
    /// and slice owners fetch the chunks they need (`fetch_chunk`).
    Reduce,
}

enum Command {
    Subscribe(Digest, Exchange, oneshot::Sender<Result<(), String>>),
    /// With the guard against a second update for a round (true), or not.
    Publish(Box<(SignedManifest, Manifest, Vec<u8>)>, bool, oneshot::Sender<Result<(), NetworkError>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    Listen(Multiaddr, oneshot::Sender<Result<(), String>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    /// Listen addresses that name a host, and confirmed external ones.
    Reachable(oneshot::Sender<Vec<Multiaddr>>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    PeerScore(PeerId, oneshot::Sender<Option<f64>>),
    /// Quarantine a peer proven to misbehave (the round engine's proof).
    Ban(PeerId),
    /// Ask connected peers for the newest manifest of a run, and fetch it.
    CatchUp(Digest, oneshot::Sender<Result<(), String>>),
    Unsubscribe(Digest, oneshot::Sender<()>),
    /// Store this node's average of a round, gossip its attestation, and
    /// certify the average once two thirds of its contributors attest.
    KeepAverage(Box<Average>, oneshot::Sender<Result<(), NetworkError>>),
    /// Store and serve an adapter without gossiping it.
    Keep(Box<(SignedManifest, Manifest, Vec<u8>)>, oneshot::Sender<Result<(), NetworkError>>),
    RunPeers(Digest, oneshot::Sender<Vec<PeerId>>),
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

/// A node's average of a round, for `NetworkHandle::keep_average`.
pub struct Average {
    pub signed: SignedManifest,
    pub manifest: Manifest,
    pub bytes: Vec<u8>,
    /// The input list (`wire::inputs`) the manifest names by its digest.
    pub inputs: Vec<u8>,
    /// This node's signed attestation of it.
    pub attestation: SignedManifest,
}

/// Chunk `index` of the adapter `adapter`, whose `count` chunk ids have the
/// Merkle root `root` (from its signed manifest); with `part`, only the
/// bytes `start..start + len` of that chunk (proven under its id by a bao
/// slice, so the rest of the chunk need not travel).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Piece {
    pub adapter: Digest,
    pub index: u32,
    pub root: Digest,
    pub count: usize,
    pub part: Option<(u32, u32)>,
}

/// A piece fetch in progress: (adapter, index, part).
type PieceKey = (Digest, u32, Option<(u32, u32)>);

/// Cloneable access to the network task.
#[derive(Clone)]
pub struct NetworkHandle {
    commands: mpsc::Sender<Command>,
    pub peer_id: PeerId,
    traffic: Arc<PayloadTraffic>,
}

impl NetworkHandle {
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
}

/// An error with its sources (libp2p's transport errors keep the cause,
/// e.g. "Address already in use", only there).
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    // Bounded by the chain's length.
    while let Some(cause) = source {
        let part = cause.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text = if text.is_empty() { part } else { format!("{text}: {part}") };
        }
        source = cause.source();
    }
    text
}

fn response_size(response: &ChunkResponse) -> usize {
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
fn response_kind(response: &ChunkResponse) -> Option<PayloadKind> {
    match response {
        ChunkResponse::Chunk(_) => Some(PayloadKind::Chunks),
        ChunkResponse::Piece(..) => Some(PayloadKind::Pieces),
        ChunkResponse::PieceRange(..) => Some(PayloadKind::AuditParts),
        ChunkResponse::Manifests(_) => Some(PayloadKind::RoundAnswers),
        ChunkResponse::Manifest(_) | ChunkResponse::Certificate(_) => Some(PayloadKind::Certificates),
        ChunkResponse::NotFound => None,
    }
}

/// A run's topics, named by a hash of `blossom/<run id>/…` that every
/// message carries: 44 bytes instead of 82.
fn topics(run_id: &Digest) -> (gossipsub::Sha256Topic, gossipsub::Sha256Topic) {
    let hex = run_id.to_hex();
    (
        gossipsub::Sha256Topic::new(format!("blossom/{hex}/manifests")),
        gossipsub::Sha256Topic::new(format!("blossom/{hex}/chunks")),
    )
}

/// A run's topic for evidence of misbehaviour (rare, small messages).
fn evidence_topic(run_id: &Digest) -> gossipsub::Sha256Topic {
    gossipsub::Sha256Topic::new(format!("blossom/{}/evidence", run_id.to_hex()))
}

/// First update manifests remembered to catch equivocation, at most.
const MAX_FIRST_UPDATES: usize = 1 << 16;

/// Why a gossiped or offered message was refused, and whether the peer
/// that sent it is to blame. An honest forwarder may pass on what only
/// this node knows to refuse (a manifest by a peer it quarantined a moment
/// ago, the second of two updates it saw in the other order): gossipsub
/// must not score it down for that, or the honest mesh falls apart.
struct Refusal {
    reason: String,
    sender_at_fault: bool,
}

impl Refusal {
    fn innocent(reason: String) -> Self {
        Self { reason, sender_at_fault: false }
    }
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Self { reason, sender_at_fault: true }
    }
}

/// An adapter we know the manifest of and are assembling.
struct Pending {
    manifest: Manifest,
    author: PeerId,
    /// Peers that can serve its chunks: the author and whoever forwarded it.
    sources: Vec<PeerId>,
    since: Instant,
}

/// A run's newest verified update, served to late joiners of a run that
/// has no certified average (a `start --publish` demo, a seeding relay).
struct Latest {
    round: u64,
    /// Its chunks, kept through store clean-ups.
    chunk_ids: Vec<Digest>,
    signed: SignedManifest,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    store: Store,
    limits: Limits,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetworkEvent>,
    /// Events the engine has not taken yet (`emit`).
    outbox: VecDeque<NetworkEvent>,
    /// Subscribed runs, by the hash of their manifest and chunk topics.
    manifest_topics: HashMap<gossipsub::TopicHash, Digest>,
    chunk_topics: HashSet<gossipsub::TopicHash>,
    evidence_topics: HashMap<gossipsub::TopicHash, Digest>,
    /// The first signed update of each (run, round, author): a second,
    /// different one is evidence of equivocation.
    first_updates: HashMap<(Digest, u64, PeerId), SignedManifest>,
    /// Peers proven to misbehave, and why.
    quarantined: HashMap<PeerId, String>,
    pending: HashMap<Digest, Pending>,
    /// Newest verified update of each run, for late joiners.
    latest: HashMap<Digest, Latest>,
    /// This node's averages waiting for attestations, and the certificate
    /// of each run it serves.
    certifier: Certifier,
    /// Chunk id → peers still to ask, for retries.
    wanted: HashMap<Digest, VecDeque<PeerId>>,
    in_flight: HashMap<request_response::OutboundRequestId, (Digest, PeerId)>,
    relay_server: bool,
    allowed_peers: Option<HashSet<PeerId>>,
    traffic: Arc<PayloadTraffic>,
    /// Peers that identified as relay servers: they may join a run's topics
    /// to seed it, but never train, so they are not run members.
    relays: HashSet<PeerId>,
    /// Chunk ids of every adapter whose manifest was verified, to check
    /// gossiped chunks against.
    known: HashMap<Digest, (u64, Vec<Digest>)>,
    /// Runs in the reduce exchange: their updates are not assembled.
    reduce_runs: HashSet<Digest>,
    /// Claims that make a slice result worth fetching at once (`NetworkOptions::slice_owners`, at most 2).
    agreeing_claims: usize,
    /// Chunks asked for by `fetch_chunk`: the peers still to ask, and who waits.
    direct: HashMap<Digest, DirectFetch>,
    /// Addresses authors gave in their signed manifests, for fetches from
    /// peers this node is not connected to (at most `MAX_PEER_ADDRESSES` peers).
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    /// Chunks no manifest names (`put_blob`), kept through their round.
    blobs: BTreeMap<u64, Vec<Digest>>,
    /// Adapters named by a Merkle root that this node serves by piece: its
    /// own (every chunk id) and pieces it fetched (their id and proof, so
    /// that it can serve them on), with their round.
    rooted: HashMap<Digest, (u64, Vec<Digest>)>,
    proven: HashMap<(Digest, u32), (u64, Digest, Vec<Digest>)>,
    /// `fetch_piece`s in progress, and the requests they have out.
    piece_fetches: HashMap<PieceKey, PieceFetch>,
    piece_requests: HashMap<request_response::OutboundRequestId, PieceKey>,
    /// Manifests verified and kept, by the hash of their signed bytes, with
    /// their round (at most `MAX_VERIFIED_MANIFESTS`).
    verified_manifests: HashMap<Digest, (u64, Manifest, PeerId)>,
    /// Peers asked for each (run, round)'s manifests since the last time
    /// every connected peer had been.
    asked_rounds: HashMap<(Digest, u64), HashSet<PeerId>>,
}

/// A `fetch_piece` in progress.
struct PieceFetch {
    piece: Piece,
    fetch: DirectFetch,
}

/// Pieces fetched and kept to serve on, at most.
const MAX_PROVEN: usize = 1 << 16;

const MAX_PEER_ADDRESSES: usize = 4096;
/// Verified manifests remembered by the hash of their signed bytes, so that
/// one offered again (by every peer asked for a round) costs a hash, not a
/// signature check and a store write.
const MAX_VERIFIED_MANIFESTS: usize = 1 << 14;
/// Peers asked at once for a round's manifests (`ask_round`). Any one of
/// them holds what gossip brought it; asking every connected peer every
/// second made each of N waiting nodes check N² signatures a second, which
/// stalled round 0 at 64 simulated nodes.
const ASK_ROUND_PEERS: usize = 3;

/// A `fetch_chunk` (or one of a `fetch_piece`) in progress.
#[derive(Default)]
struct DirectFetch {
    peers: VecDeque<PeerId>,
    waiting: Vec<oneshot::Sender<Option<Vec<u8>>>>,
}

impl DirectFetch {
    /// Adds a waiter and the peers it names; true if no request was out.
    fn join(&mut self, peers: Vec<PeerId>, reply: oneshot::Sender<Option<Vec<u8>>>) -> bool {
        let idle = self.waiting.is_empty();
        self.peers.extend(peers);
        self.waiting.push(reply);
        idle
    }
}

/// Builds the swarm (TCP and QUIC, noise, yamux, relay client) and starts
/// its task on the current tokio runtime.
pub fn spawn(keypair: identity::Keypair, options: NetworkOptions) -> Result<(NetworkHandle, mpsc::Receiver<NetworkEvent>), NetworkError> {
    let setup = |e: &dyn std::fmt::Display| NetworkError::Setup(e.to_string());
    let store = Store::open(&options.store_dir, options.store_quota).map_err(|e| setup(&e))?;
    let (mdns_on, relay_server, mesh_n) = (options.mdns, options.relay_server, options.mesh_n);
    let allowed_peers = options.allowed_peers.clone();
    let allowed_for_behaviour = allowed_peers.clone();
    let build_behaviour =
        move |key: &identity::Keypair, relay_client| behaviour::build(key, relay_client, mdns_on, relay_server, mesh_n, allowed_for_behaviour.as_ref());
    let builder = libp2p::SwarmBuilder::with_existing_identity(keypair).with_tokio();
    let mut swarm = match (options.transport, options.psk) {
        (TransportKind::Internet, None) => builder
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| setup(&e))?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| setup(&e))?
            .with_behaviour(|key, relay_client| build_behaviour(key, relay_client).map_err(Into::into))
            .map_err(|e| setup(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build(),
        (kind, psk) => builder
            .with_other_transport(|key| other_transport(key, kind, psk))
            .map_err(|e| setup(&e))?
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| setup(&e))?
            .with_behaviour(|key, relay_client| build_behaviour(key, relay_client).map_err(Into::into))
            .map_err(|e| setup(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build(),
    };
    if relay_server {
        swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));
    }
    for addr in &options.listen {
        swarm.listen_on(addr.clone()).map_err(|e| {
            let why = with_sources(&e);
            let hint = if why.contains("in use") { "; another process has this port: pick another in --listen, or stop it" } else { "" };
            setup(&format!("cannot listen on {addr}: {why}{hint}"))
        })?;
    }
    for addr in &options.external {
        swarm.add_external_address(addr.clone());
    }
    for addr in &options.bootstrap {
        swarm.dial(addr.clone()).map_err(|e| setup(&format!("dial {addr}: {e}")))?;
    }
    let peer_id = *swarm.local_peer_id();
    let (command_tx, command_rx) = mpsc::channel(64);
    let (event_tx, event_rx) = mpsc::channel(256);
    let traffic = Arc::new(PayloadTraffic::default());
    let event_loop = EventLoop {
        swarm,
        store,
        limits: options.limits,
        commands: command_rx,
        events: event_tx,
        outbox: VecDeque::new(),
        manifest_topics: HashMap::new(),
        chunk_topics: HashSet::new(),
        evidence_topics: HashMap::new(),
        first_updates: HashMap::new(),
        quarantined: HashMap::new(),
        pending: HashMap::new(),
        latest: HashMap::new(),
        certifier: Certifier::default(),
        wanted: HashMap::new(),
        in_flight: HashMap::new(),
        relay_server,
        relays: HashSet::new(),
        allowed_peers,
        traffic: traffic.clone(),
        known: HashMap::new(),
        reduce_runs: HashSet::new(),
        agreeing_claims: options.slice_owners.clamp(1, 2),
        direct: HashMap::new(),
        addresses: HashMap::new(),
        blobs: BTreeMap::new(),
        rooted: HashMap::new(),
        proven: HashMap::new(),
        piece_fetches: HashMap::new(),
        piece_requests: HashMap::new(),
        verified_manifests: HashMap::new(),
        asked_rounds: HashMap::new(),
    };
    tokio::spawn(event_loop.run());
    Ok((NetworkHandle { commands: command_tx, peer_id, traffic }, event_rx))
}

/// A private network's TCP (wrapped in pnet), or the simulated network;
/// either way noise-authenticated and yamux-multiplexed.
fn other_transport(
    key: &identity::Keypair,
    kind: TransportKind,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let noise = noise::Config::new(key)?;
    let boxed = match (kind, psk) {
        (TransportKind::Simulated { network, node }, _) => network
            .transport(node)
            .upgrade(upgrade::Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        (TransportKind::Internet, psk) => {
            let psk = psk.ok_or("the internet transport without a pre-shared key is built by with_tcp")?;
            tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                .upgrade(upgrade::Version::V1)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
                .boxed()
        }
    };
    Ok(boxed)
}

impl EventLoop {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event).await,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    // Every handle is gone: shut down.
                    None => return,
                },
                _ = tick.tick() => self.fetch_missing(),
                permit = self.events.clone().reserve_owned(), if !self.outbox.is_empty() => match permit {
                    Ok(permit) => self.deliver(permit),
                    Err(_) => self.outbox.clear(),
                },
            }
        }
    }

    /// Queues an event for the round engine. Never waits: a swarm loop
    /// blocked on a full channel answers no command, and the engine may be
    /// waiting on one (at 64 simulated nodes such nodes stopped serving
    /// their peers for good); nor does a busy engine stop this node from
    /// serving pieces meanwhile.
    fn emit(&mut self, event: NetworkEvent) {
        self.outbox.push_back(event);
    }

    /// Hands queued events to the engine while the channel has room.
    fn deliver(&mut self, permit: mpsc::OwnedPermit<NetworkEvent>) {
        let Some(first) = self.outbox.pop_front() else { return };
        permit.send(first);
        while let Some(event) = self.outbox.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.outbox.push_front(event);
                    return;
                }
                // Nobody listens any more.
                Err(mpsc::error::TrySendError::Closed(_)) => return self.outbox.clear(),
            }
        }
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Subscribe(run_id, exchange, reply) => {
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
                let _ = reply.send(result);
            }
            Command::Publish(publication, guarded, reply) => {
                let (signed, manifest, adapter) = *publication;
                let _ = reply.send(self.publish(signed, manifest, adapter, guarded));
            }
            Command::KeepAverage(average, reply) => {
                let _ = reply.send(self.keep_average(*average).await);
            }
            Command::Keep(publication, reply) => {
                let (signed, manifest, adapter) = *publication;
                let _ = reply.send(self.keep(&signed, &manifest, &adapter).map(|_| ()));
            }
            Command::Unsubscribe(run_id, reply) => {
                let (manifests, chunks) = topics(&run_id);
                let gossip = &mut self.swarm.behaviour_mut().gossipsub;
                gossip.unsubscribe(&manifests);
                gossip.unsubscribe(&chunks);
                gossip.unsubscribe(&evidence_topic(&run_id));
                self.evidence_topics.retain(|_, run| *run != run_id);
                self.manifest_topics.remove(&manifests.hash());
                self.chunk_topics.remove(&chunks.hash());
                self.reduce_runs.remove(&run_id);
                let _ = reply.send(());
            }
            Command::ForgetBefore(round, reply) => {
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
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
            Command::AskRound(run_id, round, held) => self.ask_round(run_id, round, held),
            Command::RunPeers(run_id, reply) => {
                let topic = topics(&run_id).0.hash();
                let gossip = &self.swarm.behaviour().gossipsub;
                let peers = gossip
                    .all_peers()
                    .filter(|(p, t)| t.contains(&&topic) && !self.relays.contains(p))
                    .map(|(p, _)| *p)
                    .collect();
                let _ = reply.send(peers);
            }
            Command::Dial(addr, reply) => {
                let _ = reply.send(self.swarm.dial(addr.clone()).map_err(|e| format!("dial {addr}: {e}")));
            }
            Command::Listen(addr, reply) => {
                let _ = reply.send(self.swarm.listen_on(addr.clone()).map(|_| ()).map_err(|e| format!("listen on {addr}: {e}")));
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Reachable(reply) => {
                let unspecified = |addr: &Multiaddr| {
                    addr.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified()) || matches!(p, libp2p::multiaddr::Protocol::Ip6(ip) if ip.is_unspecified()))
                };
                let listening = self.swarm.listeners().filter(|a| !unspecified(a)).cloned();
                let _ = reply.send(listening.chain(self.swarm.external_addresses().cloned()).collect());
            }
            Command::PeerScore(peer, reply) => {
                let _ = reply.send(self.swarm.behaviour().gossipsub.peer_score(&peer));
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::FetchChunk(id, peers, reply) => self.fetch_chunk(id, peers, reply),
            Command::FetchPiece(piece, peers, reply) => self.fetch_piece(piece, peers, reply),
            Command::PutBlob(round, bytes, reply) => {
                let id = Digest::of(&bytes);
                let stored = self.store.put_chunk(&id, &bytes).map_err(|e| NetworkError::Store(e.to_string()));
                let _ = reply.send(stored.map(|_| {
                    self.blobs.entry(round).or_default().push(id);
                    id
                }));
            }
            Command::Ban(peer) => self.quarantine(peer, "proven by the round engine".into()),
            Command::CatchUp(run_id, reply) => {
                let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                if peers.is_empty() {
                    let _ = reply.send(Err("no connected peer to catch up from".into()));
                    return;
                }
                for peer in peers {
                    self.swarm.behaviour_mut().chunks.send_request(&peer, ChunkRequest::Latest(run_id));
                }
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// Stores the chunks and manifest and remembers them for catch-up.
    fn keep<'a>(&mut self, signed: &SignedManifest, manifest: &Manifest, adapter: &'a [u8]) -> Result<Vec<(Digest, &'a [u8])>, NetworkError> {
        let chunks = split_chunks_of(adapter, manifest.chunk_size as usize);
        let store = |e: crate::store::StoreError| NetworkError::Store(e.to_string());
        for (id, chunk) in &chunks {
            self.store.put_chunk(id, chunk).map_err(store)?;
        }
        self.store.put_manifest(manifest.round, signed).map_err(store)?;
        self.remember_latest(manifest, signed);
        self.known.insert(manifest.adapter_hash, (manifest.round, manifest.chunk_ids.clone()));
        let ids: Vec<Digest> = chunks.iter().map(|(id, _)| *id).collect();
        // A peer's manifest may wait for these very chunks (a co-owner's
        // claim naming a slice this node computed too).
        self.complete_waiting_on(&ids);
        if manifest.chunk_root.is_some() {
            self.rooted.insert(manifest.adapter_hash, (manifest.round, ids));
        }
        Ok(chunks)
    }

    fn publish(&mut self, signed: SignedManifest, manifest: Manifest, adapter: Vec<u8>, guarded: bool) -> Result<(), NetworkError> {
        let (manifest_topic, chunk_topic) = topics(&manifest.run_id);
        // A node restarted mid-round may train the round again on other
        // rows: signing a second update would be equivocation.
        if guarded && manifest.kind == ManifestKind::Update && self.published_another(&manifest) {
            return Err(NetworkError::Command(format!("this node already published another update for round {}", manifest.round)));
        }
        let chunks = self.keep(&signed, &manifest, &adapter)?;
        self.certifier.join(manifest.run_id);
        let bytes = signed.to_bytes().map_err(|e| NetworkError::Command(e.to_string()))?;
        let gossip = &mut self.swarm.behaviour_mut().gossipsub;
        let ignore_duplicate = |r: Result<gossipsub::MessageId, gossipsub::PublishError>| match r {
            Ok(_) | Err(gossipsub::PublishError::Duplicate) => Ok(()),
            Err(e) => Err(NetworkError::Command(format!("publish: {e}"))),
        };
        let mut published = bytes.len();
        ignore_duplicate(gossip.publish(manifest_topic, bytes))?;
        // In the reduce exchange updates stay here until their slices'
        // owners fetch them, and a slice result until nodes fetch it.
        let whole = manifest.kind == ManifestKind::Update && !self.reduce_runs.contains(&manifest.run_id);
        let chunks = if whole { chunks } else { Vec::new() };
        for (index, (_, chunk)) in chunks.into_iter().enumerate() {
            let message = ChunkMessage {
                adapter_hash: manifest.adapter_hash,
                index: index as u32,
                bytes: chunk.to_vec(),
            };
            let data = message.to_bytes().map_err(|e| NetworkError::Command(e.to_string()))?;
            published += data.len();
            ignore_duplicate(gossip.publish(chunk_topic.clone(), data))?;
        }
        self.count_sent(published);
        Ok(())
    }

    /// The newest update of each run, for late joiners when no certified
    /// average is held (an average is only ever served in its certificate).
    fn remember_latest(&mut self, manifest: &Manifest, signed: &SignedManifest) {
        if manifest.kind != ManifestKind::Update {
            return;
        }
        if self.latest.get(&manifest.run_id).is_none_or(|known| manifest.round >= known.round) {
            let latest = Latest {
                round: manifest.round,
                chunk_ids: manifest.chunk_ids.clone(),
                signed: signed.clone(),
            };
            self.latest.insert(manifest.run_id, latest);
        }
    }

    async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                // A relay is, by its job, reachable at the addresses it
                // listens on; libp2p's relay server only offers reservations
                // once it has a confirmed external address.
                if self.relay_server {
                    self.swarm.add_external_address(address.clone());
                }
                self.emit(NetworkEvent::Listening(address))
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                self.emit(NetworkEvent::DialFailed {
                    peer: peer_id,
                    error: error.to_string(),
                })
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, num_established, .. } => {
                self.swarm.behaviour_mut().kad.add_address(&peer_id, endpoint.get_remote_address().clone());
                if num_established.get() == 1 {
                    self.emit(NetworkEvent::PeerConnected(peer_id));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                if info.protocols.contains(&libp2p::relay::HOP_PROTOCOL_NAME) {
                    self.relays.insert(peer_id);
                }
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                    let _ = self.swarm.dial(addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => self.on_gossip(propagation_source, message_id, message).await,
            SwarmEvent::Behaviour(BehaviourEvent::Chunks(event)) => self.on_chunk_event(event).await,
            _ => {}
        }
    }

    fn count_sent(&self, bytes: usize) {
        self.traffic.count_sent(bytes);
    }

    fn count_received(&self, bytes: usize) {
        self.traffic.count_received(bytes);
    }

    async fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
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
    async fn accept_manifest(&mut self, bytes: &[u8], topic_run: Option<Digest>, source: Option<PeerId>) -> Result<(), Refusal> {
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
            None if !self.manifest_topics.values().any(|r| *r == manifest.run_id) => {
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
        if manifest.kind == ManifestKind::Attestation {
            // Kept in the store: this node's own average of the round may
            // come later, and then counts it.
            if let Some(news) = self.certifier.attest(&manifest, author, &signed) {
                self.emit(NetworkEvent::Certified(news));
            } else if self.certifier.should_ask(&manifest, author) {
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
    async fn take_offered_manifest(&mut self, bytes: &[u8], peer: PeerId) {
        match self.accept_manifest(bytes, None, Some(peer)).await {
            Ok(()) => {}
            Err(refusal) if refusal.sender_at_fault => self.emit(NetworkEvent::Rejected { peer, reason: refusal.reason }),
            Err(refusal) => tracing::debug!(%peer, reason = %refusal.reason, "ignored an offered manifest"),
        }
    }

    /// Whether this node already published another update for the round
    /// of `manifest`: its store keeps every update it published (`keep`),
    /// in this process or before a restart.
    fn published_another(&mut self, manifest: &Manifest) -> bool {
        let me = *self.swarm.local_peer_id();
        self.store.manifests(manifest.round).unwrap_or_default().into_iter().any(|stored| {
            let Ok(bytes) = stored.to_bytes() else { return false };
            self.verified(&stored, &bytes)
                .is_some_and(|(m, author)| author == me && m.kind == ManifestKind::Update && m.run_id == manifest.run_id && m.adapter_hash != manifest.adapter_hash)
        })
    }

    /// Remembers the first update of each (run, round, author); a second,
    /// different one returns the evidence of equivocation.
    fn equivocation(&mut self, manifest: &Manifest, author: PeerId, signed: &SignedManifest) -> Option<Equivocation> {
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
    async fn convict(&mut self, evidence: Equivocation) {
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
    fn quarantine(&mut self, peer: PeerId, reason: String) {
        tracing::warn!(%peer, %reason, "quarantined");
        self.swarm.behaviour_mut().blocked.block_peer(peer);
        self.swarm.behaviour_mut().gossipsub.blacklist_peer(&peer);
        self.first_updates.retain(|(_, _, author), _| *author != peer);
        self.quarantined.entry(peer).or_insert(reason);
    }

    /// Gossiped evidence for `run_id`: checked here before anything is done
    /// with it (a forwarder cannot make it up: it needs the accused's keys).
    async fn accept_evidence(&mut self, bytes: &[u8], run_id: Digest) -> Result<(), String> {
        let evidence = Equivocation::from_bytes(bytes)?;
        let proven = evidence.verify(&self.limits)?;
        if proven.run_id != run_id {
            return Err(format!("evidence for run {:?} on the topic of run {run_id:?}", proven.run_id));
        }
        self.convict(evidence).await;
        Ok(())
    }

    /// Fetches a verified manifest's chunks (from its author and `source`)
    /// and emits it, then `AdapterReady` once they are all here.
    async fn assemble(&mut self, manifest: Manifest, author: PeerId, source: Option<PeerId>) {
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

    /// Keeps this node's average of a round (`NetworkHandle::keep_average`)
    /// and gossips its attestation; attestations of the round already
    /// stored (peers that averaged first) count at once.
    async fn keep_average(&mut self, average: Average) -> Result<(), NetworkError> {
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
    async fn accept_certificate(&mut self, bytes: &[u8], peer: PeerId) -> Result<(), String> {
        let certificate = Certificate::from_bytes(bytes).map_err(|e| e.to_string())?;
        let allowed = |p: &PeerId| self.allowed_peers.as_ref().is_none_or(|list| list.contains(p));
        let certified = certificate.verify(&self.limits, allowed).map_err(|e| e.to_string())?;
        let average = certified.average.clone();
        if !self.manifest_topics.values().any(|r| *r == average.run_id) {
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

    /// A gossiped chunk: checked against its manifest when that is known
    /// (`Ok(true)`: forward), kept unchecked otherwise (`Ok(false)`: not
    /// forwarded; the manifest, once it comes, decides whether it is used).
    async fn accept_chunk_message(&mut self, data: &[u8]) -> Result<bool, String> {
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

    async fn accept_chunk(&mut self, bytes: &[u8]) -> Result<(), String> {
        let id = Digest::of(bytes);
        self.store.cache_chunk(&id, bytes).map_err(|e| e.to_string())?;
        self.complete_waiting_on(&[id]);
        Ok(())
    }

    /// Completes the pending adapters that waited for any of `ids`, now
    /// stored: fetched, or this node's own (`keep`).
    fn complete_waiting_on(&mut self, ids: &[Digest]) {
        let waiting: Vec<Digest> = self.pending.iter().filter(|(_, p)| p.manifest.chunk_ids.iter().any(|c| ids.contains(c))).map(|(h, _)| *h).collect();
        for hash in waiting {
            self.complete(hash);
        }
    }

    /// Emits `AdapterReady` once every chunk of a pending adapter is stored.
    fn complete(&mut self, hash: Digest) {
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

    /// The update manifests (and, for round 0, member announcements) of
    /// (run, round) this node holds, less those the asker holds (`held`),
    /// as many as fit.
    fn round_manifests(&mut self, run_id: Digest, round: u64, held: &[HeldManifest]) -> ChunkResponse {
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

    /// A stored manifest (`bytes` its encoding) checked, once.
    fn verified(&mut self, signed: &SignedManifest, bytes: &[u8]) -> Option<(Manifest, PeerId)> {
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
    fn check_signature(&self, signed: &SignedManifest, digest: &Digest) -> Result<(Manifest, PeerId, bool), String> {
        if let Some((_, manifest, author)) = self.verified_manifests.get(digest) {
            return Ok((manifest.clone(), *author, true));
        }
        let (manifest, author) = signed.verify(&self.limits).map_err(|e| e.to_string())?;
        Ok((manifest, author, false))
    }

    fn remember_verified(&mut self, digest: Digest, manifest: &Manifest, author: PeerId) {
        if self.verified_manifests.len() < MAX_VERIFIED_MANIFESTS {
            self.verified_manifests.insert(digest, (manifest.round, manifest.clone(), author));
        }
    }

    /// Asks up to `ASK_ROUND_PEERS` connected peers for the manifests of
    /// (run, round): peers not asked yet, and once all have been, all of
    /// them again, since they may hold more by now.
    fn ask_round(&mut self, run_id: Digest, round: u64, mut held: Vec<HeldManifest>) {
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

    fn remember_addresses(&mut self, peer: PeerId, addresses: &[String]) {
        let parsed: Vec<Multiaddr> = addresses.iter().filter_map(|a| a.parse().ok()).collect();
        if parsed.is_empty() || (self.addresses.len() >= MAX_PEER_ADDRESSES && !self.addresses.contains_key(&peer)) {
            return;
        }
        self.addresses.insert(peer, parsed);
    }

    /// A chunk request to `peer`, remembered until its answer.
    fn request_chunk(&mut self, peer: PeerId, id: Digest) {
        let request = self.send_request(peer, ChunkRequest::Chunk(id));
        self.in_flight.insert(request, (id, peer));
    }

    /// Sends `request` to `peer`, dialing it at the addresses it gave if
    /// this node is not connected to it.
    fn send_request(&mut self, peer: PeerId, request: ChunkRequest) -> request_response::OutboundRequestId {
        let addresses = self.addresses.get(&peer).cloned().unwrap_or_default();
        self.swarm.behaviour_mut().chunks.send_request_with_addresses(&peer, request, addresses)
    }

    /// Starts a `fetch_chunk`: answered at once from the store, else by the
    /// peers in turn.
    fn fetch_chunk(&mut self, id: Digest, peers: Vec<PeerId>, reply: oneshot::Sender<Option<Vec<u8>>>) {
        if let Ok(Some(bytes)) = self.store.get_chunk(&id) {
            let _ = reply.send(Some(bytes));
            return;
        }
        if self.direct.entry(id).or_default().join(peers, reply) {
            self.ask_next(id);
        }
    }

    /// Chunk `index` of a rooted adapter, its id and its proof, if this
    /// node holds it: its own (it has every id) or one it fetched (it kept
    /// the proof).
    fn held_piece(&mut self, adapter: Digest, index: u32) -> Option<(Digest, Vec<u8>, Vec<Digest>)> {
        let (id, proof) = match self.rooted.get(&adapter) {
            Some((_, ids)) => (*ids.get(index as usize)?, merkle::proof(ids, index as usize)?),
            None => self.proven.get(&(adapter, index)).map(|(_, id, proof)| (*id, proof.clone()))?,
        };
        let bytes = self.store.get_chunk(&id).ok()??;
        Some((id, bytes, proof))
    }

    /// Chunk `index` of a rooted adapter with its proof, if this node holds it.
    fn piece(&mut self, adapter: Digest, index: u32) -> ChunkResponse {
        match self.held_piece(adapter, index) {
            Some((_, bytes, proof)) => ChunkResponse::Piece(bytes, proof),
            None => ChunkResponse::NotFound,
        }
    }

    /// Bytes `start..start + len` of chunk `index` of a rooted adapter, if
    /// this node holds the chunk: its id, its proof and a bao slice of them.
    fn piece_range(&mut self, adapter: Digest, index: u32, start: u32, len: u32) -> ChunkResponse {
        let held = self.held_piece(adapter, index);
        match held.and_then(|(id, bytes, proof)| Some((id, proof, chunk_part::prove(&bytes, start, len)?))) {
            Some((id, proof, slice)) => ChunkResponse::PieceRange(id, proof, slice),
            None => ChunkResponse::NotFound,
        }
    }

    /// Starts a `fetch_piece`: answered at once if this node holds the
    /// piece, else by the peers in turn.
    fn fetch_piece(&mut self, piece: Piece, peers: Vec<PeerId>, reply: oneshot::Sender<Option<Vec<u8>>>) {
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
    fn ask_next_piece(&mut self, key: PieceKey) {
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
    async fn on_piece(&mut self, peer: PeerId, key: PieceKey, response: ChunkResponse) {
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
    fn ask_next(&mut self, id: Digest) {
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
    fn fetch_missing(&mut self) {
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

    async fn on_chunk_event(&mut self, event: request_response::Event<ChunkRequest, ChunkResponse>) {
        match event {
            request_response::Event::Message {
                message: request_response::Message::Request { request, channel, .. },
                ..
            } => {
                let response = match request {
                    ChunkRequest::Chunk(id) => match self.store.get_chunk(&id) {
                        Ok(Some(bytes)) => ChunkResponse::Chunk(bytes),
                        _ => ChunkResponse::NotFound,
                    },
                    ChunkRequest::Latest(run_id) => match (self.certifier.served(&run_id), self.latest.get(&run_id).map(|l| l.signed.to_bytes())) {
                        (Some(certificate), _) => ChunkResponse::Certificate(certificate.to_vec()),
                        (None, Some(Ok(bytes))) => ChunkResponse::Manifest(bytes),
                        _ => ChunkResponse::NotFound,
                    },
                    ChunkRequest::Round(run_id, round, held) => self.round_manifests(run_id, round, &held),
                    ChunkRequest::Piece(adapter, index) => self.piece(adapter, index),
                    ChunkRequest::PieceRange(adapter, index, start, len) => self.piece_range(adapter, index, start, len),
                };
                self.count_sent(response_size(&response));
                let _ = self.swarm.behaviour_mut().chunks.send_response(channel, response);
            }
            request_response::Event::Message {
                peer,
                message: request_response::Message::Response { request_id, response },
                ..
            } => {
                let size = response_size(&response);
                self.count_received(size);
                if let Some(kind) = response_kind(&response) {
                    self.traffic.count_kind(kind, size);
                }
                if let Some(key) = self.piece_requests.remove(&request_id) {
                    self.on_piece(peer, key, response).await;
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
            request_response::Event::OutboundFailure { request_id, peer, error, .. } if self.piece_requests.contains_key(&request_id) => {
                tracing::debug!(%peer, %error, "piece request failed; trying another peer");
                if let Some(key) = self.piece_requests.remove(&request_id) {
                    self.ask_next_piece(key);
                }
            }
            request_response::Event::OutboundFailure { request_id, peer, error, .. } => {
                if let Some((id, _)) = self.in_flight.remove(&request_id) {
                    tracing::debug!(%peer, %error, "chunk request failed; trying another peer");
                    self.ask_next(id);
                }
            }
            _ => {}
        }
    }
}
