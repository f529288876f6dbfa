//! Behind NAT (docs/PROTOCOL.md, "Homes behind NAT"): a node its peers
//! cannot dial reserves a slot on every relay it knows, keeps it (a slot
//! that fails is asked for again, later each time), and its circuit
//! address goes out in identify, Kademlia and its manifests. Peers find
//! it through the relay's Kademlia and dial it through the circuit; DCUtR
//! then tries a direct connection, and once one exists the relayed one is
//! closed (after a grace period), so the round's traffic moves onto the
//! direct path.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, autonat, relay};

use super::EventLoop;

/// How long a node that has no confirmed external address waits for one
/// (AutoNAT, `--external-address`) before it reserves relay slots.
const REACHABILITY_WAIT: Duration = Duration::from_secs(3);
/// The longest wait before a failed slot is asked for again (1 s, 2 s, 4 s, … up to this).
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Relays a node keeps slots on, at most.
const MAX_SLOTS: usize = 8;
/// How often a node behind NAT asks the relays' Kademlia for peers: soon
/// after a slot is granted (its peers are getting theirs at the same time),
/// then less and less often, down to this.
const FIRST_DISCOVERY: Duration = Duration::from_secs(1);
const DISCOVERY_EVERY: Duration = Duration::from_secs(30);
/// A peer dialled through a relay is not dialled again for this long.
const REDIAL_AFTER: Duration = Duration::from_secs(5);
/// Peers remembered as dialled, at most (an older one is dialled again).
const MAX_REACHING: usize = 4096;
/// How long a relayed connection stays open beside a new direct one.
/// Gossipsub sends a peer its subscriptions once, on the first connection,
/// through a queue every connection's handler reads: closed at once, the
/// relayed connection could take the subscriptions down with it, and the
/// peer would never gossip to this node (CI saw a round stall so).
const RELAYED_GRACE: Duration = Duration::from_secs(5);

/// A slot on one relay: the circuit address this node listens on there.
struct Slot {
    /// `<relay address>/p2p/<relay>/p2p-circuit`.
    addr: Multiaddr,
    listener: Option<ListenerId>,
    reserved: bool,
    /// Given with `--listen` (kept whatever AutoNAT says).
    asked: bool,
    next_try: Instant,
    failures: u32,
}

/// One open connection.
struct Connection {
    id: ConnectionId,
    path: PeerPath,
    /// The address this node dialled, without `/p2p/…` (a relay's is where
    /// a slot is asked for); none for an inbound connection.
    dialled: Option<Multiaddr>,
}

/// How a connection to a peer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath {
    Direct,
    /// Through a circuit on this relay.
    Relayed(PeerId),
}

impl std::fmt::Display for PeerPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerPath::Direct => write!(f, "direct"),
            PeerPath::Relayed(relay) => write!(f, "relayed via {relay}"),
        }
    }
}

/// Relay slots, and the path of each connection.
pub(super) struct RelaySlots {
    slots: HashMap<PeerId, Slot>,
    /// AutoNAT's verdict, once it has one.
    nat: autonat::NatStatus,
    started: Instant,
    /// When peers are next asked for, and the wait after that.
    next_discovery: Instant,
    discovery_wait: Duration,
    /// Peers dialled through relays, and when (once every `REDIAL_AFTER`).
    reaching: HashMap<PeerId, Instant>,
    /// Open connections by peer.
    connections: HashMap<PeerId, Vec<Connection>>,
    /// Peers with a direct connection beside relayed ones, and when the
    /// relayed ones close.
    closing_relayed: HashMap<PeerId, Instant>,
}

impl RelaySlots {
    /// The slots of `--listen <relay>/p2p-circuit` addresses (the rest of
    /// `listen` is listened on at once).
    pub(super) fn new(listen: &[Multiaddr]) -> Self {
        let mut slots = RelaySlots {
            slots: HashMap::new(),
            nat: autonat::NatStatus::Unknown,
            started: Instant::now(),
            next_discovery: Instant::now(),
            discovery_wait: FIRST_DISCOVERY,
            reaching: HashMap::new(),
            connections: HashMap::new(),
            closing_relayed: HashMap::new(),
        };
        for addr in listen.iter().filter(|a| is_circuit(a)) {
            if let Some(relay) = circuit_relay(addr) {
                slots.slots.insert(relay, Slot::new(addr.clone(), true));
            }
        }
        slots
    }

    /// Each connected peer's path (a peer with a direct connection is direct).
    pub(super) fn paths(&self) -> Vec<(PeerId, PeerPath)> {
        let mut paths: Vec<(PeerId, PeerPath)> = self
            .connections
            .iter()
            .filter_map(|(peer, conns)| {
                let direct = conns.iter().any(|c| c.path == PeerPath::Direct);
                let path = if direct { Some(PeerPath::Direct) } else { conns.first().map(|c| c.path) };
                path.map(|path| (*peer, path))
            })
            .collect();
        paths.sort_by_key(|(peer, _)| *peer);
        paths
    }
}

impl Slot {
    fn new(addr: Multiaddr, asked: bool) -> Self {
        Slot {
            addr,
            listener: None,
            reserved: false,
            asked,
            next_try: Instant::now(),
            failures: 0,
        }
    }

    /// Records a failure; returns how long until the next try.
    fn failed(&mut self) -> Duration {
        self.listener = None;
        self.reserved = false;
        self.failures = self.failures.saturating_add(1);
        let wait = Duration::from_secs(1u64 << self.failures.min(6).saturating_sub(1)).min(MAX_RETRY);
        self.next_try = Instant::now() + wait;
        wait
    }
}

/// Whether `addr` goes through a relay (`…/p2p-circuit…`).
pub(super) fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// The relay of a circuit address: the peer id just before `/p2p-circuit`.
fn circuit_relay(addr: &Multiaddr) -> Option<PeerId> {
    let mut relay = None;
    for protocol in addr.iter() {
        match protocol {
            Protocol::P2p(peer) => relay = Some(peer),
            Protocol::P2pCircuit => return relay,
            _ => {}
        }
    }
    None
}

impl EventLoop {
    /// Whether this node needs relay slots: it is not a relay, and AutoNAT
    /// says it is private, or it has had no confirmed external address for
    /// a while.
    fn behind_nat(&self) -> bool {
        if self.relay_server {
            return false;
        }
        match self.relay_slots.nat {
            autonat::NatStatus::Private => true,
            autonat::NatStatus::Public(_) => false,
            autonat::NatStatus::Unknown => {
                self.swarm.external_addresses().next().is_none() && self.relay_slots.started.elapsed() >= REACHABILITY_WAIT
            }
        }
    }

    /// A connection opened: its path is recorded; a relay dialled directly
    /// is remembered where a slot can be asked for; a direct connection to
    /// a peer that had only relayed ones closes those, after a grace.
    pub(super) fn on_connection(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        let path = match endpoint {
            ConnectedPoint::Dialer { address, .. } if is_circuit(address) => circuit_relay(address).map_or(PeerPath::Direct, PeerPath::Relayed),
            // An inbound circuit's local address is this node's slot on the relay.
            ConnectedPoint::Listener { local_addr, .. } if is_circuit(local_addr) => circuit_relay(local_addr).map_or(PeerPath::Direct, PeerPath::Relayed),
            _ => PeerPath::Direct,
        };
        let dialled = match endpoint {
            ConnectedPoint::Dialer { address, .. } if path == PeerPath::Direct => {
                let mut base = address.clone();
                if matches!(base.iter().last(), Some(Protocol::P2p(_))) {
                    base.pop();
                }
                Some(base)
            }
            _ => None,
        };
        let connections = self.relay_slots.connections.entry(peer).or_default();
        connections.push(Connection { id, path, dialled });
        if path == PeerPath::Direct {
            if connections.iter().any(|c| c.path != PeerPath::Direct) {
                self.relay_slots.closing_relayed.entry(peer).or_insert_with(|| Instant::now() + RELAYED_GRACE);
            }
        } else if let PeerPath::Relayed(relay) = path {
            tracing::info!(%peer, %relay, "connected through relay");
        }
    }

    /// Closes the relayed connections of peers that have had a direct one
    /// for `RELAYED_GRACE`.
    fn close_relayed_beside_direct(&mut self) {
        let now = Instant::now();
        let due: Vec<PeerId> = self.relay_slots.closing_relayed.iter().filter(|(_, at)| **at <= now).map(|(peer, _)| *peer).collect();
        for peer in due {
            self.relay_slots.closing_relayed.remove(&peer);
            let connections = self.relay_slots.connections.get(&peer).map(Vec::as_slice).unwrap_or_default();
            if !connections.iter().any(|c| c.path == PeerPath::Direct) {
                continue;
            }
            let relayed: Vec<ConnectionId> = connections.iter().filter(|c| c.path != PeerPath::Direct).map(|c| c.id).collect();
            if !relayed.is_empty() {
                tracing::info!(%peer, "direct connection made; the relayed one is closed");
            }
            for connection in relayed {
                self.swarm.close_connection(connection);
            }
        }
    }

    pub(super) fn on_connection_closed(&mut self, peer: PeerId, id: ConnectionId) {
        if let Some(connections) = self.relay_slots.connections.get_mut(&peer) {
            connections.retain(|c| c.id != id);
            if connections.is_empty() {
                self.relay_slots.connections.remove(&peer);
                self.relay_slots.closing_relayed.remove(&peer);
            }
        }
    }

    /// A peer identified as a relay (it speaks the hop protocol): a node
    /// behind NAT will ask it for a slot, and asks its Kademlia for peers.
    pub(super) fn on_relay_found(&mut self, relay: PeerId) {
        if self.relay_server || self.relay_slots.slots.contains_key(&relay) || self.relay_slots.slots.len() >= MAX_SLOTS {
            return;
        }
        let dialled = self.relay_slots.connections.get(&relay).into_iter().flatten().find_map(|c| c.dialled.as_ref());
        let Some(base) = dialled else { return };
        let addr = base.clone().with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
        self.relay_slots.slots.insert(relay, Slot::new(addr, false));
    }

    /// A run's peer this node is not connected to is dialled through
    /// relays at once, when it or this node is behind NAT: through the
    /// circuit addresses its signed manifests gave, and through each relay
    /// this node holds a slot on (the peer likely holds one there too).
    /// Only circuit addresses: a home's other addresses (its LAN, its
    /// router's port) do not answer, and a dial waits for them.
    pub(super) fn reach_behind_nat(&mut self, peer: PeerId) {
        let me = *self.swarm.local_peer_id();
        let recently = self.relay_slots.reaching.get(&peer).is_some_and(|at| at.elapsed() < REDIAL_AFTER);
        if peer == me || recently || self.relays.contains(&peer) || self.swarm.is_connected(&peer) {
            return;
        }
        let mut via: Vec<Multiaddr> = self.addresses.get(&peer).into_iter().flatten().filter(|a| is_circuit(a)).cloned().collect();
        via.extend(self.relay_slots.slots.values().filter(|slot| slot.reserved).map(|slot| slot.addr.clone()));
        via.dedup();
        if via.is_empty() {
            return;
        }
        if self.relay_slots.reaching.len() >= MAX_REACHING {
            self.relay_slots.reaching.retain(|_, at| at.elapsed() < REDIAL_AFTER);
        }
        self.relay_slots.reaching.insert(peer, Instant::now());
        // Not held back by a dial under way: that one may be waiting on
        // addresses that never answer.
        let dial = DialOpts::peer_id(peer).addresses(via).condition(PeerCondition::Disconnected).build();
        if let Err(e) = self.swarm.dial(dial) {
            tracing::debug!(%peer, error = %e, "could not dial a peer through a relay");
        }
    }

    pub(super) fn on_nat_status(&mut self, status: autonat::NatStatus) {
        tracing::info!(?status, "reachability (AutoNAT)");
        self.relay_slots.nat = status;
    }

    /// Every tick: closes relayed connections whose grace is over, asks for the slots due (those of `--listen`, and, behind
    /// NAT, one on each relay known), and now and then asks the relays'
    /// Kademlia for peers.
    pub(super) fn keep_relay_slots(&mut self) {
        self.close_relayed_beside_direct();
        let behind_nat = self.behind_nat();
        let now = Instant::now();
        let due: Vec<PeerId> = self
            .relay_slots
            .slots
            .iter()
            .filter(|(_, slot)| slot.listener.is_none() && slot.next_try <= now && (slot.asked || behind_nat))
            .map(|(relay, _)| *relay)
            .collect();
        for relay in due {
            let Some(addr) = self.relay_slots.slots.get(&relay).map(|slot| slot.addr.clone()) else { continue };
            let listening = self.swarm.listen_on(addr.clone());
            let Some(slot) = self.relay_slots.slots.get_mut(&relay) else { continue };
            match listening {
                Ok(listener) => slot.listener = Some(listener),
                Err(e) => {
                    let wait = slot.failed();
                    tracing::warn!(%relay, %addr, error = %e, retry_in = ?wait, "could not ask the relay for a slot");
                }
            }
        }
        let reserved = self.relay_slots.slots.values().any(|slot| slot.reserved);
        if (reserved || behind_nat) && now >= self.relay_slots.next_discovery && !self.relays.is_empty() {
            let wait = self.relay_slots.discovery_wait;
            self.relay_slots.next_discovery = now + wait;
            self.relay_slots.discovery_wait = (wait * 2).min(DISCOVERY_EVERY);
            // Finds the relays' other clients, whose circuit addresses the
            // relays' Kademlia holds; the query dials them.
            if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                tracing::debug!(error = %e, "no Kademlia peer to ask yet");
            }
        }
    }

    /// A listener closed: a relay slot's is asked for again later.
    pub(super) fn on_listener_closed(&mut self, listener: ListenerId, reason: Result<(), std::io::Error>) {
        let Some((relay, slot)) = self.relay_slots.slots.iter_mut().find(|(_, slot)| slot.listener == Some(listener)) else { return };
        let wait = slot.failed();
        match reason {
            Ok(()) => tracing::warn!(%relay, retry_in = ?wait, "the slot on the relay closed; asking again"),
            Err(e) => tracing::warn!(%relay, error = %e, retry_in = ?wait, "no slot on the relay; asking again"),
        }
    }

    pub(super) fn on_relay_client_event(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted { relay_peer_id, renewal, .. } => {
                if let Some(slot) = self.relay_slots.slots.get_mut(&relay_peer_id) {
                    slot.reserved = true;
                    slot.failures = 0;
                }
                if renewal {
                    tracing::debug!(relay = %relay_peer_id, "renewed the slot on the relay");
                } else {
                    tracing::info!(relay = %relay_peer_id, "reserved a slot on relay {relay_peer_id}");
                    // Peers find this node's circuit address now, and it
                    // theirs as they get slots: ask soon, and again.
                    self.relay_slots.next_discovery = Instant::now();
                    self.relay_slots.discovery_wait = FIRST_DISCOVERY;
                }
            }
            relay::client::Event::OutboundCircuitEstablished { relay_peer_id, .. } => tracing::debug!(relay = %relay_peer_id, "circuit out through the relay"),
            relay::client::Event::InboundCircuitEstablished { src_peer_id, .. } => tracing::debug!(peer = %src_peer_id, "circuit in through a relay"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_of_a_circuit_address_is_the_peer_before_p2p_circuit() {
        let relay = PeerId::random();
        let me = PeerId::random();
        let addr: Multiaddr = format!("/ip4/198.51.100.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{me}").parse().unwrap();
        assert!(is_circuit(&addr));
        assert_eq!(circuit_relay(&addr), Some(relay));
        let direct: Multiaddr = format!("/ip4/198.51.100.1/tcp/4001/p2p/{relay}").parse().unwrap();
        assert!(!is_circuit(&direct));
        assert_eq!(circuit_relay(&direct), None);
    }

    #[test]
    fn a_failing_slot_waits_longer_each_time_up_to_a_bound() {
        let mut slot = Slot::new("/ip4/198.51.100.1/tcp/4001".parse().unwrap(), true);
        let waits: Vec<u64> = (0..8).map(|_| slot.failed().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(slot.listener.is_none() && !slot.reserved);
    }
}
