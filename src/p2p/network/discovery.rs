//! Finding and reaching peers: listen addresses, identify, mDNS, Kademlia
//! and relays; which peers are a run's members, and where this node can
//! be dialled.

use libp2p::{Multiaddr, PeerId, autonat, dcutr, gossipsub, identify, mdns};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;

use crate::wire::codec::Digest;

use super::{EventLoop, NetworkEvent};
use super::gossip::topics;
use crate::p2p::behaviour::BehaviourEvent;

impl EventLoop {
    pub(super) async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
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
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                self.swarm.behaviour_mut().kad.add_address(&peer_id, endpoint.get_remote_address().clone());
                self.on_connection(peer_id, connection_id, &endpoint);
                if num_established.get() == 1 {
                    self.emit(NetworkEvent::PeerConnected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, .. } => self.on_connection_closed(peer_id, connection_id),
            SwarmEvent::ListenerClosed { listener_id, reason, .. } => self.on_listener_closed(listener_id, reason),
            SwarmEvent::ListenerError { listener_id, error } => tracing::debug!(?listener_id, %error, "a listener failed"),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                if info.protocols.contains(&libp2p::relay::HOP_PROTOCOL_NAME) {
                    self.relays.insert(peer_id);
                    self.on_relay_found(peer_id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. })) => self.on_nat_status(new),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(event)) => self.on_relay_client_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result })) => match result {
                Ok(_) => tracing::info!(peer = %remote_peer_id, "hole punched: a direct connection"),
                Err(e) => tracing::info!(peer = %remote_peer_id, error = %e, "no hole punched: the connection stays relayed"),
            },
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

    /// The run's peers that may train: subscribed to its manifest topic,
    /// and not relays (which seed a run but never train).
    pub(super) fn run_peers(&self, run_id: Digest) -> Vec<PeerId> {
        let topic = topics(&run_id).0.hash();
        let gossip = &self.swarm.behaviour().gossipsub;
        gossip.all_peers().filter(|(p, t)| t.contains(&&topic) && !self.relays.contains(p)).map(|(p, _)| *p).collect()
    }

    /// Where peers can dial this node: its listen addresses that name a
    /// host, and its external addresses.
    pub(super) fn reachable_addrs(&self) -> Vec<Multiaddr> {
        let unspecified = |addr: &Multiaddr| {
            addr.iter().any(|p| matches!(p, Protocol::Ip4(ip) if ip.is_unspecified()) || matches!(p, Protocol::Ip6(ip) if ip.is_unspecified()))
        };
        let listening = self.swarm.listeners().filter(|a| !unspecified(a)).cloned();
        listening.chain(self.swarm.external_addresses().cloned()).collect()
    }
}
