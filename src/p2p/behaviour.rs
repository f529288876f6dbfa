//! The libp2p behaviours one node runs, composed into one.

use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{PeerId, allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, identity, kad, mdns, ping, relay, request_response};

use super::chunk_protocol::{ChunkCodec, PROTOCOL};
use crate::wire::codec::{CHUNK_SIZE, Digest};

pub const IDENTIFY_PROTOCOL: &str = "/blossom/id/1";

/// What a relay lets peers behind NAT use (`[relay]` in the configuration,
/// where the defaults are; docs/PROTOCOL.md, "Homes behind NAT").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    /// Bytes one relayed connection may carry (both ways) before the relay ends it.
    pub max_circuit_bytes: u64,
    /// How long one relayed connection may last.
    pub max_circuit_duration: Duration,
    /// Slots held at once, in all and per peer.
    pub max_reservations: usize,
    pub max_reservations_per_peer: usize,
    /// Relayed connections at once, in all and per peer.
    pub max_circuits: usize,
    pub max_circuits_per_peer: usize,
    /// New relayed connections one peer may open a minute, and slots it may
    /// ask for a minute: a relay on a home uplink is not taken over by one peer.
    pub per_peer_per_minute: u32,
    /// Bytes a second read from one peer, at most (none: no cap).
    pub max_peer_bytes_per_sec: Option<u64>,
}

impl RelayLimits {
    fn config(&self) -> relay::Config {
        let config = relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            // libp2p's per-peer and per-IP rate limiters are replaced by ours.
            reservation_rate_limiters: Vec::new(),
            circuit_src_rate_limiters: Vec::new(),
            ..relay::Config::default()
        };
        match std::num::NonZeroU32::new(self.per_peer_per_minute) {
            Some(limit) => config.reservation_rate_per_peer(limit, Duration::from_secs(60)).circuit_src_per_peer(limit, Duration::from_secs(60)),
            None => config,
        }
    }
}

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// A closed run's allowlist: other peers' connections are denied.
    pub allowed: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    /// Quarantined peers: their connections are closed and refused.
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub autonat: autonat::Behaviour,
    pub relay_client: relay::client::Behaviour,
    pub relay_server: Toggle<relay::Behaviour>,
    pub dcutr: Toggle<dcutr::Behaviour>,
    pub gossipsub: gossipsub::Behaviour,
    pub chunks: request_response::Behaviour<ChunkCodec>,
}

/// Gossipsub's mesh degree (its default is 6): each node receives about
/// one copy of a message per mesh peer.
const MESH_N: usize = 4;
/// Bytes of a message id: a prefix of the blake3 of the message. IHAVE and
/// IWANT name messages by it; 128 bits leave a forged collision out of
/// reach (a second preimage) while halving what each id costs.
const MESSAGE_ID_BYTES: usize = 16;

/// Gossipsub as docs/ARCHITECTURE.md asks: message id = blake3 of the data (so
/// duplicates collapse), a transmit size above the chunk size, and every
/// message validated by the application before it is forwarded.
///
/// What a node moves must not grow with the network (docs/PROTOCOL.md,
/// "Gossip settings"): every node receives every manifest, claim and
/// attestation, so each copy and each id counts N-fold. So:
/// - a mesh of 4 peers instead of 6, and no flood publishing (a publisher
///   sends to its mesh, not to all N − 1 peers; round 0's announcements,
///   which go out before meshes form, are also asked of peers: `ask_round`);
/// - at most one mesh peer over that (gossipsub's default is twice the
///   mesh): peers graft onto the nodes they dialed, and a node with a mesh
///   of 8 received every message up to 8 times;
/// - IHAVE gossip goes to 3 peers a heartbeat, for messages of the last 2
///   heartbeats, not to a quarter of all non-mesh peers for the last 3;
/// - message ids of 16 bytes (`MESSAGE_ID_BYTES`);
/// - messages are anonymous (no author, sequence number, key or signature
///   envelope: about 150 bytes of each copy): every manifest is signed by
///   its author already and checked before it is forwarded, and chunks are
///   checked against a signed manifest.
pub fn gossipsub_config(mesh_n: Option<usize>) -> Result<gossipsub::Config, String> {
    let n = mesh_n.unwrap_or(MESH_N);
    // Keep gossipsub's invariants: outbound_min ≤ low ≤ n ≤ high, 2·outbound_min ≤ n.
    let low = (n * 2 / 3).max(1);
    let mut builder = gossipsub::ConfigBuilder::default();
    builder.mesh_n(n).mesh_n_low(low).mesh_n_high(n + 1).mesh_outbound_min((n / 2).min(low));
    builder
        .max_transmit_size(CHUNK_SIZE + 64 * 1024)
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .flood_publish(false)
        .gossip_factor(0.0)
        .gossip_lazy(3)
        .history_gossip(2)
        .validate_messages()
        .message_id_fn(|message: &gossipsub::Message| gossipsub::MessageId::from(&Digest::of(&message.data).0[..MESSAGE_ID_BYTES]))
        .heartbeat_interval(Duration::from_millis(500))
        .build()
        .map_err(|e| format!("gossipsub config: {e}"))
}

/// Peers whose messages fail validation lose score fast, and are pruned and
/// then ignored below the thresholds. Positive terms are kept small (a few
/// tens at most) so that a handful of invalid messages outweighs them, and
/// mesh-delivery quotas are off: adapter traffic comes in bursts, once a
/// round, and an honest quiet peer must not be penalized for it.
pub fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 3600.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.5,
        first_message_deliveries_cap: 20.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.9,
        ..Default::default()
    }
}

/// Gossipsub's defaults, except that a node which leaves and rejoins within
/// the prune backoff (a restart) is not graylisted for its first GRAFTs
/// (the default penalty, −10 per violation² from the first, left restarted
/// nodes ignored by their peers; docs/PROTOCOL.md).
fn peer_score_params() -> gossipsub::PeerScoreParams {
    gossipsub::PeerScoreParams {
        behaviour_penalty_weight: -1.0,
        behaviour_penalty_threshold: 6.0,
        ..Default::default()
    }
}

pub fn build(
    key: &identity::Keypair,
    relay_client: relay::client::Behaviour,
    mdns_on: bool,
    (relay_server, hole_punching): (Option<&RelayLimits>, bool),
    mesh_n: Option<usize>,
    allowed: Option<&std::collections::HashSet<PeerId>>,
) -> Result<Behaviour, String> {
    let peer_id = key.public().to_peer_id();
    let mut gossipsub = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossipsub_config(mesh_n)?)
        .map_err(|e| format!("gossipsub: {e}"))?;
    gossipsub
        .with_peer_score(peer_score_params(), gossipsub::PeerScoreThresholds::default())
        .map_err(|e| format!("gossipsub peer score: {e}"))?;
    let mdns = if mdns_on {
        Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id).map_err(|e| format!("mdns: {e}"))?)
    } else {
        None
    };
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(512))
        .with_max_established_per_peer(Some(4))
        .with_max_pending_incoming(Some(64));
    let mut kad_config = kad::Config::new(kad::PROTOCOL_NAME);
    kad_config.set_query_timeout(Duration::from_secs(30));
    let allowed = allowed.map(|peers| {
        let mut list = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for peer in peers {
            list.allow_peer(*peer);
        }
        list
    });
    Ok(Behaviour {
        allowed: allowed.into(),
        blocked: allow_block_list::Behaviour::default(),
        limits: connection_limits::Behaviour::new(limits),
        // A new listen address (a relay slot's circuit address) goes to
        // every connected peer at once, so the relay's Kademlia has it.
        identify: identify::Behaviour::new(identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public()).with_push_listen_addr_updates(true)),
        ping: ping::Behaviour::default(),
        kad: kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config),
        mdns: mdns.into(),
        autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
        relay_client,
        relay_server: relay_server.map(|limits| relay::Behaviour::new(peer_id, limits.config())).into(),
        dcutr: hole_punching.then(|| dcutr::Behaviour::new(peer_id)).into(),
        gossipsub,
        chunks: request_response::Behaviour::new(
            [(PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(20)),
        ),
    })
}
