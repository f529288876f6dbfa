//! The network layer: moves opaque, signed, content-addressed data between
//! peers (the formats are in `wire`, below this layer and the store). It
//! knows nothing of MLX or training (docs/ARCHITECTURE.md, "Layers").

pub mod behaviour;
pub mod certify;
pub mod chunk_protocol;
pub mod network;
pub mod payload;
pub mod peer_bytes;
pub mod sources;
