//! blossom-p2p: federated LoRA/DoRA fine-tuning with MLX over libp2p, with no
//! central server. docs/ARCHITECTURE.md draws the layers and what each may
//! import.
//!
//! With the default `train` feature the crate trains, generates and serves
//! with MLX. Without it (`cargo build --no-default-features`) only the
//! layers that move bytes are built: the network, the store, the wire
//! format, averaging and the round engine, for `relay`, `status` and an
//! exchange-only `start`; MLX is not linked and cannot be imported.

pub mod aggregate;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dashboard;
pub mod durable;
pub mod http;
pub mod logging;
pub mod node;
pub mod p2p;
pub mod rng;
pub mod store;
pub mod wire;

#[cfg(feature = "train")]
pub mod data;
pub mod default_model;
#[cfg(feature = "train")]
pub mod doctor;
#[cfg(feature = "train")]
pub mod hub;
#[cfg(feature = "train")]
pub mod mlx_env;
#[cfg(feature = "train")]
pub mod model;
#[cfg(feature = "train")]
pub mod plot;
#[cfg(feature = "train")]
pub mod serve;
#[cfg(feature = "train")]
pub mod simulation;
#[cfg(feature = "train")]
pub mod train;
