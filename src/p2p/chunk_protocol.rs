//! `/blossom/chunk/1`: request a chunk by id (its bytes or "not found"), a
//! chunk by (adapter, index) with its Merkle proof (an update whose manifest
//! names its chunks by their root), part of such a chunk with a BLAKE3
//! (bao) proof of it under the chunk's id (what an audit of part of a
//! slice fetches), the newest manifest a peer holds for a
//! run (how late joiners catch up), the average manifest of one outer state
//! by its hash (how a node on another start takes the one most of a round
//! trained from), or the update manifests of one round (what a node that
//! joined mid-round missed).
//! Length-prefixed bincode, bounded before anything is allocated.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use crate::wire::codec::{CHUNK_SIZE, Digest};
use crate::wire::certificate::MAX_CERTIFICATE_BYTES;
use crate::wire::manifest::{MAX_MANIFEST_BYTES, ManifestKind};
use crate::wire::merkle;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/blossom/chunk/1");
/// A manifest the asker of a `Round` holds, named by its kind and author:
/// the first 8 bytes of blake3(kind tag ‖ author's peer id) (`held_key`).
/// A collision only costs the asker one manifest it then lacks until it
/// asks another peer or the gossip brings it.
pub type HeldManifest = [u8; 8];
/// The most manifests a `Round` request may say it holds.
pub const MAX_HELD: usize = 4096;

/// How a `Round` request names `author`'s update (or, for `Members`, its
/// round-0 announcement).
pub fn held_key(kind: ManifestKind, author: &PeerId) -> HeldManifest {
    let tag = match kind {
        ManifestKind::Members => b"members",
        _ => b"update\0",
    };
    let mut bytes = tag.to_vec();
    bytes.extend_from_slice(&author.to_bytes());
    let [a, b, c, d, e, f, g, h, ..] = Digest::of(&bytes).0;
    [a, b, c, d, e, f, g, h]
}

/// Requests are a digest, a tag and at most `MAX_HELD` held manifests;
/// responses a chunk and a little framing.
const MAX_REQUEST: usize = 64 + MAX_HELD * size_of::<HeldManifest>();
const MAX_RESPONSE: usize = CHUNK_SIZE + MAX_MANIFEST_BYTES;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkRequest {
    Chunk(Digest),
    /// The run's newest adapter: a round certificate if the peer holds
    /// one, else its newest update manifest.
    Latest(Digest),
    /// The signed update manifests the peer holds for (run id, round),
    /// less those the asker holds already (`held_key`, at most `MAX_HELD`).
    /// Without that list a node waiting for round 0 in a run of N received
    /// N manifests with every answer, three answers a second.
    Round(Digest, u64, Vec<HeldManifest>),
    /// Chunk `index` of the adapter with this hash, with its Merkle proof.
    Piece(Digest, u32),
    /// Bytes `start..start + len` of chunk `index` of the adapter with this
    /// hash: the chunk's id with its Merkle proof, and a bao slice that
    /// proves those bytes under the id without the rest of the chunk.
    PieceRange(Digest, u32, u32, u32),
    /// (run id, hash): the signed average manifest of the outer state with
    /// this hash, if the peer kept or took it, certified or not. The asker
    /// wants that state by its hash (most of a round's updates name it as
    /// their start), so the hash is the whole check; its chunks follow as
    /// an average's do.
    State(Digest, Digest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkResponse {
    Chunk(Vec<u8>),
    /// Encoded `SignedManifest` (verified by the receiver).
    Manifest(Vec<u8>),
    /// Encoded `SignedManifest`s, together at most `MAX_ROUND_MANIFESTS` bytes.
    Manifests(Vec<Vec<u8>>),
    /// A chunk and the siblings from its leaf to its adapter's root.
    Piece(Vec<u8>, Vec<Digest>),
    /// A chunk's id, its siblings to the adapter's root, and a bao slice
    /// (`bao::encode::SliceExtractor`) of part of the chunk under that id.
    PieceRange(Digest, Vec<Digest>, Vec<u8>),
    NotFound,
    /// An encoded `wire::certificate::Certificate` (verified by the receiver).
    Certificate(Vec<u8>),
}

/// Sibling hashes a proof may have (`merkle::MAX_LEAVES` leaves).
const MAX_PROOF: usize = merkle::MAX_LEAVES.ilog2() as usize;

/// What one `Manifests` response may carry, so it stays inside a frame.
pub const MAX_ROUND_MANIFESTS: usize = CHUNK_SIZE;

#[derive(Debug, Clone, Default)]
pub struct ChunkCodec;

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes exceeds {max}")));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    let config = bincode::config::standard().with_limit::<MAX_RESPONSE>();
    let (value, read) = bincode::serde::decode_from_slice(bytes, config).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if read != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "trailing bytes"));
    }
    Ok(value)
}

fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

impl libp2p::request_response::Codec for ChunkCodec {
    type Protocol = StreamProtocol;
    type Request = ChunkRequest;
    type Response = ChunkResponse;

    async fn read_request<T: AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ChunkRequest> {
        decode(&read_frame(io, MAX_REQUEST).await?)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ChunkResponse> {
        let response: ChunkResponse = decode(&read_frame(io, MAX_RESPONSE).await?)?;
        let too_large = match &response {
            ChunkResponse::Chunk(bytes) => bytes.len() > CHUNK_SIZE,
            ChunkResponse::Manifest(bytes) => bytes.len() > MAX_MANIFEST_BYTES,
            ChunkResponse::Manifests(list) => list.iter().map(Vec::len).sum::<usize>() > MAX_ROUND_MANIFESTS,
            ChunkResponse::Piece(bytes, proof) => bytes.len() > CHUNK_SIZE || proof.len() > MAX_PROOF,
            // A slice of a chunk is never larger than the chunk's whole encoding.
            ChunkResponse::PieceRange(_, proof, slice) => slice.len() as u128 > bao::encode::encoded_size(CHUNK_SIZE as u64) || proof.len() > MAX_PROOF,
            ChunkResponse::NotFound => false,
            ChunkResponse::Certificate(bytes) => bytes.len() > MAX_CERTIFICATE_BYTES,
        };
        if too_large {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "response larger than the protocol allows"));
        }
        Ok(response)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, request: ChunkRequest) -> io::Result<()> {
        write_frame(io, &encode(&request)?).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T, response: ChunkResponse) -> io::Result<()> {
        write_frame(io, &encode(&response)?).await
    }
}
