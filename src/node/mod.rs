//! The node: the round engine joining the trainer and the network (docs/ARCHITECTURE.md,
//! "Layers"). `engine` runs rounds through two narrow seams, the
//! `RoundTrainer` trait and the p2p `NetworkHandle`; `compute` puts an MLX
//! trainer behind that trait on its own thread; `partition` decides who
//! trains on which rows; `engine/slices.rs` who owns which slice of an average and
//! how a slice is computed; `misbehaviour` what a simulated attacker does
//! in the engine; `checkpoint` keeps what a node needs to resume
//! after a crash.

pub mod checkpoint;
#[cfg(feature = "train")]
pub mod compute;
pub mod engine;
pub mod misbehaviour;
pub mod partition;
pub mod prometheus;
pub mod status;

use crate::aggregate::Method;
use crate::aggregate::outer::OuterOptimizer;
use crate::config::{Aggregation, CompressionKind, Config, ExchangeMode, OuterOptimizerKind};
use crate::wire::compression::Compression;
use crate::p2p::network::Exchange;
use crate::wire::codec::Digest;

/// The examples an honest node trains on in a round when it has rows: each
/// of `train.local_steps` steps takes `grad_accumulation_steps` batches of
/// `batch_size` rows (cycling through its rows). The only non-zero weight an
/// update may claim (`EngineSettings::examples_per_round`).
pub fn examples_per_round(config: &Config) -> u64 {
    u64::from(config.train.local_steps)
        .saturating_mul(u64::from(config.train.grad_accumulation_steps))
        .saturating_mul(u64::from(config.train.batch_size))
}

/// The run id: blake3 of everything nodes must share to average each
/// other's adapters (docs/ARCHITECTURE.md, "Protocol, in short"): the base model's files, the
/// data set, the LoRA shape, the template, and the round's length and count
/// (the learning-rate schedule spans the run), and the outer step and the
/// compression where they are not plain averaging of float32 adapters (so
/// that such runs keep their ids).
pub fn run_id(model_identity: &str, data_fingerprint: &str, config: &Config) -> Digest {
    let mut canonical = serde_json::json!({
        "model": model_identity,
        "data": data_fingerprint,
        "lora": &config.lora,
        "template": &config.data.template,
        "local_steps": config.train.local_steps,
        "batch_size": config.train.batch_size,
        "rounds": config.federation.rounds,
        "exchange": config.federation.exchange,
    });
    if let OuterOptimizer::Nesterov { lr, momentum } = outer(config) {
        canonical["outer"] = serde_json::json!({"nesterov": [lr, momentum]});
    }
    if config.federation.compression() != CompressionKind::None {
        canonical["compression"] = serde_json::json!(config.federation.compression());
    }
    Digest::of(canonical.to_string().as_bytes())
}

/// How the config's updates travel (every node of a run must agree: it is
/// part of the run id).
pub fn compression(config: &Config) -> Compression {
    config.federation.compression().into()
}

impl From<CompressionKind> for Compression {
    fn from(kind: CompressionKind) -> Self {
        match kind {
            CompressionKind::None => Compression::None,
            CompressionKind::Fp16 => Compression::Fp16,
            CompressionKind::Int8 => Compression::Int8,
            CompressionKind::Topk => Compression::TopK,
        }
    }
}

/// The outer step the config asks for (every node of a run must take the
/// same: it is part of the run id).
pub fn outer(config: &Config) -> OuterOptimizer {
    match config.federation.outer_optimizer {
        OuterOptimizerKind::Average => OuterOptimizer::Average,
        OuterOptimizerKind::Nesterov => OuterOptimizer::Nesterov {
            lr: config.federation.outer_lr as f32,
            momentum: config.federation.outer_momentum as f32,
        },
    }
}

/// Bytes of an adapter's canonical encoding: what one upload moves.
pub fn adapter_size(tensors: &crate::aggregate::Tensors) -> Result<usize, String> {
    crate::wire::tensors::encode(tensors).map(|bytes| bytes.len())
}

pub fn exchange(config: &Config) -> Exchange {
    match config.federation.exchange {
        ExchangeMode::Gossip => Exchange::Gossip,
        ExchangeMode::Reduce => Exchange::Reduce,
    }
}

pub fn method(config: &Config) -> Method {
    match config.federation.aggregation {
        Aggregation::Fedavg => Method::FedAvg,
        Aggregation::Exact => Method::Exact,
        Aggregation::Median => Method::Median,
        Aggregation::TrimmedMean => Method::TrimmedMean {
            fraction: config.federation.trim_fraction,
        },
        Aggregation::NormClip => Method::NormClip,
    }
}
