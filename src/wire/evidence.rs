//! Evidence of misbehaviour that any node can check on its own
//! (docs/SECURITY.md, "Quarantine"): two different updates that one author
//! signed for one round of one run. No honest node signs two (a node that
//! restarts mid-round never publishes a second, `p2p::network` `publish`),
//! so the pair proves its author equivocated, whoever forwards it.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use super::codec::{Digest, Limits};
use super::manifest::{MAX_MANIFEST_BYTES, ManifestKind, SignedManifest};

/// Two manifests and a little framing.
pub const MAX_EVIDENCE_BYTES: usize = 2 * MAX_MANIFEST_BYTES + 64;

const BINCODE: bincode::config::Configuration<bincode::config::LittleEndian, bincode::config::Varint, bincode::config::Limit<MAX_EVIDENCE_BYTES>> =
    bincode::config::standard().with_limit::<MAX_EVIDENCE_BYTES>();

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Equivocation {
    pub first: SignedManifest,
    pub second: SignedManifest,
}

/// Who a checked piece of evidence convicts, and of what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proven {
    pub peer: PeerId,
    pub run_id: Digest,
    pub round: u64,
    /// In words, for logs and `status` ("equivocation: …").
    pub reason: String,
}

impl Equivocation {
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        bincode::serde::encode_to_vec(self, BINCODE).map_err(|e| e.to_string())
    }

    /// Decodes at most `MAX_EVIDENCE_BYTES`; trailing bytes are an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() > MAX_EVIDENCE_BYTES {
            return Err(format!("evidence of {} bytes exceeds {MAX_EVIDENCE_BYTES}", bytes.len()));
        }
        let (evidence, read): (Equivocation, usize) = bincode::serde::decode_from_slice(bytes, BINCODE).map_err(|e| format!("malformed evidence: {e}"))?;
        if read != bytes.len() {
            return Err(format!("malformed evidence: {} trailing bytes", bytes.len() - read));
        }
        Ok(evidence)
    }

    /// Both signatures valid, one author, one run, one round, both updates,
    /// and different adapters.
    pub fn verify(&self, limits: &Limits) -> Result<Proven, String> {
        let (first, author) = self.first.verify(limits).map_err(|e| format!("evidence: {e}"))?;
        let (second, other) = self.second.verify(limits).map_err(|e| format!("evidence: {e}"))?;
        if author != other || first.run_id != second.run_id || first.round != second.round {
            return Err("evidence of equivocation names two authors, runs or rounds".into());
        }
        if first.kind != ManifestKind::Update || second.kind != ManifestKind::Update {
            return Err("evidence of equivocation that is not two updates".into());
        }
        if first.adapter_hash == second.adapter_hash {
            return Err("evidence of equivocation whose two updates are the same adapter".into());
        }
        Ok(Proven {
            peer: author,
            run_id: first.run_id,
            round: first.round,
            reason: format!("equivocation: two different signed updates for round {}", first.round),
        })
    }
}

#[cfg(test)]
mod tests {
    use libp2p_identity::Keypair;

    use super::*;
    use crate::wire::manifest::Manifest;

    fn update(key: &Keypair, round: u64, bytes: &[u8]) -> SignedManifest {
        let manifest = Manifest::describe(Digest::of(b"run"), round, &key.public().to_peer_id(), bytes);
        SignedManifest::sign(&manifest, key).unwrap()
    }

    #[test]
    fn two_signed_updates_for_one_round_convict_their_author() {
        let key = Keypair::generate_ed25519();
        let evidence = Equivocation { first: update(&key, 3, b"one"), second: update(&key, 3, b"two") };
        let bytes = evidence.to_bytes().unwrap();
        let proven = Equivocation::from_bytes(&bytes).unwrap().verify(&Limits::default()).unwrap();
        assert_eq!((proven.peer, proven.round), (key.public().to_peer_id(), 3));
        assert!(Equivocation::from_bytes(&bytes[..bytes.len() - 2]).is_err());
    }

    #[test]
    fn evidence_that_proves_nothing_is_refused() {
        let (key, other) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let check = |first, second| Equivocation { first, second }.verify(&Limits::default()).unwrap_err();
        assert!(check(update(&key, 3, b"one"), update(&key, 3, b"one")).contains("same adapter"));
        assert!(check(update(&key, 3, b"one"), update(&key, 4, b"two")).contains("two authors, runs or rounds"));
        assert!(check(update(&key, 3, b"one"), update(&other, 3, b"two")).contains("two authors, runs or rounds"));
        let mut forged = update(&key, 3, b"two");
        forged.signature[0] ^= 1;
        assert!(check(update(&key, 3, b"one"), forged).contains("signature"));
        let hello = Manifest::hello(Digest::of(b"run"), &key.public().to_peer_id());
        let hello = SignedManifest::sign(&Manifest { round: 3, ..hello }, &key).unwrap();
        assert!(Equivocation { first: update(&key, 3, b"one"), second: hello }.verify(&Limits::default()).is_err());
    }
}
