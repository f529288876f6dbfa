//! netsim: an in-memory network for whole-network simulations in one
//! process.
//!
//! [`SimNetwork`] is a hub of nodes; [`SimTransport`] is a libp2p
//! `Transport` over it (addresses `/memory/<n>`), so the real libp2p stack
//! (noise, yamux, gossipsub, request-response) runs over simulated links.
//! Each link has latency, bandwidth and loss ([`LinkParams`]); the hub can
//! split the nodes into partitions and heal them, and cut a node off (a
//! crash). [`Scenario`] reads the TOML files in `netsim/scenarios/`.
//! Every random choice comes from a seed.

mod link;
mod scenario;
mod transport;

pub use link::{LinkParams, SimStream};
pub use scenario::{Action, Event, LinkSpec, Scenario, ScenarioError};
pub use transport::{SimNetwork, SimTransport, Traffic};
