//! Manifests: what a node says about an adapter it published (docs/ARCHITECTURE.md,
//! "Protocol"), versioned bincode 2, signed with the author's libp2p ed25519
//! identity. A manifest is only believed after `verify`.

use libp2p_identity::{Keypair, PeerId, PublicKey};
use serde::{Deserialize, Serialize};

use super::codec::{CHUNK_SIZE, Digest, Limits, split_chunks_of};
use super::merkle;

pub const MANIFEST_VERSION: u16 = 6;
/// Upper bound on an encoded signed manifest: 2,048 chunk ids (512 MiB of
/// adapter) plus keys and fields fit well inside.
pub const MAX_MANIFEST_BYTES: usize = 128 * 1024;
/// Addresses a manifest may give for its author, and their length.
pub const MAX_ADDRESSES: usize = 4;
pub const MAX_ADDRESS_LEN: usize = 256;

const BINCODE: bincode::config::Configuration<bincode::config::LittleEndian, bincode::config::Varint, bincode::config::Limit<MAX_MANIFEST_BYTES>> =
    bincode::config::standard().with_limit::<MAX_MANIFEST_BYTES>();

/// What a manifest describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestKind {
    /// A node's adapter after its local steps of a round: gossiped, averaged.
    Update,
    /// A node's average of a round's updates: kept and served to late
    /// joiners, never gossiped (nodes that agree already hold its chunks).
    Average,
    /// "I am here for round 0": gossiped while a run waits for its first
    /// members, so every node starts round 0 with the same member list. It
    /// describes no adapter (no chunks, length 0).
    Members,
    /// A slice owner's results in the reduce exchange: chunk i is slice
    /// `slice.indices[i]` of the round's average over the updates
    /// `slice.inputs` (one claim for all the slices an owner computed).
    Slice,
    /// "My average of this round is `adapter_hash`, over the inputs
    /// `inputs`": gossiped by every node after it averages a round, so that
    /// two thirds of a round's contributors can certify its average
    /// (`wire::certificate`). It describes no chunks.
    Attestation,
}

/// What a slice owner claims (docs/PROTOCOL.md, "The reduce exchange").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceClaim {
    /// The slices claimed, strictly increasing. Every slice but the
    /// round's last is `chunk_size` long, so the claim's chunks are its
    /// slices' results.
    pub indices: Vec<u32>,
    /// blake3 of the sorted (author, update hash) pairs it averaged.
    pub inputs: Digest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u16,
    pub kind: ManifestKind,
    /// blake3 of the canonical run config: which run this belongs to.
    pub run_id: Digest,
    pub round: u64,
    /// The author's peer id, as bytes.
    pub author: Vec<u8>,
    /// The averaged adapter this one was trained from (none in round 0).
    pub parent: Option<Digest>,
    /// The chunks' ids, in order; empty when `chunk_root` names them.
    pub chunk_ids: Vec<Digest>,
    /// An update of the reduce exchange names its chunks by the Merkle
    /// root over their ids (`wire::merkle`), not by the list: its slices
    /// are fetched one by one with a proof, and every node receives every
    /// update's manifest, so a list of N ids each would cost O(N²) a round.
    pub chunk_root: Option<Digest>,
    /// blake3 of the whole canonical encoding.
    pub adapter_hash: Digest,
    pub adapter_len: u64,
    /// The chunk size the adapter is cut into: 256 KiB, or a round's slice
    /// size in the reduce exchange.
    pub chunk_size: u32,
    /// Set exactly for `ManifestKind::Slice`.
    pub slice: Option<SliceClaim>,
    /// Where the author can be dialed (multiaddrs, at most
    /// `MAX_ADDRESSES`): in the reduce exchange slice owners fetch from
    /// authors they may not be connected to.
    pub addresses: Vec<String>,
    /// A round-0 update: blake3 of the member list its author trained
    /// round 0 with (how a node that settles late learns whether it is on
    /// its peers' lists).
    pub members: Option<Digest>,
    /// An average or an attestation: blake3 of the input list
    /// (`wire::inputs`) the average was computed over.
    pub inputs: Option<Digest>,
    /// Training examples and tokens behind this adapter (FedAvg weights).
    pub examples: u64,
    pub tokens: u64,
    pub train_loss: f32,
    pub eval_loss: Option<f32>,
}

impl Manifest {
    /// A round-0 member announcement by `author` (no adapter).
    pub fn hello(run_id: Digest, author: &PeerId) -> Manifest {
        Manifest {
            kind: ManifestKind::Members,
            ..Manifest::describe(run_id, 0, author, &[])
        }
    }

    /// `author`'s attestation that its average of `round` is `average`
    /// (`len` bytes), computed over the input list with digest `inputs`.
    pub fn attestation(run_id: Digest, round: u64, author: &PeerId, average: Digest, len: u64, inputs: Digest) -> Manifest {
        Manifest {
            kind: ManifestKind::Attestation,
            adapter_hash: average,
            adapter_len: len,
            inputs: Some(inputs),
            ..Manifest::describe(run_id, round, author, &[])
        }
    }

    /// An update manifest for the canonical encoding `adapter` by `author`
    /// (chunk ids, hash and length filled in; training figures zero, no parent).
    pub fn describe(run_id: Digest, round: u64, author: &PeerId, adapter: &[u8]) -> Manifest {
        Self::describe_chunked(run_id, round, author, adapter, CHUNK_SIZE)
    }

    /// Names the chunks by their Merkle root instead of the list.
    pub fn rooted(mut self) -> Manifest {
        self.chunk_root = Some(merkle::root(&self.chunk_ids));
        self.chunk_ids.clear();
        self
    }

    /// How many chunks the adapter is cut into.
    pub fn chunk_count(&self) -> usize {
        usize::try_from(self.adapter_len).unwrap_or(usize::MAX).div_ceil((self.chunk_size as usize).max(1))
    }

    /// As `describe`, cut into chunks of `chunk_size` bytes (at most 256 KiB).
    pub fn describe_chunked(run_id: Digest, round: u64, author: &PeerId, adapter: &[u8], chunk_size: usize) -> Manifest {
        let chunk_size = chunk_size.clamp(1, CHUNK_SIZE);
        Manifest {
            version: MANIFEST_VERSION,
            kind: ManifestKind::Update,
            run_id,
            round,
            author: author.to_bytes(),
            parent: None,
            chunk_ids: split_chunks_of(adapter, chunk_size).into_iter().map(|(id, _)| id).collect(),
            chunk_root: None,
            adapter_hash: Digest::of(adapter),
            adapter_len: adapter.len() as u64,
            chunk_size: chunk_size as u32,
            slice: None,
            addresses: Vec::new(),
            members: None,
            inputs: None,
            examples: 0,
            tokens: 0,
            train_loss: 0.0,
            eval_loss: None,
        }
    }
}

/// A manifest and its author's signature. The key that checks it is the
/// one the author's peer id embeds (an ed25519 peer id is its public key),
/// so it is not sent: every node receives every manifest, several copies
/// of each, and a key beside the author's id was 37 of its ~300 bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// The bincode encoding of a `Manifest`: signed as it is, so the
    /// signature never depends on re-encoding.
    pub manifest: Vec<u8>,
    pub signature: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest of {0} bytes exceeds {MAX_MANIFEST_BYTES}")]
    TooLarge(usize),
    #[error("malformed manifest: {0}")]
    Malformed(String),
    #[error("manifest version {0} is not supported (this node speaks {MANIFEST_VERSION})")]
    Version(u16),
    #[error("the signature does not match the author's key")]
    BadSignature,
    #[error("the author {0} is a peer id that does not embed its public key (manifests are signed by ed25519 identities)")]
    KeylessAuthor(String),
    #[error("inconsistent manifest: {0}")]
    Inconsistent(String),
    #[error("cannot sign: {0}")]
    Signing(String),
}

/// The public key an identity-multihash peer id carries (ed25519 ones do).
fn embedded_key(author: &PeerId) -> Result<PublicKey, ManifestError> {
    let multihash = author.as_ref();
    // 0: the identity multihash, whose digest is the protobuf-encoded key.
    if multihash.code() != 0 {
        return Err(ManifestError::KeylessAuthor(author.to_string()));
    }
    PublicKey::try_decode_protobuf(multihash.digest()).map_err(|e| ManifestError::Malformed(format!("the author's key: {e}")))
}

impl SignedManifest {
    pub fn sign(manifest: &Manifest, keypair: &Keypair) -> Result<Self, ManifestError> {
        let bytes = bincode::serde::encode_to_vec(manifest, BINCODE).map_err(|e| ManifestError::Signing(e.to_string()))?;
        let signature = keypair.sign(&bytes).map_err(|e| ManifestError::Signing(e.to_string()))?;
        Ok(Self { manifest: bytes, signature })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, ManifestError> {
        bincode::serde::encode_to_vec(self, BINCODE).map_err(|e| ManifestError::Malformed(e.to_string()))
    }

    /// Decodes at most `MAX_MANIFEST_BYTES`; allocation is bounded by bincode's limit.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let (signed, read): (SignedManifest, usize) =
            bincode::serde::decode_from_slice(bytes, BINCODE).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if read != bytes.len() {
            return Err(ManifestError::Malformed(format!("{} trailing bytes", bytes.len() - read)));
        }
        Ok(signed)
    }

    /// Checks the signature against the key the author's peer id embeds,
    /// and that the fields agree with each other and with `limits`;
    /// returns the manifest and its author.
    pub fn verify(&self, limits: &Limits) -> Result<(Manifest, PeerId), ManifestError> {
        let (manifest, read): (Manifest, usize) =
            bincode::serde::decode_from_slice(&self.manifest, BINCODE).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if read != self.manifest.len() {
            return Err(ManifestError::Malformed("trailing bytes in the manifest".into()));
        }
        if manifest.version != MANIFEST_VERSION {
            return Err(ManifestError::Version(manifest.version));
        }
        let author = PeerId::from_bytes(&manifest.author).map_err(|e| ManifestError::Malformed(format!("author: {e}")))?;
        if !embedded_key(&author)?.verify(&self.manifest, &self.signature) {
            return Err(ManifestError::BadSignature);
        }
        if manifest.addresses.len() > MAX_ADDRESSES || manifest.addresses.iter().any(|a| a.len() > MAX_ADDRESS_LEN) {
            return Err(ManifestError::Inconsistent(format!("more than {MAX_ADDRESSES} addresses, or one over {MAX_ADDRESS_LEN} bytes")));
        }
        if (manifest.kind == ManifestKind::Slice) != manifest.slice.is_some() {
            return Err(ManifestError::Inconsistent("a slice claim, and only a slice claim, names its slice".into()));
        }
        if manifest.kind == ManifestKind::Members {
            if manifest.round != 0 || manifest.adapter_len != 0 || !manifest.chunk_ids.is_empty() {
                return Err(ManifestError::Inconsistent("a member announcement is for round 0 and describes no adapter".into()));
            }
            return Ok((manifest, author));
        }
        let len = usize::try_from(manifest.adapter_len).unwrap_or(usize::MAX);
        if len == 0 || len > limits.max_adapter_bytes {
            return Err(ManifestError::Inconsistent(format!("adapter length {len} outside 1..={}", limits.max_adapter_bytes)));
        }
        let may_name_inputs = matches!(manifest.kind, ManifestKind::Attestation | ManifestKind::Average);
        if (manifest.inputs.is_some() && !may_name_inputs) || (manifest.kind == ManifestKind::Attestation && manifest.inputs.is_none()) {
            return Err(ManifestError::Inconsistent("an attestation names its inputs, and only an attestation or an average may".into()));
        }
        if manifest.kind == ManifestKind::Attestation {
            if !manifest.chunk_ids.is_empty() || manifest.chunk_root.is_some() {
                return Err(ManifestError::Inconsistent("an attestation describes no chunks".into()));
            }
            return Ok((manifest, author));
        }
        let chunk_size = manifest.chunk_size as usize;
        if !(8..=CHUNK_SIZE).contains(&chunk_size) {
            return Err(ManifestError::Inconsistent(format!("chunk size {chunk_size} outside 8..={CHUNK_SIZE}")));
        }
        if manifest.chunk_root.is_some() && (manifest.kind != ManifestKind::Update || !manifest.chunk_ids.is_empty()) {
            return Err(ManifestError::Inconsistent("only an update may name its chunks by a root, and then it lists none".into()));
        }
        if manifest.chunk_root.is_none() && manifest.chunk_ids.len() != len.div_ceil(chunk_size) {
            return Err(ManifestError::Inconsistent(format!(
                "{} chunk ids for {len} bytes (expected {})",
                manifest.chunk_ids.len(),
                len.div_ceil(chunk_size)
            )));
        }
        if let Some(claim) = &manifest.slice
            && (claim.indices.len() != manifest.chunk_ids.len() || !claim.indices.is_sorted_by(|a, b| a < b))
        {
            return Err(ManifestError::Inconsistent(format!(
                "a slice claim names {} slices for {} chunks, or not in increasing order",
                claim.indices.len(),
                manifest.chunk_ids.len()
            )));
        }
        if !manifest.train_loss.is_finite() || manifest.eval_loss.is_some_and(|l| !l.is_finite()) {
            return Err(ManifestError::Inconsistent("a loss is NaN or infinite".into()));
        }
        Ok((manifest, author))
    }
}
