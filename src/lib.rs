//! blossom-p2p: federated LoRA/DoRA fine-tuning with MLX over libp2p, with no
//! central server. See ../shared/DESIGN.md for the architecture.

pub mod aggregate;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dashboard;
pub mod data;
pub mod default_model;
pub mod doctor;
pub mod durable;
pub mod http;
pub mod hub;
pub mod logging;
pub mod mlx_env;
pub mod model;
pub mod node;
pub mod p2p;
pub mod serve;
pub mod store;
pub mod train;
