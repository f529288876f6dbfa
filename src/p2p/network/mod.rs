//! One task owns the libp2p `Swarm`; a cloneable [`NetworkHandle`] sends it
//! commands, and events come back on a channel (as in rust-libp2p's
//! file-sharing example). This file is the event loop and the command
//! dispatch; each protocol's handling lives in its own file:
//!
//! | file | what it does |
//! | --- | --- |
//! | `handle.rs` | the handle and its commands |
//! | `gossip.rs` | gossip in: every message validated before it is forwarded; joining a run's topics |
//! | `publish.rs` | gossip out: this node's manifests (and chunks), kept first |
//! | `fetch.rs` | missing chunks, pieces, a round's manifests, the newest certificate: asked of peers, checked |
//! | `serve.rs` | answers to peers' requests; this node's certified averages; store clean-up |
//! | `discovery.rs` | listen addresses, identify, mDNS, Kademlia, relays; a run's peers |
//! | `relays.rs` | behind NAT: relay slots, dials through relays, each connection's path |

mod discovery;
mod fetch;
mod gossip;
mod handle;
mod publish;
mod relays;
mod serve;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::{Transport, upgrade};
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identity, kad, noise, quic, request_response, tcp, yamux};
use tokio::sync::mpsc;

use crate::store::Store;
use crate::wire::codec::{Digest, Limits};
use crate::wire::manifest::{Manifest, SignedManifest};

use super::behaviour::{self, Behaviour, RelayLimits};
use super::certify::{CertificateNews, Certifier};
use super::chunk_protocol::{ChunkRequest, ChunkResponse};
use super::payload::PayloadTraffic;
use super::peer_bytes::PeerBytes;
use fetch::{DirectFetch, Pending, PieceFetch};
use handle::Command;
use publish::Latest;
use relays::RelaySlots;
use serve::response_size;

pub use handle::NetworkHandle;
pub use relays::PeerPath;

#[derive(Debug, Clone)]
pub struct NetworkOptions {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses others can reach this node at.
    pub external: Vec<Multiaddr>,
    pub mdns: bool,
    /// Run a circuit-relay server with these limits (the `relay` command).
    pub relay_server: Option<RelayLimits>,
    /// Try direct connections (DCUtR) to peers reached through a relay.
    pub hole_punching: bool,
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
    /// Slots on relays (a node behind NAT), and each connection's path.
    relay_slots: RelaySlots,
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
    /// `ask_state`'s requests out, with the state each asks for, and the
    /// state still sought (answers for any other are dropped).
    state_requests: HashMap<request_response::OutboundRequestId, Digest>,
    state_sought: Option<Digest>,
    /// Runs (joined) a peer asked this node for the newest certificate of.
    latest_asked: HashSet<Digest>,
    /// Manifests verified and kept, by the hash of their signed bytes, with
    /// their round (at most `MAX_VERIFIED_MANIFESTS`).
    verified_manifests: HashMap<Digest, (u64, Manifest, PeerId)>,
    /// Peers asked for each (run, round)'s manifests since the last time
    /// every connected peer had been.
    asked_rounds: HashMap<(Digest, u64), HashSet<PeerId>>,
}

/// Builds the swarm (TCP and QUIC, noise, yamux, relay client) and starts
/// its task on the current tokio runtime.
pub fn spawn(keypair: identity::Keypair, options: NetworkOptions) -> Result<(NetworkHandle, mpsc::Receiver<NetworkEvent>), NetworkError> {
    let setup = |e: &dyn std::fmt::Display| NetworkError::Setup(e.to_string());
    let store = Store::open(&options.store_dir, options.store_quota).map_err(|e| setup(&e))?;
    let (mdns_on, relay_limits, mesh_n) = (options.mdns, options.relay_server.clone(), options.mesh_n);
    let relay_server = relay_limits.is_some();
    let hole_punching = options.hole_punching;
    let allowed_peers = options.allowed_peers.clone();
    let allowed_for_behaviour = allowed_peers.clone();
    let build_behaviour =
        move |key: &identity::Keypair, relay_client| behaviour::build(key, relay_client, mdns_on, (relay_limits.as_ref(), hole_punching), mesh_n, allowed_for_behaviour.as_ref());
    // Every connection's streams are counted per peer (`peer_bytes.rs`).
    let peer_bytes = Arc::new(PeerBytes::new(options.relay_server.as_ref().and_then(|limits| limits.max_peer_bytes_per_sec)));
    let counted = peer_bytes.clone();
    let (kind, psk) = (options.transport, options.psk);
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| {
            let transport = other_transport(key, kind, psk)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Transport::map(transport, move |(peer, muxer), _| (peer, counted.count(peer, muxer))).boxed())
        })
        .map_err(|e| setup(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key, relay_client| build_behaviour(key, relay_client).map_err(Into::into))
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    if relay_server {
        swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server));
    }
    // A relay slot (`--listen <relay>/p2p-circuit`) is asked for once the
    // loop runs, and again until the relay grants it (`relays.rs`).
    for addr in options.listen.iter().filter(|a| !relays::is_circuit(a)) {
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
        relay_slots: RelaySlots::new(&options.listen),
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
        state_requests: HashMap::new(),
        state_sought: None,
        latest_asked: HashSet::new(),
        verified_manifests: HashMap::new(),
        asked_rounds: HashMap::new(),
    };
    tokio::spawn(event_loop.run());
    Ok((NetworkHandle { commands: command_tx, peer_id, traffic, peer_bytes }, event_rx))
}

/// TCP (wrapped in pnet in a private network) and QUIC (not in a private
/// network: pnet has no QUIC), or the simulated network; noise-authenticated
/// and yamux-multiplexed where the transport does not do both itself.
fn other_transport(
    key: &identity::Keypair,
    kind: TransportKind,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let noise = noise::Config::new(key)?;
    let tcp = || tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let boxed = match (kind, psk) {
        (TransportKind::Simulated { network, node }, _) => network
            .transport(node)
            .upgrade(upgrade::Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        (TransportKind::Internet, Some(psk)) => tcp()
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(upgrade::Version::V1)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        (TransportKind::Internet, None) => tcp()
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .or_transport(quic::tokio::Transport::new(quic::Config::new(key)).map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer))))
            .map(|either, _| either.into_inner())
            .boxed(),
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
                _ = tick.tick() => {
                    self.fetch_missing();
                    self.keep_relay_slots();
                    self.ask_certificates_again();
                }
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

    /// One command from a `NetworkHandle`: answered at once, or, for
    /// fetches, once the bytes are here.
    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Subscribe(run_id, exchange, reply) => {
                let _ = reply.send(self.subscribe(run_id, exchange));
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
                self.unsubscribe(run_id);
                let _ = reply.send(());
            }
            Command::ForgetBefore(round, reply) => {
                let _ = reply.send(self.forget_before(round));
            }
            Command::AskRound(run_id, round, held) => self.ask_round(run_id, round, held),
            Command::RunPeers(run_id, reply) => {
                let _ = reply.send(self.run_peers(run_id));
            }
            Command::AskedForLatest(run_id, reply) => {
                let _ = reply.send(self.latest_asked.contains(&run_id));
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
                let _ = reply.send(self.reachable_addrs());
            }
            Command::PeerScore(peer, reply) => {
                let _ = reply.send(self.swarm.behaviour().gossipsub.peer_score(&peer));
            }
            Command::PeerPaths(reply) => {
                let _ = reply.send(self.relay_slots.paths());
            }
            Command::ConnectedPeers(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::FetchChunk(id, peers, reply) => self.fetch_chunk(id, peers, reply),
            Command::FetchPiece(piece, peers, reply) => self.fetch_piece(piece, peers, reply),
            Command::PutBlob(round, bytes, reply) => {
                let _ = reply.send(self.put_blob(round, bytes));
            }
            Command::Ban(peer) => self.quarantine(peer, "proven by the round engine".into()),
            Command::CatchUp(run_id, reply) => {
                let _ = reply.send(self.catch_up(run_id));
            }
            Command::AskState(run_id, hash, reply) => {
                let _ = reply.send(self.ask_state(run_id, hash));
            }
        }
    }

    fn count_sent(&self, bytes: usize) {
        self.traffic.count_sent(bytes);
    }

    fn count_received(&self, bytes: usize) {
        self.traffic.count_received(bytes);
    }

    /// The chunk protocol: a peer's request is answered from what this
    /// node holds (`serve.rs`); a response or a failure moves a fetch on
    /// (`fetch.rs`).
    async fn on_chunk_event(&mut self, event: request_response::Event<ChunkRequest, ChunkResponse>) {
        match event {
            request_response::Event::Message {
                message: request_response::Message::Request { request, channel, .. },
                ..
            } => {
                let response = self.answer(request);
                self.count_sent(response_size(&response));
                let _ = self.swarm.behaviour_mut().chunks.send_response(channel, response);
            }
            request_response::Event::Message {
                peer,
                message: request_response::Message::Response { request_id, response },
                ..
            } => self.on_response(peer, request_id, response).await,
            request_response::Event::OutboundFailure { request_id, peer, error, .. } => self.on_request_failed(request_id, peer, &error),
            _ => {}
        }
    }
}
