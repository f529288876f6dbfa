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

/// SplitMix64: small, seedable, and the same on every platform.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
