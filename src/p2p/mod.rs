//! The network layer: moves opaque, signed, content-addressed data between
//! peers. It knows nothing of MLX or training (DESIGN.md, "Layers").

pub mod codec;
pub mod manifest;
