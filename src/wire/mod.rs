//! The wire format: what a node writes, signs and hashes, below both the
//! network (`p2p`, which moves these bytes) and the chunk store (`store`,
//! which keeps them). Nothing here knows MLX, libp2p swarms or files.
//!
//! - `codec`: digests, the canonical adapter encoding (safetensors with a
//!   fixed layout, so equal tensors hash equal everywhere), content-addressed
//!   chunks and their reassembly, each bounded before it allocates;
//! - `compression`: how an update's values travel (float32, float16, or
//!   int8 blocks with a scale), decoded the same way everywhere;
//! - `manifest`: the signed description of one published adapter;
//! - `inputs`: the list of (author, update hash) an average is computed over;
//! - `certificate`: a round's average with the attestations of two thirds
//!   of its contributors;
//! - `evidence`: signed proof of misbehaviour (two updates for one round);
//! - `merkle`: one root over an adapter's chunk ids, and per-chunk proofs;
//! - `chunk_part`: part of a chunk proven under its id (a bao slice);
//! - `tensors`: the averaging layer's float tensors to and from that
//!   encoding, with the layout checks a received adapter must pass;
//! - `slices`: that encoding cut into a round's slices (the reduce exchange).

pub mod certificate;
pub mod chunk_part;
pub mod codec;
pub mod compression;
pub mod evidence;
pub mod inputs;
pub mod manifest;
pub mod merkle;
pub mod slices;
pub mod tensors;
