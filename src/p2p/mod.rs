//! The network layer: moves opaque, signed, content-addressed data between
//! peers. It knows nothing of MLX or training (DESIGN.md, "Layers").

pub mod behaviour;
pub mod chunk_protocol;
pub mod codec;
pub mod manifest;
pub mod network;
