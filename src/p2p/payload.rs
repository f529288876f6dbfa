//! Payload bytes a node moves, and what the bytes it received carried: the
//! breakdown behind the traffic figures (`simulate` prints it). The links
//! count more than this: gossipsub's forwarding copies and control
//! messages, request framing, encryption, and identify, Kademlia and ping.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::wire::manifest::ManifestKind;

/// What a received payload was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// Gossiped update manifests.
    Updates,
    /// Gossiped slice claims (the reduce exchange).
    Claims,
    /// Gossiped attestations of averages.
    Attestations,
    /// Other gossiped manifests: round 0's announcements.
    Announcements,
    /// Adapter chunks gossiped whole (the gossip exchange).
    GossipChunks,
    /// Equivocation evidence.
    Evidence,
    /// Pieces fetched with their proofs: slice inputs and slice results.
    Pieces,
    /// Parts of pieces with their proofs: what audits of part of a slice fetch.
    AuditParts,
    /// Chunks fetched by hash: input lists, catch-up adapters.
    Chunks,
    /// A round's manifests asked of peers (`Round` answers).
    RoundAnswers,
    /// Certificates and newest manifests (`Latest` answers).
    Certificates,
}

impl PayloadKind {
    pub const ALL: [PayloadKind; 11] = [
        PayloadKind::Updates,
        PayloadKind::Claims,
        PayloadKind::Attestations,
        PayloadKind::Announcements,
        PayloadKind::GossipChunks,
        PayloadKind::Evidence,
        PayloadKind::Pieces,
        PayloadKind::AuditParts,
        PayloadKind::Chunks,
        PayloadKind::RoundAnswers,
        PayloadKind::Certificates,
    ];

    /// A gossiped manifest's kind. Averages are never gossiped; one that
    /// comes anyway counts with the announcements.
    pub fn of_manifest(kind: ManifestKind) -> PayloadKind {
        match kind {
            ManifestKind::Update => PayloadKind::Updates,
            ManifestKind::Slice => PayloadKind::Claims,
            ManifestKind::Attestation => PayloadKind::Attestations,
            ManifestKind::Members | ManifestKind::Average => PayloadKind::Announcements,
        }
    }

    /// Its name in metrics and tables.
    pub fn name(self) -> &'static str {
        match self {
            PayloadKind::Updates => "updates",
            PayloadKind::Claims => "claims",
            PayloadKind::Attestations => "attestations",
            PayloadKind::Announcements => "announcements",
            PayloadKind::GossipChunks => "gossip_chunks",
            PayloadKind::Evidence => "evidence",
            PayloadKind::Pieces => "pieces",
            PayloadKind::AuditParts => "audit_parts",
            PayloadKind::Chunks => "chunks",
            PayloadKind::RoundAnswers => "round_answers",
            PayloadKind::Certificates => "certificates",
        }
    }
}

/// Payload bytes this node published or served, and received: unique
/// gossip messages and request-response answers, not protocol framing or
/// gossipsub's forwarding copies. Received bytes are also counted by kind
/// (a gossip message that does not decode counts in the total only).
#[derive(Debug, Default)]
pub struct PayloadTraffic {
    sent: AtomicU64,
    received: AtomicU64,
    received_by_kind: [AtomicU64; PayloadKind::ALL.len()],
}

impl PayloadTraffic {
    pub fn count_sent(&self, bytes: usize) {
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Attributes received bytes (already in the total) to `kind`.
    pub fn count_kind(&self, kind: PayloadKind, bytes: usize) {
        self.received_by_kind[kind as usize].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// (sent, received) so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed))
    }

    /// Received bytes so far, by kind.
    pub fn received_by_kind(&self) -> Vec<(PayloadKind, u64)> {
        PayloadKind::ALL.iter().map(|kind| (*kind, self.received_by_kind[*kind as usize].load(Ordering::Relaxed))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_bytes_are_counted_in_the_total_and_by_kind() {
        let traffic = PayloadTraffic::default();
        traffic.count_received(300);
        traffic.count_kind(PayloadKind::Claims, 300);
        traffic.count_received(40);
        traffic.count_sent(7);
        assert_eq!(traffic.totals(), (7, 340));
        let by_kind = traffic.received_by_kind();
        assert_eq!(by_kind.len(), PayloadKind::ALL.len());
        assert!(by_kind.iter().all(|(kind, bytes)| *bytes == if *kind == PayloadKind::Claims { 300 } else { 0 }));
        // Each kind has its own slot and name.
        let names: std::collections::BTreeSet<&str> = PayloadKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), PayloadKind::ALL.len());
        assert!(PayloadKind::ALL.iter().enumerate().all(|(i, kind)| *kind as usize == i));
    }
}
